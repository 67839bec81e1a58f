// resp(): every RESP2 and RESP3 type decoded and encoded, at every split point (byte by byte,
// random cuts, the read buffer reused as the driver does), inline commands split as Redis's
// sdssplitargs does, the maxLength and maxDepth limits, malformed input, sends that cannot be
// encoded (which write nothing), and end to end through a server over the memory transport
// and TCP, where bad input ends only its own connection. Then property tests (fast-check):
// random values round-trip, cut anywhere, with `buffered` exact; random bytes decode as an
// independent reference decoder says, and raise nothing but FrameTooLarge or MalformedFrame.

import assert from "node:assert/strict";
// A dev-only dependency, pinned here rather than in deno.json's imports (the library has none).
// deno-lint-ignore no-import-prefix
import fc from "npm:fast-check@3.23.2";
import {
  type Conn,
  connect,
  type Connection,
  decodeFrames,
  type Decoder,
  encodeFrames,
  type Event,
  FrameTooLarge,
  type FrameWriter,
  type Framing,
  MalformedFrame,
  memory,
  resp,
  RespError,
  type RespOptions,
  RespPush,
  RespSimpleString,
  type RespValue,
  send,
  serve,
  type Transport,
  type Yielded,
} from "../mod.ts";
import {
  capturingLogger,
  closeQuietly,
  concat,
  HOST,
  logNames,
  portOf,
  prng,
  within,
  writeAll,
} from "./_support.ts";

const utf8 = new TextEncoder();
const text = new TextDecoder();
const bytes = (s: string) => utf8.encode(s);

// ---- Helpers ----------------------------------------------------------------------------------

/**
 * Feed `chunks` to one fresh decoder the way the driver does: each chunk is copied into one
 * shared read buffer, decoded from there, and the buffer scribbled over right after, so a
 * decoder that keeps a view of it instead of a copy emits corrupted frames.
 */
function decodeChunks(
  framing: Framing<RespValue>,
  chunks: Uint8Array[],
): { frames: RespValue[]; decoder: Decoder<RespValue> } {
  const decoder = framing.decoder();
  const frames: RespValue[] = [];
  const readBuf = new Uint8Array(Math.max(1, ...chunks.map((c) => c.length)));
  for (const chunk of chunks) {
    readBuf.set(chunk);
    decoder.decode(readBuf.subarray(0, chunk.length), (frame) => frames.push(frame));
    readBuf.fill(0xa5);
  }
  return { frames, decoder };
}

function randomChunks(data: Uint8Array, rand: () => number, maxChunk: number): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let at = 0; at < data.length;) {
    const n = 1 + Math.floor(rand() * maxChunk);
    chunks.push(data.subarray(at, at + n));
    at += n;
  }
  return chunks;
}

/**
 * A value as plain data, for comparing what was decoded with what was meant: bytes as
 * `{ bytes: "…" }` (latin1), errors as `{ error: message }`, maps and sets as tagged lists,
 * numbers that are not finite as strings.
 */
function plain(value: RespValue): unknown {
  if (value instanceof Uint8Array) return { bytes: String.fromCharCode(...value) };
  if (value instanceof RespError) return { error: value.message };
  if (value instanceof RespSimpleString) return value.value;
  if (value instanceof RespPush) return { push: value.values.map(plain) };
  if (value instanceof Map) return { map: [...value].map(([k, v]) => [plain(k), plain(v)]) };
  if (value instanceof Set) return { set: [...value].map(plain) };
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "number" && !Number.isFinite(value)) return String(value);
  if (typeof value === "bigint") return { bigint: String(value) };
  return value;
}

/** What `value` decodes back to, as {@linkcode plain} data: strings were sent as bulk strings. */
function expectedBack(value: RespValue): unknown {
  if (typeof value === "string") return { bytes: String.fromCharCode(...utf8.encode(value)) };
  if (typeof value === "bigint") {
    return value >= -BigInt(Number.MAX_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(value)
      : { bigint: String(value) };
  }
  if (value instanceof RespPush) return { push: value.values.map(expectedBack) };
  if (value instanceof Map) {
    return { map: [...value].map(([k, v]) => [expectedBack(k), expectedBack(v)]) };
  }
  if (value instanceof Set) return { set: [...value].map(expectedBack) };
  if (Array.isArray(value)) return value.map(expectedBack);
  return plain(value);
}

/**
 * `data` must decode to `expected` (plain data) whether it arrives in one chunk, in two chunks
 * cut at every point, byte by byte, or in random chunks; and the decoder holds nothing after.
 */
function assertDecodesEverySplit(
  framing: Framing<RespValue>,
  data: Uint8Array,
  expected: unknown[],
): void {
  const label = `${framing.name}, ${JSON.stringify(text.decode(data)).slice(0, 60)}`;
  const check = (chunks: Uint8Array[], how: string) => {
    const { frames, decoder } = decodeChunks(framing, chunks);
    assert.deepEqual(frames.map(plain), expected, `${label}: ${how}`);
    assert.equal(decoder.buffered, 0, `${label}: ${how}: nothing held`);
  };
  check([data], "one chunk");
  for (let at = 0; at <= data.length; at++) {
    check([data.subarray(0, at), data.subarray(at)], `split at ${at}`);
  }
  check(Array.from(data, (_, i) => data.subarray(i, i + 1)), "byte by byte");
  const rand = prng(data.length + 7);
  for (let round = 0; round < 10; round++) {
    check(randomChunks(data, rand, 9), `random chunks, round ${round}`);
  }
}

/** Decoding `data` in one chunk throws `kind` with `message` (if given). */
function assertRefused(
  framing: Framing<RespValue>,
  data: string | Uint8Array,
  kind: typeof FrameTooLarge | typeof MalformedFrame,
  message?: string,
): void {
  const input = typeof data === "string" ? bytes(data) : data;
  for (const chunks of [[input], Array.from(input, (_, i) => input.subarray(i, i + 1))]) {
    assert.throws(
      () => decodeChunks(framing, chunks),
      (err: unknown) => {
        assert.ok(err instanceof kind, `${JSON.stringify(String(data))}: got ${err}`);
        if (message !== undefined) assert.equal((err as Error).message, message);
        return true;
      },
    );
  }
}

/** A FrameWriter that records every call, to check that a refused send wrote nothing. */
function recordingWriter(): FrameWriter & { calls: number } {
  const writer = {
    calls: 0,
    write() {
      writer.calls++;
    },
    writeString() {
      writer.calls++;
    },
    writeUint() {
      writer.calls++;
    },
  };
  return writer;
}

const wire = (framing: Framing<RespValue>, values: RespValue[]) =>
  text.decode(encodeFrames(framing, values));

// ---- Decoding every type ------------------------------------------------------------------------

const client = resp();

Deno.test("resp: every RESP2 type decodes the same at every split point", () => {
  assertDecodesEverySplit(client, bytes("+OK\r\n+\r\n+hello world\r\n"), ["OK", "", "hello world"]);
  assertDecodesEverySplit(client, bytes("-ERR unknown command\r\n"), [
    { error: "ERR unknown command" },
  ]);
  assertDecodesEverySplit(client, bytes(":0\r\n:-42\r\n:+7\r\n:9007199254740991\r\n:-0\r\n"), [
    0,
    -42,
    7,
    Number.MAX_SAFE_INTEGER,
    0, // not -0
  ]);
  assertDecodesEverySplit(
    client,
    bytes(":9223372036854775807\r\n:-9223372036854775808\r\n:0000000000000000042\r\n"),
    [{ bigint: "9223372036854775807" }, { bigint: "-9223372036854775808" }, 42],
  );
  assertDecodesEverySplit(client, bytes("$5\r\nhello\r\n$0\r\n\r\n$-1\r\n$2\r\n\r\n\r\n"), [
    { bytes: "hello" },
    { bytes: "" },
    null,
    { bytes: "\r\n" },
  ]);
  assertDecodesEverySplit(
    client,
    bytes("*3\r\n$3\r\nSET\r\n:1\r\n*2\r\n+a\r\n*0\r\n*-1\r\n*0\r\n"),
    [[{ bytes: "SET" }, 1, ["a", []]], null, []],
  );
});

Deno.test("resp: every RESP3 type decodes the same at every split point", () => {
  assertDecodesEverySplit(client, bytes("_\r\n#t\r\n#f\r\n"), [null, true, false]);
  assertDecodesEverySplit(client, bytes(",1.5\r\n,-2\r\n,1e+21\r\n,inf\r\n,-inf\r\n,nan\r\n"), [
    1.5,
    -2,
    1e21,
    "Infinity",
    "-Infinity",
    "NaN",
  ]);
  assertDecodesEverySplit(client, bytes("(3492890328409238509324850943850943825024385\r\n"), [
    { bigint: "3492890328409238509324850943850943825024385" },
  ]);
  assertDecodesEverySplit(client, bytes("!21\r\nSYNTAX invalid syntax\r\n"), [
    { error: "SYNTAX invalid syntax" },
  ]);
  assertDecodesEverySplit(client, bytes("=15\r\ntxt:Some string\r\n"), ["Some string"]);
  assertDecodesEverySplit(client, bytes("%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n%0\r\n"), [
    { map: [["first", 1], ["second", 2]] },
    { map: [] },
  ]);
  assertDecodesEverySplit(client, bytes("~3\r\n+a\r\n:1\r\n#t\r\n"), [{ set: ["a", 1, true] }]);
  // As JS collections: repeated members and keys count once, and -0 is 0.
  assertDecodesEverySplit(
    client,
    bytes("~3\r\n,-0\r\n:0\r\n,nan\r\n%2\r\n:1\r\n+a\r\n:1\r\n+b\r\n"),
    [
      { set: [0, "NaN"] },
      { map: [[1, "b"]] },
    ],
  );
  assertDecodesEverySplit(
    client,
    bytes(">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n>0\r\n"),
    [{ push: [{ bytes: "message" }, { bytes: "news" }, { bytes: "hi" }] }, { push: [] }],
  );
});

Deno.test("resp: attributes are skipped: the value after one is the frame or the element", () => {
  assertDecodesEverySplit(
    client,
    bytes("|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n"),
    [[2039123, 9543892]],
  );
  // Inside an array it does not count as an element; an empty one is nothing.
  assertDecodesEverySplit(client, bytes("*2\r\n:1\r\n|1\r\n+a\r\n+b\r\n:2\r\n|0\r\n:3\r\n"), [
    [1, 2],
    3,
  ]);
});

Deno.test("resp: a bulk string whole in one read is a view of one copy; split ones are their own", () => {
  const data = bytes("*2\r\n$3\r\nabc\r\n$3\r\ndef\r\n");
  const { frames } = decodeChunks(client, [data]);
  const [a, b] = frames[0] as Uint8Array[];
  assert.equal(a.buffer, b.buffer, "one copy per read");
  assert.notEqual(a.buffer, data.buffer, "not the caller's buffer");
  const split = decodeChunks(client, [data.subarray(0, 10), data.subarray(10)]).frames;
  assert.deepEqual(split.map(plain), [[{ bytes: "abc" }, { bytes: "def" }]]);
});

Deno.test("resp({ lend: true }): bulk strings whole in a read, and inline arguments, are views of it", () => {
  const data = bytes("*2\r\n$3\r\nabc\r\n$3\r\ndef\r\nSET k v\r\n");
  const frames = decodeFrames(resp({ lend: true, inline: true }), data);
  const [[a, b], [set, k]] = frames as Uint8Array[][];
  for (const view of [a, b, set, k]) assert.equal(view.buffer, data.buffer, "not a copy");
  assert.deepEqual(frames.map(plain), [
    [{ bytes: "abc" }, { bytes: "def" }],
    [{ bytes: "SET" }, { bytes: "k" }, { bytes: "v" }],
  ]);
  // Every split point gives the same frames, read before the next decode.
  const lent = resp({ lend: true });
  const whole = bytes("*3\r\n$5\r\nhello\r\n:1\r\n$0\r\n\r\n$2\r\nhi\r\n");
  for (let at = 0; at <= whole.length; at++) {
    const { frames } = feed(lent, [whole.slice(0, at), whole.slice(at)]);
    assert.deepEqual(
      frames,
      [[{ bytes: "hello" }, 1, { bytes: "" }], { bytes: "hi" }],
      `split at ${at}`,
    );
  }
  assert.equal(lent.decoder().lends, true);
  assert.equal(client.decoder().lends, false);
  assert.throws(() => resp({ lend: 1 as unknown as boolean }), TypeError);
});

Deno.test("resp: a large bulk string is read in place through readInto", () => {
  const body = new Uint8Array(100_000).map((_, i) => i % 251);
  const decoder = client.decoder();
  const frames: RespValue[] = [];
  const emit = (frame: RespValue) => frames.push(frame);
  assert.equal(decoder.readInto?.(), undefined, "nothing to fill yet");
  decoder.decode(concat([bytes("$100000\r\n"), body.subarray(0, 1000)]), emit);
  assert.equal(decoder.buffered, 9 + 1000);
  const into = decoder.readInto!()!;
  assert.equal(into.length, 99_000);
  into.set(body.subarray(1000, 61_000));
  decoder.decode(into.subarray(0, 60_000), emit);
  assert.equal(decoder.buffered, 9 + 61_000);
  const rest = decoder.readInto!()!;
  assert.equal(rest.length, 39_000);
  rest.set(body.subarray(61_000));
  decoder.decode(rest, emit);
  assert.equal(frames.length, 0, "not before its \\r\\n");
  assert.equal(decoder.readInto!(), undefined);
  decoder.decode(bytes("\r\n:1\r\n"), emit);
  assert.deepEqual(frames, [body, 1]);
  assert.equal(decoder.buffered, 0);
});

Deno.test("resp: buffered counts exactly the bytes of the frame in progress", () => {
  const decoder = client.decoder();
  const frames: RespValue[] = [];
  const steps: [string, number, number][] = [
    ["*2\r\n$3\r\nab", 10, 0],
    ["c\r\n:1", 15, 0],
    ["2\r\n+O", 2, 1],
    ["K\r\n", 0, 2],
  ];
  for (const [chunk, buffered, count] of steps) {
    decoder.decode(bytes(chunk), (f) => frames.push(f));
    assert.equal(decoder.buffered, buffered, `after ${JSON.stringify(chunk)}`);
    assert.equal(frames.length, count);
  }
  assert.deepEqual(frames.map(plain), [[{ bytes: "abc" }, 12], "OK"]);
});

// ---- Inline commands ----------------------------------------------------------------------------

const server = resp({ inline: true });

Deno.test("resp inline: commands split as Redis splits them, quoting and escapes included", () => {
  const cases: [string, string[]][] = [
    ["PING", ["PING"]],
    ["  set   key  value  ", ["set", "key", "value"]],
    ["\tGET\tk", ["GET", "k"]],
    ['SET "a b" c', ["SET", "a b", "c"]],
    ['ECHO "\\x41\\x7a\\n\\r\\t\\b\\a\\\\\\"\\q"', ["ECHO", 'Az\n\r\t\b\x07\\"q']],
    ['ECHO "\\xZZ"', ["ECHO", "xZZ"]], // not hex: the x stays, its backslash goes
    ["ECHO 'it\\'s' 'a\\nb'", ["ECHO", "it's", "a\\nb"]],
    ['ECHO a"b c"', ["ECHO", "ab c"]], // a quote starts quoting mid-argument
    ["ECHO \"\" ''", ["ECHO", "", ""]],
    ["ECHO ab\0cd ef", ["ECHO", "ab"]], // a C string: cut at the NUL
    ["ECHO \xe9t\xe9", ["ECHO", "\xe9t\xe9"]], // bytes as they are
  ];
  for (const [line, args] of cases) {
    for (const ending of ["\r\n", "\n"]) {
      const data = Uint8Array.from(line + ending, (c) => c.charCodeAt(0));
      assertDecodesEverySplit(server, data, [args.map((a) => ({ bytes: a }))]);
    }
  }
});

Deno.test("resp inline: empty lines are skipped; RESP arrays and inline commands mix", () => {
  assertDecodesEverySplit(server, bytes("\r\n\n   \r\nPING\r\n*1\r\n$4\r\nPING\r\n\nQUIT\n"), [
    [{ bytes: "PING" }],
    [{ bytes: "PING" }],
    [{ bytes: "QUIT" }],
  ]);
  // Only `*` starts RESP at the top, as in Redis: anything else is an inline command.
  assertDecodesEverySplit(server, bytes("+OK\r\n$3\r\n"), [[{ bytes: "+OK" }], [{
    bytes: "$3",
  }]]);
  // Inside an array, any RESP type.
  assertDecodesEverySplit(server, bytes("*2\r\n+a\r\n:1\r\n"), [["a", 1]]);
});

Deno.test("resp inline: unbalanced quotes are a MalformedFrame, after the commands before", () => {
  for (const line of ['SET "a', "SET 'a", 'SET "a"b', "SET 'a'b", 'SET "a\\"']) {
    const data = bytes(`PING\r\n${line}\r\nPING\r\n`);
    const frames: RespValue[] = [];
    assert.throws(
      () => server.decoder().decode(data, (f) => frames.push(f)),
      { name: "MalformedFrame", message: "unbalanced quotes in request" },
      line,
    );
    assert.deepEqual(frames.map(plain), [[{ bytes: "PING" }]], line);
  }
  // Without inline, a line that is no RESP type is refused at its first byte.
  assertRefused(client, "PING\r\n", MalformedFrame, "expected a RESP type, got 'P'");
});

// ---- Limits ---------------------------------------------------------------------------------------

Deno.test("resp: maxLength bounds a whole frame; exactly maxLength is accepted", () => {
  const frame = "*2\r\n$3\r\nabc\r\n+hello\r\n"; // 21 bytes
  assert.equal(frame.length, 21);
  assertDecodesEverySplit(resp({ maxLength: 21 }), bytes(frame), [[{ bytes: "abc" }, "hello"]]);
  assertRefused(
    resp({ maxLength: 20 }),
    frame,
    FrameTooLarge,
    "frame of 21 bytes exceeds maxLength 20",
  );
  // Refused as soon as it is known: an announced bulk length, or an array's count at 3 bytes each.
  assertRefused(
    resp({ maxLength: 100 }),
    "$96\r\n",
    FrameTooLarge,
    "frame of 103 bytes exceeds maxLength 100",
  );
  assertRefused(
    resp({ maxLength: 100 }),
    "*33\r\n",
    FrameTooLarge,
    "frame of 104 bytes exceeds maxLength 100",
  );
  assertRefused(
    resp({ maxLength: 100 }),
    "%17\r\n",
    FrameTooLarge,
    "frame of 107 bytes exceeds maxLength 100",
  );
  assertDecodesEverySplit(resp({ maxLength: 100 }), bytes("$93\r\n" + "x".repeat(93) + "\r\n"), [
    { bytes: "x".repeat(93) },
  ]);
  // A line with no end in sight: refused once its bytes pass the limit, before any \n.
  assertRefused(resp({ maxLength: 10 }), "+" + "a".repeat(10), FrameTooLarge);
  assertRefused(resp({ maxLength: 10, inline: true }), "a".repeat(11), FrameTooLarge);
  const decoder = resp({ maxLength: 10 }).decoder();
  decoder.decode(bytes("+" + "a".repeat(9)), () => {});
  assert.equal(decoder.buffered, 10);
  // The limit is per frame: many frames in one read are fine.
  const many = "+hello\r\n".repeat(1000);
  assert.equal(decodeFrames(resp({ maxLength: 8 }), bytes(many)).length, 1000);
  // Infinity: no limit, but a length past 2^53 is still not a length.
  assert.throws(
    () => decodeFrames(resp({ maxLength: Infinity }), bytes("$99999999999999999999\r\n")),
    { name: "MalformedFrame", message: "invalid bulk length" },
  );
  assertRefused(resp(), "$99999999999999999999\r\n", FrameTooLarge);
});

Deno.test("resp: maxDepth bounds nesting; exactly maxDepth is accepted", () => {
  const nested = (depth: number) => "*1\r\n".repeat(depth) + ":1\r\n";
  const value = (depth: number): unknown => depth === 0 ? 1 : [value(depth - 1)];
  assertDecodesEverySplit(resp({ maxDepth: 3 }), bytes(nested(3)), [value(3)]);
  assertRefused(
    resp({ maxDepth: 3 }),
    nested(4),
    MalformedFrame,
    "aggregates nested deeper than maxDepth 3",
  );
  assertRefused(resp(), nested(17), MalformedFrame, "aggregates nested deeper than maxDepth 16");
  assert.deepEqual(decodeFrames(resp(), bytes(nested(16))).map(plain), [value(16)]);
  // Maps, sets, pushes and attributes nest too.
  assertRefused(resp({ maxDepth: 2 }), "%1\r\n+k\r\n~1\r\n>1\r\n:1\r\n", MalformedFrame);
  assertRefused(resp({ maxDepth: 1 }), "*1\r\n|1\r\n+a\r\n+b\r\n:1\r\n", MalformedFrame);
  // Empty aggregates are values, not levels: decoded, and sent back, at one level past maxDepth.
  for (const wire of ["*1\r\n*0\r\n", "*1\r\n%0\r\n", "*1\r\n~0\r\n", "*1\r\n>0\r\n"]) {
    const framing = resp({ maxDepth: 1 });
    const frames = decodeFrames(framing, bytes(wire));
    assert.equal(frames.length, 1, wire);
    assert.deepEqual(encodeFrames(framing, frames), bytes(wire), wire);
  }
});

Deno.test("resp: options are checked at once, naming the option and the value", () => {
  assert.throws(() => resp({ maxLength: -1 }), {
    name: "RangeError",
    message: "resp: option maxLength must be an integer >= 0 (or Infinity), not -1",
  });
  assert.throws(() => resp({ maxLength: 1.5 }), RangeError);
  assert.throws(() => resp({ maxLength: "8" as unknown as number }), TypeError);
  assert.throws(() => resp({ maxDepth: 0 }), RangeError);
  assert.throws(() => resp({ maxDepth: Infinity }), RangeError);
  assert.throws(() => resp({ inline: "yes" as unknown as boolean }), TypeError);
  assert.throws(() => resp(7 as unknown as RespOptions), TypeError);
  assert.equal(resp().name, "resp");
  assert.equal(resp({ inline: true }).name, "resp(inline)");
});

// ---- Malformed input ------------------------------------------------------------------------------

Deno.test("resp: malformed input is a MalformedFrame saying what, after every frame before it", () => {
  const cases: [string, string][] = [
    ["?x\r\n", "expected a RESP type, got '?'"],
    ["\x00", "expected a RESP type, got '\\x00'"],
    ["$x\r\n", "invalid bulk length"],
    ["$-2\r\n", "invalid bulk length"],
    ["$\r\n", "invalid bulk length"],
    ["$+1\r\n", "invalid bulk length"],
    ["*1x\r\n", "invalid multibulk length"],
    ["*-0\r\n", "invalid multibulk length"],
    ["%-1\r\n", "invalid map length"],
    ["~-1\r\n", "invalid set length"],
    [">-1\r\n", "invalid push length"],
    ["!-1\r\n", "invalid blob error length"],
    ["=-1\r\n", "invalid verbatim string length"],
    ["$3\r\nabcd\r\n", "bulk string not ended by \\r\\n"],
    ["$3\r\nabc\n\n", "bulk string not ended by \\r\\n"],
    ["!1\r\nab", "blob error not ended by \\r\\n"],
    ["=3\r\ntxt\r\n", "verbatim string without its format"],
    ["+OK\n", "line not ended by \\r\\n"],
    [":12a\r\n", "invalid integer"],
    [":\r\n", "invalid integer"],
    [":-\r\n", "invalid integer"],
    [":9223372036854775808\r\n", "integer out of range"],
    [":123456789012345678901\r\n", "invalid integer"],
    ["_x\r\n", "null with a value"],
    ["#x\r\n", "invalid boolean"],
    ["#true\r\n", "invalid boolean"],
    [",1.\r\n", "invalid double"],
    [",abc\r\n", "invalid double"],
    ["(12x\r\n", "invalid big number"],
    ["(" + "1".repeat(5000) + "\r\n", "big number too long"],
  ];
  for (const [input, message] of cases) {
    const data = bytes(`:1\r\n${input}`);
    for (const chunks of [[data], Array.from(data, (_, i) => data.subarray(i, i + 1))]) {
      const frames: RespValue[] = [];
      const decoder = client.decoder();
      assert.throws(
        () => chunks.forEach((c) => decoder.decode(c, (f) => frames.push(f))),
        { name: "MalformedFrame", message },
        JSON.stringify(input),
      );
      assert.deepEqual(frames, [1], JSON.stringify(input));
    }
  }
});

// ---- Encoding -----------------------------------------------------------------------------------

Deno.test("resp: encodes every type to the bytes Redis writes", () => {
  assert.equal(wire(client, ["abc", "", bytes("\r\n")]), "$3\r\nabc\r\n$0\r\n\r\n$2\r\n\r\n\r\n");
  assert.equal(wire(client, ["é✓😀"]), "$9\r\né✓😀\r\n"); // UTF-8 lengths: 2 + 3 + 4
  assert.equal(wire(client, ["\ud800x"]), "$4\r\n\ufffdx\r\n"); // a lone surrogate as U+FFFD
  assert.equal(wire(client, ["x".repeat(300)]), `$300\r\n${"x".repeat(300)}\r\n`);
  assert.equal(
    wire(client, [0, 7, -3, 2000, Number.MAX_SAFE_INTEGER]),
    ":0\r\n:7\r\n:-3\r\n:2000\r\n:9007199254740991\r\n",
  );
  assert.equal(
    wire(client, [9223372036854775807n, 2n ** 63n]),
    ":9223372036854775807\r\n(9223372036854775808\r\n",
  );
  assert.equal(
    wire(client, [1.5, 1e21, Infinity, -Infinity, NaN]),
    ",1.5\r\n,1e+21\r\n,inf\r\n,-inf\r\n,nan\r\n",
  );
  assert.equal(wire(client, [null, true, false]), "$-1\r\n#t\r\n#f\r\n");
  assert.equal(
    wire(client, [new RespSimpleString("OK"), new RespError("ERR a\r\nb")]),
    "+OK\r\n-ERR a  b\r\n",
  );
  assert.equal(
    wire(client, [["SET", bytes("k"), ["x", 1]], []]),
    "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n*2\r\n$1\r\nx\r\n:1\r\n*0\r\n",
  );
  assert.equal(
    wire(client, [new Map<RespValue, RespValue>([["a", 1]]), new Set([2]), new RespPush(["m"])]),
    "%1\r\n$1\r\na\r\n:1\r\n~1\r\n:2\r\n>1\r\n$1\r\nm\r\n",
  );
  // An error's code.
  assert.equal(new RespError("WRONGTYPE Operation").code, "WRONGTYPE");
  assert.equal(new RespError("ERR").code, "ERR");
});

Deno.test("resp: a value that cannot be sent throws a TypeError and writes nothing", () => {
  const loop: RespValue[] = [];
  loop.push(loop);
  const deep = (n: number): RespValue => n === 0 ? 1 : [deep(n - 1)];
  const bad: [unknown, RegExp][] = [
    [undefined, /cannot send undefined as RESP/],
    [{ a: 1 }, /cannot send an object \(Object\) as RESP/],
    [() => 1, /cannot send function as RESP/],
    [Symbol("s"), /cannot send symbol/],
    [["ok", 1, [2, [3, undefined]]], /cannot send undefined/], // deep inside: nothing written
    [new Map([["k", { v: 1 }]]), /cannot send an object/],
    [new Set([new Date(0)]), /cannot send an object \(Date\)/],
    [new RespPush([[undefined as unknown as RespValue]]), /cannot send undefined/],
    [loop, /nested deeper than maxDepth 16/],
    [deep(17), /nested deeper than maxDepth 16/],
  ];
  for (const [value, message] of bad) {
    const out = recordingWriter();
    assert.throws(() => client.encode(value as RespValue, out), { name: "TypeError", message });
    assert.equal(out.calls, 0, `nothing written for ${String(message)}`);
  }
  assert.doesNotThrow(() => client.encode(deep(16), recordingWriter()));
  assert.throws(() => resp({ maxDepth: 2 }).encode(deep(3), recordingWriter()), TypeError);
  assert.throws(() => new RespSimpleString("a\rb"), TypeError);
  assert.throws(() => new RespSimpleString(1 as unknown as string), TypeError);
});

// ---- End to end -----------------------------------------------------------------------------------

/** Replies to each command (an array) with its arguments' lengths; counts frameErrors. */
function lengths(seen: { frameErrors: unknown[] }) {
  return async function* (): AsyncGenerator<Yielded, void, Event<RespValue>> {
    for (let ev = yield;;) {
      if (ev.type === "packet" && Array.isArray(ev.data)) {
        ev = yield send(ev.data.map((a) => a instanceof Uint8Array ? a.length : -1));
      } else if (ev.type === "frameError") {
        seen.frameErrors.push(ev.error);
        ev = yield send(new RespError(`ERR Protocol error: ${ev.error.message}`));
      } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  };
}

async function readReplies(
  socket: Conn,
  count: number,
  decoder = client.decoder(),
): Promise<RespValue[]> {
  const replies: RespValue[] = [];
  const buf = new Uint8Array(4096);
  while (replies.length < count) {
    const n = await socket.read(buf);
    if (n === null) break;
    decoder.decode(buf.subarray(0, n), (f) => replies.push(f));
  }
  return replies;
}

for (const kind of ["memory", "tcp"] as const) {
  Deno.test(`end to end (${kind}): pipelined commands at any split; bad input ends only its connection`, async () => {
    const seen = { frameErrors: [] as unknown[] };
    const logger = capturingLogger();
    const transport: Transport | undefined = kind === "memory" ? memory("resp-e2e") : undefined;
    const srv = await serve(lengths(seen), {
      hostname: HOST,
      port: 0,
      transport,
      framing: resp({ inline: true, maxLength: 1024 }),
      logger,
    });
    const open = () =>
      kind === "memory"
        ? transport!.connect({})
        : Deno.connect({ hostname: HOST, port: portOf(srv.addr) });
    const [a, b] = [await open(), await open()];
    try {
      const commands: RespValue[] = Array.from(
        { length: 200 },
        (_, i) => ["SET", `key:${i}`, "x".repeat(i)],
      );
      const data = concat([encodeFrames(client, commands), bytes("PING a 'b c'\r\n")]);
      const expected = [...commands.map((_, i) => [3, 4 + String(i).length, i]), [4, 1, 3]];
      // Whole, then in random pieces.
      await writeAll(a, data);
      assert.deepEqual(await within(5000, readReplies(a, 201), "replies"), expected);
      const rand = prng(3);
      const reading = readReplies(b, 201);
      for (const piece of randomChunks(data, rand, 50)) await writeAll(b, piece);
      assert.deepEqual(await within(5000, reading, "replies to pieces"), expected);

      // a sends a malformed frame: it gets a protocol error, then its connection ends.
      const serverA = srv.connections()[0];
      await writeAll(a, bytes("*1\r\n$x\r\n"));
      const reasonA = await within(5000, serverA.closed, "a closes");
      assert.ok(reasonA instanceof MalformedFrame, `closed with ${reasonA}`);
      assert.deepEqual(
        (await within(5000, readReplies(a, 2), "a's last reply")).map(plain),
        [{ error: "ERR Protocol error: invalid bulk length" }],
      );
      // b, too large: FrameTooLarge.
      const serverB = srv.connections()[0];
      await writeAll(b, bytes("*1\r\n$2000\r\n"));
      const reasonB = await within(5000, serverB.closed, "b closes");
      assert.ok(reasonB instanceof FrameTooLarge, `closed with ${reasonB}`);
      assert.equal(seen.frameErrors.length, 2);
      assert.equal(logger.calls.length, 2, `logged: ${logger.calls}`);
      assert.ok(logNames(logger.calls[0], reasonA));
      assert.ok(logNames(logger.calls[1], reasonB));

      // The server goes on: a new connection is served.
      const c = await open();
      try {
        await writeAll(c, bytes("*1\r\n$4\r\nPING\r\n"));
        assert.deepEqual(await within(5000, readReplies(c, 1), "c's reply"), [[4]]);
      } finally {
        closeQuietly(c);
      }
    } finally {
      closeQuietly(a);
      closeQuietly(b);
      await within(10_000, srv.stop(), "server stop");
    }
  });
}

Deno.test("end to end (memory): connect() with resp() talks to a resp() server both ways", async () => {
  const transport = memory("resp-client");
  const srv = await serve(async function* (conn: Connection<RespValue>) {
    for (let ev = yield;;) {
      if (ev.type !== "packet") return;
      // Echo every value back as a push, tagged with the connection's id.
      ev = yield send(new RespPush([conn.id, ev.data as RespValue]));
    }
  }, { transport, framing: resp() });
  const values: RespValue[] = [
    "text",
    bytes("bytes"),
    42,
    -1.25,
    null,
    true,
    [1, [2, "three"]],
    new Map<RespValue, RespValue>([["k", "v"]]),
    new Set<RespValue>([1, 2]),
    new RespError("ERR nope"),
    new RespSimpleString("OK"),
    2n ** 70n,
  ];
  const got: RespValue[] = [];
  const done = Promise.withResolvers<void>();
  const conn = await connect(
    async function* (): AsyncGenerator<Yielded, void, Event<RespValue>> {
      let ev = yield values.map((v) => send(v));
      while (ev.type === "packet") {
        got.push(ev.data);
        if (got.length === values.length) done.resolve();
        ev = yield;
      }
    },
    { transport, framing: resp() },
  );
  try {
    await within(5000, done.promise, "echoes");
    assert.ok(got.every((g) => g instanceof RespPush));
    assert.deepEqual(
      got.map((g) => plain((g as RespPush).values[1])),
      // What the server decoded, sent back as it was.
      values.map((v) => expectedBack(decodeFrames(client, encodeFrames(client, [v]))[0])),
    );
  } finally {
    await conn.stop();
    await srv.stop();
  }
});

// ---- Property tests -------------------------------------------------------------------------------

const NUM_RUNS = 300;

/** Cut `data` at `cuts` (positions, any order), keeping empty chunks; null: every byte. */
function chunksOf(data: Uint8Array, cuts: number[] | null): Uint8Array[] {
  if (cuts === null) return Array.from(data, (_, i) => data.slice(i, i + 1));
  const at = [...new Set(cuts.map((c) => c % (data.length + 1)))].sort((x, y) => x - y);
  const chunks: Uint8Array[] = [];
  let from = 0;
  for (const to of [...at, data.length]) {
    chunks.push(data.slice(from, to));
    from = to;
  }
  return chunks;
}

const cuts = fc.oneof(
  { weight: 4, arbitrary: fc.array(fc.nat(), { maxLength: 24 }) },
  { weight: 1, arbitrary: fc.constant(null) },
);

/**
 * Feed chunks, scribbling over each after the call; the frames (as plain data, taken when
 * emitted: a lent frame is valid until the next decode), the error, and buffered after each.
 */
function feed(
  framing: Framing<RespValue>,
  chunks: Uint8Array[],
): { frames: unknown[]; error?: unknown; buffered: number[] } {
  const decoder = framing.decoder();
  const frames: unknown[] = [];
  const buffered: number[] = [];
  try {
    for (const chunk of chunks) {
      decoder.decode(chunk, (frame) => frames.push(plain(frame)));
      chunk.fill(0xa5);
      buffered.push(decoder.buffered);
    }
  } catch (error) {
    return { frames, error, buffered };
  }
  return { frames, buffered };
}

const lineText = fc.string({
  unit: fc.constantFrom("a", "Z", " ", "é", "✓", "-", ":", "$", "*", "\t"),
  maxLength: 12,
});
const leaf: fc.Arbitrary<RespValue> = fc.oneof(
  fc.uint8Array({ maxLength: 20 }),
  fc.uint8Array({ maxLength: 20 }).map((b) => b.map((x) => [10, 13, 42, 36, x][x % 5])),
  fc.string({ unit: "binary", maxLength: 12 }),
  lineText.map((s) => new RespSimpleString(s)),
  lineText.map((s) => new RespError(`ERR${s}`)),
  fc.maxSafeInteger(),
  fc.integer({ min: -1000, max: 1000 }).map((n) => n === 0 ? 0 : n), // no -0
  fc.bigInt({ min: -(2n ** 64n), max: 2n ** 64n }).filter((b) =>
    b > BigInt(Number.MAX_SAFE_INTEGER) || b < -BigInt(Number.MAX_SAFE_INTEGER)
  ),
  fc.double().filter((d) => !Number.isSafeInteger(d) && !Object.is(d, -0)),
  fc.boolean(),
  fc.constant(null),
);
const unique = (arb: fc.Arbitrary<RespValue>) =>
  fc.uniqueArray(arb, { maxLength: 4, selector: (v) => JSON.stringify(expectedBack(v)) });
const { value: respValue } = fc.letrec<{ value: RespValue }>((tie) => ({
  value: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    leaf,
    fc.array(tie("value"), { maxLength: 5 }),
    fc.array(tie("value"), { maxLength: 3 }).map((items) => new RespPush(items)),
    fc.tuple(unique(leaf), fc.array(tie("value"), { minLength: 4, maxLength: 4 })).map((
      [keys, values],
    ) => new Map(keys.map((k, i) => [k, values[i]]))),
    unique(leaf).map((items) => new Set(items)),
  ),
}));

/** Where each frame of `frames` ends in their encoding. */
function boundaries(framing: Framing<RespValue>, frames: RespValue[]): number[] {
  const ends = [0];
  let total = 0;
  for (const frame of frames) ends.push(total += encodeFrames(framing, [frame]).length);
  return ends;
}

Deno.test("fuzz: resp() and resp({ lend: true }): random values, cut anywhere, decode to what was sent; buffered exact", () => {
  fc.assert(
    fc.property(fc.array(respValue, { maxLength: 12 }), cuts, fc.boolean(), (frames, at, lend) => {
      const data = encodeFrames(client, frames);
      const chunks = chunksOf(data, at);
      const got = feed(lend ? resp({ lend }) : client, chunks);
      assert.equal(got.error, undefined);
      assert.deepEqual(got.frames, frames.map(expectedBack));
      const ends = boundaries(client, frames);
      let pos = 0;
      const expected = chunks.map((c) => {
        pos += c.length;
        return pos - Math.max(...ends.filter((e) => e <= pos));
      });
      assert.deepEqual(got.buffered, expected);
    }),
    { numRuns: NUM_RUNS },
  );
});

// An independent decoder, written for clarity rather than speed, from the whole input at once:
// the frames before the first error, and that error's name.

class Incomplete {}

interface RefOptions {
  max: number;
  maxDepth: number;
  inline: boolean;
  lend?: boolean;
}

/** A reference value as {@linkcode plain} data: numbers and bigints as `plain` shows them. */
function finish(value: unknown): unknown {
  if (typeof value === "number" || typeof value === "bigint") return plain(value);
  if (Array.isArray(value)) return value.map(finish);
  if (value !== null && typeof value === "object") {
    const tagged = value as { map?: unknown[][]; set?: unknown[]; push?: unknown[] };
    if (tagged.map) return { map: tagged.map.map(([k, v]) => [finish(k), finish(v)]) };
    if (tagged.set) return { set: tagged.set.map(finish) };
    if (tagged.push) return { push: tagged.push.map(finish) };
  }
  return value;
}

function referenceResp(data: Uint8Array, o: RefOptions): { frames: unknown[]; error?: string } {
  const frames: unknown[] = [];
  const tooLarge = () => new FrameTooLarge(0, o.max);
  const malformed = () => new MalformedFrame("reference");
  let frameStart = 0;

  // A line from `pos`: its content and where the next byte is, or Incomplete.
  const line = (pos: number, crRequired: boolean): { from: number; to: number; next: number } => {
    const nl = data.indexOf(10, pos);
    if (nl < 0) {
      if (data.length - frameStart > o.max) throw tooLarge();
      throw new Incomplete();
    }
    if (nl + 1 - frameStart > o.max) throw tooLarge();
    let to = nl;
    if (to > pos && data[to - 1] === 13) to--;
    else if (crRequired) throw malformed();
    return { from: pos, to, next: nl + 1 };
  };
  const lineText = (l: { from: number; to: number }) =>
    String.fromCharCode(...data.subarray(l.from, l.to));
  const length = (s: string, nullable: boolean): number | null => {
    if (s === "-1" && nullable) return null;
    if (!/^\d+$/.test(s)) throw malformed();
    return s.length > 15 ? Infinity : Number(s);
  };

  // A value from `pos` at nesting `depth`: [value, next] (value undefined for an attribute).
  const value = (pos: number, depth: number): [unknown, number] => {
    if (pos >= data.length) throw new Incomplete();
    const type = String.fromCharCode(data[pos]);
    if (!"*$+-:_#,(!=%~>|".includes(type)) throw malformed();
    const l = line(pos + 1, true);
    const s = lineText(l);
    const size = l.next - frameStart;
    switch (type) {
      case "+":
        return [new TextDecoder().decode(data.subarray(l.from, l.to)), l.next];
      case "-":
        return [{ error: new TextDecoder().decode(data.subarray(l.from, l.to)) }, l.next];
      case ":": {
        if (!/^[+-]?\d{1,20}$/.test(s)) throw malformed();
        const big = BigInt(s);
        if (big < -(2n ** 63n) || big >= 2n ** 63n) throw malformed();
        return [Number.isSafeInteger(Number(big)) ? Number(big) : big, l.next];
      }
      case "_":
        if (s !== "") throw malformed();
        return [null, l.next];
      case "#":
        if (s !== "t" && s !== "f") throw malformed();
        return [s === "t", l.next];
      case ",": {
        if (s.length > 512 || !/^[+-]?(\d+(\.\d+)?([eE][+-]?\d+)?|inf|nan)$/.test(s)) {
          throw malformed();
        }
        const n = s.endsWith("inf") ? (s[0] === "-" ? -Infinity : Infinity) : Number(s);
        return [n, l.next];
      }
      case "(":
        if (s.length > 4097 || !/^[+-]?\d+$/.test(s)) throw malformed();
        return [BigInt(s), l.next];
      case "$":
      case "!":
      case "=": {
        const n = length(s, type === "$");
        if (n === null) return [null, l.next];
        if (size + n + 2 > o.max) throw tooLarge();
        if (n === Infinity) throw malformed();
        const end = l.next + n;
        if (end < data.length && data[end] !== 13) throw malformed();
        if (end + 1 < data.length && data[end + 1] !== 10) throw malformed();
        if (end + 2 > data.length) throw new Incomplete();
        const body = data.subarray(l.next, end);
        if (type === "$") return [{ bytes: String.fromCharCode(...body) }, end + 2];
        if (type === "!") return [{ error: new TextDecoder().decode(body) }, end + 2];
        if (body.length < 4 || body[3] !== 58) throw malformed();
        return [new TextDecoder().decode(body.subarray(4)), end + 2];
      }
      default: {
        const n = length(s, type === "*");
        if (n === null) return [null, l.next];
        const elements = type === "%" || type === "|" ? 2 * n : n;
        if (size + 3 * elements > o.max) throw tooLarge();
        if (elements === Infinity) throw malformed();
        if (elements > 0 && depth + 1 > o.maxDepth) throw malformed();
        const items: unknown[] = [];
        let next = l.next;
        while (items.length < elements) {
          let item: unknown;
          do [item, next] = value(next, depth + 1); while (item === undefined);
          items.push(item);
        }
        if (type === "|") return [undefined, next];
        if (type === "*") return [items, next];
        if (type === ">") return [{ push: items }, next];
        // As a JS Set and Map do: a primitive member or key seen before is not added again
        // (a key's value is replaced in place), and -0 is kept as 0.
        const seen = (list: unknown[], x: unknown) =>
          (typeof x !== "object" || x === null) &&
          list.some((y) => y === x || (y !== y && x !== x));
        const member = (x: unknown) => x === 0 ? 0 : x;
        if (type === "~") {
          return [{ set: items.filter((x, i) => !seen(items.slice(0, i), x)).map(member) }, next];
        }
        const pairs: unknown[][] = [];
        for (let i = 0; i < items.length; i += 2) {
          const at = pairs.findIndex(([k]) => seen([k], items[i]));
          if (at >= 0) pairs[at][1] = items[i + 1];
          else pairs.push([member(items[i]), items[i + 1]]);
        }
        return [{ map: pairs }, next];
      }
    }
  };

  // Redis's sdssplitargs, as its C reads, one character at a time.
  const splitArgs = (from: number, to: number): unknown[] => {
    const s = data.subarray(from, to);
    const at = (i: number) => i < s.length && s[i] !== 0 ? s[i] : 0; // a C string
    const space = (c: number) => c === 32 || (c >= 9 && c <= 13);
    const hex = (c: number) => /^[0-9a-fA-F]$/.test(String.fromCharCode(c));
    const args: unknown[] = [];
    let p = 0;
    for (;;) {
      while (at(p) && space(at(p))) p++;
      if (!at(p)) return args;
      let inq = false, insq = false, done = false;
      const cur: number[] = [];
      while (!done) {
        const c = at(p);
        if (inq) {
          if (!c) throw malformed();
          if (c === 92 && at(p + 1) === 120 && hex(at(p + 2)) && hex(at(p + 3))) {
            cur.push(parseInt(String.fromCharCode(at(p + 2), at(p + 3)), 16));
            p += 3;
          } else if (c === 92 && at(p + 1)) {
            p++;
            const e = at(p);
            cur.push({ 110: 10, 114: 13, 116: 9, 98: 8, 97: 7 }[e] ?? e);
          } else if (c === 34) {
            if (at(p + 1) && !space(at(p + 1))) throw malformed();
            done = true;
          } else cur.push(c);
        } else if (insq) {
          if (!c) throw malformed();
          if (c === 92 && at(p + 1) === 39) {
            p++;
            cur.push(39);
          } else if (c === 39) {
            if (at(p + 1) && !space(at(p + 1))) throw malformed();
            done = true;
          } else cur.push(c);
        } else if (c === 32 || c === 10 || c === 13 || c === 9 || c === 0) done = true;
        else if (c === 34) inq = true;
        else if (c === 39) insq = true;
        else cur.push(c);
        if (at(p)) p++;
      }
      args.push({ bytes: String.fromCharCode(...cur) });
    }
  };

  try {
    for (let pos = 0; pos < data.length;) {
      frameStart = pos;
      if (o.inline && data[pos] !== 42) {
        const l = line(pos, false);
        const args = splitArgs(l.from, l.to);
        if (args.length > 0) frames.push(args);
        pos = l.next;
        continue;
      }
      let frame: unknown;
      do [frame, pos] = value(pos, 0); while (frame === undefined);
      frames.push(frame);
    }
  } catch (err) {
    if (err instanceof Incomplete) return { frames: frames.map(finish) };
    return { frames: frames.map(finish), error: (err as Error).name };
  }
  return { frames: frames.map(finish) };
}

// Pieces of RESP, to put together in any order: nearly valid input, with its edge cases.
const respTokens = [
  "*2\r\n",
  "*1\r\n",
  "*0\r\n",
  "*-1\r\n",
  "*3\r\n",
  "*15\r\n",
  "$3\r\n",
  "abc\r\n",
  "$0\r\n",
  "$-1\r\n",
  "$30\r\n",
  ":1\r\n",
  ":-7\r\n",
  "+OK\r\n",
  "+a longer status line\r\n",
  "-ERR x\r\n",
  "%1\r\n",
  "~2\r\n",
  ">2\r\n",
  "|1\r\n",
  "_\r\n",
  "#t\r\n",
  ",1.5\r\n",
  "(12\r\n",
  "=5\r\ntxt:a\r\n",
  "!2\r\nab\r\n",
  "\r\n",
  "\n",
  "\r",
  "x",
].map((t) => utf8.encode(t));
// And of inline commands.
const inlineTokens = [
  "PING",
  " ",
  "\t",
  '"a b"',
  "'c'",
  "'d\\'e'",
  "\\x41",
  '"\\x4',
  "\0",
  "\r\n",
  "\n",
  '"',
  "'",
].map((t) => utf8.encode(t));

/** Random bytes around RESP: pieces of it, or a valid encoding with bytes changed. */
function noise(inline: boolean): fc.Arbitrary<Uint8Array> {
  const special = [...utf8.encode("*$+-:_#,(!=%~>|0123456789\r\n\r\n\r\n -1tf.e\"'\\x\0")];
  const base = fc.oneof(
    fc.array(respValue, { maxLength: 4 }).map((values) => encodeFrames(client, values)),
    fc.array(fc.constantFrom(...respTokens, ...(inline ? inlineTokens : [])), { maxLength: 16 })
      .map(concat),
    inline
      ? fc.array(fc.constantFrom(...utf8.encode("ab \"'\\x41\r\n\t\0")), { maxLength: 40 }).map(
        (b) => Uint8Array.from(b),
      )
      : fc.uint8Array({ maxLength: 40 }),
  );
  return base.chain((data) =>
    fc.array(fc.tuple(fc.nat(), fc.constantFrom(...special)), { maxLength: 4 }).map((edits) => {
      const out = data.slice();
      for (const [at, b] of edits) if (out.length > 0) out[at % out.length] = b;
      return out;
    })
  );
}

const noiseCases: (RefOptions & { name: string })[] = [
  { name: "resp()", max: 8 * 1024 * 1024, maxDepth: 16, inline: false },
  { name: "resp({ maxLength: 40, maxDepth: 2 })", max: 40, maxDepth: 2, inline: false },
  { name: "resp({ maxLength: 7 })", max: 7, maxDepth: 16, inline: false },
  { name: "resp({ inline: true })", max: 8 * 1024 * 1024, maxDepth: 16, inline: true },
  {
    name: "resp({ inline: true, maxLength: 12, maxDepth: 1 })",
    max: 12,
    maxDepth: 1,
    inline: true,
  },
  { name: "resp({ inline: true, lend: true })", max: 1024, maxDepth: 16, inline: true, lend: true },
  {
    name: "resp({ maxLength: 60, maxDepth: 3, lend: true })",
    max: 60,
    maxDepth: 3,
    inline: false,
    lend: true,
  },
];

for (const o of noiseCases) {
  const framing = resp({ maxLength: o.max, maxDepth: o.maxDepth, inline: o.inline, lend: o.lend });
  Deno.test(`fuzz: ${o.name}: random bytes, cut anywhere, decode as the reference does; only typed errors`, () => {
    fc.assert(
      fc.property(noise(o.inline), cuts, (input, at) => {
        const expected = referenceResp(input, o);
        const got = feed(framing, chunksOf(input.slice(), at));
        if (got.error !== undefined) {
          assert.ok(
            got.error instanceof FrameTooLarge || got.error instanceof MalformedFrame,
            `unexpected ${got.error}`,
          );
        }
        assert.equal((got.error as Error | undefined)?.name, expected.error);
        assert.deepEqual(got.frames, expected.frames);
        // What was decoded can be sent back with the same options (an echo cannot fail on it).
        if (expected.error === undefined) encodeFrames(framing, decodeFrames(framing, input));
      }),
      { numRuns: NUM_RUNS * 2 },
    );
  });
}
