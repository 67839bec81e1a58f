// serve() and Server over real TCP on 127.0.0.1, port 0: options, suspend/resume,
// maxConnections, stop, errors isolated to one connection, 50 concurrent echo clients, and the
// echo example run as a process.

import assert from "node:assert/strict";
import {
  type Addr,
  type Connection,
  type Event,
  lengthPrefixed,
  lines,
  MemoryRegistry,
  send,
  serve,
  type ServeOptions,
  type Server,
  type Yielded,
} from "../mod.ts";
import { echo, echoHibernating, echoSync } from "../examples/echo_server.ts";
import {
  assertFrameOf,
  assertRefused,
  capturingLogger,
  closeQuietly,
  concat,
  HOST,
  logNames,
  portOf,
  prng,
  randomFrame,
  readExactly,
  startProcess,
  tracked,
  wireOf,
  within,
  writeAll,
} from "./_support.ts";

const encoder = new TextEncoder();

// ---- Helpers ------------------------------------------------------------------------------

/** A raw TCP client speaking lines; it reads all the time, so `close()` leaves no op behind. */
class LineClient {
  readonly conn: Deno.TcpConn;
  readonly #lines: string[] = [];
  readonly #waiters: Array<(line: string | null) => void> = [];
  #eof = false;
  /** Resolves when the peer closed (or this side did). */
  readonly ended: Promise<void>;

  static async open(port: number): Promise<LineClient> {
    return new LineClient(await Deno.connect({ hostname: HOST, port }));
  }

  constructor(conn: Deno.TcpConn) {
    this.conn = conn;
    this.ended = this.#pump();
  }

  async #pump(): Promise<void> {
    const decoder = new TextDecoder();
    const buf = new Uint8Array(4096);
    let text = "";
    try {
      for (;;) {
        const n = await this.conn.read(buf);
        if (n === null) break;
        text += decoder.decode(buf.subarray(0, n), { stream: true });
        for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n")) {
          const line = text.slice(0, nl);
          text = text.slice(nl + 1);
          const waiter = this.#waiters.shift();
          if (waiter) waiter(line);
          else this.#lines.push(line);
        }
      }
    } catch {
      // Closed by this side, or reset by the peer: either way, the end.
    }
    this.#eof = true;
    for (const waiter of this.#waiters.splice(0)) waiter(null);
  }

  /** The next line, or null at the end. */
  next(): Promise<string | null> {
    if (this.#lines.length > 0) return Promise.resolve(this.#lines.shift()!);
    if (this.#eof) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  send(line: string): Promise<void> {
    return writeAll(this.conn, encoder.encode(line + "\n"));
  }

  /** Send a line and wait for the answer line (bounded). */
  async request(line: string, ms = 3000): Promise<string | null> {
    await this.send(line);
    return await within(ms, this.next(), `answer to ${JSON.stringify(line)}`);
  }

  async close(): Promise<void> {
    closeQuietly(this.conn);
    await this.ended;
  }
}

/** Greets each connection with "hello", then echoes lines; ends on disconnect or shutdown. */
async function* greeter(): AsyncGenerator<Yielded, void, Event<string>> {
  let ev = yield send("hello");
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "disconnect" || ev.type === "shutdown") return;
    else ev = yield;
  }
}

function serveLines(options: ServeOptions<string> = {}): Promise<Server<string>> {
  return serve(greeter, { hostname: HOST, port: 0, framing: lines(), ...options });
}

// ---- Options ------------------------------------------------------------------------------

Deno.test("serve: port 0 gives a real port, onListen is called once with the address", async () => {
  const heard: Addr[] = [];
  const server = await serveLines({ onListen: (addr) => heard.push(addr) });
  try {
    const port = portOf(server.addr);
    assert.ok(port > 0);
    assert.equal((server.addr as Deno.NetAddr).hostname, HOST);
    assert.equal(heard.length, 1);
    assert.deepEqual(heard[0], server.addr);
    const client = await LineClient.open(port);
    assert.equal(await within(3000, client.next()), "hello");
    assert.equal(await client.request("ping"), "ping");
    assert.equal(server.connections().length, 1);
    await client.close();
    assert.equal(heard.length, 1, "onListen is not called again");
  } finally {
    await server.stop();
  }
});

Deno.test("serve: name is the owner of its connections in the registry", async () => {
  const registry = new MemoryRegistry();
  const server = await serveLines({ name: "owner-test", registry });
  const other = await serveLines({ registry }); // a second server with a generated name
  try {
    assert.equal(server.name, "owner-test");
    assert.equal(server.registry, registry);
    assert.notEqual(other.name, "owner-test");
    const a = await LineClient.open(portOf(server.addr));
    const b = await LineClient.open(portOf(server.addr));
    const c = await LineClient.open(portOf(other.addr));
    for (const client of [a, b, c]) assert.equal(await within(3000, client.next()), "hello");

    const mine = await registry.list({ owner: "owner-test" });
    assert.equal(mine.length, 2);
    const ids = server.connections().map((conn) => conn.id).sort();
    assert.deepEqual(mine.map((entry) => entry.id).sort(), ids);
    for (const entry of mine) {
      assert.equal(entry.owner, "owner-test");
      assert.equal(entry.kind, "server");
      assert.equal(entry.node, registry.node);
      assert.equal(portOf(entry.localAddr), portOf(server.addr));
    }
    const localPorts = [portOf(a.conn.localAddr), portOf(b.conn.localAddr)].sort();
    assert.deepEqual(mine.map((entry) => portOf(entry.remoteAddr)).sort(), localPorts);
    assert.equal((await registry.list({ owner: other.name })).length, 1);
    assert.equal((await registry.list()).length, 3);

    // A connection that ends leaves the registry.
    const gone = server.connections().find((conn) =>
      portOf(conn.remoteAddr) === portOf(a.conn.localAddr)
    )!;
    await a.close();
    await within(3000, gone.closed);
    assert.deepEqual(
      (await registry.list({ owner: "owner-test" })).map((entry) => portOf(entry.remoteAddr)),
      [portOf(b.conn.localAddr)],
    );
    await b.close();
    await c.close();
  } finally {
    await server.stop();
    await other.stop();
  }
  assert.equal((await registry.list()).length, 0);
});

Deno.test("serve: status goes running → suspended → running → stopping → stopped", async () => {
  const server = await serveLines();
  assert.equal(server.status, "running");
  server.suspend();
  assert.equal(server.status, "suspended");
  server.resume();
  assert.equal(server.status, "running");
  const client = await LineClient.open(portOf(server.addr));
  assert.equal(await within(3000, client.next()), "hello");

  const finished = tracked(server.finished);
  const stopped = server.stop();
  assert.equal(server.status, "stopping");
  assert.equal(server.acceptors()[0].state, "stopped");
  // stop() twice is the same stop.
  assert.equal(server.stop(), stopped);
  await within(3000, stopped);
  assert.equal(server.status, "stopped");
  await within(1000, finished.promise);
  assert.ok(finished.settled());
  // The greeter returned on shutdown: the client saw the end.
  assert.equal(await within(3000, client.next()), null);
  await client.close();
  // suspend/resume after stop change nothing.
  server.suspend();
  server.resume();
  assert.equal(server.status, "stopped");
});

Deno.test("serve: finished resolves only after stop", async () => {
  const server = await serveLines();
  const finished = tracked(server.finished);
  const client = await LineClient.open(portOf(server.addr));
  assert.equal(await within(3000, client.next()), "hello");
  assert.equal(await client.request("x"), "x");
  assert.equal(finished.settled(), false);
  await client.close();
  await server.stop();
  await within(1000, finished.promise);
});

Deno.test("serve: aborting `signal` stops the server, shutdown carries the abort reason", async () => {
  const controller = new AbortController();
  const reasons: unknown[] = [];
  const server = await serve(async function* (): AsyncGenerator<Yielded, void, Event<string>> {
    let ev = yield send("hello");
    for (;;) {
      if (ev.type === "shutdown") {
        reasons.push(ev.reason);
        return;
      }
      if (ev.type === "disconnect") return;
      ev = yield;
    }
  }, { hostname: HOST, port: 0, framing: lines(), signal: controller.signal });
  const port = portOf(server.addr);
  const client = await LineClient.open(port);
  assert.equal(await within(3000, client.next()), "hello");
  controller.abort("maintenance");
  assert.equal(server.status, "stopping");
  await within(3000, server.finished);
  assert.equal(server.status, "stopped");
  assert.deepEqual(reasons, ["maintenance"]);
  assert.equal(await within(3000, client.next()), null);
  await client.close();
  await assertRefused(port);
});

Deno.test("serve: a signal aborted after an ordinary stop changes nothing", async () => {
  const controller = new AbortController();
  const server = await serveLines({ signal: controller.signal });
  await server.stop("first");
  controller.abort("later");
  assert.equal(server.status, "stopped");
  await within(1000, server.finished);
});

Deno.test("serve: an already aborted signal stops the server at once", async () => {
  const controller = new AbortController();
  controller.abort("never mind");
  const server = await serveLines({ signal: controller.signal });
  await within(3000, server.finished);
  assert.equal(server.status, "stopped");
  await assertRefused(portOf(server.addr));
});

Deno.test("serve: `await using` stops the server at the end of the scope", async () => {
  let kept: Server<string>;
  let port: number;
  let client: LineClient;
  {
    await using server = await serveLines();
    kept = server;
    port = portOf(server.addr);
    client = await LineClient.open(port);
    assert.equal(await within(3000, client.next()), "hello");
    assert.equal(server.status, "running");
  }
  assert.equal(kept.status, "stopped");
  assert.equal(await within(3000, client.next()), null, "its connections were shut down");
  await client.close();
  await assertRefused(port);
});

Deno.test({
  name: "serve: acceptors: 2 gives two listening sockets on one port, both accepting",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const server = await serveLines({ acceptors: 2 });
    try {
      const port = portOf(server.addr);
      const infos = server.acceptors();
      assert.equal(infos.length, 2);
      assert.deepEqual(infos.map((info) => info.id), [0, 1]);
      for (const info of infos) {
        assert.equal(portOf(info.addr), port);
        assert.equal(info.state, "accepting");
        assert.equal(info.accepted, 0);
      }
      // The kernel spreads connections over the two sockets by a hash of the peer address:
      // connect until both have accepted some (the odds of 64 in a row on one are 2^-63).
      let clients = 0;
      while (clients < 64 && server.acceptors().some((info) => info.accepted === 0)) {
        const client = await LineClient.open(port);
        clients++;
        assert.equal(await within(3000, client.next()), "hello");
        assert.equal(await client.request(`n${clients}`), `n${clients}`);
        await client.close();
      }
      const accepted = server.acceptors().map((info) => info.accepted);
      assert.ok(accepted.every((n) => n > 0), `both acceptors accepted: ${accepted}`);
      assert.equal(accepted[0] + accepted[1], clients);
    } finally {
      await server.stop();
    }
    assert.deepEqual(server.acceptors().map((info) => info.state), ["stopped", "stopped"]);
  },
});

// ---- suspend / resume ---------------------------------------------------------------------

Deno.test("suspend(): new peers connect (backlog) but are not served until resume()", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  const a = await LineClient.open(port);
  let b: LineClient | undefined;
  let c: LineClient | undefined;
  try {
    assert.equal(await within(3000, a.next()), "hello");
    assert.equal(server.acceptors()[0].state, "accepting");
    server.suspend();
    assert.equal(server.status, "suspended");
    assert.equal(server.acceptors()[0].state, "suspended");

    // The TCP connect succeeds: the listening socket is kept.
    b = await LineClient.open(port);
    c = await LineClient.open(port);
    const greetB = tracked(b.next());
    const greetC = tracked(c.next());
    // Live connections go on being served meanwhile; several round trips on `a` give the
    // server every chance to (wrongly) serve b and c.
    for (let i = 0; i < 5; i++) assert.equal(await a.request(`ping ${i}`), `ping ${i}`);
    assert.equal(greetB.settled(), false, "no greeting while suspended");
    assert.equal(greetC.settled(), false, "no greeting while suspended");
    assert.equal(server.connections().length, 1);
    assert.equal(server.acceptors()[0].state, "suspended");

    server.resume();
    assert.equal(server.status, "running");
    assert.equal(server.acceptors()[0].state, "accepting");
    assert.equal(await within(3000, greetB.promise), "hello");
    assert.equal(await within(3000, greetC.promise), "hello");
    assert.equal(await b.request("b"), "b");
    assert.equal(await c.request("c"), "c");
    assert.equal(server.connections().length, 3);
  } finally {
    await a.close();
    await b?.close();
    await c?.close();
    await server.stop();
  }
});

Deno.test("suspend(): stopping while peers wait in the backlog closes them", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  server.suspend();
  const waiting = await LineClient.open(port);
  await within(3000, server.stop());
  assert.equal(await within(3000, waiting.next()), null, "closed, never greeted");
  await waiting.close();
  await assertRefused(port);
});

// ---- maxConnections -----------------------------------------------------------------------

Deno.test("maxConnections: at the limit peers wait; a close or a raised limit serves them", async () => {
  const server = await serveLines({ maxConnections: 2 });
  const port = portOf(server.addr);
  const clients: LineClient[] = [];
  const open = async () => {
    const client = await LineClient.open(port);
    clients.push(client);
    return client;
  };
  try {
    assert.equal(server.maxConnections, 2);
    const a = await open();
    const b = await open();
    assert.equal(await within(3000, a.next()), "hello");
    assert.equal(await within(3000, b.next()), "hello");
    assert.equal(server.connections().length, 2);
    assert.equal(server.acceptors()[0].state, "waiting");

    // A third peer connects (backlog) but gets no service.
    const c = await open();
    const greetC = tracked(c.next());
    for (let i = 0; i < 5; i++) assert.equal(await a.request(`a${i}`), `a${i}`);
    assert.equal(greetC.settled(), false, "not served at the limit");
    assert.equal(server.connections().length, 2);
    assert.equal(server.acceptors()[0].state, "waiting");

    // Raising the limit live serves it at once.
    server.maxConnections = 3;
    assert.equal(server.maxConnections, 3);
    assert.equal(await within(3000, greetC.promise), "hello");
    assert.equal(await c.request("c"), "c");
    assert.equal(server.connections().length, 3);
    assert.equal(server.acceptors()[0].state, "waiting");

    // At the new limit, a fourth waits until one of the others closes.
    const d = await open();
    const greetD = tracked(d.next());
    assert.equal(await b.request("b"), "b");
    assert.equal(greetD.settled(), false);
    await a.close();
    assert.equal(await within(3000, greetD.promise), "hello");
    assert.equal(await d.request("d"), "d");
    assert.equal(server.connections().length, 3);

    assert.throws(() => server.maxConnections = -1, RangeError);
    assert.equal(server.maxConnections, 3);

    // Raised above the count: accepting again; lowered below it: waiting at once, and live
    // connections are not cut.
    server.maxConnections = 10;
    assert.equal(server.acceptors()[0].state, "accepting");
    server.maxConnections = 1;
    assert.equal(server.acceptors()[0].state, "waiting");
    assert.equal(await c.request("still"), "still");
    assert.equal(server.connections().length, 3);
  } finally {
    for (const client of clients) await client.close();
    await server.stop();
  }
});

// ---- stop ---------------------------------------------------------------------------------

Deno.test("stop(reason, { timeout }): shutdown to all, stragglers forced after the timeout", async () => {
  const logger = capturingLogger();
  const shutdowns: Array<{ id: string; reason: unknown }> = [];
  const finallies: string[] = [];
  // Even connections (by arrival) finish on shutdown; odd ones ignore it.
  let arrivals = 0;
  const server = await serve(
    async function* (conn: Connection<string>): AsyncGenerator<Yielded, void, Event<string>> {
      const stubborn = arrivals++ % 2 === 1;
      try {
        let ev = yield send(stubborn ? "stubborn" : "polite");
        for (;;) {
          if (ev.type === "shutdown") {
            shutdowns.push({ id: conn.id, reason: ev.reason });
            if (!stubborn) return;
          } else if (ev.type === "packet") {
            ev = yield send(ev.data);
            continue;
          }
          ev = yield;
        }
      } finally {
        finallies.push(conn.id);
      }
    },
    { hostname: HOST, port: 0, framing: lines(), logger, shutdownTimeout: 60_000 },
  );
  const port = portOf(server.addr);
  const clients: LineClient[] = [];
  for (let i = 0; i < 4; i++) {
    const client = await LineClient.open(port);
    clients.push(client);
    assert.equal(await within(3000, client.next()), i % 2 === 1 ? "stubborn" : "polite");
  }
  const conns = server.connections();
  const ids = conns.map((conn) => conn.id).sort();
  assert.equal(conns.length, 4);
  const closed = conns.map((conn) => conn.closed);

  const started = performance.now();
  await within(3000, server.stop("maintenance", { timeout: 200 }));
  const took = performance.now() - started;
  assert.ok(took >= 150, `waited for the stragglers (${took} ms)`);
  assert.equal(server.status, "stopped");
  assert.equal(server.connections().length, 0);

  assert.deepEqual(shutdowns.map((s) => s.id).sort(), ids);
  assert.ok(shutdowns.every((s) => s.reason === "maintenance"));
  assert.deepEqual(finallies.sort(), ids, "every finally ran, forced ones included");
  const reasons = await Promise.all(closed);
  assert.equal(reasons.filter((r) => r === "normal").length, 2);
  assert.equal(reasons.filter((r) => r === "maintenance").length, 2);
  for (const client of clients) assert.equal(await within(3000, client.next()), null);
  for (const client of clients) await client.close();
  await assertRefused(port);
});

Deno.test("stop(): a handler stuck in an await is forced after the timeout", async () => {
  const never = new Promise<void>(() => {});
  const reached = Promise.withResolvers<void>();
  const server = await serve(
    async function* (): AsyncGenerator<Yielded, void, Event<string>> {
      let ev = yield send("hello");
      for (;;) {
        if (ev.type === "shutdown") {
          reached.resolve();
          await never; // stuck for ever
        }
        ev = yield;
      }
    },
    { hostname: HOST, port: 0, framing: lines(), logger: capturingLogger() },
  );
  const client = await LineClient.open(portOf(server.addr));
  assert.equal(await within(3000, client.next()), "hello");
  const [conn] = server.connections();
  const stopped = server.stop("bye", { timeout: 100 });
  await within(3000, reached.promise);
  await within(3000, stopped);
  assert.equal(await within(1000, conn.closed), "bye");
  assert.equal(server.status, "stopped");
  assert.equal(await within(3000, client.next()), null, "the socket was closed");
  await client.close();
});

// ---- Errors stay on their connection ------------------------------------------------------

Deno.test("a handler that throws ends only its connection, logged once; 20 others echo on", async () => {
  const logger = capturingLogger();
  const closedReasons = new Map<string, Promise<unknown>>();
  const boom = new Error("boom");
  const server = await serve(
    async function* (conn: Connection<string>): AsyncGenerator<Yielded, void, Event<string>> {
      closedReasons.set(conn.id, conn.closed);
      let ev = yield send("hello");
      for (;;) {
        if (ev.type === "packet") {
          if (ev.data === "boom") throw boom;
          ev = yield send(ev.data);
        } else if (ev.type === "disconnect" || ev.type === "shutdown") {
          return;
        } else {
          ev = yield;
        }
      }
    },
    { hostname: HOST, port: 0, framing: lines(), logger },
  );
  const port = portOf(server.addr);
  const clients: LineClient[] = [];
  try {
    for (let i = 0; i < 21; i++) clients.push(await LineClient.open(port));
    for (const client of clients) assert.equal(await within(3000, client.next()), "hello");
    const [thrower, ...others] = clients;
    const throwerId = server.connections().find((conn) =>
      portOf(conn.remoteAddr) === portOf(thrower.conn.localAddr)
    )!.id;

    // The 20 echo 30 lines each, while the thrower blows up in the middle.
    const echoing = others.map(async (client, n) => {
      for (let i = 0; i < 30; i++) {
        const line = `client ${n} line ${i}`;
        assert.equal(await client.request(line), line);
      }
    });
    await thrower.send("boom");
    assert.equal(await within(3000, thrower.next()), null, "the thrower's socket closed");
    assert.equal(await within(3000, closedReasons.get(throwerId)!), boom);
    await within(10_000, Promise.all(echoing));

    assert.equal(logger.calls.length, 1, "logged exactly once");
    assert.ok(logNames(logger.calls[0], boom), "the log names the error");
    assert.equal(server.connections().length, 20);
    assert.equal(server.status, "running");
    // A new connection is served as usual.
    const late = await LineClient.open(port);
    clients.push(late);
    assert.equal(await within(3000, late.next()), "hello");
    assert.equal(await late.request("still here"), "still here");
  } finally {
    for (const client of clients) await client.close();
    await server.stop();
  }
  assert.equal(logger.calls.length, 1, "nothing else was logged");
});

// ---- 50 concurrent clients against the echo example's handlers -------------------------

/**
 * One raw client: writes `frames` length-prefixed frames (some split across writes, some
 * several to a write), reads the echoes concurrently, and checks each one: order, sequence,
 * checksum and bytes. Half-closes when done and expects nothing but the end after them.
 */
async function echoClient(port: number, client: number, frames: number): Promise<void> {
  const rand = prng(client * 7919 + 1);
  // Payloads: client u16, seq u32, random body, fnv1a(client..body) u32; length-prefixed.
  const sent = Array.from(
    { length: frames },
    (_, seq) =>
      wireOf([randomFrame(client, seq, (rand() * (rand() < 0.1 ? 3000 : 120)) | 0, rand)]),
  );
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    const writing = (async () => {
      let i = 0;
      while (i < sent.length) {
        const r = rand();
        if (r < 0.25) {
          // One frame split at a random byte, in two writes.
          const frame = sent[i++];
          const at = 1 + ((rand() * (frame.length - 1)) | 0);
          await writeAll(conn, frame.subarray(0, at));
          await writeAll(conn, frame.subarray(at));
        } else {
          // One to five whole frames in one write.
          const n = Math.min(sent.length - i, 1 + ((rand() * 5) | 0));
          await writeAll(conn, concat(sent.slice(i, i + n)));
          i += n;
        }
      }
      await conn.closeWrite();
    })();

    let received = 0;
    let buffered = new Uint8Array(0);
    const buf = new Uint8Array(16 * 1024);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      const joined = new Uint8Array(buffered.length + n);
      joined.set(buffered);
      joined.set(buf.subarray(0, n), buffered.length);
      let at = 0;
      while (joined.length - at >= 4) {
        const length = new DataView(joined.buffer, at).getUint32(0);
        if (joined.length - at - 4 < length) break;
        const wire = joined.subarray(at, at + 4 + length);
        const payload = wire.subarray(4);
        assert.ok(received < frames, `client ${client}: an extra (duplicated) frame`);
        assertFrameOf(payload, client, received, `client ${client}, frame ${received}`);
        assert.deepEqual(wire, sent[received], `client ${client}: frame ${received} differs`);
        received++;
        at += 4 + length;
      }
      buffered = joined.slice(at);
    }
    assert.equal(buffered.length, 0, `client ${client}: a partial frame at the end`);
    assert.equal(received, frames, `client ${client}: frames lost`);
    await writing;
  } finally {
    conn.close();
  }
}

for (
  const [label, handler] of [["echo", echo], ["echoSync", echoSync], [
    "echoHibernating",
    echoHibernating,
  ]] as const
) {
  Deno.test(`50 concurrent raw clients × 200 frames through ${label}: nothing lost, duplicated, reordered or corrupted`, async () => {
    const logger = capturingLogger();
    const server = await serve(handler, {
      hostname: HOST,
      port: 0,
      framing: lengthPrefixed(4),
      logger,
    });
    try {
      const port = portOf(server.addr);
      await within(
        10_000,
        Promise.all(Array.from({ length: 50 }, (_, client) => echoClient(port, client, 200))),
        `${label}: 50 clients`,
      );
      assert.deepEqual(logger.calls, []);
      assert.equal(server.acceptors()[0].accepted, 50);
    } finally {
      await server.stop();
    }
  });
}

// ---- The echo example as a process --------------------------------------------------------

const echoExample = new URL("../examples/echo_server.ts", import.meta.url).pathname;

/**
 * Run the echo example with `args`, wait for its `listening on HOST:PORT` line, run `exchange`
 * against it, then SIGTERM it and expect a graceful exit (code 0).
 */
async function withEchoProcess(
  args: string[],
  exchange: (port: number) => Promise<void>,
): Promise<void> {
  const example = await startProcess(
    ["run", "-A", echoExample, "--port", "0", "--hostname", HOST, ...args],
    /^(.*)\n/, // its first line
    { timeoutMs: 10_000 },
  );
  try {
    const line = example.match[1];
    const match = /^listening on 127\.0\.0\.1:(\d+)$/.exec(line);
    assert.ok(match, `unexpected first line: ${JSON.stringify(line)}`);
    const port = Number(match[1]);
    assert.ok(port > 0);
    await within(5000, exchange(port), "the exchange");
    example.child.kill("SIGTERM");
    const status = await within(5000, example.child.status, "the graceful exit");
    assert.equal(status.code, 0, `exit code (stderr: ${await example.stderr})`);
    assert.equal(status.signal, null);
    await assertRefused(port);
  } finally {
    await example.end();
  }
}

async function len4Exchange(port: number): Promise<void> {
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    const frames = [
      encoder.encode("hello"),
      new Uint8Array(0),
      Uint8Array.from({ length: 70_000 }, (_, i) => (i * 31) & 0xff),
      encoder.encode("last"),
    ];
    // All in one write, and then once more byte by byte for the first frame.
    const all = frames.map((frame) => wireOf([frame]));
    await writeAll(conn, concat(all));
    for (const frame of all) assert.deepEqual(await readExactly(conn, frame.length), frame);
    for (const byte of all[0]) await writeAll(conn, new Uint8Array([byte]));
    assert.deepEqual(await readExactly(conn, all[0].length), all[0]);
  } finally {
    conn.close();
  }
}

Deno.test("echo example process: --framing len4, then SIGTERM exits 0", async () => {
  await withEchoProcess(["--framing", "len4"], len4Exchange);
});

Deno.test("echo example process: --hibernate (len4), then SIGTERM exits 0", async () => {
  await withEchoProcess(["--hibernate"], async (port) => {
    // Two clients interleaved, each echoed while the other's connection hibernates.
    await Promise.all([len4Exchange(port), len4Exchange(port)]);
  });
});

Deno.test("echo example process: --framing line, then SIGTERM exits 0", async () => {
  await withEchoProcess(["--framing", "line"], async (port) => {
    const client = await LineClient.open(port);
    try {
      assert.equal(await client.request("hello"), "hello");
      assert.equal(await client.request("wörld ✓"), "wörld ✓");
      await writeAll(client.conn, encoder.encode("crlf\r\nsplit"));
      await writeAll(client.conn, encoder.encode(" line\n"));
      assert.equal(await within(3000, client.next()), "crlf");
      assert.equal(await within(3000, client.next()), "split line");
    } finally {
      await client.close();
    }
  });
});

Deno.test("echo example process: --framing raw, then SIGTERM exits 0", async () => {
  await withEchoProcess(["--framing", "raw"], async (port) => {
    const conn = await Deno.connect({ hostname: HOST, port });
    try {
      for (const size of [1, 100, 5000]) {
        const bytes = Uint8Array.from({ length: size }, (_, i) => (i * 7 + size) & 0xff);
        await writeAll(conn, bytes);
        assert.deepEqual(await readExactly(conn, size), bytes);
      }
    } finally {
      conn.close();
    }
  });
});

Deno.test("echo example process: SIGTERM with a client connected still exits 0", async () => {
  let held: LineClient | undefined;
  await withEchoProcess(["--framing", "line"], async (port) => {
    held = await LineClient.open(port);
    assert.equal(await held.request("stay"), "stay");
  });
  // The server shut the held connection down on its way out.
  assert.equal(await within(3000, held!.next()), null);
  await held!.close();
});
