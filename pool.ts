/**
 * `createPool()`: N client connections to one or more servers, each run by its own handler, with
 * the pool choosing which one carries a request (etcp's `start_link_pool`).
 *
 * @module
 */

import { loggerOf } from "./_logger.ts";
import type { FrameOf, Handler } from "./actions.ts";
import { connect, type ConnectOptions } from "./client.ts";
import type { CallOptions, Connection, Logger, Mode, SendSyncOptions } from "./connection.ts";
import type { UpgradeOptions } from "./server.ts";
import { describeReason, describeValue, isNormalReason, TimeoutError } from "./errors.ts";
import type { Framing, FramingFor } from "./framing.ts";
import { defaultRegistry, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import type { Transport } from "./transport/transport.ts";
import {
  checkConnectionSettings,
  checkHandler,
  checkUpgrade,
  OptionCheck,
  timeoutOption,
} from "./_options.ts";
import { clearTimer, isDelay, startTimer, type Timer } from "./_timer.ts";
import { withTimeout } from "./_with_timeout.ts";
import type { TraceOption } from "./_trace.ts";
import { ClosedTotals } from "./_stats.ts";
import { metricsOn, type MetricsSample, observeMetrics, type OwnerMetrics } from "./_metrics.ts";
import {
  Backoff,
  type BackoffSettings,
  backoffSettings,
  checkReconnect,
  type ReconnectOptions,
} from "./_backoff.ts";

/** Where a pool connects: a TCP `{ hostname, port }`, or any transport's address. */
export interface PoolAddress {
  /** Server host (default `"127.0.0.1"` for TCP). */
  hostname?: string;
  /** Server port. */
  port?: number;
  /** How to reach this address (default: the pool's `transport`). */
  transport?: Transport;
  /** How the address is named in stats and errors (default `hostname:port`, or the transport's name). */
  label?: string;
}

/** How a pool chooses the connection that carries a request. */
export type PoolStrategy = "round-robin" | "random" | "least-busy" | "hash";

/** Options of {@linkcode createPool}. */
export interface PoolOptions<T = Uint8Array> {
  /** The servers to connect to (at least one). */
  addresses: PoolAddress[];
  /** Connections per address (default 1). */
  size?: number;
  /**
   * `"round-robin"` (default), `"random"`, `"least-busy"` (fewest calls in flight through the
   * pool) or `"hash"` (rendezvous hashing of `key`: one key stays on one live connection while it
   * lives; a connection that dies moves only its own keys).
   */
  strategy?: PoolStrategy;
  /** With `"hash"` (required there): the key of a message (`call`, `cast`, `info`, `send`). */
  key?: (message: unknown) => string;
  /** How to connect (default `tcp()`); an address may name its own. */
  transport?: Transport;
  /** How bytes become frames (default `raw()`). */
  framing?: Framing<T>;
  /** `"active"` (default) or `"passive"`. */
  mode?: Mode;
  /** The pool's name: the owner of its connections in the registry (default `pool1`, `pool2`, …). */
  name?: string;
  /** Where the connections are recorded, with `kind: "pool"` (default: the process's memory registry). */
  registry?: Registry;
  /** Milliseconds each connect may take (default 10000). */
  connectTimeout?: number;
  /** Milliseconds a `pool.call` waits for its reply unless it says otherwise (default 5000). */
  callTimeout?: number;
  /**
   * Milliseconds a request may wait for a connection when none is free (default 0: fail at once
   * with {@linkcode PoolUnavailable}; `connectTimeout` if only `maxQueued` is set).
   */
  acquireTimeout?: number;
  /** Requests that may wait at once (default: unbounded with `acquireTimeout`, else 0). */
  maxQueued?: number;
  /**
   * Resolve `createPool` only once a connection is up: `true` waits up to `connectTimeout`, a
   * number that many ms; it rejects with `PoolUnavailable` (and the pool is stopped) if none is.
   */
  waitReady?: boolean | number;
  /** Milliseconds a connection's handler has to finish after `shutdown` (default 5000). */
  shutdownTimeout?: number;
  /** The default event timeout of each connection (see `ConnectOptions.idleTimeout`). */
  idleTimeout?: number;
  /** Active mode: frames the mailbox may hold before reading pauses (default 1). */
  highWaterMark?: number;
  /** Bytes that may be pending when a send comes from outside the handler (default 8 MiB). */
  maxBuffered?: number;
  /** What a send past `maxBuffered` does (default `"stop"`). */
  onBufferFull?: "stop" | "throw";
  /** Where an abnormal end is reported (default `console`). */
  logger?: Logger;
  /**
   * Reconnection, on by default (`false`: a slot whose connect fails or whose connection ends
   * stays `"down"`; `true` or `{}`: the defaults, 1 s initial, ×1.6, 30 s cap, jitter 0.2). A
   * slot whose connect fails (its handler's start included), or whose connection ends for any
   * reason (a dead server, a handler that throws or returns, a `conn.stop()`), goes
   * `"backing-off"`, waits (see {@linkcode ReconnectOptions} for the wait), then connects again
   * under the same hash identity; a fresh handler runs on the new socket. Not while the pool
   * stops or the slot's address is removed. With `maxAttempts`, a slot that fails that many
   * times in a row stays `"down"`. `onExit` may decide otherwise, connection by connection.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * What to do when a connection ends or a connect fails (etcp's pool `handle_exit`): return
   * `"restart"` (connect again now), `{ restart: ms }` (after `ms`), `"delete"` (take the slot
   * out of the pool), `"stop"` (stop the pool), or nothing for the default: reconnect after
   * `exit.delay` (the backoff), or stay `"down"` if reconnection is off or has given up. Not
   * called for the connections the pool ends itself (`stop`, `removeAddress`). If it throws or
   * returns something else, that is logged and the default applies.
   */
  onExit?: (exit: PoolExit<T>) => PoolExitDecision | void;
  /** Trace every connection of the pool (see `ConnectOptions.trace`). Off by default. */
  trace?: TraceOption;
  /**
   * Report OpenTelemetry metrics, as `ServeOptions.metrics` says (the same names, with
   * `etcp.kind` `"pool"`, and `etcp.pool.reconnects`). Default: on if `OTEL_DENO=true`.
   */
  metrics?: boolean;
}

/** What {@linkcode PoolOptions.onExit} is told of a connection that ended or a connect that failed. */
export interface PoolExit<T = Uint8Array> {
  /** The label of the slot's address. */
  address: string;
  /** The connection that ended; undefined if the connect failed. */
  connection?: Connection<T>;
  /** The connection's close reason, or the connect's error. */
  reason: unknown;
  /**
   * Milliseconds the default would wait before reconnecting (the backoff); undefined if
   * reconnection is off, or has given up (`maxAttempts`).
   */
  delay?: number;
}

/**
 * What {@linkcode PoolOptions.onExit} decides: connect again now (`"restart"`) or after `ms`
 * (`{ restart: ms }`), take the slot out of the pool (`"delete"`), stop the pool (`"stop"`), or
 * the default (`undefined`).
 */
export type PoolExitDecision = "restart" | { restart: number } | "delete" | "stop" | undefined;

/** Why a pool could not serve a request. */
export type PoolUnavailableReason = "down" | "busy" | "queue-full" | "timeout" | "stopped";

/**
 * A pool has no connection to give: none is up (`"down"`), every live one is checked out
 * (`"busy"`), the wait queue is full (`"queue-full"`), the wait took longer than
 * `acquireTimeout` (`"timeout"`), or the pool is stopping (`"stopped"`). Names the addresses and
 * the last error of each.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { PoolUnavailable } from "./mod.ts";
 * const err = new PoolUnavailable("down", [{ address: "10.0.0.1:6379", lastError: "refused" }]);
 * assert.equal(err.name, "PoolUnavailable");
 * assert.equal(err.reason, "down");
 * assert.deepEqual(err.addresses, ["10.0.0.1:6379"]);
 * assert.equal(err.message, "pool unavailable: no connection is up; addresses: 10.0.0.1:6379 (refused)");
 * ```
 */
export class PoolUnavailable extends Error {
  /** Why there was no connection. */
  readonly reason: PoolUnavailableReason;
  /** The pool's addresses, by label. */
  readonly addresses: string[];
  /** The last error of each address that has one. */
  readonly errors: { address: string; error: unknown }[];
  /** Make one; `addresses` lists each address with its last error, if any. */
  constructor(
    reason: PoolUnavailableReason,
    addresses: { address: string; lastError?: unknown }[],
    detail?: string,
  ) {
    const why = {
      down: "no connection is up",
      busy: "every live connection is checked out",
      "queue-full": "too many requests are waiting",
      timeout: "no connection came free in time",
      stopped: "the pool is stopping",
    }[reason];
    const list = addresses.map((a) =>
      a.lastError === undefined ? a.address : `${a.address} (${describeReason(a.lastError)})`
    ).join(", ");
    super(`pool unavailable: ${why}${detail ? ` ${detail}` : ""}; addresses: ${list || "none"}`);
    this.name = "PoolUnavailable";
    this.reason = reason;
    this.addresses = addresses.map((a) => a.address);
    this.errors = addresses.filter((a) => a.lastError !== undefined).map((a) => ({
      address: a.address,
      error: a.lastError,
    }));
  }
}

/**
 * The state of one pool connection slot: `"backing-off"` waits to reconnect (after the backoff,
 * or as `onExit` said); `"down"` will not (reconnection off or given up, or the pool stopping).
 */
export type PoolConnectionState = "connecting" | "up" | "draining" | "backing-off" | "down";

/** {@linkcode Pool.stats} of one address. */
export interface PoolAddressStats {
  /** The address's label. */
  address: string;
  /** Connects under way. */
  connecting: number;
  /** Connections up and taking requests. */
  up: number;
  /** Connections finishing their calls before they stop (`removeAddress`). */
  draining: number;
  /** Slots waiting to reconnect. */
  backingOff: number;
  /** Slots whose connect failed or whose connection ended, that will not reconnect. */
  down: number;
  /** Calls through the pool awaiting their reply on this address. */
  inFlight: number;
  /** Connections held by `withConnection`. */
  checkedOut: number;
  /**
   * Connects that failed, and connections that ended abnormally (an error, or a reason other
   * than `"normal"`, `"shutdown"`, `"idle"`) or, with reconnection on, within `initialDelay`
   * ms of coming up.
   */
  failures: number;
  /** Connections brought back up by a reconnect. */
  reconnects: number;
  /** The last error, if any. */
  lastError?: unknown;
}

/** What {@linkcode Pool.stats} returns. */
export interface PoolStats {
  /** The pool's name. */
  name: string;
  /** Per address. */
  addresses: PoolAddressStats[];
  /** Calls in flight, over every address. */
  inFlight: number;
  /** Requests waiting for a connection. */
  queued: number;
  /** Connections brought back up by a reconnect, over every address. */
  reconnects: number;
  /** Failures (see {@linkcode PoolAddressStats.failures}), over every address. */
  failures: number;
  /** Open connections whose handler is hibernating. */
  hibernated: number;
  /** Connections that have closed, by reason (as `ServerStats.closedByReason` counts them). */
  closedByReason: Record<string, number>;
  /** Bytes read, over every connection the pool has had. */
  bytesIn: number;
  /** Bytes written, over every connection the pool has had. */
  bytesOut: number;
  /** Frames received, over every connection the pool has had. */
  framesIn: number;
  /** Frames sent, over every connection the pool has had. */
  framesOut: number;
}

/** Options of {@linkcode Pool.call}. */
export interface PoolCallOptions extends CallOptions {
  /** With `"hash"`: route by this key instead of the `key` option's. */
  key?: string;
}

/** Options of {@linkcode Pool.withConnection}. */
export interface CheckoutOptions {
  /** Milliseconds to wait for a free connection (default `acquireTimeout`, or 5000 if that is 0). */
  timeout?: number;
}

/** Options of {@linkcode Pool.stop} and {@linkcode Pool.removeAddress}. */
export interface PoolStopOptions {
  /**
   * Milliseconds in-flight calls and checkouts have to finish before the connections are stopped
   * (and what is still in flight rejects with `ConnectionClosed`); the handlers then get the same
   * again (default 5000).
   */
  timeout?: number;
}

// One connection slot: made by createPool / addConnection; kept (down) after its connection ends,
// so that a reconnect can later bring it back under the same hash identity.
interface Slot<T> {
  readonly id: string; // the hash identity: address key + index
  readonly site: Site;
  state: PoolConnectionState;
  conn?: Connection<T>;
  inFlight: number;
  // The connection checked out of this slot (withConnection), if any: routed nothing until it
  // comes back. If it dies meanwhile, the slot's next connection is free.
  checkedOut: Connection<T> | undefined;
  drained?: () => void; // called once inFlight is 0 and not checked out, while draining
  // A request's settling, made once per slot so that a request allocates no closure: each
  // takes the request off the slot's count and passes its outcome on.
  readonly fulfilled: (value: unknown) => unknown;
  readonly rejected: (err: unknown) => never;
  readonly backoff?: Backoff; // with reconnection on
  timer?: Timer; // the wait before a reconnect
  connecting?: AbortController; // the connect under way: aborted when the pool stops or drains
}

// One address and what is known of it.
interface Site {
  readonly key: string;
  readonly label: string;
  readonly address: PoolAddress;
  readonly transport: Transport;
  slots: number; // slot indexes handed out
  failures: number;
  reconnects: number;
  lastError?: unknown;
  removed: boolean;
}

interface Waiter<T> {
  exclusive: boolean;
  key?: string;
  resolve(slot: Slot<T>): void;
  reject(err: Error): void;
  timer?: Timer;
}

function isFiniteDelay(value: unknown): boolean {
  return isDelay(value) && value !== Infinity;
}

// Whether `slot`'s connection is up and not ending (one whose handler stopped is closing while
// its finally runs and its output goes out: a request sent there would fail).
function isLive<T>(slot: Slot<T>): boolean {
  return slot.state === "up" && slot.conn!.state === "up";
}

// Whether `slot` may take a request: live and not checked out.
function isFree<T>(slot: Slot<T>): boolean {
  return isLive(slot) && slot.checkedOut !== slot.conn;
}

let pools = 0;
const transportIds = new WeakMap<Transport, number>();
let transports = 0;

function transportId(transport: Transport): number {
  let id = transportIds.get(transport);
  if (id === undefined) transportIds.set(transport, id = ++transports);
  return id;
}

// FNV-1a then a murmur3 finaliser: a well-mixed 32-bit hash for rendezvous scores.
function hash32(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

// The pool's registry: the same entries, recorded with kind "pool" and the pool as owner.
// (connect() sets kind "client" and owner "client"; this is the one place that changes them.)
function poolRegistry(inner: Registry, owner: string): Registry {
  return {
    get node() {
      return inner.node;
    },
    add: (entry, conn) => inner.add({ ...entry, kind: "pool", owner }, conn),
    remove: (id) => inner.remove(id),
    claim: (id, name) => inner.claim(id, name),
    list: (filter) => inner.list(filter),
    lookup: (idOrName) => inner.lookup(idOrName),
  };
}

const STRATEGIES = ["round-robin", "random", "least-busy", "hash"] as const;

function checkPoolOptions(handler: unknown, options: unknown): void {
  checkHandler("createPool", handler);
  const check = new OptionCheck("createPool", options);
  const o = options as Record<string, unknown>;
  if (!Array.isArray(o.addresses) || o.addresses.length === 0) {
    throw new TypeError(
      `createPool: option addresses must be a non-empty array of { hostname, port } or transport addresses, not ${
        Array.isArray(o.addresses) ? "an empty array" : String(o.addresses)
      }`,
    );
  }
  o.addresses.forEach((a, i) => checkAddress(`createPool: option addresses[${i}]`, a));
  check.number("size", 1, { integer: true });
  check.oneOf("strategy", STRATEGIES);
  check.function("key");
  if (o.strategy === "hash" && o.key === undefined) {
    throw new TypeError(
      'createPool: option key must be a function (message) => string with strategy "hash"',
    );
  }
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
  check.delay("connectTimeout");
  check.delay("callTimeout");
  check.delay("acquireTimeout");
  check.number("maxQueued", 0, { integer: true, infinite: true });
  if (typeof o.waitReady !== "boolean") check.delay("waitReady");
  check.function("onExit");
  check.boolean("metrics");
  checkConnectionSettings(check);
  checkReconnect("createPool", o.reconnect);
}

function checkAddress(where: string, address: unknown): void {
  if (address === null || typeof address !== "object") {
    throw new TypeError(`${where} must be an object such as { hostname, port }, not ${address}`);
  }
  const check = new OptionCheck(where.replace(/^createPool: option /, "createPool: "), address);
  check.string("hostname");
  check.port("port");
  check.string("label");
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
}

/**
 * Start a pool of connections to `options.addresses`, `size` to each, each run by `handler` as
 * with {@linkcode connect}. Resolves at once (or, with `waitReady`, once a connection is up):
 * a pool whose servers are all down still starts, and its `call` fails at once with
 * {@linkcode PoolUnavailable} until one is up. Bad options throw a `TypeError` or `RangeError`
 * naming the option.
 *
 * @example Calls spread over two connections
 * ```ts
 * import assert from "node:assert/strict";
 * import { createPool, memory, reply, serve } from "./mod.ts";
 * const transport = memory("pool-doc");
 * const server = await serve(async function* () {
 *   yield;
 * }, { transport });
 * const pool = await createPool(async function* (conn) {
 *   for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
 *     ev = ev.type === "call" ? yield reply(ev.from, conn.id) : yield;
 *   }
 * }, { addresses: [{ transport }], size: 2, waitReady: true });
 * await pool.ready;
 * while (pool.connections().length < 2) await new Promise((r) => setTimeout(r, 1));
 * const ids = new Set([await pool.call("who"), await pool.call("who")]);
 * assert.equal(ids.size, 2);
 * await pool.stop();
 * await server.stop();
 * ```
 */
// deno-lint-ignore no-explicit-any
export async function createPool<H extends Handler<any>>(
  handler: H,
  options: PoolOptions<FrameOf<H>> & FramingFor<FrameOf<H>>,
): Promise<Pool<FrameOf<H>>> {
  checkPoolOptions(handler, options);
  const metrics = await metricsOn(options.metrics, options.logger);
  const pool = new Pool<FrameOf<H>>(
    handler,
    { ...options, metrics } as PoolOptions<FrameOf<H>>,
    poolToken,
  );
  const wait = options.waitReady === true
    ? options.connectTimeout ?? 10_000
    : options.waitReady === false
    ? undefined
    : options.waitReady;
  if (wait !== undefined) {
    try {
      await withTimeout(pool.ready, wait, "waitReady");
    } catch (err) {
      // pool.ready rejects only with PoolUnavailable: a TimeoutError is the wait running out.
      const thrown = err instanceof TimeoutError
        ? pool.unavailable("down", `within ${wait} ms (waitReady)`)
        : err;
      await pool.stop();
      throw thrown;
    }
  }
  return pool;
}

const poolToken = Symbol("pool");

/**
 * A pool of client connections made by {@linkcode createPool}. Requests (`call`, `cast`,
 * `info`, `send`, `sendSync`) go to a live connection chosen by the strategy;
 * {@linkcode Pool.withConnection} checks one out for a caller alone.
 *
 * @example Hashing keeps a key on one connection
 * ```ts
 * import assert from "node:assert/strict";
 * import { createPool, memory, reply, serve } from "./mod.ts";
 * const transport = memory("pool-class-doc");
 * const server = await serve(async function* () {
 *   yield;
 * }, { transport });
 * await using pool = await createPool(async function* (conn) {
 *   for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
 *     ev = ev.type === "call" ? yield reply(ev.from, conn.id) : yield;
 *   }
 * }, {
 *   addresses: [{ transport }],
 *   size: 3,
 *   strategy: "hash",
 *   key: (m) => (m as { user: string }).user,
 *   waitReady: true,
 * });
 * const first = await pool.call({ user: "ada" });
 * assert.equal(await pool.call({ user: "ada" }), first);
 * assert.equal(pool.stats().addresses[0].failures, 0);
 * await pool.stop();
 * await server.stop();
 * ```
 */
export class Pool<T = Uint8Array> {
  /** The pool's name (owner of its connections in the registry). */
  readonly name: string;
  /**
   * Resolves once a connection is up. Rejects with `PoolUnavailable` if the pool stops first,
   * or once no slot can come up any more (every connect failed with reconnection off, or after
   * `maxAttempts`); with reconnection on it waits (bound it with `waitReady`).
   */
  readonly ready: Promise<void>;
  // deno-lint-ignore no-explicit-any
  #handler: Handler<any>; // replaced by upgrade()
  readonly #options: PoolOptions<T>;
  readonly #logger: Logger; // the options', guarded
  readonly #registry: Registry;
  readonly #size: number;
  readonly #strategy: PoolStrategy;
  readonly #acquireTimeout: number;
  readonly #maxQueued: number;
  readonly #backoff: BackoffSettings | undefined;
  readonly #callOptions: CallOptions | undefined; // a call's that sets no timeout of its own
  readonly #sites = new Map<string, Site>();
  readonly #slots: Slot<T>[] = [];
  readonly #waiters: Waiter<T>[] = [];
  readonly #pending = new Set<Promise<unknown>>(); // connects under way
  #ready = Promise.withResolvers<void>();
  #isReady = false;
  #next = 0; // the round-robin cursor: an index into #slots
  #stopping: Promise<void> | undefined; // set by stop(): the pool is closing
  readonly #closedTotals = new ClosedTotals(); // of the connections that have closed
  readonly #metrics: OwnerMetrics | undefined; // with metrics on (loaded by createPool)

  /** Made by {@linkcode createPool}; not constructed directly. */
  constructor(
    // deno-lint-ignore no-explicit-any
    handler: Handler<any>,
    options: PoolOptions<T>,
    token: unknown,
  ) {
    if (token !== poolToken) throw new TypeError("Pool: use createPool()");
    this.#handler = handler;
    this.#options = options;
    this.#logger = loggerOf(options.logger);
    this.name = options.name ?? `pool${++pools}`;
    this.#registry = poolRegistry(options.registry ?? defaultRegistry, this.name);
    this.#size = options.size ?? 1;
    this.#strategy = options.strategy ?? "round-robin";
    const queueing = options.maxQueued !== undefined && options.maxQueued > 0;
    this.#acquireTimeout = options.acquireTimeout ??
      (queueing ? options.connectTimeout ?? 10_000 : 0);
    this.#maxQueued = options.maxQueued ?? (this.#acquireTimeout > 0 ? Infinity : 0);
    this.#backoff = backoffSettings(options.reconnect, true);
    this.#callOptions = options.callTimeout === undefined
      ? undefined
      : { timeout: options.callTimeout };
    this.#metrics = options.metrics
      ? observeMetrics({ name: this.name, kind: "pool", sample: () => this.#sample() })
      : undefined;
    this.ready = this.#ready.promise;
    this.ready.catch(() => {});
    for (const address of options.addresses) {
      const site = this.#site(address);
      for (let i = 0; i < this.#size; i++) this.#open(site).catch(() => {});
    }
  }

  /**
   * Switch to new code, as `Server.upgrade` does: connections made from now on (reconnects,
   * added ones) run `handler`, and each live one is upgraded as by `Connection.upgrade` (a
   * hibernated one at its next wake, after `codeChange(state)`; a running one gets an `upgrade`
   * event and switches when it hibernates).
   */
  upgrade(handler: Handler<T>, options: UpgradeOptions = {}): void {
    checkUpgrade("upgrade", handler, options);
    this.#handler = handler;
    for (const slot of this.#slots) slot.conn?.upgrade(handler, options);
  }

  // ---- Addresses and connections ---------------------------------------------------------------

  // The key of `address`'s site: its transport (default TCP), hostname and port.
  #siteKey(address: PoolAddress): string {
    const explicit = address.transport ?? this.#options.transport;
    return `${explicit ? transportId(explicit) : "tcp"}|${address.hostname ?? ""}|${
      address.port ?? ""
    }`;
  }

  #site(address: PoolAddress): Site {
    const key = this.#siteKey(address);
    let site = this.#sites.get(key);
    if (!site || site.removed) {
      const transport = address.transport ?? this.#options.transport ?? tcp();
      const label = address.label ??
        (address.port !== undefined || transport.name === "tcp"
          ? `${address.hostname ?? "127.0.0.1"}:${address.port ?? 0}`
          : address.hostname !== undefined
          ? `${transport.name}:${address.hostname}`
          : `${transport.name}#${this.#sites.size + 1}`);
      site = {
        key,
        label,
        address,
        transport,
        slots: 0,
        failures: 0,
        reconnects: 0,
        removed: false,
      };
      this.#sites.set(key, site);
    }
    return site;
  }

  #find(address: PoolAddress): Site | undefined {
    const site = this.#sites.get(this.#siteKey(address));
    return site && !site.removed ? site : undefined;
  }

  // Make a slot and connect it. Rejects with the connect's error (recorded in the stats); with
  // reconnection on, the slot then keeps trying.
  #open(site: Site): Promise<Connection<T>> {
    const slot: Slot<T> = {
      id: `${site.key}#${site.slots++}`,
      site,
      state: "connecting",
      inFlight: 0,
      checkedOut: undefined,
      fulfilled: (value) => {
        this.#settled(slot);
        return value;
      },
      rejected: (err) => {
        this.#settled(slot);
        throw err;
      },
      backoff: this.#backoff && new Backoff(this.#backoff),
    };
    this.#slots.push(slot);
    return this.#connect(slot, false);
  }

  // Connect `slot` (again, if `again`).
  #connect(slot: Slot<T>, again: boolean): Promise<Connection<T>> {
    const { site } = slot;
    slot.state = "connecting";
    const aborting = slot.connecting = new AbortController();
    const o = this.#options;
    const connectOptions: ConnectOptions<T> = {
      hostname: site.address.hostname,
      port: site.address.port,
      transport: site.transport,
      framing: o.framing,
      mode: o.mode,
      highWaterMark: o.highWaterMark,
      connectTimeout: o.connectTimeout,
      registry: this.#registry,
      shutdownTimeout: o.shutdownTimeout,
      idleTimeout: o.idleTimeout,
      maxBuffered: o.maxBuffered,
      onBufferFull: o.onBufferFull,
      logger: o.logger,
      trace: o.trace,
      signal: aborting.signal, // (aborted only while connecting: see #drain)
    };
    const connecting = connect(this.#handler, connectOptions as never) as Promise<Connection<T>>;
    const settled = connecting.then(
      (conn) => {
        slot.connecting = undefined;
        return this.#connected(slot, conn, again);
      },
      (err) => {
        slot.connecting = undefined;
        if (!aborting.signal.aborted) { // (given up by the pool itself: no failure)
          site.failures++;
          site.lastError = err;
        }
        this.#ended(slot, err);
        throw err;
      },
    );
    const tracked = settled.catch(() => {}).finally(() => this.#pending.delete(tracked));
    this.#pending.add(tracked);
    return settled;
  }

  #connected(slot: Slot<T>, conn: Connection<T>, again: boolean): Connection<T> {
    slot.conn = conn;
    conn.closed.then((reason) => {
      this.#closedTotals.add(conn.stats(), reason);
      this.#metrics?.closed(reason);
      if (slot.conn !== conn) return;
      const abnormal = !isNormalReason(reason);
      const brief = slot.backoff !== undefined && slot.state !== "draining" &&
        slot.backoff.ended();
      if (abnormal || brief) {
        slot.site.failures++;
        if (abnormal) slot.site.lastError = reason;
      }
      this.#ended(slot, reason, conn);
    });
    if (this.#stopping !== undefined || slot.site.removed) {
      slot.state = "draining";
      conn.stop("shutdown").catch(() => {});
      return conn;
    }
    slot.state = "up";
    slot.backoff?.up();
    if (again) slot.site.reconnects++;
    if (!this.#isReady) {
      this.#isReady = true;
      this.#ready.resolve();
    }
    this.#serveWaiters();
    return conn;
  }

  // A connect failed or a connection ended: reconnect (after the backoff, or as onExit decides),
  // stay down, leave the pool, or stop it.
  #ended(slot: Slot<T>, reason: unknown, conn?: Connection<T>): void {
    const draining = slot.state === "draining";
    slot.state = "down";
    if (this.#stopping === undefined && !slot.site.removed && !draining) {
      const delay = slot.backoff?.next();
      const decision = this.#onExit(slot, reason, conn, delay);
      if (decision === "restart") this.#restart(slot, 0);
      else if (typeof decision === "object") this.#restart(slot, decision.restart);
      else if (decision === "delete") this.#forget(slot);
      else if (decision === "stop") this.stop().catch(() => {});
      else if (delay !== undefined) this.#restart(slot, delay);
    }
    slot.drained?.();
    this.#checkReady();
  }

  // What onExit decides, if there is one and it answers sensibly (else the default: undefined).
  #onExit(
    slot: Slot<T>,
    reason: unknown,
    connection: Connection<T> | undefined,
    delay: number | undefined,
  ): PoolExitDecision {
    const onExit = this.#options.onExit;
    if (onExit === undefined) return undefined;
    const logger = this.#logger;
    let decision: unknown;
    try {
      decision = onExit({ address: slot.site.label, connection, reason, delay });
    } catch (err) {
      logger.error(`etcp: pool ${this.name}: onExit threw:`, err);
      return undefined;
    }
    if (
      decision === undefined || decision === "restart" || decision === "delete" ||
      decision === "stop" ||
      (typeof decision === "object" && decision !== null &&
        isFiniteDelay((decision as { restart?: unknown }).restart))
    ) return decision as PoolExitDecision;
    logger.error(
      `etcp: pool ${this.name}: onExit returned ${describeValue(decision)}, not "restart", ` +
        '{ restart: ms }, "delete", "stop" or undefined; reconnecting as by default',
    );
    return undefined;
  }

  // Take `slot` out of the pool.
  #forget(slot: Slot<T>): void {
    const at = this.#slots.indexOf(slot);
    if (at >= 0) this.#slots.splice(at, 1);
  }

  // Connect `slot` again after `ms`.
  #restart(slot: Slot<T>, ms: number): void {
    slot.state = "backing-off";
    slot.timer = startTimer(() => {
      slot.timer = undefined;
      this.#connect(slot, true).catch(() => {});
    }, ms);
  }

  // Stop a slot's backoff: it stays down.
  #cancelBackoff(slot: Slot<T>): void {
    if (slot.state !== "backing-off") return;
    clearTimer(slot.timer);
    slot.timer = undefined;
    slot.state = "down";
  }

  // Without a connection up, under way or backing off, ready can never come.
  #checkReady(): void {
    if (this.#isReady) return;
    if (
      this.#slots.some((s) =>
        s.state === "connecting" || s.state === "up" || s.state === "backing-off"
      )
    ) return;
    this.#ready.reject(this.unavailable("down"));
  }

  /**
   * Add one connection to `address` (a new address joins the pool). Resolves with it once it is
   * up; rejects with the connect's error (recorded in {@linkcode Pool.stats}), or with
   * {@linkcode PoolUnavailable} (`"stopped"`) if the pool stops, or the address is removed, while
   * it connects. With reconnection on, a slot whose first connect failed stays in the pool and
   * keeps trying.
   */
  addConnection(address: PoolAddress): Promise<Connection<T>> {
    if (this.#stopping) return Promise.reject(this.unavailable("stopped"));
    try {
      checkAddress("addConnection: address", address);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#open(this.#site(address));
  }

  /**
   * Add `n` connections: all to `address`, or spread over the pool's addresses (fewest first).
   * Resolves with those that came up; the failures are in {@linkcode Pool.stats}.
   */
  async addConnections(n: number, address?: PoolAddress): Promise<Connection<T>[]> {
    if (!Number.isInteger(n) || n < 0) {
      throw new RangeError(`addConnections: n must be an integer >= 0, not ${n}`);
    }
    const adding: Promise<Connection<T>>[] = [];
    for (let i = 0; i < n; i++) {
      if (address) adding.push(this.addConnection(address));
      else {
        const sites = [...this.#sites.values()].filter((s) => !s.removed);
        if (sites.length === 0) throw this.unavailable("down", "(no address left)");
        const count = (s: Site) => this.#slots.filter((x) => x.site === s && x.state !== "down");
        sites.sort((a, b) => count(a).length - count(b).length);
        adding.push(this.addConnection(sites[0].address));
      }
    }
    const results = await Promise.allSettled(adding);
    return results.flatMap((r) => r.status === "fulfilled" ? [r.value] : []);
  }

  /**
   * Take `address` out of the pool: its connections take no new requests, finish their calls in
   * flight and checkouts (up to `timeout`), then stop. Resolves once they have closed.
   */
  async removeAddress(address: PoolAddress, options: PoolStopOptions = {}): Promise<void> {
    const timeout = timeoutOption("removeAddress", options, 5000);
    if (timeout instanceof Error) throw timeout; // (an async method: it rejects)
    const site = this.#find(address);
    if (!site) return;
    site.removed = true;
    this.#sites.delete(site.key);
    const slots = this.#slots.filter((s) => s.site === site);
    await this.#drain(slots, "shutdown", timeout, "(its address was removed)");
    for (const s of slots) this.#forget(s);
    this.#checkReady();
  }

  // Stop taking requests on `slots`, give their work `timeout` ms, then stop their connections.
  // A connect still under way is given up: it rejects with PoolUnavailable ("stopped"), `detail`
  // saying why if the pool itself goes on.
  async #drain(slots: Slot<T>[], reason: unknown, timeout: number, detail?: string): Promise<void> {
    for (const slot of slots) this.#cancelBackoff(slot);
    const finished = slots.map((slot) => {
      if (slot.state === "up") slot.state = "draining";
      if (slot.state !== "draining" || (slot.inFlight === 0 && slot.checkedOut === undefined)) {
        return Promise.resolve();
      }
      const { promise, resolve } = Promise.withResolvers<void>();
      slot.drained = () => {
        if (slot.state === "down" || (slot.inFlight === 0 && slot.checkedOut === undefined)) {
          resolve();
        }
      };
      return promise;
    });
    // Past `timeout` the work still under way is cut short below: its TimeoutError is not an error.
    await withTimeout(Promise.all(finished), timeout, "drain").catch(() => {});
    // Connects still under way are given up (a handler's start that takes its time, say), and
    // leave nothing open.
    const givenUp = this.unavailable("stopped", detail);
    for (const slot of slots) slot.connecting?.abort(givenUp);
    await Promise.all([...this.#pending]);
    await Promise.all(
      slots.map((slot) => {
        slot.drained = undefined;
        return slot.conn && slot.state !== "down"
          ? slot.conn.stop(reason, { timeout }).catch(() => {})
          : undefined;
      }),
    );
  }

  /** The pool's open connections (up or draining). */
  connections(): Connection<T>[] {
    return this.#slots.flatMap((s) =>
      (s.state === "up" || s.state === "draining") && s.conn ? [s.conn] : []
    );
  }

  // ---- Routing -----------------------------------------------------------------------------------

  // The slot a request gets: one up and not checked out, or undefined. Every request comes through
  // here, so the usual case is one step: the slot the cursor (or a random draw) lands on is free.
  #choose(key: string | undefined, exclusive: boolean): Slot<T> | undefined {
    if (exclusive) return this.#nextFree();
    const slots = this.#slots;
    const count = slots.length;
    switch (this.#strategy) {
      case "random": {
        if (count === 0) return undefined;
        // A draw over every slot, kept if free; else a draw over the free ones: uniform over the
        // free ones either way.
        const drawn = slots[Math.floor(Math.random() * count)];
        if (isFree(drawn)) return drawn;
        let n = 0;
        for (const s of slots) if (isFree(s)) n++;
        return n === 0 ? undefined : this.#nthFree(Math.floor(Math.random() * n));
      }
      case "least-busy": {
        // The fewest in flight; of equals, the first from the cursor, which moves on by one.
        let at = this.#next < count ? this.#next : 0;
        this.#next = at + 1;
        let best: Slot<T> | undefined;
        for (let k = 0; k < count; k++, at++) {
          const s = slots[at < count ? at : at - count];
          if (isFree(s) && (best === undefined || s.inFlight < best.inFlight)) best = s;
        }
        return best;
      }
      case "hash": {
        if (key === undefined) return this.#nextFree();
        let best: Slot<T> | undefined;
        let bestScore = -1;
        for (const s of slots) {
          if (!isFree(s)) continue;
          const score = hash32(`${key}\u0000${s.id}`);
          if (score > bestScore || (score === bestScore && s.id < best!.id)) {
            best = s;
            bestScore = score;
          }
        }
        return best;
      }
      default:
        return this.#nextFree();
    }
  }

  // Round-robin: the first free slot from the cursor on; the cursor moves past it.
  #nextFree(): Slot<T> | undefined {
    const slots = this.#slots;
    const count = slots.length;
    let at = this.#next < count ? this.#next : 0; // (slots may have left the pool)
    for (let k = 0; k < count; k++) {
      const s = slots[at];
      if (++at === count) at = 0;
      if (isFree(s)) {
        this.#next = at;
        return s;
      }
    }
    return undefined;
  }

  // The `i`-th slot (from 0) that is free.
  #nthFree(i: number): Slot<T> | undefined {
    for (const s of this.#slots) if (isFree(s) && i-- === 0) return s;
    return undefined;
  }

  #keyOf(message: unknown, key?: string): string | undefined {
    if (this.#strategy !== "hash") return undefined;
    return key ?? this.#options.key!(message);
  }

  /** A `PoolUnavailable` for `reason` naming every address and its last error. */
  unavailable(reason: PoolUnavailableReason, detail?: string): PoolUnavailable {
    const addresses = [...this.#sites.values()].map((s) => ({
      address: s.label,
      lastError: s.lastError,
    }));
    return new PoolUnavailable(reason, addresses, detail);
  }

  #unavailableNow(): PoolUnavailable {
    if (this.#stopping) return this.unavailable("stopped");
    return this.#slots.some(isLive) ? this.unavailable("busy") : this.unavailable("down");
  }

  // A connection for a request: at once, or after waiting in the queue if the pool allows it.
  #acquire(key: string | undefined, exclusive: boolean, wait?: number): Promise<Slot<T>> {
    if (this.#stopping) return Promise.reject(this.unavailable("stopped"));
    const slot = this.#choose(key, exclusive);
    if (slot) return Promise.resolve(this.#take(slot, exclusive));
    const anyUp = this.#slots.some(isLive);
    // A checkout waits for a busy connection by default; nothing waits for a pool that is down
    // unless queueing was asked for.
    const timeout = wait ?? this.#acquireTimeout;
    if (timeout === 0 || !(anyUp && exclusive) && this.#acquireTimeout === 0) {
      return Promise.reject(this.#unavailableNow());
    }
    const maxQueued = exclusive && this.#maxQueued === 0 ? Infinity : this.#maxQueued;
    if (this.#waiters.length >= maxQueued) {
      return Promise.reject(this.unavailable("queue-full", `(maxQueued ${this.#maxQueued})`));
    }
    return new Promise<Slot<T>>((resolve, reject) => {
      const waiter: Waiter<T> = { exclusive, key, resolve, reject };
      waiter.timer = startTimer(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        reject(this.unavailable("timeout", `(waited ${timeout} ms)`));
      }, timeout);
      this.#waiters.push(waiter);
    });
  }

  // Mark `slot` as taken by a request (in flight) or a checkout, before anyone else can choose.
  #take(slot: Slot<T>, exclusive: boolean): Slot<T> {
    if (exclusive) slot.checkedOut = slot.conn;
    else slot.inFlight++;
    return slot;
  }

  // Hand free connections to the requests waiting, oldest first.
  #serveWaiters(): void {
    while (this.#waiters.length > 0) {
      const waiter = this.#waiters[0];
      const slot = this.#choose(waiter.key, waiter.exclusive);
      if (!slot) return;
      this.#waiters.shift();
      clearTimer(waiter.timer);
      waiter.resolve(this.#take(slot, waiter.exclusive));
    }
  }

  #done(slot: Slot<T>): void {
    if (slot.state === "draining") slot.drained?.();
    else this.#serveWaiters();
  }

  // A request on `slot` has its answer.
  #settled(slot: Slot<T>): void {
    slot.inFlight--;
    this.#done(slot);
  }

  /**
   * The connection the strategy chooses now (for `"hash"`, the one `key` lands on); throws
   * {@linkcode PoolUnavailable} if none is live.
   */
  pick(key?: string): Connection<T> {
    if (this.#stopping) throw this.unavailable("stopped");
    const slot = this.#choose(key, false);
    if (!slot) throw this.#unavailableNow();
    return slot.conn!;
  }

  /**
   * `call` on a connection chosen by the strategy (see `Connection.call`); `timeout` defaults to
   * `callTimeout`. Rejects with {@linkcode PoolUnavailable} at once if no connection is live
   * (or after `acquireTimeout` with queueing).
   */
  call<R = unknown>(message: unknown, options?: PoolCallOptions): Promise<R> {
    // Not async: a connection free now carries the call at once, and the caller waits on one
    // promise more than Connection.call's, not on an async function's frames.
    let key: string | undefined;
    let slot: Slot<T> | undefined;
    try {
      key = this.#keyOf(message, options?.key);
      if (this.#stopping === undefined) slot = this.#choose(key, false);
    } catch (err) {
      return Promise.reject(err); // the key function threw
    }
    if (slot === undefined) {
      // None free now: wait for one if the pool queues, else fail (#acquire decides).
      return this.#acquire(key, false).then((slot) => this.#callOn<R>(slot, message, options));
    }
    return this.#callOn<R>(this.#take(slot, false), message, options);
  }

  // `call` on `slot`, which counts it in flight until it settles.
  #callOn<R>(slot: Slot<T>, message: unknown, options: PoolCallOptions | undefined): Promise<R> {
    let calling: Promise<R>;
    try {
      // A call without a timeout of its own passes the pool's one options object, or none (as a
      // plain conn.call(message) does): no object per call, and no shape that Connection.call
      // sees from the pool alone (one measured a few % dearer in bench/pool_load.ts).
      calling = slot.conn!.call<R>(
        message,
        options?.timeout === undefined ? this.#callOptions : options,
      );
    } catch (err) {
      this.#settled(slot);
      return Promise.reject(err);
    }
    const timed = this.#metrics === undefined ? calling : this.#metrics.timeCall(calling);
    return timed.then(slot.fulfilled, slot.rejected) as Promise<R>;
  }

  /** `cast` to a connection chosen by the strategy; throws `PoolUnavailable` if none is live. */
  cast(message: unknown): void {
    this.pick(this.#keyOf(message)).cast(message);
  }

  /** `info` to a connection chosen by the strategy; throws `PoolUnavailable` if none is live. */
  info(message: unknown): void {
    this.pick(this.#keyOf(message)).info(message);
  }

  /** Write `data` on a connection chosen by the strategy; throws `PoolUnavailable` if none is live. */
  send(data: T | Uint8Array | string): void {
    this.pick(this.#keyOf(data)).send(data);
  }

  /**
   * Write `data` on a chosen connection; resolves once written (see `Connection.sendSync`,
   * whose `timeout` it takes).
   */
  async sendSync(data: T | Uint8Array | string, options?: SendSyncOptions): Promise<void> {
    const slot = await this.#acquire(this.#keyOf(data), false);
    try {
      await slot.conn!.sendSync(data, options);
    } finally {
      this.#settled(slot);
    }
  }

  /**
   * Check a connection out for `fn` alone: no other `withConnection` gets it, and the pool
   * routes no request to it, until `fn` returns or throws. Waits up to `timeout` ms for one to
   * come free; rejects with {@linkcode PoolUnavailable} at once if none is up (unless the pool
   * queues).
   */
  async withConnection<R>(
    fn: (conn: Connection<T>) => R | Promise<R>,
    options: CheckoutOptions = {},
  ): Promise<R> {
    const timeout = timeoutOption("withConnection", options, this.#acquireTimeout || 5000);
    if (timeout instanceof Error) throw timeout; // (an async method: it rejects)
    const slot = await this.#acquire(undefined, true, timeout);
    const conn = slot.conn!;
    try {
      return await fn(conn);
    } finally {
      // (If the slot has reconnected meanwhile, its new connection may be out with another.)
      if (slot.checkedOut === conn) slot.checkedOut = undefined;
      this.#done(slot);
    }
  }

  // ---- Stats and stopping ----------------------------------------------------------------------

  /**
   * Per address: connections by state, calls in flight, checkouts, failures, reconnects; requests
   * queued; failures and reconnects in all; and, over every connection the pool has had, those
   * hibernating now, those closed by reason, and bytes and frames in and out.
   */
  stats(): PoolStats {
    const sample = this.#sample();
    const addresses = [...this.#sites.values()].map((site) => {
      const slots = this.#slots.filter((s) => s.site === site);
      const count = (state: PoolConnectionState) => slots.filter((s) => s.state === state).length;
      const stats: PoolAddressStats = {
        address: site.label,
        connecting: count("connecting"),
        up: count("up"),
        draining: count("draining"),
        backingOff: count("backing-off"),
        down: count("down"),
        inFlight: slots.reduce((n, s) => n + s.inFlight, 0),
        checkedOut: slots.filter((s) => s.checkedOut !== undefined).length,
        failures: site.failures,
        reconnects: site.reconnects,
      };
      if (site.lastError !== undefined) stats.lastError = site.lastError;
      return stats;
    });
    return {
      name: this.name,
      addresses,
      inFlight: addresses.reduce((n, a) => n + a.inFlight, 0),
      queued: this.#waiters.length,
      reconnects: addresses.reduce((n, a) => n + a.reconnects, 0),
      failures: addresses.reduce((n, a) => n + a.failures, 0),
      hibernated: sample.hibernated,
      closedByReason: this.#closedTotals.reasons(),
      bytesIn: sample.bytesIn,
      bytesOut: sample.bytesOut,
      framesIn: sample.framesIn,
      framesOut: sample.framesOut,
    };
  }

  // The open connections' counts added to the closed ones' (and the metrics' reconnects).
  #sample(): MetricsSample & { reconnects: number } {
    let reconnects = 0;
    for (const site of this.#sites.values()) reconnects += site.reconnects;
    const open = this.connections().map((conn) => conn.stats());
    return { ...this.#closedTotals.withOpen(open), reconnects };
  }

  /**
   * Stop the pool: new requests and those waiting fail with `PoolUnavailable` (`"stopped"`);
   * calls in flight and checkouts have `timeout` ms to finish, then every connection is stopped
   * (what is still in flight rejects with `ConnectionClosed`). Slots backing off stop waiting at
   * once; connects under way are then given up (see `ConnectOptions.signal`), a handler's start
   * that takes its time included. Resolves once all are closed; no timer or socket is left.
   */
  stop(reason: unknown = "shutdown", options: PoolStopOptions = {}): Promise<void> {
    const timeout = timeoutOption("stop", options, 5000);
    if (timeout instanceof Error) return Promise.reject(timeout);
    this.#stopping ??= (async () => {
      for (const waiter of this.#waiters.splice(0)) {
        clearTimer(waiter.timer);
        waiter.reject(this.unavailable("stopped"));
      }
      await this.#drain([...this.#slots], reason, timeout);
      if (!this.#isReady) this.#ready.reject(this.unavailable("stopped"));
      this.#metrics?.stop();
    })();
    return this.#stopping;
  }

  /** Stops the pool (`await using pool = await createPool(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}
