// Tracing (Erlang's sys:trace): every event in, every action out, hibernate, wake, upgrade and
// close, in order, for scripted connections over the memory transport; `trace: true` writing
// lines to the logger over TCP; a callback that throws turned off once without ending the
// connection; `conn.trace` on a live connection, `recentTrace`, bounded details; the option on
// connect and createPool; bad values refused.

import assert from "node:assert/strict";
import {
  closeWrite,
  connect,
  createPool,
  type Event,
  type HandlerGenerator,
  hibernate,
  lengthPrefixed,
  lines,
  memory,
  recv,
  reply,
  send,
  serve,
  setFraming,
  setOptions,
  setTimeout,
  stop,
  type TraceEntry,
} from "../mod.ts";
import { formatTraceEntry, render, TRACE_DETAIL_MAX } from "../_trace.ts";
import { capturingLogger, HOST, Inbox, portOf, within } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };

// Collects trace entries; `until` waits for the first entry (from now on) matching kind and type.
class Collector {
  readonly entries: TraceEntry[] = [];
  readonly #inbox = new Inbox<TraceEntry>(5000);
  readonly sink = (entry: TraceEntry): void => {
    this.entries.push(entry);
    this.#inbox.push(entry);
  };
  async until(kind: string, type = kind): Promise<TraceEntry> {
    for (;;) {
      const entry = await this.#inbox.next(5000, `trace entry ${kind} ${type}`);
      if (entry.kind === kind && entry.type === type) return entry;
    }
  }
  lines(): string[] {
    return this.entries.map((e) => `${e.kind} ${e.type}`);
  }
}

// A client that waits until the server leaves (or it is stopped).
function idleClient(): HandlerGenerator<string> {
  return (async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
  })();
}

Deno.test("trace: every event and action of a scripted connection, with hibernate, wake, upgrade and close, in order", async () => {
  const transport = memory("trace-script");
  const traced = new Collector();
  async function* v1(): HandlerGenerator<string> {
    let ev: Event<string> = yield setTimeout(Infinity);
    assert.equal(ev.type, "packet");
    ev = yield send(`hi ${ev.type === "packet" ? ev.data : ""}`);
    assert.equal(ev.type, "call");
    ev = yield reply(ev.type === "call" ? ev.from : { ref: -1 }, "answer");
    assert.equal(ev.type, "cast");
    ev = yield setTimeout(1, "tick");
    assert.equal(ev.type, "timeout");
    ev = yield setOptions({ noDelay: true });
    assert.equal(ev.type, "info");
    yield hibernate({ n: 1 });
  }
  function* v2(_conn: unknown, state: { n: number }): HandlerGenerator<string> {
    let ev = yield setFraming(lines({ maxLength: 8 }));
    assert.equal(ev.type, "cast");
    ev = yield send(`n=${state.n}`);
    assert.equal(ev.type, "frameError");
    yield stop("bad input");
  }
  const server = await serve(v1, {
    transport,
    framing: lines(),
    trace: traced.sink,
    logger: quiet,
  });
  const client = await connect(idleClient, { transport, framing: lines() });
  const start = await traced.until("start");
  const [conn] = server.connections();
  assert.equal(start.connection, conn.id);
  client.send("hello");
  await traced.until("out", "send");
  assert.equal(await conn.call("question"), "answer");
  conn.cast("go");
  await traced.until("in", "timeout");
  conn.info("sleep");
  await traced.until("hibernate");
  conn.upgrade(v2, { codeChange: (s) => ({ n: (s as { n: number }).n + 1 }) });
  conn.cast("wake");
  await traced.until("out", "send");
  client.send("this line is far too long");
  const closed = await traced.until("close");
  await client.closed;
  await server.stop();

  assert.deepEqual(traced.lines(), [
    "start start",
    "out setTimeout",
    "in packet",
    "out send",
    "in call",
    "out reply",
    "in cast",
    "out setTimeout",
    "in timeout",
    "out setOptions",
    "in info",
    "out hibernate",
    "hibernate hibernate",
    "wake wake",
    "upgrade upgrade",
    "out setFraming",
    "in cast",
    "out send",
    "in frameError",
    "out stop",
    "close close",
  ]);
  const details = traced.entries.map((e) => e.detail);
  assert.equal(details[1], "Infinity ms");
  assert.equal(details[2], '"hello"');
  assert.equal(details[3], '"hi hello"');
  assert.match(details[4], /^"question" \(from \d+\)$/);
  assert.match(details[5], /^"answer" \(to \d+\)$/);
  assert.equal(details[7], '1 ms "tick"');
  assert.equal(details[8], '"tick"');
  assert.equal(details[9], "{noDelay: true}");
  assert.equal(details[11], "{n: 1}");
  assert.equal(details[13], "cast");
  assert.equal(details[14], "v2");
  assert.equal(details[15], "lines");
  assert.equal(details[17], '"n=2"');
  assert.match(details[18], /^FrameTooLarge: /);
  assert.equal(closed.detail, '"bad input"');
  // One connection, in time order.
  assert.ok(traced.entries.every((e) => e.connection === conn.id));
  for (let i = 1; i < traced.entries.length; i++) {
    assert.ok(traced.entries[i].time >= traced.entries[i - 1].time);
  }
});

Deno.test("trace: passive mode's recv, recvTimeout, closeWrite and the peer's disconnect", async () => {
  const transport = memory("trace-passive");
  const traced = new Collector();
  const server = await serve(async function* (): HandlerGenerator<string> {
    let ev = yield recv(5);
    assert.equal(ev.type, "recvTimeout");
    ev = yield recv();
    assert.equal(ev.type, "packet");
    ev = yield [closeWrite(), recv()];
    assert.equal(ev.type, "disconnect");
  }, { transport, framing: lines(), mode: "passive", trace: traced.sink });
  const client = await connect(idleClient, { transport, framing: lines() });
  await traced.until("in", "recvTimeout");
  client.send("x");
  await traced.until("close");
  await client.closed;
  await server.stop();
  assert.deepEqual(traced.lines(), [
    "start start",
    "out recv",
    "in recvTimeout",
    "out recv",
    "in packet",
    "out closeWrite",
    "out recv",
    "in disconnect",
    "close close",
  ]);
  assert.equal(traced.entries[1].detail, "5 ms");
  assert.equal(traced.entries[7].detail, "read");
  assert.equal(traced.entries[8].detail, '"normal"');
});

Deno.test("trace: an upgrade event to a running handler, then a forced stop and the finally's yields", async () => {
  const transport = memory("trace-upgrade");
  const traced = new Collector();
  const server = await serve(async function* (): HandlerGenerator<string> {
    try {
      for (;;) yield; // ignores shutdown: forced at the stop's timeout
    } finally {
      yield send("bye"); // performed, and resumed at once with a shutdown event
    }
  }, { transport, framing: lines(), trace: traced.sink, logger: quiet });
  const client = await connect(idleClient, { transport, framing: lines() });
  await traced.until("start");
  server.upgrade(function* newCode() {});
  await traced.until("in", "upgrade");
  await server.stop("shutdown", { timeout: 0 });
  await client.closed;
  assert.deepEqual(traced.lines(), [
    "start start",
    "in upgrade",
    "in shutdown",
    "out send",
    "in shutdown",
    "close close",
  ]);
  assert.equal(traced.entries[1].detail, "newCode");
  assert.equal(traced.entries[2].detail, '"shutdown"');
  assert.equal(traced.entries[3].detail, '"bye"');
});

Deno.test("trace: true writes one line per entry to the logger's debug (over TCP)", async () => {
  const logger = capturingLogger();
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data.toUpperCase()));
  }, { hostname: HOST, port: 0, framing: lines(), trace: true, logger });
  const socket = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  await socket.write(new TextEncoder().encode("ping\n"));
  const buf = new Uint8Array(16);
  const n = await within(5000, socket.read(buf), "echo");
  assert.equal(new TextDecoder().decode(buf.subarray(0, n!)), "PING\n");
  socket.close();
  await server.waitForConnections("==", 0, { timeout: 5000 });
  await server.stop();
  const logged = logger.calls.filter((_, i) => logger.levels[i] === "debug").map((c) =>
    String(c[0])
  );
  const id = /^etcp trace (\S+) /.exec(logged[0])?.[1];
  assert.ok(id, logged[0]);
  const shape = logged.map((line) => line.replace(/^etcp trace \S+ [\d.]+ /, ""));
  assert.deepEqual(shape.slice(1), [
    'in packet "ping"',
    'out send "PING"',
    "in disconnect read",
    'close "normal"',
  ]);
  assert.match(shape[0], /^start 127\.0\.0\.1:\d+$/);
  assert.ok(logged.every((line) => line.startsWith(`etcp trace ${id} `)));
});

Deno.test("trace: a callback that throws is reported once and turned off, mid-step too; the connection goes on", async () => {
  const logger = capturingLogger();
  const transport = memory("trace-throws");
  let calls = 0;
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) ev = yield [send(ev.data), send(ev.data)];
  }, {
    transport,
    framing: lines(),
    logger,
    // It throws at the first action of a step: the action after it must not reach it either.
    trace: (entry) => {
      if (entry.kind !== "out") return;
      calls++;
      throw new Error("trace sink broken");
    },
  });
  const echoes = new Inbox<string>();
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield) echoes.push(ev.data);
  }, { transport, framing: lines() });
  client.send("one");
  assert.deepEqual([await echoes.next(), await echoes.next()], ["one", "one"]);
  client.send("two");
  assert.deepEqual([await echoes.next(), await echoes.next()], ["two", "two"]);
  assert.equal(calls, 1, "called once, then off");
  const warns = logger.calls.filter((_, i) => logger.levels[i] === "warn");
  assert.equal(warns.length, 1);
  assert.match(String(warns[0][0]), /trace callback threw.*trace sink broken/);
  const [conn] = server.connections();
  assert.equal(conn.state, "up");
  assert.deepEqual(conn.recentTrace(), []);
  await client.stop();
  await server.stop();
  assert.equal(logger.levels.filter((l) => l === "error").length, 0);
});

Deno.test("trace: conn.trace turns tracing on and off for one live connection; recentTrace keeps the last 50, details bounded", async () => {
  const transport = memory("trace-live");
  const framing = lengthPrefixed(4);
  const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
  }, { transport, framing });
  const echoed = new Inbox<number>();
  const client = await connect(async function* (): HandlerGenerator<Uint8Array> {
    for (let ev = yield; ev.type === "packet"; ev = yield) echoed.push(ev.data.length);
  }, { transport, framing });
  await server.waitForConnections("==", 1, { timeout: 5000 });
  const [conn] = server.connections();
  assert.deepEqual(conn.recentTrace(), []);
  client.send("untraced");
  await echoed.next();

  const traced = new Collector();
  conn.trace(traced.sink);
  const big = new Uint8Array(1 << 20).fill(0x41);
  client.send(big);
  assert.equal(await echoed.next(), big.length);
  const [inBig, outBig] = traced.entries;
  assert.equal(inBig.kind, "in");
  assert.ok(inBig.detail.length <= TRACE_DETAIL_MAX, `${inBig.detail.length}`);
  assert.match(inBig.detail, /^Uint8Array\(\d+\) "AAAA/);
  assert.equal(outBig.kind, "out");

  for (let i = 0; i < 40; i++) {
    client.send(String(i));
    await echoed.next();
  }
  const recent = conn.recentTrace();
  assert.equal(recent.length, 50);
  assert.deepEqual(recent, traced.entries.slice(-50));

  conn.trace(false);
  const before = traced.entries.length;
  client.send("after");
  await echoed.next();
  assert.equal(traced.entries.length, before);
  assert.deepEqual(conn.recentTrace(), []);
  assert.throws(() => conn.trace(1 as unknown as boolean), TypeError);
  await client.stop();
  await server.stop();
});

Deno.test("trace: the option of connect and createPool traces their connections", async () => {
  const transport = memory("trace-clients");
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
  }, { transport, framing: lines() });
  const fromClient = new Collector();
  const client = await connect(async function* (): HandlerGenerator<string> {
    yield send("from client");
    for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
  }, { transport, framing: lines(), trace: fromClient.sink });
  assert.equal((await fromClient.until("in", "packet")).detail, '"from client"');
  assert.equal(fromClient.entries[0].connection, client.id);

  const fromPool = new Collector();
  const pool = await createPool(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "call"; ev = yield reply(ev.from, "pooled"));
  }, { addresses: [{ transport }], framing: lines(), trace: fromPool.sink, waitReady: true });
  assert.equal(await pool.call("hello"), "pooled");
  const call = await fromPool.until("in", "call");
  assert.equal(call.connection, pool.connections()[0].id);
  await pool.stop();
  await client.stop();
  await server.stop();
});

Deno.test("trace: bad option values are refused up front", async () => {
  const handler = async function* () {};
  await assert.rejects(
    serve(handler, { transport: memory("trace-bad"), trace: "yes" as unknown as boolean }),
    { name: "TypeError", message: /option trace must be true, false or a function/ },
  );
  await assert.rejects(
    connect(handler, { transport: memory("trace-bad"), trace: 1 as unknown as boolean }),
    TypeError,
  );
});

Deno.test("trace: a value that throws when read is traced as [unrenderable], and still delivered", async () => {
  const throwing = {
    get x() {
      throw new Error("getter");
    },
  };
  const revoked = Proxy.revocable({}, {});
  revoked.revoke();
  assert.equal(render(throwing), "[unrenderable]");
  assert.equal(render(revoked.proxy), "[unrenderable]");
  const transport = memory("trace-unrenderable");
  const got = new Inbox<unknown>();
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect"; ev = yield) {
      if (ev.type === "info") got.push(ev.message);
    }
  }, { transport, framing: lines(), trace: () => {} });
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield);
  }, { transport, framing: lines() });
  const [conn] = server.connections();
  conn.info(throwing);
  assert.equal(await got.next(), throwing);
  assert.ok(conn.recentTrace().some((e) => e.detail.includes("[unrenderable]")));
  await client.stop();
  await server.stop();
});

Deno.test("trace: render is short for any value, and formatTraceEntry is one line", () => {
  assert.equal(render(new TextEncoder().encode("hi\n")), 'Uint8Array(3) "hi\\n"');
  assert.equal(render(new Uint8Array([0, 1, 255])), "Uint8Array(3) 00 01 ff");
  assert.equal(render("x".repeat(10_000)).length, TRACE_DETAIL_MAX);
  assert.equal(render({ a: [1, { b: { c: 1 } }], s: "t" }), '{a: [1, {…}], s: "t"}');
  const cyclic: Record<string, unknown> = { name: "loop" };
  cyclic.self = cyclic;
  assert.equal(render(cyclic), '{name: "loop", self: {name: "loop", self: {…}}}');
  assert.equal(render(new RangeError("bad")), "RangeError: bad");
  assert.equal(render(new Array(100_000).fill(7)).length, TRACE_DETAIL_MAX);
  assert.equal(render(12n), "12n");
  assert.equal(render(undefined), "undefined");
  assert.equal(
    formatTraceEntry({ connection: "c1", time: 1.5, kind: "in", type: "cast", detail: '"x"' }),
    'etcp trace c1 1.500 in cast "x"',
  );
  assert.equal(
    formatTraceEntry({ connection: "c1", time: 2, kind: "close", type: "close", detail: "1" }),
    "etcp trace c1 2.000 close 1",
  );
});
