// Delivery: every frame a peer sends reaches the handler exactly once, in order and intact, and
// every `sendSync` that resolved reaches the peer. Each payload carries its stream, its sequence
// number and an FNV-1a checksum; peers write frames cut at random points (a third of the pieces
// single bytes), read one byte at a time, send frames of 0 bytes and of exactly `maxLength`,
// thousands of frames in one write, and read slowly enough to engage flow control. Loopback TCP
// on port 0, and the memory transport with a tiny buffer where it forces more partial progress.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  ConnectionClosed,
  type Event,
  FrameTooLarge,
  type Handler,
  lengthPrefixed,
  lines,
  type Logger,
  memory,
  recv,
  send,
  serve,
  type Server,
  tcp,
  type Transport,
  type Yielded,
} from "../../mod.ts";
import { echo, echoHibernating, echoSync } from "../../examples/echo_server.ts";
import {
  capturingLogger,
  concat,
  HOST,
  Inbox,
  logNames,
  MIN_PAYLOAD,
  pause,
  payload,
  portOf,
  type Rand,
  randomPieces,
  RawFrames,
  recordingServer,
  sameBytes,
  seededTest,
  SequenceChecker,
  type Session,
  wireOf,
  within,
  wrapped,
  writeAll,
} from "./_support.ts";

type Gen = AsyncGenerator<Yielded, void, Event<Uint8Array>>;

/** `got` is `sent`: same count, each once, in order, byte for byte (checksums checked first). */
function assertDelivered(got: Uint8Array[], sent: Uint8Array[], what = "handler"): void {
  const checker = new SequenceChecker();
  for (let i = 0; i < Math.min(got.length, sent.length); i++) {
    if (sent[i].length >= MIN_PAYLOAD) checker.see(got[i], what);
    if (!sameBytes(got[i], sent[i])) {
      assert.fail(`${what}: frame ${i} differs (${got[i].length} bytes, sent ${sent[i].length})`);
    }
  }
  assert.equal(got.length, sent.length, `${what}: frames delivered`);
}

/** A frame size: mostly small, some of several kB, a few over the driver's 64 kB read buffer. */
function sizeOf(rand: Rand): number {
  const r = rand.float();
  if (r < 0.01) return rand.int(60_000, 140_000);
  if (r < 0.1) return rand.int(300, 6000);
  return rand.int(MIN_PAYLOAD, 300);
}

// ---- Client → server: partial writes, 1-byte reads ---------------------------------------

seededTest(
  "TCP: frames written in pieces cut at random points (a third single bytes) reach the handler once, in order, intact",
  async (rand) => {
    const logger = capturingLogger();
    await using s = await recordingServer({ logger });
    const N = 1500;
    const sent = Array.from({ length: N }, (_, i) => payload(0, i, sizeOf(rand)));
    const peer = await Deno.connect({ hostname: HOST, port: s.port });
    try {
      const session = await s.sessions.next();
      let single = 0;
      for (const piece of randomPieces(wireOf(sent), rand)) {
        await writeAll(peer, piece);
        if (piece.length === 1) single++;
      }
      assert.ok(single > 100, `only ${single} single-byte writes`);
      await peer.closeWrite();
      assert.equal(await within(15_000, session.end, "the handler's end"), "disconnect");
      assertDelivered(session.got, sent);
      assert.equal(await session.conn.closed, "normal");
    } finally {
      peer.close();
    }
    assert.deepEqual(logger.calls, []);
  },
);

seededTest(
  "TCP: with every server read a single byte and the first frames written byte by byte, each frame arrives whole, once, in order",
  async (rand) => {
    const logger = capturingLogger();
    const io = wrapped(tcp(), { readMax: 1 });
    await using s = await recordingServer({ transport: io.transport, logger });
    const N = 200;
    const sent = Array.from({ length: N }, (_, i) => payload(0, i, rand.int(MIN_PAYLOAD, 120)));
    const wire = wireOf(sent);
    const peer = await Deno.connect({ hostname: HOST, port: s.port });
    try {
      const session = await s.sessions.next();
      const byByte = Math.min(wire.length, 1500);
      for (let i = 0; i < byByte; i++) await writeAll(peer, wire.subarray(i, i + 1));
      await writeAll(peer, wire.subarray(byByte));
      await peer.closeWrite();
      assert.equal(await within(15_000, session.end, "the handler's end"), "disconnect");
      assertDelivered(session.got, sent);
      assert.equal(io.accepted[0].reads, wire.length, "every read was one byte");
    } finally {
      peer.close();
    }
    assert.deepEqual(logger.calls, []);
  },
);

seededTest(
  "TCP, lines(): 1000 lines (multi-byte UTF-8, \\n or \\r\\n endings, some empty) cut at random points arrive once, in order, intact",
  async (rand) => {
    const logger = capturingLogger();
    const got: string[] = [];
    const done = Promise.withResolvers<void>();
    const server = await serve(
      async function* (): AsyncGenerator<Yielded, void, Event<string>> {
        let ev = yield;
        for (;;) {
          if (ev.type === "packet") got.push(ev.data);
          else if (ev.type === "disconnect" || ev.type === "shutdown") {
            done.resolve();
            return;
          }
          ev = yield;
        }
      },
      { hostname: HOST, port: 0, framing: lines({ maxLength: 4096 }), logger },
    );
    try {
      const alphabet = ["a", "b", " ", "é", "€", "😀", "\t", "z"];
      const sent = Array.from({ length: 1000 }, (_, i) => {
        if (rand.float() < 0.05) return "";
        const body = Array.from({ length: rand.int(0, 60) }, () => alphabet[rand.int(0, 7)]).join(
          "",
        );
        return `${i} ${body}`;
      });
      const text = sent.map((line) => line + (rand.float() < 0.5 ? "\r\n" : "\n")).join("");
      const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
      try {
        for (const piece of randomPieces(new TextEncoder().encode(text), rand, 512)) {
          await writeAll(peer, piece);
        }
        await peer.closeWrite();
        await within(10_000, done.promise, "the handler's end");
      } finally {
        peer.close();
      }
      assert.equal(got.length, sent.length, "lines delivered");
      for (let i = 0; i < sent.length; i++) assert.equal(got[i], sent[i], `line ${i}`);
    } finally {
      await server.stop();
    }
    assert.deepEqual(logger.calls, []);
  },
);

// ---- 0 bytes, maxLength, maxLength + 1 ----------------------------------------------------

for (
  const { prefix, maxLength, limit, over } of [
    { prefix: 1, maxLength: undefined, limit: 255, over: false },
    { prefix: 1, maxLength: 200, limit: 200, over: true },
    { prefix: 2, maxLength: undefined, limit: 65_535, over: false },
    { prefix: 2, maxLength: 40_000, limit: 40_000, over: true },
    { prefix: 4, maxLength: 100_000, limit: 100_000, over: true },
  ] as const
) {
  const name = `lengthPrefixed(${prefix}${maxLength ? `, { maxLength: ${maxLength} }` : ""})`;
  seededTest(
    `${name}: frames of 0 and of exactly ${limit} bytes arrive intact, in order${
      over ? `; one of ${limit + 1} then ends only that connection, after all before it` : ""
    }`,
    async (rand) => {
      const logger = capturingLogger();
      await using s = await recordingServer({
        framing: lengthPrefixed(prefix, maxLength ? { maxLength } : {}),
        logger,
      });
      // Empty, maxLength and small frames, interleaved.
      const sent = Array.from(
        { length: 60 },
        (_, i) =>
          i % 3 === 0
            ? new Uint8Array(0)
            : i % 3 === 1
            ? payload(0, Math.floor(i / 3) * 2, limit)
            : payload(0, Math.floor(i / 3) * 2 + 1, rand.int(MIN_PAYLOAD, 50)),
      );
      const peer = await Deno.connect({ hostname: HOST, port: s.port });
      try {
        const session = await s.sessions.next();
        for (const piece of randomPieces(wireOf(sent, prefix), rand)) {
          await writeAll(peer, piece);
        }
        if (over) {
          // The header of a frame one byte too long, and a little of its body.
          const header = new Uint8Array(prefix + 3);
          const view = new DataView(header.buffer);
          if (prefix === 1) view.setUint8(0, limit + 1);
          else if (prefix === 2) view.setUint16(0, limit + 1);
          else view.setUint32(0, limit + 1);
          await writeAll(peer, header);
          assert.equal(await within(10_000, session.end, "the handler's end"), "finally");
          const reason = await session.conn.closed;
          assert.ok(reason instanceof FrameTooLarge, `closed with ${reason}`);
          assert.equal(reason.length, limit + 1);
          assert.equal(reason.maxLength, limit);
          assert.equal(logger.calls.length, 1, "logged once");
          assert.ok(logNames(logger.calls[0], reason), "the log names the FrameTooLarge");
        } else {
          await peer.closeWrite();
          assert.equal(await within(10_000, session.end, "the handler's end"), "disconnect");
          assert.deepEqual(logger.calls, []);
        }
        assertDelivered(session.got, sent);
      } finally {
        peer.close();
      }
      // The server goes on: a second peer's frames arrive as usual.
      const next = await Deno.connect({ hostname: HOST, port: s.port });
      try {
        const session = await s.sessions.next();
        const more = [payload(1, 0, limit), new Uint8Array(0), payload(1, 1, MIN_PAYLOAD)];
        await writeAll(next, wireOf(more, prefix));
        await next.closeWrite();
        assert.equal(await within(10_000, session.end, "the second handler's end"), "disconnect");
        assertDelivered(session.got, more);
      } finally {
        next.close();
      }
    },
  );
}

Deno.test("passive mode: the frames before one over maxLength are all delivered on recv, then the connection ends with FrameTooLarge", async () => {
  const logger = capturingLogger();
  const got: Uint8Array[] = [];
  const conns = new Inbox<Connection<Uint8Array>>();
  const server = await serve(async function* (conn: Connection<Uint8Array>): Gen {
    conns.push(conn);
    let ev = yield recv();
    for (;;) {
      if (ev.type === "packet") {
        got.push(ev.data);
        ev = yield recv();
      } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  }, {
    hostname: HOST,
    port: 0,
    mode: "passive",
    framing: lengthPrefixed(4, { maxLength: 1000 }),
    logger,
  });
  try {
    const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
    try {
      const sent = Array.from({ length: 20 }, (_, i) => payload(0, i, MIN_PAYLOAD + i * 40));
      // All of it in one write, so that one read holds the good frames and the bad header.
      await writeAll(peer, concat([wireOf(sent), new Uint8Array([0, 0, 3, 233, 1, 2, 3])]));
      const conn = await conns.next();
      const reason = await within(5000, conn.closed, "the end");
      assert.ok(reason instanceof FrameTooLarge, `closed with ${reason}`);
      assertDelivered(got, sent);
    } finally {
      peer.close();
    }
  } finally {
    await server.stop();
  }
  assert.equal(logger.calls.length, 1);
});

// ---- Thousands of frames in one write -----------------------------------------------------

const echoHandlers: Array<[string, Handler<Uint8Array> | null]> = [
  ["a recording echo", null],
  ["echo", echo as Handler<Uint8Array>],
  ["echoSync", echoSync as Handler<Uint8Array>],
  ["echoHibernating", echoHibernating as Handler<Uint8Array>],
];

for (const [label, handler] of echoHandlers) {
  seededTest(
    `TCP: 5000 frames in one write through ${label}: every frame handled and echoed once, in order, intact`,
    async (rand) => {
      const logger = capturingLogger();
      const N = 5000;
      const sent = Array.from({ length: N }, (_, i) => payload(0, i, rand.int(MIN_PAYLOAD, 120)));
      const wire = wireOf(sent);
      let server: Server<Uint8Array>;
      let sessions: Inbox<Session> | null = null;
      if (handler === null) {
        const s = await recordingServer({ logger }, { echo: true });
        server = s.server;
        sessions = s.sessions;
      } else {
        server = await serve(handler, {
          hostname: HOST,
          port: 0,
          framing: lengthPrefixed(4),
          logger,
        });
      }
      try {
        const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
        try {
          const echoes: Uint8Array[] = [];
          const reading = new RawFrames(peer).rest((p) => void echoes.push(p));
          // One write call for all of it (the kernel may take it in parts: writeAll goes on).
          const first = await peer.write(wire);
          await writeAll(peer, wire.subarray(first));
          await peer.closeWrite();
          assert.equal(await within(15_000, reading, "the echoes"), "eof");
          assertDelivered(echoes, sent, "echoes");
          if (sessions) {
            const session = await sessions.next();
            assert.equal(await within(5000, session.end), "disconnect");
            assertDelivered(session.got, sent);
          }
        } finally {
          peer.close();
        }
      } finally {
        await server.stop();
      }
      assert.deepEqual(logger.calls, []);
    },
  );
}

// ---- Server → peer: a slow reader, sendSync ---------------------------------------------

/**
 * A server on a counted TCP transport ({@linkcode wrapped}) whose handler, for each `info`
 * message b, sends frames b*perBatch … (b+1)*perBatch-1 of stream 0 in one step; its
 * connections land in `conns`. With `ignoreShutdown` the handler goes on through a shutdown (so
 * that stop has to force it).
 */
async function batchServer(
  perBatch: number,
  size: number,
  { ignoreShutdown = false, logger }: { ignoreShutdown?: boolean; logger: Logger },
) {
  const io = wrapped(tcp());
  const conns = new Inbox<Connection<Uint8Array>>();
  const state = { handled: 0, batchDone: new Inbox<number>() };
  const handler = async function* (conn: Connection<Uint8Array>): Gen {
    conns.push(conn);
    let ev = yield;
    for (;;) {
      if (ev.type === "info") {
        const b = ev.message as number;
        const sends = [];
        for (let k = 0; k < perBatch; k++) sends.push(send(payload(0, b * perBatch + k, size)));
        state.handled++;
        state.batchDone.push(b);
        ev = yield sends;
      } else if (ev.type === "disconnect" || (ev.type === "shutdown" && !ignoreShutdown)) {
        return;
      } else {
        ev = yield;
      }
    }
  };
  const server = await serve(handler, {
    hostname: HOST,
    port: 0,
    transport: io.transport,
    framing: lengthPrefixed(4),
    logger,
  });
  return { server, io, conns, state };
}

Deno.test("TCP slow reader: 12 MB from handler sends and outside sendSyncs, the peer pausing between reads: flow control engages, nothing lost, every sendSync resolved in order and received", async () => {
  const logger = capturingLogger();
  const BATCHES = 60, PER_BATCH = 20, SIZE = 5000, SYNCS = 1200; // 6 MB + 6 MB
  const { server, io, conns, state } = await batchServer(PER_BATCH, SIZE, { logger });
  try {
    const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
    try {
      const conn = await conns.next();
      // The peer reads nothing until the server's socket is full (a write it took only part
      // of), then reads 32 kB at a time with a pause before each read.
      const producing = Promise.withResolvers<void>();
      let reading = false;
      const checker = new SequenceChecker();
      const received = new RawFrames(peer, {
        readSize: 32 * 1024,
        beforeRead: async () => {
          if (!reading) await Promise.race([io.stalled, producing.promise]);
          reading = true;
          await pause(1);
        },
      }).rest((p) => void checker.see(p, "peer"));

      for (let b = 0; b < BATCHES; b++) conn.info(b);
      const resolved: number[] = [];
      const window: Promise<void>[] = [];
      // At least SYNCS, and on until the socket has filled up (should the kernel's buffers
      // hold more than 12 MB), up to 50 MB.
      let full = false;
      io.stalled.then(() => full = true);
      let syncs = 0;
      for (let seq = 0; seq < SYNCS || (!full && seq < 10_000); seq++, syncs++) {
        window.push(conn.sendSync(payload(1, seq, SIZE)).then(() => void resolved.push(seq)));
        if (window.length >= 16) await within(15_000, window.shift()!, `sendSync ${seq - 16}`);
      }
      await within(15_000, Promise.all(window), "the last sendSyncs");
      producing.resolve();
      while (state.handled < BATCHES) await state.batchDone.next(15_000);
      // Stopped right after the last sendSync resolved: everything still reaches the peer.
      await within(15_000, conn.stop(), "stop");
      assert.equal(await within(15_000, received, "the peer's reads"), "eof");

      assert.ok(io.accepted[0].partialWrites > 0, "the server's socket never filled up");
      assert.equal(checker.count(0), BATCHES * PER_BATCH, "handler sends received");
      assert.equal(checker.count(1), syncs, "sendSyncs received");
      assert.deepEqual(resolved, Array.from({ length: syncs }, (_, i) => i), "resolved in order");
      assert.equal(await conn.closed, "normal");
    } finally {
      peer.close();
    }
  } finally {
    await server.stop();
  }
  assert.deepEqual(logger.calls, []);
});

Deno.test("TCP slow reader, connection forced mid-stream: every sendSync that resolved was received, in order; the rest reject with ConnectionClosed", async () => {
  const logger = capturingLogger();
  const { server, io, conns } = await batchServer(20, 5000, { ignoreShutdown: true, logger });
  try {
    const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
    try {
      const conn = await conns.next();
      const checker = new SequenceChecker();
      const frames = new RawFrames(peer, {
        readSize: 16 * 1024,
        beforeRead: () => pause(1),
        tolerateTail: true, // a forced close may cut a frame
      });
      const received = frames.rest((p) => void checker.see(p, "peer"));
      received.catch(() => {}); // awaited below; a failure before that must not go uncaught
      // Sent 32 at a time until the cut, which comes once the server's socket is full (so that
      // some are still waiting to be written) and 300 have resolved.
      const resolved: number[] = [];
      const outcomes: Promise<unknown>[] = [];
      const window: Promise<unknown>[] = [];
      const cut = Promise.withResolvers<void>();
      let cutting = false;
      const producing = (async () => {
        for (let seq = 0; !cutting; seq++) {
          const outcome = conn.sendSync(payload(1, seq, 5000)).then(() => {
            resolved.push(seq);
            if (resolved.length >= 300) io.stalled.then(() => cut.resolve());
          }, (err) => err);
          outcomes.push(outcome);
          window.push(outcome);
          if (window.length >= 32) await window.shift();
        }
      })();
      await within(15_000, cut.promise, "a full socket and 300 sendSyncs resolved");
      cutting = true;
      await within(5000, conn.stop("cut", { timeout: 0 }), "the forced stop");
      await within(5000, producing, "the producer");
      const ends = await within(5000, Promise.all(outcomes), "every sendSync settled");
      const rejected = ends.filter((e) => e instanceof Error);
      assert.ok(rejected.length > 0, "the cut came after everything was written");
      for (const err of rejected) assert.ok(err instanceof ConnectionClosed, `${err}`);
      assert.equal(rejected.length + resolved.length, outcomes.length);
      await within(15_000, received, "the peer's reads");
      // Resolved ones form a prefix 0..r-1, and the peer got at least all of them, in order.
      assert.deepEqual(resolved, Array.from({ length: resolved.length }, (_, i) => i));
      assert.ok(
        checker.count(1) >= resolved.length,
        `resolved ${resolved.length}, received ${checker.count(1)}`,
      );
      assert.equal(await conn.closed, "cut");
    } finally {
      peer.close();
    }
  } finally {
    await server.stop();
  }
});

// ---- Both directions with the library's own client ----------------------------------------

/**
 * The client's handler sends stream 0 (for each `info` b: frames b*10 … b*10+9) and queues every
 * packet it gets; the server echoes and records, and its test code sends stream 2 with
 * sendSync; the client's test code sends stream 1 with sendSync.
 */
async function bothWays(transport: Transport, rand: Rand, slowClient: boolean): Promise<void> {
  const logger = capturingLogger();
  const N = 200; // frames per stream
  const sizes = Array.from({ length: 3 }, () => Array.from({ length: N }, () => sizeOf(rand)));
  await using s = await recordingServer({ transport, logger }, { echo: true });
  const clientGot: Uint8Array[] = [];
  const allIn = Promise.withResolvers<void>();
  const client = await connect(async function* (): Gen {
    let ev = yield;
    for (;;) {
      if (ev.type === "info") {
        const b = ev.message as number;
        const sends = [];
        for (let k = b * 10; k < b * 10 + 10; k++) sends.push(send(payload(0, k, sizes[0][k])));
        ev = yield sends;
      } else if (ev.type === "packet") {
        clientGot.push(ev.data);
        if (clientGot.length === 3 * N) allIn.resolve();
        // A slow client: a pause now and then (its reading waits meanwhile).
        if (slowClient && clientGot.length % 50 === 0) await pause(2);
        ev = yield;
      } else if (ev.type === "disconnect" || ev.type === "shutdown") {
        return;
      } else {
        ev = yield;
      }
    }
  }, {
    hostname: HOST,
    port: s.port,
    transport,
    framing: lengthPrefixed(4),
    highWaterMark: 2,
    logger,
  });
  try {
    const session = await s.sessions.next();
    for (let b = 0; b < N / 10; b++) client.info(b);
    const clientResolved: number[] = [];
    const serverResolved: number[] = [];
    const sync = async (
      conn: Connection<Uint8Array>,
      stream: number,
      resolved: number[],
    ): Promise<void> => {
      const window: Promise<void>[] = [];
      for (let seq = 0; seq < N; seq++) {
        window.push(
          conn.sendSync(payload(stream, seq, sizes[stream][seq])).then(() =>
            void resolved.push(seq)
          ),
        );
        if (window.length >= 8) await window.shift();
      }
      await Promise.all(window);
    };
    await within(
      20_000,
      Promise.all([sync(client, 1, clientResolved), sync(session.conn, 2, serverResolved)]),
      "the sendSyncs",
    );
    await within(20_000, allIn.promise, "everything back at the client");
    // Per stream, exactly once and in order at each end.
    const atClient = new SequenceChecker();
    for (const p of clientGot) atClient.see(p, "client");
    for (const stream of [0, 1, 2]) assert.equal(atClient.count(stream), N, `stream ${stream}`);
    const atServer = new SequenceChecker();
    for (const p of session.got) atServer.see(p, "server");
    assert.equal(atServer.count(0), N);
    assert.equal(atServer.count(1), N);
    assert.deepEqual(clientResolved, Array.from({ length: N }, (_, i) => i));
    assert.deepEqual(serverResolved, Array.from({ length: N }, (_, i) => i));
  } finally {
    await client.stop();
  }
  assert.deepEqual(logger.calls, []);
}

seededTest(
  "memory transport, 16-byte buffers, writes cut to 7 bytes and reads to 5: both directions arrive once, in order, intact",
  async (rand) => {
    const io = wrapped(memory(`delivery-${rand.seed}-${Math.random()}`, { bufferSize: 16 }), {
      writeMax: 7,
      readMax: 5,
    });
    await bothWays(io.transport, rand, false);
    // Every write and read on both sides was cut to a few bytes.
    for (const st of [...io.accepted, ...io.connected]) {
      assert.ok(st.writes >= st.bytesWritten / 7 && st.reads >= st.bytesRead / 5);
    }
  },
);

seededTest(
  "TCP, the library's client with a slow handler (highWaterMark 2): both directions arrive once, in order, intact",
  async (rand) => {
    await bothWays(tcp(), rand, true);
  },
);
