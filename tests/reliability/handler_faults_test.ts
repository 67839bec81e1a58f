// Handler faults over real TCP on 127.0.0.1 (port 0): a handler that throws (on connect, on a
// packet, in its finally, on shutdown), one stuck in an await that never settles, and one
// that yields garbage. Each must end only its own connection, with a clear close reason that
// is logged exactly once, while 50 other connections on the same server keep echoing
// checksummed, sequence-numbered frames before, during and after the fault.
//
// Every wait is bounded; Deno's sanitizers (ops, resources) are on.

import assert from "node:assert/strict";
import {
  type Action,
  type Connection,
  ConnectionClosed,
  type Event,
  type Handler,
  lengthPrefixed,
  ProtocolError,
  send,
  serve,
  type Server,
  type Yielded,
} from "../../mod.ts";
import { echo } from "../../examples/echo_server.ts";
import {
  assertFrameOf,
  capturingLogger,
  closeQuietly,
  HOST,
  pause,
  portOf,
  prng,
  randomFrame,
  wireOf,
  within,
  writeAll,
} from "./_support.ts";

const ECHOERS = 50;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

type Gen = AsyncGenerator<Yielded, void, Event<Uint8Array>>;
type SyncGen = Generator<Yielded, void, Event<Uint8Array>>;

// ---- Helpers ------------------------------------------------------------------------------

/**
 * Reads lengthPrefixed(4) frames off a raw socket with its own parser (independent of the
 * library's). `next()` gives the next payload, or null once the peer closed (or reset) it.
 */
class FrameReader {
  readonly #conn: Deno.Conn;
  #buf = new Uint8Array(0);
  readonly #chunk = new Uint8Array(64 * 1024);
  /** How the stream ended: "eof", or the error's name for a reset. */
  end: string | null = null;

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  async next(): Promise<Uint8Array | null> {
    for (;;) {
      if (this.#buf.length >= 4) {
        const length = new DataView(this.#buf.buffer, this.#buf.byteOffset).getUint32(0);
        if (this.#buf.length >= 4 + length) {
          const payload = this.#buf.slice(4, 4 + length);
          this.#buf = this.#buf.slice(4 + length);
          return payload;
        }
      }
      if (this.end !== null) return null;
      let n: number | null;
      try {
        n = await this.#conn.read(this.#chunk);
      } catch (err) {
        this.end = (err as Error).name;
        return null;
      }
      if (n === null) {
        this.end = "eof";
        if (this.#buf.length > 0) throw new Error(`${this.#buf.length} bytes of a partial frame`);
        return null;
      }
      const joined = new Uint8Array(this.#buf.length + n);
      joined.set(this.#buf);
      joined.set(this.#chunk.subarray(0, n), this.#buf.length);
      this.#buf = joined;
    }
  }
}

/**
 * A raw TCP client that echoes checksummed frames through the server for as long as it runs:
 * each round writes one to three frames (sometimes split across two writes), reads their
 * echoes and checks each one's client id, sequence number, checksum and bytes.
 */
class Echoer {
  readonly id: number;
  readonly conn: Deno.TcpConn;
  /** Frames echoed back and verified. */
  echoed = 0;
  /** Settles when the loop ends: rejects on the first wrong, lost or extra frame. */
  readonly done: Promise<void>;
  #stopping = false;

  static async open(port: number, id: number): Promise<Echoer> {
    return new Echoer(id, await Deno.connect({ hostname: HOST, port }));
  }

  constructor(id: number, conn: Deno.TcpConn) {
    this.id = id;
    this.conn = conn;
    this.done = this.#loop();
    this.done.catch(() => {}); // checked by whoever waits on it
  }

  #frame(seq: number, rand: () => number): Uint8Array {
    return randomFrame(this.id, seq, (rand() * (rand() < 0.05 ? 8000 : 200)) | 0, rand);
  }

  async #loop(): Promise<void> {
    const rand = prng(this.id * 7919 + 17);
    const reader = new FrameReader(this.conn);
    let seq = 0;
    try {
      while (!this.#stopping) {
        const batch = Array.from(
          { length: 1 + ((rand() * 3) | 0) },
          () => this.#frame(seq++, rand),
        );
        const bytes = wireOf(batch);
        if (rand() < 0.2 && bytes.length > 1) {
          const cut = 1 + ((rand() * (bytes.length - 1)) | 0);
          await writeAll(this.conn, bytes.subarray(0, cut));
          await writeAll(this.conn, bytes.subarray(cut));
        } else {
          await writeAll(this.conn, bytes);
        }
        for (const sent of batch) {
          const got = await reader.next();
          const tag = `echoer ${this.id}, frame ${this.echoed}`;
          assert.ok(got !== null, `${tag}: the connection ended (${reader.end})`);
          assertFrameOf(got, this.id, this.echoed, tag);
          assert.deepEqual(got, sent, `${tag}: bytes differ`);
          this.echoed++;
        }
      }
      // Done: half-close; the echo handler ends on disconnect and closes, with nothing extra.
      await this.conn.closeWrite();
      assert.equal(await reader.next(), null, `echoer ${this.id}: an extra frame`);
      assert.equal(reader.end, "eof");
    } finally {
      closeQuietly(this.conn);
    }
  }

  stop(): Promise<void> {
    this.#stopping = true;
    return this.done;
  }
}

/** A raw peer for the faulty connection: reads (and keeps) every frame until the end. */
class Peer {
  readonly conn: Deno.TcpConn;
  readonly frames: string[] = [];
  /** Resolves with "eof" or the name of the read error once the server closed the socket. */
  readonly ended: Promise<string>;

  constructor(conn: Deno.TcpConn) {
    this.conn = conn;
    const reader = new FrameReader(conn);
    this.ended = (async () => {
      for (;;) {
        const frame = await reader.next();
        if (frame === null) return reader.end!;
        this.frames.push(decoder.decode(frame));
      }
    })();
  }

  send(text: string): Promise<void> {
    return writeAll(this.conn, wireOf([encoder.encode(text)]));
  }

  close(): void {
    closeQuietly(this.conn);
  }
}

/**
 * A server whose connections run `echo` (from the examples), except the ones opened with
 * `openFault(handler)`, which run `handler`; 50 echoers keep it busy throughout.
 */
class Bench {
  readonly logger = capturingLogger();
  /** The arguments of every `logger.error(...)` call. */
  readonly logged = this.logger.calls;
  server!: Server<Uint8Array>;
  echoers: Echoer[] = [];
  #pending: Array<{ handler: Handler<Uint8Array>; got(conn: Connection<Uint8Array>): void }> = [];

  static async start(): Promise<Bench> {
    const bench = new Bench();
    bench.server = await serve(
      (conn: Connection<Uint8Array>, state?: unknown) => {
        const fault = bench.#pending.shift();
        if (fault === undefined) return echo();
        fault.got(conn);
        return fault.handler(conn, state);
      },
      {
        hostname: HOST,
        port: 0,
        framing: lengthPrefixed(4),
        logger: bench.logger,
      },
    );
    const port = portOf(bench.server.addr);
    bench.echoers = await Promise.all(
      Array.from({ length: ECHOERS }, (_, i) => Echoer.open(port, i)),
    );
    await within(5000, bench.#connected(ECHOERS), "50 echoers accepted");
    return bench;
  }

  async #connected(n: number): Promise<void> {
    while (this.server.connections().length < n) await pause(2);
  }

  /** Waits until every echoer has echoed `frames` more verified frames (fails fast on error). */
  async progress(frames: number, what: string): Promise<void> {
    const target = this.echoers.map((e) => e.echoed + frames);
    const failed = Promise.race(this.echoers.map((e) => e.done)).then(() => {
      throw new Error("an echoer stopped");
    });
    failed.catch(() => {});
    const reached = (async () => {
      while (this.echoers.some((e, i) => e.echoed < target[i])) await pause(2);
    })();
    await within(10_000, Promise.race([reached, failed]), `echoers: ${frames} frames ${what}`);
  }

  /** Opens a connection that runs `handler`; resolves with its handle and a raw peer. */
  async openFault(
    handler: Handler<Uint8Array>,
  ): Promise<{ conn: Connection<Uint8Array>; peer: Peer }> {
    const accepted = Promise.withResolvers<Connection<Uint8Array>>();
    this.#pending.push({ handler, got: accepted.resolve });
    const port = portOf(this.server.addr);
    const peer = new Peer(await Deno.connect({ hostname: HOST, port }));
    const conn = await within(3000, accepted.promise, "fault connection accepted");
    return { conn, peer };
  }

  /** Only the echoers are left, the server runs, nothing else was logged than `expected`. */
  checkIsolated(expectedLogs: number): void {
    assert.equal(this.logged.length, expectedLogs, `logged: ${Deno.inspect(this.logged)}`);
    assert.equal(this.server.status, "running");
    assert.equal(this.server.connections().length, ECHOERS);
  }

  /** Stops the echoers (each checks its last frames and the clean end), then the server. */
  async close(): Promise<void> {
    try {
      await within(10_000, Promise.all(this.echoers.map((e) => e.stop())), "echoers stop");
    } finally {
      for (const e of this.echoers) closeQuietly(e.conn);
      await this.server.stop("shutdown", { timeout: 1000 });
    }
  }
}

/** The log entry (one `logger.error(...)` call) mentions `conn` and the reason itself. */
function assertLogged(entry: unknown[], conn: Connection<Uint8Array>, reason: unknown): void {
  assert.ok(
    typeof entry[0] === "string" && entry[0].includes(conn.id),
    `the log names the connection: ${Deno.inspect(entry)}`,
  );
  assert.ok(entry.includes(reason), `the log carries the reason: ${Deno.inspect(entry)}`);
}

/** An echo handler (async or plain) that runs `onPacket` on each frame first. */
function echoing(onPacket: (text: string) => void): Handler<Uint8Array> {
  return async function* (): Gen {
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") {
        onPacket(decoder.decode(ev.data));
        ev = yield send(ev.data);
      } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  };
}

// ---- One fault at a time, 50 echoers around it ----------------------------------------------

interface Fault {
  /** The handler of the faulty connection. */
  handler: () => Handler<Uint8Array>;
  /** Provoke the fault; resolves once it has been provoked. */
  provoke(conn: Connection<Uint8Array>, peer: Peer, bench: Bench): Promise<void>;
  /** The close reason it must end with. */
  reason: (reason: unknown) => void;
  /** Frames the peer must have received before the end. */
  frames?: string[];
  /** Whether the handler's finally must have run by the time `closed` resolves. */
  finallyRuns?: boolean;
}

const connectBoom = new Error("boom on connect");
const packetBoom = new Error("boom on packet");
const finallyBoom = new Error("boom in finally");
const shutdownBoom = new Error("boom on shutdown");
let finallyRan = 0;

function isError(expected: Error): (reason: unknown) => void {
  return (reason) => assert.equal(reason, expected);
}

function isProtocolError(pattern: RegExp): (reason: unknown) => void {
  return (reason) => {
    assert.ok(reason instanceof ProtocolError, `expected a ProtocolError, got ${reason}`);
    assert.match(reason.message, pattern);
  };
}

const nothing = () => Promise.resolve();

/** Something that is not an action, typed as one so that a handler can yield it. */
const junk = (value: unknown) => value as Action;

const faults: Record<string, Fault> = {
  "throws on connect, before its first yield (async function*)": {
    handler: () =>
      // deno-lint-ignore require-yield
      async function* (): Gen {
        try {
          throw connectBoom;
        } finally {
          finallyRan++;
        }
      },
    provoke: nothing,
    reason: isError(connectBoom),
    finallyRuns: true,
  },
  "throws on connect, before its first yield (function*)": {
    handler: () =>
      // deno-lint-ignore require-yield
      function* (): SyncGen {
        throw connectBoom;
      },
    provoke: nothing,
    reason: isError(connectBoom),
  },
  "throws when called, before making a generator": {
    handler: () => () => {
      throw connectBoom;
    },
    provoke: nothing,
    reason: isError(connectBoom),
  },
  "throws on a packet (async function*)": {
    handler: () =>
      echoing((text) => {
        if (text === "boom") throw packetBoom;
      }),
    async provoke(_conn, peer) {
      await peer.send("one");
      await peer.send("boom");
      await peer.send("never echoed");
    },
    reason: isError(packetBoom),
    frames: ["one"],
  },
  "throws on a packet (function*)": {
    handler: () =>
      function* (): SyncGen {
        let ev = yield;
        for (;;) {
          if (ev.type === "packet") {
            if (decoder.decode(ev.data) === "boom") throw packetBoom;
            ev = yield send(ev.data);
          } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
          else ev = yield;
        }
      },
    async provoke(_conn, peer) {
      await peer.send("one");
      await peer.send("boom");
    },
    reason: isError(packetBoom),
    frames: ["one"],
  },
  "throws in finally, after returning on a packet": {
    handler: () =>
      async function* (): Gen {
        try {
          let ev = yield;
          for (;;) {
            if (ev.type === "packet" && decoder.decode(ev.data) === "bye") return;
            ev = ev.type === "packet" ? yield send(ev.data) : yield;
          }
        } finally {
          // deno-lint-ignore no-unsafe-finally
          throw finallyBoom;
        }
      },
    async provoke(_conn, peer) {
      await peer.send("one");
      await peer.send("bye");
    },
    reason: isError(finallyBoom),
    frames: ["one"],
  },
  "throws in finally, after returning on shutdown (conn.stop)": {
    handler: () =>
      async function* (): Gen {
        try {
          let ev = yield;
          while (ev.type !== "shutdown") ev = ev.type === "packet" ? yield send(ev.data) : yield;
        } finally {
          // deno-lint-ignore no-unsafe-finally
          throw finallyBoom;
        }
      },
    async provoke(conn, peer) {
      await peer.send("one");
      while (peer.frames.length < 1) await pause(2);
      await conn.stop("maintenance", { timeout: 2000 });
    },
    reason: isError(finallyBoom),
    frames: ["one"],
  },
  "throws in finally, run by the driver when a stop is forced": {
    handler: () =>
      async function* (): Gen {
        try {
          for (;;) yield; // ignores shutdown: forced after the timeout
        } finally {
          // deno-lint-ignore no-unsafe-finally
          throw finallyBoom;
        }
      },
    provoke: (conn) => conn.stop("maintenance", { timeout: 100 }),
    reason: isError(finallyBoom),
  },
  "throws in finally, run by the driver after yielding garbage": {
    handler: () =>
      async function* (): Gen {
        try {
          yield junk(42);
        } finally {
          // deno-lint-ignore no-unsafe-finally
          throw finallyBoom;
        }
      },
    provoke: nothing,
    reason: isError(finallyBoom),
  },
  "throws on shutdown": {
    handler: () =>
      async function* (): Gen {
        let ev = yield;
        for (;;) {
          if (ev.type === "shutdown") throw shutdownBoom;
          ev = ev.type === "packet" ? yield send(ev.data) : yield;
        }
      },
    async provoke(conn, peer) {
      await peer.send("one");
      while (peer.frames.length < 1) await pause(2);
      await conn.stop("maintenance", { timeout: 2000 });
    },
    reason: isError(shutdownBoom),
    frames: ["one"],
  },
  "yields a number": {
    handler: () =>
      async function* (): Gen {
        try {
          yield junk(42);
        } finally {
          finallyRan++;
        }
      },
    provoke: nothing,
    reason: isProtocolError(/not an action: 42/),
    finallyRuns: true,
  },
  "yields null": {
    handler: () =>
      async function* (): Gen {
        yield junk(null);
      },
    provoke: nothing,
    reason: isProtocolError(/not an action/),
  },
  "yields an object of an unknown type, on a packet": {
    handler: () =>
      async function* (): Gen {
        yield;
        yield junk({ type: "teleport", to: "mars" });
      },
    provoke: (_conn, peer) => peer.send("go"),
    reason: isProtocolError(/not an action.*teleport/),
  },
  "yields an array with garbage after a send (the send still goes out)": {
    handler: () =>
      async function* (): Gen {
        yield junk([send("before"), "junk"]);
      },
    provoke: nothing,
    reason: isProtocolError(/not an action: junk/),
    frames: ["before"],
  },
  "yields a string (function*)": {
    handler: () =>
      function* (): SyncGen {
        yield junk("send");
      },
    provoke: nothing,
    reason: isProtocolError(/not an action: send/),
  },
  "yields setTimeout with a non-number": {
    handler: () =>
      async function* (): Gen {
        // Built by hand (actions are plain data): the setTimeout() helper would throw first.
        yield { type: "setTimeout", ms: "soon" as unknown as number };
      },
    provoke: nothing,
    reason: isProtocolError(/setTimeout/),
  },
  "yields a named setTimeout with NaN": {
    handler: () =>
      async function* (): Gen {
        yield { type: "setTimeout", ms: NaN, name: "tick" };
      },
    provoke: nothing,
    reason: isProtocolError(/setTimeout/),
  },
  "yields send of data the framing cannot encode": {
    handler: () =>
      async function* (): Gen {
        yield send({ not: "bytes" });
      },
    provoke: nothing,
    reason: (reason) => {
      assert.ok(reason instanceof TypeError, `expected a TypeError, got ${reason}`);
      assert.match(reason.message, /cannot send object/);
    },
  },
  "returns something that is not a generator": {
    handler: () => (() => ({ hello: "world" })) as unknown as Handler<Uint8Array>,
    provoke: nothing,
    reason: isProtocolError(/not a generator/),
  },
};

for (const [name, fault] of Object.entries(faults)) {
  Deno.test(`handler fault: ${name}: only its connection ends, logged once; 50 others echo on`, async () => {
    const bench = await Bench.start();
    let peer: Peer | undefined;
    try {
      await bench.progress(5, "before the fault");
      const ranBefore = finallyRan;
      const opened = await bench.openFault(fault.handler());
      peer = opened.peer;
      const { conn } = opened;
      const provoked = fault.provoke(conn, peer, bench);
      const reason = await within(5000, conn.closed, "the faulty connection's close");
      await within(5000, provoked, "provoking the fault");
      fault.reason(reason);
      if (fault.finallyRuns) assert.equal(finallyRan, ranBefore + 1, "its finally ran");
      assert.ok(["eof", "ConnectionReset"].includes(await within(3000, peer.ended)));
      assert.deepEqual(peer.frames, fault.frames ?? []);
      // Its calls and syncs fail with the reason, at once.
      const err = await conn.call("anyone?").catch((e) => e);
      assert.ok(err instanceof ConnectionClosed && err.reason === reason);
      await bench.progress(5, "after the fault");
      bench.checkIsolated(1);
      assertLogged(bench.logged[0], conn, reason);
    } finally {
      peer?.close();
      await bench.close();
    }
    assert.equal(bench.logged.length, 1, `nothing else was logged: ${Deno.inspect(bench.logged)}`);
  });
}

// ---- Stuck handlers ---------------------------------------------------------------------------

Deno.test("handler fault: stuck in an await on a packet: ended by conn.stop's timeout; 50 echo on", async () => {
  const bench = await Bench.start();
  const never = Promise.withResolvers<void>(); // settled only at the end, to let it unwind
  const stuck = Promise.withResolvers<void>();
  let unwound = false;
  let peer: Peer | undefined;
  try {
    await bench.progress(5, "before the fault");
    const opened = await bench.openFault(async function* (): Gen {
      try {
        let ev = yield;
        for (;;) {
          if (ev.type === "packet" && decoder.decode(ev.data) === "hang") {
            stuck.resolve();
            await never.promise; // stuck: no event can reach it now
          }
          ev = ev.type === "packet" ? yield send(ev.data) : yield;
        }
      } finally {
        unwound = true;
      }
    });
    peer = opened.peer;
    const { conn } = opened;
    await peer.send("one");
    await peer.send("hang");
    await within(3000, stuck.promise, "the handler got stuck");
    // Events pile up in its mailbox, nothing happens to anyone else.
    conn.cast("ignored");
    const call = conn.call("ignored too", { timeout: 10_000 }).catch((e) => e);
    await bench.progress(10, "while it is stuck");
    assert.equal(bench.logged.length, 0);

    const started = performance.now();
    const stopping = conn.stop("unstick", { timeout: 200 });
    await bench.progress(5, "while its stop waits for the timeout");
    await within(3000, stopping, "conn.stop");
    const took = performance.now() - started;
    assert.ok(took >= 190 && took < 2000, `forced after the timeout (${took} ms)`);
    assert.equal(await conn.closed, "unstick");
    const err = await within(1000, call);
    assert.ok(err instanceof ConnectionClosed && err.reason === "unstick", `call: ${err}`);
    assert.equal(await within(3000, peer.ended), "eof");
    assert.deepEqual(peer.frames, ["one"]);
    assert.equal(unwound, false, "its finally cannot run while it is stuck in the await");

    await bench.progress(5, "after the fault");
    bench.checkIsolated(1);
    assertLogged(bench.logged[0], conn, "unstick");
  } finally {
    peer?.close();
    // The await settles at last: the dropped generator unwinds (its finally runs), harmlessly.
    never.resolve();
    await within(
      1000,
      (async () => {
        while (!unwound) await pause(2);
      })(),
    );
    await bench.close();
  }
  assert.equal(bench.logged.length, 1, `nothing else was logged: ${Deno.inspect(bench.logged)}`);
});

Deno.test("handler fault: stuck before its first yield: ended by conn.stop's timeout; 50 echo on", async () => {
  const bench = await Bench.start();
  const never = Promise.withResolvers<void>();
  let peer: Peer | undefined;
  try {
    const opened = await bench.openFault(async function* (): Gen {
      await never.promise;
      yield send("late");
    });
    peer = opened.peer;
    const { conn } = opened;
    await peer.send("unheard");
    await bench.progress(5, "while it is stuck");
    await within(3000, conn.stop({ why: "stuck" }, { timeout: 100 }), "conn.stop");
    assert.deepEqual(await conn.closed, { why: "stuck" });
    assert.equal(await within(3000, peer.ended), "eof");
    assert.deepEqual(peer.frames, []);
    await bench.progress(5, "after the fault");
    bench.checkIsolated(1);
    assertLogged(bench.logged[0], conn, await conn.closed);
  } finally {
    peer?.close();
    never.resolve();
    await pause(10); // let the unwound generator finish
    await bench.close();
  }
  assert.equal(bench.logged.length, 1);
});

// ---- All at once -----------------------------------------------------------------------------

Deno.test("handler faults: all at once, with 50 echoers; then server.stop forces a stuck one", async () => {
  const bench = await Bench.start();
  const never = Promise.withResolvers<void>();
  const peers: Peer[] = [];
  const conns: Array<{ name: string; conn: Connection<Uint8Array>; fault: Fault }> = [];
  try {
    await bench.progress(5, "before the faults");
    // Every quick fault (the ones a peer or a conn.stop provokes) on its own connection.
    for (const [name, fault] of Object.entries(faults)) {
      const { conn, peer } = await bench.openFault(fault.handler());
      peers.push(peer);
      conns.push({ name, conn, fault });
    }
    // And one stuck for good: it is left to the server's stop.
    const stuck = Promise.withResolvers<void>();
    const { conn: stuckConn, peer: stuckPeer } = await bench.openFault(async function* (): Gen {
      const ev = yield;
      if (ev.type === "packet") {
        stuck.resolve();
        await never.promise;
      }
    });
    peers.push(stuckPeer);
    await stuckPeer.send("hang");
    await within(3000, stuck.promise);

    await within(
      10_000,
      Promise.all(conns.map(({ conn, fault }, i) => fault.provoke(conn, peers[i], bench))),
      "provoking every fault",
    );
    for (const { name, conn, fault } of conns) {
      const reason = await within(5000, conn.closed, `${name}: close`);
      fault.reason(reason);
    }
    await bench.progress(10, "after the faults");
    assert.equal(bench.logged.length, conns.length, Deno.inspect(bench.logged));
    for (const { conn } of conns) {
      const entries = bench.logged.filter((e) => String(e[0]).includes(`${conn.id} `));
      assert.equal(entries.length, 1, `${conn.id}: logged once`);
    }
    assert.equal(bench.server.connections().length, ECHOERS + 1);

    // The echoers leave cleanly; the stuck one is forced by the server's stop.
    await within(10_000, Promise.all(bench.echoers.map((e) => e.stop())), "echoers stop");
    const started = performance.now();
    await within(5000, bench.server.stop("closing time", { timeout: 200 }), "server.stop");
    assert.ok(performance.now() - started >= 190, "it waited for the stuck handler");
    assert.equal(await stuckConn.closed, "closing time");
    assert.equal(await within(3000, stuckPeer.ended), "eof");
    assert.equal(bench.logged.length, conns.length + 1, "the forced one is logged, once");
    assertLogged(bench.logged[conns.length], stuckConn, "closing time");
    assert.equal(bench.server.status, "stopped");
  } finally {
    for (const peer of peers) peer.close();
    never.resolve();
    await pause(10);
    await bench.close();
  }
});
