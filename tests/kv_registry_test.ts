// KvRegistry's logic, with several nodes of one registry in this process over a ":memory:" KV
// store: entries and names across nodes, batching, remote call/cast/info/send/stop over the
// node links and their typed errors, dead nodes (stale entries written by hand), a clean
// leave, and bad input (options, stores, secrets, frames). tests/cluster_test.ts runs real
// processes.

import assert from "node:assert/strict";
import v8 from "node:v8";
import {
  type Connection,
  ConnectionClosed,
  type ConnectionRef,
  type Event,
  type HandlerGenerator,
  KvRegistry,
  type KvRegistryOptions,
  lines,
  memory,
  NodeDown,
  type RegistryEntry,
  RegistryUnavailable,
  reply,
  serve,
  TimeoutError,
} from "../mod.ts";
import { connect } from "../mod.ts";
import { capturingLogger, Inbox, pause, readExactly, within } from "./_support.ts";

const QUIET = { error() {}, warn() {}, debug() {} };
const FAST = { heartbeatMs: 50, nodeTtlMs: 1000 }; // a stalled test process is no death

/** Open node `node` of namespace "test" in `kv`, with fast heartbeats and a quiet logger. */
function open(
  kv: Deno.Kv,
  node: string,
  options: Partial<KvRegistryOptions> = {},
): Promise<KvRegistry> {
  return KvRegistry.open(kv, { namespace: "test", node, logger: QUIET, ...FAST, ...options });
}

let transports = 0;

/**
 * A lines() server recording its connections in `registry`, and `count` clients of it. Each
 * server-side connection answers a call with `{ by: its id, got: message }` (no answer to
 * "silent"; "name:X" registers X), and records its casts and infos; clients record the lines
 * they receive.
 */
async function callees(registry: KvRegistry, count = 1) {
  const transport = memory(`kv-registry-test-${++transports}`);
  const events = new Inbox<Event<string>>();
  const started = new Inbox<Connection<string>>();
  const server = await serve(async function* (conn): HandlerGenerator<string> {
    started.push(conn);
    for (let ev: Event<string> = yield;;) {
      if (ev.type === "call") {
        const message = String(ev.message);
        if (message === "silent") ev = yield;
        else if (message.startsWith("name:")) {
          ev = yield reply(ev.from, await conn.register(message.slice(5)));
        } else ev = yield reply(ev.from, { by: conn.id, got: ev.message });
      } else if (ev.type === "shutdown" || ev.type === "disconnect") {
        events.push(ev);
        return;
      } else {
        events.push(ev);
        ev = yield;
      }
    }
  }, { transport, framing: lines(), registry, name: "callees", logger: QUIET });
  const received = new Inbox<string>();
  const clients: ConnectionRef[] = [];
  for (let i = 0; i < count; i++) {
    clients.push(
      await connect(async function* (): HandlerGenerator<string> {
        for (let ev = yield; ev.type === "packet"; ev = yield) received.push(ev.data);
      }, { transport, framing: lines(), logger: QUIET }),
    );
  }
  const conns: Connection<string>[] = [];
  for (let i = 0; i < count; i++) conns.push(await started.next());
  return {
    server,
    conns,
    events,
    received,
    async [Symbol.asyncDispose]() {
      await Promise.all(clients.map((c) => c.stop()));
      await server.stop();
    },
  };
}

/** Polls `check` every few ms until it holds; fails after `ms`. For background work only. */
async function eventually(check: () => Promise<boolean>, ms = 3000, what = "condition") {
  await within(
    ms,
    (async () => {
      while (!(await check())) await pause(5);
    })(),
    what,
  );
}

Deno.test("kv registry: entries of every node are listed everywhere, filtered, and left at close", async () => {
  await using kv = await Deno.openKv(":memory:");
  const a = await open(kv, "a");
  await using b = await open(kv, "b");
  await using callA = await callees(a, 2);
  await using _callB = await callees(b, 1);
  assert.equal(await callA.conns[0].call("name:alice"), true);
  await Promise.all([a.flush(), b.flush()]);
  for (const registry of [a, b]) {
    const all = await registry.list();
    assert.deepEqual(all.map((e) => e.node).sort(), ["a", "a", "b"]);
    assert.deepEqual((await registry.list({ node: "a" })).length, 2);
    assert.deepEqual((await registry.list({ node: "nobody" })).length, 0);
    assert.deepEqual((await registry.list({ owner: "callees", kind: "server" })).length, 3);
    assert.deepEqual((await registry.list({ kind: "client" })).length, 0);
    const [alice] = await registry.list({ name: "alice" });
    assert.equal(alice.id, callA.conns[0].id);
    assert.equal(alice.node, "a");
    assert.equal(alice.remoteAddr.transport, "memory");
  }
  await a.close();
  // a's entries left the store at once: nothing of "a" is listed, and no key of it remains.
  assert.deepEqual((await b.list()).map((e) => e.node), ["b"]);
  assert.equal(await b.lookup("alice"), undefined);
  for await (const { key } of kv.list({ prefix: ["etcp", "test"] })) {
    assert.ok(!key.includes("a") && !key.includes(callA.conns[0].id), String(key));
  }
});

Deno.test("kv registry: a name is held by one connection across nodes, and freed when it closes", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  await using b = await open(kv, "b");
  await using onA = await callees(a, 2);
  await using onB = await callees(b, 1);
  // Three connections on two nodes race for one name: exactly one wins.
  const wins = await Promise.all([...onA.conns, ...onB.conns].map((c) => c.call("name:bob")));
  assert.equal(wins.filter((won) => won).length, 1, String(wins));
  const winner = [...onA.conns, ...onB.conns][wins.indexOf(true)];
  assert.equal((await a.lookup("bob"))?.id, winner.id);
  assert.equal((await b.lookup("bob"))?.id, winner.id);
  // Renaming frees the old name; closing frees the name.
  assert.equal(await winner.call("name:robert"), true);
  const loser = [...onA.conns, ...onB.conns].find((c) => c !== winner)!;
  assert.equal(await loser.call("name:bob"), true);
  assert.equal(await loser.call("name:robert"), false);
  await winner.stop();
  await Promise.all([a.flush(), b.flush()]);
  assert.equal(await loser.call("name:robert"), true);
  // Names are checked as MemoryRegistry checks them.
  for (const bad of ["", "c7", "c7.k3x9a0qz", 42, undefined]) {
    assert.throws(() => a.claim(onA.conns[0].id, bad as string), TypeError, String(bad));
  }
});

Deno.test("kv registry: call, cast, info, send and stop reach a connection of another node", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  await using b = await open(kv, "b");
  await using onA = await callees(a, 1);
  const [conn] = onA.conns;
  assert.equal(await conn.call("name:carol"), true);
  await a.flush();
  const remote = (await b.lookup("carol"))!;
  assert.ok(remote !== undefined && remote !== conn);
  assert.equal(remote.id, conn.id);
  assert.equal(remote.name, "carol");
  assert.equal((await b.lookup(conn.id))?.id, conn.id); // by id too
  // Values cross as structured clones: bytes, maps, dates keep their types.
  const message = { text: "hi", bytes: new Uint8Array([1, 2, 3]), at: new Date(5), m: new Map() };
  assert.deepEqual(await remote.call(message), { by: conn.id, got: message });
  assert.deepEqual(await remote.call("plain"), { by: conn.id, got: "plain" });
  remote.cast({ n: 1 });
  remote.info("psst");
  assert.deepEqual(await onA.events.next(), { type: "cast", message: { n: 1 } });
  assert.deepEqual(await onA.events.next(), { type: "info", message: "psst" });
  remote.send("a line from b");
  assert.equal(await onA.received.next(), "a line from b");
  // Typed errors: a value that cannot cross (as structuredClone says), the call's own timeout,
  // a bad timeout, a closed connection.
  for (const cannot of [() => 1, Symbol("s"), new SharedArrayBuffer(1)]) {
    await assert.rejects(
      remote.call(cannot),
      (err: Error) => err instanceof DOMException && err.name === "DataCloneError",
    );
  }
  await assert.rejects(remote.call("silent", { timeout: 50 }), TimeoutError);
  await assert.rejects(remote.call("x", { timeout: -1 }), RangeError);
  await remote.stop("bye");
  assert.deepEqual(await onA.events.next(), { type: "shutdown", reason: "bye" });
  await conn.closed;
  await assert.rejects(remote.call("x"), (err) => err instanceof ConnectionClosed);
  await remote.stop(); // already gone: resolves, as for a local connection
  await a.flush(); // the removal went in a's next batch
  assert.equal(await b.lookup("carol"), undefined);
});

Deno.test("kv registry: a call under way when its node leaves fails with NodeDown, and so do later ones", async () => {
  await using kv = await Deno.openKv(":memory:");
  const a = await open(kv, "a");
  await using b = await open(kv, "b");
  const onA = await callees(a, 1);
  await a.flush();
  const remote = (await b.lookup(onA.conns[0].id))!;
  const waiting = assert.rejects(remote.call("silent", { timeout: 60_000 }), NodeDown);
  assert.deepEqual(await remote.call("ping"), { by: remote.id, got: "ping" }); // link is up
  await a.close();
  await within(2000, waiting);
  await assert.rejects(within(2000, remote.call("again")), NodeDown);
  await assert.rejects(within(2000, remote.stop()), NodeDown);
  remote.cast("dropped"); // dropped, not thrown
  await onA[Symbol.asyncDispose]();
});

Deno.test("kv registry: a new run of a node that left is reached as soon as lookup() finds it", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using b = await open(kv, "b", { heartbeatMs: 300 });
  const first = await open(kv, "a");
  const onFirst = await callees(first, 1);
  await first.flush();
  const before = (await b.lookup(onFirst.conns[0].id))!;
  assert.deepEqual(await before.call("ping"), { by: before.id, got: "ping" });
  // b's heartbeat surveys the store and sees "a" (no event says when: over one heartbeat).
  await pause(400);
  await onFirst[Symbol.asyncDispose]();
  await first.close();
  // Until b's heartbeat has surveyed the store and recorded that "a" left (no event says so).
  await within(
    3000,
    (async () => {
      for (;;) {
        const err = await before.call("again").catch((e: Error) => e);
        if (err instanceof NodeDown && /left the registry/.test(err.message)) return;
        await pause(5);
      }
    })(),
    "b records that a left",
  );
  // "a" again (a restarted process, by its fixed name), well before b's next survey.
  await using second = await open(kv, "a");
  await using onSecond = await callees(second, 1);
  await second.flush();
  const after = (await b.lookup(onSecond.conns[0].id))!;
  assert.ok(after !== undefined, "lookup finds the new run's connection");
  assert.deepEqual(await within(2000, after.call("ping")), { by: after.id, got: "ping" });
});

Deno.test("kv registry: a dead node's entries leave list() at once and are swept; its names can be taken", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  // Node "ghost" as a killed process leaves it: a member, a stale node entry, entries, a name.
  const entry: RegistryEntry = {
    id: "c1.ghost000",
    name: "dave",
    owner: "callees",
    node: "ghost",
    kind: "server",
    remoteAddr: { transport: "memory", name: "x" },
    localAddr: { transport: "memory", name: "x" },
    startedAt: Date.now(),
  };
  const heartbeatAt = Date.now();
  await kv.atomic()
    .set(["etcp", "test", "member", "ghost"], { node: "ghost", startedAt: heartbeatAt })
    .set(["etcp", "test", "node", "ghost"], {
      node: "ghost",
      link: { hostname: "127.0.0.1", port: 9 },
      heartbeatAt,
      ttlMs: 100,
      startedAt: heartbeatAt,
    })
    .set(["etcp", "test", "conn", entry.id], entry)
    .set(["etcp", "test", "name", "dave"], { id: entry.id, node: "ghost" })
    .commit();
  assert.deepEqual((await a.list()).map((e) => e.id), [entry.id]); // alive for 100 ms
  await pause(120); // (the ghost's heartbeat goes stale: time is what this test is about)
  assert.deepEqual(await a.list(), []);
  assert.equal(await a.lookup("dave"), undefined);
  await eventually(async () => (await kv.get(["etcp", "test", "conn", entry.id])).value === null);
  await eventually(async () => (await kv.get(["etcp", "test", "member", "ghost"])).value === null);
  await using onA = await callees(a, 1);
  assert.equal(await onA.conns[0].call("name:dave"), true);
});

Deno.test("kv registry: entries and names of a node that is no member are collected", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using _a = await open(kv, "a", { heartbeatMs: 5, nodeTtlMs: 10 });
  const orphan = { id: "c1.orphan00", node: "gone", owner: "x", kind: "server" };
  await kv.atomic()
    .set(["etcp", "test", "conn", orphan.id], orphan)
    .set(["etcp", "test", "name", "grace"], { id: orphan.id, node: "gone" })
    .commit();
  await eventually(async () => {
    const [conn, name] = await kv.getMany([
      ["etcp", "test", "conn", orphan.id],
      ["etcp", "test", "name", "grace"],
    ]);
    return conn.value === null && name.value === null;
  });
});

Deno.test("kv registry: a name held by a dead node is taken over before the sweep", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a", { heartbeatMs: 10_000, nodeTtlMs: 20_000 }); // no sweep
  await kv.atomic()
    .set(["etcp", "test", "node", "ghost"], {
      node: "ghost",
      link: { hostname: "127.0.0.1", port: 9 },
      heartbeatAt: Date.now() - 1000,
      ttlMs: 100,
      startedAt: 0,
    })
    .set(["etcp", "test", "name", "erin"], { id: "c9.ghost000", node: "ghost" })
    .commit();
  await using onA = await callees(a, 1);
  assert.equal(await onA.conns[0].call("name:erin"), true);
  assert.equal((await a.lookup("erin"))?.id, onA.conns[0].id);
});

Deno.test("kv registry: adding never waits for the store; a thousand entries are written in batches", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  await using b = await open(kv, "b");
  const conn = { id: "x" } as unknown as ConnectionRef;
  const addr = { transport: "memory" as const, name: "batch" };
  for (let i = 0; i < 1200; i++) {
    const added = a.add({
      id: `c${i}.batch000`,
      owner: "batch",
      node: a.node,
      kind: "server",
      remoteAddr: addr,
      localAddr: addr,
      startedAt: 0,
    }, conn);
    assert.equal(added, undefined); // not a promise: nothing waits
  }
  for (let i = 0; i < 1200; i += 2) a.remove(`c${i}.batch000`); // half gone before written
  await a.flush();
  assert.equal((await b.list({ owner: "batch" })).length, 600);
  for (let i = 1; i < 1200; i += 2) a.remove(`c${i}.batch000`);
  await a.flush();
  assert.equal((await b.list({ owner: "batch" })).length, 0);
});

Deno.test("kv registry: a node name is refused while its node is live, and a stale run of it is cleared", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  await assert.rejects(open(kv, "a"), RegistryUnavailable);
  // A previous run of "b" that died: its member, stale node entry and an entry.
  await kv.atomic()
    .set(["etcp", "test", "member", "b"], { node: "b", startedAt: 0 })
    .set(["etcp", "test", "node", "b"], {
      node: "b",
      link: { hostname: "127.0.0.1", port: 9 },
      heartbeatAt: 0,
      ttlMs: 100,
      startedAt: 0,
    })
    .set(["etcp", "test", "conn", "c1.old00000"], {
      id: "c1.old00000",
      node: "b",
      owner: "old",
      kind: "server",
    })
    .commit();
  await using b = await open(kv, "b");
  assert.equal(b.node, "b");
  assert.equal((await kv.get(["etcp", "test", "conn", "c1.old00000"])).value, null);
  assert.deepEqual(await a.list({ owner: "old" }), []);
});

Deno.test("kv registry: a node declared dead while alive rejoins and writes its entries and names again", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a");
  await using b = await open(kv, "b");
  await using onA = await callees(a, 1);
  assert.equal(await onA.conns[0].call("name:frank"), true);
  await a.flush();
  // What a sweep by b does to a, as if a had stalled: a's node entry, entries and names go.
  await kv.atomic()
    .delete(["etcp", "test", "node", "a"])
    .delete(["etcp", "test", "member", "a"])
    .delete(["etcp", "test", "conn", onA.conns[0].id])
    .delete(["etcp", "test", "name", "frank"])
    .commit();
  assert.equal(await b.lookup("frank"), undefined);
  await eventually(async () => (await b.lookup("frank"))?.id === onA.conns[0].id);
  assert.deepEqual((await b.list({ node: "a" })).map((e) => e.name), ["frank"]);
});

Deno.test("kv registry: bad options and stores are refused with typed errors", async () => {
  await using kv = await Deno.openKv(":memory:");
  const bad: Array<[unknown, ErrorConstructor]> = [
    [undefined, TypeError],
    [{}, TypeError],
    [{ namespace: 42 }, TypeError],
    [{ namespace: "" }, TypeError],
    [{ namespace: "n", node: "" }, TypeError],
    [{ namespace: "n", node: 7 }, TypeError],
    [{ namespace: "n", heartbeatMs: -1 }, RangeError],
    [{ namespace: "n", heartbeatMs: "1" }, TypeError],
    [{ namespace: "n", heartbeatMs: 100, nodeTtlMs: 150 }, RangeError],
    // Periods a timer keeps: past 2^31 - 1 ms one would fire at once, over and over.
    [{ namespace: "n", heartbeatMs: 2 ** 31, nodeTtlMs: 2 ** 32 }, RangeError],
    [{ namespace: "n", batchMs: 2 ** 31 }, RangeError],
    [{ namespace: "n", secret: "" }, TypeError],
    [{ namespace: "n", secret: 5 }, TypeError],
    [{ namespace: "n", link: { port: 70000 } }, RangeError],
    [{ namespace: "n", link: { hostname: 1 } }, TypeError],
    [{ namespace: "n", link: { hostname: "0.0.0.0" } }, TypeError], // which address to publish?
    [{ namespace: "n", logger: {} }, TypeError],
  ];
  for (const [options, type] of bad) {
    await assert.rejects(
      KvRegistry.open(kv, options as KvRegistryOptions),
      type,
      JSON.stringify(options),
    );
  }
  await assert.rejects(
    KvRegistry.open(42 as unknown as Deno.Kv, { namespace: "n" }),
    TypeError,
  );
  const dir = await Deno.makeTempDir();
  try {
    await assert.rejects(
      KvRegistry.open(`${dir}/no/such/dir/kv.db`, { namespace: "n" }),
      RegistryUnavailable,
    );
    await assert.rejects(KvRegistry.open(dir, { namespace: "n" }), RegistryUnavailable);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  await using a = await open(kv, "a");
  await assert.rejects(a.list({ owner: 5 as unknown as string }), TypeError);
  assert.equal(await a.lookup(""), undefined);
});

Deno.test("kv registry: a node with another cluster secret is refused, and calls to it fail with NodeDown", async () => {
  await using kv = await Deno.openKv(":memory:");
  const logger = capturingLogger();
  await using a = await open(kv, "a", { secret: "right", logger });
  await using b = await open(kv, "b", { secret: "wrong" });
  await using onA = await callees(a, 1);
  await a.flush();
  const remote = (await b.lookup(onA.conns[0].id))!;
  await assert.rejects(
    within(3000, remote.call("hi")),
    (err) => err instanceof NodeDown && /secret/.test(err.message),
  );
  assert.ok(logger.calls.some((c) => /failed the cluster secret/.test(String(c[0]))));
  assert.deepEqual(onA.events.size, 0); // nothing reached the connection
});

Deno.test("kv registry: malformed, unauthenticated and oversized link frames close that link only", async () => {
  await using kv = await Deno.openKv(":memory:");
  await using a = await open(kv, "a", { link: { maxFrameLength: 1024 } });
  await using b = await open(kv, "b");
  await using onA = await callees(a, 1);
  await a.flush();
  const { hostname, port } = a.linkAddress;
  const framed = (bytes: number[]) => new Uint8Array([0, 0, 0, bytes.length, ...bytes]);
  const frames = [
    new Uint8Array([0, 0, 0, 3, 1, 2, 3]), // too short to be a frame
    new Uint8Array([0, 0, 0, 9, 99, 0, 0, 0, 0, 0, 0, 0, 0]), // unknown kind
    new Uint8Array([0x7f, 0xff, 0xff, 0xff]), // 2 GiB announced: over maxFrameLength
    new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"), // not the protocol at all
    framed([2, 0, 0, 0, 1, 0, 1, 0x78, 3, ...v8.serialize({ mac: "?" })]), // V8 data in an Auth
    framed([2, 0, 0, 0, 1, 0, 1, 0x78, 2, ...new Uint8Array(64)]), // an Auth with a wrong MAC
  ];
  for (const bytes of frames) {
    const socket = await Deno.connect({ hostname, port });
    const hello = await readExactly(socket, 4);
    await readExactly(socket, new DataView(hello.buffer).getUint32(0)); // the greeting
    await socket.write(bytes);
    // The link server closes the socket: the read ends (or is reset).
    const end = await within(2000, socket.read(new Uint8Array(16)).catch(() => null));
    assert.equal(end, null);
    socket.close();
  }
  // The node goes on serving its links.
  const remote = (await b.lookup(onA.conns[0].id))!;
  assert.deepEqual(await remote.call("still"), { by: remote.id, got: "still" });
});
