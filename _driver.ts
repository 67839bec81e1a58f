// The driver: one per connection. It steps the handler's generator, keeps its mailbox, reads and
// decodes, hands output to the outbox, runs the timers, and owns the end of the connection.
//
// Its state is two numbers. `#phase` says how far the connection's life has gone:
//
//   Open ──(return, throw, stop, bad input, forced)──▶ Ending ──(finally done)──▶ Finishing ──▶
//                                                       │ handler's finally runs  │ output lingers,
//                                                       │ (its yields performed)  │ socket closes
//                                                       ▼                         ▼
//                                          both bounded by one deadline (#endClock)
//   ──▶ Releasing (calls rejected, entry removed, onClose: no deadline left) ──▶ Closed
//
// `#at` says where the handler is: not started, running a step (Running: synchronous, Stepping:
// an async step pending), waiting at a yield for an event (AwaitingEvent) or for its output to
// drain (AwaitingDrain), dropped while hibernated (Hibernated), running its finally (Returning),
// or gone. Reading has a small state of its own (`#input`).
//
// No long-lived async function: the handler is stepped while it has events to act on, and the
// loop simply returns when it waits. A plain `function*` handler runs a whole mailbox without
// one promise.

import type {
  Action,
  DisconnectEvent,
  Event,
  From,
  Handler,
  StartTlsOptions,
  TimeoutEvent,
  Yielded,
} from "./actions.ts";
import {
  BufferFull,
  ConnectionClosed,
  describeReason,
  FrameTooLarge,
  isNormalReason,
  MalformedFrame,
  ProtocolError,
  TimeoutError,
} from "./errors.ts";
import type { Decoder, Framing } from "./framing.ts";
import type { Registry, RegistryEntry } from "./registry.ts";
import type { Conn } from "./transport/transport.ts";
import { Connection, type ConnectionStats, type Logger, type Mode } from "./connection.ts";
import { KEEP_WRITE_BUFFER, Outbox, type OutboxOwner } from "./_outbox.ts";
import { clearTimer, isDelay, MAX_DELAY, startTimer, type Timer } from "./_timer.ts";
import { upgradeTls } from "./transport/tls.ts";
import { withTimeout } from "./_with_timeout.ts";
import { closeQuietly, formatAddr } from "./_socket.ts";
import { socketOptionsProblem } from "./_socket_options.ts";
import { type TraceEntry, type TraceOption, Tracer } from "./_trace.ts";
import { stampToEpoch, turnStamp } from "./_stats.ts";
import type { CallMetrics } from "./_metrics.ts";
import {
  clientEnded,
  clientStarted,
  type FairShareMember,
  leaveFairShare,
  mustWait,
  serverHeard,
} from "./_fair_share.ts";

/** Changes a hibernated connection's state when it switches to new code. */
export type CodeChange = (state: unknown) => unknown;

/** Settings a server or client gives each of its connections (one object shared by all). */
export interface DriverOptions<T> {
  framing: Framing<T>;
  mode: Mode;
  highWaterMark: number;
  maxBuffered: number;
  onBufferFull: "stop" | "throw";
  registry: Registry;
  owner: string;
  kind: RegistryEntry["kind"];
  logger: Logger;
  shutdownTimeout: number;
  handshakeTimeout: number; // bounds a STARTTLS switch
  idleTimeout?: number;
  onClose?: (conn: Connection<T>) => void;
  trace?: TraceOption; // every connection is traced from its start (_trace.ts)
  metrics?: CallMetrics; // times calls to the connection (_metrics.ts)
}

// Reads start small and grow (×4) while reads fill them: a new connection waits for its first
// bytes on 256 B (1 KiB took 0.3 KiB more per idle connection in bench/run.ts's idle rows).
const MIN_READ = 256;
const MAX_READ = 256 * 1024; // reached from 64 KiB: a 64 KiB frame and its header fit in one read
const SHRINK_AFTER = 16;
// Pending output past which the handler is not resumed until the peer has read some.
const WRITE_HIGH_WATER = 1024 * 1024;
// A lent frame at least this large, sent back as it came, is written without a copy (#sendLent);
// smaller ones are copied, so that the sends of a step go out in one write.
const SEND_LENT = 16 * 1024;
// What a lending decoder of framing.ts offers for that: a frame's encoding as it lies in memory.
type LentView = (frame: Uint8Array, encode: unknown) => Uint8Array | undefined;
// A finally that yields more often than this is cut off (a loop waiting for events that
// never come, in a sync generator, would otherwise hold the thread).
const MAX_CLOSING_STEPS = 1000;

// A hibernated connection is parked on a one-byte read into a byte of a shared block, its own
// for life: a Uint8Array(1) of its own would also cost an ArrayBuffer and a backing store
// (~190 B, most of what a parked connection holds besides its socket). Small blocks, so that
// a long-lived connection keeps little of one alive after the others have closed.
const PARK_BLOCK = 64;
let parkBlock = new Uint8Array(0);
let parkNext = 0;
function parkSlot(): Uint8Array {
  if (parkNext === parkBlock.length) {
    parkBlock = new Uint8Array(PARK_BLOCK);
    parkNext = 0;
  }
  return parkBlock.subarray(parkNext, ++parkNext);
}

// Shared by every connection until it needs an array of its own, so that idle connections
// stay small. Frozen: a push onto it would be a bug, and throws.
const NONE: never[] = Object.freeze([]) as unknown as never[];
const EMPTY = new Uint8Array(0);

const enum Phase {
  Open,
  Ending,
  Finishing, // the handler is done; pending output may still be going out (lingering)
  Releasing, // the socket is closed; the registry and hooks are being told
  Closed,
}

const enum HandlerAt {
  NotStarted,
  Running,
  Stepping,
  AwaitingEvent,
  AwaitingDrain,
  SwitchingTls, // at a yield, while its connection switches to TLS
  Hibernated,
  Returning,
  Gone,
}

const enum Input {
  Idle, // no read under way (passive mode between recvs)
  Reading,
  Held, // active mode: frames were read; the next read waits for the handler
  Ended, // end of stream, a read error, or a framing error
}

// The end deadline: made when the end or a shutdown is first asked for (most connections never
// need it before they end).
interface EndClock {
  by: number; // performance.now() by which the end must be complete (only ever lowered)
  timer: Timer;
  timerAt: number; // what the timer is armed for
  fire: () => void;
}

const enum FrameErrorAt {
  None,
  Queued, // a frameError event waits in the mailbox
  Taken, // the handler has it: the connection ends when it asks for more
}

// What only a passive connection needs.
interface Passive<T> {
  framesHeld: T[]; // decoded frames not yet asked for
  recvWanted: boolean;
  timer: Timer; // of the recv's timeout
  timeoutQueued: Event<T> | null; // a recvTimeout not yet taken
  readError: Error | undefined; // how the stream ended, for the next recv
}

// What few connections need, in one object made on first need (Driver.#rare): an idle
// connection's memory is mostly its driver, and most connections never use these.
class Rare<T> {
  // The end.
  closeReason: unknown = undefined; // fixed when the phase leaves Open
  stopReason: unknown = "normal"; // given to stop()
  endClock: EndClock | null = null; // made when an end or a shutdown is first asked for
  shutdownReason: { reason: unknown } | null = null; // a shutdown event was sent
  closed: Promise<unknown> | null = null; // made when first asked for
  resolveClosed: ((reason: unknown) => void) | null = null;
  starting: { resolve(): void; reject(err: Error): void } | null = null; // started() waits
  // Switches.
  upgrades: Array<{ handler: Handler<T>; codeChange?: CodeChange }> = NONE; // in order
  tlsSwitch: { options: StartTlsOptions; plain: Outbox | null } | null = null; // until it runs
  // Bad input, a broken write side.
  inputError: Error | null = null; // the framing failed: delivered as frameError, then the end
  frameError = FrameErrorAt.None;
  writeEndReported = false;
  // Timers, and calls to this connection.
  eventDeadline = Infinity; // of the event timeout
  eventTimer: ReturnType<typeof setTimeout> | undefined = undefined;
  eventTimerAt = Infinity;
  onEventTimer: (() => void) | null = null;
  armedTimeout = false; // the current step armed the event timeout itself
  idleArmed = false; // the armed event timeout is the idle timeout
  named: Map<string, { timer: Timer; fired: TimeoutEvent | null }> | null = null;
  callRefs: Set<number> | null = null; // calls to this connection awaiting a reply
  unreferenced = false; // unref() was called: the STARTTLS socket is unref'd too
}
// What a driver without its Rare reads (frozen: writing goes through #rareMade).
const NO_RARE: Rare<never> = Object.freeze(new Rare<never>());

const enum Run {
  Continue,
  Stop,
  Hibernate,
  StartTls,
}

// Calls waiting for a reply, by ref, for the whole process: a reply may come from any handler.
interface PendingCall {
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: Timer;
  callee: Driver<unknown>;
}
const pendingCalls = new Map<number, PendingCall>();
let nextCall = 0;

/** Whether `value` is a thenable (what a user's code may return where it may be async). */
export function isPromise<V>(value: V | Promise<V>): value is Promise<V> {
  return typeof (value as { then?: unknown })?.then === "function";
}

// What a handler's next() gave that is no step ({ value, done }): ends its connection.
function notAStep(step: unknown): ProtocolError {
  return new ProtocolError(`handler's next() gave ${describeReason(step)}, not { value, done }`);
}

// Errors of other kinds that the peer caused: a STARTTLS handshake it refused, garbled or stalled
// (logged as one line at warn, as a bad frame is, not as a crash's stack at error).
const peerCaused = new WeakSet<Error>();

function byPeer(err: unknown): unknown {
  if (err instanceof Error) peerCaused.add(err);
  return err;
}

// Ends caused by the peer, not by the code: one short line at warn, no stack trace.
function isPeerFault(reason: unknown): boolean {
  return reason instanceof FrameTooLarge || reason instanceof MalformedFrame ||
    (reason instanceof Error && peerCaused.has(reason)) ||
    reason instanceof BufferFull || reason instanceof Deno.errors.ConnectionReset ||
    reason instanceof Deno.errors.BrokenPipe || reason instanceof Deno.errors.ConnectionAborted ||
    reason instanceof Deno.errors.UnexpectedEof || reason instanceof Deno.errors.TimedOut;
}

export class Driver<T> implements OutboxOwner, FairShareMember {
  // ---- Identity and settings -------------------------------------------------------------------
  socket: Conn; // replaced once if the connection switches to TLS
  readonly handle: Connection<T>;
  readonly #opts: DriverOptions<T>;
  name: string | undefined;
  #tracer: Tracer | null = null; // only while traced: the hooks check this one field

  // ---- Lifecycle ---------------------------------------------------------------------------------
  #phase = Phase.Open;
  readonly #startedAt = turnStamp(); // (small integers: no heap number per connection)
  #lastEventAt = -1; // the stamp of the last read from the peer, or other event pushed

  // ---- Handler -----------------------------------------------------------------------------------
  #at = HandlerAt.NotStarted;
  #handler: Handler<T>;
  #gen: AsyncGenerator<Yielded, void, Event<T>> | Generator<Yielded, void, Event<T>> | null = null;
  #async = false; // the handler is an async generator
  #state: unknown = undefined; // given to hibernate, passed to the next generator
  #wakeEvent: Event<T> | null = null; // the event that woke it from hibernation, until it hibernates
  #onStep: ((step: IteratorResult<Yielded, void>) => void) | null = null;
  #onStepError: ((err: unknown) => void) | null = null;

  // ---- Mailbox -----------------------------------------------------------------------------------
  // Events from #head to #tail. The array keeps its length when emptied (a length of 0 would
  // free its memory, and the next event allocate it again: ~60 ns a frame).
  #queue: Array<Event<T> | undefined> = NONE;
  #head = 0;
  #tail = 0;
  #packetsQueued = 0; // for flow control
  #wakeQueued = false;
  #wakeTask: (() => void) | null = null;

  // ---- Reading -----------------------------------------------------------------------------------
  #input = Input.Idle;
  #framing: Framing<T>; // both ways; setFraming replaces it (and the decoder)
  #decoder: Decoder<T> | null; // null: dropped while hibernated at a frame boundary (#dec)
  get #dec(): Decoder<T> {
    return this.#decoder ??= this.#framing.decoder();
  }
  #emit: ((frame: T) => void) | null = null; // made on first use, dropped when hibernating
  #readBuf: Uint8Array | null = null;
  #parkBuf: Uint8Array | null = null;
  #readingInto: Uint8Array | null = null; // the buffer of the read under way
  #onRead: ((result: number | null | Error) => void) | null = null; // one callback, both outcomes
  #readAfterLent = false; // the next read waits for a lent frame's write (#sendLent)
  fairWindow = -1; // the fair-share gate's mark: -1 outside it (_fair_share.ts)
  #smallReads = 0; // consecutive reads that used little of a grown buffer
  #framesDecoded = 0;
  #bytesRead = 0;
  readonly #passive: Passive<T> | null; // passive mode only
  #readEndTaken = false; // the handler has had its read-side disconnect
  // The chunk last decoded, for setFraming to cut again what was decoded past its switch point:
  // the bytes, what the decoder held before them, and the frame count before them.
  #chunk: Uint8Array | null = null;
  #chunkOf: Uint8Array | null = null; // the buffer #chunk is a view of (from its start)
  #chunkHeld = 0;
  #chunkFramesAt = 0;

  // ---- Writing -----------------------------------------------------------------------------------
  #outbox: Outbox | null = null; // made on first send, dropped when hibernating with none pending
  #bytesWrittenBefore = 0; // by outboxes dropped since
  #framesDroppedBefore = 0;
  #framesSent = 0; // send actions and sends from outside encoded

  // What few connections need (an end under way, timers, a TLS switch, code changes, calls to
  // it, bad input): made on first need, so that a connection that needs none stays small.
  #rare: Rare<T> | null = null;
  get #rareMade(): Rare<T> {
    return this.#rare ??= new Rare<T>();
  }
  get #rareOrNone(): Rare<T> {
    return this.#rare ?? NO_RARE;
  }

  // `handle`: a reconnecting client's, which outlives its drivers (client.ts); else a new one.
  constructor(socket: Conn, handler: Handler<T>, opts: DriverOptions<T>, handle?: Connection<T>) {
    this.socket = socket;
    this.#handler = handler;
    this.#opts = opts;
    this.handle = handle ?? new Connection<T>(this);
    this.#framing = opts.framing;
    this.#decoder = opts.framing.decoder();
    this.#passive = opts.mode === "passive"
      ? {
        framesHeld: NONE,
        recvWanted: false,
        timer: undefined,
        timeoutQueued: null,
        readError: undefined,
      }
      : null;
    if (opts.trace) this.trace(opts.trace);
  }

  // ---- What the handle reads ---------------------------------------------------------------------

  get closed(): Promise<unknown> {
    const rare = this.#rareMade;
    return rare.closed ??= this.#phase === Phase.Closed
      ? Promise.resolve(rare.closeReason)
      : new Promise((resolve) => rare.resolveClosed = resolve);
  }

  get closeReason(): unknown {
    const rare = this.#rareOrNone;
    if (this.#phase !== Phase.Open) return rare.closeReason;
    // Open, but past a frameError: that error is how it ends, even if the handler returns.
    return rare.frameError === FrameErrorAt.Taken ? rare.inputError : undefined;
  }

  get hibernating(): boolean {
    return this.#at === HandlerAt.Hibernated;
  }

  /** The driver of the handle's socket: this one (a reconnecting client's is its latest). */
  get current(): this {
    return this;
  }

  /** `"up"` while open, `"closing"` once its end is decided, `"closed"` once it has closed. */
  get state(): "up" | "closing" | "closed" {
    return this.#phase === Phase.Open ? "up" : this.#phase === Phase.Closed ? "closed" : "closing";
  }

  get bytesRead(): number {
    return this.#bytesRead;
  }

  get bytesWritten(): number {
    return this.#bytesWrittenBefore + (this.#outbox?.bytesWritten ?? 0);
  }

  get bufferedAmount(): number {
    return this.#outbox?.bytesPending ?? 0;
  }

  get framesDropped(): number {
    return this.#framesDroppedBefore + (this.#outbox?.framesDropped ?? 0);
  }

  // ---- What the observer reads (conn.stats, conn.handlerState, conn.trace) -----------------------

  stats(): ConnectionStats {
    const at = this.#at;
    const dropped = this.framesDropped;
    return {
      state: this.#phase === Phase.Closed
        ? "closed"
        : this.#phase !== Phase.Open
        ? "stopping"
        : at === HandlerAt.Hibernated
        ? "hibernated"
        : at === HandlerAt.Running || at === HandlerAt.Stepping
        ? "running"
        : "waiting",
      bytesIn: this.#bytesRead,
      bytesOut: this.bytesWritten,
      framesIn: this.#framesDecoded,
      framesOut: this.#framesSent - dropped,
      framesDropped: dropped,
      bufferedAmount: this.bufferedAmount,
      mailbox: this.#tail - this.#head + (this.#passive?.framesHeld.length ?? 0),
      callsPending: this.#rareOrNone.callRefs?.size ?? 0,
      startedAt: stampToEpoch(this.#startedAt),
      lastEventAt: this.#lastEventAt < 0 ? undefined : stampToEpoch(this.#lastEventAt),
      traced: this.#tracer !== null,
    };
  }

  // The state given to the last hibernate (or to the handler when it was called), for debugging.
  get handlerState(): unknown {
    return this.#state;
  }

  get metrics(): CallMetrics | undefined {
    return this.#opts.metrics;
  }

  trace(option: TraceOption): void {
    if (option === false) this.#tracer = null;
    else if (this.#tracer !== null) this.#tracer.redirect(option);
    else {
      this.#tracer = new Tracer(this.handle.id, option, this.#opts.logger, () => {
        this.#tracer = null;
      });
    }
  }

  recentTrace(): TraceEntry[] {
    return this.#tracer?.recent() ?? [];
  }

  // ---- Start ---------------------------------------------------------------------------------------

  /** Record the connection in its registry (before a name is claimed, and before it starts). */
  enroll(): void | Promise<void> {
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
        startedAt: stampToEpoch(this.#startedAt), // (as stats() says)
      }, this.handle);
      if (isPromise(added)) {
        return added.catch((err) => this.#opts.logger.error("etcp: registry:", err));
      }
    } catch (err) {
      this.#opts.logger.error("etcp: registry:", err);
    }
  }

  /** Run the handler (after {@linkcode Driver.enroll}). */
  start(): void {
    if (this.#at !== HandlerAt.NotStarted || this.#phase !== Phase.Open) return;
    if (this.#opts.kind !== "server") clientStarted(this, this.socket);
    this.#tracer?.note("start", "start", formatAddr(this.socket.remoteAddr));
    if (this.#opts.mode === "active") this.#read();
    this.#loop(undefined);
  }

  /**
   * For `connect()`, asked for before {@linkcode Driver.start}: resolves once the handler's first
   * step (its code up to its first yield, and that yield's actions: etcp's `connection_init`)
   * has run and the connection is still open; rejects if the connection ended first, with the
   * reason if it is an `Error` (the handler's throw), else a `ConnectionClosed` carrying it (a
   * `return` or a `stop()` before the first wait).
   */
  started(): Promise<void> {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    this.#rareMade.starting = { resolve, reject };
    return promise;
  }

  // Settle what started() returned: the first step is done, or (`ended`) the connection ended.
  #settleStart(ended: boolean, reason?: unknown): void {
    const rare = this.#rare!; // (started() made it)
    const starting = rare.starting!;
    rare.starting = null;
    if (!ended) return starting.resolve();
    starting.reject(
      reason instanceof Error ? reason : new ConnectionClosed(this.handle.id, reason),
    );
  }

  /** Give up a connection that never started (its name was taken): close, forget, no log. */
  discard(reason: unknown): Promise<void> {
    this.#phase = Phase.Ending;
    this.#rareMade.closeReason = reason;
    this.#at = HandlerAt.Gone;
    return this.#finish(true, false);
  }

  // ---- The handler's loop --------------------------------------------------------------------------

  // Step the handler with `input` (undefined: a new generator's first step), and on while
  // events are at hand.
  #loop(input: Event<T> | undefined): void {
    for (;;) {
      if (this.#gen === null) {
        if (!this.#startGenerator(input)) return;
        input = undefined;
      }
      this.#at = HandlerAt.Running;
      if (this.#tracer !== null && input !== undefined) this.#tracer.event(input);
      let step: IteratorResult<Yielded, void> | Promise<IteratorResult<Yielded, void>>;
      try {
        step = this.#gen!.next(input!);
      } catch (err) {
        return this.#handlerThrew(err);
      }
      if (isPromise(step)) {
        this.#async = true;
        this.#at = HandlerAt.Stepping;
        step.then(
          this.#onStep ??= (s) => this.#stepped(s),
          this.#onStepError ??= (e) => {
            if (this.#phase < Phase.Finishing) this.#handlerThrew(e);
          },
        );
        return;
      }
      input = this.#afterStep(step);
      if (input === undefined) return this.#closeIfEnding();
    }
  }

  // Make the generator: at start, or on waking from hibernation (pending upgrades first, in
  // order). The waking event goes back to the mailbox: the new generator gets it at its first
  // yield, after that yield's actions. Returns false if the connection ended instead.
  #startGenerator(input: Event<T> | undefined): boolean {
    if (this.#at === HandlerAt.Hibernated) {
      this.#unshift(input!);
      if (this.#tracer !== null) this.#tracer.note("wake", "wake", input!.type);
      this.#wakeEvent = input!;
      const upgrades = this.#rareOrNone.upgrades;
      if (upgrades.length > 0) {
        this.#rareMade.upgrades = NONE;
        try {
          for (const { handler, codeChange } of upgrades) {
            this.#handler = handler;
            if (codeChange) this.#state = codeChange(this.#state);
            this.#tracer?.note("upgrade", "upgrade", handler.name || "(anonymous handler)");
          }
        } catch (err) {
          this.#handlerThrew(err);
          return false;
        }
      }
    }
    let gen;
    try {
      gen = this.#handler(this.handle, this.#state);
    } catch (err) {
      this.#handlerThrew(err);
      return false;
    }
    if (typeof gen?.next !== "function" || typeof gen.return !== "function") {
      const got = isPromise(gen)
        ? "a Promise (an async function?): a handler is a generator function, async function*"
        : describeReason(gen);
      this.#handlerThrew(new ProtocolError(`handler returned ${got}, not a generator`));
      return false;
    }
    this.#gen = gen;
    return true;
  }

  #handlerThrew(err: unknown): void {
    this.#gen = null; // it threw: it is done, its finally has run
    this.#at = HandlerAt.Gone;
    if (this.#phase === Phase.Open) this.#end(err);
    else this.#closeGenerator();
  }

  #stepped(step: IteratorResult<Yielded, void>): void {
    if (this.#phase >= Phase.Finishing) return; // abandoned at the end deadline
    this.#at = HandlerAt.Running;
    const next = this.#afterStep(step);
    if (next !== undefined) this.#loop(next);
    else this.#closeIfEnding();
  }

  // The end was decided while the handler ran a step: now that it is back at a yield, run its
  // finally.
  #closeIfEnding(): void {
    if (this.#phase === Phase.Ending && this.#at === HandlerAt.Running) this.#closeGenerator();
  }

  // Perform a step's actions; return the next event, or undefined when the handler must wait
  // (or the connection ends).
  #afterStep(step: IteratorResult<Yielded, void>): Event<T> | undefined {
    if (typeof step !== "object" || step === null) {
      // (Only a hand-made iterator's next() gives anything but { value, done }.)
      this.#handlerThrew(notAStep(step));
      return undefined;
    }
    if (step.done) {
      this.#gen = null;
      this.#at = HandlerAt.Gone;
      // (A framing error not yet taken still names the end: the input was bad.)
      if (this.#phase === Phase.Open) this.#end(this.#rareOrNone.inputError ?? "normal");
      else this.#closeGenerator(); // ended meanwhile: nothing left to close but the rest
      return undefined;
    }
    if (this.#tracer !== null) this.#tracer.actions(step.value);
    if (this.#phase !== Phase.Open) {
      // Ending since the step began (its peer overran the send buffer, say): its actions are
      // performed as a finally's are, then the finally runs.
      this.#performClosing(step.value);
      return undefined;
    }
    if (this.#rare !== null) this.#rare.armedTimeout = false;
    let outcome: Run;
    try {
      outcome = this.#perform(step.value);
    } catch (err) {
      this.#cancelTlsSwitch();
      this.#end(err);
      return undefined;
    }
    // The default event timeout: a connection that hears nothing for idleTimeout ms is asked
    // to shut down, unless its handler armed an event timeout of its own.
    const rare = this.#rare; // (made by the step's actions, if they needed it)
    if (this.#opts.idleTimeout !== undefined && !rare?.armedTimeout) this.#armIdle();
    if (rare !== null && rare.tlsSwitch !== null && outcome === Run.Stop) {
      this.#cancelTlsSwitch(); // stop wins: what was sent before goes out plain
    }
    if (outcome === Run.Stop) {
      this.#end((rare ?? NO_RARE).stopReason);
      return undefined;
    }
    if (rare !== null && rare.starting !== null) this.#settleStart(false); // its first step is done
    if (outcome === Run.StartTls) {
      this.#switchToTls();
      return undefined;
    }
    const outbox = this.#outbox;
    if (outcome === Run.Hibernate) {
      if (this.#tracer !== null) this.#tracer.noteValue("hibernate", this.#state);
      this.#gen = null; // dropped: its finally does not run
      this.#at = HandlerAt.Hibernated;
      this.#releaseBuffers();
    } else if (outbox !== null) {
      if (outbox.unflushed >= KEEP_WRITE_BUFFER) outbox.flush();
      else if (outbox.unflushed > 0 && this.#async && this.#head < this.#tail) {
        // More events are queued, so this is not written before the handler next waits. An
        // async handler may await something long on the way: make sure output goes out then.
        outbox.flushLater();
      }
      if (outbox.bytesPending > WRITE_HIGH_WATER) {
        // The peer reads slower than the handler writes: hold the handler until it catches up.
        outbox.flush();
        if (outbox.writing) {
          this.#at = HandlerAt.AwaitingDrain;
          return undefined;
        }
      }
    }
    return this.#nextOrWait();
  }

  // The next event, or undefined after arranging to be woken when one comes.
  #nextOrWait(): Event<T> | undefined {
    // Waiting: write first, then read. A read issued before the write finds nothing yet, and
    // waits for the socket (over TLS, one more wake-up per frame: half the ping-pong rate).
    if (this.#head === this.#tail) this.#outbox?.flush();
    this.#resumeReader();
    const ev = this.#take();
    if (ev !== undefined) return ev;
    const rare = this.#rareOrNone;
    if (rare.frameError === FrameErrorAt.Taken) {
      // The handler has seen the frameError event and asks for more: there is no more.
      this.#end(rare.inputError);
      return undefined;
    }
    if (this.#readEndTaken && this.#outbox?.writeClosed) {
      // Half-closed both ways (closeWrite, and the peer's end of stream): a normal end.
      this.#end("normal");
      return undefined;
    }
    this.#outbox?.flush();
    if (this.#at !== HandlerAt.Hibernated) this.#at = HandlerAt.AwaitingEvent;
    return undefined;
  }

  // Go on after waiting (an event came) or being held (output drained).
  #continue(): void {
    const ev = this.#nextOrWait();
    if (ev !== undefined) this.#loop(ev);
  }

  get #waitingForEvent(): boolean {
    return this.#at === HandlerAt.AwaitingEvent || this.#at === HandlerAt.Hibernated;
  }

  // Hibernating: nothing but the decoder's state and the socket is kept (callbacks are made
  // again on the next use).
  #releaseBuffers(): void {
    this.#readBuf = this.#chunkOf = null;
    // (The last chunk is kept while frames cut from it wait: setFraming may cut them again.)
    if (this.#packetsQueued === 0 && !(this.#passive?.framesHeld.length)) {
      this.#chunk = null;
      // A lending decoder keeps the read memory it lent from (framing.ts): let it go too. A
      // built-in one left holding nothing goes itself (#dec makes a new one when bytes come).
      const decoder = this.#decoder;
      if ((decoder as { release?: () => boolean } | null)?.release?.() === true) {
        this.#decoder = null;
      }
    }
    if (this.#head === this.#tail) this.#queue = NONE; // (an empty mailbox keeps no array)
    this.#outbox?.flush();
    this.#dropIdleOutbox(); // else once its write is done (outboxDrained)
    this.#onStep = this.#onStepError = null;
    this.#emit = this.#wakeTask = null;
  }

  // A hibernated connection's outbox with nothing left to write goes, buffers and all (a
  // thousand bytes a connection): the next send makes a new one.
  #dropIdleOutbox(): void {
    const outbox = this.#outbox;
    if (outbox === null || !outbox.idle) return;
    this.#bytesWrittenBefore += outbox.bytesWritten;
    this.#framesDroppedBefore += outbox.framesDropped;
    this.#outbox = null;
  }

  #perform(yielded: Yielded): Run {
    if (yielded === undefined) return Run.Continue;
    if (Array.isArray(yielded)) {
      // Every action of the step is performed, in order, even after a `stop` or `hibernate`
      // (`[hibernate(s), send(x)]` still sends x); then `stop` wins over `hibernate`.
      let outcome = Run.Continue;
      for (let i = 0; i < yielded.length; i++) {
        const next = this.#act(yielded[i]);
        if (
          (next === Run.Hibernate && outcome === Run.StartTls) ||
          (next === Run.StartTls && outcome === Run.Hibernate)
        ) throw new ProtocolError("startTls and hibernate cannot be yielded together");
        if (next === Run.Stop || outcome === Run.Continue) outcome = next;
      }
      return outcome;
    }
    return this.#act(yielded as Action);
  }

  #act(action: Action): Run {
    switch (action?.type) {
      case "send": {
        const outbox = this.#outbox ??= new Outbox(this.socket, this);
        if (!this.#sendLent(outbox, action.data)) outbox.encode(this.#framing, action.data as T);
        this.#framesSent++;
        return Run.Continue;
      }
      case "reply":
        replyTo(action.from, action.value);
        return Run.Continue;
      case "setTimeout":
        if (
          (action.ms !== null && !isDelay(action.ms)) ||
          (action.name !== undefined && typeof action.name !== "string")
        ) {
          throw new ProtocolError(
            `bad setTimeout(${String(action.ms)}, ${String(action.name)}): ms must be a ` +
              "number >= 0, Infinity or null, name a string",
          );
        }
        if (action.name === undefined) {
          this.#rareMade.armedTimeout = true;
          this.#rareMade.idleArmed = false;
          this.#armEventTimeout(action.ms);
        } else this.#armNamed(action.name, action.ms);
        return Run.Continue;
      case "hibernate":
        if (this.#wakeEvent !== null && this.#queue[this.#head] === this.#wakeEvent) {
          // Woken, and hibernating again before taking the event that woke it: that event would
          // wake it again at once, for ever.
          throw new ProtocolError(
            "hibernate at the first yield after a wake: the waking event is not taken yet, and " +
              "would wake the handler again at once (its first yield gets the waking event)",
          );
        }
        this.#wakeEvent = null;
        this.#state = action.state;
        return Run.Hibernate;
      case "stop":
        this.#rareMade.stopReason = action.reason;
        return Run.Stop;
      case "startTls":
        if (this.#rareOrNone.tlsSwitch !== null) throw new ProtocolError("one startTls per yield");
        this.#checkTlsSwitch();
        // Sends after it, even in the same yield, wait for the switch in an outbox of their own.
        this.#rareMade.tlsSwitch = { options: action.options ?? {}, plain: this.#outbox };
        this.#outbox = new Outbox(null, this);
        return Run.StartTls;
      case "recv":
        if (this.#opts.mode !== "passive") {
          throw new ProtocolError('recv is only for passive mode (mode: "passive")');
        }
        if (action.timeoutMs !== undefined && !isDelay(action.timeoutMs)) {
          throw new ProtocolError(`bad recv(${action.timeoutMs}): timeoutMs must be >= 0`);
        }
        this.#requestFrame(action.timeoutMs);
        return Run.Continue;
      case "setFraming":
        this.#switchFraming(action.framing);
        return Run.Continue;
      case "closeWrite":
        (this.#outbox ??= new Outbox(this.socket, this)).closeWrite();
        return Run.Continue;
      case "setOptions": {
        const problem = socketOptionsProblem(action.options);
        if (problem !== undefined) throw new ProtocolError(`bad setOptions: ${problem}`);
        // Where the socket has no such setter (Deno.TlsConn, Unix, memory) it is ignored.
        const { noDelay, keepAlive } = action.options;
        if (noDelay !== undefined) this.socket.setNoDelay?.(noDelay);
        if (keepAlive !== undefined) this.socket.setKeepAlive?.(keepAlive);
        return Run.Continue;
      }
      default:
        throw new ProtocolError(
          `handler yielded something that is not an action: ${describeReason(action)}`,
        );
    }
  }

  // ---- Switching framing (setFraming) ----------------------------------------------------------------
  //
  // The switch point is right after the last frame the handler received. The bytes past it are
  // decoded with the new framing: what the old decoder holds of a frame not yet complete (its
  // take()), or, when frames were already cut past it (queued, held for recv, or a framing error
  // not yet delivered), the bytes of the chunk they came from, from where the handler's last
  // frame of it ended (found by decoding that chunk again one byte at a time). While the
  // handler acts on a frame no read is under way (active mode with highWaterMark 1, passive
  // mode), so that chunk is still at hand.

  #switchFraming(framing: Framing<T>): void {
    if (typeof framing?.decoder !== "function" || typeof framing?.encode !== "function") {
      throw new ProtocolError(`bad setFraming: ${describeReason(framing)} is not a Framing`);
    }
    const passive = this.#passive;
    const undelivered = passive === null ? this.#packetsQueued : passive.framesHeld.length;
    // After a frameError the handler has had, the input is over: only the output switches.
    const inputOver = this.#rareOrNone.frameError === FrameErrorAt.Taken;
    const rest = inputOver ? EMPTY : this.#bytesPastSwitch(undelivered);
    const decoder = framing.decoder();
    this.#framing = framing;
    if (inputOver) return;
    this.#decoder = decoder;
    // What was cut past the switch point is cut again, from `rest`, before the end of input.
    if (passive !== null) passive.framesHeld = NONE;
    const rare = this.#rare; // (a framing error made it)
    const hadInputError = rare !== null && rare.inputError !== null;
    const readEnd = undelivered > 0 || rest.length > 0 || hadInputError
      ? this.#dropQueued()
      : undefined;
    if (hadInputError) {
      rare.inputError = null;
      rare.frameError = FrameErrorAt.None;
      this.#input = passive === null ? Input.Held : Input.Idle; // reading goes on
    }
    this.#chunk = rest;
    this.#chunkOf = null; // (not a view from a read buffer's start)
    this.#chunkHeld = 0;
    this.#chunkFramesAt = this.#framesDecoded;
    if (rest.length > 0) {
      try {
        decoder.decode(rest, this.#emit ??= (frame: T) => this.#frameDecoded(frame));
      } catch (err) {
        this.#badInput(err);
      }
    }
    if (readEnd !== undefined) this.#push(readEnd); // the end of input stays last
    if (passive !== null) this.#deliverFrame(); // to a recv already waiting
  }

  // The bytes past the switch point, or a ProtocolError saying why they cannot be had.
  #bytesPastSwitch(undelivered: number): Uint8Array {
    const old = this.#dec;
    const name = this.#framing.name;
    if (undelivered === 0 && this.#rareOrNone.inputError === null) {
      if (old.buffered === 0) return EMPTY;
      if (old.take === undefined) {
        throw new ProtocolError(
          `setFraming: the ${name} decoder holds ${old.buffered} bytes and cannot hand them ` +
            "over (its decoder has no take())",
        );
      }
      return old.take();
    }
    const chunk = this.#chunk;
    const cut = this.#framesDecoded - this.#chunkFramesAt; // frames cut from that chunk
    const delivered = cut - undelivered; // of which the handler had these
    if (chunk === null || this.#input === Input.Reading || delivered < 0) {
      throw new ProtocolError(
        "setFraming: frames past the switch point were decoded from a read whose bytes are " +
          "gone (with highWaterMark above 1, reading runs ahead of the handler)",
      );
    }
    if (this.#chunkHeld === 0) return chunk.subarray(frameEnd(this.#framing, chunk, 0, delivered));
    // The chunk began inside a frame: its first frame ends where the decoder says.
    const first = delivered > 0 ? old.heldFrameEnd : undefined;
    if (first === undefined || first < 0) {
      throw new ProtocolError(
        delivered === 0
          ? "setFraming: the frame past the switch point began in an earlier read (yield " +
            "setFraming in answer to the packet after which the framing changes)"
          : `setFraming: the ${name} decoder cannot tell where a frame begun in an earlier ` +
            "read ended (its decoder has no heldFrameEnd)",
      );
    }
    return chunk.subarray(frameEnd(this.#framing, chunk, first, delivered - 1));
  }

  // Take every packet (and a frameError) out of the mailbox: they are cut again. Returns the
  // read side's disconnect if it was queued, taken out too, to be queued again after them.
  #dropQueued(): Event<T> | undefined {
    const queue = this.#queue;
    let readEnd: Event<T> | undefined;
    let kept = this.#head;
    for (let i = this.#head; i < this.#tail; i++) {
      const ev = queue[i]!;
      if (ev.type === "packet" || ev.type === "frameError") continue;
      if (ev.type === "disconnect" && ev.side === "read") readEnd = ev;
      else queue[kept++] = ev;
    }
    for (let i = kept; i < this.#tail; i++) queue[i] = undefined;
    this.#tail = kept;
    this.#packetsQueued = 0;
    return readEnd;
  }

  // A large frame the decoder lent, sent back as it came: written from the read memory, with no
  // copy, when nothing else is queued (the next read waits until it is out). False: encode it.
  #sendLent(outbox: Outbox, data: unknown): boolean {
    if (this.#decoder?.lends !== true || !(data instanceof Uint8Array) || data.length < SEND_LENT) {
      return false;
    }
    const view = (this.#decoder as { lentView?: LentView }).lentView?.(data, this.#framing.encode);
    return view !== undefined && outbox.writeLent(view);
  }

  // ---- Switching to TLS (STARTTLS) -----------------------------------------------------------------
  //
  // What was sent up to the startTls step is written in plain text first; what is sent from then
  // on waits in a fresh outbox with no socket, and is written, encrypted, once the handshake is
  // done. No read is under way (checked), so no byte of the TLS stream is read as plain text.

  #checkTlsSwitch(): void {
    if (this.#input === Input.Reading) {
      throw new ProtocolError(
        "startTls while a read is under way: yield it in answer to the peer's packet (active " +
          "mode), or with no recv pending (passive mode)",
      );
    }
    if (
      (this.#decoder?.buffered ?? 0) > 0 || this.#packetsQueued > 0 ||
      (this.#passive !== null && this.#passive.framesHeld.length > 0)
    ) {
      throw new ProtocolError("startTls: bytes were read past the switch point");
    }
  }

  // A startTls yielded with stop, or with an action that failed: nothing switches, and what was
  // sent before it is written as it is.
  #cancelTlsSwitch(): void {
    const rare = this.#rare;
    if (rare === null || rare.tlsSwitch === null) return;
    this.#outbox = rare.tlsSwitch.plain;
    rare.tlsSwitch = null;
  }

  #switchToTls(): void {
    this.#at = HandlerAt.SwitchingTls;
    const rare = this.#rare!; // (the startTls action made it)
    const { options, plain } = rare.tlsSwitch!;
    rare.tlsSwitch = null;
    const written = plain === null ? Promise.resolve() : plain.drained();
    written.then(() => {
      if (plain !== null) {
        if (plain.broken !== null) throw plain.broken;
        this.#bytesWrittenBefore += plain.bytesWritten;
      }
      if (this.#phase !== Phase.Open) return undefined;
      const role = this.#opts.kind === "server" ? "server" : "client";
      let upgraded: Conn | null = null; // the TLS socket, once made: its handshake may fail
      // (What upgradeTls itself throws, a bad certFile say, is the code's fault, not the peer's.)
      const switching = upgradeTls(this.socket, { ...options, role }).then((tls) => {
        upgraded = tls;
        return tls.handshake().then(() => tls, (err) => Promise.reject(byPeer(err)));
      });
      // Bounded as any handshake: a peer that stalls it costs only its connection. The TLS
      // socket took the plain one's place: if its handshake fails or times out, it is what
      // must be closed.
      return withTimeout(
        switching,
        this.#opts.handshakeTimeout,
        "STARTTLS handshake",
        (late) => closeQuietly(late),
      ).catch((err) => {
        if (upgraded !== null) closeQuietly(upgraded);
        throw err instanceof TimeoutError ? byPeer(err) : err; // a stalled handshake: the peer's
      });
    }).then((tls) => {
      if (tls === undefined) return;
      if (this.#phase !== Phase.Open) return closeQuietly(tls);
      this.socket = tls;
      if (this.#rareOrNone.unreferenced) tls.unref?.();
      this.#outbox!.attach(tls);
      this.#at = HandlerAt.AwaitingEvent;
      this.#continue();
    }).catch((err) => {
      if (this.#phase !== Phase.Open) return;
      this.#at = HandlerAt.AwaitingEvent;
      this.#end(err);
    });
  }

  // ---- Ending ------------------------------------------------------------------------------------
  //
  // One owner of the end: #end fixes the reason and runs the finally; #finish lingers, closes and
  // cleans up. Both are bounded by the end deadline, which every stop or shutdown can only bring
  // closer;
  // when it passes, whatever is still going (a stuck step, a stuck finally, output to a peer that
  // does not read) is abandoned and the socket closes.

  // Decide the end (once; the first reason wins) and run the handler's finally, now if it is at a
  // yield, else when its step returns.
  #end(reason: unknown): void {
    if (this.#phase !== Phase.Open) return;
    // Past a framing error, a normal end is still that error's: the input was bad.
    const rare = this.#rareOrNone;
    if (reason === "normal" && rare.frameError === FrameErrorAt.Taken) reason = rare.inputError;
    this.#phase = Phase.Ending;
    this.#rareMade.closeReason = reason;
    this.#lowerEndBy(performance.now() + this.#opts.shutdownTimeout);
    this.#outbox?.flush(); // what was sent goes out while the finally runs, not after it
    if (this.#at === HandlerAt.Stepping) this.#armEndTimer(); // a stuck step is bounded too
    else if (this.#at !== HandlerAt.Running) this.#closeGenerator();
  }

  // Run the handler's finally (gen.return()), performing what it yields, then finish. A throw
  // from the finally replaces the reason (as in JavaScript, and as a crashing terminate/2 in
  // Erlang): that error is the close reason, logged once.
  #closeGenerator(): void {
    const gen = this.#gen;
    if (gen === null) {
      this.#at = HandlerAt.Gone;
      this.#finish(false, true);
      return;
    }
    this.#at = HandlerAt.Returning;
    let step: IteratorResult<Yielded, void> | Promise<IteratorResult<Yielded, void>>;
    try {
      step = gen.return(undefined);
    } catch (err) {
      return this.#finallyThrew(err);
    }
    this.#followFinally(gen, step, 0);
  }

  #followFinally(
    gen: AsyncGenerator<Yielded, void, Event<T>> | Generator<Yielded, void, Event<T>>,
    step: IteratorResult<Yielded, void> | Promise<IteratorResult<Yielded, void>>,
    steps: number,
  ): void {
    for (;;) {
      if (isPromise(step)) {
        this.#armEndTimer(); // a finally that awaits is bounded by the end deadline
        step.then(
          (s) => this.#gen === gen && this.#followFinally(gen, s, steps),
          (err) => this.#gen === gen && this.#finallyThrew(err),
        );
        return;
      }
      if (typeof step !== "object" || step === null) return this.#finallyThrew(notAStep(step));
      if (step.done || ++steps > MAX_CLOSING_STEPS) {
        this.#gen = null;
        this.#at = HandlerAt.Gone;
        this.#finish(false, true);
        return;
      }
      // A finally that yields: its sends and replies are performed, and the yield resumes at
      // once with a shutdown event carrying the close reason.
      this.#tracer?.actions(step.value);
      this.#performClosing(step.value);
      const shutdown: Event<T> = { type: "shutdown", reason: this.#rareOrNone.closeReason };
      this.#tracer?.event(shutdown);
      try {
        step = gen.next(shutdown);
      } catch (err) {
        return this.#finallyThrew(err);
      }
    }
  }

  #finallyThrew(err: unknown): void {
    this.#gen = null;
    this.#at = HandlerAt.Gone;
    this.#rareMade.closeReason = err;
    this.#finish(false, true);
  }

  // While ending, only output is performed: `send` and `reply`. Timers, hibernate, recv and a
  // second stop have nothing left to act on.
  #performClosing(yielded: Yielded): void {
    const actions = Array.isArray(yielded) ? yielded : yielded === undefined ? NONE : [yielded];
    for (const action of actions as Action[]) {
      try {
        if (action?.type === "send") {
          (this.#outbox ??= new Outbox(this.socket, this)).encode(
            this.#framing,
            action.data as T,
          );
          this.#framesSent++;
        } else if (action?.type === "reply") replyTo(action.from, action.value);
      } catch (err) {
        this.#opts.logger.warn(
          `etcp: connection ${this.handle.id}: action in finally failed: ${describeReason(err)}`,
        );
      }
    }
    this.#outbox?.flushSoon();
  }

  #lowerEndBy(at: number): void {
    const clock = this.#rareMade.endClock ??= {
      by: Infinity,
      timer: undefined,
      timerAt: Infinity,
      fire: () => this.#endDeadline(),
    };
    if (at < clock.by) {
      clock.by = at;
      if (clock.timer !== undefined) this.#armEndTimer();
    }
  }

  // (Re)arm the end timer for the end deadline, unless it is armed for that already.
  #armEndTimer(): void {
    const clock = this.#rareOrNone.endClock;
    if (clock === null || clock.by === Infinity || clock.timerAt === clock.by) return;
    clearTimer(clock.timer);
    clock.timerAt = clock.by;
    clock.timer = startTimer(clock.fire, Math.max(0, clock.by - performance.now()));
  }

  // The end deadline passed: stop waiting for whatever is still going.
  #endDeadline(): void {
    const rare = this.#rare!; // (its end clock is there)
    const clock = rare.endClock!;
    clock.timer = undefined;
    clock.timerAt = Infinity;
    const forced = this.#phase === Phase.Open;
    if (forced) {
      // Shut down and not ended in time: forced.
      this.#phase = Phase.Ending;
      rare.closeReason = rare.shutdownReason?.reason ?? "shutdown";
    }
    // Whatever output is still pending is dropped: the peer had until now to read it.
    this.#outbox?.abort(new ConnectionClosed(this.handle.id, rare.closeReason));
    if (this.#phase === Phase.Finishing) return closeQuietly(this.socket); // was lingering
    if (forced && this.#at !== HandlerAt.Stepping) {
      // At a yield: its finally runs, with until the next macrotask to complete.
      clock.by = performance.now();
      this.#closeGenerator();
      if (this.#phase === Phase.Ending) this.#armEndTimer();
      return;
    }
    // A stuck step, or (after a stop) a stuck finally or the step before it: do not wait.
    this.#abandon();
  }

  // Leave a stuck handler behind: its step or finally may settle later; nothing waits for it.
  #abandon(): void {
    const gen = this.#gen;
    if (gen !== null && this.#at === HandlerAt.Stepping) {
      // Its finally runs once the stuck step settles, if it ever does.
      Promise.resolve().then(() => gen.return(undefined)).catch(() => {});
    }
    this.#gen = null;
    this.#at = HandlerAt.Gone;
    this.#finish(true, true);
  }

  // Linger for pending output (unless forced or broken), close the socket, settle whoever
  // waits, leave the registry, report. Once.
  async #finish(forced: boolean, log: boolean): Promise<void> {
    if (this.#phase >= Phase.Finishing) return;
    this.#phase = Phase.Finishing;
    this.#clearTimers();
    if (this.fairWindow >= 0) leaveFairShare(this); // a read it held back will never be issued
    if (this.#opts.kind !== "server") clientEnded(this, this.socket);
    const rare = this.#rareMade; // (the end made it: its reason is there)
    const reason = rare.closeReason;
    if (rare.starting !== null) this.#settleStart(true, reason); // ended before its first step
    const outbox = this.#outbox;
    if (!forced && outbox !== null && outbox.broken === null && outbox.bytesPending > 0) {
      // Bounded: the end timer closes the socket at the end deadline, which ends the write.
      this.#armEndTimer();
      await outbox.drained();
    }
    if (rare.endClock !== null) {
      clearTimer(rare.endClock.timer);
      rare.endClock.timer = undefined;
    }
    closeQuietly(this.socket);
    this.#phase = Phase.Releasing; // no deadline left to keep: a later stop() arms no timer
    const closedErr = new ConnectionClosed(this.handle.id, reason);
    if (rare.callRefs !== null) {
      for (const ref of rare.callRefs) {
        const call = pendingCalls.get(ref)!;
        pendingCalls.delete(ref);
        clearTimer(call.timer);
        call.reject(closedErr);
      }
      rare.callRefs = null;
    }
    outbox?.abort(closedErr);
    this.#queue = NONE;
    this.#head = this.#tail = 0;
    if (this.#passive !== null) this.#passive.framesHeld = NONE;
    try {
      const removed = this.#opts.registry.remove(this.handle.id);
      if (isPromise(removed)) await removed.catch(() => {});
    } catch { /* the registry logs its own trouble */ }
    try {
      if (log) this.#report(reason);
      this.#tracer?.noteValue("close", reason);
      this.#opts.onClose?.(this.handle);
    } finally {
      // (A throw above would be our bug, and surface as an unhandled rejection; closed resolves
      // all the same, so no stop() waits for ever on this connection.)
      this.#phase = Phase.Closed;
      rare.resolveClosed?.(reason);
    }
  }

  // Abnormal ends are logged once: a peer's fault as one line at warn, a handler's crash with
  // its stack at error, a custom stop reason as one line at debug.
  #report(reason: unknown): void {
    if (isNormalReason(reason)) return;
    const logger = this.#opts.logger;
    const what = `etcp: connection ${this.handle.id} (${formatAddr(this.socket.remoteAddr)}) ended`;
    if (!(reason instanceof Error)) logger.debug(`${what}:`, reason);
    else if (isPeerFault(reason)) logger.warn(`${what}: ${describeReason(reason)}`);
    else logger.error(`${what}:`, reason);
  }

  #clearTimers(): void {
    const rare = this.#rare;
    if (rare === null) return;
    clearTimeout(rare.eventTimer);
    rare.eventTimer = undefined;
    rare.eventDeadline = Infinity;
    for (const { timer } of rare.named?.values() ?? []) clearTimer(timer);
    rare.named = null;
    this.#clearRecv();
  }

  // ---- Mailbox -----------------------------------------------------------------------------------

  #push(ev: Event<T>): void {
    if (this.#phase !== Phase.Open) return;
    if (this.#queue === NONE) this.#queue = [];
    this.#queue[this.#tail++] = ev;
    if (ev.type !== "packet") this.#lastEventAt = turnStamp(); // (packets: stamped per read)
    if (ev.type === "packet") this.#packetsQueued++;
    else if (this.#waitingForEvent && !this.#wakeQueued) {
      // Woken in a microtask, not here: whoever sent this (another handler, perhaps) goes on
      // first, as with any asynchronous message.
      this.#wakeQueued = true;
      queueMicrotask(
        this.#wakeTask ??= () => {
          this.#wakeQueued = false;
          if (this.#waitingForEvent) this.#continue();
        },
      );
    }
  }

  #unshift(ev: Event<T>): void {
    if (this.#head > 0) this.#queue[--this.#head] = ev;
    else {
      if (this.#queue === NONE) this.#queue = [ev];
      else this.#queue.unshift(ev);
      this.#tail++;
    }
    if (ev.type === "packet") this.#packetsQueued++;
  }

  #take(): Event<T> | undefined {
    if (this.#head === this.#tail) return undefined;
    const ev = this.#queue[this.#head]!;
    this.#queue[this.#head++] = undefined;
    if (this.#head === this.#tail) {
      this.#head = this.#tail = 0;
    }
    if (ev.type === "packet") this.#packetsQueued--;
    else if (ev.type === "timeout") this.#timeoutTaken(ev);
    else if (ev.type === "frameError") this.#rareMade.frameError = FrameErrorAt.Taken;
    else if (ev.type === "disconnect" && ev.side === "read") this.#readEndTaken = true;
    else if (this.#passive !== null && ev === this.#passive.timeoutQueued) {
      this.#passive.timeoutQueued = null;
    }
    if (this.#rare !== null) this.#rare.eventDeadline = Infinity; // any event cancels it
    return ev;
  }

  // Take back an event not yet delivered (a timer's, when the timer is cancelled or re-armed).
  #withdraw(ev: Event<T>): void {
    const at = this.#queue.indexOf(ev, this.#head);
    if (at >= 0 && at < this.#tail) {
      this.#queue.splice(at, 1);
      this.#tail--;
    }
  }

  deliver(ev: Event<T>): void {
    this.#push(ev);
  }

  // ---- Reading -----------------------------------------------------------------------------------
  //
  // One read at a time, chained by callbacks. Active mode: after a read that produced frames,
  // the next read waits until the handler has acted on them and asks for its next event with
  // fewer than highWaterMark frames queued (#resumeReader), so a slow handler slows its peer,
  // and a handler that hibernates is parked before the next read is issued.

  #read(): void {
    if (this.#input !== Input.Idle || this.#phase !== Phase.Open) return;
    if (this.#outbox?.writingLent) {
      // A lent frame is being written from the read memory: read into it once it is out.
      this.#readAfterLent = true;
      return;
    }
    this.#input = Input.Reading;
    // Past 120 busy connections with both ends here, reads take turns (_fair_share.ts): then
    // takeTurn reads.
    if (this.fairWindow < 0 || !mustWait(this)) this.#issueRead();
  }

  /** The read held back by the fair-share gate: its turn came (see _fair_share.ts). */
  takeTurn(): void {
    if (this.#phase === Phase.Open) this.#issueRead();
  }

  #issueRead(): void {
    const decoder = this.#decoder; // (none: dropped while hibernated, holding nothing)
    const buf = decoder?.readInto?.() ?? // the rest of a large frame, read in place
      (this.#at === HandlerAt.Hibernated && (decoder?.buffered ?? 0) === 0
        ? this.#parkBuf ??= parkSlot() // parked on the smallest read
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

  #readDone(n: number | null): void {
    if (this.#phase !== Phase.Open) return;
    if (n === null) return this.#readEnded(undefined);
    this.#input = Input.Idle;
    if (this.#bytesRead === 0 && this.#opts.kind === "server") serverHeard(this, this.socket);
    this.#bytesRead += n;
    this.#lastEventAt = turnStamp(); // (per read, not per frame)
    const buf = this.#readingInto!;
    this.#readingInto = null;
    const before = this.#framesDecoded;
    // (The last chunk's view again when this read filled as many bytes of the same buffer.)
    const last = this.#chunk;
    const chunk = n === buf.length
      ? buf
      : last !== null && this.#chunkOf === buf && last.length === n
      ? last
      : buf.subarray(0, n);
    this.#chunkOf = buf;
    this.#chunk = chunk; // (kept for setFraming; read into again only after the handler acts)
    const decoder = this.#dec;
    this.#chunkHeld = decoder.buffered;
    this.#chunkFramesAt = before;
    try {
      decoder.decode(chunk, this.#emit ??= (frame: T) => this.#frameDecoded(frame));
    } catch (err) {
      return this.#badInput(err);
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
      if (this.#passive!.recvWanted) this.#read();
    } else if (this.#framesDecoded === before) {
      this.#read(); // no whole frame yet
    } else {
      this.#input = Input.Held;
      if (this.#waitingForEvent) this.#continue();
    }
  }

  #frameDecoded(frame: T): void {
    this.#framesDecoded++;
    if (this.#passive !== null) {
      const passive = this.#passive;
      if (passive.framesHeld === NONE) passive.framesHeld = [];
      passive.framesHeld.push(frame);
    } else this.#push({ type: "packet", data: frame });
  }

  // A framing error: nothing more is read. The frames decoded before it are delivered first,
  // then a frameError event; the connection ends when the handler asks for more.
  #badInput(err: unknown): void {
    this.#input = Input.Ended;
    this.#rareMade.inputError = err instanceof Error ? err : new MalformedFrame(String(err));
    if (this.#opts.mode === "active") this.#queueFrameError();
    else this.#deliverFrame(); // to a waiting recv
    if (this.#waitingForEvent) this.#continue();
  }

  #queueFrameError(): void {
    const rare = this.#rare!; // (the framing error is there)
    rare.frameError = FrameErrorAt.Queued;
    this.#push({ type: "frameError", error: rare.inputError! });
  }

  #readFailed(err: unknown): void {
    if (this.#phase !== Phase.Open) return;
    this.#readEnded(err instanceof Error ? err : new Error(String(err)));
  }

  // The read side ended: the handler hears of it once (in passive mode, at its recv).
  #readEnded(error: Error | undefined): void {
    this.#input = Input.Ended;
    this.#readingInto = null;
    if (this.#opts.mode === "active") this.#pushDisconnect("read", error);
    else if (this.#passive!.recvWanted) {
      this.#passive!.recvWanted = false;
      this.#clearRecv();
      this.#pushDisconnect("read", error);
    } else this.#passive!.readError = error;
  }

  #pushDisconnect(side: "read" | "write", error: Error | undefined): void {
    this.#push(disconnectEvent(side, error));
  }

  // Called when the handler asks for its next event (so after it acted on the last one, and
  // knows whether it hibernates): the reader goes on unless the mailbox is full.
  #resumeReader(): void {
    if (this.#readAfterLent) {
      // A read put off for a lent frame's write (#read): issued once that is out.
      if (this.#outbox?.writingLent !== true) {
        this.#readAfterLent = false;
        this.#read();
      }
      return;
    }
    if (
      this.#input === Input.Held &&
      // Lent frames are valid until the next read: it waits until the handler has them all.
      this.#packetsQueued < (this.#decoder?.lends === true ? 1 : this.#opts.highWaterMark)
    ) {
      this.#input = Input.Idle;
      this.#read();
    }
  }

  // Passive mode: a recv asks for one frame.
  #requestFrame(timeoutMs: number | undefined): void {
    const passive = this.#passive!;
    passive.recvWanted = true;
    this.#clearRecv();
    if (passive.timeoutQueued !== null) {
      // A recvTimeout of an earlier recv that the handler has not taken yet is stale now.
      this.#withdraw(passive.timeoutQueued);
      passive.timeoutQueued = null;
    }
    if (timeoutMs !== undefined) {
      passive.timer = startTimer(() => {
        passive.timer = undefined;
        if (!passive.recvWanted) return;
        passive.recvWanted = false;
        const ev: Event<T> = { type: "recvTimeout" };
        passive.timeoutQueued = ev;
        this.#push(ev);
      }, timeoutMs);
    }
    if (passive.framesHeld.length > 0 || this.#input === Input.Ended) this.#deliverFrame();
    else this.#read();
  }

  // Passive mode: answer a waiting recv with a held frame, or the end of input.
  #deliverFrame(): void {
    const passive = this.#passive!;
    if (!passive.recvWanted) return;
    let ev: Event<T>;
    if (passive.framesHeld.length > 0) ev = { type: "packet", data: passive.framesHeld.shift()! };
    else if (this.#input !== Input.Ended) return;
    else if (this.#rareOrNone.inputError !== null) {
      if (this.#rare!.frameError !== FrameErrorAt.None) return;
      passive.recvWanted = false;
      this.#clearRecv();
      return this.#queueFrameError();
    } else {
      ev = disconnectEvent("read", passive.readError);
    }
    passive.recvWanted = false;
    this.#clearRecv();
    this.#push(ev);
    if (this.#waitingForEvent) this.#continue();
  }

  #clearRecv(): void {
    const passive = this.#passive;
    if (passive !== null && passive.timer !== undefined) {
      clearTimer(passive.timer);
      passive.timer = undefined;
    }
  }

  // ---- Writing -----------------------------------------------------------------------------------

  /** A send from outside the handler (`conn.send`, `conn.sendSync`). */
  sendFromOutside(data: unknown, sync: boolean): Promise<void> | undefined {
    if (this.#phase !== Phase.Open) {
      if (!sync) return undefined;
      return Promise.reject(new ConnectionClosed(this.handle.id, this.#rareOrNone.closeReason));
    }
    const outbox = this.#outbox ??= new Outbox(this.socket, this);
    if (outbox.broken !== null || outbox.writeClosed) {
      outbox.encode(this.#framing, data as T); // dropped and counted
      this.#framesSent++;
      if (!sync) return undefined;
      const why = outbox.broken ??
        new Deno.errors.BrokenPipe("its writing side was closed (closeWrite)");
      return Promise.reject(new ConnectionClosed(this.handle.id, why));
    }
    const limit = this.#opts.maxBuffered;
    if (outbox.bytesPending > limit) {
      // A slow consumer: the peer does not read what it is sent.
      const err = new BufferFull(this.handle.id, outbox.bytesPending, limit);
      if (this.#opts.onBufferFull === "stop") {
        outbox.abort(err);
        this.#end(err);
        closeQuietly(this.socket); // frees what the socket holds, ends a write under way
      }
      if (sync) return Promise.reject(err);
      if (this.#opts.onBufferFull === "throw") throw err;
      return undefined;
    }
    try {
      outbox.encode(this.#framing, data as T);
    } catch (err) {
      if (sync) return Promise.reject(err);
      throw err;
    }
    this.#framesSent++;
    // Coalesce sends made in the same tick into one write.
    outbox.flushSoon();
    return sync ? outbox.written() : undefined;
  }

  /** Resolves once nothing is pending. */
  drain(): Promise<void> {
    return this.#outbox?.drained() ?? Promise.resolve();
  }

  // From the outbox: nothing is being written any more.
  outboxDrained(): void {
    // (Not while switching to TLS: the plain socket must not be read; the switch reads after.)
    if (this.#readAfterLent && this.#at !== HandlerAt.SwitchingTls) {
      this.#readAfterLent = false;
      this.#read();
    }
    if (this.#at === HandlerAt.AwaitingDrain && this.#phase === Phase.Open) this.#continue();
    // (Hibernated with the last step's sends in flight: they are out now.)
    else if (this.#at === HandlerAt.Hibernated) this.#dropIdleOutbox();
  }

  // From the outbox: a write failed. Reading goes on; the handler hears of it once.
  outboxFailed(error: Error): void {
    if (this.#rareOrNone.writeEndReported || this.#phase !== Phase.Open) return;
    this.#rareMade.writeEndReported = true;
    this.#pushDisconnect("write", error);
  }

  // ---- Timers ------------------------------------------------------------------------------------

  #armEventTimeout(ms: number | null): void {
    if (ms === null || ms === Infinity) {
      if (this.#rare !== null) this.#rare.eventDeadline = Infinity;
      return;
    }
    const rare = this.#rareMade;
    const at = performance.now() + ms;
    rare.eventDeadline = at;
    // A timer already due no later than the new deadline is kept: it re-arms itself for the
    // rest when it fires. That makes re-arming per packet cost no timer call.
    if (rare.eventTimer !== undefined && rare.eventTimerAt <= at) return;
    clearTimeout(rare.eventTimer);
    rare.eventTimerAt = at;
    rare.eventTimer = setTimeout(
      rare.onEventTimer ??= () => this.#eventTimerFired(),
      Math.min(ms, MAX_DELAY),
    );
  }

  #eventTimerFired(): void {
    const rare = this.#rare!; // (#armEventTimeout made it)
    rare.eventTimer = undefined;
    rare.eventTimerAt = Infinity;
    const deadline = rare.eventDeadline;
    if (deadline === Infinity || this.#phase !== Phase.Open) return;
    const left = deadline - performance.now();
    if (left > 1) {
      rare.eventTimerAt = deadline;
      rare.eventTimer = setTimeout(rare.onEventTimer!, Math.min(left, MAX_DELAY));
      return;
    }
    rare.eventDeadline = Infinity;
    if (rare.idleArmed) {
      rare.idleArmed = false;
      // Idle: nothing came, or the handler has been held all along by a peer that does not
      // read its output (events may wait behind that: they do not make it any less stuck).
      if (this.#head === this.#tail || this.#at === HandlerAt.AwaitingDrain) {
        this.shutdown("idle");
      }
      return;
    }
    // An event already waits in the mailbox (the handler is held back, by a slow peer say):
    // it came in time, and taking it cancels the timeout.
    if (this.#head < this.#tail) return;
    this.#push({ type: "timeout" });
  }

  #armIdle(): void {
    this.#rareMade.idleArmed = true;
    this.#armEventTimeout(this.#opts.idleTimeout!);
  }

  #armNamed(name: string, ms: number | null): void {
    const named = this.#rare?.named;
    const old = named?.get(name);
    if (old !== undefined) {
      clearTimer(old.timer);
      // Fired but not yet delivered: a cancel or a re-arm takes its event back.
      if (old.fired !== null) this.#withdraw(old.fired);
      named!.delete(name);
    }
    if (ms === null || ms === Infinity) return;
    const entry: { timer: Timer; fired: TimeoutEvent | null } = { timer: undefined, fired: null };
    entry.timer = startTimer(() => {
      entry.timer = undefined;
      entry.fired = { type: "timeout", name };
      this.#push(entry.fired);
    }, ms);
    (this.#rareMade.named ??= new Map()).set(name, entry);
  }

  // A named timer's event is delivered: its entry goes (a cancel now has nothing to take back).
  #timeoutTaken(ev: TimeoutEvent): void {
    const named = this.#rare?.named;
    if (ev.name !== undefined && named?.get(ev.name)?.fired === ev) named.delete(ev.name);
  }

  // ---- Messages from outside ---------------------------------------------------------------------

  // A call to this connection was answered (from any handler).
  forgetCall(ref: number): void {
    this.#rareOrNone.callRefs?.delete(ref);
  }

  call(message: unknown, timeout: number): Promise<unknown> {
    if (this.#phase !== Phase.Open) {
      return Promise.reject(new ConnectionClosed(this.handle.id, this.#rareOrNone.closeReason));
    }
    return new Promise((resolve, reject) => {
      const ref = ++nextCall;
      const timer = startTimer(() => {
        pendingCalls.delete(ref);
        this.#rareOrNone.callRefs?.delete(ref);
        reject(
          new TimeoutError(`call to connection ${this.handle.id} timed out after ${timeout} ms`),
        );
      }, timeout);
      pendingCalls.set(ref, { resolve, reject, timer, callee: this as Driver<unknown> });
      (this.#rareMade.callRefs ??= new Set()).add(ref);
      const from: From = { ref };
      this.#push({ type: "call", message, from });
    });
  }

  register(name: string): Promise<boolean> {
    if (this.#phase !== Phase.Open) return Promise.resolve(false);
    // (A registry that refuses the name by throwing rejects, rather than throwing here.)
    return new Promise<boolean>((resolve) =>
      resolve(this.#opts.registry.claim(this.handle.id, name))
    ).then((ok) => {
      if (ok) this.name = name;
      return ok;
    });
  }

  upgrade(handler: Handler<T>, codeChange?: CodeChange): void {
    if (this.#phase !== Phase.Open) return;
    if (this.#rareOrNone.upgrades === NONE) this.#rareMade.upgrades = [];
    this.#rareOrNone.upgrades.push({ handler, codeChange });
    if (this.#at !== HandlerAt.Hibernated) this.#push({ type: "upgrade", handler });
  }

  /**
   * Whether the socket keeps the process alive (`conn.ref()`, `conn.unref()`), kept for the
   * socket a STARTTLS switch puts in its place.
   */
  setReferenced(on: boolean): void {
    if (!on || this.#rare !== null) this.#rareMade.unreferenced = !on;
    if (on) this.socket.ref?.();
    else this.socket.unref?.();
  }

  /**
   * Ask the handler to finish (a `shutdown` event, once), and bring the end deadline to within
   * `timeout` ms, until the socket is closed (from Releasing on there is no deadline left): the
   * earliest deadline wins.
   */
  shutdown(reason: unknown, timeout = this.#opts.shutdownTimeout): Promise<void> {
    if (this.#phase === Phase.Open && this.#rareOrNone.shutdownReason === null) {
      this.#rareMade.shutdownReason = { reason };
      this.#push({ type: "shutdown", reason });
    }
    if (this.#phase < Phase.Releasing) {
      this.#lowerEndBy(performance.now() + timeout);
      this.#armEndTimer();
    }
    return this.closed.then(() => {});
  }
}

// Where the `count`-th frame from `from` ends in `bytes`, decoding them again one byte at a time
// with a fresh decoder of `framing` (setFraming's switch point: rare, so simple over fast).
function frameEnd<T>(framing: Framing<T>, bytes: Uint8Array, from: number, count: number): number {
  if (count === 0) return from;
  const decoder = framing.decoder();
  let frames = 0;
  const emit = () => frames++;
  for (let i = from; i < bytes.length; i++) {
    decoder.decode(bytes.subarray(i, i + 1), emit);
    if (frames >= count) return i + 1;
  }
  return bytes.length;
}

// A disconnect event of one side, with `error` only if there is one.
function disconnectEvent(side: "read" | "write", error: Error | undefined): DisconnectEvent {
  return error ? { type: "disconnect", side, error } : { type: "disconnect", side };
}

// Resolve the call `from` came with, wherever it waits.
function replyTo(from: From, value: unknown): void {
  const ref = from?.ref;
  const call = pendingCalls.get(ref);
  if (call === undefined) return; // timed out, or its connection closed: too late
  pendingCalls.delete(ref);
  call.callee.forgetCall(ref);
  clearTimer(call.timer);
  call.resolve(value);
}
