// Micro-benchmarks of the hot path's pieces: framing decode and encode, and
// one step of a handler generator. `deno task bench:micro`, or
//
//   deno bench bench/micro_bench.ts
//
// Only the public API (../mod.ts) is used. Each decode bench feeds one 64 KiB
// chunk (what one socket read may bring) to a long-lived decoder, as the
// connection driver does; the results are summed into a sink so that nothing
// is optimised away.
import {
  encodeFrames,
  type Event,
  type FrameWriter,
  lengthPrefixed,
  lines,
  send,
  type Yielded,
} from "../mod.ts";

const CHUNK = 64 * 1024;
const PAYLOAD = 64;
let sink = 0;

// ------------------------------------------------------------------ decode

const len4 = lengthPrefixed(4);

/** As many whole 64-byte frames (4-byte header + payload) as fit in 64 KiB. */
function len4Chunk(): Uint8Array {
  const frames = Array.from({ length: Math.floor(CHUNK / (4 + PAYLOAD)) }, (_, i) => {
    const f = new Uint8Array(PAYLOAD);
    f.fill(i & 255);
    return f;
  });
  return encodeFrames(len4, frames);
}

const framed = len4Chunk();
const framedCount = Math.floor(CHUNK / (4 + PAYLOAD));
// The same bytes cut into reads that split headers and payloads.
const SPLIT = 1000; // not a multiple of 68: every cut lands mid-frame
const framedPieces = Array.from(
  { length: Math.ceil(framed.length / SPLIT) },
  (_, i) => framed.subarray(i * SPLIT, (i + 1) * SPLIT),
);

Deno.bench({
  name: `lengthPrefixed(4) decode: 64 KiB chunk of ${framedCount} × ${PAYLOAD} B frames`,
  group: "decode",
  baseline: true,
  fn: (() => {
    const decoder = len4.decoder();
    const emit = (f: Uint8Array) => sink += f.length;
    return () => decoder.decode(framed, emit);
  })(),
});

Deno.bench({
  name: `lengthPrefixed(4) decode: same bytes in ${framedPieces.length} reads of ${SPLIT} B`,
  group: "decode",
  fn: (() => {
    const decoder = len4.decoder();
    const emit = (f: Uint8Array) => sink += f.length;
    return () => {
      for (const piece of framedPieces) decoder.decode(piece, emit);
    };
  })(),
});

const LINE = 63; // + "\n": 64 bytes a line
const lineCount = CHUNK / (LINE + 1);
const lineBytes = new TextEncoder().encode(
  Array.from({ length: lineCount }, (_, i) => `${i}`.padStart(LINE, "x") + "\n").join(""),
);

Deno.bench({
  name: `lines() decode: 64 KiB chunk of ${lineCount} × ${LINE + 1} B lines`,
  group: "decode",
  fn: (() => {
    const decoder = lines().decoder();
    const emit = (line: string) => sink += line.length;
    return () => decoder.decode(lineBytes, emit);
  })(),
});

// ------------------------------------------------------------------ encode

/** A reusable output buffer, as a connection keeps one: grows, never shrinks. */
class Out implements FrameWriter {
  buf = new Uint8Array(256);
  len = 0;
  #encoder = new TextEncoder();
  #reserve(extra: number) {
    if (this.len + extra <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(this.len + extra, this.buf.length * 2));
    grown.set(this.buf.subarray(0, this.len));
    this.buf = grown;
  }
  write(bytes: Uint8Array): void {
    this.#reserve(bytes.length);
    this.buf.set(bytes, this.len);
    this.len += bytes.length;
  }
  writeString(text: string): void {
    this.#reserve(text.length * 3);
    this.len += this.#encoder.encodeInto(text, this.buf.subarray(this.len)).written;
  }
  writeUint(value: number, bytes: 1 | 2 | 4): void {
    this.#reserve(bytes);
    for (let i = bytes - 1; i >= 0; i--) this.buf[this.len++] = (value >>> (8 * i)) & 255;
  }
}

const sixteen = Array.from({ length: 16 }, (_, i) => new Uint8Array(PAYLOAD).fill(i));

Deno.bench({
  name: `lengthPrefixed(4).encode: 16 × ${PAYLOAD} B frames into a reused FrameWriter`,
  group: "encode",
  baseline: true,
  fn: (() => {
    const out = new Out();
    return () => {
      out.len = 0;
      for (const f of sixteen) len4.encode(f, out);
      sink += out.len;
    };
  })(),
});

Deno.bench({
  name: `encodeFrames(lengthPrefixed(4), 16 × ${PAYLOAD} B frames) (fresh buffer)`,
  group: "encode",
  fn: () => {
    sink += encodeFrames(len4, sixteen).length;
  },
});

// --------------------------------------------------------- generator step

// The echo example's handler, both ways: one step is `gen.next(ev)` with a
// packet, answered by `send(ev.data)`.

function* echoSync(): Generator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "disconnect" || ev.type === "shutdown") return;
    else ev = yield;
  }
}

async function* echoAsync(): AsyncGenerator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "disconnect" || ev.type === "shutdown") return;
    else ev = yield;
  }
}

const packet: Event = { type: "packet", data: sixteen[0] };

Deno.bench({
  name: "generator step: function* gen.next(ev)",
  group: "generator step",
  baseline: true,
  fn: (() => {
    const gen = echoSync();
    gen.next(packet); // to the first yield
    return () => {
      const r = gen.next(packet);
      if (!r.done) sink++;
    };
  })(),
});

Deno.bench({
  name: "generator step: async function* await gen.next(ev)",
  group: "generator step",
  fn: await (async () => {
    const gen = echoAsync();
    await gen.next(packet);
    return async () => {
      const r = await gen.next(packet);
      if (!r.done) sink++;
    };
  })(),
});

// A batch, as one read of 16 pipelined frames drives it: the async generator's
// promise per step adds up, the sync one's does not.
Deno.bench({
  name: "generator step ×16: function*",
  group: "16 steps (one pipelined read)",
  baseline: true,
  fn: (() => {
    const gen = echoSync();
    gen.next(packet);
    return () => {
      for (let i = 0; i < 16; i++) if (!gen.next(packet).done) sink++;
    };
  })(),
});

Deno.bench({
  name: "generator step ×16: async function*",
  group: "16 steps (one pipelined read)",
  fn: await (async () => {
    const gen = echoAsync();
    await gen.next(packet);
    return async () => {
      for (let i = 0; i < 16; i++) if (!(await gen.next(packet)).done) sink++;
    };
  })(),
});

globalThis.addEventListener("unload", () => {
  if (sink === -1) console.log(sink); // keeps `sink` alive
});
