// A connection's output side: frames encoded into a buffer, written one write at a time, and
// whoever waits for them (sendSync, a drain). A connection makes its outbox on the first send
// and drops it when hibernating with nothing pending, so an idle connection holds no buffers.
//
// Two buffers take turns: frames are encoded into `#out` while `#spare` (the previous `#out`)
// is being written; when that write completes, the buffers swap and the next write starts.

import type { Framing } from "./framing.ts";
import type { Conn } from "./transport/transport.ts";
import { WriteBuffer } from "./_write_buffer.ts";

// Output buffers larger than this are released after writing rather than kept.
export const KEEP_WRITE_BUFFER = 64 * 1024;

const NO_WAITERS: never[] = Object.freeze([]) as unknown as never[];

/** What an outbox reports to its connection. */
export interface OutboxOwner {
  /** Nothing is being written any more (everything queued went out, or writing failed). */
  outboxDrained(): void;
  /** A write failed: the write side is broken for good. */
  outboxFailed(error: Error): void;
}

// The writing side: open, closing once what is queued is written (closeWrite), or closed.
const enum WriteEnd {
  Open,
  Closing,
  Closed,
}

interface SyncWaiter {
  at: number; // resolve once this many bytes have been written
  resolve(): void;
  reject(err: Error): void;
}

export class Outbox {
  #socket: Conn | null; // null: bytes are held until a socket is attached (a TLS switch)
  readonly #owner: OutboxOwner;

  // Bytes.
  #out = new WriteBuffer(); // encoded, not yet handed to a write
  #spare = new WriteBuffer(); // being written (or free for the next swap)
  #inFlight: Uint8Array | null = null; // what the write under way still has to write
  #bytesQueued = 0; // ever encoded
  #bytesWritten = 0; // ever written
  #framesDropped = 0; // sent after the write side broke
  #broken: Error | null = null; // set once: writes failed or were aborted
  #writeEnd = WriteEnd.Open;
  #lentInFlight = false; // the write under way is of the caller's memory (writeLent)

  // Waiters.
  #syncWaiters: SyncWaiter[] = NO_WAITERS;
  #drainWaiters: Array<() => void> = NO_WAITERS;

  // Flush scheduling (callbacks made on first use).
  #flushQueued = false;
  #flushTask: (() => void) | null = null;
  #flushLaterQueued = false; // in #dueLater
  #onWrite: ((result: number | Error) => void) | null = null;

  // The outboxes to flush at the next macrotask (flushLater), all by one timer: a timer of its
  // own per outbox and read cost a busy server a tenth of its pipelined rate (bench/run.ts's
  // pipelined row, async handler: 1.30–1.34M frames/s with a timer each, 1.41–1.42M with this
  // one). The timer is cleared once every outbox waiting for it has given up (abort): a
  // connection's end leaves no timer behind.
  static #dueLater: Outbox[] = [];
  static #dueLaterLive = 0; // how many of #dueLater still wait (#flushLaterQueued)
  static #laterTimer: ReturnType<typeof setTimeout> | undefined;
  static #flushDueLater(): void {
    const due = Outbox.#dueLater;
    Outbox.#dueLater = [];
    Outbox.#dueLaterLive = 0;
    Outbox.#laterTimer = undefined;
    // Every flag is down before the first flush: whatever a flush sets off sees a clean state.
    let live = 0;
    for (const outbox of due) {
      if (!outbox.#flushLaterQueued) continue; // given up meanwhile
      outbox.#flushLaterQueued = false;
      due[live++] = outbox;
    }
    for (let i = 0; i < live; i++) due[i].flush();
  }

  constructor(socket: Conn | null, owner: OutboxOwner) {
    this.#socket = socket;
    this.#owner = owner;
  }

  /** Start writing to `socket` what was held (made without one), and go on with it. */
  attach(socket: Conn): void {
    this.#socket = socket;
    this.flush();
    if (this.#writeEnd === WriteEnd.Closing && this.#inFlight === null) this.#closeSocketWrite();
  }

  /** Bytes encoded and not yet handed to a write. */
  get unflushed(): number {
    return this.#out.length;
  }

  /** Bytes queued and not yet written (including a write under way); none once broken. */
  get bytesPending(): number {
    return this.#broken === null ? this.#bytesQueued - this.#bytesWritten : 0;
  }

  get bytesWritten(): number {
    return this.#bytesWritten;
  }

  get framesDropped(): number {
    return this.#framesDropped;
  }

  /** A write is under way. */
  get writing(): boolean {
    return this.#inFlight !== null;
  }

  /** The write under way is of memory lent by the caller ({@linkcode Outbox.writeLent}). */
  get writingLent(): boolean {
    return this.#lentInFlight;
  }

  /**
   * Write `bytes`, an encoded frame, from the caller's memory, without a copy: only when nothing
   * else is queued or being written (else false, and the caller encodes it as usual). The
   * memory must stay as it is until the write is done (`writingLent` turns false).
   */
  writeLent(bytes: Uint8Array): boolean {
    if (
      this.#inFlight !== null || this.#out.length > 0 || this.#broken !== null ||
      this.#writeEnd !== WriteEnd.Open || this.#socket === null
    ) return false;
    this.#bytesQueued += bytes.length;
    this.#lentInFlight = true;
    this.#write(bytes);
    return true;
  }

  /** Why writing stopped for good, if it did. */
  get broken(): Error | null {
    return this.#broken;
  }

  /** The writing side is closed, or will be once what is queued is written (closeWrite). */
  get writeClosed(): boolean {
    return this.#writeEnd !== WriteEnd.Open;
  }

  /**
   * Half-close: frames from now on are dropped and counted; once what is queued has been
   * written, the socket's writing side is closed (a failure is reported as a failed write).
   */
  closeWrite(): void {
    if (this.#writeEnd !== WriteEnd.Open) return;
    this.#writeEnd = WriteEnd.Closing;
    this.flush();
    if (this.#inFlight === null) this.#closeSocketWrite();
  }

  /**
   * Encode `frame`; dropped and counted once broken or closed. Throws what the framing throws,
   * having queued nothing of it (a framing may throw part-way: `batch()` at its second frame).
   */
  encode<T>(framing: Framing<T>, frame: T): void {
    if (this.#broken !== null || this.#writeEnd !== WriteEnd.Open) {
      this.#framesDropped++;
      return;
    }
    const out = this.#out;
    const before = out.length;
    try {
      framing.encode(frame, out);
    } catch (err) {
      out.truncate(before);
      throw err;
    }
    this.#bytesQueued += out.length - before;
  }

  /** Start writing what is encoded, unless a write is under way (it goes on with the rest). */
  flush(): void {
    if (
      this.#inFlight !== null || this.#out.length === 0 || this.#broken !== null ||
      this.#socket === null
    ) return;
    const buf = this.#out;
    this.#out = this.#spare;
    this.#spare = buf;
    this.#write(buf.bytes());
  }

  /**
   * Flush once the current synchronous work is done: sends of the same tick (from outside, or
   * from steps run back to back) share one write.
   */
  flushSoon(): void {
    if (this.#flushQueued) return;
    this.#flushQueued = true;
    queueMicrotask(
      this.#flushTask ??= () => {
        this.#flushQueued = false;
        this.flush();
      },
    );
  }

  /**
   * Flush at the next macrotask: steps that need no I/O all run first (their output then goes
   * out in one write), yet output never waits for a handler that awaits something long.
   */
  flushLater(): void {
    if (this.#flushLaterQueued) return;
    this.#flushLaterQueued = true;
    Outbox.#dueLater.push(this);
    Outbox.#dueLaterLive++;
    Outbox.#laterTimer ??= setTimeout(Outbox.#flushDueLater, 0);
  }

  /** Resolves once everything queued so far is written; rejects if writing fails first. */
  written(): Promise<void> {
    if (this.#broken !== null) return Promise.reject(this.#broken);
    const at = this.#bytesQueued;
    if (at <= this.#bytesWritten) return Promise.resolve();
    return new Promise((resolve, reject) => {
      if (this.#syncWaiters === NO_WAITERS) this.#syncWaiters = [];
      this.#syncWaiters.push({ at, resolve, reject });
    });
  }

  /** Resolves once nothing is pending (everything written, or writing failed). */
  drained(): Promise<void> {
    this.flush();
    if (this.#inFlight === null) return Promise.resolve();
    if (this.#drainWaiters === NO_WAITERS) this.#drainWaiters = [];
    const waiters = this.#drainWaiters;
    return new Promise((resolve) => waiters.push(resolve));
  }

  /**
   * Give up: drop what is pending and refuse what comes, rejecting waiters with `error`. The
   * caller closes the socket, which ends a write under way.
   */
  abort(error: Error): void {
    if (this.#broken === null) this.#broken = error;
    this.#out.reset(0);
    for (const w of this.#takeSyncWaiters()) w.reject(error);
    this.#cancelFlushes();
    if (this.#inFlight === null) this.#drainedNow();
  }

  /**
   * Whether there is nothing to keep: no bytes pending, no write under way, no waiter, and the
   * writing side open (a closed one is remembered here: a new outbox would write again).
   */
  get idle(): boolean {
    return this.#inFlight === null && this.#out.length === 0 && this.#syncWaiters.length === 0 &&
      !this.#flushLaterQueued && !this.#flushQueued && this.#writeEnd === WriteEnd.Open;
  }

  #cancelFlushes(): void {
    if (!this.#flushLaterQueued) return;
    this.#flushLaterQueued = false; // (its entry in #dueLater is skipped)
    if (--Outbox.#dueLaterLive > 0) return;
    clearTimeout(Outbox.#laterTimer);
    Outbox.#laterTimer = undefined;
    Outbox.#dueLater = [];
  }

  #write(bytes: Uint8Array): void {
    this.#inFlight = bytes;
    this.#socket!.write(bytes).then(
      this.#onWrite ??= (result: number | Error) =>
        typeof result === "number" ? this.#wrote(result) : this.#writeFailed(result),
      this.#onWrite,
    );
  }

  #wrote(n: number): void {
    this.#bytesWritten += n;
    const rest = this.#inFlight!;
    if (n < rest.length) return this.#write(rest.subarray(n)); // a partial write
    this.#inFlight = null;
    this.#lentInFlight = false;
    this.#spare.reset(KEEP_WRITE_BUFFER);
    this.#settleSyncWaiters();
    if (this.#out.length > 0 && this.#broken === null) return this.flush(); // queued meanwhile
    if (this.#writeEnd === WriteEnd.Closing) this.#closeSocketWrite();
    this.#drainedNow();
  }

  // Everything queued is written: end the writing side (the peer reads the end of the stream).
  #closeSocketWrite(): void {
    const socket = this.#socket;
    if (socket === null || this.#broken !== null || this.#out.length > 0) return;
    this.#writeEnd = WriteEnd.Closed;
    this.#out.reset(0); // nothing more will be written: give the buffers back
    this.#spare.reset(0);
    let closing: Promise<void>;
    try {
      closing = socket.closeWrite();
    } catch (err) {
      return this.#writeFailed(err);
    }
    closing.catch((err) => this.#writeFailed(err));
  }

  #writeFailed(err: unknown): void {
    this.#inFlight = null;
    this.#lentInFlight = false;
    const aborted = this.#broken !== null;
    const error = this.#broken ?? (err instanceof Error ? err : new Error(String(err)));
    this.#broken = error;
    this.#out.reset(0);
    this.#spare.reset(0);
    for (const w of this.#takeSyncWaiters()) w.reject(error);
    if (!aborted) this.#owner.outboxFailed(error);
    this.#drainedNow();
  }

  #drainedNow(): void {
    const drained = this.#drainWaiters;
    if (drained.length > 0) {
      this.#drainWaiters = NO_WAITERS;
      for (const resolve of drained) resolve();
    }
    this.#owner.outboxDrained();
  }

  #takeSyncWaiters(): SyncWaiter[] {
    const waiters = this.#syncWaiters;
    this.#syncWaiters = NO_WAITERS;
    return waiters;
  }

  #settleSyncWaiters(): void {
    const waiters = this.#syncWaiters;
    if (waiters.length === 0) return;
    let i = 0;
    while (i < waiters.length && waiters[i].at <= this.#bytesWritten) waiters[i++].resolve();
    if (i > 0) waiters.splice(0, i);
  }
}
