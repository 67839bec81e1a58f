/**
 * The driver: one handler generator per connection, its mailbox, timers, framing, writes and
 * hibernation; and {@linkcode Connection}, the handle everyone else holds.
 *
 * @module
 */

import type { Action, Event, From, Handler, Yielded } from "./actions.ts";
import { ConnectionClosed, describeReason, ProtocolError, TimeoutError } from "./errors.ts";
import { type Decoder, type Framing, raw } from "./framing.ts";
import type { Registry, RegistryEntry } from "./registry.ts";
import type { Addr, Conn } from "./transport/transport.ts";
import { WriteBuffer } from "./_write_buffer.ts";

/** Where the library reports connections that end abnormally. `console` fits. */
export interface Logger {
  /** Report an error. */
  error(...data: unknown[]): void;
}

/** `"active"` delivers frames as they arrive; `"passive"` only on `recv`. */
export type Mode = "active" | "passive";

/** Options of {@linkcode Connection.call}. */
export interface CallOptions {
  /** Milliseconds to wait for the reply (default 5000). */
  timeout?: number;
}

/** Options of {@linkcode Connection.stop}. */
export interface StopOptions {
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  timeout?: number;
}

/** Changes a hibernated connection's state when it switches to new code. */
export type CodeChange = (state: unknown) => unknown;

/** Settings the server or client gives each of its connections. */
export interface DriverOptions<T> {
  framing: Framing<T>;
  mode: Mode;
  highWaterMark: number;
  registry: Registry;
  owner: string;
  kind: RegistryEntry["kind"];
  logger: Logger;
  shutdownTimeout: number;
  idleTimeout?: number;
  onClose?: (conn: Connection<T>) => void;
}

// The smallest and largest read buffers: reads start small (idle connections cost little) and
// grow while reads fill them.
const MIN_READ = 1024;
const MAX_READ = 64 * 1024;
const SHRINK_AFTER = 16;
// Pending output past which the handler is not resumed until the peer has read some.
const WRITE_HIGH_WATER = 1024 * 1024;
// Output buffers larger than this are released after writing rather than kept.
const KEEP_WRITE_BUFFER = 64 * 1024;
// How long a normal close waits for pending output to reach the socket.
const LINGER_MS = 5000;

type Timer = ReturnType<typeof setTimeout>;

// Shared by every connection until it needs an array of its own, so that idle connections
// stay small. Frozen: a push onto it would be a bug, and throws.
const NONE: never[] = Object.freeze([]) as unknown as never[];

let nextConnection = 0;
let nextCall = 0;

interface PendingCall {
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: Timer;
}

interface SyncWaiter {
  at: number; // resolve once this many bytes have been written
  resolve(): void;
  reject(err: Error): void;
}

const enum Run {
  Continue,
  Stop,
  Hibernate,
}

function isPromise<V>(value: V | Promise<V>): value is Promise<V> {
  return typeof (value as { then?: unknown })?.then === "function";
}

/**
 * A live connection: given to its handler as `conn`, returned by `connect()`, listed by
 * servers and registries. Messages sent with `call`, `cast` and `info` become events of its
 * handler; `send` writes to its socket.
 *
 * @example
 * ```ts
 * import { connect, memory, reply, serve } from "./mod.ts";
 * const transport = memory("conn-doc");
 * const server = await serve(async function* () {
 *   let ev = yield;
 *   for (;;) ev = ev.type === "call" ? yield reply(ev.from, "pong") : yield;
 * }, { transport });
 * const client = await connect(async function* () {}, { transport });
 * const [conn] = server.connections();
 * console.assert(await conn.call("ping") === "pong");
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
    this.id = `c${++nextConnection}`;
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

  /** Resolves with the reason once the connection has closed (`"normal"` for a clean end). */
  get closed(): Promise<unknown> {
    return this.#driver.closed;
  }

  /** Whether the handler is hibernating. */
  get hibernating(): boolean {
    return this.#driver.hibernating;
  }

  /** Encode and write `data` (etcp's `send_async`): queued in order, returns at once. */
  send(data: T | Uint8Array | string): void {
    this.#driver.sendFromOutside(data, false);
  }

  /** Encode and write `data`; resolves once it has been written to the socket. */
  sendSync(data: T | Uint8Array | string): Promise<void> {
    return this.#driver.sendFromOutside(data, true)!;
  }

  /**
   * Send `message` as a `call` event and wait for the handler's `reply`. Rejects with
   * `TimeoutError` after `timeout` ms, or `ConnectionClosed` if the connection ends first.
   */
  call<R = unknown>(message: unknown, options: CallOptions = {}): Promise<R> {
    return this.#driver.call(message, options.timeout ?? 5000) as Promise<R>;
  }

  /** Send `message` as a `cast` event. */
  cast(message: unknown): void {
    this.#driver.deliver({ type: "cast", message });
  }

  /** Send `message` as an `info` event. */
  info(message: unknown): void {
    this.#driver.deliver({ type: "info", message });
  }

  /**
   * Ask the handler to finish (a `shutdown` event with `reason`); after `timeout` ms it is
   * forced (its `finally` runs, the socket closes). Resolves once closed.
   */
  stop(reason: unknown = "normal", options: StopOptions = {}): Promise<void> {
    return this.#driver.shutdown(reason, options.timeout);
  }

  /** Register `name` for this connection in its registry: true if it was free (or already ours). */
  register(name: string): Promise<boolean> {
    return this.#driver.register(name);
  }

  /** Stops the connection (`await using conn = await connect(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/** Internal: what servers see of a connection beyond its handle. */
export interface DriverControl<T> {
  readonly handle: Connection<T>;
  start(): void;
  upgrade(handler: Handler<T>, codeChange?: CodeChange): void;
  shutdown(reason: unknown, timeout?: number): Promise<void>;
  readonly closed: Promise<unknown>;
}

/** The settings a server or client passes on to each connection, as its options give them. */
export interface ConnectionSettings<T> {
  framing?: Framing<T>;
  mode?: Mode;
  highWaterMark?: number;
  shutdownTimeout?: number;
  logger?: Logger;
}

/** Driver options from a server's or client's settings, with the defaults both share. */
export function driverOptions<T>(
  settings: ConnectionSettings<T>,
  owned: Pick<DriverOptions<T>, "registry" | "owner" | "kind" | "idleTimeout" | "onClose">,
): DriverOptions<T> {
  return {
    framing: settings.framing ?? (raw() as unknown as Framing<T>),
    mode: settings.mode ?? "active",
    highWaterMark: settings.highWaterMark ?? 1,
    logger: settings.logger ?? console,
    shutdownTimeout: settings.shutdownTimeout ?? 5000,
    ...owned,
  };
}

/** Close a socket that may be closed already. */
export function closeQuietly(socket: Conn): void {
  try {
    socket.close();
  } catch { /* already closed */ }
}

/** Make a connection driven by `handler` over `socket`, not yet started. */
export function createConnection<T>(
  socket: Conn,
  handler: Handler<T>,
  options: DriverOptions<T>,
): DriverControl<T> {
  return new Driver(socket, handler, options);
}

class Driver<T> implements DriverControl<T> {
  readonly socket: Conn;
  readonly handle: Connection<T>;
  name: string | undefined;
  #closed: Promise<unknown> | null = null; // made when first asked for
  #resolveClosed: ((reason: unknown) => void) | null = null;
  #settled = false;
  readonly #opts: DriverOptions<T>;
  #handler: Handler<T>;
  #upgradeTo: { handler: Handler<T>; codeChange?: CodeChange } | null = null;
  #gen: AsyncGenerator<Yielded, void, Event<T>> | Generator<Yielded, void, Event<T>> | null = null;
  #busy = false; // inside a step of the handler
  #done = false;
  #forced: { reason: unknown } | null = null;
  #badInput: { reason: unknown } | null = null; // a framing error, once the frames before it are taken
  #stopReason: unknown = "normal";
  #state: unknown = undefined;
  hibernating = false;

  // Mailbox.
  #queue: Array<Event<T> | undefined> = NONE;
  #head = 0;
  #packets = 0; // packets in the queue, for flow control
  #waiting = false; // the handler waits for an event
  #blocked = false; // the handler waits for its output to drain
  #ending = false;

  // Reading.
  readonly #decoder: Decoder<T>;
  readonly #emit: (frame: T) => void;
  #readBuf: Uint8Array | null = null;
  #parkBuf: Uint8Array | null = null;
  #reading = false;
  #readerPaused = false; // frames were read: the next read waits for the handler
  #pushed = 0; // frames decoded so far
  #eof = false;
  #disconnected = false;
  #recvWanted = false;
  #recvTimer: Timer | undefined;
  #frames: T[] = NONE; // passive mode: decoded frames not yet asked for

  // Writing.
  #out = new WriteBuffer();
  #spare = new WriteBuffer();
  #writing = false;
  #writeBroken = false;
  #queued = 0; // bytes ever queued
  #written = 0; // bytes ever written
  #syncWaiters: SyncWaiter[] = NONE;
  #drainWaiters: Array<() => void> = NONE;

  // Timers.
  #deadline = Infinity; // of the event timeout
  #eventTimer: Timer | undefined;
  #eventTimerAt = Infinity;
  #named: Map<string, Timer> | null = null; // made on first use: idle connections stay small
  #calls: Map<number, PendingCall> | null = null;
  #forceTimer: Timer | undefined;
  #forceAt = Infinity; // when a shutdown in progress will be forced (bounds the linger too)
  #armedTimeout = false; // the current step armed the event timeout itself
  #idleArmed = false; // the armed event timeout is the idle timeout
  readonly #idleMs: number | undefined;
  #timedOut = false; // the shutdown timeout forced the end: pending output is dropped

  constructor(socket: Conn, handler: Handler<T>, opts: DriverOptions<T>) {
    this.socket = socket;
    this.#handler = handler;
    this.#opts = opts;
    this.handle = new Connection<T>(this);
    this.#decoder = opts.framing.decoder();
    this.#idleMs = opts.idleTimeout;
    this.#emit = (frame: T) => {
      this.#pushed++;
      if (this.#opts.mode === "passive") {
        if (this.#frames === NONE) this.#frames = [];
        this.#frames.push(frame);
      } else this.#push({ type: "packet", data: frame });
    };
  }

  get closed(): Promise<unknown> {
    if (this.#closed === null) {
      this.#closed = this.#settled
        ? Promise.resolve(this.#closeReason)
        : new Promise((resolve) => this.#resolveClosed = resolve);
    }
    return this.#closed;
  }

  start(): void {
    const { registry, owner, kind } = this.#opts;
    const socket = this.socket;
    try {
      const added = registry.add({
        id: this.handle.id,
        owner,
        kind,
        node: registry.node,
        remoteAddr: socket.remoteAddr,
        localAddr: socket.localAddr,
        startedAt: Date.now(),
      }, this.handle);
      if (isPromise(added)) added.catch((err) => this.#opts.logger.error("etcp: registry", err));
    } catch (err) {
      this.#opts.logger.error("etcp: registry", err);
    }
    if (this.#opts.mode === "active") this.#read();
    this.#loop(undefined);
  }

  // ---- The handler's loop ------------------------------------------------------------------
  //
  // No long-lived async function: the handler is stepped while it has events to act on, and
  // the loop simply returns when it waits (`#waiting`) or an async step is pending (`#busy`).
  // A plain `function*` handler thus runs a whole mailbox without a single promise.

  // Step the handler with `input` (undefined: a new generator's first step), and on while
  // events are at hand.
  #loop(input: Event<T> | undefined): void {
    while (!this.#ending) {
      if (this.#gen === null) {
        // Start, or wake from hibernation: the new generator runs to its first yield, whose
        // actions are performed; the waking event (`input`) is then its first event.
        if (this.hibernating) {
          this.#unshift(input!);
          this.hibernating = false;
          const upgrade = this.#upgradeTo;
          if (upgrade) {
            this.#upgradeTo = null;
            this.#handler = upgrade.handler;
            if (upgrade.codeChange) this.#state = upgrade.codeChange(this.#state);
          }
        }
        try {
          this.#gen = this.#handler(this.handle, this.#state);
        } catch (err) {
          return this.#end(err);
        }
        if (typeof this.#gen?.next !== "function") {
          const got = describeReason(this.#gen);
          this.#gen = null;
          return this.#end(new ProtocolError(`handler returned ${got}: not a generator`));
        }
        input = undefined;
      }
      let step: IteratorResult<Yielded, void> | Promise<IteratorResult<Yielded, void>>;
      try {
        step = this.#gen.next(input!);
      } catch (err) {
        this.#gen = null; // it threw: it is done, its finally has run
        return this.#end(err);
      }
      if (isPromise(step)) {
        this.#async = true;
        this.#busy = true;
        step.then(
          this.#onStep ??= (s) => this.#stepped(s),
          this.#onStepError ??= (e) => {
            this.#busy = false;
            this.#gen = null;
            if (!this.#done) this.#end(e);
          },
        );
        return;
      }
      const next = this.#afterStep(step);
      if (next === undefined) return;
      input = next;
    }
  }

  #onStep: ((step: IteratorResult<Yielded, void>) => void) | null = null;
  #onStepError: ((err: unknown) => void) | null = null;

  #stepped(step: IteratorResult<Yielded, void>): void {
    this.#busy = false;
    if (this.#done) return; // forced while the handler was busy
    const next = this.#afterStep(step);
    if (next !== undefined) this.#loop(next);
  }

  // Perform a step's actions; return the next event, or undefined when the handler must wait
  // (or the connection ends).
  #afterStep(step: IteratorResult<Yielded, void>): Event<T> | undefined {
    if (step.done) {
      this.#gen = null;
      // (A framing error not yet reached still names the end: the input was bad.)
      const ended = this.#forced ?? this.#badInput;
      this.#end(ended ? ended.reason : "normal");
      return undefined;
    }
    this.#armedTimeout = false;
    let outcome: Run;
    try {
      outcome = this.#perform(step.value);
    } catch (err) {
      this.#end(err);
      return undefined;
    }
    // The default event timeout: a connection that hears nothing for idleTimeout ms is
    // asked to shut down, unless its handler armed an event timeout of its own.
    if (this.#idleMs !== undefined && !this.#armedTimeout) this.#armIdle();
    if (outcome === Run.Stop) {
      this.#end(this.#stopReason);
      return undefined;
    }
    if (outcome === Run.Hibernate) {
      this.#gen = null; // dropped: its finally does not run
      this.hibernating = true;
      this.#releaseBuffers();
    } else if (this.#out.length >= KEEP_WRITE_BUFFER) {
      this.#flush();
    } else if (this.#out.length > 0 && this.#async && this.#head < this.#queue.length) {
      // More events are queued, so this is not written before the handler next waits. An
      // async handler may await something long on the way: make sure output goes out then.
      this.#flushLater();
    }
    if (this.#queued - this.#written > WRITE_HIGH_WATER) {
      // The peer reads slower than the handler writes: hold the handler until it catches up.
      this.#flush();
      if (this.#writing) {
        this.#blocked = true;
        return undefined;
      }
    }
    return this.#nextOrWait();
  }

  // The next event, or undefined after arranging to be woken when one comes.
  #nextOrWait(): Event<T> | undefined {
    if (this.#forced) {
      this.#end(this.#forced.reason);
      return undefined;
    }
    this.#resumeReader();
    const ev = this.#take();
    if (ev !== undefined) return ev;
    if (this.#badInput !== null) {
      this.#forced = this.#badInput;
      this.#end(this.#forced.reason);
      return undefined;
    }
    this.#flush();
    this.#waiting = true;
    return undefined;
  }

  // Go on after waiting (an event came) or being blocked (output drained).
  #continue(): void {
    this.#waiting = false;
    this.#blocked = false;
    const ev = this.#nextOrWait();
    if (ev !== undefined) this.#loop(ev);
  }

  // End the connection: run the handler's finally, then close. Once.
  #end(reason: unknown): void {
    if (this.#ending) return;
    this.#ending = true;
    this.#waiting = false;
    // A finally that throws replaces the reason (as a throw from finally does in JavaScript,
    // and a crashing terminate/2 in Erlang): that error is the close reason, logged once.
    this.#closeGenerator().then((thrown) =>
      this.#finish(thrown ? thrown.error : reason, this.#timedOut)
    );
  }

  // Run the handler's finally (gen.return()); what it throws is returned, not thrown.
  async #closeGenerator(): Promise<{ error: unknown } | undefined> {
    const gen = this.#gen;
    this.#gen = null;
    if (!gen) return;
    try {
      await gen.return();
    } catch (error) {
      return { error };
    }
  }

  // Hibernating: nothing but the decoder's state and the socket is kept (callbacks are made
  // again on the next use).
  #releaseBuffers(): void {
    this.#readBuf = null;
    this.#flush();
    if (this.#out.length === 0) this.#out.reset(0);
    if (!this.#writing) {
      this.#spare.reset(0);
      this.#onWrite = null;
    }
    this.#onStep = this.#onStepError = null;
  }

  #perform(yielded: Yielded): Run {
    if (yielded === undefined) return Run.Continue;
    if (Array.isArray(yielded)) {
      // Every action of the step is performed, in order, even after a `stop` or `hibernate`
      // (`[hibernate(s), send(x)]` still sends x); then `stop` wins over `hibernate`.
      let outcome = Run.Continue;
      for (let i = 0; i < yielded.length; i++) {
        const next = this.#act(yielded[i]);
        if (next === Run.Stop || outcome === Run.Continue) outcome = next;
      }
      return outcome;
    }
    return this.#act(yielded as Action);
  }

  #act(action: Action): Run {
    switch (action?.type) {
      case "send":
        this.#encode(action.data);
        return Run.Continue;
      case "reply": {
        const ref = action.from?.ref;
        const call = this.#calls?.get(ref);
        if (call) {
          this.#calls!.delete(ref);
          clearTimeout(call.timer);
          call.resolve(action.value);
        }
        return Run.Continue;
      }
      case "setTimeout":
        if (
          (action.ms !== null && (typeof action.ms !== "number" || Number.isNaN(action.ms))) ||
          (action.name !== undefined && typeof action.name !== "string")
        ) {
          throw new ProtocolError(
            `bad setTimeout(${String(action.ms)}, ${String(action.name)}): ms must be a ` +
              "number or null, name a string",
          );
        }
        if (action.name === undefined) {
          this.#armedTimeout = true;
          this.#idleArmed = false;
          this.#armEventTimeout(action.ms);
        } else this.#armNamed(action.name, action.ms);
        return Run.Continue;
      case "hibernate":
        this.#state = action.state;
        return Run.Hibernate;
      case "stop":
        this.#stopReason = action.reason;
        return Run.Stop;
      case "recv":
        if (this.#opts.mode !== "passive") {
          throw new ProtocolError('recv is only for passive mode (mode: "passive")');
        }
        this.#requestFrame(action.timeoutMs);
        return Run.Continue;
      default:
        throw new ProtocolError(
          `handler yielded something that is not an action: ${describeReason(action)}`,
        );
    }
  }

  // ---- Mailbox ------------------------------------------------------------------------------

  #push(ev: Event<T>): void {
    if (this.#done) return;
    if (this.#queue === NONE) this.#queue = [];
    this.#queue.push(ev);
    if (ev.type === "packet") this.#packets++;
    else if (this.#waiting && !this.#wakeQueued) {
      // Woken in a microtask, not here: whoever sent this (another handler, perhaps) goes on
      // first, as with any asynchronous message.
      this.#wakeQueued = true;
      queueMicrotask(
        this.#wakeTask ??= () => {
          this.#wakeQueued = false;
          if (this.#waiting) this.#continue();
        },
      );
    }
  }

  #wakeQueued = false;
  #wakeTask: (() => void) | null = null;

  #unshift(ev: Event<T>): void {
    if (this.#head > 0) this.#queue[--this.#head] = ev;
    else if (this.#queue === NONE) this.#queue = [ev];
    else this.#queue.unshift(ev);
    if (ev.type === "packet") this.#packets++;
  }

  #take(): Event<T> | undefined {
    if (this.#head === this.#queue.length) return undefined;
    const ev = this.#queue[this.#head]!;
    this.#queue[this.#head++] = undefined;
    if (this.#head === this.#queue.length) {
      this.#queue.length = 0;
      this.#head = 0;
    }
    if (ev.type === "packet") this.#packets--;
    this.#cancelEventTimeout();
    return ev;
  }

  deliver(ev: Event<T>): void {
    this.#push(ev);
  }

  // ---- Reading ------------------------------------------------------------------------------
  //
  // One read at a time, chained by callbacks. Active mode: after a read that produced frames,
  // the next read waits until the handler has acted on them and asks for its next event with
  // fewer than highWaterMark frames queued (#resumeReader), so a slow handler slows its peer,
  // and a handler that hibernates is parked before the next read is issued.

  #read(): void {
    if (this.#reading || this.#done) return;
    this.#reading = true;
    const buf = this.#decoder.readInto?.() ?? // the rest of a large frame, read in place
      (this.hibernating && this.#decoder.buffered === 0
        ? this.#parkBuf ??= new Uint8Array(1) // parked on the smallest read
        : this.#readBuf ??= new Uint8Array(MIN_READ));
    this.#readingInto = buf;
    this.socket.read(buf).then(
      this.#onRead ??= (result: number | null | Error) =>
        typeof result === "number" || result === null
          ? this.#readDone(result)
          : this.#readFailed(result),
      this.#onRead,
    );
  }

  #readingInto: Uint8Array | null = null; // the buffer of the read under way
  #smallReads = 0; // consecutive reads that used little of a grown buffer
  // One callback for both outcomes (a count, or an error): one closure per connection, not two.
  #onRead: ((result: number | null | Error) => void) | null = null;

  #readDone(n: number | null): void {
    this.#reading = false;
    if (this.#done) return;
    if (n === null) {
      this.#eof = true;
      this.#disconnect(undefined);
      return;
    }
    const buf = this.#readingInto!;
    this.#readingInto = null;
    const before = this.#pushed;
    try {
      this.#decoder.decode(n === buf.length ? buf : buf.subarray(0, n), this.#emit);
    } catch (err) {
      // A framing error: this connection cannot go on. The frames decoded before it are still
      // delivered; the connection ends when the handler asks for an event past them.
      this.#badInput = { reason: err };
      if (this.#opts.mode === "passive") this.#deliverFrame(); // to a waiting recv
      if (this.#waiting) this.#continue();
      return;
    }
    if (buf === this.#readBuf) {
      // Grow while reads fill the buffer; shrink back after a run of small reads (not after
      // one: the tail of a large frame would make every frame reallocate it).
      if (n === buf.length) {
        this.#smallReads = 0;
        if (n < MAX_READ) this.#readBuf = new Uint8Array(n * 4);
      } else if (buf.length > MIN_READ && n < MIN_READ && ++this.#smallReads === SHRINK_AFTER) {
        this.#smallReads = 0;
        this.#readBuf = null;
      }
    }
    if (this.#opts.mode === "passive") {
      this.#deliverFrame();
      if (this.#recvWanted) this.#read();
    } else if (this.#pushed === before) {
      this.#read(); // no whole frame yet
    } else {
      this.#readerPaused = true;
      if (this.#waiting) this.#continue();
    }
  }

  #readFailed(err: unknown): void {
    this.#reading = false;
    if (this.#done) return;
    this.#eof = true;
    this.#disconnect(err instanceof Error ? err : new Error(String(err)));
  }

  // Called when the handler asks for its next event (so after it acted on the last one, and
  // knows whether it hibernates): the reader goes on unless the mailbox is full.
  #resumeReader(): void {
    if (this.#readerPaused && this.#packets < this.#opts.highWaterMark) {
      this.#readerPaused = false;
      this.#read();
    }
  }

  #disconnect(error: Error | undefined): void {
    if (this.#disconnected) return;
    this.#disconnected = true;
    this.#clearRecv();
    this.#push(error ? { type: "disconnect", error } : { type: "disconnect" });
  }

  // Passive mode: a recv asks for one frame.
  #requestFrame(timeoutMs: number | undefined): void {
    this.#recvWanted = true;
    if (timeoutMs !== undefined) {
      clearTimeout(this.#recvTimer);
      this.#recvTimer = setTimeout(() => {
        this.#recvTimer = undefined;
        if (!this.#recvWanted) return;
        this.#recvWanted = false;
        this.#push({ type: "recvTimeout" });
      }, timeoutMs);
    }
    if (this.#frames.length > 0) {
      this.#deliverFrame();
    } else if (this.#eof) {
      this.#recvWanted = false;
      this.#clearRecv();
      this.#push({ type: "disconnect" });
    } else {
      this.#read();
    }
  }

  #deliverFrame(): void {
    if (!this.#recvWanted || this.#frames.length === 0) return;
    this.#recvWanted = false;
    this.#clearRecv();
    this.#push({ type: "packet", data: this.#frames.shift()! });
    if (this.#waiting) this.#continue();
  }

  #clearRecv(): void {
    if (this.#recvTimer !== undefined) {
      clearTimeout(this.#recvTimer);
      this.#recvTimer = undefined;
    }
  }

  // ---- Writing ------------------------------------------------------------------------------

  #encode(data: unknown): void {
    const before = this.#out.length;
    this.#opts.framing.encode(data as T, this.#out);
    this.#queued += this.#out.length - before;
  }

  sendFromOutside(data: unknown, sync: boolean): Promise<void> | undefined {
    if (this.#done || this.#writeBroken) {
      const err = new ConnectionClosed(this.handle.id, this.#closeReason ?? "write side broken");
      if (sync) return Promise.reject(err);
      return undefined;
    }
    try {
      this.#encode(data);
    } catch (err) {
      if (sync) return Promise.reject(err);
      throw err;
    }
    // Coalesce sends made in the same tick into one write.
    this.#flushSoon();
    if (!sync) return undefined;
    return new Promise((resolve, reject) => {
      if (this.#syncWaiters === NONE) this.#syncWaiters = [];
      this.#syncWaiters.push({ at: this.#queued, resolve, reject });
    });
  }

  #flushQueued = false;
  #flushTask: (() => void) | null = null;
  #async = false; // the handler is an async generator
  #flushTimer: Timer | undefined;
  #flushTimerTask: (() => void) | null = null;

  // Write what is pending after the current burst of steps, at the next macrotask: steps that
  // need no I/O all run first (their output then goes out in one write when the handler waits).
  #flushLater(): void {
    if (this.#flushTimer !== undefined) return;
    this.#flushTimer = setTimeout(
      this.#flushTimerTask ??= () => {
        this.#flushTimer = undefined;
        this.#flush();
      },
      0,
    );
  }

  // Write what is pending once the current synchronous work is done: sends of the same tick
  // (from outside, or from steps run back to back) share one write, and output never waits
  // for the handler to go idle (it may take a queued event, then await something for long).
  #flushSoon(): void {
    if (this.#flushQueued) return;
    this.#flushQueued = true;
    queueMicrotask(
      this.#flushTask ??= () => {
        this.#flushQueued = false;
        this.#flush();
      },
    );
  }
  #closeReason: unknown = undefined;

  // Start writing what is pending, unless a write is under way (it goes on with the rest).
  #flush(): void {
    if (this.#writing || this.#out.length === 0 || this.#writeBroken) return;
    const buf = this.#out;
    this.#out = this.#spare;
    this.#spare = buf;
    this.#writing = true;
    this.#write(buf.bytes());
  }

  #pendingWrite: Uint8Array | null = null;
  #onWrite: ((result: number | Error) => void) | null = null; // as #onRead

  #write(bytes: Uint8Array): void {
    this.#pendingWrite = bytes;
    this.socket.write(bytes).then(
      this.#onWrite ??= (result: number | Error) =>
        typeof result === "number" ? this.#wrote(result) : this.#writeFailed(result),
      this.#onWrite,
    );
  }

  #wrote(n: number): void {
    this.#written += n;
    const rest = this.#pendingWrite!;
    if (n < rest.length) return this.#write(rest.subarray(n)); // a partial write
    this.#pendingWrite = null;
    this.#spare.reset(KEEP_WRITE_BUFFER);
    this.#settleSyncWaiters();
    this.#writing = false;
    if (this.#out.length > 0 && !this.#writeBroken) return this.#flush(); // queued meanwhile
    this.#drainedNow();
  }

  #writeFailed(err: unknown): void {
    this.#pendingWrite = null;
    this.#writeBroken = true;
    this.#writing = false;
    this.#out.reset(0);
    // Forced (the driver closed the socket under the write): callers learn that the
    // connection closed, and why, rather than the socket's "operation canceled".
    const error = this.#forced !== null
      ? new ConnectionClosed(this.handle.id, this.#forced.reason)
      : err instanceof Error
      ? err
      : new Error(String(err));
    for (const w of this.#takeSyncWaiters()) w.reject(error);
    if (!this.#done) this.#disconnect(error);
    this.#drainedNow();
  }

  // Nothing is being written any more: wake whoever waits for that.
  #drainedNow(): void {
    const drained = this.#drainWaiters;
    this.#drainWaiters = NONE;
    for (const resolve of drained) resolve();
    if (this.#blocked && !this.#done) this.#continue();
  }

  #takeSyncWaiters(): SyncWaiter[] {
    const waiters = this.#syncWaiters;
    this.#syncWaiters = NONE;
    return waiters;
  }

  #settleSyncWaiters(): void {
    const waiters = this.#syncWaiters;
    let i = 0;
    while (i < waiters.length && waiters[i].at <= this.#written) waiters[i++].resolve();
    if (i > 0) waiters.splice(0, i);
  }

  // Resolves once everything queued so far has been written (or writing failed).
  #drained(): Promise<void> {
    this.#flush();
    if (!this.#writing) return Promise.resolve();
    if (this.#drainWaiters === NONE) this.#drainWaiters = [];
    const waiters = this.#drainWaiters;
    return new Promise((resolve) => waiters.push(resolve));
  }

  // ---- Timers -------------------------------------------------------------------------------

  #armEventTimeout(ms: number | null): void {
    if (ms === null || ms === Infinity) {
      this.#deadline = Infinity;
      return;
    }
    const at = performance.now() + ms;
    this.#deadline = at;
    // A timer already due no later than the new deadline is kept: it re-arms itself for the
    // rest when it fires. That makes re-arming per packet cost no timer call.
    if (this.#eventTimer !== undefined && this.#eventTimerAt <= at) return;
    clearTimeout(this.#eventTimer);
    this.#eventTimerAt = at;
    this.#eventTimer = setTimeout(this.#onEventTimer ??= () => this.#eventTimerFired(), ms);
  }

  #onEventTimer: (() => void) | null = null; // made on first use

  #eventTimerFired(): void {
    this.#eventTimer = undefined;
    this.#eventTimerAt = Infinity;
    const deadline = this.#deadline;
    if (deadline === Infinity || this.#done) return;
    const left = deadline - performance.now();
    if (left > 1) {
      this.#eventTimerAt = deadline;
      this.#eventTimer = setTimeout(this.#onEventTimer!, left);
      return;
    }
    this.#deadline = Infinity;
    if (this.#idleArmed) {
      this.#idleArmed = false;
      // Idle: nothing came, or the handler has been held all along by a peer that does not
      // read its output (events may wait behind that: they do not make it any less stuck).
      if (this.#head === this.#queue.length || this.#blocked) this.shutdown("idle");
      return;
    }
    // An event already waits in the mailbox (the handler is held back, by a slow peer say):
    // it came in time, and taking it cancels the timeout.
    if (this.#head < this.#queue.length) return;
    this.#push({ type: "timeout" });
  }

  #armIdle(): void {
    this.#idleArmed = true;
    this.#armEventTimeout(this.#idleMs!);
  }

  #cancelEventTimeout(): void {
    this.#deadline = Infinity;
  }

  #armNamed(name: string, ms: number | null): void {
    const old = this.#named?.get(name);
    if (old !== undefined) {
      clearTimeout(old);
      this.#named!.delete(name);
    }
    if (ms === null) return;
    (this.#named ??= new Map()).set(
      name,
      setTimeout(() => {
        this.#named?.delete(name);
        this.#push({ type: "timeout", name });
      }, ms),
    );
  }

  // ---- Messages from outside ----------------------------------------------------------------

  call(message: unknown, timeout: number): Promise<unknown> {
    if (this.#done) {
      return Promise.reject(new ConnectionClosed(this.handle.id, this.#closeReason));
    }
    return new Promise((resolve, reject) => {
      const ref = ++nextCall;
      const timer = setTimeout(() => {
        this.#calls?.delete(ref);
        reject(
          new TimeoutError(`call to connection ${this.handle.id} timed out after ${timeout} ms`),
        );
      }, timeout);
      (this.#calls ??= new Map()).set(ref, { resolve, reject, timer });
      const from: From = { ref };
      this.#push({ type: "call", message, from });
    });
  }

  register(name: string): Promise<boolean> {
    if (this.#done) return Promise.resolve(false);
    return Promise.resolve(this.#opts.registry.claim(this.handle.id, name)).then((ok) => {
      if (ok) this.name = name;
      return ok;
    });
  }

  upgrade(handler: Handler<T>, codeChange?: CodeChange): void {
    if (this.#done) return;
    this.#upgradeTo = { handler, codeChange };
    if (!this.hibernating) this.#push({ type: "upgrade", handler });
  }

  shutdown(reason: unknown, timeout = this.#opts.shutdownTimeout): Promise<void> {
    if (!this.#done && this.#forceTimer === undefined) {
      this.#push({ type: "shutdown", reason });
      this.#forceAt = performance.now() + timeout;
      this.#forceTimer = setTimeout(() => this.#force(reason), timeout);
    }
    return this.closed.then(() => {});
  }

  // Shutdown timed out: end the connection now, whatever the handler is doing.
  #force(reason: unknown): void {
    if (this.#done) return;
    this.#timedOut = true;
    if (this.#busy) {
      // The handler is inside a step (a stuck await, perhaps): do not wait for it.
      const gen = this.#gen;
      this.#gen = null;
      Promise.resolve(gen?.return(undefined)).catch(() => {});
      this.#finish(reason, true);
      return;
    }
    // The handler waits at a yield (or is hibernated): wake the loop, which runs its finally.
    this.#fail(reason);
    if (this.#writing) {
      // It may be held back by a peer that does not read: break the write so it goes on.
      this.#writeBroken = true;
      closeQuietly(this.socket);
    }
  }

  // End the connection as soon as the handler is back at a yield (now, if it waits there).
  #fail(err: unknown): void {
    if (this.#done || this.#forced) return;
    this.#forced = { reason: err };
    if (this.#waiting) this.#continue();
  }

  // ---- Ending -------------------------------------------------------------------------------

  async #finish(reason: unknown, forced: boolean): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    this.#closeReason = reason;
    this.#ending = true;
    this.#waiting = false;
    this.#clearTimers();
    if (!forced && !this.#writeBroken) {
      // Let pending output reach the socket, for a while: no longer than a shutdown in
      // progress allows (the owner's stop timeout bounds the whole end).
      const linger = Math.min(LINGER_MS, Math.max(0, this.#forceAt - performance.now()));
      let timer: Timer | undefined;
      await Promise.race([
        this.#drained(),
        new Promise<void>((resolve) => timer = setTimeout(resolve, linger)),
      ]);
      clearTimeout(timer);
    }
    closeQuietly(this.socket);
    const closedErr = new ConnectionClosed(this.handle.id, reason);
    for (const call of this.#calls?.values() ?? []) {
      clearTimeout(call.timer);
      call.reject(closedErr);
    }
    this.#calls = null;
    for (const w of this.#takeSyncWaiters()) w.reject(closedErr);
    this.#queue = NONE;
    this.#head = 0;
    this.#frames = NONE;
    try {
      const removed = this.#opts.registry.remove(this.handle.id);
      if (isPromise(removed)) await removed.catch(() => {});
    } catch { /* the registry logs its own trouble */ }
    if (reason !== "normal" && reason !== "shutdown") {
      this.#opts.logger.error(
        `etcp: connection ${this.handle.id} (${formatAddr(this.socket.remoteAddr)}) ended:`,
        reason,
      );
    }
    this.#opts.onClose?.(this.handle);
    this.#settled = true;
    this.#resolveClosed?.(reason);
  }

  #clearTimers(): void {
    clearTimeout(this.#eventTimer);
    this.#eventTimer = undefined;
    this.#deadline = Infinity;
    for (const timer of this.#named?.values() ?? []) clearTimeout(timer);
    this.#named = null;
    this.#clearRecv();
    clearTimeout(this.#forceTimer);
    clearTimeout(this.#flushTimer);
  }
}

/** A short text for an address, for logs. */
export function formatAddr(addr: Addr): string {
  switch (addr.transport) {
    case "tcp":
    case "udp":
      return addr.hostname.includes(":")
        ? `[${addr.hostname}]:${addr.port}`
        : `${addr.hostname}:${addr.port}`;
    case "unix":
    case "unixpacket":
      return addr.path;
    case "memory":
      return `memory:${addr.name}`;
    default:
      return JSON.stringify(addr);
  }
}
