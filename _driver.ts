// The driver: one per connection. It steps the handler's generator, keeps its mailbox, reads and
// decodes, hands output to the outbox, runs the timers, and owns the end of the connection.
//
// Its state is two numbers. `#phase` says how far the connection's life has gone:
//
//   Open ──(return, throw, stop, bad input, forced)──▶ Ending ──(finally done)──▶ Finishing ──▶ Closed
//                                                       │ handler's finally runs  │ output lingers,
//                                                       │ (its yields performed)  │ socket closes,
//                                                       ▼                         ▼ entry removed
//                                          both bounded by one deadline (#endClock)
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
import { Connection, type Logger, type Mode } from "./connection.ts";
import { KEEP_WRITE_BUFFER, Outbox, type OutboxOwner } from "./_outbox.ts";
import { clearTimer, isDelay, MAX_DELAY, startTimer, type Timer } from "./_timer.ts";
import { upgradeTls } from "./transport/tls.ts";
import { withTimeout } from "./_with_timeout.ts";
import { closeQuietly, formatAddr } from "./_socket.ts";

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
}

// Reads start small (idle connections cost little) and grow while reads fill them.
const MIN_READ = 1024;
const MAX_READ = 64 * 1024;
const SHRINK_AFTER = 16;
// Pending output past which the handler is not resumed until the peer has read some.
const WRITE_HIGH_WATER = 1024 * 1024;
// A finally that yields more often than this is cut off (a loop waiting for events that
// never come, in a sync generator, would otherwise hold the thread).
const MAX_CLOSING_STEPS = 1000;

// Shared by every connection until it needs an array of its own, so that idle connections
// stay small. Frozen: a push onto it would be a bug, and throws.
const NONE: never[] = Object.freeze([]) as unknown as never[];

const enum Phase {
  Open,
  Ending,
  Finishing,
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

function isPromise<V>(value: V | Promise<V>): value is Promise<V> {
  return typeof (value as { then?: unknown })?.then === "function";
}

// Ends caused by the peer, not by the code: one short line at warn, no stack trace.
function isPeerFault(reason: unknown): boolean {
  return reason instanceof FrameTooLarge || reason instanceof MalformedFrame ||
    reason instanceof BufferFull || reason instanceof Deno.errors.ConnectionReset ||
    reason instanceof Deno.errors.BrokenPipe || reason instanceof Deno.errors.ConnectionAborted ||
    reason instanceof Deno.errors.UnexpectedEof || reason instanceof Deno.errors.TimedOut;
}

export class Driver<T> implements OutboxOwner {
  // ---- Identity and settings -------------------------------------------------------------------
  socket: Conn; // replaced once if the connection switches to TLS
  readonly handle: Connection<T>;
  readonly #opts: DriverOptions<T>;
  name: string | undefined;

  // ---- Lifecycle ---------------------------------------------------------------------------------
  #phase = Phase.Open;
  #closeReason: unknown = undefined; // fixed when the phase leaves Open
  #endClock: EndClock | null = null; // made when an end or a shutdown is first asked for
  #shutdownReason: { reason: unknown } | null = null; // a shutdown event was sent
  #closed: Promise<unknown> | null = null; // made when first asked for
  #resolveClosed: ((reason: unknown) => void) | null = null;

  // ---- Handler -----------------------------------------------------------------------------------
  #at = HandlerAt.NotStarted;
  #handler: Handler<T>;
  #gen: AsyncGenerator<Yielded, void, Event<T>> | Generator<Yielded, void, Event<T>> | null = null;
  #async = false; // the handler is an async generator
  #state: unknown = undefined; // given to hibernate, passed to the next generator
  #upgrades: Array<{ handler: Handler<T>; codeChange?: CodeChange }> = NONE; // in order
  #stopReason: unknown = "normal";
  #tlsSwitch: { options: StartTlsOptions; plain: Outbox | null } | null = null; // startTls, until it runs
  #onStep: ((step: IteratorResult<Yielded, void>) => void) | null = null;
  #onStepError: ((err: unknown) => void) | null = null;

  // ---- Mailbox -----------------------------------------------------------------------------------
  #queue: Array<Event<T> | undefined> = NONE;
  #head = 0;
  #packetsQueued = 0; // for flow control
  #wakeQueued = false;
  #wakeTask: (() => void) | null = null;

  // ---- Reading -----------------------------------------------------------------------------------
  #input = Input.Idle;
  readonly #decoder: Decoder<T>;
  #emit: ((frame: T) => void) | null = null; // made on first use, dropped when hibernating
  #readBuf: Uint8Array | null = null;
  #parkBuf: Uint8Array | null = null;
  #readingInto: Uint8Array | null = null; // the buffer of the read under way
  #onRead: ((result: number | null | Error) => void) | null = null; // one callback, both outcomes
  #smallReads = 0; // consecutive reads that used little of a grown buffer
  #framesDecoded = 0;
  #bytesRead = 0;
  #inputError: Error | null = null; // the framing failed: delivered as frameError, then the end
  #frameError = FrameErrorAt.None;
  readonly #passive: Passive<T> | null; // passive mode only

  // ---- Writing -----------------------------------------------------------------------------------
  #outbox: Outbox | null = null; // made on first send, dropped when hibernating with none pending
  #bytesWrittenBefore = 0; // by outboxes dropped since
  #framesDroppedBefore = 0;
  #writeEndReported = false;

  // ---- Timers ------------------------------------------------------------------------------------
  #eventDeadline = Infinity; // of the event timeout
  #eventTimer: ReturnType<typeof setTimeout> | undefined;
  #eventTimerAt = Infinity;
  #onEventTimer: (() => void) | null = null;
  #armedTimeout = false; // the current step armed the event timeout itself
  #idleArmed = false; // the armed event timeout is the idle timeout
  #named: Map<string, { timer: Timer; fired: TimeoutEvent | null }> | null = null;
  #callRefs: Set<number> | null = null; // calls to this connection awaiting a reply

  constructor(socket: Conn, handler: Handler<T>, opts: DriverOptions<T>) {
    this.socket = socket;
    this.#handler = handler;
    this.#opts = opts;
    this.handle = new Connection<T>(this);
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
  }

  // ---- What the handle reads ---------------------------------------------------------------------

  get closed(): Promise<unknown> {
    if (this.#closed === null) {
      this.#closed = this.#phase === Phase.Closed
        ? Promise.resolve(this.#closeReason)
        : new Promise((resolve) => this.#resolveClosed = resolve);
    }
    return this.#closed;
  }

  get closeReason(): unknown {
    if (this.#phase !== Phase.Open) return this.#closeReason;
    // Open, but past a frameError: that error is how it ends, even if the handler returns.
    return this.#frameError === FrameErrorAt.Taken ? this.#inputError : undefined;
  }

  get hibernating(): boolean {
    return this.#at === HandlerAt.Hibernated;
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
        startedAt: Date.now(),
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
    if (this.#opts.mode === "active") this.#read();
    this.#loop(undefined);
  }

  /** Give up a connection that never started (its name was taken): close, forget, no log. */
  discard(reason: unknown): Promise<void> {
    this.#phase = Phase.Ending;
    this.#closeReason = reason;
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
      const upgrades = this.#upgrades;
      if (upgrades.length > 0) {
        this.#upgrades = NONE;
        try {
          for (const { handler, codeChange } of upgrades) {
            this.#handler = handler;
            if (codeChange) this.#state = codeChange(this.#state);
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
    if (typeof gen?.next !== "function") {
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
    if (step.done) {
      this.#gen = null;
      this.#at = HandlerAt.Gone;
      // (A framing error not yet taken still names the end: the input was bad.)
      if (this.#phase === Phase.Open) this.#end(this.#inputError ?? "normal");
      else this.#closeGenerator(); // ended meanwhile: nothing left to close but the rest
      return undefined;
    }
    if (this.#phase !== Phase.Open) {
      // Ending since the step began (its peer overran the send buffer, say): its actions are
      // performed as a finally's are, then the finally runs.
      this.#performClosing(step.value);
      return undefined;
    }
    this.#armedTimeout = false;
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
    if (this.#opts.idleTimeout !== undefined && !this.#armedTimeout) this.#armIdle();
    if (this.#tlsSwitch !== null && outcome === Run.Stop) {
      this.#cancelTlsSwitch(); // stop wins: what was sent before goes out plain
    }
    if (outcome === Run.Stop) {
      this.#end(this.#stopReason);
      return undefined;
    }
    if (outcome === Run.StartTls) {
      this.#switchToTls();
      return undefined;
    }
    const outbox = this.#outbox;
    if (outcome === Run.Hibernate) {
      this.#gen = null; // dropped: its finally does not run
      this.#at = HandlerAt.Hibernated;
      this.#releaseBuffers();
    } else if (outbox !== null) {
      if (outbox.unflushed >= KEEP_WRITE_BUFFER) outbox.flush();
      else if (outbox.unflushed > 0 && this.#async && this.#head < this.#queue.length) {
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
    this.#resumeReader();
    const ev = this.#take();
    if (ev !== undefined) return ev;
    if (this.#frameError === FrameErrorAt.Taken) {
      // The handler has seen the frameError event and asks for more: there is no more.
      this.#end(this.#inputError);
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
    this.#readBuf = null;
    const outbox = this.#outbox;
    if (outbox !== null) {
      outbox.flush();
      if (outbox.idle) {
        this.#bytesWrittenBefore += outbox.bytesWritten;
        this.#framesDroppedBefore += outbox.framesDropped;
        this.#outbox = null;
      }
    }
    this.#onStep = this.#onStepError = null;
    this.#emit = this.#wakeTask = null;
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
      case "send":
        (this.#outbox ??= new Outbox(this.socket, this)).encode(
          this.#opts.framing,
          action.data as T,
        );
        return Run.Continue;
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
      case "startTls":
        if (this.#tlsSwitch !== null) throw new ProtocolError("one startTls per yield");
        this.#checkTlsSwitch();
        // Sends after it, even in the same yield, wait for the switch in an outbox of their own.
        this.#tlsSwitch = { options: action.options ?? {}, plain: this.#outbox };
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
      default:
        throw new ProtocolError(
          `handler yielded something that is not an action: ${describeReason(action)}`,
        );
    }
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
      this.#decoder.buffered > 0 || this.#packetsQueued > 0 ||
      (this.#passive !== null && this.#passive.framesHeld.length > 0)
    ) {
      throw new ProtocolError("startTls: bytes were read past the switch point");
    }
  }

  // A startTls yielded with stop, or with an action that failed: nothing switches, and what was
  // sent before it is written as it is.
  #cancelTlsSwitch(): void {
    if (this.#tlsSwitch === null) return;
    this.#outbox = this.#tlsSwitch.plain;
    this.#tlsSwitch = null;
  }

  #switchToTls(): void {
    this.#at = HandlerAt.SwitchingTls;
    const { options, plain } = this.#tlsSwitch!;
    this.#tlsSwitch = null;
    const written = plain === null ? Promise.resolve() : plain.drained();
    written.then(() => {
      if (plain !== null) {
        if (plain.broken !== null) throw plain.broken;
        this.#bytesWrittenBefore += plain.bytesWritten;
      }
      if (this.#phase !== Phase.Open) return undefined;
      const role = this.#opts.kind === "server" ? "server" : "client";
      const switching = upgradeTls(this.socket, { ...options, role }).then((tls) =>
        tls.handshake().then(() => tls)
      );
      // Bounded as any handshake: a peer that stalls it costs only its connection.
      return withTimeout(
        switching,
        this.#opts.handshakeTimeout,
        "STARTTLS handshake",
        (late) => closeQuietly(late),
      );
    }).then((tls) => {
      if (tls === undefined) return;
      if (this.#phase !== Phase.Open) return closeQuietly(tls);
      this.socket = tls;
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
    if (reason === "normal" && this.#frameError === FrameErrorAt.Taken) reason = this.#inputError;
    this.#phase = Phase.Ending;
    this.#closeReason = reason;
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
      if (step.done || ++steps > MAX_CLOSING_STEPS) {
        this.#gen = null;
        this.#at = HandlerAt.Gone;
        this.#finish(false, true);
        return;
      }
      // A finally that yields: its sends and replies are performed, and the yield resumes at
      // once with a shutdown event carrying the close reason.
      this.#performClosing(step.value);
      try {
        step = gen.next({ type: "shutdown", reason: this.#closeReason });
      } catch (err) {
        return this.#finallyThrew(err);
      }
    }
  }

  #finallyThrew(err: unknown): void {
    this.#gen = null;
    this.#at = HandlerAt.Gone;
    this.#closeReason = err;
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
            this.#opts.framing,
            action.data as T,
          );
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
    const clock = this.#endClock ??= {
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
    const clock = this.#endClock;
    if (clock === null || clock.by === Infinity || clock.timerAt === clock.by) return;
    clearTimer(clock.timer);
    clock.timerAt = clock.by;
    clock.timer = startTimer(clock.fire, Math.max(0, clock.by - performance.now()));
  }

  // The end deadline passed: stop waiting for whatever is still going.
  #endDeadline(): void {
    const clock = this.#endClock!;
    clock.timer = undefined;
    clock.timerAt = Infinity;
    const forced = this.#phase === Phase.Open;
    if (forced) {
      // Shut down and not ended in time: forced.
      this.#phase = Phase.Ending;
      this.#closeReason = this.#shutdownReason?.reason ?? "shutdown";
    }
    // Whatever output is still pending is dropped: the peer had until now to read it.
    this.#outbox?.abort(new ConnectionClosed(this.handle.id, this.#closeReason));
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
    const reason = this.#closeReason;
    const outbox = this.#outbox;
    if (!forced && outbox !== null && outbox.broken === null && outbox.bytesPending > 0) {
      // Bounded: the end timer closes the socket at the end deadline, which ends the write.
      this.#armEndTimer();
      await outbox.drained();
    }
    if (this.#endClock !== null) {
      clearTimer(this.#endClock.timer);
      this.#endClock.timer = undefined;
    }
    closeQuietly(this.socket);
    const closedErr = new ConnectionClosed(this.handle.id, reason);
    if (this.#callRefs !== null) {
      for (const ref of this.#callRefs) {
        const call = pendingCalls.get(ref)!;
        pendingCalls.delete(ref);
        clearTimer(call.timer);
        call.reject(closedErr);
      }
      this.#callRefs = null;
    }
    outbox?.abort(closedErr);
    this.#queue = NONE;
    this.#head = 0;
    if (this.#passive !== null) this.#passive.framesHeld = NONE;
    try {
      const removed = this.#opts.registry.remove(this.handle.id);
      if (isPromise(removed)) await removed.catch(() => {});
    } catch { /* the registry logs its own trouble */ }
    if (log) this.#report(reason);
    this.#opts.onClose?.(this.handle);
    this.#phase = Phase.Closed;
    this.#resolveClosed?.(reason);
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
    clearTimeout(this.#eventTimer);
    this.#eventTimer = undefined;
    this.#eventDeadline = Infinity;
    for (const { timer } of this.#named?.values() ?? []) clearTimer(timer);
    this.#named = null;
    this.#clearRecv();
  }

  // ---- Mailbox -----------------------------------------------------------------------------------

  #push(ev: Event<T>): void {
    if (this.#phase !== Phase.Open) return;
    if (this.#queue === NONE) this.#queue = [];
    this.#queue.push(ev);
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
    else if (this.#queue === NONE) this.#queue = [ev];
    else this.#queue.unshift(ev);
    if (ev.type === "packet") this.#packetsQueued++;
  }

  #take(): Event<T> | undefined {
    if (this.#head === this.#queue.length) return undefined;
    const ev = this.#queue[this.#head]!;
    this.#queue[this.#head++] = undefined;
    if (this.#head === this.#queue.length) {
      this.#queue.length = 0;
      this.#head = 0;
    }
    if (ev.type === "packet") this.#packetsQueued--;
    else if (ev.type === "timeout") this.#timeoutTaken(ev);
    else if (ev.type === "frameError") this.#frameError = FrameErrorAt.Taken;
    else if (this.#passive !== null && ev === this.#passive.timeoutQueued) {
      this.#passive.timeoutQueued = null;
    }
    this.#eventDeadline = Infinity; // any event cancels the event timeout
    return ev;
  }

  // Take back an event not yet delivered (a timer's, when the timer is cancelled or re-armed).
  #withdraw(ev: Event<T>): void {
    const at = this.#queue.indexOf(ev, this.#head);
    if (at >= 0) this.#queue.splice(at, 1);
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
    this.#input = Input.Reading;
    const buf = this.#decoder.readInto?.() ?? // the rest of a large frame, read in place
      (this.#at === HandlerAt.Hibernated && this.#decoder.buffered === 0
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

  #readDone(n: number | null): void {
    if (this.#phase !== Phase.Open) return;
    if (n === null) return this.#readEnded(undefined);
    this.#input = Input.Idle;
    this.#bytesRead += n;
    const buf = this.#readingInto!;
    this.#readingInto = null;
    const before = this.#framesDecoded;
    try {
      this.#decoder.decode(
        n === buf.length ? buf : buf.subarray(0, n),
        this.#emit ??= (frame: T) => this.#frameDecoded(frame),
      );
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
    this.#inputError = err instanceof Error ? err : new MalformedFrame(String(err));
    if (this.#opts.mode === "active") this.#queueFrameError();
    else this.#deliverFrame(); // to a waiting recv
    if (this.#waitingForEvent) this.#continue();
  }

  #queueFrameError(): void {
    this.#frameError = FrameErrorAt.Queued;
    this.#push({ type: "frameError", error: this.#inputError! });
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
    if (this.#input === Input.Held && this.#packetsQueued < this.#opts.highWaterMark) {
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
    else if (this.#inputError !== null) {
      if (this.#frameError !== FrameErrorAt.None) return;
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
      return Promise.reject(new ConnectionClosed(this.handle.id, this.#closeReason));
    }
    const outbox = this.#outbox ??= new Outbox(this.socket, this);
    if (outbox.broken !== null) {
      outbox.encode(this.#opts.framing, data as T); // dropped and counted
      if (!sync) return undefined;
      return Promise.reject(new ConnectionClosed(this.handle.id, outbox.broken));
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
      outbox.encode(this.#opts.framing, data as T);
    } catch (err) {
      if (sync) return Promise.reject(err);
      throw err;
    }
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
    if (this.#at === HandlerAt.AwaitingDrain && this.#phase === Phase.Open) this.#continue();
  }

  // From the outbox: a write failed. Reading goes on; the handler hears of it once.
  outboxFailed(error: Error): void {
    if (this.#writeEndReported || this.#phase !== Phase.Open) return;
    this.#writeEndReported = true;
    this.#pushDisconnect("write", error);
  }

  // ---- Timers ------------------------------------------------------------------------------------

  #armEventTimeout(ms: number | null): void {
    if (ms === null || ms === Infinity) {
      this.#eventDeadline = Infinity;
      return;
    }
    const at = performance.now() + ms;
    this.#eventDeadline = at;
    // A timer already due no later than the new deadline is kept: it re-arms itself for the
    // rest when it fires. That makes re-arming per packet cost no timer call.
    if (this.#eventTimer !== undefined && this.#eventTimerAt <= at) return;
    clearTimeout(this.#eventTimer);
    this.#eventTimerAt = at;
    this.#eventTimer = setTimeout(
      this.#onEventTimer ??= () => this.#eventTimerFired(),
      Math.min(ms, MAX_DELAY),
    );
  }

  #eventTimerFired(): void {
    this.#eventTimer = undefined;
    this.#eventTimerAt = Infinity;
    const deadline = this.#eventDeadline;
    if (deadline === Infinity || this.#phase !== Phase.Open) return;
    const left = deadline - performance.now();
    if (left > 1) {
      this.#eventTimerAt = deadline;
      this.#eventTimer = setTimeout(this.#onEventTimer!, Math.min(left, MAX_DELAY));
      return;
    }
    this.#eventDeadline = Infinity;
    if (this.#idleArmed) {
      this.#idleArmed = false;
      // Idle: nothing came, or the handler has been held all along by a peer that does not
      // read its output (events may wait behind that: they do not make it any less stuck).
      if (this.#head === this.#queue.length || this.#at === HandlerAt.AwaitingDrain) {
        this.shutdown("idle");
      }
      return;
    }
    // An event already waits in the mailbox (the handler is held back, by a slow peer say):
    // it came in time, and taking it cancels the timeout.
    if (this.#head < this.#queue.length) return;
    this.#push({ type: "timeout" });
  }

  #armIdle(): void {
    this.#idleArmed = true;
    this.#armEventTimeout(this.#opts.idleTimeout!);
  }

  #armNamed(name: string, ms: number | null): void {
    const old = this.#named?.get(name);
    if (old !== undefined) {
      clearTimer(old.timer);
      // Fired but not yet delivered: a cancel or a re-arm takes its event back.
      if (old.fired !== null) this.#withdraw(old.fired);
      this.#named!.delete(name);
    }
    if (ms === null || ms === Infinity) return;
    const entry: { timer: Timer; fired: TimeoutEvent | null } = { timer: undefined, fired: null };
    entry.timer = startTimer(() => {
      entry.timer = undefined;
      entry.fired = { type: "timeout", name };
      this.#push(entry.fired);
    }, ms);
    (this.#named ??= new Map()).set(name, entry);
  }

  // A named timer's event is delivered: its entry goes (a cancel now has nothing to take back).
  #timeoutTaken(ev: TimeoutEvent): void {
    if (ev.name !== undefined && this.#named?.get(ev.name)?.fired === ev) {
      this.#named.delete(ev.name);
    }
  }

  // ---- Messages from outside ---------------------------------------------------------------------

  // A call to this connection was answered (from any handler).
  forgetCall(ref: number): void {
    this.#callRefs?.delete(ref);
  }

  call(message: unknown, timeout: number): Promise<unknown> {
    if (this.#phase !== Phase.Open) {
      return Promise.reject(new ConnectionClosed(this.handle.id, this.#closeReason));
    }
    return new Promise((resolve, reject) => {
      const ref = ++nextCall;
      const timer = startTimer(() => {
        pendingCalls.delete(ref);
        this.#callRefs?.delete(ref);
        reject(
          new TimeoutError(`call to connection ${this.handle.id} timed out after ${timeout} ms`),
        );
      }, timeout);
      pendingCalls.set(ref, { resolve, reject, timer, callee: this as Driver<unknown> });
      (this.#callRefs ??= new Set()).add(ref);
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
    if (this.#upgrades === NONE) this.#upgrades = [];
    this.#upgrades.push({ handler, codeChange });
    if (this.#at !== HandlerAt.Hibernated) this.#push({ type: "upgrade", handler });
  }

  /**
   * Ask the handler to finish (a `shutdown` event, once), and bring the end deadline to within
   * `timeout` ms, whatever phase the connection is in: the earliest deadline wins.
   */
  shutdown(reason: unknown, timeout = this.#opts.shutdownTimeout): Promise<void> {
    if (this.#phase === Phase.Open && this.#shutdownReason === null) {
      this.#shutdownReason = { reason };
      this.#push({ type: "shutdown", reason });
    }
    if (this.#phase < Phase.Closed) {
      this.#lowerEndBy(performance.now() + timeout);
      this.#armEndTimer();
    }
    return this.closed.then(() => {});
  }
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
