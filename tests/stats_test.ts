// Statistics (Erlang's sys:statistics and sys:get_state): conn.stats() exact after a scripted
// exchange over TCP, the mailbox and pending calls while a handler is busy, the handler's state
// while hibernated, server.stats() totals by reason and per acceptor, pool.stats() totals, and a
// reconnecting client's stats.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  createPool,
  type From,
  type HandlerGenerator,
  hibernate,
  lengthPrefixed,
  lines,
  memory,
  reply,
  send,
  serve,
  stop,
} from "../mod.ts";
import { HOST, Inbox, portOf, readExactly, within } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };
const encoder = new TextEncoder();

async function onlyConnection<T>(
  server: { connections(): Connection<T>[] },
): Promise<Connection<T>> {
  for (let i = 0; i < 5000; i++) {
    const [conn] = server.connections();
    if (conn) return conn;
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  throw new Error("no connection");
}

Deno.test("stats: counters exact after a scripted exchange over TCP", async () => {
  const before = Date.now();
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      ev = yield [send(`got ${ev.data}`), send("ok")]; // two frames out per frame in
    }
  }, { hostname: HOST, port: 0, framing: lines() });
  const socket = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  await socket.write(encoder.encode("a\nbb\n"));
  const expected = "got a\nok\ngot bb\nok\n";
  const got = await within(5000, readExactly(socket, expected.length), "replies");
  assert.equal(new TextDecoder().decode(got), expected);
  const conn = await onlyConnection(server);
  // The handler is at its yield: its last sends are written (bytesOut) once drained.
  await conn.drain();
  const stats = conn.stats();
  assert.deepEqual({ ...stats, startedAt: 0, lastEventAt: 0 }, {
    state: "waiting",
    bytesIn: 5,
    bytesOut: expected.length,
    framesIn: 2,
    framesOut: 4,
    framesDropped: 0,
    bufferedAmount: 0,
    mailbox: 0,
    callsPending: 0,
    startedAt: 0,
    lastEventAt: 0,
    traced: false,
  });
  assert.ok(stats.startedAt >= before - 1 && stats.startedAt <= Date.now(), "startedAt");
  assert.ok(stats.lastEventAt! >= stats.startedAt && stats.lastEventAt! <= Date.now());
  assert.equal(conn.bytesRead, stats.bytesIn);
  assert.equal(conn.bytesWritten, stats.bytesOut);
  socket.close();
  await conn.closed;
  assert.equal(conn.stats().state, "closed");
  assert.equal(conn.stats().framesIn, 2, "kept once closed");
  await server.stop();
});

Deno.test("stats: mailbox, running and pending calls while the handler is busy; sends from outside count", async () => {
  const transport = memory("stats-busy");
  const release = Promise.withResolvers<void>();
  const asked = new Inbox<void>();
  const server = await serve(async function* (): HandlerGenerator<string> {
    let ev = yield;
    await release.promise; // busy: events wait in the mailbox
    let from: From | undefined;
    for (; ev.type !== "shutdown"; ev = yield) {
      if (ev.type === "call") {
        from = ev.from; // answered on a later event
        asked.push();
      } else if (ev.type === "cast" && ev.message === "answer" && from) {
        ev = yield reply(from, "answered");
      }
    }
  }, { transport, framing: lines() });
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
  }, { transport, framing: lines() });
  const conn = await onlyConnection(server);
  assert.equal(conn.stats().lastEventAt, undefined, "no event yet");
  conn.cast(1); // taken: the handler is now stuck in its await
  for (let i = 0; i < 50 && conn.stats().state !== "running"; i++) await Promise.resolve();
  assert.equal(conn.stats().state, "running");
  conn.cast(2);
  conn.info(3);
  const answer = conn.call("q", { timeout: 5000 });
  let stats = conn.stats();
  assert.equal(stats.mailbox, 3);
  assert.equal(stats.callsPending, 1);
  conn.send("from outside");
  conn.send("and again");
  release.resolve();
  await asked.next();
  stats = conn.stats();
  assert.equal(stats.mailbox, 0);
  assert.equal(stats.callsPending, 1, "taken, not yet answered");
  assert.equal(stats.state, "waiting");
  assert.equal(stats.framesOut, 2);
  conn.cast("answer");
  assert.equal(await answer, "answered");
  assert.equal(conn.stats().callsPending, 0);
  await client.stop();
  await server.stop();
});

Deno.test("stats: a hibernated connection's state and handlerState", async () => {
  const transport = memory("stats-hibernate");
  const server = await serve(function* (_conn, count: number = 0): HandlerGenerator<string> {
    if (count > 0) {
      const ev = yield; // the event that woke it
      if (ev.type === "cast" && ev.message === "stop") return;
    }
    yield hibernate(count + 1);
  }, { transport, framing: lines() });
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
  }, { transport, framing: lines() });
  const conn = await onlyConnection(server);
  for (let i = 0; i < 100 && conn.stats().state !== "hibernated"; i++) await Promise.resolve();
  assert.equal(conn.stats().state, "hibernated");
  assert.equal(conn.handlerState(), 1);
  conn.cast("more"); // wakes, hibernates again with the count + 1
  for (let i = 0; i < 100 && conn.handlerState() !== 2; i++) await Promise.resolve();
  assert.equal(conn.handlerState(), 2);
  assert.equal(conn.stats().state, "hibernated");
  assert.equal(server.stats().hibernated, 1);
  conn.cast("stop");
  await conn.closed;
  await client.closed;
  await server.stop();
});

Deno.test("stats: server.stats() counts accepted, open, closed by reason, bytes and frames, per acceptor", async () => {
  const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
    for (let ev = yield; ev.type === "packet";) {
      ev = yield ev.data[0] === 0x6b ? [send(ev.data), stop("kicked")] : send(ev.data); // "k"
    }
  }, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(1, { maxLength: 8 }),
    logger: quiet,
  });
  const port = portOf(server.addr);
  const frame = (text: string) => new Uint8Array([text.length, ...encoder.encode(text)]);
  // One echoes a frame and leaves (normal), one is kicked, one sends a frame too large.
  const normal = await Deno.connect({ hostname: HOST, port });
  await normal.write(frame("hello"));
  await readExactly(normal, 6);
  normal.close();
  const kicked = await Deno.connect({ hostname: HOST, port });
  await kicked.write(frame("k"));
  await readExactly(kicked, 2);
  const tooLarge = await Deno.connect({ hostname: HOST, port });
  await tooLarge.write(new Uint8Array([200]));
  const open = await Deno.connect({ hostname: HOST, port });
  await open.write(frame("hi"));
  await readExactly(open, 3);
  for (let i = 0; i < 5000 && server.stats().closed < 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  const stats = server.stats();
  assert.equal(stats.name, server.name);
  assert.equal(stats.status, "running");
  assert.equal(stats.accepted, 4);
  assert.equal(stats.open, 1);
  assert.equal(stats.handshaking, 0);
  assert.equal(stats.hibernated, 0);
  assert.equal(stats.closed, 3);
  assert.deepEqual(stats.closedByReason, { normal: 1, kicked: 1, FrameTooLarge: 1 });
  assert.equal(stats.bytesIn, 6 + 2 + 1 + 3);
  assert.equal(stats.bytesOut, 6 + 2 + 3);
  assert.equal(stats.framesIn, 3);
  assert.equal(stats.framesOut, 3);
  assert.deepEqual(stats.acceptors.map((a) => a.accepted), [4]);
  kicked.close();
  tooLarge.close();
  open.close();
  await server.stop();
  assert.equal(server.stats().status, "stopped");
  assert.equal(server.stats().open, 0);
  assert.equal(server.stats().closed, 4);
});

Deno.test("stats: pool.stats() adds hibernated, closed by reason, bytes and frames over its connections", async () => {
  const transport = memory("stats-pool");
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
  }, { transport, framing: lines() });
  const pool = await createPool(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "call" || ev.type === "cast";) {
      ev = ev.type === "cast"
        ? yield stop("retired")
        : yield [send(String(ev.message)), reply(ev.from, 1)];
    }
  }, {
    addresses: [{ transport }],
    framing: lines(),
    waitReady: true,
    reconnect: false,
    logger: quiet,
  });
  assert.equal(await pool.call("ping"), 1);
  const [conn] = pool.connections();
  await conn.drain();
  let stats = pool.stats();
  assert.equal(stats.framesOut, 1);
  assert.equal(stats.bytesOut, 5);
  assert.equal(stats.hibernated, 0);
  assert.deepEqual(stats.closedByReason, {});
  conn.cast("retire");
  await conn.closed;
  stats = pool.stats();
  assert.deepEqual(stats.closedByReason, { retired: 1 });
  assert.equal(stats.bytesOut, 5, "kept after the connection closed");
  await pool.stop();
  await server.stop();
});

Deno.test("stats: a reconnecting client reports its current socket's", async () => {
  const transport = memory("stats-reconnect");
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
  }, { transport, framing: lines() });
  const echoed = new Inbox<string>();
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield) echoed.push(ev.data);
  }, { transport, framing: lines(), reconnect: { initialDelay: 1 } });
  client.send("one");
  assert.equal(await echoed.next(), "one");
  assert.equal(client.stats().framesIn, 1);
  assert.equal(client.stats().framesOut, 1);
  assert.equal(client.handlerState(), undefined);
  await client.stop();
  assert.equal(client.stats().state, "closed");
  await server.stop();
});
