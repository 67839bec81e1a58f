/**
 * {@linkcode Connection}, the handle of a live connection: given to its handler as `conn`,
 * returned by `connect()`, listed by servers and registries. The driver behind it is private
 * (`_driver.ts`).
 *
 * @module
 */

import type { Handler } from "./actions.ts";
import type { Driver } from "./_driver.ts";
import type { UpgradeOptions } from "./server.ts";
import { ConnectionClosed, describeValue, isNormalReason } from "./errors.ts";
import { newConnectionId } from "./registry.ts";
import type { Addr, ProxyHeader } from "./transport/transport.ts";
import type { TlsPeerCertificate } from "./transport/tls.ts";
import { checkUpgrade, timeoutOption } from "./_options.ts";
import { withTimeout } from "./_with_timeout.ts";
import type { TraceEntry, TraceOption } from "./_trace.ts";

export type { TraceEntry, TraceKind, TraceOption } from "./_trace.ts";

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

/** Options of {@linkcode Connection.sendSync}. */
export interface SendSyncOptions {
  /**
   * Milliseconds to wait for the data to reach the socket (default `Infinity`); then the send
   * rejects with `TimeoutError`, and the data stays queued: the connection goes on.
   */
  timeout?: number;
}

/** Options of {@linkcode Connection.stop}. */
export interface StopOptions {
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  timeout?: number;
}

/** Options of {@linkcode Connection.whenUp}. */
export interface WhenUpOptions {
  /** Milliseconds to wait (default `Infinity`); then it rejects with `TimeoutError`. */
  timeout?: number;
}

/**
 * Where a connection is: `"up"` (open), `"closing"` (its end is decided: the handler's `finally`
 * runs, output lingers), `"closed"`. A reconnecting client (`connect(…, { reconnect })`) is also
 * `"backing-off"` (between sockets, waiting to reconnect) or `"connecting"` (a reconnect under way,
 * until its new handler has run up to its first yield); after a drop it is `"closing"` while the
 * old handler finishes, and `"closed"` only once stopped or given up.
 */
export type ConnectionState = "up" | "closing" | "backing-off" | "connecting" | "closed";

/**
 * Where a connection's handler is, for {@linkcode ConnectionStats}: `"running"` (a step of it is
 * under way), `"waiting"` (at a yield, for an event or for its output to drain), `"hibernated"`,
 * `"stopping"` (its end is decided: its `finally` runs, or its output lingers), `"closed"`.
 */
export type HandlerStatus = "running" | "waiting" | "hibernated" | "stopping" | "closed";

/** What {@linkcode Connection.stats} reports (Erlang's `sys:statistics`). */
export interface ConnectionStats {
  /** Where the handler is. */
  state: HandlerStatus;
  /** Bytes read from the socket. */
  bytesIn: number;
  /** Bytes written to the socket. */
  bytesOut: number;
  /** Frames decoded from what was read (a `batch()` of frames counts once). */
  framesIn: number;
  /** Frames sent (by the handler's `send` and by `conn.send`), not counting those dropped. */
  framesOut: number;
  /** Frames sent after the write side broke, dropped. */
  framesDropped: number;
  /** Bytes sent and not yet written. */
  bufferedAmount: number;
  /** Events waiting for the handler (and, in passive mode, frames read and not yet asked for). */
  mailbox: number;
  /** Calls to this connection (`conn.call`) waiting for their reply. */
  callsPending: number;
  /** When the connection started, in ms since the Unix epoch. */
  startedAt: number;
  /**
   * When the last event came (a read from the peer, a message, a timer…), in ms since the Unix
   * epoch; undefined before any.
   */
  lastEventAt: number | undefined;
  /** Whether the connection is traced (see {@linkcode Connection.trace}). */
  traced: boolean;
}

export type { CodeChange } from "./_driver.ts";

// What a handle reads and drives: its connection's driver, or, for a reconnecting client, the
// client (client.ts), which outlives its drivers. What belongs to one socket (its counts, its
// handler's state, its trace) is read off `current`: the driver itself, or the client's current one.
type Target<T> =
  & Pick<
    Driver<T>,
    | "closed"
    | "closeReason"
    | "state"
    | "sendFromOutside"
    | "drain"
    | "call"
    | "deliver"
    | "shutdown"
    | "register"
    | "upgrade"
    | "metrics"
    | "setReferenced"
  >
  & {
    readonly current: Pick<
      Driver<T>,
      | "name"
      | "socket"
      | "hibernating"
      | "bufferedAmount"
      | "bytesRead"
      | "bytesWritten"
      | "framesDropped"
      | "stats"
      | "handlerState"
      | "trace"
      | "recentTrace"
    >;
  }
  & { whenUp?(timeout: number): Promise<void> };

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
 * const client = await connect(async function* () {
 *   yield;
 * }, { transport });
 * const [conn] = server.connections();
 * assert.equal(await conn.call("ping"), "pong");
 * await client.stop();
 * await server.stop();
 * ```
 */
export class Connection<T = unknown> {
  /** Unique within this process. */
  readonly id: string;
  readonly #driver: Target<T>;

  /** Made by `serve` and `connect`; not constructed directly. */
  constructor(driver: unknown) {
    this.#driver = driver as Target<T>;
    this.id = newConnectionId();
  }

  /** The name registered with {@linkcode Connection.register}, if any. */
  get name(): string | undefined {
    return this.#driver.current.name;
  }

  /** The peer's address. */
  get remoteAddr(): Addr {
    return this.#driver.current.socket.remoteAddr;
  }

  /** This end's address. */
  get localAddr(): Addr {
    return this.#driver.current.socket.localAddr;
  }

  /**
   * Resolves with the reason once the connection has closed: `"normal"` (the handler returned
   * or stopped), `"shutdown"` or `"idle"` (its owner stopped it), or what ended it (an `Error`
   * such as `FrameTooLarge`, or a handler's own `stop(reason)`). Never rejects. A reconnecting
   * client's only once it stops for good (`stop()`, or reconnecting gave up).
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
   * const client = await connect(async function* () {
   *   yield; // until the server's stop ends the connection: a disconnect event
   * }, { transport });
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
    return this.#driver.current.socket.alpnProtocol;
  }

  /**
   * TLS: the peer's certificate, where the connection can tell (`tls({ engine: "node" })`, a
   * server with `clientCaCerts`, a `startTls` switch over `node:tls`); `null` if it gave none.
   */
  get peerCertificate(): TlsPeerCertificate | null | undefined {
    return this.#driver.current.socket.peerCertificate;
  }

  /** The PROXY protocol header the connection came with (servers with `proxyProtocol` only). */
  get proxy(): ProxyHeader | undefined {
    return this.#driver.current.socket.proxy;
  }

  /**
   * Where the connection is (see {@linkcode ConnectionState}): `"up"` while open; a reconnecting
   * client also goes `"backing-off"` and `"connecting"` between sockets.
   */
  get state(): ConnectionState {
    return this.#driver.state;
  }

  /**
   * Resolves once the connection is up: at once if it is, or, for a reconnecting client
   * (`connect(…, { reconnect })`) between sockets, once a reconnect brings it back. Rejects with
   * `ConnectionClosed` once the connection has closed for good (stopped, or, for a reconnecting
   * client, given up), or `TimeoutError` after `timeout` ms.
   *
   * @example Waiting for a reconnecting client to come back
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, memory, serve } from "./mod.ts";
   * const transport = memory("when-up-doc");
   * const quiet = { error() {}, warn() {}, debug() {} };
   * const serving = () => serve(async function* () { yield; }, { transport, logger: quiet });
   * let server = await serving();
   * const client = await connect(async function* () {
   *   for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown";) ev = yield;
   * }, { transport, reconnect: { initialDelay: 10 } });
   * assert.equal(client.state, "up");
   * await server.stop(); // the client's handler sees disconnect; the client backs off
   * server = await serving();
   * await client.whenUp({ timeout: 2000 }); // the same handle, on a new socket
   * assert.equal(client.state, "up");
   * await client.stop();
   * assert.equal(client.state, "closed");
   * await server.stop();
   * ```
   */
  whenUp(options: WhenUpOptions = {}): Promise<void> {
    const timeout = timeoutOption("whenUp", options, Infinity);
    if (timeout instanceof Error) return Promise.reject(timeout);
    const target = this.#driver;
    if (target.whenUp !== undefined) return target.whenUp(timeout);
    return target.state === "up"
      ? Promise.resolve()
      : Promise.reject(new ConnectionClosed(this.id, target.closeReason));
  }

  /** Whether the handler is hibernating. */
  get hibernating(): boolean {
    return this.#driver.current.hibernating;
  }

  /** Bytes sent and not yet written to the socket (Node's `writableLength`). */
  get bufferedAmount(): number {
    return this.#driver.current.bufferedAmount;
  }

  /** Bytes read from the socket so far. */
  get bytesRead(): number {
    return this.#driver.current.bytesRead;
  }

  /** Bytes written to the socket so far. */
  get bytesWritten(): number {
    return this.#driver.current.bytesWritten;
  }

  /** Frames sent after the write side broke (a failed write), dropped rather than buffered. */
  get framesDropped(): number {
    return this.#driver.current.framesDropped;
  }

  /**
   * Encode and write `data` (etcp's `send_async`): queued in order, returns at once. Throws if
   * the framing cannot encode `data`. If more than the `maxBuffered` option's bytes are already
   * pending (the peer does not read), the connection is ended with `BufferFull` (or, with
   * `onBufferFull: "throw"`, this throws `BufferFull`); watch `bufferedAmount` and await
   * {@linkcode Connection.drain} to send at the peer's pace. Dropped once the connection has
   * ended; throws `ConnectionDown` while a reconnecting client has no socket (as `cast` and
   * `info` do).
   */
  send(data: T | Uint8Array | string): void {
    this.#driver.sendFromOutside(data, false);
  }

  /**
   * Encode and write `data`; resolves once it has been written to the socket (etcp's
   * `send_sync`). Rejects with `ConnectionClosed` if the connection ends first, or `BufferFull`
   * as {@linkcode send} would. With `timeout` (etcp's `send_sync/3`), rejects with
   * `TimeoutError` if the data has not been written within `timeout` ms (a peer that does not
   * read); the data stays queued, in order, and the connection goes on.
   *
   * @example A bounded send to a peer that does not read
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, memory, serve, TimeoutError } from "./mod.ts";
   * const transport = memory("send-sync-doc", { bufferSize: 1024 });
   * const server = await serve(async function* () {
   *   yield; // passive, with no recv: reads nothing, so 1 KiB fills its socket
   * }, { transport, mode: "passive" });
   * const client = await connect(async function* () {
   *   yield;
   * }, { transport });
   * await assert.rejects(client.sendSync(new Uint8Array(64 * 1024), { timeout: 50 }), TimeoutError);
   * assert.equal(client.closeReason, undefined, "the connection goes on");
   * await client.stop("normal", { timeout: 0 });
   * await server.stop();
   * ```
   */
  sendSync(data: T | Uint8Array | string, options: SendSyncOptions = {}): Promise<void> {
    const timeout = timeoutOption("sendSync", options, Infinity);
    if (timeout instanceof Error) return Promise.reject(timeout);
    const sent = this.#driver.sendFromOutside(data, true)!;
    return timeout === Infinity
      ? sent
      : withTimeout(sent, timeout, `sendSync on connection ${this.id}`);
  }

  /** Resolves once nothing sent is pending (all written, or the write side broke). */
  drain(): Promise<void> {
    return this.#driver.drain();
  }

  /**
   * Send `message` as a `call` event and wait for the handler's `reply`. Rejects with
   * `TimeoutError` after `timeout` ms, or `ConnectionClosed` if the connection ends first (at
   * once with `ConnectionDown` if a reconnecting client has no socket).
   */
  call<R = unknown>(message: unknown, options: CallOptions = {}): Promise<R> {
    const timeout = timeoutOption("call", options, 5000);
    if (timeout instanceof Error) return Promise.reject(timeout);
    const calling = this.#driver.call(message, timeout) as Promise<R>;
    const metrics = this.#driver.metrics; // a server's with metrics on: the call is timed
    return metrics === undefined ? calling : metrics.timeCall(calling);
  }

  /**
   * Its statistics now (Erlang's `sys:statistics`): bytes and frames in and out, the mailbox,
   * where the handler is, when it started and last took an event, calls waiting for a reply.
   * Counting them costs every connection a few bytes and nothing per event but a time stamp. A
   * reconnecting client's are its current socket's.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, lines, memory, send, serve } from "./mod.ts";
   * const transport = memory("stats-doc");
   * const server = await serve(async function* () {
   *   for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
   * }, { transport, framing: lines() });
   * const echoed = Promise.withResolvers<void>();
   * const client = await connect(async function* () {
   *   const ev = yield send("hello");
   *   if (ev.type === "packet") echoed.resolve();
   *   yield;
   * }, { transport, framing: lines() });
   * await echoed.promise;
   * const stats = client.stats();
   * assert.equal(stats.framesOut, 1);
   * assert.equal(stats.framesIn, 1);
   * assert.equal(stats.bytesOut, 6); // "hello\n"
   * assert.equal(stats.callsPending, 0);
   * await client.stop();
   * await server.stop();
   * ```
   */
  stats(): ConnectionStats {
    return this.#driver.current.stats();
  }

  /**
   * The handler's state (Erlang's `sys:get_state`), for debugging: the state given to its last
   * `hibernate` (the state the handler is called with on waking), or the one it was started with
   * (`undefined` for a handler that never hibernated). Not a copy: do not change it.
   * (`conn.state` is where the connection is: `"up"`, `"closing"`…)
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, hibernate, memory, serve } from "./mod.ts";
   * const transport = memory("handler-state-doc");
   * const server = await serve(async function* () {
   *   yield;
   * }, { transport });
   * const client = await connect(function* (_conn, count: number = 0) {
   *   if (count === 0) yield hibernate(1);
   *   else yield; // woken: this yield takes the waking event (here, the stop's shutdown)
   * }, { transport });
   * assert.equal(client.handlerState(), 1);
   * await client.stop();
   * await server.stop();
   * ```
   */
  handlerState(): unknown {
    return this.#driver.current.handlerState;
  }

  /**
   * Trace this connection from now on (Erlang's `sys:trace`): `true` writes every event its
   * handler receives and every action it yields (and its hibernations, wakes, code changes and
   * end) as one line each to the logger's `debug`; a function gets each {@linkcode TraceEntry};
   * `false` stops. Entries carry the connection's id, `performance.now()` and a short rendering
   * of the data, never a whole payload. A function that throws is reported once and tracing
   * stops for this connection; the connection goes on. A reconnecting client's current socket
   * is traced (the `trace` option of `connect` traces every socket).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, lines, memory, send, serve } from "./mod.ts";
   * const transport = memory("trace-doc");
   * const server = await serve(async function* () {
   *   for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
   * }, { transport, framing: lines() });
   * const echoed = Promise.withResolvers<void>();
   * const client = await connect(async function* () {
   *   for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield) {
   *     if (ev.type === "packet") echoed.resolve();
   *   }
   * }, { transport, framing: lines() });
   * const seen: string[] = [];
   * client.trace((entry) => seen.push(`${entry.kind} ${entry.type} ${entry.detail}`));
   * client.send("hi");
   * await echoed.promise;
   * assert.deepEqual(seen, ['in packet "hi"']);
   * await client.stop();
   * await server.stop();
   * ```
   */
  trace(on: TraceOption): void {
    if (typeof on !== "boolean" && typeof on !== "function") {
      throw new TypeError(`trace: on must be true, false or a function, not ${describeValue(on)}`);
    }
    this.#driver.current.trace(on);
  }

  /** The last entries (up to 50) traced while tracing is on, oldest first; empty when off. */
  recentTrace(): TraceEntry[] {
    return this.#driver.current.recentTrace();
  }

  /**
   * Switch this connection to new code (etcp's `code_change`, for any connection: a
   * `connect()` client, a pool's, one of a server's). Hibernated, it switches at its next wake:
   * `handler(conn, codeChange(state))` runs for the waking event. Running, its handler gets an
   * `upgrade` event and switches by hibernating (`yield hibernate(state)`); a handler that never
   * hibernates keeps its code. Several upgrades apply in order; a `codeChange` that throws ends
   * only this connection. A reconnecting client's later sockets run `handler` too.
   *
   * @example A client switches code at its next wake
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, hibernate, lines, memory, send, serve } from "./mod.ts";
   * const transport = memory("conn-upgrade-doc");
   * const server = await serve(async function* () {
   *   for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
   * }, { transport, framing: lines() });
   * const seen: string[] = [];
   * const client = await connect(function* (_conn, count: number = 0) {
   *   const ev = yield hibernate(count); // wait, holding nothing but the count
   *   if (ev.type === "cast") seen.push(`v1 ${count}`);
   * }, { transport, framing: lines() });
   * client.upgrade(function* (_conn, state: { count: number }) {
   *   const ev = yield;
   *   if (ev.type === "cast") seen.push(`v2 ${state.count}`);
   * }, { codeChange: (count) => ({ count: (count as number) + 1 }) });
   * client.cast("wake");
   * await client.closed;
   * assert.deepEqual(seen, ["v2 1"]);
   * await server.stop();
   * ```
   */
  upgrade(handler: Handler<T>, options: UpgradeOptions = {}): void {
    checkUpgrade("upgrade", handler, options);
    this.#driver.upgrade(handler, options.codeChange);
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
   * given later (by this or a server's `stop`) wins. A reconnecting client stops for good: a
   * backoff under way ends at once, a reconnect under way is stopped once it settles.
   */
  stop(reason: unknown = "normal", options: StopOptions = {}): Promise<void> {
    const timeout = timeoutOption("stop", options, undefined);
    if (timeout instanceof Error) return Promise.reject(timeout);
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
    this.#driver.setReferenced(true);
  }

  /**
   * Let the process exit while this connection is open and idle (Node's `socket.unref()`): its
   * pending read no longer keeps the process alive. Timers a handler arms still do. It holds for
   * the sockets that take this one's place: a reconnecting client's next ones, and the TLS socket
   * of a STARTTLS switch (until `ref()`).
   */
  unref(): void {
    this.#driver.setReferenced(false);
  }

  /** Stops the connection (`await using conn = await connect(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}
