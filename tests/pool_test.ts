// createPool(): strategies, hash stability, dead addresses, draining, checkouts, queueing,
// stopping, bad options. Over the memory transport (and one real TCP pool), sanitizers on.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  createPool,
  type Handler,
  memory,
  MemoryRegistry,
  type Pool,
  PoolUnavailable,
  reply,
  serve,
  type Server,
  type Transport,
} from "../mod.ts";
import { HOST, pause, portOf, tracked, within } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };
let names = 0;

// A pool connection's handler: a call replies with the connection's id, after `gate` if given.
const handler: Handler = async function* (conn) {
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    if (ev.type === "call") {
      const gate = (ev.message as { gate?: Promise<void> } | undefined)?.gate;
      if (gate) await gate;
      ev = yield reply(ev.from, conn.id);
    } else ev = yield;
  }
};

async function server(): Promise<{ transport: Transport; server: Server }> {
  const transport = memory(`pool-test-${++names}`);
  const server = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
  }, { transport, logger: quiet });
  return { transport, server };
}

async function allUp(pool: Pool<unknown>, n: number): Promise<void> {
  await within(
    2000,
    (async () => {
      while (pool.stats().addresses.reduce((k, a) => k + a.up, 0) < n) await pause(1);
    })(),
    `${n} connections up`,
  );
}

function counts(ids: unknown[]): number[] {
  const by = new Map<unknown, number>();
  for (const id of ids) by.set(id, (by.get(id) ?? 0) + 1);
  return [...by.values()].sort((a, b) => a - b);
}

Deno.test("round-robin cycles over every connection", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, { addresses: [{ transport }], size: 3 });
  await allUp(pool, 3);
  const ids = [];
  for (let i = 0; i < 12; i++) ids.push(await pool.call("who"));
  assert.deepEqual(counts(ids), [4, 4, 4]);
  assert.deepEqual(ids.slice(0, 3), ids.slice(3, 6));
  await pool.stop();
  await s.stop();
});

Deno.test("random spreads calls over every connection", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    size: 3,
    strategy: "random",
  });
  await allUp(pool, 3);
  const ids = [];
  for (let i = 0; i < 300; i++) ids.push(await pool.call("who"));
  const c = counts(ids);
  assert.equal(c.length, 3);
  assert.ok(c[0] > 50 && c[2] < 150, `uneven: ${c}`);
  await pool.stop();
  await s.stop();
});

Deno.test("least-busy goes to the connection with fewest calls in flight", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    size: 4,
    strategy: "least-busy",
  });
  await allUp(pool, 4);
  const gate = Promise.withResolvers<void>();
  const held = Array.from({ length: 8 }, () => pool.call({ gate: gate.promise }));
  assert.equal(pool.stats().inFlight, 8);
  gate.resolve();
  assert.deepEqual(counts(await Promise.all(held)), [2, 2, 2, 2]);
  // One connection kept busy: the others take the next calls.
  const busy = Promise.withResolvers<void>();
  const slow = pool.call({ gate: busy.promise });
  const others = [];
  for (let i = 0; i < 6; i++) others.push(await pool.call("who"));
  busy.resolve();
  const slowId = await slow;
  assert.ok(!others.includes(slowId), `${slowId} got calls while busy`);
  await pool.stop();
  await s.stop();
});

Deno.test("hash: a key stays on its connection; a dead connection moves only its keys", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    size: 4,
    strategy: "hash",
    key: (m) => (m as { k: string }).k,
    logger: quiet,
  });
  await allUp(pool, 4);
  const keys = Array.from({ length: 200 }, (_, i) => `key-${i}`);
  const before = new Map<string, unknown>();
  for (const k of keys) before.set(k, await pool.call({ k }));
  for (const k of keys.slice(0, 20)) assert.equal(await pool.call({ k }), before.get(k));
  const c = counts([...before.values()]);
  assert.equal(c.length, 4);
  assert.ok(c[0] > 25, `uneven: ${c}`);
  assert.equal(pool.pick("key-7").id, before.get("key-7"));
  // Kill one connection: its keys move, no other key does.
  const victim = pool.connections()[1];
  await victim.stop();
  await within(
    1000,
    (async () => {
      while (pool.connections().length > 3) await pause(1);
    })(),
  );
  let moved = 0;
  for (const k of keys) {
    const now = await pool.call({ k });
    if (before.get(k) === victim.id) {
      assert.notEqual(now, victim.id);
      moved++;
    } else assert.equal(now, before.get(k), `${k} moved`);
  }
  assert.ok(moved > 0);
  assert.equal(pool.stats().addresses[0].down, 1);
  await pool.stop();
  await s.stop();
});

Deno.test("all addresses down from the start: the pool starts, call fails at once", async () => {
  const a = memory("pool-nobody-a");
  const b = memory("pool-nobody-b");
  const pool = await createPool(handler, {
    addresses: [{ transport: a, label: "a" }, { transport: b, label: "b" }],
    size: 2,
  });
  await assert.rejects(pool.ready, PoolUnavailable);
  const started = performance.now();
  const err = await pool.call("x").catch((e: PoolUnavailable) => e);
  assert.ok(performance.now() - started < 50);
  assert.ok(err instanceof PoolUnavailable);
  assert.equal(err.reason, "down");
  assert.deepEqual(err.addresses, ["a", "b"]);
  assert.equal(err.errors.length, 2);
  assert.ok(err.errors[0].error instanceof Deno.errors.ConnectionRefused);
  assert.match(err.message, /a \(ConnectionRefused: .*b \(ConnectionRefused/);
  assert.throws(() => pool.cast("x"), PoolUnavailable);
  assert.throws(() => pool.pick(), PoolUnavailable);
  await assert.rejects(pool.withConnection(() => 1), PoolUnavailable);
  const stats = pool.stats();
  assert.deepEqual(stats.addresses.map((x) => [x.down, x.failures]), [[2, 2], [2, 2]]);
  // waitReady refuses such a pool, and leaves nothing behind.
  await assert.rejects(
    createPool(handler, { addresses: [{ transport: a }], waitReady: 200 }),
    PoolUnavailable,
  );
  await pool.stop();
});

Deno.test("waitReady resolves once a connection is up; ready follows the first", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport }, { transport: memory("pool-nobody-c") }],
    waitReady: true,
  });
  await pool.ready;
  assert.equal(typeof await pool.call("who"), "string");
  await pool.stop();
  await s.stop();
});

Deno.test("removeAddress drains: calls in flight finish, new ones go elsewhere", async () => {
  const one = await server();
  const two = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport: one.transport }, { transport: two.transport }],
    size: 2,
  });
  await allUp(pool, 4);
  const gate = Promise.withResolvers<void>();
  // Round-robin in the order the connections were made: these two go to the first address.
  const inFlight = Array.from({ length: 2 }, () => tracked(pool.call({ gate: gate.promise })));
  assert.deepEqual(pool.stats().addresses.map((a) => a.inFlight), [2, 0]);
  const drained = tracked(pool.removeAddress({ transport: one.transport }));
  await pause(5);
  assert.deepEqual(pool.stats().addresses.map((a) => a.address), ["memory#2"]);
  const leaving = one.server.connections().length;
  assert.equal(leaving, 2);
  // New calls go to the other address only.
  const newIds = [];
  for (let i = 0; i < 4; i++) newIds.push(await pool.call("who"));
  assert.equal(new Set(newIds).size, 2);
  assert.ok(!drained.settled());
  gate.resolve();
  const done = await Promise.all(inFlight.map((t) => t.promise));
  assert.equal(done.length, 2);
  await within(2000, drained.promise, "drain");
  assert.equal(pool.connections().length, 2);
  for (const id of newIds) assert.ok(pool.connections().some((c) => c.id === id));
  await pool.stop();
  await one.server.stop();
  await two.server.stop();
});

Deno.test("withConnection never hands one connection to two callers", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, { addresses: [{ transport }], size: 2 });
  await allUp(pool, 2);
  const holding = new Set<string>();
  let most = 0;
  let served = 0;
  const users = Array.from(
    { length: 12 },
    (_, i) =>
      pool.withConnection(async (conn: Connection) => {
        assert.ok(!holding.has(conn.id), `${conn.id} handed out twice`);
        holding.add(conn.id);
        most = Math.max(most, holding.size);
        await pause(2);
        holding.delete(conn.id);
        served++;
        if (i === 3) throw new Error("user failed");
        return i;
      }),
  );
  const results = await Promise.allSettled(users);
  assert.equal(served, 12);
  assert.equal(most, 2);
  assert.equal(results.filter((r) => r.status === "rejected").length, 1);
  assert.equal(pool.stats().addresses[0].checkedOut, 0);
  // A checkout that cannot get a connection in time fails.
  const release = Promise.withResolvers<void>();
  const a = pool.withConnection(() => release.promise);
  const b = pool.withConnection(() => release.promise);
  await assert.rejects(pool.withConnection(() => 0, { timeout: 20 }), { reason: "timeout" });
  // Calls skip checked-out connections (and fail as busy without queueing).
  await assert.rejects(pool.call("who"), { reason: "busy" });
  release.resolve();
  await Promise.all([a, b]);
  await pool.stop();
  await s.stop();
});

Deno.test("queueing: maxQueued bounds the waiters, acquireTimeout the wait", async () => {
  const transport = memory("pool-later");
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    acquireTimeout: 60,
    maxQueued: 2,
  });
  await assert.rejects(pool.ready);
  const started = performance.now();
  const w1 = pool.call("x").catch((e: PoolUnavailable) => e);
  const w2 = pool.call("x").catch((e: PoolUnavailable) => e);
  assert.equal(pool.stats().queued, 2);
  await assert.rejects(pool.call("x"), { name: "PoolUnavailable", reason: "queue-full" });
  const [e1, e2] = await Promise.all([w1, w2]);
  assert.equal((e1 as PoolUnavailable).reason, "timeout");
  assert.equal((e2 as PoolUnavailable).reason, "timeout");
  const waited = performance.now() - started;
  assert.ok(waited >= 55 && waited < 1000, `waited ${waited} ms`);
  assert.equal(pool.stats().queued, 0);
  // A queued call is served by a connection that comes up meanwhile.
  const s = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
  }, { transport });
  const waiting = pool.call("x");
  const conn = await pool.addConnection({ transport });
  assert.equal(await waiting, conn.id);
  await pool.stop();
  await s.stop();
});

Deno.test("stop: calls in flight finish within the timeout, or reject; new calls fail", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, { addresses: [{ transport }], size: 2, logger: quiet });
  await allUp(pool, 2);
  const quick = Promise.withResolvers<void>();
  const never = Promise.withResolvers<void>();
  const finishes = pool.call({ gate: quick.promise });
  const stuck = pool.call({ gate: never.promise }).catch((e: Error) => e);
  const stopping = pool.stop("shutdown", { timeout: 50 });
  await assert.rejects(pool.call("x"), { name: "PoolUnavailable", reason: "stopped" });
  quick.resolve();
  assert.equal(typeof await finishes, "string");
  await within(2000, stopping, "stop");
  const err = await stuck;
  assert.equal((err as Error).name, "ConnectionClosed");
  assert.equal(pool.connections().length, 0);
  never.resolve();
  await s.stop();
});

Deno.test("over TCP: { hostname, port } addresses, registry kind pool and owner name", async () => {
  const registry = new MemoryRegistry();
  const s = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
  }, { hostname: HOST, port: 0, logger: quiet });
  const port = portOf(s.addr);
  await using pool = await createPool(handler, {
    addresses: [{ hostname: HOST, port }],
    size: 2,
    name: "cache",
    registry,
    waitReady: true,
  });
  await allUp(pool, 2);
  const entries = await registry.list({ owner: "cache" });
  assert.equal(entries.length, 2);
  assert.ok(entries.every((e) => e.kind === "pool"));
  assert.equal(pool.stats().addresses[0].address, `${HOST}:${port}`);
  assert.equal(typeof await pool.call("who"), "string");
  const added = await pool.addConnections(2);
  assert.equal(added.length, 2);
  assert.equal(pool.connections().length, 4);
  await pool.stop();
  await s.stop();
});

Deno.test("bad options are refused at createPool, naming the option", async () => {
  const transport = memory("pool-bad");
  const ok = { addresses: [{ transport }] };
  const cases: [Record<string, unknown>, ErrorConstructor, RegExp][] = [
    [{ ...ok, size: 0 }, RangeError, /option size/],
    [{ ...ok, size: -2 }, RangeError, /option size/],
    [{ ...ok, size: 1.5 }, RangeError, /option size/],
    [{ ...ok, strategy: "fastest" }, TypeError, /option strategy/],
    [{ ...ok, strategy: "hash" }, TypeError, /option key/],
    [{ ...ok, key: "k" }, TypeError, /option key/],
    [{ addresses: [] }, TypeError, /option addresses/],
    [{}, TypeError, /option addresses/],
    [{ addresses: [{ port: 70000 }] }, RangeError, /addresses\[0\]: option port/],
    [{ ...ok, connectTimeout: -1 }, RangeError, /option connectTimeout/],
    [{ ...ok, callTimeout: -1 }, RangeError, /option callTimeout/],
    [{ ...ok, acquireTimeout: -5 }, RangeError, /option acquireTimeout/],
    [{ ...ok, maxQueued: -1 }, RangeError, /option maxQueued/],
    [{ ...ok, waitReady: -1 }, RangeError, /option waitReady/],
    [{ ...ok, mode: "lazy" }, TypeError, /option mode/],
  ];
  for (const [options, type, message] of cases) {
    await assert.rejects(
      createPool(handler, options as never),
      (err: Error) => err instanceof type && message.test(err.message),
      JSON.stringify(options),
    );
  }
  await assert.rejects(createPool("nope" as never, ok), TypeError);
});

Deno.test("a single connect() still registers as a client", async () => {
  const { transport, server: s } = await server();
  const registry = new MemoryRegistry();
  const c = await connect(async function* () {
    yield;
  }, { transport, registry });
  assert.equal((await registry.list())[0].kind, "client");
  await c.stop();
  await s.stop();
});
