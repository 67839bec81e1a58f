/**
 * `serve()`: listen, accept, and drive one handler generator per connection.
 *
 * @module
 */

import type { FrameOf, Handler } from "./actions.ts";
import type { Connection, Logger, Mode, StopOptions } from "./connection.ts";
import { describeReason } from "./errors.ts";
import type { Framing, FramingFor } from "./framing.ts";
import { defaultRegistry, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import { withProxyProtocol } from "./transport/proxy.ts";
import type { Addr, Conn, Listener, Transport } from "./transport/transport.ts";
import { type CodeChange, Driver, type DriverOptions } from "./_driver.ts";
import { closeQuietly } from "./_socket.ts";
import { checkConnectionSettings, checkHandler, driverOptions, OptionCheck } from "./_options.ts";
import { withTimeout } from "./_with_timeout.ts";

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
   * Called once listening, with the address (etcp's `listen_init`). If it throws, the server
   * closes and `serve()` rejects with that error.
   */
  onListen?: (addr: A) => void;
  /** Called when a connection starts, before its handler runs (Node's `"connection"` event). */
  onConnection?: (conn: Connection<T>) => void;
  /** Called when a connection has closed, with its reason (also on `conn.closed`). */
  onClose?: (conn: Connection<T>, reason: unknown) => void;
  /** Stop the server when this signal aborts. */
  signal?: AbortSignal;
  /** Where connections' ends and accept troubles are reported (default `console`). */
  logger?: Logger;
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

/** Options of {@linkcode Server.upgrade}. */
export interface UpgradeOptions {
  /** Turns each hibernated connection's state into the new handler's state. */
  codeChange?: CodeChange;
}

interface Acceptor<A extends Addr> {
  info: AcceptorInfo;
  listener: Listener<A>;
}

let servers = 0;

/**
 * A listening server. Made by {@linkcode serve}.
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
  // (Held without its address type, which only onListen uses: a Server<T, Deno.NetAddr> is a
  // Server<T, Addr>.)
  readonly #options: ServeOptions<T, Addr>;
  readonly #acceptors: Acceptor<A>[] = [];
  readonly #loops: Promise<void>[] = []; // the acceptors' loops, which stop() waits for
  readonly #drivers = new Map<string, Driver<T>>();
  readonly #handshaking = new Set<Conn>(); // accepted, transport handshake under way
  #status: ServerStatus = "running";
  #max: number;
  #gate!: { promise: Promise<void>; open(): void };
  #stopping: Promise<void> | null = null;
  // One settings object shared by every connection of this server.
  readonly #driverOptions: DriverOptions<T>;

  /** Made by {@linkcode serve}; not constructed directly. */
  constructor(handler: Handler<T>, options: ServeOptions<T, A>, listeners: Listener<A>[]) {
    this.#handler = handler;
    this.#options = options as unknown as ServeOptions<T, Addr>;
    this.name = options.name ?? `server-${++servers}`;
    this.registry = options.registry ?? defaultRegistry;
    this.#max = options.maxConnections ?? 1024;
    this.finished = new Promise((resolve) => this.#resolveFinished = resolve);
    this.#renewGate();
    const onClose = options.onClose;
    this.#driverOptions = driverOptions(options, {
      registry: this.registry,
      owner: this.name,
      kind: "server",
      handshakeTimeout: options.handshakeTimeout ?? 10_000,
      onClose: (conn) => {
        this.#drivers.delete(conn.id);
        this.#openGate();
        if (onClose) this.#callHook("onClose", () => onClose(conn, conn.closeReason));
      },
    });
    listeners.forEach((listener, id) => {
      this.#acceptors.push({
        listener,
        info: { id, addr: listener.addr, state: "accepting" as const, accepted: 0 },
      });
    });
  }

  /** Start the acceptors (once `onListen` has agreed). */
  start(): void {
    for (const acceptor of this.#acceptors) this.#loops.push(this.#acceptLoop(acceptor));
  }

  /** The address of the (first) listening socket, with the real port (`server.addr.port` over TCP). */
  get addr(): A {
    return this.#acceptors[0].listener.addr;
  }

  /** `"running"`, `"suspended"`, `"stopping"` or `"stopped"`. */
  get status(): ServerStatus {
    return this.#status;
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

  /** The live connections. */
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
        : this.#status === "suspended"
        ? "suspended"
        : this.#count >= this.#max
        ? "waiting"
        : "accepting",
    }));
  }

  /**
   * Stop accepting, but keep the listening socket: new peers wait in the backlog until
   * {@linkcode Server.resume}. Live connections go on.
   */
  suspend(): void {
    if (this.#status === "running") this.#status = "suspended";
  }

  /** Accept again after {@linkcode Server.suspend}. */
  resume(): void {
    if (this.#status === "suspended") {
      this.#status = "running";
      this.#openGate();
    }
  }

  /**
   * Switch to new code: new connections run `handler`; hibernated ones switch at their next
   * wake (after `codeChange(state)`); live ones get an `upgrade` event and switch when they
   * next hibernate.
   */
  upgrade(handler: Handler<T>, options: UpgradeOptions = {}): void {
    this.#handler = handler;
    for (const driver of this.#drivers.values()) driver.upgrade(handler, options.codeChange);
  }

  /**
   * Stop accepting, send `shutdown` to every connection, wait up to `timeout` ms (default the
   * server's `shutdownTimeout`) for them to end, then force the rest. Resolves when all closed.
   */
  stop(reason: unknown = "shutdown", options: StopOptions = {}): Promise<void> {
    if (this.#stopping) {
      // Already stopping: a shorter timeout given now still wins (the earliest deadline).
      if (options.timeout !== undefined) {
        for (const driver of this.#drivers.values()) driver.shutdown(reason, options.timeout);
      }
      return this.#stopping;
    }
    this.#status = "stopping";
    const timeout = options.timeout ?? this.#options.shutdownTimeout;
    // The acceptors' loops end once their pending accept has failed on the closed listener:
    // only then is the listening socket really gone (and new connects refused).
    for (const socket of this.#handshaking) closeQuietly(socket); // the handshake fails
    this.#stopping = Promise.all([
      ...Array.from(this.#drivers.values(), (d) => d.shutdown(reason, timeout)),
      ...this.#loops,
    ]).then(() => {
      this.#status = "stopped";
      this.#resolveFinished();
    });
    for (const acceptor of this.#acceptors) {
      acceptor.info.state = "stopped";
      try {
        acceptor.listener.close();
      } catch { /* already closed */ }
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
    for (const { listener } of this.#acceptors) listener.unref?.();
  }

  /** Let the listening sockets keep the process alive again (the default), after `unref()`. */
  ref(): void {
    for (const { listener } of this.#acceptors) listener.ref?.();
  }

  /** Stops the server (`await using server = await serve(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

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

  #closedFor(info: AcceptorInfo): boolean {
    if (this.#status === "suspended") {
      info.state = "suspended";
      return true;
    }
    if (this.#count >= this.#max) {
      info.state = "waiting";
      return true;
    }
    return false;
  }

  // Live connections, and those still in their transport handshake: both count against
  // maxConnections.
  get #count(): number {
    return this.#drivers.size + this.#handshaking.size;
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

  async #accepting({ info, listener }: Acceptor<A>): Promise<void> {
    let backoff = 0;
    while (this.#stopping === null) {
      while (this.#closedFor(info)) {
        await this.#gate.promise;
        if (this.#stopping !== null) return;
      }
      info.state = "accepting";
      let socket: Conn;
      try {
        socket = await listener.accept();
        backoff = 0;
      } catch (err) {
        if (this.#stopping !== null) return;
        // A peer that reset before it was accepted: that connection is gone, not the listener.
        // Go on at once and quietly (as Ranch does): no log, no backoff stalling the others.
        if (isPeerGone(err)) continue;
        // Out of file descriptors and the like: wait a little and go on accepting.
        backoff = Math.min(1000, backoff * 2 || 10);
        this.#logger.error(`etcp: server ${this.name}: accept failed, retrying:`, err);
        await new Promise((resolve) => setTimeout(resolve, backoff));
        continue;
      }
      // Suspended or full since accept was called: hold the socket, as the backlog would.
      while (this.#stopping === null && this.#closedFor(info)) await this.#gate.promise;
      if (this.#stopping !== null) {
        closeQuietly(socket);
        return;
      }
      info.accepted++;
      this.#startConnection(socket);
    }
  }

  get #logger(): Logger {
    return this.#options.logger ?? console;
  }

  // Run a user's hook; what it throws is reported, never taken out on the server.
  #callHook(name: string, hook: () => void): void {
    try {
      hook();
    } catch (err) {
      this.#logger.error(`etcp: server ${this.name}: ${name} threw:`, err);
    }
  }

  #startConnection(socket: Conn): void {
    if (this.#options.proxyProtocol) socket = withProxyProtocol(socket); // reads the header first
    if (socket.handshake === undefined) return this.#runConnection(socket);
    // Off the acceptor: a peer that stalls its handshake holds only its own socket.
    this.#handshaking.add(socket);
    withTimeout(socket.handshake(), this.#options.handshakeTimeout ?? 10_000, "handshake").then(
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
 */
// deno-lint-ignore no-explicit-any
export async function serve<H extends Handler<any>, A extends Addr = Deno.NetAddr>(
  handler: H,
  options?: ServeOptions<FrameOf<H>, A> & FramingFor<FrameOf<H>>,
): Promise<Server<FrameOf<H>, A>> {
  type T = FrameOf<H>;
  options ??= {} as ServeOptions<T, A> & FramingFor<T>;
  checkServeOptions(handler, options);
  const transport = options.transport ?? tcp();
  const count = options.acceptors ?? 1;
  const reusePort = options.reusePort || count > 1 || undefined;
  const first = await transport.listen({
    hostname: options.hostname,
    port: options.port ?? 0,
    reusePort,
  });
  const listeners = [first];
  try {
    const port = "port" in first.addr ? first.addr.port : options.port;
    for (let i = 1; i < count; i++) {
      listeners.push(await transport.listen({ hostname: options.hostname, port, reusePort }));
    }
  } catch (err) {
    for (const listener of listeners) listener.close();
    throw err;
  }
  const server = new Server<T, A>(handler, options, listeners as Listener<A>[]);
  if (options.onListen) {
    try {
      options.onListen(server.addr);
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
  const { proxyProtocol, transport } = options as ServeOptions;
  if (proxyProtocol && transport?.name === "tls") {
    // The header comes in plain text before the ClientHello, but the tls() transport has done
    // the handshake by then: terminate TLS in front (HAProxy does), or serve plain TCP.
    throw new TypeError(
      "serve: proxyProtocol with the tls() transport is not supported: the PROXY header " +
        "precedes the TLS handshake; let the proxy terminate TLS, or use tcp()",
    );
  }
  check.function("onListen");
  check.function("onConnection");
  check.function("onClose");
  check.signal("signal");
  checkConnectionSettings(check);
}
