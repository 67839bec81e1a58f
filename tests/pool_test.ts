// createPool(): strategies, hash stability, dead addresses, draining, checkouts, queueing,
// stopping, reconnection with backoff (a server killed under load and restarted, a handler that
// throws on every connect, stop or removeAddress during a backoff or a reconnect, maxAttempts),
// the onExit policy (each decision), bad options. Over the memory transport (and one real TCP pool), sanitizers on.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  createPool,
  type From,
  type Handler,
  lines,
  memory,
  MemoryRegistry,
  type Pool,
  type PoolExit,
  PoolUnavailable,
  reply,
  send,
  serve,
  type Server,
  stop,
  tcp,
  type Transport,
} from "../mod.ts";
import { capturingLogger, HOST, pause, portOf, tracked, within } from "./_support.ts";

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

// deno-lint-ignore no-explicit-any
async function allUp(pool: Pool<any>, n: number): Promise<void> {
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
  // It backs off (reconnection is on by default) and leaves nothing behind when stopped.
  assert.equal(pool.stats().addresses[0].backingOff, 1);
  await pool.stop();
  await s.stop();
});

Deno.test("reconnect off, all addresses down from the start: call fails at once, ready rejects", async () => {
  const a = memory("pool-nobody-a");
  const b = memory("pool-nobody-b");
  const pool = await createPool(handler, {
    addresses: [{ transport: a, label: "a" }, { transport: b, label: "b" }],
    size: 2,
    reconnect: false,
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
    createPool(handler, { addresses: [{ transport: a }], waitReady: 200, reconnect: false }),
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
    reconnect: false,
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
    [{ ...ok, reconnect: "yes" }, TypeError, /option reconnect/],
    [{ ...ok, reconnect: { initialDelay: -1 } }, RangeError, /reconnect: option initialDelay/],
    [{ ...ok, reconnect: { multiplier: 0.5 } }, RangeError, /reconnect: option multiplier/],
    [{ ...ok, reconnect: { maxDelay: 2 ** 40 } }, RangeError, /reconnect: option maxDelay/],
    [{ ...ok, reconnect: { jitter: 1.5 } }, RangeError, /reconnect: option jitter/],
    [{ ...ok, reconnect: { jitter: "0.2" } }, TypeError, /reconnect: option jitter/],
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

// ---- Reconnection ------------------------------------------------------------------------------

// Timers never fire early, but a poll or a timestamp may be a little late: lower bounds get this.
const SLACK = 3;

// tcp() that records when each connect to each port starts.
function countingTcp(): { transport: Transport; attempts: { port: number; at: number }[] } {
  const base = tcp();
  const attempts: { port: number; at: number }[] = [];
  return {
    attempts,
    transport: {
      name: "tcp",
      listen: (options) => base.listen(options),
      connect: (options) => {
        attempts.push({ port: options.port!, at: performance.now() });
        return base.connect(options);
      },
    },
  };
}

function echoServer(port = 0): Promise<Server> {
  return serve(async function* () {
    for (let ev = yield; ev.type === "packet";) ev = yield send(ev.data);
  }, { hostname: HOST, port, framing: lines(), logger: quiet });
}

// A pool connection that forwards each call to its server and replies with the echo.
const forwarding: Handler<string> = async function* () {
  const waiting: From[] = [];
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    if (ev.type === "call") {
      waiting.push(ev.from);
      ev = yield send(String(ev.message));
    } else if (ev.type === "packet") ev = yield reply(waiting.shift()!, ev.data);
    else ev = yield;
  }
};

async function until(ms: number, what: string, ok: () => boolean): Promise<void> {
  await within(
    ms,
    (async () => {
      while (!ok()) await pause(1);
    })(),
    what,
  );
}

Deno.test("a server killed under load: calls fail or move, the slot backs off, recovers on restart", async () => {
  const one = await echoServer();
  const two = await echoServer();
  const port1 = portOf(one.addr);
  const { transport, attempts } = countingTcp();
  const pool = await createPool(forwarding, {
    addresses: [{ hostname: HOST, port: port1 }, { hostname: HOST, port: portOf(two.addr) }],
    transport,
    framing: lines(),
    reconnect: { initialDelay: 20, multiplier: 2, maxDelay: 320, jitter: 0.2 },
    logger: quiet,
    callTimeout: 2000,
  });
  await allUp(pool, 2);
  // Load: 8 callers, each counting what its calls did.
  let running = true;
  let ok = 0;
  const failures: unknown[] = [];
  const callers = Array.from({ length: 8 }, async (_, i) => {
    for (let n = 0; running; n++) {
      try {
        assert.equal(await pool.call(`${i}.${n}`), `${i}.${n}`);
        ok++;
      } catch (err) {
        failures.push(err);
        await pause(1);
      }
    }
  });
  await until(2000, "load", () => ok > 50);
  const p1 = () => pool.stats().addresses[0];

  // Kill the first server: its slot backs off, calls go on through the second.
  const killed = performance.now();
  const before = attempts.length;
  await one.stop("shutdown", { timeout: 100 });
  await until(1000, "backing off", () => p1().backingOff === 1);
  const okAtKill = ok;
  await until(2000, "calls through the other address", () => ok > okAtKill + 50);
  for (const err of failures) {
    assert.ok(
      ["PoolUnavailable", "ConnectionClosed"].includes((err as Error).name),
      String(err),
    );
  }
  // Four refused reconnects: waits of 20, 40, 80, 160 ms (each ± 20 %) after the drop.
  await until(3000, "4 reconnects", () => attempts.length - before >= 4);
  const times = [killed, ...attempts.slice(before, before + 4).map((a) => a.at)];
  assert.ok(attempts.slice(before).every((a) => a.port === port1));
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  [20, 40, 80, 160].forEach((d, i) => {
    assert.ok(gaps[i] >= d * 0.8 - SLACK, `wait ${i}: ${gaps[i]} ms < ${d * 0.8}: ${gaps}`);
    assert.ok(gaps[i] <= d * 1.2 + 250, `wait ${i}: ${gaps[i]} ms: ${gaps}`);
  });
  // (An attempt is recorded when its connect starts; its failure is counted once it is refused.)
  await until(1000, "4 failures counted", () => p1().failures >= 4);
  assert.equal(p1().reconnects, 0);
  assert.equal(pool.stats().addresses[1].failures, 0);

  // The server comes back on the same port: the slot reconnects (within one capped wait).
  const again = await echoServer(port1);
  await until(1000, "reconnected", () => p1().up === 1);
  assert.equal(p1().reconnects, 1);
  assert.equal(pool.stats().reconnects, 1);
  const okAtBack = ok;
  await until(2000, "calls through the restarted server", () => ok > okAtBack + 50);
  assert.equal(again.connections().length, 1);

  // It stayed up longer than initialDelay: the backoff starts again from 20 ms, not 160.
  await pause(40);
  const killedAgain = performance.now();
  const before2 = attempts.length;
  await again.stop("shutdown", { timeout: 100 });
  await until(1000, "reconnect after the second kill", () => attempts.length > before2);
  const wait = attempts[before2].at - killedAgain;
  // Not reset, the next wait would be 320 ms ± 20 % (at least 256, the cap): anything well under
  // that shows the reset, with room for a loaded machine.
  assert.ok(wait >= 16 - SLACK && wait < 250, `first wait after a reset: ${wait} ms`);

  running = false;
  await Promise.all(callers);
  await pool.stop();
  assert.equal(p1().backingOff, 0);
  await two.stop();
});

Deno.test("all addresses down from the start with reconnect on: call fails at once, ready waits for a server", async () => {
  const a = memory("pool-later-a");
  const b = memory("pool-later-b");
  const pool = await createPool(handler, {
    addresses: [{ transport: a, label: "a" }, { transport: b, label: "b" }],
    reconnect: { initialDelay: 20, multiplier: 1.5, maxDelay: 50 },
  });
  const ready = tracked(pool.ready);
  await until(1000, "backing off", () => pool.stats().addresses.every((x) => x.backingOff === 1));
  const started = performance.now();
  const err = await pool.call("x").catch((e: PoolUnavailable) => e);
  assert.ok(performance.now() - started < 50);
  assert.ok(err instanceof PoolUnavailable);
  assert.equal(err.reason, "down");
  assert.deepEqual(err.addresses, ["a", "b"]);
  assert.throws(() => pool.pick(), PoolUnavailable);
  // Several attempts later, ready has neither resolved nor rejected.
  await until(2000, "failures", () => pool.stats().failures >= 6);
  assert.ok(!ready.settled());
  // A server appears: ready resolves within one capped wait, and calls go through.
  const s = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
  }, { transport: b });
  await within(1000, pool.ready, "ready");
  assert.equal(typeof await pool.call("who"), "string");
  const stats = pool.stats();
  assert.deepEqual(stats.addresses.map((x) => x.up), [0, 1]);
  assert.equal(stats.reconnects, 1);
  await pool.stop();
  await s.stop();
  // waitReady still bounds the wait, and a pool it refuses leaves no backoff timer behind.
  const refusedAt = performance.now();
  await assert.rejects(
    createPool(handler, { addresses: [{ transport: a }], waitReady: 100 }),
    PoolUnavailable,
  );
  assert.ok(performance.now() - refusedAt < 1000);
});

Deno.test("a handler that throws on every connect backs off, never storms", async () => {
  const { transport, server: s } = await server();
  const starts: number[] = [];
  const throwing: Handler = async function* () {
    starts.push(performance.now());
    if (starts.length > 0) throw new Error("boom"); // always: before its first yield
    yield;
  };
  const created = performance.now();
  const pool = await createPool(throwing, {
    addresses: [{ transport }],
    reconnect: { initialDelay: 20, multiplier: 2, maxDelay: 1000, jitter: 0.2 },
    logger: quiet,
  });
  await pause(400);
  // Waits of 20, 40, 80, 160, 320 ms at least × 0.8: starts by 16, 48, 112, 240, 496 ms at the
  // earliest, so no more than 5 connects (the first and 4 reconnects) fit in 400 ms.
  const seen = starts.filter((t) => t - created <= 400).length;
  assert.ok(seen >= 3 && seen <= 5, `${seen} connects in 400 ms`);
  const gaps = starts.slice(1).map((t, i) => t - starts[i]);
  gaps.forEach((gap, i) => {
    const least = 20 * 2 ** i * 0.8 - SLACK;
    assert.ok(gap >= least, `gap ${i}: ${gap} ms < ${least}: ${gaps}`);
  });
  // A handler that throws before its first yield fails its connect: none ever came up.
  const stats = pool.stats();
  assert.ok(stats.failures >= starts.length - 1, JSON.stringify(stats));
  assert.equal(stats.reconnects, 0);
  assert.equal((stats.addresses[0].lastError as Error).message, "boom");
  await pool.stop();
  await s.stop();
});

Deno.test("stop during a backoff cancels it at once and leaves no timer", async () => {
  const transport = memory("pool-never");
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    size: 3,
    reconnect: { initialDelay: 60_000 },
  });
  await until(1000, "backing off", () => pool.stats().addresses[0].backingOff === 3);
  const started = performance.now();
  await pool.stop();
  assert.ok(performance.now() - started < 100);
  const stats = pool.stats().addresses[0];
  assert.deepEqual([stats.backingOff, stats.down, stats.connecting], [0, 3, 0]);
  await assert.rejects(pool.ready, { reason: "stopped" });
  // removeAddress cancels its slots' backoffs too.
  const other = await createPool(handler, {
    addresses: [{ transport }],
    reconnect: { initialDelay: 60_000 },
  });
  await until(1000, "backing off", () => other.stats().addresses[0].backingOff === 1);
  await within(100, other.removeAddress({ transport }), "removeAddress");
  assert.deepEqual(other.stats().addresses, []);
  await other.stop();
});

// memory() that counts connects, and can hold them at a gate.
function countingMemory(name: string): {
  transport: Transport;
  connects: () => number;
  hold: () => () => void;
} {
  const base = memory(name);
  let connects = 0;
  let gate: Promise<void> | undefined;
  return {
    transport: {
      name: "memory",
      listen: (options) => base.listen(options),
      connect: async (options) => {
        connects++;
        if (gate) await gate;
        return base.connect(options);
      },
    },
    connects: () => connects,
    hold: () => {
      const { promise, resolve } = Promise.withResolvers<void>();
      gate = promise;
      return () => {
        gate = undefined;
        resolve();
      };
    },
  };
}

Deno.test("removeAddress during a reconnect: removed at once, no timer left, no connect after", async () => {
  const { transport, connects } = countingMemory(`pool-remove-backoff-${++names}`);
  const other = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport, label: "dead" }, { transport: other.transport, label: "live" }],
    reconnect: { initialDelay: 20, multiplier: 1, jitter: 0 },
    logger: quiet,
  });
  // The dead address fails and backs off, again and again.
  await until(2000, "a few reconnects", () => connects() >= 3);
  await until(1000, "backing off", () => pool.stats().addresses[0].backingOff === 1);
  await within(100, pool.removeAddress({ transport }), "removeAddress");
  assert.deepEqual(pool.stats().addresses.map((a) => a.address), ["live"]);
  const after = connects();
  await pause(60); // three backoffs' worth: none may connect
  assert.equal(connects(), after);
  assert.equal(typeof await pool.call("who"), "string");
  await pool.stop();
  await other.server.stop();
});

Deno.test("removeAddress while a reconnect is connecting: the connect is given up, not retried, its late socket closed", async () => {
  const s = await server();
  const { transport, connects, hold } = countingMemory(`pool-remove-connecting-${++names}`);
  const serving = () =>
    serve(async function* () {
      for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
    }, { transport, logger: quiet });
  let target = await serving();
  const pool = await createPool(handler, {
    addresses: [{ transport, label: "flaky" }, { transport: s.transport, label: "steady" }],
    reconnect: { initialDelay: 10, jitter: 0 },
    logger: quiet,
  });
  await allUp(pool, 2);
  const release = hold();
  await target.stop();
  target = await serving();
  await until(1000, "connecting", () => pool.stats().addresses[0].connecting === 1);
  // The transport's connect is held: removeAddress does not wait for it.
  await within(2000, pool.removeAddress({ transport }), "removeAddress");
  release(); // the socket comes late, and is closed at once
  await until(1000, "the late connection accepted, then closed", () => {
    const { accepted, closed } = target.stats();
    return accepted === 1 && closed === 1;
  });
  const after = connects();
  await pause(40);
  assert.equal(connects(), after, "not retried");
  assert.deepEqual(pool.stats().addresses.map((a) => a.address), ["steady"]);
  await pool.stop();
  await target.stop();
  await s.server.stop();
});

Deno.test("maxAttempts: a slot that fails that many times in a row stays down", async () => {
  const { transport, connects } = countingMemory(`pool-max-attempts-${++names}`);
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    reconnect: { initialDelay: 5, multiplier: 1, jitter: 0, maxAttempts: 2 },
  });
  await assert.rejects(within(2000, pool.ready, "ready"), { reason: "down" });
  assert.equal(connects(), 3); // the first connect and 2 reconnects
  const stats = pool.stats().addresses[0];
  assert.deepEqual([stats.down, stats.backingOff, stats.failures], [1, 0, 3]);
  await pool.stop();
});

// ---- onExit: the exit policy (etcp's handle_exit) ------------------------------------------------

// A pool of one connection whose exits go through `onExit`; its server ends a connection when
// told to (a cast "drop" through the pool).
async function exitRig(
  onExit: NonNullable<Parameters<typeof createPool>[1]["onExit"]>,
  reconnect: { initialDelay?: number } | false = { initialDelay: 60_000 },
) {
  const { transport, connects } = countingMemory(`pool-exit-${++names}`);
  const s = await serve(async function* () {
    for (let ev = yield; ev.type === "packet";) ev = yield;
  }, { transport, logger: quiet });
  const pool = await createPool(async function* (conn) {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
      if (ev.type === "cast" && ev.message === "drop") return; // a normal end, a brief one
      ev = ev.type === "call" ? yield reply(ev.from, conn.id) : yield;
    }
  }, { addresses: [{ transport, label: "one" }], reconnect, onExit, logger: quiet });
  await allUp(pool, 1);
  return { pool, server: s, connects, transport };
}

Deno.test("onExit: is told of each exit; nothing returned means the default backoff", async () => {
  const exits: PoolExit<Uint8Array>[] = [];
  const { pool, server: s } = await exitRig((exit) => {
    exits.push(exit);
  });
  const first = pool.connections()[0];
  pool.cast("drop");
  await until(1000, "an exit", () => exits.length === 1);
  assert.equal(exits[0].address, "one");
  assert.equal(exits[0].connection, first);
  assert.equal(exits[0].reason, "normal");
  // The backoff's first wait: initialDelay 60 s, capped by maxDelay (30 s), ± 20 %.
  assert.ok(exits[0].delay! >= 24_000 && exits[0].delay! <= 36_000, String(exits[0].delay));
  assert.equal(pool.stats().addresses[0].backingOff, 1);
  await pool.stop();
  await s.stop();
});

Deno.test('onExit: "restart" connects again at once, whatever the backoff', async () => {
  const { pool, server: s, connects } = await exitRig(() => "restart");
  const first = pool.connections()[0];
  pool.cast("drop");
  await until(
    1000,
    "back up",
    () => pool.connections()[0] !== first && pool.stats().addresses[0].up === 1,
  );
  assert.equal(connects(), 2);
  assert.equal(pool.stats().reconnects, 1);
  await pool.stop();
  await s.stop();
});

Deno.test("onExit: { restart: ms } connects again after that long, even with reconnection off", async () => {
  const { pool, server: s } = await exitRig(() => ({ restart: 40 }), false);
  const dropped = performance.now();
  pool.cast("drop");
  await until(1000, "backing off", () => pool.stats().addresses[0].backingOff === 1);
  await until(2000, "back up", () => pool.stats().addresses[0].up === 1);
  const waited = performance.now() - dropped;
  assert.ok(waited >= 40 - SLACK && waited < 1000, `waited ${waited} ms`);
  await pool.stop();
  await s.stop();
});

Deno.test('onExit: "delete" takes the slot out of the pool', async () => {
  const { pool, server: s, connects, transport } = await exitRig(() => "delete");
  await pool.addConnection({ transport, label: "one" });
  assert.equal(pool.connections().length, 2);
  pool.cast("drop");
  await until(1000, "one left", () => pool.connections().length === 1);
  const stats = pool.stats().addresses[0];
  assert.deepEqual([stats.up, stats.backingOff, stats.down], [1, 0, 0]);
  const before = connects();
  await pause(20);
  assert.equal(connects(), before);
  assert.equal(typeof await pool.call("who"), "string");
  await pool.stop();
  await s.stop();
});

Deno.test('onExit: "stop" stops the pool', async () => {
  const { pool, server: s } = await exitRig(() => "stop");
  pool.cast("drop");
  await within(2000, pool.stop(), "the pool's stop");
  await assert.rejects(pool.call("x"), { name: "PoolUnavailable", reason: "stopped" });
  assert.equal(s.connections().length, 0);
  await s.stop();
});

Deno.test("onExit: a failed connect is an exit too; a throw or a bad answer is logged, the default applies", async () => {
  const transport = memory(`pool-exit-refused-${++names}`);
  const logger = capturingLogger();
  const exits: PoolExit<Uint8Array>[] = [];
  const answers: unknown[] = [{ restart: -1 }, "later"];
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    reconnect: { initialDelay: 10, multiplier: 1, jitter: 0 },
    logger,
    onExit: (exit) => {
      exits.push(exit);
      if (exits.length === 1) throw new Error("policy bug");
      return answers.shift() as never;
    },
  });
  await until(2000, "four exits", () => exits.length >= 4);
  assert.equal(exits[0].connection, undefined);
  assert.ok(exits[0].reason instanceof Deno.errors.ConnectionRefused);
  assert.equal(exits[0].delay, 10);
  // Three were logged (the throw, and both bad answers), and the slot went on backing off.
  assert.equal(logger.levels.filter((l) => l === "error").length, 3);
  assert.match(String(logger.calls[0][0]), /onExit threw/);
  assert.match(String(logger.calls[1][0]), /onExit returned an object/);
  assert.match(String(logger.calls[2][0]), /onExit returned "later"/);
  await pool.stop();
});

Deno.test("a connection that is closing gets no requests, whatever the strategy", async () => {
  for (const strategy of ["round-robin", "random", "least-busy", "hash"] as const) {
    const { transport, server: s } = await server();
    const leaving = Promise.withResolvers<void>();
    const finallyRuns = Promise.withResolvers<void>();
    // A handler that, told to leave, stops with a finally that takes its time: the connection
    // is "closing" meanwhile, its socket still open.
    const slowToLeave: Handler = async function* (conn) {
      try {
        for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
          if (ev.type === "cast") yield stop();
          ev = ev.type === "call" ? yield reply(ev.from, conn.id) : yield;
        }
      } finally {
        finallyRuns.resolve();
        await leaving.promise;
      }
    };
    const pool = await createPool(slowToLeave, {
      addresses: [{ transport }],
      size: 2,
      strategy,
      key: strategy === "hash" ? (m: unknown) => String(m) : undefined,
      reconnect: false,
      logger: quiet,
    });
    await allUp(pool, 2);
    const [gone, staying] = pool.connections();
    gone.cast("leave");
    await within(2000, finallyRuns.promise, "the finally runs");
    assert.equal(gone.state, "closing");
    for (let i = 0; i < 8; i++) {
      assert.equal(await pool.call(`k${i}`), staying.id, `${strategy}: call ${i}`);
    }
    assert.equal(pool.pick("k0"), staying, strategy);
    leaving.resolve();
    await gone.closed;
    await pool.stop();
    await s.stop();
  }
});

Deno.test("withConnection: if the connection checked out dies and its slot reconnects, the new one takes requests", async () => {
  const { transport, server: s } = await server();
  const pool = await createPool(handler, {
    addresses: [{ transport }],
    size: 1,
    reconnect: { initialDelay: 1, maxDelay: 1 },
    logger: quiet,
  });
  await allUp(pool, 1);
  const result = await pool.withConnection(async (held: Connection) => {
    await held.stop();
    await allUp(pool, 1); // the slot is back, on a new connection
    const answeredBy = await pool.call("who"); // not "busy": the new one is not checked out
    assert.notEqual(answeredBy, held.id);
    return answeredBy;
  });
  assert.equal(typeof result, "string");
  assert.equal(pool.stats().addresses[0].checkedOut, 0);
  await pool.stop();
  await s.stop();
});

Deno.test("stop: connects under way are given up, even a handler's start that never ends", async () => {
  const { transport, server: s } = await server();
  const never = new Promise<void>(() => {});
  const starting = Promise.withResolvers<void>();
  const pool = await createPool(async function* () {
    starting.resolve();
    await never; // a start that waits for ever (a greeting that never comes, say)
    yield;
  }, { addresses: [{ transport }], size: 1, connectTimeout: Infinity, logger: quiet });
  await within(2000, starting.promise, "the handler's start under way");
  assert.equal(pool.stats().addresses[0].connecting, 1);
  await within(2000, pool.stop("shutdown", { timeout: 0 }), "pool.stop()");
  assert.equal(pool.stats().failures, 0, "given up by the pool: not a failure");
  await within(2000, s.waitForConnections("==", 0), "the server's side closed too");
  await s.stop();
});
