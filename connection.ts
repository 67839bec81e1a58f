/**
 * {@linkcode Connection}, the handle of a live connection: given to its handler as `conn`,
 * returned by `connect()`, listed by servers and registries. The driver behind it is private
 * (`_driver.ts`).
 *
 * @module
 */

import type { Driver } from "./_driver.ts";
import { ConnectionClosed, isNormalReason } from "./errors.ts";
import { newConnectionId } from "./registry.ts";
import type { Addr, ProxyHeader } from "./transport/transport.ts";
import type { TlsPeerCertificate } from "./transport/tls.ts";
import { isDelay } from "./_timer.ts";

/**
 * Where the library reports what happens to connections, by level: `error` for a handler that
 * crashed (with its stack), `warn` for a peer's fault (a bad frame, a reset, a slow consumer:
 * one line), `debug` for the rest (a custom stop reason, a failed handshake). `console` fits.
 */
export interface Logger {
  /** A handler crashed, a server cannot accept. */
  error(...data: unknown[]): void;
  /** A peer misbehaved; one line. */
  warn(...data: unknown[]): void;
  /** Expected events worth a line when debugging. */
  debug(...data: unknown[]): void;
}

/** `"active"` delivers frames as they arrive; `"passive"` only on `recv`. */
export type Mode = "active" | "passive";

/** Options of {@linkcode Connection.call}. */
export interface CallOptions {
  /** Milliseconds to wait for the reply (default 5000; `Infinity` waits for ever). */
  timeout?: number;
}

/** Options of {@linkcode Connection.stop}. */
export interface StopOptions {
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  timeout?: number;
}

export type { CodeChange } from "./_driver.ts";

/**
 * A live connection. Messages sent with `call`, `cast` and `info` become events of its handler;
 * `send` writes to its socket.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, memory, reply, serve } from "./mod.ts";
 * const transport = memory("conn-doc");
 * const server = await serve(async function* () {
 *   for (let ev = yield; ev.type !== "shutdown"; ) {
 *     ev = ev.type === "call" ? yield reply(ev.from, "pong") : yield;
 *   }
 * }, { transport });
 * const client = await connect(async function* () {}, { transport });
 * const [conn] = server.connections();
 * assert.equal(await conn.call("ping"), "pong");
 * await client.stop();
 * await server.stop();
 * ```
 */
export class Connection<T = unknown> {
  /** Unique within this process. */
  readonly id: string;
  readonly #driver: Driver<T>;

  /** Made by `serve` and `connect`; not constructed directly. */
  constructor(driver: unknown) {
    this.#driver = driver as Driver<T>;
    this.id = newConnectionId();
  }

  /** The name registered with {@linkcode Connection.register}, if any. */
  get name(): string | undefined {
    return this.#driver.name;
  }

  /** The peer's address. */
  get remoteAddr(): Addr {
    return this.#driver.socket.remoteAddr;
  }

  /** This end's address. */
  get localAddr(): Addr {
    return this.#driver.socket.localAddr;
  }

  /**
   * Resolves with the reason once the connection has closed: `"normal"` (the handler returned
   * or stopped), `"shutdown"` or `"idle"` (its owner stopped it), or what ended it (an `Error`
   * such as `FrameTooLarge`, or a handler's own `stop(reason)`). Never rejects.
   */
  get closed(): Promise<unknown> {
    return this.#driver.closed;
  }

  /**
   * Resolves once the connection has ended normally (`"normal"`, `"shutdown"`, `"idle"`);
   * rejects on any other end, with the reason if it is an `Error`, else a `ConnectionClosed`
   * carrying it. For callers that want an abnormal end to throw:
   * `await conn.done` in a client script.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, lengthPrefixed, memory, send, serve } from "./mod.ts";
   * const transport = memory("done-doc");
   * const server = await serve(async function* () {
   *   yield send(new Uint8Array(100)); // more than the client accepts
   * }, { transport, framing: lengthPrefixed(4) });
   * const client = await connect(async function* () {
   *   yield;
   * }, { transport, framing: lengthPrefixed(4, { maxLength: 10 }), logger: { error() {}, warn() {}, debug() {} } });
   * await assert.rejects(client.done, { name: "FrameTooLarge" });
   * await server.stop();
   * ```
   */
  get done(): Promise<void> {
    return this.#driver.closed.then((reason) => {
      if (isNormalReason(reason)) return;
      throw reason instanceof Error ? reason : new ConnectionClosed(this.id, reason);
    });
  }

  /**
   * Why the connection ends, for the handler's `finally` (etcp's `terminate` reason): set once
   * the end is decided from outside the handler's own code (`"shutdown"` or `"idle"` when
   * forced, a `stop(reason)`, `FrameTooLarge` after a `frameError` event, `BufferFull`, …), so
   * that cleanup can tell a clean end from a failure. `undefined` while the connection is open,
   * and so in a `finally` reached by the handler's own `return` or `throw` (it knows why).
   *
   * @example Logging abnormal ends in cleanup
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, memory, serve, stop } from "./mod.ts";
   * const transport = memory("close-reason-doc");
   * const reasons: unknown[] = [];
   * const server = await serve(async function* (conn) {
   *   try {
   *     yield stop("kicked");
   *   } finally {
   *     reasons.push(conn.closeReason);
   *   }
   * }, { transport, logger: { error() {}, warn() {}, debug() {} } });
   * const client = await connect(async function* () {}, { transport });
   * await client.closed;
   * await server.stop();
   * assert.deepEqual(reasons, ["kicked"]);
   * ```
   */
  get closeReason(): unknown {
    return this.#driver.closeReason;
  }

  /** TLS: the protocol ALPN chose in the handshake (`null` if none, `undefined` without TLS). */
  get alpnProtocol(): string | null | undefined {
    return this.#driver.socket.alpnProtocol;
  }

  /**
   * TLS: the peer's certificate, where the connection can tell (`tls({ engine: "node" })`, a
   * server with `clientCaCerts`, a `startTls` switch over `node:tls`); `null` if it gave none.
   */
  get peerCertificate(): TlsPeerCertificate | null | undefined {
    return this.#driver.socket.peerCertificate;
  }

  /** The PROXY protocol header the connection came with (servers with `proxyProtocol` only). */
  get proxy(): ProxyHeader | undefined {
    return this.#driver.socket.proxy;
  }

  /** Whether the handler is hibernating. */
  get hibernating(): boolean {
    return this.#driver.hibernating;
  }

  /** Bytes sent and not yet written to the socket (Node's `writableLength`). */
  get bufferedAmount(): number {
    return this.#driver.bufferedAmount;
  }

  /** Bytes read from the socket so far. */
  get bytesRead(): number {
    return this.#driver.bytesRead;
  }

  /** Bytes written to the socket so far. */
  get bytesWritten(): number {
    return this.#driver.bytesWritten;
  }

  /** Frames sent after the write side broke (a failed write), dropped rather than buffered. */
  get framesDropped(): number {
    return this.#driver.framesDropped;
  }

  /**
   * Encode and write `data` (etcp's `send_async`): queued in order, returns at once. Throws if
   * the framing cannot encode `data`. If more than the `maxBuffered` option's bytes are already
   * pending (the peer does not read), the connection is ended with `BufferFull` (or, with
   * `onBufferFull: "throw"`, this throws `BufferFull`); watch `bufferedAmount` and await
   * {@linkcode Connection.drain} to send at the peer's pace. Dropped once the connection has
   * ended.
   */
  send(data: T | Uint8Array | string): void {
    this.#driver.sendFromOutside(data, false);
  }

  /**
   * Encode and write `data`; resolves once it has been written to the socket. Rejects with
   * `ConnectionClosed` if the connection ends first, or `BufferFull` as {@linkcode send} would.
   */
  sendSync(data: T | Uint8Array | string): Promise<void> {
    return this.#driver.sendFromOutside(data, true)!;
  }

  /** Resolves once nothing sent is pending (all written, or the write side broke). */
  drain(): Promise<void> {
    return this.#driver.drain();
  }

  /**
   * Send `message` as a `call` event and wait for the handler's `reply`. Rejects with
   * `TimeoutError` after `timeout` ms, or `ConnectionClosed` if the connection ends first.
   */
  call<R = unknown>(message: unknown, options: CallOptions = {}): Promise<R> {
    const timeout = options.timeout ?? 5000;
    if (!isDelay(timeout)) {
      return Promise.reject(new RangeError(`call: timeout must be a number >= 0, not ${timeout}`));
    }
    return this.#driver.call(message, timeout) as Promise<R>;
  }

  /** Send `message` as a `cast` event (dropped if the connection has ended). */
  cast(message: unknown): void {
    this.#driver.deliver({ type: "cast", message });
  }

  /** Send `message` as an `info` event (dropped if the connection has ended). */
  info(message: unknown): void {
    this.#driver.deliver({ type: "info", message });
  }

  /**
   * Ask the handler to finish (a `shutdown` event with `reason`); after `timeout` ms it is
   * forced (its `finally` runs, the socket closes). Resolves once closed. A shorter timeout
   * given later (by this or a server's `stop`) wins.
   */
  stop(reason: unknown = "normal", options: StopOptions = {}): Promise<void> {
    const timeout = options.timeout;
    if (timeout !== undefined && !isDelay(timeout)) {
      return Promise.reject(new RangeError(`stop: timeout must be a number >= 0, not ${timeout}`));
    }
    return this.#driver.shutdown(reason, timeout);
  }

  /**
   * Register `name` for this connection in its registry: true if it was free (or already
   * ours). Names that look like connection ids are refused with a `TypeError`.
   */
  register(name: string): Promise<boolean> {
    return this.#driver.register(name);
  }

  /** Let this connection's socket keep the process alive (the default), after `unref()`. */
  ref(): void {
    this.#driver.socket.ref?.();
  }

  /**
   * Let the process exit while this connection is open and idle (Node's `socket.unref()`): its
   * pending read no longer keeps the process alive. Timers a handler arms still do.
   */
  unref(): void {
    this.#driver.socket.unref?.();
  }

  /** Stops the connection (`await using conn = await connect(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}
