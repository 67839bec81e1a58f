// Peer faults: a peer that resets or closes mid-frame, one that half-closes with replies still
// to come back, one that connects and stays silent (or trickles a frame it never finishes), a
// flood of connections past `maxConnections`, and a peer that never reads while the server
// sends. Each fault ends only its own connection (busy peers on the same server keep echoing),
// within bounded time, with memory bounded. Loopback TCP, port 0.

import assert from "node:assert/strict";
import {
  type Connection,
  ConnectionClosed,
  type Event,
  lengthPrefixed,
  send,
  serve,
  type Server,
  setTimeout as arm,
  stop,
  tcp,
  type Yielded,
} from "../../mod.ts";
import { echo } from "../../examples/echo_server.ts";
import {
  BusyPeer,
  capturingLogger,
  HOST,
  Inbox,
  MIN_PAYLOAD,
  pause,
  payload,
  portOf,
  RawFrames,
  recordingServer,
  SequenceChecker,
  wireOf,
  within,
  wrapped,
  writeAll,
} from "./_support.ts";

type Gen = AsyncGenerator<Yielded, void, Event<Uint8Array>>;

/** Open `n` busy peers and wait until each has done a round trip. */
async function busyPeers(port: number, n: number, firstId = 1000): Promise<BusyPeer[]> {
  const peers: BusyPeer[] = [];
  for (let i = 0; i < n; i++) peers.push(await BusyPeer.open(port, firstId + i));
  await within(5000, Promise.all(peers.map((p) => p.progress(1))), "busy peers' first echoes");
  return peers;
}

/** Each peer still echoing: `n` more round trips each; then stop them (all must say "stopped"). */
async function stillEchoing(peers: BusyPeer[], n = 20): Promise<void> {
  await within(10_000, Promise.all(peers.map((p) => p.progress(n))), "busy peers echoing on");
  for (const p of peers) assert.ok(p.rounds > n, `peer ${p.id}: ${p.rounds} round trips`);
}

async function stopAll(peers: BusyPeer[]): Promise<void> {
  const ends = await within(5000, Promise.all(peers.map((p) => p.stop())), "stopping busy peers");
  assert.deepEqual(ends, peers.map(() => "stopped"), "a busy peer was cut off");
}

// ---- Reset or close mid-frame -------------------------------------------------------------

for (const how of ["close", "reset"] as const) {
  Deno.test(`mid-frame ${how === "close" ? "close (FIN)" : "reset (RST)"}: that connection ends with disconnect, the partial frame is never delivered; 10 busy peers unaffected`, async () => {
    const logger = capturingLogger();
    await using s = await recordingServer({ logger }, { echo: true });
    const peers = await busyPeers(s.port, 10);
    try {
      for (let round = 0; round < 5; round++) {
        const faulty = await Deno.connect({ hostname: HOST, port: s.port });
        const session = await s.sessionFor((faulty.localAddr as Deno.NetAddr).port);
        // Two whole frames, then half of a third.
        const whole = [payload(7, 0, 100), payload(7, 1, MIN_PAYLOAD)];
        const third = wireOf([payload(7, 2, 5000)]);
        await writeAll(faulty, wireOf(whole));
        if (how === "reset") {
          // Let the echoes arrive unread: closing with unread data makes the kernel send RST.
          const frames = new RawFrames(faulty);
          assert.ok(await within(3000, frames.next()));
          await writeAll(faulty, wireOf([payload(7, 9, 60_000)])); // its echo stays unread
          await within(3000, session.conn.sendSync(new Uint8Array(10)), "bytes for the peer");
          whole.push(payload(7, 9, 60_000));
        }
        await writeAll(faulty, third.subarray(0, 2500));
        faulty.close();
        assert.equal(await within(3000, session.end, "the faulty session's end"), "disconnect");
        assert.equal(await session.conn.closed, "normal");
        assert.deepEqual(session.events, [...whole.map(() => "packet"), "disconnect"]);
        assert.equal(session.got.length, whole.length);
        // (Deno reports a reset on read as the end of the stream: no error either way.)
        await stillEchoing(peers, 10);
      }
      assert.equal(s.server.connections().length, peers.length);
    } finally {
      await stopAll(peers);
    }
    assert.deepEqual(logger.calls, []);
  });
}

// ---- Half-close ---------------------------------------------------------------------------

Deno.test("half-close: the peer's closeWrite with 500 replies still to come: every reply arrives, then the server ends normally", async () => {
  const logger = capturingLogger();
  const conns = new Inbox<Connection<Uint8Array>>();
  // Replies only once the peer has said it is done (disconnect): 50 per step, each step
  // arming a 0 ms timer for the next (no event would come otherwise), the last one stopping.
  const server = await serve(async function* (conn: Connection<Uint8Array>): Gen {
    conns.push(conn);
    const got: Uint8Array[] = [];
    let at = 0;
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") got.push(ev.data);
      else if (ev.type === "disconnect" || (ev.type === "timeout" && ev.name === "more")) {
        assert.ok(ev.type !== "disconnect" || ev.error === undefined);
        await pause(0); // and an await between steps, for good measure
        const batch = got.slice(at, at += 50).map((p) => send(p));
        if (at >= got.length) {
          yield [...batch, stop()];
          return;
        }
        ev = yield [...batch, arm(0, "more")];
        continue;
      } else if (ev.type === "shutdown") return;
      ev = yield;
    }
  }, { hostname: HOST, port: 0, framing: lengthPrefixed(4), logger });
  try {
    const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
    try {
      const N = 500;
      const sent = Array.from({ length: N }, (_, i) => payload(3, i, MIN_PAYLOAD + (i % 500)));
      await writeAll(peer, wireOf(sent));
      await peer.closeWrite();
      const checker = new SequenceChecker();
      const frames = new RawFrames(peer);
      assert.equal(await within(5000, frames.rest((p) => void checker.see(p, "reply"))), "eof");
      assert.equal(checker.count(3), N);
      assert.equal(await within(3000, (await conns.next()).closed), "normal");
    } finally {
      peer.close();
    }
  } finally {
    await server.stop();
  }
  assert.deepEqual(logger.calls, []);
});

Deno.test("half-close through the echo example: all echoes arrive after the peer's closeWrite, then end of stream", async () => {
  const server = await serve(echo, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
  });
  try {
    const peer = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
    try {
      const N = 2000;
      const sent = Array.from({ length: N }, (_, i) => payload(4, i, MIN_PAYLOAD + (i % 300)));
      const checker = new SequenceChecker();
      const reading = new RawFrames(peer).rest((p) => void checker.see(p, "echo"));
      await writeAll(peer, wireOf(sent));
      await peer.closeWrite();
      assert.equal(await within(5000, reading), "eof");
      assert.equal(checker.count(4), N);
    } finally {
      peer.close();
    }
  } finally {
    await server.stop();
  }
});

// ---- Slowloris: idleTimeout -----------------------------------------------------------------

/** A raw peer that reads until the end; resolves with when that came (ms since `t0`). */
function endOf(conn: Deno.TcpConn, t0: number): Promise<number> {
  return (async () => {
    const buf = new Uint8Array(1024);
    try {
      while (await conn.read(buf) !== null) { /* discard */ }
    } catch { /* reset: the end too */ }
    return performance.now() - t0;
  })();
}

Deno.test("slowloris: idleTimeout ends a silent peer and one trickling a frame it never finishes, in bounded time; a busy peer on the same server is not ended", async () => {
  const IDLE = 300, SHUTDOWN = 200;
  const logger = capturingLogger();
  await using s = await recordingServer(
    { logger, idleTimeout: IDLE, shutdownTimeout: SHUTDOWN },
    { echo: true },
  );
  const [busy] = await busyPeers(s.port, 1);
  const t0 = performance.now();
  const silent = await Deno.connect({ hostname: HOST, port: s.port });
  const trickler = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    const silentEnd = endOf(silent, t0);
    const tricklerEnd = endOf(trickler, t0);
    // The header of a 65536-byte frame, then a byte of it every 30 ms: bytes keep coming, no
    // frame (no event) ever does.
    let tricklerDone = false;
    tricklerEnd.then(() => tricklerDone = true);
    const trickling = (async () => {
      try {
        await writeAll(trickler, new Uint8Array([0, 1, 0, 0]));
        while (!tricklerDone) {
          await pause(30); // the slow peer's pace (load, not synchronisation)
          if (!tricklerDone) await writeAll(trickler, new Uint8Array([42]));
        }
      } catch { /* the server closed it */ }
    })();
    const [silentAt, tricklerAt] = await within(
      5000,
      Promise.all([silentEnd, tricklerEnd]),
      "the idle peers' end",
    );
    await trickling;
    for (const at of [silentAt, tricklerAt]) {
      assert.ok(at >= IDLE - 20, `ended after ${at.toFixed(0)} ms, before idleTimeout`);
      assert.ok(at < IDLE + SHUTDOWN + 1500, `ended only after ${at.toFixed(0)} ms`);
    }
    // Their handlers were asked to shut down ("idle") and returned: no packet, no force.
    for (const conn of [silent, trickler]) {
      const session = s.byPort.get((conn.localAddr as Deno.NetAddr).port)!;
      assert.deepEqual(session.events, ["shutdown"]);
      assert.equal(await session.conn.closed, "normal");
    }
    // The busy peer echoes on past several idle periods.
    const until = t0 + 3 * IDLE;
    while (performance.now() < until) await within(3000, busy.progress(50));
    assert.equal(s.server.connections().length, 1);
  } finally {
    silent.close();
    trickler.close();
    await stopAll([busy]);
  }
  assert.deepEqual(logger.calls, []);
});

Deno.test("slowloris: a silent peer whose handler ignores the idle shutdown is forced after shutdownTimeout", async () => {
  const IDLE = 150, SHUTDOWN = 150;
  const logger = capturingLogger();
  await using s = await recordingServer(
    { logger, idleTimeout: IDLE, shutdownTimeout: SHUTDOWN },
    { echo: true, ignoreShutdown: true },
  );
  const t0 = performance.now();
  const silent = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    const at = await within(5000, endOf(silent, t0), "the silent peer's end");
    assert.ok(at >= IDLE + SHUTDOWN - 20, `forced after ${at.toFixed(0)} ms`);
    assert.ok(at < IDLE + SHUTDOWN + 1500, `forced only after ${at.toFixed(0)} ms`);
    const session = await s.sessions.next();
    assert.equal(await session.end, "finally");
    assert.equal(await session.conn.closed, "idle");
  } finally {
    silent.close();
  }
});

// ---- A flood past maxConnections ----------------------------------------------------------

Deno.test("flood: 100 peers at once against maxConnections 20: the limit holds at every accept, all 100 are served, nothing logged", async () => {
  const LIMIT = 20, PEERS = 100;
  const logger = capturingLogger();
  const ref: { server?: Server<Uint8Array> } = {};
  let most = 0;
  let started = 0;
  const full = Promise.withResolvers<void>();
  await using s = await recordingServer({ logger, maxConnections: LIMIT }, {
    echo: true,
    onStart: () => {
      // The count only grows here: sampling at every start sees its every maximum.
      const live = ref.server!.connections().length;
      most = Math.max(most, live);
      started++;
      if (live === LIMIT) full.resolve();
    },
  });
  const server = ref.server = s.server;
  const client = async (id: number): Promise<void> => {
    const conn = await Deno.connect({ hostname: HOST, port: s.port });
    try {
      const sent = payload(id, 0, MIN_PAYLOAD + id);
      await writeAll(conn, wireOf([sent]));
      const frames = new RawFrames(conn);
      const echoed = await frames.next();
      assert.ok(echoed, `peer ${id}: no echo`);
      assert.deepEqual(echoed, sent);
      // Stay until the server has been full once, so that the limit is really exercised.
      await full.promise;
    } finally {
      conn.close();
    }
  };
  await within(15_000, Promise.all(Array.from({ length: PEERS }, (_, i) => client(i))), "flood");
  assert.equal(most, LIMIT, `at most ${most} live connections`);
  assert.equal(started, PEERS);
  assert.equal(server.acceptors()[0].accepted, PEERS);
  assert.equal(server.status, "running");
  // All end (the peers closed): the server is empty, and serves a new peer at once.
  const [late] = await busyPeers(s.port, 1);
  await stillEchoing([late], 5);
  await stopAll([late]);
  assert.deepEqual(logger.calls, []);
});

/** What the kernel may hold for a peer that does not read: a full send buffer, a receive one. */
function kernelBuffers(): number {
  try {
    const max = (file: string, field: number) =>
      Number(Deno.readTextFileSync(`/proc/sys/net/ipv4/${file}`).trim().split(/\s+/)[field]);
    return max("tcp_wmem", 2) + max("tcp_rmem", 1);
  } catch {
    return 8 * 1024 * 1024; // not Linux: a generous guess
  }
}

// ---- A peer that never reads ----------------------------------------------------------------

/**
 * A handler that sends `chunk` bytes and arms a 0 ms named timer to send again, for ever: a
 * producer that only the write high-water mark can hold back. It returns on shutdown.
 */
function firehose(
  chunk: number,
  sent: { bytes: number; steps: number },
  conns: Inbox<Connection<Uint8Array>>,
) {
  const data = new Uint8Array(chunk);
  return async function* (conn: Connection<Uint8Array>): Gen {
    conns.push(conn);
    let ev = yield;
    for (;;) {
      if (ev.type === "cast" || (ev.type === "timeout" && ev.name === "more")) {
        sent.bytes += chunk;
        sent.steps++;
        ev = yield [send(data), arm(0, "more")];
      } else if (ev.type === "shutdown" || ev.type === "disconnect") {
        return;
      } else {
        ev = yield;
      }
    }
  };
}

Deno.test("a peer that never reads: the sending handler is held back with bounded output, other peers echo on, and stop({ timeout }) ends it on time", async () => {
  const logger = capturingLogger();
  const io = wrapped(tcp());
  const sent = { bytes: 0, steps: 0 };
  const conns = new Inbox<Connection<Uint8Array>>();
  const CHUNK = 256 * 1024;
  // One server: the first connection is the firehose; later ones echo.
  let first = true;
  const fire = firehose(CHUNK, sent, conns);
  const server = await serve(
    (conn: Connection<Uint8Array>) => {
      if (!first) return echo() as Gen;
      first = false;
      return fire(conn);
    },
    {
      hostname: HOST,
      port: 0,
      transport: io.transport,
      framing: lengthPrefixed(4, { maxLength: CHUNK }),
      logger,
    },
  );
  const port = portOf(server.addr);
  const deaf = await Deno.connect({ hostname: HOST, port }); // never reads
  let stopped = false;
  try {
    const conn = await conns.next();
    const peers = await busyPeers(port, 5);
    conn.cast("go");
    await within(10_000, io.stalled, "the server's socket filling up");
    // Once it is held back (the socket full and 1 MB pending: a few more steps), give the
    // handler every chance to (wrongly) go on: the busy peers do many round trips meanwhile.
    await stillEchoing(peers, 100);
    await pause(50);
    const before = { ...sent };
    await stillEchoing(peers, 200);
    await pause(100);
    assert.equal(
      sent.steps,
      before.steps,
      "the handler went on sending to a peer that does not read",
    );
    // What it produced is bounded by the kernel's socket buffers plus the driver's 1 MB
    // high-water mark and a step's output (unbounded, it makes hundreds of MB a second).
    const bound = 2 * kernelBuffers() + 1024 * 1024 + 2 * CHUNK;
    assert.ok(sent.bytes <= bound, `${sent.bytes} bytes produced (bound ${bound})`);
    // An outside sendSync waits behind it all; stop ends everything on time.
    const sync = conn.sendSync(new Uint8Array(8)).then(() => "resolved", (err) => err);
    const t0 = performance.now();
    await within(5000, server.stop("enough", { timeout: 200 }), "stop");
    stopped = true;
    const took = performance.now() - t0;
    assert.ok(took >= 190 && took < 1500, `stop took ${took.toFixed(0)} ms`);
    const syncEnd = await sync;
    assert.ok(syncEnd instanceof ConnectionClosed, `the pending sendSync: ${syncEnd}`);
    assert.equal(await conn.closed, "enough");
    const ends = await Promise.all(peers.map((p) => p.stop()));
    for (const end of ends) assert.notEqual(end, "reset");
    // The forced one is logged (it did not finish in time); nothing else is.
    assert.equal(logger.calls.length, 1, `logged: ${logger.calls.map(String)}`);
  } finally {
    deaf.close();
    if (!stopped) await server.stop("cleanup", { timeout: 0 });
  }
});

Deno.test("a peer that never reads, output pending below the high-water mark, handler returns on shutdown: stop({ timeout }) still ends it at the timeout", async () => {
  const logger = capturingLogger();
  const io = wrapped(tcp());
  const conns = new Inbox<Connection<Uint8Array>>();
  const CHUNK = 128 * 1024;
  const data = new Uint8Array(CHUNK);
  const shutdownSeen = Promise.withResolvers<void>();
  const server = await serve(async function* (conn: Connection<Uint8Array>): Gen {
    conns.push(conn);
    let ev = yield;
    for (;;) {
      if (ev.type === "cast") ev = yield send(data);
      else if (ev.type === "shutdown") {
        shutdownSeen.resolve();
        return; // with output still pending for a peer that does not read
      } else if (ev.type === "disconnect") return;
      else ev = yield;
    }
  }, {
    hostname: HOST,
    port: 0,
    transport: io.transport,
    framing: lengthPrefixed(4, { maxLength: CHUNK }),
    logger,
  });
  const deaf = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  try {
    const conn = await conns.next();
    // One chunk at a time until the socket is full, then one more: output is pending, but
    // less than the 1 MB high-water mark, so the handler still takes events.
    while (io.accepted[0].partialWrites === 0) {
      conn.cast("more");
      const written = conn.sendSync(new Uint8Array(1)).then(() => {}, () => {});
      await within(3000, Promise.race([io.stalled, written]), "filling the socket");
    }
    conn.cast("more");
    const t0 = performance.now();
    await within(10_000, server.stop("enough", { timeout: 200 }), "stop");
    const took = performance.now() - t0;
    await within(1000, shutdownSeen.promise, "the handler saw shutdown");
    assert.ok(took < 1500, `stop({ timeout: 200 }) took ${took.toFixed(0)} ms`);
  } finally {
    deaf.close();
  }
});

Deno.test("a peer that sends but never reads, against the echo example with idleTimeout: once its output is stuck the connection is ended in bounded time; a busy peer is not", async () => {
  const IDLE = 300, SHUTDOWN = 200;
  const logger = capturingLogger();
  const io = wrapped(tcp());
  const server = await serve(echo, {
    hostname: HOST,
    port: 0,
    transport: io.transport,
    framing: lengthPrefixed(4),
    idleTimeout: IDLE,
    shutdownTimeout: SHUTDOWN,
    logger,
  });
  const port = portOf(server.addr);
  const deaf = await Deno.connect({ hostname: HOST, port });
  try {
    const [busy] = await busyPeers(port, 1);
    // The deaf peer writes 1 kB frames, 64 to a write, until its writes fail (the server
    // ended it): the server's handler is held with frames still in its mailbox.
    const frame = wireOf(Array.from({ length: 64 }, () => new Uint8Array(1024)));
    const writing = (async () => {
      try {
        for (;;) await writeAll(deaf, frame);
      } catch { /* the server closed the connection */ }
      return performance.now();
    })();
    await within(10_000, io.stalled, "the echoes filling the server's socket");
    const [stuck] = server.connections().filter((c) =>
      portOf(c.remoteAddr) === portOf(deaf.localAddr)
    );
    const t0 = performance.now();
    const ended = await within(5000, writing, "the stuck connection's end");
    assert.ok(ended - t0 < IDLE + SHUTDOWN + 1500, `ended ${(ended - t0).toFixed(0)} ms later`);
    assert.equal(await stuck.closed, "idle", "ended by the idle timeout (forced: it was held)");
    await stillEchoing([busy], 20);
    assert.equal(server.connections().length, 1);
    await stopAll([busy]);
  } finally {
    deaf.close();
    await server.stop();
  }
});
