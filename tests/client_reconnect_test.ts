// connect(…, { reconnect }): one handle for the client's whole life. A server stopped and started
// again on the same port: the handler sees disconnect, a fresh handler runs on the new socket, the
// same handle works again (registry entry and name follow it). Backoff timings within bounds; a
// handler that throws on every connect does not storm; calls while down fail at once with
// ConnectionDown; stop during a backoff or a reconnect leaves nothing behind; maxAttempts gives up;
// examples/echo_client.ts --reconnect finishes its run across dropped connections.
// Over real TCP on 127.0.0.1, port 0 (and the memory transport for pure logic), sanitizers on.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  ConnectionClosed,
  ConnectionDown,
  type From,
  type Handler,
  lengthPrefixed,
  lines,
  memory,
  MemoryRegistry,
  reply,
  send,
  serve,
  type Server,
  stop,
  tcp,
  TimeoutError,
  type Transport,
} from "../mod.ts";
import { capturingLogger, evalInChild, HOST, Inbox, pause, portOf, within } from "./_support.ts";
import { echoClient } from "../examples/echo_client.ts";

const quiet = { error() {}, warn() {}, debug() {} };
// Timers never fire early, but a poll or a timestamp may be a little late: lower bounds get this.
const SLACK = 3;

function echoServer(port = 0): Promise<Server<string>> {
  return serve(async function* () {
    for (let ev = yield; ev.type === "packet";) ev = yield send(ev.data);
  }, { hostname: HOST, port, framing: lines(), logger: quiet });
}

// tcp() that records when each connect starts.
function countingTcp(): { transport: Transport; attempts: number[] } {
  const base = tcp();
  const attempts: number[] = [];
  return {
    attempts,
    transport: {
      name: "tcp",
      listen: (options) => base.listen(options),
      connect: (options) => {
        attempts.push(performance.now());
        return base.connect(options);
      },
    },
  };
}

async function until(ms: number, what: string, ok: () => boolean): Promise<void> {
  await within(
    ms,
    (async () => {
      while (!ok()) await pause(1);
    })(),
    what,
  );
}

// A client handler that forwards each call to the echo server and replies with the echo, and
// records each run: the handle it was given and the events that ended it.
function forwarding(): {
  handler: Handler<string>;
  handles: Connection<string>[];
  ends: Inbox<string>;
} {
  const handles: Connection<string>[] = [];
  const ends = new Inbox<string>(3000);
  const handler: Handler<string> = async function* (conn) {
    handles.push(conn);
    const waiting: From[] = [];
    for (let ev = yield;;) {
      if (ev.type === "call") {
        waiting.push(ev.from);
        ev = yield send(String(ev.message));
      } else if (ev.type === "packet") ev = yield reply(waiting.shift()!, ev.data);
      else if (ev.type === "disconnect" || ev.type === "shutdown") {
        ends.push(ev.type);
        return;
      } else ev = yield;
    }
  };
  return { handler, handles, ends };
}

Deno.test("reconnect: a server restarted on the same port gets the same handle back, with a fresh handler", async () => {
  let server = await echoServer();
  const port = portOf(server.addr);
  const registry = new MemoryRegistry();
  const { handler, handles, ends } = forwarding();
  const client = await connect(handler, {
    hostname: HOST,
    port,
    framing: lines(),
    name: "primary",
    registry,
    reconnect: { initialDelay: 20, multiplier: 2, maxDelay: 100 },
    logger: quiet,
  });
  assert.equal(client.state, "up");
  assert.equal(await client.call("one"), "one");
  assert.equal((await registry.lookup("primary"))?.id, client.id);
  const firstLocal = client.localAddr;

  // The server goes away: the handler sees disconnect, the client backs off; the handle stays.
  await server.stop();
  assert.equal(await ends.next(), "disconnect");
  await until(1000, "backing off", () => client.state === "backing-off");
  assert.deepEqual(await registry.list(), []);
  // Meanwhile everything fails at once, with ConnectionDown.
  const started = performance.now();
  await assert.rejects(client.call("lost"), ConnectionDown);
  await assert.rejects(client.sendSync("lost"), ConnectionDown);
  assert.throws(() => client.send("lost"), ConnectionDown);
  assert.throws(() => client.cast("lost"), ConnectionDown);
  assert.throws(() => client.info("lost"), (err: Error) => err instanceof ConnectionClosed);
  assert.ok(performance.now() - started < 50);
  await assert.rejects(client.whenUp({ timeout: 5 }), TimeoutError);

  // It comes back on the same port: a fresh handler runs, given the same handle.
  server = await echoServer(port);
  await within(3000, client.whenUp(), "whenUp");
  assert.equal(client.state, "up");
  assert.equal(handles.length, 2);
  assert.equal(handles[0], client);
  assert.equal(handles[1], client);
  assert.equal(await client.call("two"), "two");
  assert.notDeepEqual(client.localAddr, firstLocal);
  // One registry entry, under the same id, and the name claimed again.
  const entries = await registry.list();
  assert.deepEqual(entries.map((e) => e.id), [client.id]);
  assert.equal((await registry.lookup("primary"))?.id, client.id);
  assert.equal(client.name, "primary");

  // Stopped for good: shutdown reaches the handler; closed and done settle; no reconnect.
  await client.stop();
  assert.equal(await ends.next(), "shutdown");
  assert.equal(client.state, "closed");
  assert.equal(await client.closed, "normal");
  await client.done;
  await assert.rejects(client.call("after"), ConnectionClosed);
  client.send("dropped, as on any closed connection");
  await assert.rejects(client.whenUp(), ConnectionClosed);
  assert.deepEqual(await registry.list(), []);
  await server.stop();
  assert.equal(handles.length, 2);
});

Deno.test("reconnect: backoff waits grow within bounds, and reset once a connection stayed up", async () => {
  const server = await echoServer();
  const port = portOf(server.addr);
  const { transport, attempts } = countingTcp();
  const { handler } = forwarding();
  const client = await connect(handler, {
    hostname: HOST,
    port,
    transport,
    framing: lines(),
    reconnect: { initialDelay: 20, multiplier: 2, maxDelay: 160, jitter: 0.2 },
    logger: quiet,
  });
  const killed = performance.now();
  await server.stop();
  // Four refused reconnects: waits of 20, 40, 80, 160 ms (each ± 20 %) after the drop.
  await until(3000, "4 reconnects", () => attempts.length >= 5);
  const times = [killed, ...attempts.slice(1, 5)];
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  [20, 40, 80, 160].forEach((d, i) => {
    assert.ok(gaps[i] >= d * 0.8 - SLACK, `wait ${i}: ${gaps[i]} ms < ${d * 0.8}: ${gaps}`);
    assert.ok(gaps[i] <= d * 1.2 + 250, `wait ${i}: ${gaps[i]} ms: ${gaps}`);
  });
  assert.ok(client.state === "backing-off" || client.state === "connecting");

  // Back (within one capped wait), and up longer than initialDelay: the next wait is ~20 ms again.
  const again = await echoServer(port);
  await within(2000, client.whenUp(), "whenUp");
  assert.equal(await client.call("back"), "back");
  await pause(40);
  const before = attempts.length;
  const killedAgain = performance.now();
  await again.stop();
  await until(1000, "a reconnect after the second drop", () => attempts.length > before);
  const wait = attempts[before] - killedAgain;
  assert.ok(wait >= 16 - SLACK && wait < 120, `first wait after a reset: ${wait} ms`);
  await client.stop();
  assert.equal(client.state, "closed");
});

Deno.test("reconnect: a handler that throws on every new socket backs off, never storms", async () => {
  const transport = memory(`reconnect-throws-${crypto.randomUUID()}`);
  // The server ends each connection at its first packet.
  const server = await serve(async function* () {
    yield;
  }, { transport, logger: quiet });
  const starts: number[] = [];
  const client = await connect(async function* () {
    starts.push(performance.now());
    if (starts.length > 1) throw new Error("boom"); // before its first yield: a failed start
    for (let ev = yield send("bye"); ev.type !== "disconnect";) ev = yield;
  }, {
    transport,
    reconnect: { initialDelay: 20, multiplier: 2, maxDelay: 1000, jitter: 0.2 },
    logger: quiet,
  });
  await pause(400);
  // The first run ended within initialDelay of coming up: a failure, as is every failed start.
  // Waits of 20, 40, 80, 160, 320 ms at least × 0.8: no more than 5 reconnects fit in 400 ms.
  const reconnects = starts.length - 1;
  assert.ok(reconnects >= 3 && reconnects <= 5, `${reconnects} reconnects in 400 ms`);
  const gaps = starts.slice(1).map((t, i) => t - starts[i]);
  gaps.forEach((gap, i) => {
    const least = 20 * 2 ** i * 0.8 - SLACK;
    assert.ok(gap >= least, `gap ${i}: ${gap} ms < ${least}: ${gaps}`);
  });
  assert.notEqual(client.state, "up");
  await client.stop();
  assert.equal(client.state, "closed");
  await server.stop();
});

Deno.test("reconnect: stop during a backoff ends it at once and leaves no timer", async () => {
  const transport = memory(`reconnect-stop-${crypto.randomUUID()}`);
  const server = await serve(async function* () {
    yield;
  }, { transport, logger: quiet });
  const { handler, ends } = forwarding();
  const client = await connect(handler, {
    transport,
    framing: lines(),
    reconnect: { initialDelay: 60_000 },
    logger: quiet,
  });
  await server.stop();
  assert.equal(await ends.next(), "disconnect");
  await until(1000, "backing off", () => client.state === "backing-off");
  const waiting = client.whenUp();
  const started = performance.now();
  await client.stop();
  assert.ok(performance.now() - started < 100);
  assert.equal(client.state, "closed");
  await assert.rejects(waiting, ConnectionClosed);
  assert.equal(await client.closed, "normal");
  assert.equal(client.closeReason, "normal");
  await client.done;
});

Deno.test("reconnect: stop during a reconnect under way stops the new socket once it is up", async () => {
  const base = memory(`reconnect-gate-${crypto.randomUUID()}`);
  const gate = Promise.withResolvers<void>();
  let connects = 0;
  const transport: Transport = {
    name: "memory",
    listen: (options) => base.listen(options),
    connect: async (options) => {
      if (++connects > 1) await gate.promise; // the reconnect waits here
      return base.connect(options);
    },
  };
  const serving = () =>
    serve(async function* () {
      for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
    }, { transport: base, logger: quiet });
  let server = await serving();
  const { handler, ends } = forwarding();
  const client = await connect(handler, {
    transport,
    framing: lines(),
    reconnect: { initialDelay: 5 },
    logger: quiet,
  });
  await server.stop();
  assert.equal(await ends.next(), "disconnect");
  server = await serving();
  await until(1000, "connecting", () => client.state === "connecting");
  const stopping = client.stop("enough");
  gate.resolve();
  await within(2000, stopping, "stop");
  // The new socket came up, its handler got the shutdown, and nothing reconnects after.
  assert.equal(await ends.next(), "shutdown");
  assert.equal(client.state, "closed");
  assert.equal(connects, 2);
  await server.stop();
});

Deno.test("reconnect: maxAttempts gives up; closed and done settle with ConnectionDown", async () => {
  const transport = memory(`reconnect-give-up-${crypto.randomUUID()}`);
  const server = await serve(async function* () {
    yield;
  }, { transport, logger: quiet });
  const logger = capturingLogger();
  const { handler } = forwarding();
  const client = await connect(handler, {
    transport,
    framing: lines(),
    reconnect: { initialDelay: 5, multiplier: 1, jitter: 0, maxAttempts: 3 },
    logger,
  });
  await server.stop();
  const reason = await within(2000, client.closed, "give up");
  assert.ok(reason instanceof ConnectionDown);
  assert.equal(reason.gaveUpAfter, 3);
  assert.ok(reason.cause instanceof Deno.errors.ConnectionRefused, String(reason.cause));
  await assert.rejects(client.done, ConnectionDown);
  assert.equal(client.state, "closed");
  // Each failed reconnect is one debug line; giving up one warning.
  assert.equal(logger.levels.filter((l) => l === "debug").length, 3);
  assert.deepEqual(logger.levels.filter((l) => l === "warn").length, 1);
  await assert.rejects(client.call("x"), ConnectionClosed);
});

Deno.test("reconnect: the first connect is not retried, and bad options are refused up front", async () => {
  const transport = memory(`reconnect-nobody-${crypto.randomUUID()}`);
  const handler = async function* () {
    yield;
  };
  await assert.rejects(
    connect(handler, { transport, reconnect: true }),
    Deno.errors.ConnectionRefused,
  );
  const cases: [unknown, ErrorConstructor, RegExp][] = [
    ["yes", TypeError, /connect: option reconnect must be false, true or \{/],
    [{ initialDelay: -1 }, RangeError, /connect: reconnect: option initialDelay/],
    [{ multiplier: 0.5 }, RangeError, /connect: reconnect: option multiplier/],
    [{ jitter: 2 }, RangeError, /connect: reconnect: option jitter/],
    [{ maxAttempts: 1.5 }, RangeError, /connect: reconnect: option maxAttempts/],
  ];
  for (const [reconnect, type, message] of cases) {
    await assert.rejects(
      connect(handler, { transport, reconnect: reconnect as never }),
      (err: Error) => err instanceof type && message.test(err.message),
      JSON.stringify(reconnect),
    );
  }
  const server = await serve(async function* () {
    yield;
  }, { transport });
  const plain = await connect(handler, { transport });
  assert.equal(plain.state, "up");
  await assert.rejects(plain.whenUp({ timeout: -1 }), RangeError);
  await plain.whenUp();
  await plain.stop();
  assert.equal(plain.state, "closed");
  await assert.rejects(plain.whenUp(), ConnectionClosed);
  await server.stop();
});

Deno.test("examples/echo_client.ts --reconnect goes on across dropped connections", async () => {
  // An echo server that closes each connection after 50 echoes.
  let connections = 0;
  const server = await serve(async function* () {
    connections++;
    let ev = yield;
    for (let n = 0; ev.type === "packet"; n++) {
      if (n === 50) return;
      ev = yield send(ev.data);
    }
  }, { hostname: HOST, port: 0, framing: lengthPrefixed(4), logger: quiet });
  const args = { hostname: HOST, port: portOf(server.addr), count: 200, size: 16, timeout: 2000 };
  await assert.rejects(echoClient(args), /the server closed the connection after 50 of 200/);
  connections = 0;
  const { seconds } = await within(10_000, echoClient({ ...args, reconnect: true }), "echoClient");
  assert.ok(seconds > 0);
  assert.equal(connections, 4); // 50 echoes on each
  await server.stop();
});

Deno.test("reconnect: while a socket is closing, requests fail with ConnectionDown naming why it is ending", async () => {
  const transport = memory("reconnect-closing-reason");
  const server = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
  }, { transport, logger: quiet });
  const leaving = Promise.withResolvers<void>();
  const finallyRuns = Promise.withResolvers<void>();
  const client = await connect(async function* () {
    try {
      for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
        if (ev.type === "cast") yield stop("server gone");
        ev = yield;
      }
    } finally {
      finallyRuns.resolve();
      await leaving.promise; // a slow finally: the socket is closing meanwhile
    }
  }, { transport, reconnect: { initialDelay: 1, maxDelay: 1 }, logger: quiet });
  client.cast("leave");
  await within(2000, finallyRuns.promise, "the finally runs");
  assert.equal(client.state, "closing");
  await assert.rejects(
    client.call("x"),
    (err: Error) => err instanceof ConnectionDown && /last: server gone/.test(err.message),
  );
  leaving.resolve();
  await client.stop();
  await server.stop();
});

Deno.test("reconnect: unref() holds for the sockets after the first (the process can still exit)", async () => {
  // The server ends each connection at its first frame: the child's client reconnects.
  const server = await serve(async function* () {
    const ev = yield;
    if (ev.type === "packet") yield stop();
  }, { hostname: HOST, port: 0, logger: quiet });
  try {
    const script = `
      import { connect } from "./mod.ts";
      const conn = await connect(async function* () {
        for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect"; ev = yield);
      }, { port: ${portOf(server.addr)}, reconnect: { initialDelay: 1, maxDelay: 1 } });
      conn.unref();
      conn.send("bye"); // the server ends this socket
      while (conn.state === "up") await new Promise((r) => setTimeout(r, 1));
      await conn.whenUp({ timeout: 5000 });
      console.log("reconnected, unref'd");
    `;
    const out = await evalInChild(script, 10_000);
    assert.equal(out.code, 0, out.stderr);
    assert.equal(out.stdout.trim(), "reconnected, unref'd");
  } finally {
    await server.stop();
  }
});
