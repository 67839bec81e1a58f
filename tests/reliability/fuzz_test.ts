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
// fast-check prints the seed and the shrunk counterexample of a failure; rerun one with
// `fc.assert(..., { seed, path })`. Runs are bounded so that the file takes a few seconds.

import assert from "node:assert/strict";
// A dev-only dependency, pinned here rather than in deno.json's imports (the library has none).
// deno-lint-ignore no-import-prefix
import fc from "npm:fast-check@3.23.2";
import { setImmediate } from "node:timers";
import {
  type Connection,
  ConnectionClosed,
  type Decoder,
  type Event,
  FrameTooLarge,
  type Framing,
  type Handler,
  hibernate,
  lengthPrefixed,
  lines,
  MalformedFrame,
  memory,
  raw,
  reply,
  send,
  serve,
  setTimeout as arm,
  stop,
  TimeoutError,
  type Yielded,
} from "../../mod.ts";
import { capturingLogger, closeQuietly, logNames } from "./_support.ts";

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

for (const variant of ["async", "sync", "hibernating"] as const) {
  Deno.test(`fuzz: driver (${variant} handler): random events and actions match the model`, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(command, { maxLength: 40, size: "medium" }),
        fc.constantFrom<End>("disconnect", "stop", "stopWithReason"),
        (cmds, end) => runModel(variant, cmds, end),
      ),
      { numRuns: 1000 },
    );
  });
}
