// Property tests (fast-check): every framing, and the connection driver against a model.
//
// Framings: random frame sequences, encoded and cut at random points (down to single bytes),
// decode to the same frames, whatever the decoder's caller does with the chunk afterwards;
// `buffered` counts exactly the bytes of the frame in progress; random bytes decode exactly as
// a plain reference decoder says, and throw nothing but FrameTooLarge or MalformedFrame.
//
// Driver: random sequences of packets, casts, infos, calls (replied at once or later, some
// timing out), named timers armed, re-armed and cancelled, event timeouts armed and disarmed,
// and waits, run against a handler that records every event it sees, over the memory
// transport and a virtual clock. A model predicts the exact sequence of events, the replies
// the peer reads, every call's outcome, and which timers fire; handlers written as
// `async function*`, as `function*`, and as one that hibernates after every event must all
// match it.
//
// Driver lifecycle: a second model, of what happens around the end: named timers armed,
// cancelled and re-armed while the handler is busy in an async step, hibernation and wakes,
// upgrades with codeChanges, calls answered by this or another connection's handler, and
// conn.stop() / server.stop() at any moment, against handlers that return, stop or ignore a
// shutdown, with a finally that yields a send or is stuck in an await (details below).
//
// The driver's properties run with a fixed seed, or RELIABILITY_SEED; fast-check prints the
// seed and the shrunk counterexample of a failure (rerun one with `fc.assert(..., { seed,
// path })`). Runs are bounded so that the file takes some ten seconds.

import assert from "node:assert/strict";
// A dev-only dependency, pinned here rather than in deno.json's imports (the library has none).
// deno-lint-ignore no-import-prefix
import fc from "npm:fast-check@3.23.2";
import { setImmediate } from "node:timers";
import { isDeepStrictEqual } from "node:util";
import {
  type Action,
  batch,
  type Connection,
  ConnectionClosed,
  type Decoder,
  type Event,
  FrameTooLarge,
  type Framing,
  type From,
  type Handler,
  hibernate,
  lengthPrefixed,
  lines,
  MalformedFrame,
  memory,
  raw,
  reply,
  resp,
  send,
  serve,
  setTimeout as arm,
  stop,
  TimeoutError,
  type Yielded,
} from "../../mod.ts";
import { capturingLogger, closeQuietly, logNames, within } from "./_support.ts";

const utf8 = new TextEncoder();

// ---- Framings: helpers ----------------------------------------------------------------------

/** Cut `bytes` at `cuts` (positions, any order, duplicates allowed). */
function cut(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const at = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Uint8Array[] = [];
  let from = 0;
  for (const to of [...at, bytes.length]) {
    chunks.push(bytes.slice(from, to)); // empty chunks included: a decoder must take them
    from = to;
  }
  return chunks;
}

/** Cut points: a few random ones, or every byte. */
const cuts = fc.oneof(
  { weight: 4, arbitrary: fc.array(fc.nat(), { maxLength: 24 }) },
  { weight: 1, arbitrary: fc.constant(null) }, // every byte
);

function chunksOf(bytes: Uint8Array, at: number[] | null): Uint8Array[] {
  if (at === null) return Array.from(bytes, (_, i) => bytes.slice(i, i + 1));
  return cut(bytes, at);
}

/**
 * Feed `chunks` to a fresh decoder of `framing`, scribbling over each chunk after the call (the
 * driver reuses its read buffer), and report the frames, the error, and `buffered` after each.
 */
function feed<T>(
  framing: Framing<T>,
  chunks: Uint8Array[],
): { frames: T[]; error?: unknown; buffered: number[] } {
  const decoder: Decoder<T> = framing.decoder();
  const frames: T[] = [];
  const buffered: number[] = [];
  try {
    for (const chunk of chunks) {
      decoder.decode(chunk, (frame) => frames.push(frame));
      chunk.fill(0xa5);
      buffered.push(decoder.buffered);
    }
  } catch (error) {
    return { frames, error, buffered };
  }
  return { frames, buffered };
}

/** Where each encoded frame ends, for the expected `buffered` at any position. */
function boundaries<T>(framing: Framing<T>, frames: T[]): number[] {
  const ends: number[] = [0];
  let total = 0;
  for (const frame of frames) {
    total += encode(framing, [frame]).length;
    ends.push(total);
  }
  return ends;
}

function encode<T>(framing: Framing<T>, frames: T[]): Uint8Array {
  const parts: number[] = [];
  const out = {
    write: (b: Uint8Array) => parts.push(...b),
    writeString: (s: string) => parts.push(...utf8.encode(s)),
    writeUint(value: number, bytes: 1 | 2 | 4) {
      for (let i = bytes - 1; i >= 0; i--) parts.push((value >>> (8 * i)) & 0xff);
    },
  };
  for (const frame of frames) framing.encode(frame, out);
  return new Uint8Array(parts);
}

/** The bytes between the last frame end at or before `pos`, and `pos`. */
function expectedBuffered(ends: number[], pos: number): number {
  let last = 0;
  for (const end of ends) if (end <= pos) last = end;
  return pos - last;
}

function positions(chunks: Uint8Array[]): number[] {
  let pos = 0;
  return chunks.map((c) => pos += c.length);
}

/**
 * `frames`, encoded and cut at `at`, decode to the same frames with no error, and `buffered`
 * after each chunk is exactly the bytes of the frame in progress.
 */
function assertRoundTrip<T>(framing: Framing<T>, frames: T[], at: number[] | null): void {
  const bytes = encode(framing, frames);
  const chunks = chunksOf(bytes, at);
  const got = feed(framing, chunks);
  assert.equal(got.error, undefined);
  assert.deepEqual(got.frames, frames);
  const ends = boundaries(framing, frames);
  assert.deepEqual(got.buffered, positions(chunks).map((p) => expectedBuffered(ends, p)));
}

const NUM_RUNS = 500;

// ---- Framings: round trips --------------------------------------------------------------------

const lengthPrefixedCases = [
  { bytes: 1, max: 255, framing: lengthPrefixed(1) },
  { bytes: 1, max: 17, framing: lengthPrefixed(1, { maxLength: 17 }) },
  { bytes: 2, max: 700, framing: lengthPrefixed(2, { maxLength: 700 }) },
  { bytes: 4, max: 3000, framing: lengthPrefixed(4, { maxLength: 3000 }) },
  { bytes: 4, max: 0, framing: lengthPrefixed(4, { maxLength: 0 }) },
] as const;

for (const { bytes, max, framing } of lengthPrefixedCases) {
  Deno.test(`fuzz: lengthPrefixed(${bytes}, max ${max}): random frames, cut anywhere, decode to the same frames`, () => {
    const frame = fc.oneof(
      fc.uint8Array({ maxLength: Math.min(max, 40) }),
      fc.uint8Array({ minLength: max, maxLength: max }), // exactly maxLength
      fc.uint8Array({ maxLength: max }),
    );
    fc.assert(
      fc.property(fc.array(frame, { maxLength: 30 }), cuts, (frames, at) => {
        assertRoundTrip(framing, frames, at);
      }),
      { numRuns: NUM_RUNS },
    );
  });

  Deno.test(`fuzz: lengthPrefixed(${bytes}, max ${max}): encode throws FrameTooLarge past maxLength, else round-trips`, () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: max + 3 }), (frame) => {
        if (frame.length > max) {
          assert.throws(() => encode(framing, [frame]), FrameTooLarge);
        } else {
          assert.deepEqual(feed(framing, [encode(framing, [frame])]).frames, [frame]);
        }
      }),
      { numRuns: NUM_RUNS },
    );
  });
}

/** Characters that stress lines(): endings, multi-byte UTF-8, a BOM, lone surrogates. */
const lineChar = fc.constantFrom(
  "a",
  "Z",
  " ",
  "\r",
  "\n",
  "\t",
  "\0",
  "é",
  "€",
  "😀",
  "\uFEFF",
  "\uD800",
  "\uDC00",
);
const anyString = fc.oneof(
  fc.string({ unit: lineChar, maxLength: 24 }),
  fc.string({ unit: "binary", maxLength: 24 }),
);

for (const max of [64 * 1024, 16, 3, 0]) {
  const framing = lines({ maxLength: max });
  const fits = (s: string) => utf8.encode(s).length <= max;
  const line = anyString.map((s) => s.replaceAll("\n", "").toWellFormed()).filter(fits);

  Deno.test(`fuzz: lines(max ${max}): random lines, cut anywhere, decode to the same lines`, () => {
    fc.assert(
      fc.property(fc.array(line, { maxLength: 30 }), cuts, (frames, at) => {
        assertRoundTrip(framing, frames, at);
      }),
      { numRuns: NUM_RUNS },
    );
  });

  Deno.test(`fuzz: lines(max ${max}): encode round-trips or throws TypeError (a newline) / FrameTooLarge`, () => {
    fc.assert(
      fc.property(anyString, (s) => {
        if (s.includes("\n")) {
          assert.throws(() => encode(framing, [s]), TypeError);
        } else if (!fits(s.toWellFormed())) {
          assert.throws(() => encode(framing, [s]), FrameTooLarge);
        } else {
          // Lone surrogates are sent as U+FFFD, as TextEncoder does; all else exactly.
          assert.deepEqual(feed(framing, [encode(framing, [s])]).frames, [s.toWellFormed()]);
        }
      }),
      { numRuns: NUM_RUNS },
    );
  });
}

// ---- Framings: read as the driver reads ---------------------------------------------------------

/**
 * Decode `bytes` as the driver does: into the buffer `readInto()` offers (a large frame's rest,
 * read in place) when there is one, else into one reused read buffer, scribbled over after each
 * call; `sizes` are the reads' sizes in turn. Frames are cloned as they come (a lent one is valid
 * for that call only).
 */
function decodeLikeDriver<T>(framing: Framing<T>, bytes: Uint8Array, sizes: number[]): unknown[] {
  const decoder = framing.decoder();
  const readBuf = new Uint8Array(64 * 1024);
  const frames: unknown[] = [];
  for (let at = 0, k = 0; at < bytes.length; k++) {
    const into = decoder.readInto?.();
    const buf = into ?? readBuf;
    const n = Math.min(buf.length, bytes.length - at, sizes[k % sizes.length]);
    buf.set(bytes.subarray(at, at + n));
    at += n;
    decoder.decode(buf.subarray(0, n), (frame) => frames.push(structuredClone(frame)));
    if (into === undefined) readBuf.fill(0xa5, 0, n);
  }
  return frames;
}

// Frames from a few bytes to past the in-place threshold (16 KiB), so that reads in place follow
// one another on one decoder.
const sized = fc.oneof(
  fc.integer({ min: 0, max: 60 }),
  fc.integer({ min: 16 * 1024 - 8, max: 70 * 1024 }),
).map((n) => new Uint8Array(n).fill(n & 0xff));
const readSizes = fc.array(fc.integer({ min: 1, max: 80 * 1024 }), { minLength: 1, maxLength: 8 });

const inPlaceCases: Array<[string, Framing<unknown>, (frames: Uint8Array[]) => unknown[]]> = [
  ["lengthPrefixed(4)", lengthPrefixed(4) as Framing<unknown>, (f) => f],
  ["lengthPrefixed(4, lend)", lengthPrefixed(4, { lend: true }) as Framing<unknown>, (f) => f],
  ["resp()", resp() as Framing<unknown>, (f) => f],
  ["resp(lend)", resp({ lend: true }) as Framing<unknown>, (f) => f],
  ["resp() arrays", resp() as Framing<unknown>, (f) => [f]],
  ["batch(lengthPrefixed(4))", batch(lengthPrefixed(4)) as Framing<unknown>, (f) => [f]],
];

for (const [name, framing, frameOf] of inPlaceCases) {
  Deno.test(`fuzz: ${name}: large frames one after another, read as the driver reads, decode whole`, () => {
    fc.assert(
      fc.property(fc.array(sized, { minLength: 1, maxLength: 6 }), readSizes, (frames, sizes) => {
        const sent = frameOf(frames);
        const got = decodeLikeDriver(framing, encode(framing, sent), sizes);
        // (batch() hands over each read's frames together: compare the frames, not the batches.)
        const [want, have] = name.startsWith("batch") ? [frames, got.flat()] : [sent, got];
        // (A boolean, not deepEqual: a diff of frames this large would swamp the output.)
        assert.ok(
          isDeepStrictEqual(have, want),
          `sizes ${frames.map((f) => f.length)}, reads ${sizes}: decoded differently`,
        );
      }),
      { numRuns: 60 },
    );
  });
}

Deno.test("fuzz: raw(): any bytes, cut anywhere, arrive whole and in order, as copies, no empty frame", () => {
  const framing = raw();
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }),
      cuts,
      (parts, at) => {
        const bytes = encode(framing, parts);
        const expected = bytes.slice();
        const got = feed(framing, chunksOf(bytes, at));
        assert.equal(got.error, undefined);
        assert.ok(got.frames.every((f) => f.length > 0));
        assert.deepEqual(new Uint8Array(got.frames.flatMap((f) => [...f])), expected);
        assert.ok(got.buffered.every((b) => b === 0));
      },
    ),
    { numRuns: NUM_RUNS },
  );
});

// ---- Framings: random bytes against reference decoders ---------------------------------------

type Reference<T> = (
  bytes: Uint8Array,
) => { frames: T[]; error?: "FrameTooLarge" | "MalformedFrame"; message?: string };

function referenceLengthPrefixed(size: number, max: number): Reference<Uint8Array> {
  return (bytes) => {
    const frames: Uint8Array[] = [];
    let i = 0;
    while (i + size <= bytes.length) {
      let length = 0;
      for (let k = 0; k < size; k++) length = length * 256 + bytes[i + k];
      if (length > max) return { frames, error: "FrameTooLarge" };
      if (i + size + length > bytes.length) break;
      frames.push(bytes.slice(i + size, i + size + length));
      i += size + length;
    }
    return { frames };
  };
}

function referenceLines(max: number, invalidUtf8: "error" | "replace"): Reference<string> {
  const text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  const lenient = new TextDecoder("utf-8", { ignoreBOM: true });
  // Where the first bad sequence of `line` starts: the end of its longest valid prefix.
  const firstBad = (line: Uint8Array) => {
    let p = line.length;
    for (;; p--) {
      try {
        text.decode(line.subarray(0, p));
        return p;
      } catch { /* shorter */ }
    }
  };
  return (bytes) => {
    const frames: string[] = [];
    let start = 0;
    for (;;) {
      const nl = bytes.indexOf(10, start);
      if (nl < 0) {
        const rest = bytes.length - start;
        // An unended line may hold one byte more than maxLength: the "\r" of a "\r\n".
        const crPending = rest === max + 1 && bytes[bytes.length - 1] === 13;
        return rest > max && !crPending ? { frames, error: "FrameTooLarge" } : { frames };
      }
      let end = nl;
      if (end > start && bytes[end - 1] === 13) end--;
      if (end - start > max) return { frames, error: "FrameTooLarge" };
      const line = bytes.subarray(start, end);
      if (invalidUtf8 === "replace") frames.push(lenient.decode(line));
      else {
        try {
          frames.push(text.decode(line));
        } catch {
          const where = `byte ${firstBad(line) + 1} of line ${frames.length + 1}`;
          return { frames, error: "MalformedFrame", message: `invalid UTF-8 at ${where}` };
        }
      }
      start = nl + 1;
    }
  };
}

/** Random bytes, biased towards what the framings look for. */
function noise(special: number[]) {
  return fc.uint8Array({ maxLength: 300 }).chain((base) =>
    fc.array(fc.tuple(fc.nat(), fc.constantFrom(...special)), { maxLength: 12 }).map((edits) => {
      const bytes = base.slice();
      for (const [at, b] of edits) if (bytes.length > 0) bytes[at % bytes.length] = b;
      return bytes;
    })
  );
}

// Newlines, "\r", UTF-8 lead and continuation bytes, bytes never valid in UTF-8.
const lineNoise = noise([
  10,
  10,
  10,
  13,
  0x41,
  0xc3,
  0xa9,
  0xe2,
  0x82,
  0xac,
  0xf0,
  0x9f,
  0xc0,
  0xff,
  0xed,
  0xa0,
  0x80,
]);

const noiseCases: Array<
  {
    name: string;
    framing: Framing<unknown>;
    ref: Reference<unknown>;
    bytes: fc.Arbitrary<Uint8Array>;
  }
> = [
  ...lengthPrefixedCases.map(({ bytes, max, framing }) => ({
    name: `lengthPrefixed(${bytes}, max ${max})`,
    framing: framing as Framing<unknown>,
    ref: referenceLengthPrefixed(bytes, max) as Reference<unknown>,
    bytes: noise([0, 1, 2, 3, max & 0xff, (max + 1) & 0xff, 0xff]),
  })),
  ...[64 * 1024, 16, 3, 0].flatMap((max) =>
    (["error", "replace"] as const).map((invalidUtf8) => ({
      name: `lines(max ${max}, invalidUtf8 ${invalidUtf8})`,
      framing: lines({ maxLength: max, invalidUtf8 }) as Framing<unknown>,
      ref: referenceLines(max, invalidUtf8) as Reference<unknown>,
      bytes: lineNoise,
    }))
  ),
];

for (const { name, framing, ref, bytes } of noiseCases) {
  Deno.test(`fuzz: ${name}: random bytes, cut anywhere, decode as the reference does; only typed errors`, () => {
    fc.assert(
      fc.property(bytes, cuts, (input, at) => {
        const expected = ref(input);
        const got = feed(framing, chunksOf(input.slice(), at));
        if (got.error !== undefined) {
          assert.ok(
            got.error instanceof FrameTooLarge || got.error instanceof MalformedFrame,
            `unexpected ${got.error}`,
          );
          assert.equal(
            (got.error as Error).name,
            expected.error,
            "the error the reference expects",
          );
          // Where the reference says (bad UTF-8: which byte of which line).
          if (expected.message) assert.equal((got.error as Error).message, expected.message);
          // What was emitted before the error is what the reference emits.
          assert.deepEqual(got.frames, expected.frames);
        } else {
          assert.equal(expected.error, undefined, `the reference expects ${expected.error}`);
          assert.deepEqual(got.frames, expected.frames);
        }
      }),
      { numRuns: NUM_RUNS },
    );
  });
}

// ---- The driver against a model ------------------------------------------------------------------

/**
 * A virtual clock: replaces setTimeout, clearTimeout and performance.now while installed.
 * Time moves only in `advance`, which fires due timers one by one, in order of due time, and
 * lets everything they set off settle (a real macrotask: all microtasks run) after each.
 */
class VirtualClock {
  now = 0;
  readonly #timers = new Map<number, { at: number; seq: number; fn: () => void }>();
  #seq = 0;
  #ids = 1;
  readonly #real = { setTimeout, clearTimeout, now: performance.now };

  install(): void {
    const g = globalThis as unknown as Record<string, unknown>;
    g.setTimeout = (fn: () => void, ms = 0) => {
      const id = this.#ids++;
      this.#timers.set(id, { at: this.now + Math.max(0, Number(ms) || 0), seq: this.#seq++, fn });
      return id;
    };
    g.clearTimeout = (id?: number) => void (id !== undefined && this.#timers.delete(id));
    performance.now = () => this.now;
  }

  uninstall(): void {
    const g = globalThis as unknown as Record<string, unknown>;
    g.setTimeout = this.#real.setTimeout;
    g.clearTimeout = this.#real.clearTimeout;
    delete (performance as { now?: unknown }).now; // back to Performance.prototype.now
  }

  get pending(): number {
    return this.#timers.size;
  }

  /** Resolves with `promise`'s value, letting work settle meanwhile; fails if it never does. */
  async until<V>(promise: Promise<V>, what: string): Promise<V> {
    let done = false;
    promise.then(() => done = true, () => done = true);
    for (let i = 0; i < 100 && !done; i++) await this.settle();
    assert.ok(done, `${what}: never settled`);
    return await promise;
  }

  /** Let all pending work (promise chains, microtasks) run: real macrotasks, no time moves. */
  async settle(): Promise<void> {
    for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
  }

  async advance(ms: number): Promise<void> {
    const end = this.now + ms;
    for (;;) {
      let due: [number, { at: number; seq: number; fn: () => void }] | undefined;
      for (const entry of this.#timers) {
        if (entry[1].at > end) continue;
        if (
          !due || entry[1].at < due[1].at ||
          (entry[1].at === due[1].at && entry[1].seq < due[1].seq)
        ) {
          due = entry;
        }
      }
      if (!due) break;
      this.#timers.delete(due[0]);
      this.now = due[1].at;
      due[1].fn();
      await this.settle();
    }
    this.now = end;
    await this.settle();
  }
}

// Commands. Times are whole seconds (waits) plus a distinct even offset per timer (10..988 ms),
// so no two timers are ever due within 2 ms of each other, nor near a wait's end.
type Cmd =
  | { kind: "packets"; lines: string[]; cuts: number[] } // written at once, cut at `cuts`
  | { kind: "cast"; n: number }
  | { kind: "info"; n: number }
  | { kind: "call"; n: number; later: boolean; timeout: number } // timeout: whole seconds
  | { kind: "arm"; name: string; secs: number }
  | { kind: "cancel"; name: string }
  | { kind: "idle"; secs: number } // arm the event timeout
  | { kind: "idleOff" }
  | { kind: "flush" } // reply to every deferred call
  | { kind: "burst"; cmds: Cmd[] } // casts/infos/calls sent in one go, no settling between
  | { kind: "wait"; secs: number };

const timerName = fc.constantFrom("a", "b", "c");
const simple: fc.Arbitrary<Cmd> = fc.oneof(
  fc.record({ kind: fc.constant("cast" as const), n: fc.nat(999) }),
  fc.record({ kind: fc.constant("info" as const), n: fc.nat(999) }),
  fc.record({
    kind: fc.constant("call" as const),
    n: fc.nat(999),
    later: fc.boolean(),
    timeout: fc.integer({ min: 1, max: 4 }),
  }),
  fc.record({
    kind: fc.constant("arm" as const),
    name: timerName,
    secs: fc.integer({ min: 0, max: 3 }),
  }),
  fc.record({ kind: fc.constant("cancel" as const), name: timerName }),
  fc.record({ kind: fc.constant("idle" as const), secs: fc.integer({ min: 0, max: 3 }) }),
  fc.constant({ kind: "idleOff" as const }),
  fc.constant({ kind: "flush" as const }),
);
const command: fc.Arbitrary<Cmd> = fc.oneof(
  { weight: 8, arbitrary: simple },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("packets" as const),
      lines: fc.array(
        fc.string({ unit: fc.constantFrom("x", "y", "é", "\r", "😀"), maxLength: 6 }),
        {
          minLength: 1,
          maxLength: 6,
        },
      ).map((ls) => ls.map((l) => l.replace(/\r+$/, ""))),
      cuts: fc.array(fc.nat(), { maxLength: 4 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("burst" as const),
      cmds: fc.array(simple, { minLength: 2, maxLength: 5 }),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("wait" as const),
      secs: fc.integer({ min: 1, max: 3 }),
    }),
  },
);

/** What the handler saw, as plain data. */
type Seen =
  | { type: "packet"; data: string }
  | { type: "cast" | "info" | "call"; message: unknown }
  | { type: "timeout"; name?: string }
  | { type: "disconnect" };

type Outcome = { value: unknown } | { error: "timeout" | "closed" };

/** The model: what the handler must see, what the peer must read, how each call ends. */
class Model {
  now = 0;
  seen: Seen[] = [];
  replies: string[] = [];
  calls = new Map<number, { due: number; outcome?: Outcome }>();
  #deferred: number[] = []; // call ids awaiting a flush
  #named = new Map<string, number>(); // name → due
  #idle: number | null = null; // due of the event timeout
  #offset = 0;

  /** A distinct offset for the next timer: 10, 12, … 988 ms (at most 490 per run). */
  offset(): number {
    return 10 + 2 * (this.#offset++ % 490);
  }

  #event(ev: Seen): void {
    this.seen.push(ev);
    this.#idle = null; // any event cancels the event timeout
  }

  apply(cmd: Cmd, id: number, offset: number): void {
    switch (cmd.kind) {
      case "packets":
        for (const line of cmd.lines) {
          this.#event({ type: "packet", data: line });
          this.replies.push(`echo:${line}`);
        }
        break;
      case "cast":
        this.#event({ type: "cast", message: { n: cmd.n } });
        break;
      case "info":
        this.#event({ type: "info", message: cmd.n });
        break;
      case "call":
        this.calls.set(id, { due: this.now + cmd.timeout * 1000 + offset });
        this.#event({ type: "call", message: { id, later: cmd.later } });
        if (cmd.later) this.#deferred.push(id);
        else this.#settle(id, { value: `r${id}` });
        break;
      case "arm":
        this.#event({ type: "cast", message: { arm: cmd.name, ms: cmd.secs * 1000 + offset } });
        this.#named.set(cmd.name, this.now + cmd.secs * 1000 + offset);
        break;
      case "cancel":
        this.#event({ type: "cast", message: { cancel: cmd.name } });
        this.#named.delete(cmd.name);
        break;
      case "idle":
        this.#event({ type: "cast", message: { idle: cmd.secs * 1000 + offset } });
        this.#idle = this.now + cmd.secs * 1000 + offset;
        break;
      case "idleOff":
        this.#event({ type: "cast", message: { idle: null } });
        break;
      case "flush":
        this.#event({ type: "cast", message: { flush: true } });
        for (const deferred of this.#deferred.splice(0)) {
          this.#settle(deferred, { value: `r${deferred}` });
        }
        break;
      case "burst":
      case "wait":
        throw new Error("not a simple command");
    }
  }

  #settle(id: number, outcome: Outcome): void {
    const call = this.calls.get(id)!;
    call.outcome ??= outcome; // a reply after the timeout is ignored
  }

  wait(ms: number): void {
    const end = this.now + ms;
    for (;;) {
      // The next thing due: a named timer, the event timeout, or a call's timeout.
      let next: { at: number; fire: () => void } | null = null;
      const consider = (at: number, fire: () => void) => {
        if (at <= end && (next === null || at < next.at)) next = { at, fire };
      };
      for (const [name, at] of this.#named) {
        consider(at, () => {
          this.#named.delete(name);
          this.#event({ type: "timeout", name });
        });
      }
      if (this.#idle !== null) {
        consider(this.#idle, () => {
          this.#idle = null;
          this.#event({ type: "timeout" });
        });
      }
      for (const [id, call] of this.calls) {
        if (call.outcome === undefined) {
          consider(call.due, () => this.#settle(id, { error: "timeout" }));
        }
      }
      if (next === null) break;
      const { at, fire } = next as { at: number; fire: () => void };
      this.now = at;
      fire();
    }
    this.now = end;
  }

  /**
   * The end: the peer closes (the handler sees disconnect and returns), or the handler is cast
   * `{ stop }` and yields `[send("bye"), stop(reason)]`. Unanswered calls fail.
   */
  close(end: End): void {
    if (end === "disconnect") {
      this.seen.push({ type: "disconnect" });
    } else {
      this.seen.push({ type: "cast", message: { stop: reasonOf(end) } });
      this.replies.push("bye");
    }
    for (const call of this.calls.values()) call.outcome ??= { error: "closed" };
  }
}

type Gen = AsyncGenerator<Yielded, void, Event<string>>;
type SyncGen = Generator<Yielded, void, Event<string>>;
type Variant = "async" | "sync" | "hibernating";
type End = "disconnect" | "stop" | "stopWithReason";
const reasonOf = (end: End) => end === "stopWithReason" ? "custom reason" : "normal";

/** The recording handler: what it does for each event, as actions. */
function react(
  ev: Event<string>,
  seen: Seen[],
  deferred: Array<{ from: unknown; id: number }>,
): Yielded {
  switch (ev.type) {
    case "packet":
      seen.push({ type: "packet", data: ev.data });
      return send(`echo:${ev.data}`);
    case "info":
      seen.push({ type: "info", message: ev.message });
      return;
    case "call": {
      seen.push({ type: "call", message: ev.message });
      const { id, later } = ev.message as { id: number; later: boolean };
      if (later) {
        deferred.push({ from: ev.from, id });
        return;
      }
      return reply(ev.from, `r${id}`);
    }
    case "cast": {
      seen.push({ type: "cast", message: ev.message });
      const m = ev.message as {
        arm?: string;
        ms?: number;
        cancel?: string;
        idle?: number | null;
        flush?: true;
        stop?: string;
      };
      if (m.stop !== undefined) return [send("bye"), stop(m.stop)];
      if (m.arm !== undefined) return arm(m.ms!, m.arm);
      if (m.cancel !== undefined) return arm(null, m.cancel);
      if (m.idle !== undefined) return arm(m.idle);
      if (m.flush) return deferred.splice(0).map((d) => reply(d.from as never, `r${d.id}`));
      return;
    }
    case "timeout":
      seen.push(ev.name === undefined ? { type: "timeout" } : { type: "timeout", name: ev.name });
      return;
    case "disconnect":
      seen.push({ type: "disconnect" });
      return;
    default:
      throw new Error(`unexpected event ${ev.type}`);
  }
}

function recordingHandler(variant: Variant, seen: Seen[]): Handler<string> {
  const deferred: Array<{ from: unknown; id: number }> = [];
  if (variant === "async") {
    return async function* (): Gen {
      let ev = yield;
      for (;;) {
        const actions = react(ev, seen, deferred);
        if (ev.type === "disconnect") return;
        await null; // a real await between events
        ev = yield actions;
      }
    };
  }
  if (variant === "sync") {
    return function* (): SyncGen {
      let ev = yield;
      for (;;) {
        const actions = react(ev, seen, deferred);
        if (ev.type === "disconnect") return;
        ev = yield actions;
      }
    };
  }
  // Hibernating: every event is handled by a fresh generator, woken with it.
  return async function* (): Gen {
    const ev = yield;
    const actions = react(ev, seen, deferred);
    if (ev.type === "disconnect") return;
    const list = actions === undefined ? [] : Array.isArray(actions) ? actions : [actions];
    yield [...list, hibernate()];
  };
}

let memoryNames = 0;

async function runModel(variant: Variant, cmds: Cmd[], end: End): Promise<void> {
  const clock = new VirtualClock();
  const transport = memory(`fuzz-driver-${++memoryNames}`);
  const seen: Seen[] = [];
  const logger = capturingLogger();
  const accepted = Promise.withResolvers<Connection<string>>();
  const handler = recordingHandler(variant, seen);
  const server = await serve((conn: Connection<string>, state?: unknown) => {
    accepted.resolve(conn);
    return handler(conn, state);
  }, { transport, framing: lines(), logger });
  clock.install();
  const model = new Model();
  const outcomes = new Map<number, Outcome>();
  const calls: Promise<void>[] = [];
  const received: string[] = [];
  let peer: Awaited<ReturnType<typeof transport.connect>> | undefined;
  try {
    peer = await transport.connect({});
    const conn = await clock.until(accepted.promise, "accept");
    // The peer reads every reply line.
    const reading = (async () => {
      const text = new TextDecoder();
      const buf = new Uint8Array(4096);
      let rest = "";
      for (;;) {
        const n = await peer!.read(buf).catch(() => null);
        if (n === null) return;
        rest += text.decode(buf.subarray(0, n), { stream: true });
        const parts = rest.split("\n");
        rest = parts.pop()!;
        received.push(...parts);
      }
    })();
    await clock.settle();

    let ids = 0;
    const issue = (cmd: Cmd) => {
      const id = ++ids;
      const offset = model.offset();
      switch (cmd.kind) {
        case "cast":
          conn.cast({ n: cmd.n });
          break;
        case "info":
          conn.info(cmd.n);
          break;
        case "call":
          calls.push(
            conn.call({ id, later: cmd.later }, { timeout: cmd.timeout * 1000 + offset }).then(
              (value) => void outcomes.set(id, { value }),
              (err) => {
                if (err instanceof TimeoutError) outcomes.set(id, { error: "timeout" });
                else if (err instanceof ConnectionClosed) outcomes.set(id, { error: "closed" });
                else throw err;
              },
            ),
          );
          break;
        case "arm":
          conn.cast({ arm: cmd.name, ms: cmd.secs * 1000 + offset });
          break;
        case "cancel":
          conn.cast({ cancel: cmd.name });
          break;
        case "idle":
          conn.cast({ idle: cmd.secs * 1000 + offset });
          break;
        case "idleOff":
          conn.cast({ idle: null });
          break;
        case "flush":
          conn.cast({ flush: true });
          break;
        default:
          throw new Error(`not simple: ${cmd.kind}`);
      }
      model.apply(cmd, id, offset);
    };

    for (const cmd of cmds) {
      if (cmd.kind === "packets") {
        const bytes = utf8.encode(cmd.lines.map((l) => l + "\n").join(""));
        for (const chunk of cut(bytes, cmd.cuts)) if (chunk.length > 0) await peer.write(chunk);
        model.apply(cmd, 0, 0);
      } else if (cmd.kind === "burst") {
        for (const c of cmd.cmds) issue(c);
      } else if (cmd.kind === "wait") {
        model.wait(cmd.secs * 1000);
        await clock.advance(cmd.secs * 1000);
        continue;
      } else {
        issue(cmd);
      }
      await clock.settle();
    }

    // The peer closes its side (the handler sees disconnect and returns), or the handler stops.
    if (end === "disconnect") await peer.closeWrite();
    else conn.cast({ stop: reasonOf(end) });
    model.close(end);
    await clock.settle();
    assert.equal(await clock.until(conn.closed, "the close"), reasonOf(end));
    await clock.until(Promise.all(calls), "every call");
    await clock.until(reading, "the peer's reads");
    assert.equal(clock.pending, 0, "no timer left behind");

    assert.deepEqual(seen, model.seen, "the handler saw exactly the model's events, in order");
    assert.deepEqual(received, model.replies, "the peer read exactly the replies, in order");
    assert.deepEqual(
      new Map([...model.calls].map(([id, c]) => [id, c.outcome])),
      outcomes,
      "every call ended as the model says",
    );
    // Only a reason other than "normal" is logged, once, with the reason.
    if (end === "stopWithReason") {
      assert.equal(logger.calls.length, 1);
      assert.ok(logNames(logger.calls[0], "custom reason"));
    } else assert.deepEqual(logger.calls, []);
  } finally {
    clock.uninstall();
    if (peer) closeQuietly(peer);
    await server.stop("shutdown", { timeout: 0 });
  }
}

/**
 * The seed of the driver's model-based properties: fixed, so that a run is repeatable, or
 * `RELIABILITY_SEED` to explore others (a failure says which seed to rerun with).
 */
const FUZZ_SEED = (() => {
  const fixed = Deno.env.get("RELIABILITY_SEED");
  return fixed ? Number(fixed) | 0 : 0x0e7c_9009;
})();

/** `fc.assert` with {@linkcode FUZZ_SEED}; a failure says how to run it again. */
async function assertSeeded<Ts extends [unknown, ...unknown[]]>(
  property: fc.IAsyncProperty<Ts>,
  numRuns: number,
): Promise<void> {
  try {
    await fc.assert(property, { seed: FUZZ_SEED, numRuns });
  } catch (err) {
    if (err instanceof Error) {
      err.message += `\n  (rerun with RELIABILITY_SEED=${FUZZ_SEED}, or fc.assert's seed and path)`;
    }
    throw err;
  }
}

for (const variant of ["async", "sync", "hibernating"] as const) {
  Deno.test(`fuzz: driver (${variant} handler): random events and actions match the model`, async () => {
    await assertSeeded(
      fc.asyncProperty(
        fc.array(command, { maxLength: 40, size: "medium" }),
        fc.constantFrom<End>("disconnect", "stop", "stopWithReason"),
        (cmds, end) => runModel(variant, cmds, end),
      ),
      1000,
    );
  });
}

// ---- The driver's lifecycle against a model ------------------------------------------------------
//
// A second model, of the interleavings around timers, hibernation, upgrades and the end. Random
// runs cast a handler instructions (arm, cancel or re-arm named timers, hibernate, stop, send,
// reply to a call it has; or first wait, busy in an async step, on a gate the test opens later:
// timers fire, calls time out and events queue meanwhile), upgrade the server's code (one or
// more times, while the handler is hibernated, live or busy; codeChanges that compose, are
// absent, or throw), call the connection (answered by its handler, by another connection's
// handler, too late, or never), call conn.stop() and server.stop() with timeouts from 0 to 4 s
// at any moment (while the handler is busy, hibernated, or in a finally that yields `send` or
// is stuck in an await the test may release), and let time pass. Each handler version returns
// on `shutdown`, stops, or ignores it. Handlers: `async function*`, `function*` (nothing waits),
// and `async function*` hibernating after every event.
//
// On the virtual clock, the model predicts every event the handler sees (with the version of
// the handler that sees it, and the state each new generator starts with), the close reason
// (the first one decided), the virtual time of the close and of every stop()'s resolution (no
// later than the earliest deadline), how often each codeChange ran, every call's outcome, what
// the peer reads, and that a step abandoned at the end deadline runs its finally once its await
// settles. Apart from the model: a named timer's event comes only for a live arming, once, and
// not before it is due; every stop() resolves, by its own deadline; codeChanges compose in
// order, each at most once; no timer, connection or op is left behind (Deno's sanitizers).
// Virtual time has no jitter, so deadlines are checked exactly there. A few runs on the real
// clock, with times scaled down, check what holds whatever the order of near events, with a
// margin of seconds on the deadlines, and with real timers under the sanitizers.

type LAct =
  | { a: "arm"; name: string; secs: number }
  | { a: "cancel"; name: string }
  | { a: "hibernate" }
  | { a: "stop" }
  | { a: "send" }
  | { a: "reply" }; // to the oldest call the handler has and has not answered

/** What a handler version does on `shutdown`, and what its finally does. */
type Policy = { onShutdown: "return" | "stop" | "ignore"; yieldSend: boolean; stuck: boolean };

type CodeChangeKind = "none" | "ok" | "throws";

// Times: whole seconds plus a distinct even offset per timer or stop timeout (as above); the
// shutdownTimeout is whole seconds plus 1 ms, so that nothing is ever due at the same moment.
type LCmd =
  | { kind: "do"; acts: LAct[] } // a cast: the handler performs `acts` in its step
  | { kind: "busy"; acts: LAct[] } // a cast: the step awaits a gate, then performs `acts`
  | { kind: "release" } // open the oldest gate not yet open
  | { kind: "releaseFinally" } // finallies stuck in their await go on (now and from now on)
  | { kind: "upgrade"; codeChange: CodeChangeKind; policy: Policy }
  | { kind: "connStop"; timeout: number | null } // null: the default; 0: 0 ms; n: n-1 s + offset
  | { kind: "serverStop"; timeout: number | null }
  | { kind: "call"; secs: number } // conn.call() with a timeout of secs + offset
  | { kind: "helperReply" } // another connection's handler answers the oldest call taken
  | { kind: "wait"; secs: number };

/** An action as cast to the handler, with its times and names made concrete. */
type Concrete =
  | { a: "arm"; name: string; ms: number }
  | { a: "cancel"; name: string }
  | { a: "hibernate" }
  | { a: "stop"; reason: string }
  | { a: "send"; data: string }
  | { a: "reply" };

type Msg = { label: string; gate?: number; acts: Concrete[] };
type LState = { log: number[] };

const lifeTimer = fc.constantFrom("a", "b");
const lifeAct: fc.Arbitrary<LAct> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      a: fc.constant("arm" as const),
      name: lifeTimer,
      secs: fc.integer({ min: 0, max: 3 }),
    }),
  },
  { weight: 3, arbitrary: fc.record({ a: fc.constant("cancel" as const), name: lifeTimer }) },
  { weight: 2, arbitrary: fc.constant({ a: "hibernate" as const }) },
  { weight: 1, arbitrary: fc.constant({ a: "stop" as const }) },
  { weight: 1, arbitrary: fc.constant({ a: "send" as const }) },
  { weight: 2, arbitrary: fc.constant({ a: "reply" as const }) },
);
const lifePolicy: fc.Arbitrary<Policy> = fc.record({
  onShutdown: fc.constantFrom("return" as const, "stop" as const, "ignore" as const),
  yieldSend: fc.boolean(),
  stuck: fc.boolean(),
});
const stopTimeout = fc.option(fc.integer({ min: 0, max: 4 }), { freq: 4 });
const lifeCommand: fc.Arbitrary<LCmd> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("do" as const),
      acts: fc.array(lifeAct, { minLength: 0, maxLength: 3 }),
    }),
  },
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant("busy" as const),
      acts: fc.array(lifeAct, { minLength: 0, maxLength: 3 }),
    }),
  },
  { weight: 5, arbitrary: fc.constant({ kind: "release" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "releaseFinally" as const }) },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("upgrade" as const),
      codeChange: fc.constantFrom<CodeChangeKind>("ok", "ok", "ok", "ok", "none", "none", "throws"),
      policy: lifePolicy,
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("connStop" as const), timeout: stopTimeout }),
  },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("serverStop" as const), timeout: stopTimeout }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("call" as const),
      secs: fc.integer({ min: 0, max: 3 }),
    }),
  },
  { weight: 2, arbitrary: fc.constant({ kind: "helperReply" as const }) },
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("wait" as const),
      secs: fc.integer({ min: 1, max: 3 }),
    }),
  },
);
// A second server.stop() returns the first one's promise and its timeout is not applied (see
// the note at the test below): runs stop the server once at most.
const lifeCommands = fc.array(lifeCommand, { maxLength: 40, size: "medium" }).map((cmds) =>
  cmds.filter((c, i) => c.kind !== "serverStop" || cmds.findIndex((d) => d.kind === c.kind) === i)
);

type LifeVariant = "async" | "sync" | "hibernating";

function showEvent(ev: Event<string>): string {
  switch (ev.type) {
    case "cast":
      return `cast ${(ev.message as Msg).label}`;
    case "timeout":
      return `timeout ${ev.name ?? "(event timeout)"}`;
    case "shutdown":
      return `shutdown ${showReason(ev.reason)}`;
    case "call":
      return `call #${(ev.message as { id: number }).id}`;
    default:
      return ev.type;
  }
}

function showReason(reason: unknown): string {
  return reason instanceof Error ? `Error: ${reason.message}` : String(reason);
}

/** The test's side of a run: what the handlers record, the gates, the timer check. */
class LifeRun {
  readonly seen: string[] = [];
  readonly gates = new Map<number, PromiseWithResolvers<void>>();
  readonly finallyGate = Promise.withResolvers<void>();
  readonly codeChangeCalls: number[] = [0];
  /** Calls the handlers have taken and nobody has answered yet, oldest first. */
  readonly froms: Array<{ id: number; from: From }> = [];
  /** Broken timer promises, found apart from the model. */
  readonly violations: string[] = [];
  /** Every frame a handler yielded to send, in order. */
  readonly sent: string[] = [];
  readonly #armed = new Map<string, number>(); // name → due of its live arming
  readonly now: () => number;
  readonly #slack: number;
  readonly variant: LifeVariant;

  /** `slack`: how early (ms) a timer may fire on a real clock, whose timers are coarser. */
  constructor(now: () => number, slack: number, variant: LifeVariant) {
    this.now = now;
    this.#slack = slack;
    this.variant = variant;
  }

  /** The actions for `acts`, noting each arming and cancel as the handler yields it. */
  actions(acts: Concrete[], st: LState): Action[] {
    return acts.flatMap((act): Action | Action[] => {
      switch (act.a) {
        case "arm":
          this.#armed.set(act.name, this.now() + act.ms);
          return arm(act.ms, act.name);
        case "cancel":
          this.#armed.delete(act.name);
          return arm(null, act.name);
        case "hibernate":
          return hibernate(st);
        case "stop":
          return stop(act.reason);
        case "send":
          this.sent.push(act.data);
          return send(act.data);
        case "reply": {
          const call = this.froms.shift();
          return call ? reply(call.from, `r#${call.id}`) : [];
        }
      }
    });
  }

  /** A named timer's event: it must be for a live arming, due by now; that arming is used up. */
  timerFired(name: string): void {
    const due = this.#armed.get(name);
    const now = this.now();
    if (due === undefined) {
      this.violations.push(`at ${now}: timeout ${name}, which is not armed`);
    } else if (now < due - this.#slack) {
      this.violations.push(`at ${now}: timeout ${name}, due at ${due}`);
    }
    this.#armed.delete(name);
  }

  /** What handler version `v` does on `ev` (after a busy cast's gate): its actions, or return. */
  react(
    ev: Event<string>,
    v: number,
    policy: Policy,
    st: LState,
    seen = false,
  ): Action[] | "return" {
    if (!seen) this.seen.push(`v${v} ${showEvent(ev)}`);
    let actions: Action[] = [];
    if (ev.type === "cast") {
      actions = this.actions((ev.message as Msg).acts, st);
    } else if (ev.type === "timeout") {
      this.timerFired(ev.name!);
    } else if (ev.type === "call") {
      this.froms.push({ id: (ev.message as { id: number }).id, from: ev.from });
    } else if (ev.type === "upgrade") {
      actions = [hibernate(st)]; // switch
    } else if (ev.type === "shutdown") {
      if (policy.onShutdown === "return") return "return";
      if (policy.onShutdown === "stop") actions = [stop(`v${v} stops`)];
    }
    if (this.variant === "hibernating") actions.push(hibernate(st));
    return actions;
  }

  /**
   * Handler version `v` (0: the first; n: the n-th upgrade's). Its finally may yield a send (on
   * a return of its own it does not: that yield would be an ordinary one, waiting for events),
   * and may be stuck in an await; a plain-generator handler waits on no gate.
   */
  handler(v: number, policy: Policy): Handler<string> {
    // deno-lint-ignore no-this-alias
    const run = this;
    const start = (state: unknown) => {
      const st = (state ?? { log: [] }) as LState;
      run.seen.push(`v${v} start [${st.log.join(" ")}]`);
      return st;
    };
    const fin = (v: number) => {
      run.seen.push(`v${v} finally`);
      if (!policy.yieldSend) return undefined;
      run.sent.push(`fin v${v}`);
      return send(`fin v${v}`);
    };
    if (this.variant === "sync") {
      return function* (_conn: Connection<string>, state?: unknown): SyncGen {
        const st = start(state);
        let returning = false;
        try {
          let ev = yield;
          for (;;) {
            const actions = run.react(ev, v, policy, st);
            if (actions === "return") return void (returning = true);
            ev = yield actions;
          }
        } finally {
          const last = fin(v);
          if (last && !returning) run.seen.push(`v${v} finally resumed: ${showEvent(yield last)}`);
        }
      };
    }
    return async function* (_conn: Connection<string>, state?: unknown): Gen {
      const st = start(state);
      let returning = false;
      try {
        let ev = yield;
        for (;;) {
          const gate = ev.type === "cast" ? (ev.message as Msg).gate : undefined;
          if (gate !== undefined) {
            run.seen.push(`v${v} ${showEvent(ev)}`);
            await run.gates.get(gate)!.promise;
          }
          const actions = run.react(ev, v, policy, st, gate !== undefined);
          if (actions === "return") return void (returning = true);
          ev = yield actions;
        }
      } finally {
        const last = fin(v);
        if (last && !returning) run.seen.push(`v${v} finally resumed: ${showEvent(yield last)}`);
        if (policy.stuck) await run.finallyGate.promise;
      }
    };
  }

  codeChange(v: number, kind: CodeChangeKind): ((state: unknown) => unknown) | undefined {
    this.codeChangeCalls[v] = 0;
    if (kind === "none") return undefined;
    return (state) => {
      this.codeChangeCalls[v]++;
      if (kind === "throws") throw new Error(`codeChange ${v}`);
      return { log: [...(state as LState).log, v] };
    };
  }
}

type MEvent =
  | { type: "cast"; msg: Msg }
  | { type: "timeout"; name: string }
  | { type: "shutdown"; reason: string }
  | { type: "upgrade" }
  | { type: "call"; id: number };

/**
 * The model: what the driver promises, for one connection. The handler is at a yield
 * ("waiting"), hibernated, busy in a step (on a gate), returning of its own accord with its
 * finally stuck ("returning"), in a finally stuck in its await ("finally"), or gone.
 */
class LifeModel {
  now = 0;
  readonly seen: string[] = ["v0 start []"];
  /** What the peer must read, in order; then a prefix of `maybe` (what a forced end may drop). */
  readonly replies: string[] = [];
  readonly maybe: string[] = [];
  readonly codeChangeCalls: number[] = [0];
  /** How each call ended: `value …`, `timeout` or `closed`. */
  readonly calls = new Map<number, { due: number; outcome?: string }>();
  phase: "open" | "ending" | "closed" = "open";
  at: "waiting" | "hibernated" | "busy" | "returning" | "finally" | "gone" = "waiting";
  closeReason: string | undefined;
  closedAt: number | undefined;
  readonly #variant: LifeVariant;
  readonly #shutdownTimeout: number;
  #busy: { gate: number; acts: Concrete[] } | null = null;
  #abandoned: { gate: number; v: number; acts: Concrete[] } | null = null; // left at the deadline
  #froms: number[] = []; // calls taken by the handler, not answered yet
  #mailbox: MEvent[] = [];
  readonly #named = new Map<string, { due: number; fired: MEvent | null }>();
  #upgrades: Array<{ v: number; codeChange: CodeChangeKind; policy: Policy }> = [];
  #v = 0;
  #policy: Policy;
  #log: number[] = [];
  #shutdownReason: string | null = null;
  #endBy = Infinity;
  readonly #released = new Set<number>();
  #finallyReleased = false;
  #forced = false;
  #unwritten: string[] = []; // sent, not yet written (see #perform)
  #flushLater = false; // a 0 ms timer writes them at the next advance
  #offset = 0;

  constructor(variant: LifeVariant, policy: Policy, shutdownTimeout: number) {
    this.#variant = variant;
    this.#policy = policy;
    this.#shutdownTimeout = shutdownTimeout;
  }

  /** A distinct even offset, 10..988 ms. */
  offset(): number {
    return 10 + 2 * (this.#offset++ % 490);
  }

  // ---- Commands ----

  cast(msg: Msg): void {
    this.#push({ type: "cast", msg });
  }

  release(gate: number): void {
    this.#released.add(gate);
    if (this.at === "busy" && this.#busy!.gate === gate) {
      const acts = this.#busy!.acts;
      this.#busy = null;
      this.#perform(acts);
      this.#pump();
    } else if (this.#abandoned?.gate === gate) {
      // Its step goes on (its actions go nowhere; its replies come too late), the driver has it
      // return, and its finally runs, late.
      for (const act of this.#abandoned.acts) if (act.a === "reply") this.#froms.shift();
      this.seen.push(`v${this.#abandoned.v} finally`);
      this.#abandoned = null;
    }
  }

  call(id: number, timeout: number): void {
    if (this.phase !== "open") {
      this.calls.set(id, { due: Infinity, outcome: "closed" });
      return;
    }
    this.calls.set(id, { due: this.now + timeout });
    this.#push({ type: "call", id });
  }

  /** Another connection's handler answers the oldest call taken. */
  helperReply(): void {
    const id = this.#froms.shift();
    if (id !== undefined) this.#settle(id, `value r#${id}`);
  }

  #settle(id: number, outcome: string): void {
    const call = this.calls.get(id)!;
    call.outcome ??= outcome; // too late, after a timeout or the close: ignored
  }

  releaseFinally(): void {
    this.#finallyReleased = true;
    if (this.at === "finally") this.#finish();
    else if (this.at === "returning") this.#returned();
  }

  upgrade(v: number, codeChange: CodeChangeKind, policy: Policy): void {
    this.codeChangeCalls[v] = 0;
    if (this.phase !== "open") return;
    this.#upgrades.push({ v, codeChange, policy });
    if (this.at !== "hibernated") this.#push({ type: "upgrade" });
  }

  /** conn.stop(reason, { timeout }) or the first server.stop(): when its promise resolves. */
  stop(reason: string, timeout: number): () => number {
    if (this.phase === "closed") {
      const at = this.now;
      return () => at;
    }
    this.#endBy = Math.min(this.#endBy, this.now + timeout);
    if (this.phase === "open" && this.#shutdownReason === null) {
      this.#shutdownReason = reason;
      this.#push({ type: "shutdown", reason });
    }
    return () => this.closedAt!;
  }

  wait(ms: number): void {
    if (this.#flushLater) {
      this.#flushLater = false;
      // The 0 ms timer fires first, unless an end deadline is due at this very moment (a stop
      // with timeout 0), which may come first and drop the output.
      if (this.#endBy <= this.now) this.#drop();
      else this.#write();
    }
    const end = this.now + ms;
    for (;;) {
      let next: { at: number; fire: () => void } | null = null;
      const consider = (at: number, fire: () => void) => {
        if (at <= end && (next === null || at < next.at)) next = { at, fire };
      };
      if (this.phase === "open") {
        for (const [name, timer] of this.#named) {
          if (timer.fired === null) consider(timer.due, () => this.#fire(name, timer));
        }
      }
      if (this.phase !== "closed") {
        consider(this.#endBy, () => this.#deadline());
        for (const [id, call] of this.calls) {
          if (call.outcome === undefined) consider(call.due, () => this.#settle(id, "timeout"));
        }
      }
      if (next === null) break;
      const { at, fire } = next as { at: number; fire: () => void };
      this.now = at;
      fire();
    }
    this.now = end;
  }

  // ---- The driver ----

  #push(ev: MEvent): void {
    if (this.phase !== "open") return;
    this.#mailbox.push(ev);
    this.#pump();
  }

  #fire(name: string, timer: { due: number; fired: MEvent | null }): void {
    const ev: MEvent = { type: "timeout", name };
    timer.fired = ev;
    this.#push(ev);
  }

  // Deliver queued events while the handler waits at a yield or hibernates.
  #pump(): void {
    while (
      this.phase === "open" && (this.at === "waiting" || this.at === "hibernated") &&
      this.#mailbox.length > 0
    ) {
      const ev = this.#mailbox.shift()!;
      if (ev.type === "timeout" && this.#named.get(ev.name)?.fired === ev) {
        this.#named.delete(ev.name);
      }
      if (this.at === "hibernated" && !this.#wake()) return;
      this.#react(ev);
    }
  }

  // A new generator, after the pending upgrades in order; false if a codeChange threw.
  #wake(): boolean {
    const upgrades = this.#upgrades;
    this.#upgrades = [];
    for (const { v, codeChange, policy } of upgrades) {
      this.#v = v;
      this.#policy = policy;
      if (codeChange === "none") continue;
      this.codeChangeCalls[v]++;
      if (codeChange === "throws") {
        this.at = "gone";
        this.#end(`Error: codeChange ${v}`);
        this.#finish();
        return false;
      }
      this.#log = [...this.#log, v];
    }
    this.seen.push(`v${this.#v} start [${this.#log.join(" ")}]`);
    this.at = "waiting";
    return true;
  }

  // The finally awaits, and the test has not let it go on.
  get #stuck(): boolean {
    return this.#policy.stuck && !this.#finallyReleased && this.#variant !== "sync";
  }

  #react(ev: MEvent): void {
    const v = this.#v;
    switch (ev.type) {
      case "cast":
        this.seen.push(`v${v} cast ${ev.msg.label}`);
        if (
          ev.msg.gate !== undefined && !this.#released.has(ev.msg.gate) &&
          this.#variant !== "sync" // (a plain generator waits on nothing)
        ) {
          this.at = "busy";
          this.#busy = { gate: ev.msg.gate, acts: ev.msg.acts };
          return;
        }
        return this.#perform(ev.msg.acts);
      case "timeout":
        this.seen.push(`v${v} timeout ${ev.name}`);
        return this.#perform([]);
      case "upgrade":
        this.seen.push(`v${v} upgrade`);
        return this.#perform([{ a: "hibernate" }]);
      case "call":
        this.seen.push(`v${v} call #${ev.id}`);
        this.#froms.push(ev.id);
        return this.#perform([]);
      case "shutdown":
        this.seen.push(`v${v} shutdown ${ev.reason}`);
        switch (this.#policy.onShutdown) {
          case "return":
            this.seen.push(`v${v} finally`);
            if (this.#stuck) this.at = "returning";
            else this.#returned();
            return;
          case "stop":
            return this.#perform([{ a: "stop", reason: `v${v} stops` }]);
          case "ignore":
            return this.#perform([]);
        }
    }
  }

  // The actions of a step, all of them in order; then stop wins over hibernate.
  #perform(acts: Concrete[]): void {
    if (this.#variant === "hibernating") acts = [...acts, { a: "hibernate" }];
    let outcome: "continue" | "hibernate" | "stop" = "continue";
    let reason = "";
    const sent: string[] = [];
    for (const act of acts) {
      switch (act.a) {
        case "send":
          sent.push(act.data);
          break;
        case "arm":
          this.#cancel(act.name);
          this.#named.set(act.name, { due: this.now + act.ms, fired: null });
          break;
        case "cancel":
          this.#cancel(act.name);
          break;
        case "hibernate":
          if (outcome === "continue") outcome = "hibernate";
          break;
        case "stop":
          outcome = "stop";
          reason = act.reason;
          break;
        case "reply": {
          const id = this.#froms.shift();
          if (id !== undefined) this.#settle(id, `value r#${id}`);
          break;
        }
      }
    }
    this.#unwritten.push(...sent);
    if (outcome === "stop") {
      this.#write(); // the end flushes what the step sent, while the finally runs
      this.at = "waiting";
      this.#end(reason);
      this.#closeGenerator();
    } else if (outcome === "hibernate") {
      this.#write(); // hibernating flushes
      this.at = "hibernated";
    } else {
      this.at = "waiting";
      // An async handler with more events queued goes on at once: its output is written when
      // it next waits, or by a 0 ms timer (so, here, when virtual time next moves).
      if (this.#variant !== "async" || this.#mailbox.length === 0) this.#write();
      else if (this.#unwritten.length > 0) this.#flushLater = true;
    }
  }

  // A cancel or re-arm takes back the timer's event if it fired and is not yet delivered.
  #cancel(name: string): void {
    const timer = this.#named.get(name);
    if (timer === undefined) return;
    if (timer.fired !== null) {
      const at = this.#mailbox.indexOf(timer.fired);
      if (at >= 0) this.#mailbox.splice(at, 1);
    }
    this.#named.delete(name);
  }

  // The handler returned of its own accord (its finally done): a normal end.
  #returned(): void {
    this.at = "gone";
    this.#end("normal");
    this.#finish();
  }

  // The end is decided: the first reason stands; the deadline comes no later than
  // shutdownTimeout from now.
  #end(reason: string): void {
    if (this.phase !== "open") return;
    this.phase = "ending";
    this.closeReason = reason;
    this.#endBy = Math.min(this.#endBy, this.now + this.#shutdownTimeout);
  }

  // Run the finally of the generator at its yield, if there is one (not when hibernated).
  #closeGenerator(): void {
    if (this.at === "hibernated" || this.at === "gone") {
      this.at = "gone";
      return this.#finish();
    }
    const v = this.#v;
    this.seen.push(`v${v} finally`);
    if (this.#policy.yieldSend) {
      this.#write(); // a finally's yield writes what is pending (none, when forced)
      (this.#forced ? this.maybe : this.replies).push(`fin v${v}`);
      this.seen.push(`v${v} finally resumed: shutdown ${this.closeReason}`);
    }
    if (this.#stuck) this.at = "finally";
    else {
      this.at = "gone";
      this.#finish();
    }
  }

  // The end deadline: whatever is still going is abandoned.
  #deadline(): void {
    if (this.phase === "open") {
      // Shut down, and not ended in time: forced, with the first shutdown's reason.
      this.phase = "ending";
      this.closeReason = this.#shutdownReason!;
      this.#forced = true;
      this.#drop(); // pending output is dropped
      if (this.at === "busy") {
        this.#abandoned = { ...this.#busy!, v: this.#v };
        this.#busy = null;
      } else if (this.at !== "returning") {
        this.#closeGenerator(); // its finally runs, and is abandoned at once if stuck
        if (this.closedAt !== undefined) return;
      }
    }
    this.#finish(true);
  }

  #write(): void {
    this.replies.push(...this.#unwritten);
    this.#unwritten = [];
  }

  // Output still unwritten when the end is forced may be lost: the peer reads a prefix of it.
  #drop(): void {
    this.maybe.push(...this.#unwritten);
    this.#unwritten = [];
  }

  #finish(abandoned = false): void {
    if (abandoned) this.#drop();
    else this.#write();
    this.at = "gone";
    this.phase = "closed";
    this.closedAt = this.now;
    this.#mailbox = [];
    this.#named.clear();
    for (const id of this.calls.keys()) this.#settle(id, "closed");
  }
}

/** On the real clock, a second of a run's times is this many milliseconds. */
const REAL_SCALE = 0.01;
/** On the real clock, how late (ms) a stop() may resolve past its deadline (a loaded machine). */
const REAL_MARGIN = 2000;

/** Whether `sub` is `all` with some elements left out (none repeated, none reordered). */
function isSubsequence(sub: string[], all: string[]): boolean {
  let i = 0;
  for (const x of all) if (i < sub.length && sub[i] === x) i++;
  return i === sub.length;
}

/**
 * One run of `cmds`. On the virtual clock everything is checked against the model, exactly; on
 * the real clock (times scaled by {@linkcode REAL_SCALE}, so that the order of near events is up
 * to the machine), only what holds whatever the order: the checks apart from the model, with a
 * generous margin on the deadlines, and Deno's sanitizers (real timers this time).
 */
async function runLifecycle(
  variant: LifeVariant,
  policy: Policy,
  shutdownSecs: number,
  cmds: LCmd[],
  real = false,
): Promise<void> {
  const clock = new VirtualClock();
  const scale = real ? REAL_SCALE : 1;
  const now = real ? () => performance.now() : () => clock.now;
  const until = <V>(promise: Promise<V>, what: string): Promise<V> =>
    real ? within(10_000, promise, what) : clock.until(promise, what);
  const transport = memory(`fuzz-lifecycle-${++memoryNames}`);
  const logger = capturingLogger();
  const shutdownTimeout = (shutdownSecs * 1000 + 1) * scale;
  const run = new LifeRun(now, real ? 1.5 : 0, variant);
  const accepted = Promise.withResolvers<Connection<string>>();
  const first = run.handler(0, policy);
  const server = await serve((conn: Connection<string>, state?: unknown) => {
    accepted.resolve(conn);
    return first(conn, state);
  }, { transport, framing: lines(), logger, shutdownTimeout });
  // Another server, whose connection's handler answers calls made to the first one.
  const helperTransport = memory(`fuzz-lifecycle-helper-${memoryNames}`);
  const helperStarted = Promise.withResolvers<Connection<string>>();
  const helper = await serve(function* (conn: Connection<string>): SyncGen {
    helperStarted.resolve(conn);
    let ev = yield;
    while (ev.type === "cast") {
      const { from, value } = ev.message as { from: From; value: string };
      ev = yield reply(from, value);
    }
  }, { transport: helperTransport, framing: lines() });
  if (!real) clock.install();
  const model = new LifeModel(variant, policy, shutdownTimeout);
  const outcomes = new Map<number, string>();
  const received: string[] = [];
  // Every stop: its deadline, when it resolved, and when the model says it does.
  const stops: Array<
    { what: string; deadline: number; resolvedAt?: number; expected: () => number }
  > = [];
  let peer: Awaited<ReturnType<typeof transport.connect>> | undefined;
  let helperPeer: Awaited<ReturnType<typeof transport.connect>> | undefined;
  try {
    peer = await transport.connect({});
    helperPeer = await helperTransport.connect({});
    const conn = await until(accepted.promise, "accept");
    const helperConn = await until(helperStarted.promise, "the helper's accept");
    let closedAt: number | undefined;
    conn.closed.then(() => closedAt = now());
    const reading = (async () => {
      const text = new TextDecoder();
      const buf = new Uint8Array(4096);
      let rest = "";
      for (;;) {
        const n = await peer!.read(buf).catch(() => null);
        if (n === null) return;
        rest += text.decode(buf.subarray(0, n), { stream: true });
        const parts = rest.split("\n");
        rest = parts.pop()!;
        received.push(...parts);
      }
    })();
    await clock.settle();

    let ids = 0;
    let upgrades = 0;
    const gateOrder: number[] = [];
    let opened = 0;
    const ms = (secs: number) => (secs * 1000 + model.offset()) * scale;
    const concrete = (acts: LAct[], id: number): Concrete[] =>
      acts.map((act, i): Concrete => {
        switch (act.a) {
          case "arm":
            return { a: "arm", name: act.name, ms: ms(act.secs) };
          case "stop":
            return { a: "stop", reason: `stop #${id}` };
          case "send":
            return { a: "send", data: `#${id}.${i}` };
          default:
            return act;
        }
      });
    const stopMs = (timeout: number | null): number | undefined =>
      timeout === null ? undefined : timeout === 0 ? 0 : ms(timeout - 1);
    const track = (what: string, promise: Promise<void>, timeout: number | undefined) => {
      const stop = {
        what,
        deadline: now() + (timeout ?? shutdownTimeout),
        resolvedAt: undefined as number | undefined,
        expected: model.stop(what, timeout ?? shutdownTimeout),
      };
      promise.then(() => stop.resolvedAt = now());
      stops.push(stop);
    };
    const openGate = (gate: number) => {
      run.gates.get(gate)!.resolve();
      model.release(gate);
    };

    // At the end, a stop that ends whatever is left, and time for its deadline.
    const final: LCmd[] = [{ kind: "connStop", timeout: 6 }, { kind: "wait", secs: 7 }];
    for (const cmd of [...cmds, ...final]) {
      const id = ++ids;
      switch (cmd.kind) {
        case "do":
        case "busy": {
          const msg: Msg = { label: `#${id}`, acts: concrete(cmd.acts, id) };
          if (cmd.kind === "busy") {
            msg.gate = id;
            run.gates.set(id, Promise.withResolvers());
            gateOrder.push(id);
          }
          conn.cast(msg);
          model.cast(msg);
          break;
        }
        case "release":
          if (opened < gateOrder.length) openGate(gateOrder[opened++]);
          break;
        case "releaseFinally":
          run.finallyGate.resolve();
          model.releaseFinally();
          break;
        case "upgrade": {
          const v = ++upgrades;
          server.upgrade(run.handler(v, cmd.policy), {
            codeChange: run.codeChange(v, cmd.codeChange),
          });
          model.upgrade(v, cmd.codeChange, cmd.policy);
          break;
        }
        case "connStop": {
          const timeout = stopMs(cmd.timeout);
          const reason = id > cmds.length ? "final" : `conn.stop #${id}`;
          track(reason, conn.stop(reason, { timeout }), timeout);
          break;
        }
        case "serverStop": {
          const timeout = stopMs(cmd.timeout);
          const reason = `server.stop #${id}`;
          track(reason, server.stop(reason, { timeout }), timeout);
          break;
        }
        case "call": {
          const timeout = ms(cmd.secs);
          conn.call({ id }, { timeout }).then(
            (value) => outcomes.set(id, `value ${value}`),
            (err) =>
              outcomes.set(
                id,
                err instanceof TimeoutError
                  ? "timeout"
                  : err instanceof ConnectionClosed
                  ? "closed"
                  : `error ${err}`,
              ),
          );
          model.call(id, timeout);
          break;
        }
        case "helperReply": {
          const call = run.froms.shift();
          if (call) helperConn.cast({ from: call.from, value: `r#${call.id}` });
          model.helperReply();
          break;
        }
        case "wait":
          model.wait(cmd.secs * 1000 * scale);
          if (real) await new Promise((r) => setTimeout(r, cmd.secs * 1000 * scale));
          else await clock.advance(cmd.secs * 1000);
          continue;
      }
      await clock.settle();
    }

    const reason = await until(conn.closed, "the close");
    // Whatever is still waiting goes on: an abandoned step's finally runs now.
    while (opened < gateOrder.length) openGate(gateOrder[opened++]);
    run.finallyGate.resolve();
    model.releaseFinally();
    await clock.settle();
    await until(reading, "the peer's reads");

    // Apart from the model.
    assert.deepEqual(run.violations, [], "timers fire once per arming, never early or stale");
    const margin = real ? REAL_MARGIN : 0;
    for (const stop of stops) {
      assert.ok(stop.resolvedAt !== undefined, `${stop.what} resolved`);
      assert.ok(
        stop.resolvedAt <= stop.deadline + margin,
        `${stop.what} resolved at ${stop.resolvedAt}, by its deadline ${stop.deadline}`,
      );
    }
    assert.ok(
      /^(normal|final|(conn\.stop|server\.stop|stop) #\d+|v\d+ stops|Error: codeChange \d+)$/
        .test(showReason(reason)),
      `a close reason that was asked for: ${showReason(reason)}`,
    );
    assert.ok(run.codeChangeCalls.every((n) => n <= 1), "each codeChange ran once at most");
    let log: number[] = [];
    for (const entry of run.seen) {
      const started = entry.match(/^v\d+ start \[(.*)\]$/);
      if (started === null) continue;
      const next = started[1] === "" ? [] : started[1].split(" ").map(Number);
      assert.deepEqual(next.slice(0, log.length), log, "codeChanges compose, in order");
      assert.ok(next.every((v, i) => i === 0 || next[i - 1] < v), "in the order of the upgrades");
      log = next;
    }
    for (let id = 1; id <= ids; id++) {
      if (!model.calls.has(id)) continue;
      const outcome = outcomes.get(id);
      assert.ok(
        outcome === `value r#${id}` || outcome === "timeout" || outcome === "closed",
        `call #${id} ended: ${outcome}`,
      );
    }
    assert.ok(isSubsequence(received, run.sent), "the peer read only what was sent, in order");
    // An abnormal end is logged once, with its reason; a normal one not at all.
    if (reason === "normal") assert.deepEqual(logger.calls, []);
    else {
      assert.equal(logger.calls.length, 1, "logged once");
      assert.ok(logNames(logger.calls[0], reason));
    }
    assert.equal(server.connections().length, 0, "the connection is gone from the server");
    if (real) return;

    // Against the model, exactly.
    assert.equal(model.phase, "closed", "the model's own end");
    assert.deepEqual(run.seen, model.seen, "the handlers saw exactly the model's events");
    assert.equal(showReason(reason), model.closeReason, "the close reason");
    assert.equal(closedAt, model.closedAt, "closed at the model's (virtual) time");
    for (const stop of stops) {
      assert.equal(stop.resolvedAt, stop.expected(), `${stop.what} resolved when the model says`);
    }
    assert.deepEqual(run.codeChangeCalls, model.codeChangeCalls, "codeChange calls");
    assert.deepEqual(
      outcomes,
      new Map([...model.calls].map(([id, call]) => [id, call.outcome])),
      "every call ended as the model says",
    );
    assert.deepEqual(
      received.slice(0, model.replies.length),
      model.replies,
      "the peer read what the handlers sent",
    );
    assert.deepEqual(
      received.slice(model.replies.length),
      model.maybe.slice(0, received.length - model.replies.length),
      "and then at most some of what a forced end may drop",
    );
    assert.equal(clock.pending, 0, "no timer left behind");
  } finally {
    if (!real) clock.uninstall();
    if (peer) closeQuietly(peer);
    if (helperPeer) closeQuietly(helperPeer);
    for (const gate of run.gates.values()) gate.resolve();
    run.finallyGate.resolve();
    await server.stop("shutdown", { timeout: 0 });
    await helper.stop("shutdown", { timeout: 0 });
  }
}

for (const variant of ["async", "sync", "hibernating"] as const) {
  // Noted while writing this property (server.ts): a second server.stop() with a shorter
  // timeout is not applied (it returns the first call's promise), unlike a later conn.stop().
  // Runs call it once at most.
  Deno.test(`fuzz: driver lifecycle (${variant} handler): busy steps, timers, hibernation, upgrades and stops match the model`, async () => {
    await assertSeeded(
      fc.asyncProperty(
        lifePolicy,
        fc.integer({ min: 1, max: 4 }),
        lifeCommands,
        (policy, shutdownSecs, cmds) => runLifecycle(variant, policy, shutdownSecs, cmds),
      ),
      1500,
    );
  });

  if (variant === "sync") continue; // (nothing waits in a plain generator: little is left to race)
  Deno.test(`fuzz: driver lifecycle (${variant} handler), real clock: timers, codeChanges, calls and stop deadlines hold`, async () => {
    await assertSeeded(
      fc.asyncProperty(
        lifePolicy,
        fc.integer({ min: 1, max: 4 }),
        lifeCommands,
        (policy, shutdownSecs, cmds) => runLifecycle(variant, policy, shutdownSecs, cmds, true),
      ),
      20,
    );
  });
}
