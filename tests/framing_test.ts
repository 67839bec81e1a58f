// Framing: raw(), lengthPrefixed(), lines() and user framings, as pure decoders/encoders (every
// split point, byte by byte, all at once, with the read buffer reused as the driver does) and
// end to end through a real server over the memory transport and over TCP.

import assert from "node:assert/strict";
import {
  type Conn,
  connect,
  type Connection,
  decodeFrames,
  type Decoder,
  encodeFrames,
  FrameTooLarge,
  type FrameWriter,
  type Framing,
  type Handler,
  lengthPrefixed,
  lines,
  MalformedFrame,
  memory,
  raw,
  send,
  serve,
  type Server,
} from "../mod.ts";
import {
  capturingLogger,
  closeQuietly,
  concat,
  HOST,
  logNames,
  portOf,
  prng,
  readExactly,
  within,
  writeAll,
} from "./_support.ts";

const utf8 = new TextEncoder();

// ---- Helpers ----------------------------------------------------------------------------------

function bytesOf(length: number, seed: number): Uint8Array {
  const rand = prng(seed);
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = Math.floor(rand() * 256);
  return out;
}

/**
 * Feed `chunks` to one fresh decoder the way the driver does: each chunk is copied into one
 * shared read buffer, decoded from there, and the buffer is scribbled over right after, so a
 * decoder that keeps a view instead of a copy emits corrupted frames.
 */
function decodeChunks<T>(framing: Framing<T>, chunks: Uint8Array[]): {
  frames: T[];
  decoder: Decoder<T>;
} {
  const decoder = framing.decoder();
  const frames: T[] = [];
  const readBuf = new Uint8Array(Math.max(1, ...chunks.map((c) => c.length)));
  for (const chunk of chunks) {
    readBuf.set(chunk);
    decoder.decode(readBuf.subarray(0, chunk.length), (frame) => frames.push(frame));
    readBuf.fill(0xa5);
  }
  return { frames, decoder };
}

/** Every way to cut `bytes` in two (including an empty first or last chunk). */
function* twoChunkSplits(bytes: Uint8Array): Generator<[number, Uint8Array[]]> {
  for (let i = 0; i <= bytes.length; i++) yield [i, [bytes.subarray(0, i), bytes.subarray(i)]];
}

function byteByByte(bytes: Uint8Array): Uint8Array[] {
  return Array.from(bytes, (_, i) => bytes.subarray(i, i + 1));
}

function randomChunks(bytes: Uint8Array, rand: () => number, maxChunk: number): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let at = 0; at < bytes.length;) {
    const n = 1 + Math.floor(rand() * maxChunk);
    chunks.push(bytes.subarray(at, at + n));
    at += n;
  }
  return chunks;
}

/**
 * `bytes` must decode to `expected` whether it arrives in one chunk, in two chunks cut at every
 * point, byte by byte, or in random chunks; and the decoder holds nothing afterwards.
 */
function assertDecodesEverySplit<T>(framing: Framing<T>, bytes: Uint8Array, expected: T[]) {
  const label = `${framing.name}, ${expected.length} frames, ${bytes.length} bytes`;
  const whole = decodeChunks(framing, [bytes]);
  assert.deepEqual(whole.frames, expected, `${label}: one chunk`);
  assert.equal(whole.decoder.buffered, 0, `${label}: nothing held after one chunk`);
  assert.deepEqual(decodeFrames(framing, bytes), expected, `${label}: decodeFrames`);
  for (const [at, chunks] of twoChunkSplits(bytes)) {
    const { frames, decoder } = decodeChunks(framing, chunks);
    assert.deepEqual(frames, expected, `${label}: split at ${at}`);
    assert.equal(decoder.buffered, 0, `${label}: split at ${at}: nothing held`);
  }
  const single = decodeChunks(framing, byteByByte(bytes));
  assert.deepEqual(single.frames, expected, `${label}: byte by byte`);
  assert.equal(single.decoder.buffered, 0, `${label}: byte by byte: nothing held`);
  const rand = prng(bytes.length + 17);
  for (let round = 0; round < 20; round++) {
    const { frames } = decodeChunks(framing, randomChunks(bytes, rand, 40));
    assert.deepEqual(frames, expected, `${label}: random chunks, round ${round}`);
  }
}

function assertFrameTooLarge(length: number, maxLength: number) {
  return (err: unknown) => {
    assert.ok(err instanceof FrameTooLarge, `expected FrameTooLarge, got ${err}`);
    assert.equal(err.name, "FrameTooLarge");
    assert.equal(err.length, length);
    assert.equal(err.maxLength, maxLength);
    return true;
  };
}

function isMalformed(err: unknown): boolean {
  assert.ok(err instanceof MalformedFrame, `expected MalformedFrame, got ${err}`);
  assert.equal(err.name, "MalformedFrame");
  return true;
}

// ---- raw() ------------------------------------------------------------------------------------

Deno.test("raw: each non-empty chunk is one frame, copied; empty chunks emit nothing", () => {
  const framing = raw();
  assert.equal(framing.name, "raw");
  const bytes = bytesOf(300, 1);
  for (const [at, chunks] of twoChunkSplits(bytes)) {
    const { frames, decoder } = decodeChunks(framing, chunks);
    assert.deepEqual(frames, chunks.filter((c) => c.length > 0), `split at ${at}`);
    assert.deepEqual(concat(frames), bytes);
    assert.equal(decoder.buffered, 0);
  }
  const single = decodeChunks(framing, byteByByte(bytes));
  assert.equal(single.frames.length, bytes.length);
  assert.deepEqual(concat(single.frames), bytes);
  assert.deepEqual(decodeFrames(framing, new Uint8Array(0)), []);
});

Deno.test("raw: encode writes bytes as is and strings as UTF-8; other types are a TypeError", () => {
  const framing = raw();
  const bytes = bytesOf(50, 2);
  assert.deepEqual(
    encodeFrames(framing, [bytes, new Uint8Array(0), bytes]),
    concat([bytes, bytes]),
  );
  const asText = framing as unknown as Framing<string>;
  assert.deepEqual(encodeFrames(asText, ["héllo ✓"]), utf8.encode("héllo ✓"));
  const asAny = framing as unknown as Framing<unknown>;
  for (const bad of [42, null, undefined, {}, [1, 2], new ArrayBuffer(2), true]) {
    assert.throws(() => encodeFrames(asAny, [bad]), TypeError, `raw encode of ${String(bad)}`);
  }
});

// ---- lengthPrefixed() -------------------------------------------------------------------------

Deno.test("lengthPrefixed: encodes a big-endian length of 1, 2 or 4 bytes", () => {
  const payload = bytesOf(300, 3);
  assert.deepEqual(
    encodeFrames(lengthPrefixed(4), [new Uint8Array([7, 8]), new Uint8Array(0)]),
    new Uint8Array([0, 0, 0, 2, 7, 8, 0, 0, 0, 0]),
  );
  assert.deepEqual(
    encodeFrames(lengthPrefixed(4), [payload]),
    concat([Uint8Array.of(0, 0, 1, 44), payload]),
  );
  assert.deepEqual(
    encodeFrames(lengthPrefixed(2), [payload]),
    concat([Uint8Array.of(1, 44), payload]),
  );
  assert.deepEqual(
    encodeFrames(lengthPrefixed(1), [payload.subarray(0, 255), new Uint8Array(0)]),
    concat([Uint8Array.of(255), payload.subarray(0, 255), Uint8Array.of(0)]),
  );
  // The default is 4 bytes; strings go out as UTF-8, their length counted in bytes.
  const len4 = lengthPrefixed() as unknown as Framing<string>;
  assert.equal(len4.name, "lengthPrefixed(4)");
  assert.deepEqual(encodeFrames(len4, ["€"]), Uint8Array.of(0, 0, 0, 3, 0xe2, 0x82, 0xac));
});

Deno.test("lengthPrefixed(1|2|4): frames decode identically at every split point", () => {
  const cases: Array<{ size: 1 | 2 | 4; max: number; framing: Framing<Uint8Array> }> = [
    { size: 1, max: 255, framing: lengthPrefixed(1) },
    { size: 1, max: 40, framing: lengthPrefixed(1, { maxLength: 40 }) },
    { size: 2, max: 700, framing: lengthPrefixed(2, { maxLength: 700 }) },
    { size: 4, max: 300, framing: lengthPrefixed(4, { maxLength: 300 }) },
    { size: 4, max: 0, framing: lengthPrefixed(4, { maxLength: 0 }) },
  ];
  for (const { size, max, framing } of cases) {
    const sizes = [
      [],
      [0],
      [0, 0, 0],
      [Math.min(1, max)],
      [max],
      [max, 0, max],
      [0, max, Math.min(3, max), Math.floor(max / 2), 0],
    ];
    // Sizes with several non-zero header bytes (256 needs [0, 0, 1, 0]).
    if (max >= 256) sizes.push([256, 255, 1, 257, 0]);
    for (const [k, lengths] of sizes.entries()) {
      const frames = lengths.map((n, i) => bytesOf(n, 100 * k + i));
      const bytes = encodeFrames(framing, frames);
      assert.equal(bytes.length, lengths.reduce((a, n) => a + size + n, 0));
      assertDecodesEverySplit(framing, bytes, frames);
    }
  }
});

Deno.test("lengthPrefixed: many frames in one chunk; a partial tail is held, then completed", () => {
  const framing = lengthPrefixed(2, { maxLength: 1000 });
  const rand = prng(9);
  const frames = Array.from({ length: 500 }, (_, i) => bytesOf(Math.floor(rand() * 60), i));
  const bytes = encodeFrames(framing, frames);
  assert.deepEqual(decodeFrames(framing, bytes), frames);

  // All but the last 5 bytes: every frame except the last, the rest held.
  const decoder = framing.decoder();
  const got: Uint8Array[] = [];
  const last = bytesOf(20, 99);
  const tail = encodeFrames(framing, [last]);
  decoder.decode(concat([bytes, tail.subarray(0, tail.length - 5)]), (f) => got.push(f));
  assert.deepEqual(got, frames);
  assert.ok(decoder.buffered > 0, "the unfinished frame is held");
  assert.deepEqual(decodeFrames(framing, concat([bytes, tail.subarray(0, 1)])), frames);
  decoder.decode(tail.subarray(tail.length - 5), (f) => got.push(f));
  assert.deepEqual(got, [...frames, last]);
  assert.equal(decoder.buffered, 0);
});

Deno.test("lengthPrefixed: emitted frames are copies, not views of the chunk", () => {
  for (const framing of [lengthPrefixed(1), lengthPrefixed(2), lengthPrefixed(4)]) {
    const frames = [bytesOf(10, 1), bytesOf(0, 2), bytesOf(33, 3)];
    const chunk = encodeFrames(framing, frames);
    const got: Uint8Array[] = [];
    framing.decoder().decode(chunk, (f) => got.push(f));
    chunk.fill(0);
    assert.deepEqual(got, frames, framing.name);
    for (const frame of got) assert.notEqual(frame.buffer, chunk.buffer);
  }
});

Deno.test("lengthPrefixed: an oversized length throws FrameTooLarge as soon as the header is read", () => {
  const framing = lengthPrefixed(4, { maxLength: 1024 });
  // Exactly the header, no payload: it throws at once.
  assert.throws(
    () => framing.decoder().decode(Uint8Array.of(0, 0, 4, 1), () => {}),
    assertFrameTooLarge(1025, 1024),
  );
  // Byte by byte: the first three header bytes are accepted, the fourth throws.
  const decoder = framing.decoder();
  for (const b of [0, 0, 4]) decoder.decode(Uint8Array.of(b), () => assert.fail("no frame"));
  assert.throws(() => decoder.decode(Uint8Array.of(1), () => {}), assertFrameTooLarge(1025, 1024));
  // The limit itself is fine.
  const ok = bytesOf(1024, 5);
  assert.deepEqual(decodeFrames(framing, encodeFrames(framing, [ok])), [ok]);
  // Frames before the bad header are emitted first, in order.
  const good = [bytesOf(3, 6), new Uint8Array(0)];
  const got: Uint8Array[] = [];
  assert.throws(
    () =>
      framing.decoder().decode(
        concat([encodeFrames(framing, good), Uint8Array.of(0, 0, 4, 1, 9)]),
        (f) => got.push(f),
      ),
    assertFrameTooLarge(1025, 1024),
  );
  assert.deepEqual(got, good);
  // Lengths of 2^31 and more are read unsigned, whole or split.
  const len4 = lengthPrefixed(4);
  for (const header of [[0x80, 0, 0, 0], [0xff, 0xff, 0xff, 0xff]]) {
    const length = ((header[0] << 24) >>> 0) + (header[1] << 16) + (header[2] << 8) + header[3];
    assert.throws(
      () => len4.decoder().decode(Uint8Array.from(header), () => {}),
      assertFrameTooLarge(length, 8 * 1024 * 1024),
    );
    const split = len4.decoder();
    split.decode(Uint8Array.from(header.slice(0, 1)), () => {});
    assert.throws(
      () => split.decode(Uint8Array.from(header.slice(1)), () => {}),
      assertFrameTooLarge(length, 8 * 1024 * 1024),
    );
  }
  // A 1-byte prefix over its maxLength.
  assert.throws(
    () => decodeFrames(lengthPrefixed(1, { maxLength: 3 }), Uint8Array.of(4)),
    assertFrameTooLarge(4, 3),
  );
});

Deno.test("lengthPrefixed: encoding a frame over maxLength throws FrameTooLarge", () => {
  const framing = lengthPrefixed(4, { maxLength: 1024 });
  assert.deepEqual(encodeFrames(framing, [new Uint8Array(1024)]).length, 1028);
  assert.throws(
    () => encodeFrames(framing, [new Uint8Array(1025)]),
    assertFrameTooLarge(1025, 1024),
  );
  // Strings are measured in UTF-8 bytes: 400 × "€" is 1200 bytes.
  const asText = framing as unknown as Framing<string>;
  assert.throws(() => encodeFrames(asText, ["€".repeat(400)]), assertFrameTooLarge(1200, 1024));
  assert.equal(encodeFrames(asText, ["€".repeat(341)]).length, 4 + 1023);
  // Nothing of the rejected frame is written.
  const out: number[] = [];
  const writer: FrameWriter = {
    write: (b) => out.push(...b),
    writeString: (s) => out.push(...utf8.encode(s)),
    writeUint: () => out.push(-1),
  };
  assert.throws(() => framing.encode(new Uint8Array(2000), writer), FrameTooLarge);
  assert.deepEqual(out, []);
});

Deno.test("lengthPrefixed: 1- and 2-byte prefixes cap maxLength at what they can express", () => {
  const len1 = lengthPrefixed(1, { maxLength: 10_000 });
  assert.equal(encodeFrames(len1, [new Uint8Array(255)]).length, 256);
  assert.throws(() => encodeFrames(len1, [new Uint8Array(256)]), assertFrameTooLarge(256, 255));
  assert.throws(
    () => encodeFrames(lengthPrefixed(1), [new Uint8Array(256)]),
    assertFrameTooLarge(256, 255),
  );

  const len2 = lengthPrefixed(2, { maxLength: 1_000_000 });
  const biggest = bytesOf(65535, 7);
  const bytes = encodeFrames(len2, [biggest]);
  assert.deepEqual(bytes.subarray(0, 2), Uint8Array.of(0xff, 0xff));
  assert.deepEqual(decodeFrames(len2, bytes), [biggest]);
  assert.throws(
    () => encodeFrames(len2, [new Uint8Array(65536)]),
    assertFrameTooLarge(65536, 65535),
  );
  assert.throws(
    () => encodeFrames(lengthPrefixed(2), [new Uint8Array(65536)]),
    assertFrameTooLarge(65536, 65535),
  );
  // A smaller maxLength than the prefix allows is kept.
  assert.throws(
    () => decodeFrames(lengthPrefixed(2, { maxLength: 10 }), Uint8Array.of(0, 11)),
    assertFrameTooLarge(11, 10),
  );
});

Deno.test("lengthPrefixed: a prefix size other than 1, 2 or 4, or a bad maxLength, is a RangeError", () => {
  for (const size of [0, 3, 8, -1, 2.5]) {
    assert.throws(() => lengthPrefixed(size as 1), RangeError, `size ${size}`);
  }
  for (const maxLength of [-1, NaN]) {
    assert.throws(() => lengthPrefixed(4, { maxLength }), RangeError, `maxLength ${maxLength}`);
    assert.throws(() => lines({ maxLength }), RangeError, `lines maxLength ${maxLength}`);
  }
});

/** `fn` throws an error of class `type` whose message is exactly `message`. */
function assertThrowsExactly(fn: () => unknown, type: ErrorConstructor, message: string) {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof type, `expected ${type.name}, got ${err}`);
    assert.equal(err.message, message);
    return true;
  });
}

Deno.test("framing arguments: a value of the wrong type is a TypeError naming the option and the value", () => {
  const anyPrefixed = lengthPrefixed as (bytes?: unknown, options?: unknown) => unknown;
  const anyLines = lines as (options?: unknown) => unknown;
  assertThrowsExactly(
    () => anyPrefixed("4"),
    TypeError,
    'lengthPrefixed: bytes must be the number 1, 2 or 4, not "4" (a string)',
  );
  for (
    const [bad, shown] of [
      [null, "null"],
      [4n, "4n (a bigint)"],
      [true, "true (a boolean)"],
      [[4], "an array"],
      [{}, "an object"],
    ] as const
  ) {
    assertThrowsExactly(
      () => anyPrefixed(bad),
      TypeError,
      `lengthPrefixed: bytes must be the number 1, 2 or 4, not ${shown}`,
    );
  }
  // Options that are not an object.
  for (
    const [bad, shown] of [
      ["x", '"x" (a string)'],
      [42, "42"],
      [null, "null"],
      [["a"], "an array"],
      [() => {}, "a function"],
    ] as const
  ) {
    assertThrowsExactly(
      () => anyLines(bad),
      TypeError,
      `lines: options must be an object, not ${shown}`,
    );
    assertThrowsExactly(
      () => anyPrefixed(4, bad),
      TypeError,
      `lengthPrefixed: options must be an object, not ${shown}`,
    );
  }
  // A maxLength that is not a number, not even a numeric string.
  for (const [bad, shown] of [["10", '"10" (a string)'], [10n, "10n (a bigint)"]] as const) {
    assertThrowsExactly(
      () => anyLines({ maxLength: bad }),
      TypeError,
      `lines: maxLength must be a number, not ${shown}`,
    );
    assertThrowsExactly(
      () => anyPrefixed(2, { maxLength: bad }),
      TypeError,
      `lengthPrefixed: maxLength must be a number, not ${shown}`,
    );
  }
  assertThrowsExactly(
    () => anyLines({ invalidUtf8: false }),
    TypeError,
    'lines: invalidUtf8 must be "error" or "replace", not false (a boolean)',
  );
});

Deno.test("framing arguments: a value out of range is a RangeError naming the option and the value", () => {
  for (const size of [0, 3, 8, -1, 2.5, NaN, Infinity]) {
    assertThrowsExactly(
      () => lengthPrefixed(size as 1),
      RangeError,
      `lengthPrefixed: bytes must be 1, 2 or 4, not ${size}`,
    );
  }
  for (const maxLength of [-1, NaN, 1.5, -Infinity, -0.5, 0.1]) {
    const why = `must be a non-negative integer or Infinity, not ${maxLength}`;
    assertThrowsExactly(() => lines({ maxLength }), RangeError, `lines: maxLength ${why}`);
    for (const size of [1, 2, 4] as const) {
      assertThrowsExactly(
        () => lengthPrefixed(size, { maxLength }),
        RangeError,
        `lengthPrefixed: maxLength ${why}`,
      );
    }
  }
  assertThrowsExactly(
    () => lines({ invalidUtf8: "ignore" as "error" }),
    RangeError,
    'lines: invalidUtf8 must be "error" or "replace", not "ignore" (a string)',
  );
});

Deno.test("framing arguments: undefined means the default; maxLength Infinity means no limit of its own", () => {
  // undefined options and undefined fields take the defaults.
  const big = "x".repeat(64 * 1024);
  for (const framing of [lines(), lines(undefined), lines({}), lines({ maxLength: undefined })]) {
    assert.equal(encodeFrames(framing, [big]).length, big.length + 1);
    assert.throws(() => encodeFrames(framing, [big + "x"]), assertFrameTooLarge(65537, 65536));
  }
  const eightMiB = 8 * 1024 * 1024;
  for (const framing of [lengthPrefixed(undefined, undefined), lengthPrefixed(4, {})]) {
    assert.equal(framing.name, "lengthPrefixed(4)");
    assert.throws(
      () => decodeFrames(framing, Uint8Array.of(0, 0x80, 0, 1)),
      assertFrameTooLarge(eightMiB + 1, eightMiB),
    );
  }
  // lengthPrefixed: Infinity is what the prefix can express.
  assert.throws(
    () => encodeFrames(lengthPrefixed(1, { maxLength: Infinity }), [new Uint8Array(256)]),
    assertFrameTooLarge(256, 255),
  );
  assert.throws(
    () => encodeFrames(lengthPrefixed(2, { maxLength: Infinity }), [new Uint8Array(65536)]),
    assertFrameTooLarge(65536, 65535),
  );
  // With 4 bytes, more than the 8 MiB default: a header of 8 MiB + 1 is awaited, not refused.
  const huge = lengthPrefixed(4, { maxLength: Infinity });
  const decoder = huge.decoder();
  decoder.decode(Uint8Array.of(0, 0x80, 0, 1, 42), () => assert.fail("no frame yet"));
  assert.equal(decoder.buffered, 5);
  // lines: Infinity is no limit, decoding and encoding.
  const unlimited = lines({ maxLength: Infinity });
  const long = "y".repeat(200_000);
  assert.deepEqual(decodeFrames(unlimited, utf8.encode(long + "\r\n" + long)), [long]);
  assert.equal(encodeFrames(unlimited, [long]).length, long.length + 1);
  // Zero is an integer.
  assert.deepEqual(decodeFrames(lines({ maxLength: 0 }), utf8.encode("\n\r\n")), ["", ""]);
  assert.deepEqual(decodeFrames(lengthPrefixed(1, { maxLength: 0 }), Uint8Array.of(0)), [
    new Uint8Array(0),
  ]);
});

Deno.test("lengthPrefixed: encoding what is not bytes or a string is a TypeError", () => {
  for (const size of [1, 2, 4] as const) {
    const framing = lengthPrefixed(size) as unknown as Framing<unknown>;
    for (const bad of [42, null, undefined, {}, [1, 2], new ArrayBuffer(2), true, 10n]) {
      assert.throws(
        () => encodeFrames(framing, [bad]),
        TypeError,
        `${framing.name}: ${typeof bad}`,
      );
    }
  }
});

// ---- lines() ----------------------------------------------------------------------------------

Deno.test("lines: frames decode identically at every split point, with \\n and \\r\\n endings", () => {
  const max = 12;
  const framing = lines({ maxLength: max });
  assert.equal(framing.name, "lines");
  const samples: string[][] = [
    [],
    [""],
    ["", "", ""],
    ["hello", "wörld", "✓ ok"],
    ["€€€€"], // exactly maxLength bytes, 3 bytes per character
    ["x".repeat(max), "", "😀😀😀"], // maxLength bytes in ASCII and in 4-byte characters
    ["\uFEFFbom", "a\rb", "tab\there"], // a leading U+FEFF, a bare \r inside a line
  ];
  for (const frames of samples) {
    // Encoded by the framing: "\n" endings.
    const lf = encodeFrames(framing, frames);
    assert.deepEqual(lf, utf8.encode(frames.map((f) => f + "\n").join("")));
    assertDecodesEverySplit(framing, lf, frames);
    // "\r\n" endings, and the two mixed.
    assertDecodesEverySplit(framing, utf8.encode(frames.map((f) => f + "\r\n").join("")), frames);
    const mixed = frames.map((f, i) => f + (i % 2 ? "\n" : "\r\n")).join("");
    assertDecodesEverySplit(framing, utf8.encode(mixed), frames);
  }
});

Deno.test("lines: many lines in one chunk; an unfinished line is held, not emitted", () => {
  const framing = lines();
  const frames = Array.from({ length: 1000 }, (_, i) => `line ${i}: ${"é".repeat(i % 7)}`);
  const bytes = encodeFrames(framing, frames);
  assert.deepEqual(decodeFrames(framing, bytes), frames);
  assert.deepEqual(decodeFrames(framing, utf8.encode("a\nb\nunfinished")), ["a", "b"]);
  const decoder = framing.decoder();
  const got: string[] = [];
  decoder.decode(utf8.encode("one\ntw"), (f) => got.push(f));
  assert.deepEqual(got, ["one"]);
  assert.equal(decoder.buffered, 2);
  decoder.decode(utf8.encode("o\r"), (f) => got.push(f));
  assert.deepEqual(got, ["one"]);
  decoder.decode(utf8.encode("\nthree\n"), (f) => got.push(f));
  assert.deepEqual(got, ["one", "two", "three"]);
  assert.equal(decoder.buffered, 0);
});

Deno.test("lines: a held partial line survives the reuse of the chunk's buffer", () => {
  const framing = lines();
  const decoder = framing.decoder();
  const got: string[] = [];
  const buf = utf8.encode("héllo wo");
  decoder.decode(buf, (f) => got.push(f));
  buf.fill(0x41);
  decoder.decode(utf8.encode("rld\n"), (f) => got.push(f));
  assert.deepEqual(got, ["héllo world"]);
});

Deno.test("lines: a line over maxLength throws FrameTooLarge, even before its newline", () => {
  const framing = lines({ maxLength: 5 });
  // Complete lines.
  assert.deepEqual(decodeFrames(framing, utf8.encode("abcde\nabcde\r\n")), ["abcde", "abcde"]);
  assert.throws(() => decodeFrames(framing, utf8.encode("abcdef\n")), assertFrameTooLarge(6, 5));
  assert.throws(
    () => decodeFrames(framing, utf8.encode("ok\nabcdef\r\n")),
    assertFrameTooLarge(6, 5),
  );
  // maxLength counts bytes: "ééé" is 6.
  assert.throws(() => decodeFrames(framing, utf8.encode("ééé\n")), assertFrameTooLarge(6, 5));
  // No newline yet: bytes 1..5 are held, the 6th throws.
  const decoder = framing.decoder();
  for (const b of utf8.encode("abcde")) {
    decoder.decode(Uint8Array.of(b), () => assert.fail("no line"));
  }
  assert.equal(decoder.buffered, 5);
  assert.throws(() => decoder.decode(utf8.encode("f"), () => {}), assertFrameTooLarge(6, 5));
  // In one chunk with no newline.
  assert.throws(() => decodeFrames(framing, utf8.encode("abcdefgh")), assertFrameTooLarge(8, 5));
  // A held "\r" after maxLength bytes may still be a "\r\n" ending; anything else then throws.
  const cr = framing.decoder();
  cr.decode(utf8.encode("abcde\r"), () => assert.fail("no line"));
  assert.throws(() => cr.decode(utf8.encode("x"), () => {}), assertFrameTooLarge(7, 5));
  const crlf = framing.decoder();
  const got: string[] = [];
  crlf.decode(utf8.encode("abcde\r"), (f) => got.push(f));
  crlf.decode(utf8.encode("\n"), (f) => got.push(f));
  assert.deepEqual(got, ["abcde"]);
  // "abcd\r" is a 5-byte line, so "abcd\r\r" may still end well; one byte more may not.
  assert.deepEqual(decodeFrames(framing, utf8.encode("abcd\r\r")), []);
  assert.deepEqual(decodeChunks(framing, byteByByte(utf8.encode("abcd\r\r\n"))).frames, ["abcd\r"]);
  assert.throws(() => decodeFrames(framing, utf8.encode("abcde\r\r")), assertFrameTooLarge(7, 5));
});

Deno.test("lines: invalid UTF-8 in a line throws MalformedFrame", () => {
  const framing = lines();
  const bad = [
    [0xff, 0x0a], // never valid
    [0x61, 0xc3, 0x28, 0x0a], // a lead byte followed by ASCII
    [0xe2, 0x82, 0x0a], // truncated 3-byte sequence
    [0xc0, 0xaf, 0x0a], // overlong "/"
    [0xed, 0xa0, 0x80, 0x0d, 0x0a], // a UTF-16 surrogate encoded as UTF-8
    [0xf4, 0x90, 0x80, 0x80, 0x0a], // above U+10FFFF
  ];
  for (const bytes of bad) {
    assert.throws(
      () => decodeFrames(framing, Uint8Array.from(bytes)),
      isMalformed,
      bytes.join(","),
    );
    // Split anywhere, it is found all the same.
    for (const [at, chunks] of twoChunkSplits(Uint8Array.from(bytes))) {
      assert.throws(() => decodeChunks(framing, chunks), isMalformed, `${bytes} split at ${at}`);
    }
  }
  // Lines before the bad one are emitted first; the error keeps its cause.
  const got: string[] = [];
  assert.throws(
    () => framing.decoder().decode(Uint8Array.of(0x6f, 0x6b, 0x0a, 0xff, 0x0a), (f) => got.push(f)),
    (err: unknown) => isMalformed(err) && (err as Error).cause instanceof TypeError,
  );
  assert.deepEqual(got, ["ok"]);
});

/** Ill-formed UTF-8 lines, each with where its first bad sequence starts (0-based). */
const BAD_UTF8: Array<[number[], number]> = [
  [[0xff], 0], // never valid
  [[0x61, 0xc3, 0x28], 1], // a lead byte followed by ASCII
  [[0x61, 0x62, 0xe2, 0x82], 2], // truncated 3-byte sequence at the end of the line
  [[0xc0, 0xaf], 0], // overlong "/"
  [[0xe0, 0x80, 0xaf], 0], // overlong 3-byte "/"
  [[0xf0, 0x80, 0x80, 0xaf], 0], // overlong 4-byte "/"
  [[0xed, 0xa0, 0x80], 0], // a UTF-16 surrogate encoded as UTF-8
  [[0xf4, 0x90, 0x80, 0x80], 0], // above U+10FFFF
  [[0xe2, 0x82, 0xac, 0x80], 3], // "€" and a stray continuation byte
  [[0xef, 0xbb, 0xbf, 0xf0, 0x9f, 0x98, 0x80, 0x7a, 0xf0, 0x9f, 0x98], 8], // BOM, 😀, z, 3/4 😀
  [[0x2f, 0xf8, 0x88, 0x80, 0x80, 0x80], 1], // a 5-byte form
];

Deno.test("lines: MalformedFrame says, in one line, which byte of which line is not UTF-8", () => {
  const framing = lines();
  const before = ["one", "", "thrée ✓"]; // lines decoded before the bad one, by either path
  for (const [bytes, at] of BAD_UTF8) {
    for (const ending of [[0x0a], [0x0d, 0x0a]]) {
      const input = concat([encodeFrames(framing, before), Uint8Array.from([...bytes, ...ending])]);
      const message = `invalid UTF-8 at byte ${at + 1} of line ${before.length + 1}`;
      const check = (label: string) => (err: unknown) => {
        assert.ok(isMalformed(err));
        assert.equal((err as Error).message, message, label);
        return true;
      };
      assert.throws(() => decodeFrames(framing, input), check(`${bytes}: one chunk`));
      for (const [cut, chunks] of twoChunkSplits(input)) {
        assert.throws(() => decodeChunks(framing, chunks), check(`${bytes}: split at ${cut}`));
      }
      assert.throws(() => decodeChunks(framing, byteByByte(input)), check(`${bytes}: by byte`));
    }
  }
  // Lines are counted across reads, whichever path decoded them.
  const decoder = framing.decoder();
  const got: string[] = [];
  decoder.decode(utf8.encode("a\nb\nc\n"), (f) => got.push(f)); // three at once
  decoder.decode(utf8.encode("d"), (f) => got.push(f));
  decoder.decode(utf8.encode("\ne\n"), (f) => got.push(f)); // one held, one whole
  assert.throws(
    () => decoder.decode(Uint8Array.of(0x66, 0x0a, 0x67, 0xc3, 0x0a), (f) => got.push(f)),
    { name: "MalformedFrame", message: "invalid UTF-8 at byte 2 of line 7" },
  );
  assert.deepEqual(got, ["a", "b", "c", "d", "e", "f"]);
});

Deno.test("lines: a U+FFFD sent as such (EF BF BD) is data, not bad UTF-8", () => {
  const frames = ["\uFFFD", "a\uFFFDb", "ok", "\uFFFD\uFFFD ✓ \uFEFF"];
  for (const framing of [lines(), lines({ invalidUtf8: "replace" })]) {
    assertDecodesEverySplit(framing, encodeFrames(framing, frames), frames);
  }
  // Next to bad bytes, the bad ones are still found, and where.
  const bytes = concat([
    encodeFrames(lines(), frames),
    Uint8Array.of(0xef, 0xbf, 0xbd, 0xef, 0xbf, 0x0a),
  ]);
  assert.throws(() => decodeFrames(lines(), bytes), {
    name: "MalformedFrame",
    message: "invalid UTF-8 at byte 4 of line 5",
  });
  assert.deepEqual(decodeFrames(lines({ invalidUtf8: "replace" }), bytes), [
    ...frames,
    "\uFFFD\uFFFD",
  ]);
});

Deno.test("lines: FrameTooLarge and MalformedFrame messages are one short line", () => {
  const errors: Error[] = [];
  const catchIt = (fn: () => unknown) => {
    try {
      fn();
    } catch (err) {
      errors.push(err as Error);
      return;
    }
    assert.fail("expected an error");
  };
  catchIt(() => decodeFrames(lines({ maxLength: 5 }), utf8.encode("abcdefgh\n")));
  catchIt(() => decodeFrames(lines({ maxLength: 5 }), utf8.encode("abcdefgh")));
  catchIt(() => encodeFrames(lines({ maxLength: 5 }), ["abcdefgh"]));
  catchIt(() => decodeFrames(lengthPrefixed(2, { maxLength: 5 }), Uint8Array.of(0, 6)));
  catchIt(() => decodeFrames(lines(), Uint8Array.of(0x61, 0xff, 0x0a)));
  catchIt(() =>
    decodeFrames(lines(), concat([new Uint8Array(60_000).fill(0xc3), utf8.encode("\n")]))
  );
  assert.deepEqual(errors.map((e) => e.message), [
    "frame of 8 bytes exceeds maxLength 5",
    "frame of 8 bytes exceeds maxLength 5",
    "frame of 8 bytes exceeds maxLength 5",
    "frame of 6 bytes exceeds maxLength 5",
    "invalid UTF-8 at byte 2 of line 1",
    "invalid UTF-8 at byte 1 of line 1",
  ]);
  for (const err of errors) {
    assert.ok(!/[\r\n]/.test(err.message) && err.message.length <= 80, err.message);
  }
});

Deno.test('lines({ invalidUtf8: "replace" }): bad bytes become U+FFFD, as TextDecoder does, at every split', () => {
  const framing = lines({ maxLength: 16, invalidUtf8: "replace" });
  assert.equal(framing.name, "lines");
  const lenient = new TextDecoder("utf-8", { ignoreBOM: true });
  const badLines = BAD_UTF8.map(([bytes]) => Uint8Array.from(bytes));
  const expected = badLines.map((line) => lenient.decode(line));
  // What TextDecoder gives, spelled out for a few.
  assert.deepEqual(expected.slice(0, 4), ["\uFFFD", "a\uFFFD(", "ab\uFFFD", "\uFFFD\uFFFD"]);
  assert.equal(expected[9], "\uFEFF😀z\uFFFD"); // a leading BOM is kept, as without the option
  for (const [i, line] of badLines.entries()) {
    for (const ending of ["\n", "\r\n"]) {
      const bytes = concat([line, utf8.encode(ending)]);
      assertDecodesEverySplit(framing, bytes, [expected[i]]);
      // Nothing thrown and nothing lost around it: lines before and after still arrive.
      const around = concat([utf8.encode("before\n"), bytes, utf8.encode("after\r\n")]);
      assertDecodesEverySplit(framing, around, ["before", expected[i], "after"]);
    }
  }
  // All of them in one chunk (the one-call block path) and byte by byte (line by line) agree.
  const all = concat(badLines.flatMap((line, i) => [line, utf8.encode(i % 2 ? "\r\n" : "\n")]));
  assert.deepEqual(decodeFrames(framing, all), expected);
  assert.deepEqual(decodeChunks(framing, byteByByte(all)).frames, expected);
  // A bad sequence cut short by "\r\n" is one U+FFFD, the "\r" still part of the ending.
  assert.deepEqual(decodeFrames(framing, Uint8Array.of(0xe2, 0x82, 0x0d, 0x0a)), ["\uFFFD"]);
  assert.deepEqual(decodeFrames(framing, Uint8Array.of(0xe2, 0x0d, 0x0d, 0x0a)), ["\uFFFD\r"]);
  // maxLength still counts bytes as received, before any replacement.
  assert.throws(
    () => decodeFrames(framing, concat([new Uint8Array(17).fill(0xff), utf8.encode("\n")])),
    assertFrameTooLarge(17, 16),
  );
  assert.deepEqual(
    decodeFrames(framing, concat([new Uint8Array(16).fill(0xff), utf8.encode("\n")])),
    ["\uFFFD".repeat(16)],
  );
  // Sending is unchanged: lone surrogates go out as U+FFFD, as TextEncoder writes them.
  assert.deepEqual(encodeFrames(framing, ["a\uD800b"]), utf8.encode("a\uFFFDb\n"));
});

Deno.test('lines: invalidUtf8 defaults to "error", which throws MalformedFrame', () => {
  const bad = Uint8Array.of(0x6f, 0x6b, 0x0a, 0x61, 0xff, 0x0a);
  for (
    const framing of [lines(), lines({ invalidUtf8: undefined }), lines({ invalidUtf8: "error" })]
  ) {
    const got: string[] = [];
    assert.throws(() => framing.decoder().decode(bad, (f) => got.push(f)), isMalformed);
    assert.deepEqual(got, ["ok"]);
  }
  assert.deepEqual(decodeFrames(lines({ invalidUtf8: "replace" }), bad), ["ok", "a\uFFFD"]);
});

Deno.test("lines: encode appends \\n, rejects non-strings and lines over maxLength", () => {
  const framing = lines({ maxLength: 6 });
  assert.deepEqual(encodeFrames(framing, ["", "ab", "éé"]), utf8.encode("\nab\néé\n"));
  assert.equal(encodeFrames(framing, ["€€"]).length, 7); // 6 bytes: exactly maxLength
  assert.throws(() => encodeFrames(framing, ["abcdefg"]), assertFrameTooLarge(7, 6));
  assert.throws(() => encodeFrames(framing, ["€€a"]), assertFrameTooLarge(7, 6));
  assert.throws(() => encodeFrames(framing, ["😀😀"]), assertFrameTooLarge(8, 6));
  const asAny = framing as unknown as Framing<unknown>;
  for (const bad of [utf8.encode("x"), 42, null, undefined, {}, ["a"], Symbol("s")]) {
    assert.throws(() => encodeFrames(asAny, [bad]), TypeError, `lines encode of ${typeof bad}`);
  }
  // The default maxLength is 64 KiB.
  const big = "x".repeat(64 * 1024);
  assert.equal(encodeFrames(lines(), [big]).length, big.length + 1);
  assert.throws(
    () => encodeFrames(lines(), [big + "x"]),
    assertFrameTooLarge(big.length + 1, big.length),
  );
  assert.deepEqual(decodeFrames(lines(), utf8.encode(big + "\n")), [big]);
});

// ---- A user framing ---------------------------------------------------------------------------

/**
 * Netstrings (`5:hello,`), written against the public Framing interface only: decoded to
 * strings, with its own MalformedFrame and FrameTooLarge checks.
 */
function netstrings(maxLength = 1000): Framing<string> {
  const text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  return {
    name: "netstrings",
    decoder() {
      let length = -1; // -1: reading the length's digits
      let digits = 0;
      let body: Uint8Array | null = null;
      let filled = 0;
      return {
        get buffered() {
          return digits + filled;
        },
        decode(chunk, emit) {
          for (let i = 0; i < chunk.length;) {
            if (length < 0) {
              const b = chunk[i++];
              if (b === 0x3a && digits > 0) { // ":"
                length = Number(new TextDecoder().decode(body!.subarray(0, digits)));
                if (length > maxLength) throw new FrameTooLarge(length, maxLength);
                body = new Uint8Array(length + 1);
                digits = 0;
              } else if (b >= 0x30 && b <= 0x39 && digits < 10) {
                body ??= new Uint8Array(10);
                body[digits++] = b;
              } else {
                throw new MalformedFrame(`netstring: unexpected byte ${b} in length`);
              }
              continue;
            }
            const take = Math.min(length + 1 - filled, chunk.length - i);
            body!.set(chunk.subarray(i, i + take), filled);
            filled += take;
            i += take;
            if (filled === length + 1) {
              if (body![length] !== 0x2c) throw new MalformedFrame("netstring: missing ','");
              let frame: string;
              try {
                frame = text.decode(body!.subarray(0, length));
              } catch (cause) {
                throw new MalformedFrame("netstring: not UTF-8", { cause });
              }
              length = -1;
              body = null;
              filled = 0;
              emit(frame);
            }
          }
        },
      };
    },
    encode(frame, out) {
      if (typeof frame !== "string") throw new TypeError("netstrings encode strings");
      const bytes = utf8.encode(frame);
      if (bytes.length > maxLength) throw new FrameTooLarge(bytes.length, maxLength);
      out.writeString(`${bytes.length}:`);
      out.write(bytes);
      out.writeString(",");
    },
  };
}

Deno.test("user framing: decodes at every split point and reports its own errors", () => {
  const framing = netstrings(20);
  const frames = ["hello", "", "wörld ✓", "x".repeat(20)];
  const bytes = encodeFrames(framing, frames);
  assert.deepEqual(bytes, utf8.encode(`5:hello,0:,10:wörld ✓,20:${"x".repeat(20)},`));
  assertDecodesEverySplit(framing, bytes, frames);
  assert.throws(() => decodeFrames(framing, utf8.encode("3:abc;")), isMalformed);
  assert.throws(() => decodeFrames(framing, utf8.encode("21:")), assertFrameTooLarge(21, 20));
  assert.throws(() => encodeFrames(framing, ["y".repeat(21)]), assertFrameTooLarge(21, 20));
});

// ---- End to end -------------------------------------------------------------------------------

type Kind = "memory" | "tcp";
let rigs = 0;

interface Rig<T> {
  server: Server<T>;
  /** A raw client socket: the transport's own, not the library's client. */
  open(): Promise<Conn>;
  /** The server side of the raw client socket `client`. */
  serverSide(client: Conn): Connection<T>;
  logged: unknown[][];
}

/** A server echoing every frame back, over `kind`, with a logger that records. */
async function echoServer<T>(kind: Kind, framing: Framing<T>): Promise<Rig<T>> {
  const logger = capturingLogger();
  const logged = logger.calls;
  const handler: Handler<T> = async function* () {
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") ev = yield send(ev.data);
      else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  };
  if (kind === "memory") {
    const transport = memory(`framing-test-${++rigs}-${crypto.randomUUID()}`);
    // (Generic over T, the framing cannot be checked against the handler at compile time.)
    const server: Server<T> = await serve(handler as Handler, { transport, framing, logger });
    return {
      server,
      logged,
      open: () => transport.connect({}),
      serverSide(client) {
        const name = (client.localAddr as { name: string }).name;
        const found = server.connections().find((c) =>
          (c.remoteAddr as { name: string }).name === name
        );
        assert.ok(found, `no server connection for ${name}`);
        return found;
      },
    };
  }
  const server: Server<T, Deno.NetAddr> = await serve(handler as Handler, {
    hostname: HOST,
    port: 0,
    framing,
    logger,
  });
  const port = portOf(server.addr);
  return {
    server,
    logged,
    open: () => Deno.connect({ hostname: HOST, port }),
    serverSide(client) {
      const local = client.localAddr as Deno.NetAddr;
      const found = server.connections().find((c) =>
        (c.remoteAddr as Deno.NetAddr).port === local.port
      );
      assert.ok(found, `no server connection for port ${local.port}`);
      return found;
    },
  };
}

/** Reads until the peer closes: resolves with what came, whether it ended by EOF or reset. */
async function readToEnd(conn: Conn): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(4096);
  for (;;) {
    let n: number | null;
    try {
      n = await conn.read(buf);
    } catch (err) {
      if (err instanceof Deno.errors.ConnectionReset) break;
      throw err;
    }
    if (n === null) break;
    parts.push(buf.slice(0, n));
  }
  return concat(parts);
}

/**
 * Write `bytes` in the given way while reading the echo concurrently; the echo must be exactly
 * `expected`.
 */
async function roundTrip(
  conn: Conn,
  bytes: Uint8Array,
  expected: Uint8Array,
  how: "whole" | "bytes" | "random",
  seed = 1,
): Promise<void> {
  const reading = readExactly(conn, expected.length);
  if (how === "whole") await writeAll(conn, bytes);
  else {
    const chunks = how === "bytes" ? byteByByte(bytes) : randomChunks(bytes, prng(seed), 64);
    for (const chunk of chunks) await writeAll(conn, chunk);
  }
  const echoed = await within(10_000, reading, `echo of ${bytes.length} bytes (${how})`);
  assert.deepEqual(echoed, expected, `echo (${how})`);
}

for (const kind of ["memory", "tcp"] as const) {
  Deno.test(`end to end (${kind}): lengthPrefixed(4) echo at any split; an oversized header ends only its connection`, async () => {
    const framing = lengthPrefixed(4, { maxLength: 1024 });
    const rig = await echoServer(kind, framing);
    const sockets: Conn[] = [];
    try {
      const a = await rig.open();
      sockets.push(a);
      const b = await rig.open();
      sockets.push(b);
      const rand = prng(kind === "tcp" ? 4 : 5);
      const frames = [0, 1, 2, 3, 4, 255, 256, 1023, 1024, 0, 17]
        .concat(Array.from({ length: 20 }, () => Math.floor(rand() * 1025)))
        .map((n, i) => bytesOf(n, i));
      const bytes = encodeFrames(framing, frames);
      // The echo re-encodes the very frames that were decoded: the same bytes.
      await roundTrip(a, bytes, bytes, "whole");
      await roundTrip(b, bytes, bytes, "random", 1);
      await roundTrip(a, bytes, bytes, "random", 2);
      const small = encodeFrames(framing, frames.filter((f) => f.length < 300));
      await roundTrip(b, small, small, "bytes");
      assert.equal(rig.server.connections().length, 2);

      // a announces a 1025-byte frame: its connection ends with FrameTooLarge.
      const serverA = rig.serverSide(a);
      const serverB = rig.serverSide(b);
      await writeAll(a, Uint8Array.of(0, 0, 4, 1));
      const reason = await within(5000, serverA.closed, "server side of a closes");
      assert.ok(reason instanceof FrameTooLarge, `closed with ${reason}`);
      assert.equal(reason.length, 1025);
      assert.equal(reason.maxLength, 1024);
      assert.deepEqual(await within(5000, readToEnd(a), "a sees the close"), new Uint8Array(0));
      // Logged once, with the reason.
      assert.equal(rig.logged.length, 1, `logged: ${rig.logged}`);
      assert.ok(logNames(rig.logged[0], reason));
      assert.deepEqual(rig.server.connections(), [serverB]);
      assert.equal(rig.server.status, "running");

      // b goes on echoing, and new connections are served.
      await roundTrip(b, bytes, bytes, "random", 3);
      const c = await rig.open();
      sockets.push(c);
      await roundTrip(c, small, small, "whole");
      assert.equal(rig.server.connections().length, 2);
      assert.equal(rig.logged.length, 1);
    } finally {
      await within(10_000, rig.server.stop(), "server stop");
      for (const s of sockets) closeQuietly(s);
    }
  });

  Deno.test(`end to end (${kind}): lines echo at any split; malformed UTF-8 and long lines end only their connection`, async () => {
    const framing = lines({ maxLength: 64 });
    const rig = await echoServer(kind, framing);
    const sockets: Conn[] = [];
    try {
      const [a, b, c] = [await rig.open(), await rig.open(), await rig.open()];
      sockets.push(a, b, c);
      const frames = [
        "hello",
        "",
        "wörld ✓ 😀",
        "€".repeat(21) + "x",
        "x".repeat(64),
        "\uFEFF",
        "a\rb",
      ];
      // Sent with mixed endings; echoed with "\n" endings.
      const sent = utf8.encode(frames.map((f, i) => f + (i % 2 ? "\r\n" : "\n")).join(""));
      const echoed = encodeFrames(framing, frames);
      for (const conn of [a, b, c]) await roundTrip(conn, sent, echoed, "whole");
      await roundTrip(a, sent, echoed, "bytes");
      await roundTrip(b, sent, echoed, "random", 7);
      const [serverA, serverB, serverC] = [a, b, c].map((s) => rig.serverSide(s));

      // a: invalid UTF-8 → MalformedFrame.
      await writeAll(a, Uint8Array.of(0x6f, 0xc3, 0x28, 0x0a));
      const reasonA = await within(5000, serverA.closed, "server side of a closes");
      assert.ok(reasonA instanceof MalformedFrame, `closed with ${reasonA}`);
      assert.deepEqual(await within(5000, readToEnd(a), "a sees the close"), new Uint8Array(0));
      // c: 65 bytes with no newline → FrameTooLarge before any newline comes.
      await writeAll(c, utf8.encode("y".repeat(65)));
      const reasonC = await within(5000, serverC.closed, "server side of c closes");
      assert.ok(reasonC instanceof FrameTooLarge, `closed with ${reasonC}`);
      assert.equal(reasonC.maxLength, 64);
      assert.ok(reasonC.length > 64);
      await within(5000, readToEnd(c), "c sees the close");

      assert.equal(rig.logged.length, 2, `logged: ${rig.logged}`);
      assert.ok(logNames(rig.logged[0], reasonA));
      assert.ok(logNames(rig.logged[1], reasonC));
      assert.deepEqual(rig.server.connections(), [serverB]);
      await roundTrip(b, sent, echoed, "random", 8);
    } finally {
      await within(10_000, rig.server.stop(), "server stop");
      for (const s of sockets) closeQuietly(s);
    }
  });

  Deno.test(`end to end (${kind}): lines({ invalidUtf8: "replace" }) delivers bad UTF-8 as U+FFFD and goes on`, async () => {
    const rig = await echoServer(kind, lines({ maxLength: 64, invalidUtf8: "replace" }));
    const socket = await rig.open();
    try {
      const bad = Uint8Array.of(0x6f, 0xc3, 0x28, 0x0a, 0xff, 0xfe, 0x0d, 0x0a, 0xe2, 0x82, 0x0a);
      const good = utf8.encode("wörld ✓\n");
      // Echoed re-encoded: each bad sequence as U+FFFD (EF BF BD), "\r\n" as "\n".
      const echoed = utf8.encode("o\uFFFD(\n\uFFFD\uFFFD\n\uFFFD\nwörld ✓\n");
      await roundTrip(socket, concat([bad, good]), echoed, "whole");
      await roundTrip(socket, concat([bad, good]), echoed, "bytes");
      await roundTrip(socket, concat([good, bad, good]), concat([good, echoed]), "random", 3);
      assert.equal(rig.server.connections().length, 1);
      assert.equal(rig.logged.length, 0, `logged: ${rig.logged}`);
    } finally {
      await within(10_000, rig.server.stop(), "server stop");
      closeQuietly(socket);
    }
  });

  Deno.test(`end to end (${kind}): raw() echoes the byte stream unchanged`, async () => {
    const rig = await echoServer(kind, raw());
    const socket = await rig.open();
    try {
      const bytes = bytesOf(20_000, 11);
      await roundTrip(socket, bytes, bytes, "random", 4);
      await roundTrip(socket, bytes.subarray(0, 500), bytes.subarray(0, 500), "bytes");
      assert.equal(rig.logged.length, 0);
    } finally {
      await within(10_000, rig.server.stop(), "server stop");
      closeQuietly(socket);
    }
  });
}

Deno.test("end to end (memory): a user framing works through serve() and connect()", async () => {
  const framing = netstrings(100);
  const rig = await echoServer("memory", framing);
  const frames = ["hello", "", "wörld ✓", "z".repeat(100)];
  const got: string[] = [];
  let want = { count: frames.length, ...Promise.withResolvers<void>() };
  const transport = memory((rig.server.addr as { name: string }).name);
  const client = await connect(async function* () {
    let ev = yield frames.map((f) => send(f));
    for (;;) {
      if (ev.type === "packet") {
        got.push(ev.data);
        if (got.length === want.count) want.resolve();
      } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      ev = yield;
    }
  }, { transport, framing });
  const raw = await rig.open();
  try {
    await within(5000, want.promise, "netstring echoes");
    assert.deepEqual(got, frames);
    // The connection handle's send encodes with the framing too.
    want = { count: frames.length + 1, ...Promise.withResolvers<void>() };
    client.send("via handle");
    await within(5000, want.promise, "echo of a send through the handle");
    assert.deepEqual(got, [...frames, "via handle"]);
    // A raw socket speaking netstrings is echoed; a malformed one ends with MalformedFrame.
    const hi = utf8.encode("2:hi,");
    await roundTrip(raw, hi, hi, "bytes");
    await writeAll(raw, utf8.encode("3:abc;"));
    const reason = await within(5000, rig.serverSide(raw).closed, "raw side closes");
    assert.ok(reason instanceof MalformedFrame);
    assert.equal(rig.logged.length, 1);
  } finally {
    await within(5000, client.stop(), "client stop");
    await within(10_000, rig.server.stop(), "server stop");
    closeQuietly(raw);
  }
});
