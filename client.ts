/**
 * `connect()`: open a connection and drive it with a handler generator, as a server does; with
 * `reconnect`, one handle that outlives its sockets.
 *
 * @module
 */

import { loggerOf } from "./_logger.ts";
import type { Event, FrameOf, Handler } from "./actions.ts";
import {
  type CodeChange,
  Connection,
  type ConnectionState,
  type Logger,
  type Mode,
} from "./connection.ts";
import {
  ConnectionClosed,
  ConnectionDown,
  describeReason,
  NameTaken,
  TimeoutError,
} from "./errors.ts";
import type { Framing, FramingFor } from "./framing.ts";
import { defaultRegistry, isConnectionId, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import type { Transport } from "./transport/transport.ts";
import { encodeProxyHeader, type ProxyHeaderInit } from "./transport/proxy.ts";
import { Driver } from "./_driver.ts";
import type { TraceOption } from "./_trace.ts";
import { closeQuietly, formatAddr, writeAll } from "./_socket.ts";
import { checkConnectionSettings, checkHandler, driverOptions, OptionCheck } from "./_options.ts";
import { withTimeout } from "./_with_timeout.ts";
import { clearTimer, startTimer, type Timer } from "./_timer.ts";
import {
  Backoff,
  type BackoffSettings,
  backoffSettings,
  checkReconnect,
  type ReconnectOptions,
} from "./_backoff.ts";

export type { ReconnectOptions } from "./_backoff.ts";

/** Options of {@linkcode connect}. */
export interface ConnectOptions<T = Uint8Array> {
  /** Server host (default `"127.0.0.1"`). */
  hostname?: string;
  /** Server port. */
  port?: number;
  /** How to connect (default `tcp()`). */
  transport?: Transport;
  /** How bytes become frames (default `raw()`). */
  framing?: Framing<T>;
  /** `"active"` (default) or `"passive"`. */
  mode?: Mode;
  /** Active mode: frames the mailbox may hold before reading pauses (default 1: read on once the handler has acted on every frame read). */
  highWaterMark?: number;
  /** Milliseconds the connect (and any handshake) may take (default 10000). */
  connectTimeout?: number;
  /**
   * Register the connection under this name before its handler runs; the connect rejects with
   * `NameTaken` if the name is taken (and the handler never runs).
   */
  name?: string;
  /** Where the connection is recorded (default: the process's memory registry). */
  registry?: Registry;
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  shutdownTimeout?: number;
  /**
   * The default event timeout (off unless set): after this many ms without an event, while the
   * handler has armed no event timeout of its own, the connection gets `shutdown` with reason
   * `"idle"`.
   */
  idleTimeout?: number;
  /** Bytes that may be pending when a send comes from outside the handler (default 8 MiB); see `ServeOptions.maxBuffered`. */
  maxBuffered?: number;
  /** `"stop"` (default): end the connection when `maxBuffered` is passed; `"throw"`: the send throws `BufferFull`. */
  onBufferFull?: "stop" | "throw";
  /** Where an abnormal end is reported (default `console`). */
  logger?: Logger;
  /**
   * Send this PROXY protocol header (v1 or v2) first, right after connecting and before the
   * handler runs, as a proxy does, for a server with `proxyProtocol: true`. Checked before
   * connecting (`encodeProxyHeader`'s errors); the write is bounded by `connectTimeout`. Not
   * over a transport with a handshake of its own (TLS: the header would have to go out in plain
   * text before it), which rejects with `Deno.errors.NotSupported`.
   */
  proxyHeader?: ProxyHeaderInit;
  /**
   * Reconnect when the connection ends (off by default; `true` or `{}`: the defaults, the
   * pool's: 1 s initial, ×1.6, 30 s cap, jitter 0.2; see {@linkcode ReconnectOptions}). The
   * handle `connect` returns then outlives its sockets: when one closes, for whatever reason (the
   * server went away and the handler returned on `disconnect`, a crash, a `stop` the handler
   * yielded), the client waits the backoff and connects again, and a fresh handler runs on the
   * new socket, given the same handle. Its `state` says where it is (`"up"`, `"closing"`,
   * `"backing-off"`, `"connecting"`), `whenUp()` waits for the next socket; `call`, `send`,
   * `sendSync`, `cast` and `info` while it has none fail at once with `ConnectionDown` (nothing
   * is queued). `closed` and `done` settle only once the client stops for good: `conn.stop()`, or
   * reconnecting gives up after `maxAttempts` (then the reason is a `ConnectionDown` with
   * `gaveUpAfter`). The first connect is not retried: `connect` rejects as it would without
   * `reconnect`. The handle keeps one id: the registry holds one entry under it while a socket is
   * open, and the name (this option's, or the last one registered) is claimed again on each new
   * socket (if another holds it then, that reconnect fails and backs off). Byte counters,
   * addresses and `closeReason` are the current socket's.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * Give up when this signal aborts: a connect under way (the socket, its handshake, the
   * handler's start) rejects with the signal's reason, leaving nothing open; a connection made
   * is stopped as by `conn.stop(reason)` (its handler gets a `shutdown` event with the reason; a
   * reconnecting one stops for good). As `serve`'s `signal` stops a server.
   */
  signal?: AbortSignal;
  /**
   * Trace the connection (every socket of a reconnecting one): `true` writes each event in and
   * action out as a line to the logger's `debug`, a function gets each `TraceEntry` (see
   * `Connection.trace`). Off by default.
   */
  trace?: TraceOption;
}

/**
 * Connect to a server and run `handler` for the connection; resolves with the connection's
 * handle once connected and the handler has run up to its first `yield` (that yield's actions
 * performed: etcp's `connection_init`). Rejects with the handler's error if it throws before
 * then, or a `ConnectionClosed` carrying the reason if it returns or yields `stop()` first
 * (nothing is left open either way); with `TimeoutError` after `connectTimeout` (the connect,
 * and the handler's start, get as much each), `NameTaken` if `name` is held. The handle's
 * `closed` resolves with the close reason; its `done` rejects if the connection ends abnormally
 * (a frame too large, a crash of the handler). Frame types are checked as with
 * {@linkcode serve}.
 *
 * With `reconnect`, the handle outlives its sockets: see {@linkcode ConnectOptions.reconnect}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, lines, memory, send, serve } from "./mod.ts";
 * const transport = memory("client-doc");
 * const server = await serve(async function* () {
 *   const ev = yield;
 *   if (ev.type === "packet") yield send(`you said ${ev.data}`);
 * }, { transport, framing: lines() });
 * const got = Promise.withResolvers<string>();
 * const client = await connect(async function* () {
 *   const ev = yield send("hello");
 *   if (ev.type === "packet") got.resolve(ev.data);
 * }, { transport, framing: lines() });
 * assert.equal(await got.promise, "you said hello");
 * await client.closed;
 * await server.stop();
 * ```
 *
 * @example A handler that fails to start fails the connect
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, memory, serve } from "./mod.ts";
 * const transport = memory("client-start-doc");
 * const server = await serve(async function* () {
 *   yield;
 * }, { transport });
 * const quiet = { error() {}, warn() {}, debug() {} };
 * await assert.rejects(
 *   connect(async function* () {
 *     throw new Error("no credentials");
 *   }, { transport, logger: quiet }),
 *   { message: "no credentials" },
 * );
 * await server.stop();
 * ```
 */
// deno-lint-ignore no-explicit-any
export async function connect<H extends Handler<any>>(
  handler: H,
  options?: ConnectOptions<FrameOf<H>> & FramingFor<FrameOf<H>>,
): Promise<Connection<FrameOf<H>>> {
  type T = FrameOf<H>;
  options ??= {} as ConnectOptions<T> & FramingFor<T>;
  checkConnectOptions(handler, options);
  const backoff = backoffSettings(options.reconnect, false);
  const conn = backoff === undefined
    ? (await dial<T>(handler, options)).handle
    : await ReconnectingClient.start<T>(handler, options, backoff);
  const signal = options.signal;
  if (signal !== undefined) {
    // Connected: from now on the signal stops the connection (a reconnecting one for good).
    const onAbort = () => conn.stop(signal.reason).catch(() => {});
    if (signal.aborted) onAbort();
    else {
      signal.addEventListener("abort", onAbort, { once: true });
      // A long-lived signal must not keep closed connections alive.
      conn.closed.then(() => signal.removeEventListener("abort", onAbort));
    }
  }
  return conn;
}

// Open one connection and start its handler: resolves with its driver once the handler has run
// up to its first yield; whatever fails before then closes what was opened and rejects.
// `handle` and `made` are a reconnecting client's: the handle its drivers share, and a hook that
// learns each driver as soon as it exists.
async function dial<T>(
  handler: Handler<T>,
  options: ConnectOptions<T>,
  handle?: Connection<T>,
  made?: (driver: Driver<T>) => void,
  name = options.name,
): Promise<Driver<T>> {
  const transport = options.transport ?? tcp();
  const timeout = options.connectTimeout ?? 10_000;
  const target = `connect to ${describeTarget(transport, options)}`;
  const proxyHeader = options.proxyHeader === undefined
    ? undefined
    : encodeProxyHeader(options.proxyHeader);
  const signal = options.signal;
  const socket = await withTimeout(
    transport.connect({ hostname: options.hostname, port: options.port }),
    timeout,
    target,
    (late) => late.close(),
    signal,
  );
  const registry = options.registry ?? defaultRegistry;
  let driver: Driver<T>;
  try {
    if (proxyHeader) {
      if (socket.handshake !== undefined) {
        throw new Deno.errors.NotSupported(
          "connect: proxyHeader over a transport with a handshake (TLS) is not supported",
        );
      }
      await withTimeout(
        writeAll(socket, proxyHeader),
        timeout,
        `${target}: PROXY header`,
        undefined,
        signal,
      );
    }
    if (socket.handshake !== undefined) {
      await withTimeout(socket.handshake(), timeout, `${target}: handshake`, undefined, signal);
    }
    driver = new Driver(
      socket,
      handler,
      driverOptions(options, {
        registry,
        owner: "client",
        kind: "client",
        handshakeTimeout: timeout,
      }),
      handle,
    );
  } catch (err) {
    closeQuietly(socket); // whatever failed before the handler could run costs this socket only
    throw err;
  }
  made?.(driver);
  await driver.enroll();
  // The name is claimed before the handler runs: a connect that fails sends nothing.
  if (name !== undefined) {
    let claimed: boolean;
    try {
      claimed = await driver.register(name);
    } catch (err) {
      await driver.discard(err);
      throw err;
    }
    if (!claimed) {
      const err = new NameTaken(name);
      await driver.discard(err);
      throw err;
    }
  }
  const started = driver.started();
  driver.start();
  try {
    await withTimeout(started, timeout, `${target}: handler start`, undefined, signal);
  } catch (err) {
    // Ended before its first wait, or stuck on the way there, or the signal aborted (then it is
    // stopped at once): the connect rejects once nothing of it is left.
    if (driver.state === "up") driver.shutdown("shutdown", 0);
    await driver.closed;
    throw err;
  }
  return driver;
}

const enum Phase {
  Live, // a driver runs (it may be ending: see state)
  BackingOff,
  Connecting,
  Closed,
}

// A reconnecting client: the target of one `Connection` handle for its whole life, forwarding to
// the driver of its current socket, and replacing that driver, with backoff, when it closes.
// One registry entry under the handle's id while a socket is open (each driver enrolls it and
// removes it), and the name (the option's, or the last one registered) claimed again each time.
class ReconnectingClient<T> {
  readonly handle: Connection<T>;
  #handler: Handler<T>;
  readonly #options: ConnectOptions<T>;
  readonly #backoff: Backoff;
  #driver!: Driver<T>; // the current socket's (the last one's while none is open)
  #phase = Phase.Connecting;
  #timer: Timer; // the backoff under way
  #stop: { reason: unknown; timeout?: number } | null = null; // stop() was called
  #lastReason: unknown = undefined; // why the last socket closed, or the last connect failed
  #unreferenced = false; // unref() was called: every socket from now on is unref'd
  #name: string | undefined; // claimed on each new socket: the option's, or the last registered
  readonly #logger: Logger; // the options', guarded
  #finalReason: unknown = undefined;
  readonly #closed = Promise.withResolvers<unknown>();
  #upWaiters: Set<{ resolve(): void; reject(err: Error): void; timer: Timer }> | null = null;

  private constructor(handler: Handler<T>, options: ConnectOptions<T>, settings: BackoffSettings) {
    this.#handler = handler;
    this.#options = options;
    this.#name = options.name;
    this.#logger = loggerOf(options.logger);
    this.#backoff = new Backoff(settings);
    this.handle = new Connection<T>(this);
  }

  // The first connect is not retried: it resolves or rejects as a plain connect() does.
  static async start<T>(
    handler: Handler<T>,
    options: ConnectOptions<T>,
    settings: BackoffSettings,
  ): Promise<Connection<T>> {
    const client = new ReconnectingClient<T>(handler, options, settings);
    client.#live(await client.#dial());
    return client.handle;
  }

  #dial(): Promise<Driver<T>> {
    return dial(
      this.#handler,
      this.#options,
      this.handle,
      (driver) => {
        this.#driver = driver;
        if (this.#unreferenced) driver.setReferenced(false);
      },
      this.#name,
    );
  }

  #live(driver: Driver<T>): void {
    this.#phase = Phase.Live;
    this.#backoff.up();
    driver.closed.then((reason) => this.#dropped(reason));
    for (const waiter of this.#upWaiters ?? []) {
      clearTimer(waiter.timer);
      waiter.resolve();
    }
    this.#upWaiters = null;
    if (this.#stop !== null) driver.shutdown(this.#stop.reason, this.#stop.timeout);
  }

  // The current socket closed: reconnect after the backoff, unless stopped (or out of attempts).
  #dropped(reason: unknown): void {
    this.#lastReason = reason;
    this.#name = this.#driver.name ?? this.#name;
    if (this.#stop !== null) return this.#finish(reason);
    this.#backoff.ended();
    this.#retry();
  }

  #retry(): void {
    const delay = this.#backoff.next();
    if (delay === undefined) {
      const err = new ConnectionDown(this.handle.id, this.#lastReason, this.#backoff.failures);
      this.#logger.warn(`etcp: ${err.message}`);
      return this.#finish(err);
    }
    this.#phase = Phase.BackingOff;
    this.#timer = startTimer(() => {
      this.#timer = undefined;
      this.#phase = Phase.Connecting;
      this.#dial().then(
        (driver) => this.#live(driver),
        (err) => {
          this.#lastReason = err;
          if (this.#stop !== null) return this.#finish(this.#stop.reason);
          this.#logger.debug(
            `etcp: connection ${this.handle.id}: reconnect failed: ${describeReason(err)}`,
          );
          this.#retry();
        },
      );
    }, delay);
  }

  #finish(reason: unknown): void {
    if (this.#phase === Phase.Closed) return;
    this.#phase = Phase.Closed;
    this.#finalReason = reason;
    clearTimer(this.#timer);
    this.#timer = undefined;
    for (const waiter of this.#upWaiters ?? []) {
      clearTimer(waiter.timer);
      waiter.reject(new ConnectionClosed(this.handle.id, reason));
    }
    this.#upWaiters = null;
    this.#closed.resolve(reason);
  }

  // Whether there is an open socket to forward to.
  get #open(): boolean {
    return this.#driver.state === "up";
  }

  // Why there is none: down between sockets, or closed (or stopping) for good.
  #notOpen(): ConnectionClosed {
    if (this.#phase === Phase.Closed) {
      return new ConnectionClosed(this.handle.id, this.#finalReason);
    }
    if (this.#stop !== null) return new ConnectionClosed(this.handle.id, this.#stop.reason);
    // (Live but closing: the socket's end is under way, and its reason already fixed.)
    const last = this.#phase === Phase.Live ? this.#driver.closeReason : this.#lastReason;
    return new ConnectionDown(this.handle.id, last);
  }

  // ---- What the handle reads (see Connection) -------------------------------------------------

  get state(): ConnectionState {
    switch (this.#phase) {
      case Phase.Live:
        return this.#driver.state === "up" ? "up" : "closing";
      case Phase.BackingOff:
        return "backing-off";
      case Phase.Connecting:
        return "connecting";
      default:
        return "closed";
    }
  }

  get closed(): Promise<unknown> {
    return this.#closed.promise;
  }

  get closeReason(): unknown {
    return this.#phase === Phase.Closed ? this.#finalReason : this.#driver.closeReason;
  }

  // The current socket's driver: its counts, its handler's state, its trace.
  get current(): Driver<T> {
    return this.#driver;
  }

  get metrics(): undefined {
    return undefined;
  }

  sendFromOutside(data: unknown, sync: boolean): Promise<void> | undefined {
    if (this.#open) return this.#driver.sendFromOutside(data, sync);
    const err = this.#notOpen();
    if (sync) return Promise.reject(err);
    if (err instanceof ConnectionDown) throw err;
    return undefined; // dropped, as by any closed connection
  }

  drain(): Promise<void> {
    return this.#driver.drain();
  }

  call(message: unknown, timeout: number): Promise<unknown> {
    return this.#open ? this.#driver.call(message, timeout) : Promise.reject(this.#notOpen());
  }

  deliver(ev: Event<T>): void {
    if (this.#open) return this.#driver.deliver(ev);
    const err = this.#notOpen();
    if (err instanceof ConnectionDown) throw err;
  }

  register(name: string): Promise<boolean> {
    return this.#driver.register(name);
  }

  setReferenced(on: boolean): void {
    this.#unreferenced = !on;
    this.#driver.setReferenced(on);
  }

  // New code for this socket's handler, and the handler of every socket after it.
  upgrade(handler: Handler<T>, codeChange?: CodeChange): void {
    if (this.#phase === Phase.Closed) return;
    this.#handler = handler;
    this.#driver.upgrade(handler, codeChange);
  }

  whenUp(timeout: number): Promise<void> {
    if (this.state === "up") return Promise.resolve();
    if (this.#phase === Phase.Closed || this.#stop !== null) return Promise.reject(this.#notOpen());
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: undefined as Timer };
      waiter.timer = startTimer(() => {
        this.#upWaiters?.delete(waiter);
        reject(
          new TimeoutError(`whenUp: connection ${this.handle.id} not up within ${timeout} ms`),
        );
      }, timeout);
      (this.#upWaiters ??= new Set()).add(waiter);
    });
  }

  // Stop for good: the current socket's handler gets shutdown; a backoff under way stops at
  // once; a reconnect under way is stopped once it is up (or has failed).
  shutdown(reason: unknown, timeout?: number): Promise<void> {
    if (this.#phase !== Phase.Closed) {
      this.#stop ??= { reason, timeout };
      if (this.#phase === Phase.BackingOff) this.#finish(reason);
      else if (this.#phase === Phase.Live) this.#driver.shutdown(reason, timeout);
      for (const waiter of this.#upWaiters ?? []) {
        clearTimer(waiter.timer);
        waiter.reject(this.#notOpen());
      }
      this.#upWaiters = null;
    }
    return this.#closed.promise.then(() => {});
  }
}

// What a connect is to, for messages: the transport's own words, not a TCP default.
function describeTarget(
  transport: Transport,
  options: { hostname?: string; port?: number },
): string {
  if (transport.name === "tcp" || options.port !== undefined) {
    return formatAddr({
      transport: "tcp",
      hostname: options.hostname ?? "127.0.0.1",
      port: options.port ?? 0,
    });
  }
  return options.hostname !== undefined ? `${transport.name}:${options.hostname}` : transport.name;
}

function checkConnectOptions(handler: unknown, options: unknown): void {
  checkHandler("connect", handler);
  const check = new OptionCheck("connect", options);
  check.port("port");
  check.string("hostname");
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
  check.delay("connectTimeout");
  check.signal("signal");
  const name = (options as ConnectOptions).name;
  if (typeof name === "string" && isConnectionId(name)) {
    throw new TypeError(
      `connect: option name ${
        JSON.stringify(name)
      } looks like a connection id; ids and names share lookup()`,
    );
  }
  checkConnectionSettings(check);
  checkReconnect("connect", (options as ConnectOptions).reconnect);
}
