/**
 * `serve()`: listen, accept, and drive one handler generator per connection.
 *
 * @module
 */

import type { Handler } from "./actions.ts";
import {
  closeQuietly,
  type CodeChange,
  type Connection,
  createConnection,
  type DriverControl,
  type DriverOptions,
  driverOptions,
  type Logger,
  type Mode,
  type StopOptions,
} from "./connection.ts";
import type { Framing } from "./framing.ts";
import { defaultRegistry, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import type { Addr, Conn, Listener, Transport } from "./transport/transport.ts";
import { withTimeout } from "./_with_timeout.ts";

/** Options of {@linkcode serve}. */
export interface ServeOptions<T = Uint8Array> {
  /** Port to listen on (default 0: any free port; see `server.addr`). */
  port?: number;
  /** Address to bind (default `"0.0.0.0"`). */
  hostname?: string;
  /** How to listen (default `tcp()`). */
  transport?: Transport;
  /** How bytes become frames (default `raw()`). */
  framing?: Framing<T>;
  /** `"active"` (default) or `"passive"`. */
  mode?: Mode;
  /** Active mode: frames a connection's mailbox may hold before reading pauses (default 1: read on once the handler has acted on every frame read). */
  highWaterMark?: number;
  /** Listening sockets accepting in parallel (default 1; more than 1 uses `reusePort`). */
  acceptors?: number;
  /** At this many connections, stop accepting until one ends (default 1024; `Infinity` for none). */
  maxConnections?: number;
  /** Milliseconds a transport handshake (TLS) may take (default 10000). */
  handshakeTimeout?: number;
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
  /** Where connections are recorded (default: the process's memory registry). */
  registry?: Registry;
  /** This server's name: the `owner` of its connections in the registry. */
  name?: string;
  /** Let other sockets bind the same address (Linux). */
  reusePort?: boolean;
  /** Called once listening, with the address (etcp's `listen_init`). */
  onListen?: (addr: Addr) => void;
  /** Stop the server when this signal aborts. */
  signal?: AbortSignal;
  /** Where abnormal ends are reported (default `console`). */
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

interface Acceptor {
  info: AcceptorInfo;
  listener: Listener;
}

let servers = 0;

/**
 * A listening server. Made by {@linkcode serve}.
 */
export class Server<T = Uint8Array> {
  /** This server's name, the `owner` of its connections in the registry. */
  readonly name: string;
  /** Where its connections are recorded. */
  readonly registry: Registry;
  /** Resolves once the server has stopped and every connection has closed. */
  readonly finished: Promise<void>;
  #resolveFinished!: () => void;
  #handler: Handler<T>;
  readonly #options: ServeOptions<T>;
  readonly #acceptors: Acceptor[] = [];
  readonly #loops: Promise<void>[] = []; // the acceptors' loops, which stop() waits for
  readonly #drivers = new Map<string, DriverControl<T>>();
  #status: ServerStatus = "running";
  #max: number;
  #gate!: { promise: Promise<void>; open(): void };
  #stopping: Promise<void> | null = null;
  // One settings object shared by every connection of this server.
  readonly #driverOptions: DriverOptions<T>;

  /** Made by {@linkcode serve}; not constructed directly. */
  constructor(handler: Handler<T>, options: ServeOptions<T>, listeners: Listener[]) {
    this.#handler = handler;
    this.#options = options;
    this.name = options.name ?? `server-${++servers}`;
    this.registry = options.registry ?? defaultRegistry;
    this.#max = options.maxConnections ?? 1024;
    this.finished = new Promise((resolve) => this.#resolveFinished = resolve);
    this.#renewGate();
    this.#driverOptions = driverOptions(options, {
      registry: this.registry,
      owner: this.name,
      kind: "server",
      idleTimeout: options.idleTimeout,
      onClose: (conn) => {
        this.#drivers.delete(conn.id);
        this.#openGate();
      },
    });
    listeners.forEach((listener, id) => {
      const acceptor = {
        listener,
        info: { id, addr: listener.addr, state: "accepting" as const, accepted: 0 },
      };
      this.#acceptors.push(acceptor);
      this.#loops.push(
        this.#acceptLoop(acceptor).catch((err) =>
          this.#logger.error(`etcp: server ${this.name}: acceptor ${id} failed:`, err)
        ),
      );
    });
  }

  /** The address of the (first) listening socket, with the real port. */
  get addr(): Addr {
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
    if (!(value >= 0)) throw new RangeError(`maxConnections must be >= 0, not ${value}`);
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
        : this.#drivers.size >= this.#max
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
    if (this.#stopping) return this.#stopping;
    this.#status = "stopping";
    const timeout = options.timeout ?? this.#options.shutdownTimeout;
    // The acceptors' loops end once their pending accept has failed on the closed listener:
    // only then is the listening socket really gone (and new connects refused).
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
    if (this.#drivers.size >= this.#max) {
      info.state = "waiting";
      return true;
    }
    return false;
  }

  async #acceptLoop({ info, listener }: Acceptor): Promise<void> {
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

  #startConnection(socket: Conn): void {
    const options = this.#options;
    const driver = createConnection(socket, this.#handler, this.#driverOptions);
    this.#drivers.set(driver.handle.id, driver);
    const handshake = (socket as { handshake?: () => Promise<unknown> }).handshake;
    if (typeof handshake !== "function") {
      driver.start();
      return;
    }
    withTimeout(handshake.call(socket), options.handshakeTimeout ?? 10_000, "handshake").then(
      () => this.#stopping !== null ? driver.shutdown("shutdown", 0) : driver.start(),
      (err) => {
        this.#logger.error(`etcp: server ${this.name}: handshake failed:`, err);
        this.#drivers.delete(driver.handle.id);
        closeQuietly(socket);
        this.#openGate();
      },
    );
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
 * @example An echo server for length-prefixed frames
 * ```ts
 * import { lengthPrefixed, send, serve } from "./mod.ts";
 * const server = await serve(async function* () {
 *   let ev = yield;
 *   for (;;) {
 *     if (ev.type === "packet") ev = yield send(ev.data);
 *     else if (ev.type === "disconnect" || ev.type === "shutdown") return;
 *     else ev = yield;
 *   }
 * }, { port: 0, hostname: "127.0.0.1", framing: lengthPrefixed(4) });
 * console.log("listening on", server.addr);
 * await server.stop();
 * ```
 */
export async function serve<T = Uint8Array>(
  handler: Handler,
  options: ServeOptions<T> = {},
): Promise<Server<T>> {
  const transport = options.transport ?? tcp();
  const count = Math.max(1, options.acceptors ?? 1);
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
  const server = new Server(handler, options, listeners);
  options.onListen?.(server.addr);
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
