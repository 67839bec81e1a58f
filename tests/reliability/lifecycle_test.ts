// Lifecycle under load: suspend/resume and stop with 200 busy connections (no connection that
// was accepted ends without a `shutdown`; once stop resolves nothing is left: Deno's sanitizers
// are on), stop with handlers that are slow or refuse to finish, maxConnections lowered and
// raised at the limit, start/stop 10 times in a row on one port, and upgrade while frames flow
// on 50 connections (none lost or duplicated, the new code's tag on later replies). Loopback
// TCP, port 0 (or a port first found free that way).

import assert from "node:assert/strict";
import {
  type Connection,
  type Event,
  hibernate,
  lengthPrefixed,
  send,
  serve,
  type Server,
  type Yielded,
} from "../../mod.ts";
import { echo } from "../../examples/echo_server.ts";
import {
  assertRefused,
  BusyPeer,
  capturingLogger,
  closeQuietly,
  HOST,
  openBusyPeers,
  pause,
  portOf,
  RawFrames,
  recordingServer,
  type Session,
  verify,
  wireOf,
  within,
  writeAll,
} from "./_support.ts";

type Gen = AsyncGenerator<Yielded, void, Event<Uint8Array>>;

const openPeers = openBusyPeers;

/** Each of `peers` does `n` more round trips (a marker: meanwhile, others had every chance). */
async function progress(peers: BusyPeer[], n: number, what = "busy peers"): Promise<void> {
  await within(20_000, Promise.all(peers.map((p) => p.progress(n))), what);
}

// ---- suspend / resume / stop with 200 busy connections -----------------------------------

Deno.test("200 busy connections: suspend keeps them echoing and new peers waiting, resume serves those, stop gives every accepted connection shutdown and leaves nothing behind", async () => {
  const logger = capturingLogger();
  const sessions: Session[] = [];
  await using s = await recordingServer({ logger, shutdownTimeout: 5000 }, {
    echo: true,
    keepPackets: false,
    onStart: (session) => sessions.push(session),
  });
  const busy = await openPeers(s.port, 200, 0);
  let late: BusyPeer[] = [];
  try {
    await progress(busy, 5, "the 200 peers' first echoes");
    assert.equal(s.server.connections().length, 200);

    s.server.suspend(); // while all 200 are busy
    await progress(busy, 10, "busy peers, just suspended");
    // New peers connect (the backlog) while the others echo on, but are not served.
    late = await within(5000, openPeers(s.port, 20, 1000), "connecting while suspended");
    await progress(busy, 30, "busy peers while suspended");
    await pause(20); // and a moment more for the server to (wrongly) serve the late ones
    assert.ok(late.every((p) => p.rounds === 0), "a peer was served while suspended");
    assert.equal(s.server.connections().length, 200);
    assert.equal(sessions.length, 200);

    s.server.resume();
    await progress(late, 5, "the late peers, after resume");
    assert.equal(s.server.connections().length, 220);
    await progress([...busy, ...late], 5, "everyone");

    // Stop while every peer is in the middle of its round trips.
    const conns = s.server.connections();
    const t0 = performance.now();
    await within(10_000, s.server.stop(), "stop");
    assert.ok(performance.now() - t0 < 5000, "stop waited for the force timeout");
    assert.equal(s.server.status, "stopped");
    assert.equal(s.server.connections().length, 0);
    // Every accepted connection got shutdown (not a cut, not a force), and closed normally.
    assert.equal(sessions.length, 220);
    assert.equal(s.server.acceptors()[0].accepted, 220);
    const ends = await Promise.all(sessions.map((x) => x.end));
    assert.deepEqual(ends.filter((e) => e !== "shutdown"), [], "ended without a shutdown");
    for (const conn of conns) assert.equal(await conn.closed, "normal");
    // Every peer sees its connection end (after only correct, in-order echoes).
    const peerEnds = await within(5000, Promise.all([...busy, ...late].map((p) => p.ended)));
    assert.ok(peerEnds.every((e) => e === "eof" || e === "reset"), `${new Set(peerEnds)}`);
    await assertRefused(s.port);
  } finally {
    for (const p of [...busy, ...late]) await p.stop();
  }
  assert.deepEqual(logger.calls, []);
});

Deno.test("stop({ timeout }) with 60 busy connections, a third slow to finish and a third refusing: all get shutdown, the refusers are forced at the timeout with their finally run, nothing is left behind", async () => {
  const logger = capturingLogger();
  const got = new Map<string, string[]>();
  const finallyRan = new Set<string>();
  let n = 0;
  const server = await serve(async function* (conn: Connection<Uint8Array>): Gen {
    const kind = ["prompt", "slow", "refuses"][n++ % 3];
    const events: string[] = [];
    got.set(conn.id, events);
    try {
      let ev = yield;
      for (;;) {
        events.push(ev.type);
        if (ev.type === "packet") ev = yield send(ev.data);
        else if (ev.type === "shutdown" && kind === "prompt") return;
        else if (ev.type === "shutdown" && kind === "slow") {
          await pause(50); // some clean-up work
          return;
        } else if (ev.type === "disconnect") return;
        else ev = yield;
      }
    } finally {
      finallyRan.add(conn.id);
    }
  }, { hostname: HOST, port: 0, framing: lengthPrefixed(4), logger });
  const peers = await openPeers(portOf(server.addr), 60, 0);
  try {
    await progress(peers, 10);
    const conns = server.connections();
    assert.equal(conns.length, 60);
    const t0 = performance.now();
    await within(5000, server.stop("maintenance", { timeout: 300 }), "stop");
    const took = performance.now() - t0;
    assert.ok(took >= 290 && took < 2000, `stop took ${took.toFixed(0)} ms`);
    for (const conn of conns) {
      assert.ok(got.get(conn.id)!.includes("shutdown"), `${conn.id}: no shutdown`);
      assert.ok(finallyRan.has(conn.id), `${conn.id}: finally did not run`);
    }
    const reasons = await Promise.all(conns.map((c) => c.closed));
    assert.equal(reasons.filter((r) => r === "normal").length, 40);
    assert.equal(reasons.filter((r) => r === "maintenance").length, 20, "forced ones");
    assert.equal(logger.calls.length, 20, "each forced connection logged once");
    await within(5000, Promise.all(peers.map((p) => p.ended)));
  } finally {
    for (const p of peers) await p.stop();
  }
});

Deno.test("stop at the limit with 25 more peers waiting: the 5 accepted get shutdown, the waiting ones are closed unserved, nothing is left behind", async () => {
  const logger = capturingLogger();
  const sessions: Session[] = [];
  await using s = await recordingServer({ logger, maxConnections: 5 }, {
    echo: true,
    keepPackets: false,
    onStart: (session) => sessions.push(session),
  });
  const peers = await openPeers(s.port, 30, 0);
  try {
    for (let i = 0; i < 5; i++) await s.sessions.next(5000, "the 5 sessions");
    const served = peers.filter((p) => sessions.some((x) => x.remotePort === p.localPort));
    await progress(served, 10, "the 5 served peers");
    assert.equal(served.length, 5);
    await within(5000, s.server.stop(), "stop");
    assert.equal(sessions.length, 5, "a waiting peer was served during stop");
    const ends = await Promise.all(sessions.map((x) => x.end));
    assert.deepEqual(ends, ["shutdown", "shutdown", "shutdown", "shutdown", "shutdown"]);
    const peerEnds = await within(5000, Promise.all(peers.map((p) => p.ended)));
    assert.ok(peerEnds.every((e) => e === "eof" || e === "reset"), `${new Set(peerEnds)}`);
    for (const p of peers) if (!served.includes(p)) assert.equal(p.rounds, 0);
    await assertRefused(s.port);
  } finally {
    for (const p of peers) await p.stop();
  }
  assert.deepEqual(logger.calls, []);
});

// ---- maxConnections changed at the limit --------------------------------------------------

Deno.test("maxConnections lowered and raised while at the limit: live connections are never cut, waiting peers are served only while there is room, the limit holds at every accept", async () => {
  const logger = capturingLogger();
  const ref: { server?: Server<Uint8Array> } = {};
  const overLimit: string[] = [];
  await using s = await recordingServer({ logger, maxConnections: 10 }, {
    echo: true,
    onStart: () => {
      const live = ref.server!.connections().length;
      if (live > ref.server!.maxConnections) {
        overLimit.push(`${live} live, limit ${ref.server!.maxConnections}`);
      }
    },
  });
  const server = ref.server = s.server;
  const live = await openPeers(s.port, 10, 0);
  const waiting = await openPeers(s.port, 5, 100);
  const stopped: BusyPeer[] = [];
  const served = () => waiting.filter((p) => p.rounds > 0).length;
  // Stop `k` live peers, and wait until the server has seen their connections close.
  const hangUp = async (k: number) => {
    const going = live.splice(0, k);
    const sessions = going.map((p) => s.byPort.get(p.localPort)!);
    for (const p of going) assert.equal(await p.stop(), "stopped");
    stopped.push(...going);
    await within(5000, Promise.all(sessions.map((x) => x.conn.closed)), "the hung-up sessions");
  };
  try {
    await progress(live, 5);
    await progress(live, 20, "live peers at the limit");
    assert.equal(served(), 0, "served past the limit");
    assert.equal(server.connections().length, 10);

    // Lowered below the count: nobody is cut, nobody new is served.
    server.maxConnections = 5;
    await progress(live, 20, "live peers over the lowered limit");
    assert.equal(server.connections().length, 10);
    await hangUp(3); // 7 live, limit 5: still no room
    await progress(live, 20, "7 live peers");
    await pause(20);
    assert.equal(served(), 0, "served with 7 live and a limit of 5");
    await hangUp(3); // 4 live: room for exactly one
    await within(5000, Promise.any(waiting.map((p) => p.progress(1))), "one waiting peer served");
    await progress(live, 20, "4 live peers");
    await pause(20);
    assert.equal(served(), 1, "served past the lowered limit");
    assert.equal(server.connections().length, 5);

    // Raised: every waiting peer is served at once.
    server.maxConnections = 20;
    await progress(waiting, 5, "the waiting peers after the raise");
    assert.equal(server.connections().length, 9);
    assert.deepEqual(overLimit, []);
  } finally {
    for (const p of [...live, ...waiting]) await p.stop();
  }
  assert.deepEqual(logger.calls, []);
});

// ---- Start and stop on the same port ------------------------------------------------------

Deno.test("start/stop 10 times in a row on the same port: each binds at once, serves an echo, and stops; the port is refused after each stop", async () => {
  const first = await serve(echo, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
  });
  const port = portOf(first.addr);
  await first.stop();
  for (let round = 0; round < 10; round++) {
    const server = await serve(echo, {
      hostname: HOST,
      port,
      framing: lengthPrefixed(4),
    });
    try {
      assert.equal(portOf(server.addr), port);
      const peer = await Deno.connect({ hostname: HOST, port });
      try {
        const frames = new RawFrames(peer);
        const sent = new TextEncoder().encode(`round ${round}`);
        await writeAll(peer, wireOf([sent]));
        assert.deepEqual(await within(3000, frames.next()), sent);
        if (round % 2 === 0) {
          // The server closes first (its side of the connection lingers in TIME_WAIT).
          await within(3000, server.stop());
          assert.equal(await within(3000, frames.next()), null);
        } else {
          // The peer closes first.
          peer.close();
          await within(3000, server.stop());
        }
      } finally {
        closeQuietly(peer); // closed above when the peer closes first
      }
    } finally {
      await server.stop();
    }
    assert.equal(server.status, "stopped");
    await assertRefused(port);
  }
});

// ---- upgrade while frames flow ------------------------------------------------------------

/** A reply: the version's tag byte, then the frame as it came. */
function tagged(tag: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(1 + data.length);
  out[0] = tag;
  out.set(data, 1);
  return out;
}

Deno.test("upgrade while frames flow on 50 connections (some hibernated, some live): no frame lost or duplicated, every connection switches, later replies carry the new tag", async () => {
  const logger = capturingLogger();
  const starts = { v1: 0, v2: 0, codeChanged: 0 };
  // v1 hibernates after every other frame, and on `upgrade` (to switch at its next wake).
  const v1 = async function* (_conn: Connection<Uint8Array>, state?: { n: number }): Gen {
    starts.v1++;
    let n = state?.n ?? 0;
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") {
        n++;
        if (n % 2 === 0) {
          yield [send(tagged(1, ev.data)), hibernate({ n })];
          return; // not reached: hibernate drops the generator
        }
        ev = yield send(tagged(1, ev.data));
      } else if (ev.type === "upgrade") {
        yield hibernate({ n });
        return;
      } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  };
  const v2 = async function* (
    _conn: Connection<Uint8Array>,
    state?: { n: number; changed?: boolean },
  ): Gen {
    starts.v2++;
    if (state?.changed) starts.codeChanged++;
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") ev = yield send(tagged(2, ev.data));
      else if (ev.type === "disconnect" || ev.type === "shutdown") return;
      else ev = yield;
    }
  };
  const server = await serve(v1, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
    logger,
  });
  const port = portOf(server.addr);
  // Each peer checks every reply: its own frame, in order, exactly once (the BusyPeer loop),
  // tagged 1 or 2, and never 1 again once it has seen 2.
  const sawV2 = new Set<number>();
  const check = (id: number) => (reply: Uint8Array, sent: Uint8Array) => {
    const tag = reply[0];
    const frame = reply.subarray(1);
    assert.ok(tag === 1 || tag === 2, `peer ${id}: tag ${tag}`);
    if (tag === 1) assert.ok(!sawV2.has(id), `peer ${id}: v1 answered after v2 had`);
    else sawV2.add(id);
    const { stream, seq } = verify(frame);
    const expected = verify(sent);
    assert.equal(stream, expected.stream, `peer ${id}: another peer's frame`);
    assert.equal(seq, expected.seq, `peer ${id}: frame ${expected.seq} lost, or duplicated`);
  };
  const peers = await openPeers(port, 50, 0, check);
  try {
    await progress(peers, 20, "v1 round trips");
    assert.equal(sawV2.size, 0);
    server.upgrade(v2, { codeChange: (state) => ({ ...(state as object), changed: true }) });
    // Every connection switches (the busy peers keep the frames flowing throughout).
    await progress(peers, 20, "round trips after the upgrade");
    assert.equal(sawV2.size, 50, `${sawV2.size} of 50 switched`);
    assert.equal(starts.codeChanged, starts.v2);
    // A new connection runs v2 from its first frame.
    const fresh = await BusyPeer.open(port, 99, check(99));
    await within(5000, fresh.progress(3));
    assert.ok(sawV2.has(99));
    assert.equal(await fresh.stop(), "stopped");
  } finally {
    for (const p of peers) assert.equal(await p.stop(), "stopped");
    await server.stop();
  }
  assert.deepEqual(logger.calls, []);
});
