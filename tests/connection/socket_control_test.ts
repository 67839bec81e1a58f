// Socket control from a handler: `setFraming` switches framing at a frame boundary (lines, then
// length-prefixed frames, then lines, then raw) with nothing lost or reordered, however the
// peer's bytes are split into reads (one read, byte by byte, at frame boundaries, one byte on
// either side of them, at random), in active and passive mode; `closeWrite` half-closes (the peer
// reads the end of the stream, reading goes on, the connection ends once the peer closes too)
// over the memory transport, TCP, Unix sockets and TLS on both engines; `setOptions` reaches the
// socket's setters where it has them and is ignored where it has not.

import assert from "node:assert/strict";
import {
  closeWrite,
  type Conn,
  connect,
  type Connection,
  ConnectionClosed,
  type Event,
  type Handler,
  type HandlerGenerator,
  lengthPrefixed,
  lines,
  ProtocolError,
  raw,
  recv,
  send,
  serve,
  setFraming,
  setOptions,
  stop,
  tcp,
  tls,
  type Transport,
  unix,
} from "../../mod.ts";
import {
  capturingLogger,
  concat,
  Inbox,
  prng,
  readExactly,
  within,
  writeAll,
} from "../_support.ts";
import { acceptingWith, freshMemory, readUntil, writeText } from "./_rig.ts";

const utf8 = new TextEncoder();
const text = new TextDecoder();

// ---- A transport whose server side reads the stream cut where a test says ----------------------

/** What a wrapped socket recorded: its reads' sizes, and the socket options set on it. */
interface Recorded {
  reads: number[];
  options: string[];
}

/**
 * A server socket over `inner` whose reads stop at every offset of `cuts` (stream offsets; a read
 * also ends where the buffer it is given ends), and which records `setNoDelay`/`setKeepAlive`.
 */
class CutConn implements Conn {
  readonly recorded: Recorded = { reads: [], options: [] };
  readonly #inner: Conn;
  readonly #cuts: number[];
  #pending = new Uint8Array(0);
  #offset = 0;
  #next = 0; // index of the first cut past #offset

  constructor(inner: Conn, cuts: number[]) {
    this.#inner = inner;
    this.#cuts = cuts;
  }
  get localAddr() {
    return this.#inner.localAddr;
  }
  get remoteAddr() {
    return this.#inner.remoteAddr;
  }
  async read(p: Uint8Array): Promise<number | null> {
    if (this.#pending.length === 0) {
      const buf = new Uint8Array(64 * 1024);
      const n = await this.#inner.read(buf);
      if (n === null) return null;
      this.#pending = buf.subarray(0, n);
    }
    while (this.#next < this.#cuts.length && this.#cuts[this.#next] <= this.#offset) this.#next++;
    const limit = this.#next < this.#cuts.length ? this.#cuts[this.#next] - this.#offset : Infinity;
    const n = Math.min(p.length, this.#pending.length, limit);
    p.set(this.#pending.subarray(0, n));
    this.#pending = this.#pending.subarray(n);
    this.#offset += n;
    this.recorded.reads.push(n);
    return n;
  }
  write(p: Uint8Array): Promise<number> {
    return this.#inner.write(p);
  }
  closeWrite(): Promise<void> {
    return this.#inner.closeWrite();
  }
  close(): void {
    this.#inner.close();
  }
  setNoDelay(on: boolean): void {
    this.recorded.options.push(`noDelay ${on}`);
  }
  setKeepAlive(on: boolean): void {
    this.recorded.options.push(`keepAlive ${on}`);
  }
}

function cutting(label: string, cuts: number[]): { transport: Transport; sockets: CutConn[] } {
  const sockets: CutConn[] = [];
  const transport = acceptingWith(freshMemory(label), (conn) => {
    const cut = new CutConn(conn, cuts);
    sockets.push(cut);
    return cut;
  });
  return { transport, sockets };
}

// ---- The conversation: lines, then lengthPrefixed(2) frames, lines again, then raw -------------

const lp2 = lengthPrefixed(2);

/** The bytes of `frames` in lengthPrefixed(2). */
function lp2Bytes(frames: Uint8Array[]): Uint8Array {
  return concat(frames.map((f) => concat([Uint8Array.of(f.length >> 8, f.length & 255), f])));
}

// Binary frames that the lines() framing would misread: newlines, bytes that are not UTF-8, an
// empty frame, a frame longer than a read buffer's first size.
const rand = prng(7);
const binaryFrames = [
  utf8.encode("a\nb"),
  Uint8Array.of(0xff, 0x0a, 0x00),
  new Uint8Array(0),
  Uint8Array.from({ length: 1500 }, (_, i) => i % 7 === 0 ? 0x0a : Math.floor(rand() * 256)),
  utf8.encode("LINES"),
];
const rawTail = Uint8Array.from({ length: 3000 }, (_, i) => i % 5 === 0 ? 0x0a : rand() * 256);

// The stream the peer sends, and the offsets where its frames begin and end.
const pieces: Uint8Array[] = [
  utf8.encode("hello\n"),
  utf8.encode("BIN\n"),
  ...binaryFrames.map((f) => lp2Bytes([f])),
  utf8.encode("bye\r\n"),
  utf8.encode("RAW\n"),
  rawTail,
];
const stream = concat(pieces);
const boundaries: number[] = [];
for (let at = 0, i = 0; i < pieces.length - 1; i++) boundaries.push(at += pieces[i].length);

const hex = (bytes: Uint8Array) =>
  Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

// What the handler must see, in order (then the raw tail, in chunks), and what it answers.
const expectedEvents = [
  "line hello",
  "line BIN",
  ...binaryFrames.map((f) => `bin ${hex(f)}`),
  "line bye",
  "line RAW",
];
const expectedOutput = concat([
  utf8.encode("echo hello\nok\n"),
  lp2Bytes(binaryFrames),
  utf8.encode("echo bye\nok\n"),
  rawTail,
]);

/**
 * Answers lines with `echo …`, switches to lengthPrefixed(2) on `BIN` and echoes frames, back to
 * lines on the frame `LINES`, to raw on `RAW` and echoes the chunks; ends at the end of input.
 */
function switcher(
  mode: "active" | "passive",
  events: string[],
  rawGot: Uint8Array[],
  // deno-lint-ignore no-explicit-any
): Handler<any> {
  const more = mode === "passive" ? [recv()] : [];
  // deno-lint-ignore no-explicit-any
  return async function* (): HandlerGenerator<any> {
    let framing: "lines" | "bin" | "raw" = "lines";
    let ev: Event<unknown> = yield more;
    for (;;) {
      if (ev.type === "packet" && framing === "lines") {
        const line = ev.data as string;
        events.push(`line ${line}`);
        if (line === "BIN") {
          framing = "bin";
          // "ok" goes out as a line; what is sent after the switch, as frames.
          ev = yield [send("ok"), setFraming(lp2), setOptions({ noDelay: false }), ...more];
        } else if (line === "RAW") {
          framing = "raw";
          ev = yield [send("ok"), setFraming(raw()), ...more];
        } else ev = yield [send(`echo ${line}`), ...more];
      } else if (ev.type === "packet" && framing === "bin") {
        const frame = ev.data as Uint8Array;
        events.push(`bin ${hex(frame)}`);
        if (text.decode(frame) === "LINES") {
          framing = "lines";
          ev = yield [send(frame), setFraming(lines()), setOptions({ noDelay: true }), ...more];
        } else ev = yield [send(frame), ...more];
      } else if (ev.type === "packet") {
        rawGot.push(ev.data as Uint8Array);
        ev = yield [send(ev.data), ...more];
      } else if (ev.type === "disconnect" && ev.side === "read") {
        return;
      } else {
        events.push(ev.type === "frameError" ? `frameError ${ev.error.name}` : ev.type);
        ev = yield more;
      }
    }
  };
}

async function readAll(peer: Conn, ms = 5000): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const reading = (async () => {
    const buf = new Uint8Array(8192);
    for (;;) {
      const n = await peer.read(buf);
      if (n === null) return concat(parts);
      parts.push(buf.slice(0, n));
    }
  })();
  return await within(ms, reading, "reading to the end");
}

const cutPlans: Array<[string, number[]]> = [
  ["in one read", []],
  ["byte by byte", Array.from({ length: stream.length }, (_, i) => i + 1)],
  ["at frame boundaries", boundaries],
  ["one byte on either side of frame boundaries", boundaries.flatMap((b) => [b - 1, b + 1])],
  ...[1, 2, 3, 4, 5].map((seed): [string, number[]] => {
    const r = prng(seed);
    const cuts = new Set<number>();
    while (cuts.size < 40) cuts.add(1 + Math.floor(r() * (stream.length - 1)));
    return [`at random (seed ${seed})`, [...cuts].sort((a, b) => a - b)];
  }),
];

for (const mode of ["active", "passive"] as const) {
  for (const [plan, cuts] of cutPlans) {
    Deno.test(`setFraming (${mode}, split ${plan}): lines, frames, lines, raw: nothing lost or reordered`, async () => {
      const { transport, sockets } = cutting(`framing-${mode}`, cuts);
      const events: string[] = [];
      const rawGot: Uint8Array[] = [];
      const logger = capturingLogger();
      const server = await serve(switcher(mode, events, rawGot), {
        transport,
        framing: lines(),
        mode,
        logger,
      });
      try {
        const peer = await transport.connect({});
        await writeAll(peer, stream);
        await peer.closeWrite();
        const output = await readAll(peer);
        assert.deepEqual(events, expectedEvents);
        assert.deepEqual(concat(rawGot), rawTail, "the raw tail, whole");
        assert.equal(hex(output), hex(expectedOutput), "each answer in its framing, in order");
        assert.deepEqual(sockets[0].recorded.options, ["noDelay false", "noDelay true"]);
        if (plan === "byte by byte") assert.ok(sockets[0].recorded.reads.every((n) => n === 1));
        assert.deepEqual(logger.levels, [], "nothing logged");
      } finally {
        await within(5000, server.stop(), "stop");
      }
    });
  }
}

Deno.test("setFraming: a frameError not yet delivered, for bytes past the switch point, is taken back", async () => {
  // In one read: lines() fails on the second frame's bytes (not UTF-8) before the handler has
  // seen BIN; the switch makes those bytes frames, and the frameError is never delivered.
  const { transport } = cutting("framing-frame-error", []);
  const events: string[] = [];
  const server = await serve(switcher("active", events, []), {
    transport,
    framing: lines(),
    logger: capturingLogger(),
  });
  try {
    const peer = await transport.connect({});
    await writeAll(peer, concat([utf8.encode("BIN\n"), lp2Bytes([Uint8Array.of(0xc3, 0x28, 10)])]));
    await peer.closeWrite();
    await readAll(peer);
    assert.deepEqual(events, ["line BIN", "bin c3280a"]);
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setFraming: sends from outside after the switch use the new framing", async () => {
  const transport = freshMemory("framing-outside");
  const conns = new Inbox<Connection<unknown>>(3000);
  const server = await serve(async function* () {
    const ev = yield;
    if (ev.type === "packet") yield [send(`to ${ev.data}`), setFraming(lp2)];
  }, {
    transport,
    framing: lines(),
    logger: capturingLogger(),
    onConnection: (c) => conns.push(c),
  });
  try {
    const peer = await transport.connect({});
    const conn = await conns.next();
    await writeText(peer, "frames\n");
    assert.equal(await readUntil(peer, "to frames\n"), "to frames\n"); // the step was performed
    await conn.sendSync("after");
    assert.equal(hex(await readExactly(peer, 7)), hex(lp2Bytes([utf8.encode("after")])));
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setFraming on a message, with the end of input already queued: the frames held come before it", async () => {
  // The peer sends the start of a frame that lines() holds (no newline) and closes; the handler,
  // busy with a cast meanwhile, switches: the held bytes become a frame, then the end of input.
  const inputEnded = Promise.withResolvers<void>();
  const transport = acceptingWith(freshMemory("framing-held-at-end"), (conn) => ({
    localAddr: conn.localAddr,
    remoteAddr: conn.remoteAddr,
    read: async (p: Uint8Array) => {
      const n = await conn.read(p);
      if (n === null) setTimeout(inputEnded.resolve, 0); // once the driver has queued it
      return n;
    },
    write: (p: Uint8Array) => conn.write(p),
    closeWrite: () => conn.closeWrite(),
    close: () => conn.close(),
  }));
  const events = new Inbox<string>(3000);
  const conns = new Inbox<Connection<unknown>>(3000);
  const server = await serve(async function* () {
    let ev = yield;
    for (;;) {
      if (ev.type === "cast") {
        await inputEnded.promise;
        ev = yield setFraming(lp2);
      } else {
        events.push(ev.type === "packet" ? `packet ${hex(ev.data as Uint8Array)}` : ev.type);
        if (ev.type === "disconnect") return;
        ev = yield;
      }
    }
  }, {
    transport,
    framing: lines(),
    logger: capturingLogger(),
    onConnection: (c) => conns.push(c),
  });
  try {
    const peer = await transport.connect({});
    const conn = await conns.next();
    conn.cast("switch");
    await writeAll(peer, lp2Bytes([utf8.encode("hi")]));
    await peer.closeWrite();
    assert.equal(await events.next(), `packet ${hex(utf8.encode("hi"))}`);
    assert.equal(await events.next(), "disconnect");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setFraming with bytes held by a custom decoder that cannot hand them over ends with ProtocolError", async () => {
  // Frames of exactly 4 bytes; its decoder has no take().
  const fours = {
    name: "fours",
    decoder() {
      let held: Uint8Array = new Uint8Array(0);
      return {
        get buffered() {
          return held.length;
        },
        decode(chunk: Uint8Array, emit: (frame: Uint8Array) => void) {
          held = concat([held, chunk]);
          while (held.length >= 4) {
            emit(held.slice(0, 4));
            held = held.subarray(4);
          }
        },
      };
    },
    encode(frame: Uint8Array, out: { write(bytes: Uint8Array): void }) {
      out.write(frame);
    },
  };
  const transport = freshMemory("framing-no-take");
  const conns = new Inbox<Connection<Uint8Array>>(3000);
  const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
    for (let ev = yield; ev.type === "packet"; ev = yield) yield setFraming(lines());
  }, { transport, framing: fours, logger: capturingLogger(), onConnection: (c) => conns.push(c) });
  try {
    const peer = await transport.connect({});
    const conn = await conns.next();
    await writeText(peer, "abcdef"); // a frame, and 2 bytes held
    const reason = await within(2000, conn.closed, "closed");
    assert.ok(reason instanceof ProtocolError, String(reason));
    assert.match(reason.message, /no take\(\)/);
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setFraming with highWaterMark above 1 and frames read ahead ends the connection with ProtocolError", async () => {
  const transport = freshMemory("framing-read-ahead");
  const logger = capturingLogger();
  const server = await serve(async function* () {
    for (let ev = yield; ev.type === "packet"; ev = yield) {
      if (ev.data === "BIN") yield setFraming(lp2); // "x" and "y" were read with it
    }
  }, { transport, framing: lines(), highWaterMark: 4, logger, onClose: () => {} });
  try {
    const peer = await transport.connect({});
    await writeText(peer, "BIN\nx\ny\n");
    const [conn] = await within(2000, waitForConnection(server), "the connection");
    const reason = await within(2000, conn.closed, "closed");
    assert.ok(reason instanceof ProtocolError, String(reason));
    assert.match(reason.message, /highWaterMark/);
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

async function waitForConnection<T>(
  server: { connections(): Connection<T>[] },
): Promise<Connection<T>[]> {
  while (server.connections().length === 0) await new Promise((r) => setTimeout(r, 1));
  return server.connections();
}

Deno.test("setFraming: a bad argument is a TypeError; a yielded non-framing a ProtocolError", async () => {
  assert.throws(() => setFraming(undefined as never), TypeError);
  assert.throws(() => setFraming({ name: "x" } as never), TypeError);
  const transport = freshMemory("framing-bad");
  const server = await serve(async function* () {
    yield { type: "setFraming", framing: "lines" } as never;
  }, { transport, logger: capturingLogger() });
  try {
    await transport.connect({});
    const [conn] = await within(2000, waitForConnection(server), "the connection");
    const reason = await within(2000, conn.closed, "closed");
    assert.ok(reason instanceof ProtocolError, String(reason));
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

// ---- closeWrite --------------------------------------------------------------------------------

/**
 * On `bye`: answer, then half-close; record what comes after (lines, and the end of input);
 * try to send after the half-close (dropped).
 */
function halfCloser(seen: Inbox<string>): Handler<string> {
  return async function* (): HandlerGenerator<string> {
    let ev = yield;
    for (;;) {
      if (ev.type === "packet" && ev.data === "bye") {
        ev = yield [send("goodbye"), closeWrite(), send("dropped")];
      } else {
        seen.push(ev.type === "packet" ? `packet ${ev.data}` : `${ev.type}`);
        ev = yield; // never returns: the end of input ends the connection
      }
    }
  };
}

for (const [plan, split] of [["in one read", false], ["byte by byte", true]] as const) {
  Deno.test(`closeWrite (memory, split ${plan}): the peer reads the end of the stream, reading goes on, the connection ends when the peer closes too`, async () => {
    const input = "hi\nbye\nmore\n";
    const cuts = split ? Array.from({ length: input.length }, (_, i) => i + 1) : [];
    const { transport } = cutting(`close-write-${plan}`, cuts);
    const seen = new Inbox<string>(3000);
    const conns = new Inbox<Connection<string>>(3000);
    const server = await serve(halfCloser(seen), {
      transport,
      framing: lines(),
      logger: capturingLogger(),
      onConnection: (c) => conns.push(c),
    });
    try {
      const peer = await transport.connect({});
      const conn = await conns.next();
      await writeText(peer, "hi\nbye\n");
      assert.equal(await seen.next(), "packet hi");
      // The answer, then the end of the stream (the half-close).
      assert.equal(text.decode(await readAll(peer)), "goodbye\n");
      await writeText(peer, "more\n");
      assert.equal(await seen.next(), "packet more", "reading goes on");
      assert.equal(conn.framesDropped, 1, "a send after closeWrite is dropped and counted");
      await assert.rejects(conn.sendSync("late"), ConnectionClosed);
      assert.equal(conn.closeReason, undefined, "still open");
      await peer.closeWrite();
      assert.equal(await seen.next(), "disconnect");
      assert.equal(await within(2000, conn.closed, "closed"), "normal", "ends by itself");
    } finally {
      await within(5000, server.stop(), "stop");
    }
  });
}

Deno.test("closeWrite after the peer closed: the connection ends once its output is written", async () => {
  const transport = freshMemory("close-write-second");
  const conns = new Inbox<Connection<string>>(3000);
  const server = await serve(async function* (): HandlerGenerator<string> {
    let ev = yield;
    while (ev.type === "packet") ev = yield send(`echo ${ev.data}`);
    // The peer is done: say the last word, then half-close; then nothing more can happen.
    yield [send("summary"), closeWrite()];
    throw new Error("not reached: the connection ended at the yield");
  }, {
    transport,
    framing: lines(),
    logger: capturingLogger(),
    onConnection: (c) => conns.push(c),
  });
  try {
    const peer = await transport.connect({});
    const conn = await conns.next();
    await writeText(peer, "a\nb\n");
    await peer.closeWrite();
    assert.equal(text.decode(await readAll(peer)), "echo a\necho b\nsummary\n");
    assert.equal(await within(2000, conn.closed, "closed"), "normal");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("closeWrite: a socket that cannot half-close reports it as the write side's end", async () => {
  const transport = acceptingWith(freshMemory("close-write-refused"), (conn) => ({
    localAddr: conn.localAddr,
    remoteAddr: conn.remoteAddr,
    read: (p) => conn.read(p),
    write: (p) => conn.write(p),
    closeWrite: () => Promise.reject(new Deno.errors.NotSupported("no half-close here")),
    close: () => conn.close(),
  }));
  const seen = new Inbox<string>(3000);
  const server = await serve(async function* (): HandlerGenerator<string> {
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") ev = yield [send("bye"), closeWrite()];
      else if (ev.type === "disconnect") {
        seen.push(`disconnect ${ev.side} ${ev.error?.name}`);
        if (ev.side === "read") return;
        ev = yield;
      } else ev = yield;
    }
  }, { transport, framing: lines(), logger: capturingLogger() });
  try {
    const peer = await transport.connect({});
    await writeText(peer, "go\n");
    assert.equal(await readUntil(peer, "bye\n"), "bye\n");
    assert.equal(await seen.next(), "disconnect write NotSupported");
    await peer.closeWrite();
    assert.equal(await seen.next(), "disconnect read undefined");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

// Over real sockets: TCP, a Unix socket, and TLS on both engines (the client's side half-closes).
const fixtures = new URL("../fixtures/", import.meta.url);
const readFixture = (name: string) => Deno.readTextFileSync(new URL(name, fixtures));
const socketKinds: Array<
  [string, () => Promise<{ server: Transport; client: Transport; cleanup(): Promise<void> }>]
> = [
  [
    "tcp",
    () => Promise.resolve({ server: tcp(), client: tcp(), cleanup: () => Promise.resolve() }),
  ],
  ["unix", async () => {
    const dir = await Deno.makeTempDir();
    const transport = unix(`${dir}/half.sock`);
    return {
      server: transport,
      client: transport,
      cleanup: () => Deno.remove(dir, { recursive: true }),
    };
  }],
  ...(["deno", "node"] as const).map((
    engine,
  ): [
    string,
    () => Promise<{ server: Transport; client: Transport; cleanup(): Promise<void> }>,
  ] => [
    `tls (engine ${engine})`,
    () =>
      Promise.resolve({
        server: tls({ cert: readFixture("server.crt"), key: readFixture("server.key"), engine }),
        client: tls({ caCerts: [readFixture("ca.crt")], engine }),
        cleanup: () => Promise.resolve(),
      }),
  ]),
];

for (const [kind, make] of socketKinds) {
  Deno.test(`closeWrite over ${kind}: the server reads the end of the stream and still answers; both ends finish`, async () => {
    const { server: serverTransport, client: clientTransport, cleanup } = await make();
    const server = await serve(async function* (): HandlerGenerator<string> {
      const got: string[] = [];
      for (let ev = yield; ev.type === "packet"; ev = yield) got.push(ev.data);
      yield [send(`got ${got.join(",")}`), stop()]; // after the client's half-close
    }, {
      transport: serverTransport,
      hostname: "127.0.0.1",
      framing: lines(),
      logger: capturingLogger(),
    });
    try {
      const answer = Promise.withResolvers<string>();
      const client = await connect(async function* (): HandlerGenerator<string> {
        let ev = yield [send("a"), send("b"), closeWrite()];
        while (ev.type !== "packet") ev = yield;
        answer.resolve(ev.data);
        yield; // the server's close: disconnect, and since this side is half-closed, the end
      }, {
        transport: clientTransport,
        hostname: kind.startsWith("tls") ? "localhost" : "127.0.0.1",
        port: server.addr.transport === "tcp" ? server.addr.port : undefined,
        framing: lines(),
        logger: capturingLogger(),
      });
      assert.equal(await within(5000, answer.promise, "the answer"), "got a,b");
      assert.equal(await within(5000, client.closed, "client closed"), "normal");
    } finally {
      await within(5000, server.stop(), "stop");
      await cleanup();
    }
  });
}

// ---- setOptions --------------------------------------------------------------------------------

Deno.test("setOptions over TCP: Deno changes noDelay and keepAlive on the live socket; data still flows", async () => {
  const calls: string[] = [];
  const transport = acceptingWith(tcp(), (conn) => {
    const tcpConn = conn as Deno.TcpConn;
    return Object.assign(Object.create(null), {
      localAddr: conn.localAddr,
      remoteAddr: conn.remoteAddr,
      read: (p: Uint8Array) => conn.read(p),
      write: (p: Uint8Array) => conn.write(p),
      closeWrite: () => conn.closeWrite(),
      close: () => conn.close(),
      setNoDelay(on: boolean) {
        calls.push(`noDelay ${on}`);
        tcpConn.setNoDelay(on); // Deno's own: throws if it cannot
      },
      setKeepAlive(on: boolean) {
        calls.push(`keepAlive ${on}`);
        tcpConn.setKeepAlive(on);
      },
    }) as Conn;
  });
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      ev = yield [setOptions({ noDelay: ev.data === "on", keepAlive: true }), send(ev.data)];
    }
  }, { transport, hostname: "127.0.0.1", framing: lines(), logger: capturingLogger() });
  try {
    const peer = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await writeText(peer, "off\n");
    assert.equal(await readUntil(peer, "off\n"), "off\n");
    await writeText(peer, "on\n");
    assert.equal(await readUntil(peer, "on\n"), "on\n");
    assert.deepEqual(calls, ["noDelay false", "keepAlive true", "noDelay true", "keepAlive true"]);
    peer.close();
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setOptions where the socket has no such setter (memory, Deno's TLS) is ignored", async () => {
  const transport = freshMemory("set-options-memory");
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      ev = yield [setOptions({ noDelay: true, keepAlive: false }), send(ev.data)];
    }
  }, { transport, framing: lines(), logger: capturingLogger() });
  try {
    const peer = await transport.connect({});
    await writeText(peer, "still here\n");
    assert.equal(await readUntil(peer, "still here\n"), "still here\n");
    peer.close();
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("setOptions: an unknown option or a value that is not a boolean", async () => {
  assert.throws(() => setOptions({ noDelay: 1 } as never), TypeError);
  assert.throws(() => setOptions({ sendBufferSize: 1 } as never), /noDelay and keepAlive only/);
  const transport = freshMemory("set-options-bad");
  const server = await serve(async function* () {
    yield { type: "setOptions", options: { keepAlive: "yes" } } as never;
  }, { transport, logger: capturingLogger() });
  try {
    await transport.connect({});
    const [conn] = await within(2000, waitForConnection(server), "the connection");
    const reason = await within(2000, conn.closed, "closed");
    assert.ok(reason instanceof ProtocolError, String(reason));
  } finally {
    await within(5000, server.stop(), "stop");
  }
});
