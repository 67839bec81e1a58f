/**
 * `serve()`: listen, accept, and drive one handler generator per connection.
 *
 * @module
 */

import type { FrameOf, Handler } from "./actions.ts";
import type { Connection, Logger, Mode, StopOptions } from "./connection.ts";
import type { TraceOption } from "./_trace.ts";
import { ClosedTotals } from "./_stats.ts";
import { metricsOn, type MetricsSample, observeMetrics, type OwnerMetrics } from "./_metrics.ts";
import { describeReason, describeValue, TimeoutError } from "./errors.ts";
import type { Framing, FramingFor } from "./framing.ts";
import { defaultRegistry, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import { withProxyProtocol } from "./transport/proxy.ts";
import type { Addr, Conn, Listener, ListenOptions, Transport } from "./transport/transport.ts";
import { type CodeChange, Driver, type DriverOptions, isPromise } from "./_driver.ts";
import { closeQuietly } from "./_socket.ts";
import {
  checkConnectionSettings,
  checkHandler,
  checkUpgrade,
  driverOptions,
  OptionCheck,
  timeoutOption,
} from "./_options.ts";
import { withTimeout } from "./_with_timeout.ts";
import { clearTimer, isDelay, startTimer, type Timer } from "./_timer.ts";

/** Options of {@linkcode serve}. */
export interface ServeOptions<T = Uint8Array, A extends Addr = Addr> {
  /** Port to listen on (default 0: any free port; see `server.addr`). */
  port?: number;
  /**
   * Address to bind (default: every address; with `tcp()`, IPv6 and IPv4 on one socket where
   * the system allows it, as Node does, else `"0.0.0.0"`).
   */
  hostname?: string;
  /** How to listen (default `tcp()`). */
  transport?: Transport<A>;
  /** How bytes become frames (default `raw()`). */
  framing?: Framing<T>;
  /** `"active"` (default) or `"passive"`. */
  mode?: Mode;
  /** Active mode: frames a connection's mailbox may hold before reading pauses (default 1: read on once the handler has acted on every frame read). */
  highWaterMark?: number;
  /**
   * Listening sockets accepting in parallel (default 1; more than 1 uses `reusePort`, which
   * needs `--unstable-net` or `"unstable": ["net"]` in deno.json).
   */
  acceptors?: number;
  /** At this many connections, stop accepting until one ends (default 1024; `Infinity` for none). */
  maxConnections?: number;
  /** Milliseconds a transport handshake (TLS) may take (default 10000). */
  handshakeTimeout?: number;
  /**
   * Every connection starts with a PROXY protocol header (v1 or v2, HAProxy's specification),
   * read before the handler runs and within `handshakeTimeout`: `conn.remoteAddr` and
   * `conn.localAddr` are then the original client's and destination's (the socket's own for a
   * `LOCAL` header), `conn.proxy` the header. A connection without a valid header is closed
   * (one debug-level log line, a `ProxyHeaderError`). Off by default, and then a PROXY header
   * is ordinary data. Enable it only behind a proxy that sends one: whoever can connect could
   * otherwise claim any address. For plain-stream transports (`tcp()`, `unix()`, `memory()`);
   * see `withProxyProtocol` for transports with a handshake of their own (TLS).
   */
  proxyProtocol?: boolean;
  /**
   * The default event timeout of every connection (off unless set): a connection that gets no
   * event for this many ms, while its handler has armed no event timeout of its own, is sent
   * `shutdown` with reason `"idle"` (and forced after `shutdownTimeout`). So is one whose
   * handler has been held back that long by a peer that does not read its output. Ends silent
   * peers, and peers that stop reading.
   */
  idleTimeout?: number;
  /** Milliseconds a connection has to finish after `shutdown` before it is forced (default 5000). */
  shutdownTimeout?: number;
  /**
   * Bytes a connection may have pending (sent, not yet written) when a send from outside its
   * handler comes (`conn.send`, a broadcast): past it the peer is a slow consumer, and the
   * connection is ended with `BufferFull` (default 8 MiB; `Infinity` for no limit). A
   * handler's own sends are held back by flow control instead.
   */
  maxBuffered?: number;
  /** `"stop"` (default): end a slow consumer's connection; `"throw"`: the send throws `BufferFull`. */
  onBufferFull?: "stop" | "throw";
  /** Where connections are recorded (default: the process's memory registry). */
  registry?: Registry;
  /** This server's name: the `owner` of its connections in the registry. */
  name?: string;
  /** Let other sockets bind the same address (Linux; needs `--unstable-net`). */
  reusePort?: boolean;
  /**
   * Connection-count alarms (Ranch's `alarms`): each `callback` is called when a connection is
   * accepted and the count that `maxConnections` limits is at or above its `threshold`, then
   * not again for `cooldown` ms (default 5000), after which it is checked again at once.
   */
  alarms?: ConnectionAlarm<T>[];
  /**
   * Called once listening, before the first accept, with the address (etcp's `listen_init`,
   * Ranch's `post_listen_callback`); may be async (`serve()` waits for it). To veto the server,
   * throw (or reject): `serve()` then rejects with that error and nothing is left listening. To
   * adjust it, return a plain object of {@linkcode ServerSettings} (what
   * {@linkcode Server.setOptions} takes, checked the same way: a wrong one vetoes with its
   * `TypeError` or `RangeError`); they apply before the first connection is accepted. Any
   * other value returned is ignored.
   */
  onListen?:
    | ((addr: A) => void)
    | ((addr: A) => ServerSettings<T, A> | Promise<ServerSettings<T, A> | void>);
  /** Called when a connection starts, before its handler runs (Node's `"connection"` event). */
  onConnection?: (conn: Connection<T>) => void;
  /** Called when a connection has closed, with its reason (also on `conn.closed`). */
  onClose?: (conn: Connection<T>, reason: unknown) => void;
  /** Stop the server when this signal aborts. */
  signal?: AbortSignal;
  /** Where connections' ends and accept troubles are reported (default `console`). */
  logger?: Logger;
  /**
   * Trace every connection (Erlang's `sys:trace`): `true` writes each event in and action out
   * as a line to the logger's `debug`, a function gets each `TraceEntry` (see
   * `Connection.trace`, which turns it on or off for one connection). Off by default; off, it
   * costs nothing.
   */
  trace?: TraceOption;
  /**
   * Report OpenTelemetry metrics (see the README's "Metrics" for the names): `true` loads
   * `npm:@opentelemetry/api` (serve() rejects if it cannot) and reports through its global
   * meter provider; `false` never. Default: on if `OTEL_DENO=true` is set (Deno's own
   * exporter then sends them) and the environment may be read, else off.
   */
  metrics?: boolean;
}

/** `"running"`, `"suspended"` (not accepting), `"stopping"` or `"stopped"`. */
export type ServerStatus = "running" | "suspended" | "stopping" | "stopped";

/** What {@linkcode Server.acceptors} reports of one acceptor. */
export interface AcceptorInfo {
  /** Index of the acceptor. */
  id: number;
  /** The address its listening socket is bound to. */
  addr: Addr;
  /** `"accepting"`, `"waiting"` (at `maxConnections`), `"suspended"` or `"stopped"`. */
  state: "accepting" | "waiting" | "suspended" | "stopped";
  /** Connections it has accepted. */
  accepted: number;
}

/** What {@linkcode Server.stats} reports: counts over the server's life, and now. */
export interface ServerStats {
  /** The server's name. */
  name: string;
  /** Its status. */
  status: ServerStatus;
  /** Sockets accepted, over every acceptor. */
  accepted: number;
  /** Connections open now (`connections().length`). */
  open: number;
  /** Sockets accepted and still in their transport handshake (TLS, a PROXY header). */
  handshaking: number;
  /** Open connections whose handler is hibernating. */
  hibernated: number;
  /** Connections that have closed. */
  closed: number;
  /**
   * Connections that have closed, by reason: `"normal"`, `"shutdown"`, `"idle"`, an error's
   * name (`"FrameTooLarge"`, `"ConnectionReset"`…), a custom `stop` reason (cut to 40
   * characters), or the reason's type.
   */
  closedByReason: Record<string, number>;
  /** Bytes read, over every connection, open or closed. */
  bytesIn: number;
  /** Bytes written, over every connection, open or closed. */
  bytesOut: number;
  /** Frames received, over every connection, open or closed. */
  framesIn: number;
  /** Frames sent, over every connection, open or closed. */
  framesOut: number;
  /** Each acceptor (as {@linkcode Server.acceptors} reports them). */
  acceptors: AcceptorInfo[];
}

/** Options of {@linkcode Server.upgrade}. */
export interface UpgradeOptions {
  /** Turns each hibernated connection's state into the new handler's state. */
  codeChange?: CodeChange;
}

/**
 * What can change on a running server, with {@linkcode Server.setOptions} or from `onListen`:
 * the connection limit and alarms at once; the timeouts and buffer limits for the connections
 * accepted from then on (those already open keep theirs); the transport only while
 * `suspend({ refuse: true })` has closed the listening sockets (the next `resume()` listens
 * with it, on the same address).
 *
 * What cannot: `port`, `hostname`, `acceptors` and `reusePort` (the listening sockets are
 * bound; serve again elsewhere), `framing` and `mode` (the handler's code is written for them;
 * serve again), `proxyProtocol` (it must match what the proxy in front sends), `registry` and
 * `name` (connections are recorded under them), `onConnection` and `onClose` (make the hook
 * you pass consult your own state), `signal` and `onListen` (used once, at the start).
 */
export type ServerSettings<T = Uint8Array, A extends Addr = Addr> = Pick<
  ServeOptions<T, A>,
  | "maxConnections"
  | "handshakeTimeout"
  | "idleTimeout"
  | "shutdownTimeout"
  | "maxBuffered"
  | "onBufferFull"
  | "highWaterMark"
  | "logger"
  | "alarms"
  | "transport"
  | "trace"
>;

// The options ServerSettings holds, in the order setOptions checks them.
const SETTINGS = [
  "maxConnections",
  "handshakeTimeout",
  "idleTimeout",
  "shutdownTimeout",
  "maxBuffered",
  "onBufferFull",
  "highWaterMark",
  "logger",
  "alarms",
  "transport",
  "trace",
] as const;

// Why each other option of serve() cannot change on a running server.
const FIXED: Record<string, string> = {
  port: "the listening sockets are bound; serve again elsewhere",
  hostname: "the listening sockets are bound; serve again elsewhere",
  acceptors: "the listening sockets are bound; serve again",
  reusePort: "the listening sockets are bound; serve again",
  framing: "the handler's code is written for it; serve again",
  mode: "the handler's code is written for it; serve again",
  proxyProtocol: "it must match what the proxy in front sends; serve again",
  registry: "connections are recorded there",
  name: "connections are recorded under it",
  onConnection: "make the hook consult your own state",
  onClose: "make the hook consult your own state",
  signal: "it is read once, by serve()",
  onListen: "it runs once, when serve() listens",
  metrics: "it is read once, by serve()",
};

/** A connection-count alarm of {@linkcode ServeOptions.alarms} (Ranch's `num_connections` alarm). */
export interface ConnectionAlarm<T = Uint8Array> {
  /** The count (as `maxConnections` counts) at or above which the alarm goes off. */
  threshold: number;
  /**
   * Milliseconds after going off during which the alarm stays quiet (default 5000, as
   * Ranch's); when they are over, the count is checked again at once. `0`: it may go off at
   * every accept.
   */
  cooldown?: number;
  /**
   * Called with the count and the connections counted (live, not removed with
   * `removeConnection`; sockets still in their transport handshake count, but are not
   * connections yet). What it throws is logged.
   */
  callback: (count: number, connections: Connection<T>[]) => void;
}

/** Options of {@linkcode Server.suspend}. */
export interface SuspendOptions {
  /**
   * Close the listening sockets, so that new peers are refused (`ECONNREFUSED`) rather than
   * wait in the backlog (Ranch's `suspend_listener`); `resume()` listens again on the same
   * address. Off by default: the sockets stay open and new peers wait.
   */
  refuse?: boolean;
}

/** How {@linkcode Server.waitForConnections} compares the count with its number. */
export type CountComparison = "<" | "<=" | "==" | ">=" | ">";

/** Options of {@linkcode Server.waitForConnections}. */
export interface WaitForConnectionsOptions {
  /** Milliseconds to wait before rejecting with `TimeoutError` (default `Infinity`). */
  timeout?: number;
}

const COMPARISONS: Record<CountComparison, (count: number, n: number) => boolean> = {
  "<": (count, n) => count < n,
  "<=": (count, n) => count <= n,
  "==": (count, n) => count === n,
  ">=": (count, n) => count >= n,
  ">": (count, n) => count > n,
};

// waitForConnections' comparison, or the TypeError or RangeError saying what is wrong with it.
function comparisonOf(op: unknown, n: unknown): ((count: number, n: number) => boolean) | Error {
  const compare = Object.hasOwn(COMPARISONS, op as string)
    ? COMPARISONS[op as CountComparison]
    : undefined;
  if (compare === undefined) {
    return new TypeError(
      `waitForConnections: op must be "<", "<=", "==", ">=" or ">", not ${describeValue(op)}`,
    );
  }
  if (typeof n !== "number") {
    return new TypeError(`waitForConnections: n must be a number, not ${describeValue(n)}`);
  }
  if (!(Number.isInteger(n) && n >= (op === "<" ? 1 : 0))) {
    return new RangeError(
      `waitForConnections: n must be an integer >= ${op === "<" ? 1 : 0}${
        op === "<" ? ' with "<"' : ""
      }, not ${n}`,
    );
  }
  return compare;
}

interface Acceptor<A extends Addr> {
  info: AcceptorInfo;
  listener: Listener<A> | null; // null while suspend({ refuse: true }) has it closed
  accepting: Promise<Conn> | null; // its accept under way
}

// The server's state. Suspended keeps the listening sockets (peers wait in the backlog);
// Refusing has closed them (peers are refused) until resume() listens again.
const enum State {
  Running,
  Suspended,
  Refusing,
  Stopping,
  Stopped,
}

const STATUS: Record<State, ServerStatus> = {
  [State.Running]: "running",
  [State.Suspended]: "suspended",
  [State.Refusing]: "suspended",
  [State.Stopping]: "stopping",
  [State.Stopped]: "stopped",
};

interface AlarmState<T> {
  alarm: ConnectionAlarm<T>;
  cooling: Timer | null; // while it stays quiet after going off
}

interface CountWaiter {
  satisfied(count: number): boolean;
  settle(err?: Error): void;
}

let servers = 0;

/**
 * A listening server. Made by {@linkcode serve}.
 *
 * Besides accepting, it offers Ranch's operator controls: {@linkcode Server.suspend} (keeping
 * new peers waiting, or refusing them), {@linkcode Server.removeConnection} (a long-lived
 * connection no longer counts against `maxConnections`), {@linkcode Server.waitForConnections},
 * connection-count `alarms`, and {@linkcode Server.setOptions} for what can change live.
 *
 * @example Drain: refuse new peers, wait for the live ones to finish, stop
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, memory, serve } from "./mod.ts";
 * const transport = memory("drain-example");
 * const server = await serve(async function* () {
 *   for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
 * }, { transport });
 * const client = await connect(async function* () {
 *   yield;
 * }, { transport });
 * await server.waitForConnections("==", 1, { timeout: 5000 });
 * await server.suspend({ refuse: true }); // new peers are refused from here on
 * await assert.rejects(connect(async function* () {}, { transport }), Deno.errors.ConnectionRefused);
 * await client.stop();
 * await server.waitForConnections("==", 0, { timeout: 5000 });
 * await server.stop();
 * ```
 */
export class Server<T = Uint8Array, A extends Addr = Addr> {
  /** This server's name, the `owner` of its connections in the registry. */
  readonly name: string;
  /** Where its connections are recorded. */
  readonly registry: Registry;
  /** Resolves once the server has stopped and every connection has closed. */
  readonly finished: Promise<void>;
  #resolveFinished!: () => void;
  #handler: Handler<T>;
  // A copy of serve()'s options, which setOptions changes. (Held without its address type,
  // which only onListen and the transport use: a Server<T, Deno.NetAddr> is a Server<T, Addr>.)
  readonly #options: ServeOptions<T, Addr>;
  readonly #acceptors: Acceptor<A>[] = [];
  readonly #loops: Promise<void>[] = []; // the acceptors' loops, which stop() waits for
  readonly #drivers = new Map<string, Driver<T>>();
  readonly #removed = new Set<string>(); // live connections removeConnection() stopped counting
  readonly #handshaking = new Set<Conn>(); // accepted, transport handshake under way
  #state = State.Running;
  #max: number;
  #gate!: { promise: Promise<void>; open(): void };
  #stopping: Promise<void> | null = null;
  // A suspend or resume that waits (closing or opening listening sockets), and those asked
  // after it: they take effect in the order they were asked.
  #transition: Promise<void> | null = null;
  #referenced = true; // whether the listening sockets keep the process alive (ref/unref)
  #alarms: AlarmState<T>[] = [];
  readonly #waiters = new Set<CountWaiter>();
  // One settings object shared by every connection accepted until setOptions makes the next.
  #driverOptions: DriverOptions<T>;
  readonly #closedTotals = new ClosedTotals(); // of the connections that have closed
  readonly #metrics: OwnerMetrics | undefined; // with metrics on

  /** Made by {@linkcode serve}; not constructed directly. */
  constructor(handler: Handler<T>, options: ServeOptions<T, A>, listeners: Listener<A>[]) {
    this.#handler = handler;
    this.#options = { ...options } as unknown as ServeOptions<T, Addr>;
    this.name = options.name ?? `server-${++servers}`;
    this.registry = options.registry ?? defaultRegistry;
    this.#max = options.maxConnections ?? 1024;
    this.finished = new Promise((resolve) => this.#resolveFinished = resolve);
    this.#renewGate();
    this.#setAlarms(options.alarms);
    // (serve() has loaded the metrics, and decided whether they are on.)
    this.#metrics = options.metrics
      ? observeMetrics({ name: this.name, kind: "server", sample: () => this.#sample() })
      : undefined;
    this.#driverOptions = this.#makeDriverOptions();
    listeners.forEach((listener, id) => {
      this.#acceptors.push({
        listener,
        accepting: null,
        info: { id, addr: listener.addr, state: "accepting" as const, accepted: 0 },
      });
    });
  }

  /** Start the acceptors (once `onListen` has agreed). */
  start(): void {
    for (const acceptor of this.#acceptors) this.#loops.push(this.#acceptLoop(acceptor));
  }

  /**
   * The address of the (first) listening socket, with the real port (`server.addr.port` over
   * TCP); while `suspend({ refuse: true })` has it closed, where `resume()` will listen.
   */
  get addr(): A {
    return this.#acceptors[0].info.addr as A;
  }

  /** `"running"`, `"suspended"` (either way), `"stopping"` or `"stopped"`. */
  get status(): ServerStatus {
    return STATUS[this.#state];
  }

  /** The connection limit; setting it takes effect at once. */
  get maxConnections(): number {
    return this.#max;
  }

  set maxConnections(value: number) {
    if (!(value >= 0 && (Number.isInteger(value) || value === Infinity))) {
      throw new RangeError(`maxConnections must be an integer >= 0 (or Infinity), not ${value}`);
    }
    this.#max = value;
    this.#openGate();
  }

  /** The live connections (those removed with `removeConnection` too). */
  connections(): Connection<T>[] {
    return Array.from(this.#drivers.values(), (d) => d.handle);
  }

  /** What each acceptor is doing. */
  acceptors(): AcceptorInfo[] {
    // Reported from the server's state, so that suspend() or a lowered limit shows at once,
    // even for an acceptor still blocked in accept().
    return this.#acceptors.map(({ info }) => ({
      ...info,
      state: info.state === "stopped"
        ? "stopped"
        : this.#state === State.Suspended || this.#state === State.Refusing
        ? "suspended"
        : this.#count >= this.#max
        ? "waiting"
        : "accepting",
    }));
  }

  /**
   * Its statistics now: sockets accepted (in all and per acceptor), connections open, in their
   * handshake and hibernated, connections closed (in all and by reason), and bytes and frames
   * over every connection it has had. For one connection's, see `Connection.stats`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { connect, memory, serve } from "./mod.ts";
   * const transport = memory("server-stats-doc");
   * const server = await serve(async function* () {}, { transport }); // returns at once
   * const client = await connect(async function* () {
   *   yield;
   * }, { transport });
   * await client.closed; // the server's handler returned: a normal end
   * await server.waitForConnections("==", 0);
   * const stats = server.stats();
   * assert.equal(stats.accepted, 1);
   * assert.equal(stats.open, 0);
   * assert.deepEqual(stats.closedByReason, { normal: 1 });
   * await server.stop();
   * ```
   */
  stats(): ServerStats {
    const sample = this.#sample();
    const closed = this.#closedTotals;
    const acceptors = this.acceptors();
    return {
      name: this.name,
      status: this.status,
      accepted: acceptors.reduce((n, a) => n + a.accepted, 0),
      open: sample.open,
      handshaking: this.#handshaking.size,
      hibernated: sample.hibernated,
      closed: closed.closed,
      closedByReason: closed.reasons(),
      bytesIn: sample.bytesIn,
      bytesOut: sample.bytesOut,
      framesIn: sample.framesIn,
      framesOut: sample.framesOut,
      acceptors,
    };
  }

  // The open connections' counts added to the closed ones'.
  #sample(): MetricsSample {
    return this.#closedTotals.withOpen(Iterator.from(this.#drivers.values()).map((d) => d.stats()));
  }

  /**
   * Stop accepting; live connections go on. By default the listening sockets stay open and new
   * peers wait in the backlog until {@linkcode Server.resume}. With `refuse: true` they are
   * closed, so new peers are refused (`ECONNREFUSED`), and peers accepted but not yet started
   * are closed with them; the promise resolves once the sockets are closed (the next connect
   * is refused). A plain `suspend()` of a server that refuses changes nothing. While a refusing
   * suspend or a `resume()` that listens again is under way, later calls take effect after it,
   * in order.
   */
  suspend(options: SuspendOptions = {}): Promise<void> {
    const check = new OptionCheck("suspend", options);
    check.boolean("refuse");
    return this.#inTurn(() => options.refuse ? this.#refuse() : this.#hold());
  }

  /**
   * Accept again after {@linkcode Server.suspend}. After `suspend({ refuse: true })` it listens
   * again, on the same address, with the same transport (or the one given to `setOptions`
   * meanwhile), and resolves once listening; if that fails (the port was taken meanwhile), it
   * rejects with the error and the server stays suspended.
   */
  resume(): Promise<void> {
    return this.#inTurn(() => {
      if (this.#state === State.Refusing) return this.#relisten();
      if (this.#state === State.Suspended) {
        this.#state = State.Running;
        this.#openGate();
      }
    });
  }

  /**
   * Stop counting `conn` against `maxConnections` (and the alarms), for a long-lived connection
   * such as a tunnel (Ranch's `remove_connection`). It stays a connection of this server:
   * listed by `connections()`, counted by `waitForConnections`, stopped by `stop()`. Returns
   * false if `conn` is not a live connection of this server or was removed already.
   */
  removeConnection(conn: Connection<T>): boolean {
    const id = conn?.id;
    if (!this.#drivers.has(id) || this.#removed.has(id)) return false;
    this.#removed.add(id);
    this.#openGate();
    return true;
  }

  /**
   * Resolves once the number of live connections (as `connections()` lists them) compares to
   * `n` as `op` says: at once if it already does, else at the accept or close that makes it
   * so. Rejects with `TimeoutError` after `timeout` ms, and with `Deno.errors.Interrupted` if
   * the server stops with a count that does not satisfy it. For tests and drains:
   * `await server.waitForConnections("==", 0)` after `suspend()`.
   */
  waitForConnections(
    op: CountComparison,
    n: number,
    options: WaitForConnectionsOptions = {},
  ): Promise<void> {
    // (Bad arguments reject, as in every method that returns a promise.)
    const compare = comparisonOf(op, n);
    if (compare instanceof Error) return Promise.reject(compare);
    const timeout = timeoutOption("waitForConnections", options, Infinity);
    if (timeout instanceof Error) return Promise.reject(timeout);
    const what = `waitForConnections("${op}", ${n})`;
    const satisfied = (count: number) => compare(count, n);
    if (satisfied(this.#drivers.size)) return Promise.resolve();
    if (this.#state === State.Stopped) return Promise.reject(this.#interrupted(what));
    return new Promise((resolve, reject) => {
      const timer = startTimer(() => {
        this.#waiters.delete(waiter);
        reject(
          new TimeoutError(
            `${what} timed out after ${timeout} ms with ${this.#drivers.size} connections`,
          ),
        );
      }, timeout);
      const waiter: CountWaiter = {
        satisfied,
        settle: (err) => {
          clearTimer(timer);
          this.#waiters.delete(waiter);
          if (err) reject(err);
          else resolve();
        },
      };
      this.#waiters.add(waiter);
    });
  }

  /**
   * Change what can change on a running server (see {@linkcode ServerSettings}): every value is
   * checked first, as `serve()` checks it, and nothing changes if one is wrong (a `TypeError`
   * or `RangeError` naming it; an option that cannot change live is a `TypeError` saying why).
   * `maxConnections` and `alarms` apply at once; `handshakeTimeout`, `idleTimeout`,
   * `shutdownTimeout` (also the default of a later `stop()`), `maxBuffered`, `onBufferFull`,
   * `highWaterMark` and `logger` apply to connections accepted from now on; `transport` only
   * while `suspend({ refuse: true })` has the listening sockets closed, and the next `resume()`
   * listens with it (Ranch's `set_transport_options`).
   */
  setOptions(settings: ServerSettings<T, A>): void {
    checkSettings("setOptions", settings, this.#options.proxyProtocol);
    const { maxConnections, alarms, transport } = settings;
    if (transport !== undefined && this.#state !== State.Refusing) {
      throw new TypeError(
        "setOptions: transport can change only while suspend({ refuse: true }) has closed the " +
          "listening sockets (the next resume() listens with it)",
      );
    }
    for (const key of SETTINGS) {
      const value = settings[key];
      if (value !== undefined) (this.#options as Record<string, unknown>)[key] = value;
    }
    this.#driverOptions = this.#makeDriverOptions();
    if (alarms !== undefined) this.#setAlarms(alarms);
    if (maxConnections !== undefined) this.maxConnections = maxConnections;
  }

  /**
   * Switch to new code: new connections run `handler`; hibernated ones switch at their next
   * wake (after `codeChange(state)`); live ones get an `upgrade` event and switch when they
   * next hibernate.
   */
  upgrade(handler: Handler<T>, options: UpgradeOptions = {}): void {
    checkUpgrade("upgrade", handler, options);
    this.#handler = handler;
    for (const driver of this.#drivers.values()) driver.upgrade(handler, options.codeChange);
  }

  /**
   * Stop accepting, send `shutdown` to every connection, wait up to `timeout` ms (default the
   * server's `shutdownTimeout`) for them to end, then force the rest. Resolves when all closed.
   */
  stop(reason: unknown = "shutdown", options: StopOptions = {}): Promise<void> {
    const given = timeoutOption("stop", options, undefined);
    if (given instanceof Error) return Promise.reject(given);
    if (this.#stopping) {
      // Already stopping: a shorter timeout given now still wins (the earliest deadline).
      if (given !== undefined) {
        for (const driver of this.#drivers.values()) driver.shutdown(reason, given);
      }
      return this.#stopping;
    }
    this.#state = State.Stopping;
    const timeout = given ?? this.#options.shutdownTimeout;
    for (const alarm of this.#alarms) clearTimer(alarm.cooling ?? undefined);
    // The acceptors' loops end once their pending accept has failed on the closed listener:
    // only then is the listening socket really gone (and new connects refused).
    for (const socket of this.#handshaking) closeQuietly(socket); // the handshake fails
    this.#stopping = Promise.all([
      ...Array.from(this.#drivers.values(), (d) => d.shutdown(reason, timeout)),
      ...this.#loops,
      this.#transition, // a resume listening again closes what it opened
    ]).then(() => {
      this.#state = State.Stopped;
      this.#metrics?.stop();
      for (const waiter of this.#waiters) {
        waiter.settle(waiter.satisfied(0) ? undefined : this.#interrupted("waitForConnections"));
      }
      this.#resolveFinished();
    });
    for (const acceptor of this.#acceptors) {
      acceptor.info.state = "stopped";
      if (acceptor.listener) closeQuietly(acceptor.listener);
    }
    this.#openGate();
    return this.#stopping;
  }

  /**
   * Let the process exit while this server waits for connections (Node's `server.unref()`):
   * its listening sockets no longer keep it alive. Live connections still do (see
   * `conn.unref()`).
   */
  unref(): void {
    this.#referenced = false;
    for (const { listener } of this.#acceptors) listener?.unref?.();
  }

  /** Let the listening sockets keep the process alive again (the default), after `unref()`. */
  ref(): void {
    this.#referenced = true;
    for (const { listener } of this.#acceptors) listener?.ref?.();
  }

  /** Stops the server (`await using server = await serve(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  #makeDriverOptions(): DriverOptions<T> {
    return driverOptions(this.#options, {
      metrics: this.#metrics,
      registry: this.registry,
      owner: this.name,
      kind: "server",
      handshakeTimeout: this.#options.handshakeTimeout ?? 10_000,
      onClose: (conn) => {
        this.#closedTotals.add(conn.stats(), conn.closeReason);
        this.#metrics?.closed(conn.closeReason);
        this.#drivers.delete(conn.id);
        this.#removed.delete(conn.id);
        this.#openGate();
        this.#countChanged();
        const onClose = this.#options.onClose;
        if (onClose) this.#callHook("onClose", () => onClose(conn, conn.closeReason));
      },
    });
  }

  // ---- Suspending and resuming ------------------------------------------------------------

  // Run `step` now, unless a suspend or resume still waits: then after it (and those before).
  #inTurn(step: () => void | Promise<void>): Promise<void> {
    let done: Promise<void>;
    if (this.#transition === null) {
      const waits = step();
      if (waits === undefined) return Promise.resolve();
      done = waits;
    } else done = this.#transition.then(step, step);
    const turn = done.catch(() => {});
    this.#transition = turn;
    turn.then(() => {
      if (this.#transition === turn) this.#transition = null;
    });
    return done;
  }

  #hold(): void {
    if (this.#state === State.Running) this.#state = State.Suspended;
  }

  // Close the listening sockets; resolves once each accept under way has failed, which is when
  // the socket is really closed.
  #refuse(): Promise<void> | void {
    if (this.#state !== State.Running && this.#state !== State.Suspended) return;
    this.#state = State.Refusing;
    const accepting: Promise<Conn>[] = [];
    for (const acceptor of this.#acceptors) {
      if (acceptor.listener) closeQuietly(acceptor.listener);
      acceptor.listener = null;
      if (acceptor.accepting) accepting.push(acceptor.accepting);
    }
    this.#openGate(); // sockets accepted and held are closed with the backlog
    return Promise.allSettled(accepting).then(() => {});
  }

  async #relisten(): Promise<void> {
    const listeners = await listenAll(
      this.#options.transport as Transport<A> ?? tcp() as unknown as Transport<A>,
      this.#acceptors.length,
      this.#listenAgainAt(),
    );
    if (this.#state !== State.Refusing) { // stopped meanwhile
      for (const listener of listeners) closeQuietly(listener);
      return;
    }
    listeners.forEach((listener, i) => {
      const acceptor = this.#acceptors[i];
      acceptor.listener = listener;
      acceptor.info.addr = listener.addr;
      if (!this.#referenced) listener.unref?.();
    });
    this.#state = State.Running;
    this.#openGate();
  }

  // Where the listening sockets were: the address bound (the real port, even if port 0 was
  // asked for), or for addresses without a port (Unix, memory) what serve() was given.
  #listenAgainAt(): ListenOptions {
    const addr = this.#acceptors[0].info.addr;
    const reusePort = this.#options.reusePort || this.#acceptors.length > 1 || undefined;
    if (addr.transport === "tcp") return { hostname: addr.hostname, port: addr.port, reusePort };
    return { hostname: this.#options.hostname, port: this.#options.port ?? 0, reusePort };
  }

  // ---- Counting -----------------------------------------------------------------------------

  // What maxConnections limits and the alarms watch: live connections not removed, and those
  // still in their transport handshake.
  get #count(): number {
    return this.#drivers.size - this.#removed.size + this.#handshaking.size;
  }

  // The number of live connections changed: settle the waiters it satisfies.
  #countChanged(): void {
    if (this.#waiters.size === 0) return;
    const count = this.#drivers.size;
    for (const waiter of this.#waiters) if (waiter.satisfied(count)) waiter.settle();
  }

  #interrupted(what: string): Error {
    return new Deno.errors.Interrupted(
      `${what}: server ${this.name} stopped with ${this.#drivers.size} connections`,
    );
  }

  #setAlarms(alarms: ConnectionAlarm<T>[] = []): void {
    for (const state of this.#alarms) clearTimer(state.cooling ?? undefined);
    this.#alarms = alarms.map((alarm) => ({ alarm: { ...alarm }, cooling: null }));
  }

  // A connection was accepted: alarms whose threshold the count reaches go off.
  #checkAlarms(): void {
    for (const state of this.#alarms) {
      if (state.cooling === null && this.#count >= state.alarm.threshold) this.#ring(state);
    }
  }

  #ring(state: AlarmState<T>): void {
    const { threshold, cooldown = 5000, callback } = state.alarm;
    if (cooldown > 0) {
      state.cooling = startTimer(() => {
        state.cooling = null;
        if (this.#stopping === null && this.#count >= threshold) this.#ring(state);
      }, cooldown);
      if (!this.#referenced && typeof state.cooling === "number") Deno.unrefTimer(state.cooling);
    }
    const count = this.#count;
    const counted: Connection<T>[] = [];
    for (const [id, driver] of this.#drivers) {
      if (!this.#removed.has(id)) counted.push(driver.handle);
    }
    this.#callHook("alarm", () => callback(count, counted));
  }

  // ---- Accepting ----------------------------------------------------------------------------

  #renewGate(): void {
    let open!: () => void;
    const promise = new Promise<void>((resolve) => open = resolve);
    this.#gate = { promise, open };
  }

  // Something changed (resume, a connection ended, the limit moved, stop): acceptors recheck.
  #openGate(): void {
    const gate = this.#gate;
    this.#renewGate();
    gate.open();
  }

  #closedFor(acceptor: Acceptor<A>): boolean {
    if (this.#state !== State.Running || acceptor.listener === null) {
      acceptor.info.state = "suspended";
      return true;
    }
    if (this.#count >= this.#max) {
      acceptor.info.state = "waiting";
      return true;
    }
    return false;
  }

  // An acceptor never stops while the server runs: whatever goes wrong with one connection, or
  // with one accept, costs that connection only.
  async #acceptLoop(acceptor: Acceptor<A>): Promise<void> {
    while (this.#stopping === null) {
      try {
        await this.#accepting(acceptor);
      } catch (err) {
        // A bug of ours: report it and go on accepting.
        this.#logger.error(`etcp: server ${this.name}: acceptor ${acceptor.info.id}:`, err);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
  }

  async #accepting(acceptor: Acceptor<A>): Promise<void> {
    let backoff = 0;
    while (this.#stopping === null) {
      while (this.#closedFor(acceptor)) {
        await this.#gate.promise;
        if (this.#stopping !== null) return;
      }
      const listener = acceptor.listener!; // #closedFor is true without one
      acceptor.info.state = "accepting";
      let socket: Conn;
      try {
        socket = await (acceptor.accepting = listener.accept());
        backoff = 0;
      } catch (err) {
        if (this.#stopping !== null) return;
        // Closed by suspend({ refuse: true }): wait for resume.
        if (acceptor.listener !== listener) continue;
        // A peer that reset before it was accepted: that connection is gone, not the listener.
        // Go on at once and quietly (as Ranch does): no log, no backoff stalling the others.
        if (isPeerGone(err)) continue;
        // Out of file descriptors and the like: wait a little and go on accepting.
        backoff = Math.min(1000, backoff * 2 || 10);
        this.#logger.error(`etcp: server ${this.name}: accept failed, retrying:`, err);
        await new Promise((resolve) => setTimeout(resolve, backoff));
        continue;
      } finally {
        acceptor.accepting = null;
      }
      // Suspended or full since accept was called: hold the socket, as the backlog would.
      while (
        this.#stopping === null && acceptor.listener === listener && this.#closedFor(acceptor)
      ) await this.#gate.promise;
      if (this.#stopping !== null || acceptor.listener !== listener) {
        // Stopping, or refusing: the socket goes with the backlog it would have waited in.
        closeQuietly(socket);
        continue;
      }
      acceptor.info.accepted++;
      this.#metrics?.accepted();
      this.#startConnection(socket);
    }
  }

  get #logger(): Logger {
    return this.#driverOptions.logger; // (the user's, guarded: see loggerOf)
  }

  // Run a user's hook; what it throws, or the promise it returns rejects with (an async hook),
  // is reported, never taken out on the server.
  #callHook(name: string, hook: () => unknown): void {
    const report = (err: unknown) => {
      this.#logger.error(`etcp: server ${this.name}: ${name} threw:`, err);
    };
    try {
      const result = hook();
      if (isPromise(result)) Promise.resolve(result).catch(report); // (a thenable, maybe)
    } catch (err) {
      report(err);
    }
  }

  #startConnection(socket: Conn): void {
    if (this.#options.proxyProtocol) socket = withProxyProtocol(socket); // reads the header first
    if (socket.handshake === undefined) this.#runConnection(socket);
    else this.#handshake(socket);
    if (this.#alarms.length > 0) this.#checkAlarms();
  }

  // Off the acceptor: a peer that stalls its handshake holds only its own socket.
  #handshake(socket: Conn): void {
    this.#handshaking.add(socket);
    withTimeout(socket.handshake!(), this.#options.handshakeTimeout ?? 10_000, "handshake").then(
      () => {
        this.#handshaking.delete(socket);
        if (this.#stopping === null) this.#runConnection(socket);
        else closeQuietly(socket);
        this.#openGate();
      },
      (err) => {
        this.#handshaking.delete(socket);
        closeQuietly(socket);
        this.#openGate();
        if (this.#stopping === null) {
          this.#logger.debug(`etcp: server ${this.name}: handshake failed: ${describeReason(err)}`);
        }
      },
    );
  }

  #runConnection(socket: Conn): void {
    let driver: Driver<T>;
    try {
      driver = new Driver(socket, this.#handler, this.#driverOptions);
    } catch (err) {
      // Setting up failed (a framing whose decoder() throws, say): that connection only.
      closeQuietly(socket);
      this.#logger.error(`etcp: server ${this.name}: could not set up a connection:`, err);
      return;
    }
    this.#drivers.set(driver.handle.id, driver);
    driver.enroll();
    const onConnection = this.#options.onConnection;
    if (onConnection) this.#callHook("onConnection", () => onConnection(driver.handle));
    driver.start();
    this.#countChanged();
  }
}

function isPeerGone(err: unknown): boolean {
  return err instanceof Deno.errors.ConnectionReset ||
    err instanceof Deno.errors.ConnectionAborted ||
    err instanceof Deno.errors.NotConnected;
}

/**
 * Listen and serve: every accepted connection runs its own `handler` generator.
 *
 * Types: a handler written inline gets events of type `any`. Annotate it once, with the frame
 * type of its framing, to have its events typed and checked against the framing:
 * `async function* h(): HandlerGenerator<string>` for `lines()` (`Uint8Array` for `raw()` and
 * `lengthPrefixed()`). `serve` then refuses, at compile time, a handler written for frames
 * other than its framing's.
 *
 * @example An echo server for length-prefixed frames
 * ```ts
 * import assert from "node:assert/strict";
 * import { lengthPrefixed, send, serve } from "./mod.ts";
 * const server = await serve(async function* () {
 *   let ev = yield;
 *   for (;;) {
 *     if (ev.type === "packet") ev = yield send(ev.data);
 *     else if (ev.type === "disconnect" || ev.type === "shutdown") return;
 *     else ev = yield;
 *   }
 * }, { port: 0, hostname: "127.0.0.1", framing: lengthPrefixed(4) });
 * assert.ok(server.addr.port > 0);
 * await server.stop();
 * ```
 *
 * @example onListen vetoes a server, or adjusts it before the first accept
 * ```ts
 * import assert from "node:assert/strict";
 * import { memory, serve } from "./mod.ts";
 * const handler = async function* () {};
 * await assert.rejects(
 *   serve(handler, { transport: memory("veto-example"), onListen: () => {
 *     throw new Error("no config");
 *   } }),
 *   { message: "no config" },
 * );
 * const server = await serve(handler, {
 *   transport: memory("adjust-example"),
 *   onListen: async () => ({ maxConnections: await Promise.resolve(2) }),
 * });
 * assert.equal(server.maxConnections, 2);
 * await server.stop();
 * ```
 */
// deno-lint-ignore no-explicit-any
export async function serve<H extends Handler<any>, A extends Addr = Deno.NetAddr>(
  handler: H,
  options?: ServeOptions<FrameOf<H>, A> & FramingFor<FrameOf<H>>,
): Promise<Server<FrameOf<H>, A>> {
  type T = FrameOf<H>;
  options ??= {} as ServeOptions<T, A> & FramingFor<T>;
  checkServeOptions(handler, options);
  // Loaded before listening: if that fails, nothing is left open.
  const metrics = await metricsOn(options.metrics, options.logger);
  const transport = options.transport ?? tcp() as unknown as Transport<A>;
  const listeners = await listenAll(transport, options.acceptors ?? 1, {
    hostname: options.hostname,
    port: options.port ?? 0,
    reusePort: options.reusePort || (options.acceptors ?? 1) > 1 || undefined,
  });
  const server = new Server<T, A>(handler, { ...options, transport, metrics }, listeners);
  if (options.onListen) {
    try {
      const settings: unknown = await options.onListen(server.addr);
      if (isPlainObject(settings)) {
        checkSettings("onListen", settings, options.proxyProtocol);
        server.setOptions(settings as ServerSettings<T, A>);
      }
    } catch (err) {
      // Vetoed: nothing may be left listening, or the process could never exit.
      await server.stop();
      throw err;
    }
  }
  server.start();
  const signal = options.signal;
  if (signal) {
    if (signal.aborted) server.stop(signal.reason);
    else {
      const onAbort = () => server.stop(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      // A long-lived signal must not keep stopped servers alive.
      server.finished.then(() => signal.removeEventListener("abort", onAbort));
    }
  }
  return server;
}

// An object literal: what onListen returns to adjust the server. Anything else (a number, an
// array, a Map) is what a hook written before settings existed happens to return: ignored.
function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== "object") return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

// One listening socket per acceptor, all on the first one's port (the real one if `at` asks
// for port 0); if one fails, those already open are closed.
async function listenAll<A extends Addr>(
  transport: Transport<A>,
  count: number,
  at: ListenOptions,
): Promise<Listener<A>[]> {
  const first = await transport.listen(at);
  const listeners = [first];
  try {
    const port = "port" in first.addr ? first.addr.port : at.port;
    for (let i = 1; i < count; i++) listeners.push(await transport.listen({ ...at, port }));
  } catch (err) {
    for (const listener of listeners) closeQuietly(listener);
    throw err;
  }
  return listeners;
}

function checkServeOptions(handler: unknown, options: unknown): void {
  checkHandler("serve", handler);
  const check = new OptionCheck("serve", options);
  check.port("port");
  check.string("hostname");
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
  check.number("acceptors", 1, { integer: true });
  check.number("maxConnections", 0, { integer: true, infinite: true });
  check.delay("handshakeTimeout");
  check.boolean("reusePort");
  check.boolean("proxyProtocol");
  const { proxyProtocol, transport, alarms } = options as ServeOptions;
  checkProxyTransport("serve", proxyProtocol, transport);
  checkAlarms("serve", alarms);
  check.function("onListen");
  check.function("onConnection");
  check.function("onClose");
  check.signal("signal");
  check.boolean("metrics");
  checkConnectionSettings(check);
}

// What setOptions takes, or onListen returns: only the options that can change live, each
// checked as serve() checks it.
function checkSettings(where: string, settings: unknown, proxyProtocol?: boolean): void {
  if (settings === null || typeof settings !== "object") {
    throw new TypeError(
      `${where}: settings must be an object of ServerSettings, not ${describeValue(settings)}`,
    );
  }
  for (const [key, value] of Object.entries(settings)) {
    if (value === undefined || (SETTINGS as readonly string[]).includes(key)) continue;
    const why = Object.hasOwn(FIXED, key) ? FIXED[key] : "not an option of serve()";
    throw new TypeError(`${where}: option ${key} cannot change on a running server: ${why}`);
  }
  const check = new OptionCheck(where, settings);
  check.number("maxConnections", 0, { integer: true, infinite: true });
  check.delay("handshakeTimeout");
  check.delay("idleTimeout");
  check.delay("shutdownTimeout");
  check.number("maxBuffered", 0, { infinite: true });
  check.oneOf("onBufferFull", ["stop", "throw"]);
  check.number("highWaterMark", 1, { integer: true, infinite: true });
  check.methods("logger", ["error", "warn", "debug"], " (console fits)");
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
  check.trace("trace");
  const { transport, alarms } = settings as ServerSettings;
  checkProxyTransport(where, proxyProtocol, transport);
  checkAlarms(where, alarms);
}

function checkProxyTransport(where: string, proxyProtocol?: boolean, transport?: Transport): void {
  if (proxyProtocol && transport?.name === "tls") {
    // The header comes in plain text before the ClientHello, but the tls() transport has done
    // the handshake by then: terminate TLS in front (HAProxy does), or serve plain TCP.
    throw new TypeError(
      `${where}: proxyProtocol with the tls() transport is not supported: the PROXY header ` +
        "precedes the TLS handshake; let the proxy terminate TLS, or use tcp()",
    );
  }
}

function checkAlarms(where: string, alarms: unknown): void {
  if (alarms === undefined) return;
  const shape = "an array of { threshold, cooldown?, callback }";
  if (!Array.isArray(alarms)) {
    throw new TypeError(`${where}: option alarms must be ${shape}, not ${describeValue(alarms)}`);
  }
  alarms.forEach((alarm: Partial<ConnectionAlarm<unknown>>, i) => {
    const name = `alarms[${i}]`;
    if (alarm === null || typeof alarm !== "object") {
      throw new TypeError(`${where}: option ${name} must be ${shape}, not ${describeValue(alarm)}`);
    }
    const { threshold, cooldown, callback } = alarm;
    if (typeof threshold !== "number") {
      throw new TypeError(
        `${where}: option ${name}.threshold must be an integer >= 0, not ${
          describeValue(threshold)
        }`,
      );
    }
    if (!(Number.isInteger(threshold) && threshold >= 0)) {
      throw new RangeError(
        `${where}: option ${name}.threshold must be an integer >= 0, not ${threshold}`,
      );
    }
    if (cooldown !== undefined && !isDelay(cooldown)) {
      const error = typeof cooldown === "number" ? RangeError : TypeError;
      throw new error(
        `${where}: option ${name}.cooldown must be a number of ms >= 0, not ${
          describeValue(cooldown)
        }`,
      );
    }
    if (typeof callback !== "function") {
      throw new TypeError(
        `${where}: option ${name}.callback must be a function, not ${describeValue(callback)}`,
      );
    }
  });
}
