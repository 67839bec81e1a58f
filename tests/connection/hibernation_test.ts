// Hibernation drops the generator and wakes on any event; upgrade switches code on a wake.

import assert from "node:assert/strict";
import {
  type Action,
  type Connection,
  type Event,
  type HandlerGenerator,
  hibernate,
  lengthPrefixed,
  ProtocolError,
  reply,
  send,
  serve,
  setTimeout as arm,
} from "../../mod.ts";
import {
  capturingLogger,
  collector,
  encoder,
  idle,
  label,
  lineClient,
  lineServer,
  readExactly,
  transportFor,
  wireOf,
  within,
} from "./_support.ts";

// ---- Hibernation --------------------------------------------------------------------------

/**
 * A server handler that hibernates between events. Started fresh (no state) it hibernates at
 * once with state 0; woken with state n it sends "awake n" from its first yield, answers the
 * waking event, then sends "zz n+1" and hibernates with n+1. `extra` adds actions to every
 * hibernation (timers armed before sleeping).
 */
function sleeper(extra: () => Action[] = () => []) {
  const calls: unknown[] = []; // the state each generator was started with
  const woke: Event<string>[] = []; // the event each first yield returned
  const awake: boolean[] = []; // conn.hibernating while a generator runs
  let finallies = 0;
  const handler = async function* (
    conn: Connection<string>,
    state?: unknown,
  ): HandlerGenerator<string> {
    calls.push(state);
    awake.push(!conn.hibernating);
    try {
      if (state === undefined) {
        yield [...extra(), send("zz 0"), hibernate(0)];
        throw new Error("unreachable: resumed after hibernate");
      }
      const n = state as number;
      const ev: Event<string> = yield send(`awake ${n}`);
      woke.push(ev);
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      const answer = ev.type === "call" ? [reply(ev.from, `reply ${n} to ${ev.message}`)] : [];
      yield [...answer, ...extra(), send(`zz ${n + 1}`), hibernate(n + 1)];
      throw new Error("unreachable: resumed after hibernate");
    } finally {
      finallies++;
    }
  };
  return { handler, calls, woke, awake, finallies: () => finallies };
}

/** A hibernating server, a client collecting its lines, and the server side's handle. */
async function hibernating(label: string, extra?: () => Action[]) {
  const transport = transportFor(label);
  const h = sleeper(extra);
  const s = await lineServer(transport, h.handler);
  const c = collector();
  const client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  return {
    transport,
    h,
    s,
    client,
    conn,
    lines: c.lines,
    async [Symbol.asyncDispose]() {
      await client.stop();
      await s.server.stop();
    },
  };
}

Deno.test("hibernate: the generator is dropped without its finally; conn.hibernating is true", async () => {
  await using t = await hibernating("hib-flag");
  assert.equal(await t.lines.next(), "zz 0"); // written as the connection hibernated
  assert.equal(t.conn.hibernating, true);
  assert.equal(t.h.finallies(), 0);
  assert.deepEqual(t.h.calls, [undefined]);
});

Deno.test("hibernate: woken by a cast, handler(conn, state) runs its first yield's actions, then gets the cast", async () => {
  await using t = await hibernating("hib-cast");
  assert.equal(await t.lines.next(), "zz 0");
  t.conn.cast("wake up");
  assert.equal(await t.lines.next(), "awake 0"); // the new generator's first yield
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.calls, [undefined, 0]);
  assert.deepEqual(t.h.woke, [{ type: "cast", message: "wake up" }]);
  assert.deepEqual(t.h.awake, [true, true]);
  assert.equal(t.conn.hibernating, true);
  assert.equal(t.h.finallies(), 0);
  // And again, with the next state.
  t.conn.cast("again");
  assert.equal(await t.lines.next(), "awake 1");
  assert.equal(await t.lines.next(), "zz 2");
  assert.deepEqual(t.h.calls, [undefined, 0, 1]);
});

Deno.test("hibernate: woken by a packet", async () => {
  await using t = await hibernating("hib-packet");
  assert.equal(await t.lines.next(), "zz 0");
  t.client.send("knock knock");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.woke, [{ type: "packet", data: "knock knock" }]);
  assert.equal(t.h.finallies(), 0);
});

Deno.test("hibernate: woken by a call, whose reply reaches the caller", async () => {
  await using t = await hibernating("hib-call");
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await within(1000, t.conn.call("ping")), "reply 0 to ping");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.equal(t.h.woke[0].type, "call");
  assert.equal(await within(1000, t.conn.call("pong")), "reply 1 to pong");
});

Deno.test("hibernate: woken by a named timer armed before hibernating", async () => {
  let armed = 0;
  await using t = await hibernating("hib-timer", () => armed++ === 0 ? [arm(20, "alarm")] : []);
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.woke, [{ type: "timeout", name: "alarm" }]);
});

Deno.test("hibernate: woken by the event timeout armed before hibernating", async () => {
  let armed = 0;
  await using t = await hibernating("hib-timeout", () => armed++ === 0 ? [arm(20)] : []);
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await t.lines.next(), "awake 0");
  assert.deepEqual(t.h.woke, [{ type: "timeout" }]);
});

Deno.test("hibernate: a shutdown wakes it, and stopping it does not run the dropped finally", async () => {
  await using t = await hibernating("hib-stop");
  assert.equal(await t.lines.next(), "zz 0");
  await within(1000, t.conn.stop("closing time"));
  assert.deepEqual(t.h.woke, [{ type: "shutdown", reason: "closing time" }]);
  // Only the woken generator's finally ran; the dropped one's never does.
  assert.equal(t.h.finallies(), 1);
  assert.equal(await t.conn.closed, "normal");
});

// ---- Upgrade ------------------------------------------------------------------------------

Deno.test("upgrade: a hibernated connection switches at its next wake, with codeChange(state)", async () => {
  await using t = await hibernating("upgrade-hibernated");
  assert.equal(await t.lines.next(), "zz 0");
  const states: unknown[] = [];
  const changes: unknown[] = [];
  t.s.server.upgrade(
    async function* (_conn: Connection<string>, state?: unknown): HandlerGenerator<string> {
      states.push(state);
      const ev: Event<string> = yield send(`v2 ${JSON.stringify(state)}`);
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      yield [send(`v2 got ${label(ev)}`), hibernate(state)];
    },
    {
      codeChange(state) {
        changes.push(state);
        return { version: 2, count: state };
      },
    },
  );
  // Nothing happens until it wakes: hibernated connections get no upgrade event.
  assert.equal(t.conn.hibernating, true);
  assert.deepEqual(changes, []);
  t.conn.cast("wake");
  assert.equal(await t.lines.next(), 'v2 {"version":2,"count":0}');
  assert.equal(await t.lines.next(), "v2 got cast wake");
  assert.deepEqual(changes, [0]);
  assert.deepEqual(states, [{ version: 2, count: 0 }]);
  assert.deepEqual(t.h.woke, [], "the old handler never woke");
  // codeChange runs once, at the switch; later wakes keep the new handler and state.
  t.conn.cast("again");
  assert.equal(await t.lines.next(), 'v2 {"version":2,"count":0}');
  assert.equal(await t.lines.next(), "v2 got cast again");
  assert.deepEqual(changes, [0]);
});

Deno.test("upgrade: a live connection gets `upgrade`, switches when it hibernates; new connections run the new code", async () => {
  const transport = transportFor("upgrade-live");
  const v1Events: string[] = [];
  let finallies = 0;
  async function* v2(_conn: Connection<string>, state?: unknown): HandlerGenerator<string> {
    const ev: Event<string> = yield send(`v2 start ${JSON.stringify(state ?? null)}`);
    if (ev.type === "shutdown" || ev.type === "disconnect") return;
    yield [send(`v2 got ${label(ev)}`), hibernate(state)];
  }
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    try {
      let count = 0;
      let ev: Event<string> = yield;
      for (;;) {
        v1Events.push(label(ev));
        if (ev.type === "upgrade") {
          assert.equal(ev.handler, v2);
          ev = yield [send("v1 switching"), hibernate({ count })];
        } else if (ev.type === "cast") {
          count++;
          ev = yield send(`v1 cast ${count}`);
        } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
        else ev = yield;
      }
    } finally {
      finallies++;
    }
  });
  const c = collector();
  await using _client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  conn.cast("one");
  assert.equal(await c.lines.next(), "v1 cast 1");
  const changes: unknown[] = [];
  s.server.upgrade(v2, {
    codeChange: (state) => {
      changes.push(state);
      return { ...(state as object), version: 2 };
    },
  });
  assert.equal(await c.lines.next(), "v1 switching");
  assert.equal(conn.hibernating, true);
  conn.cast("two");
  assert.equal(await c.lines.next(), 'v2 start {"count":1,"version":2}');
  assert.equal(await c.lines.next(), "v2 got cast two");
  assert.deepEqual(v1Events, ["cast one", "upgrade"]);
  assert.deepEqual(changes, [{ count: 1 }]);
  assert.equal(finallies, 0, "hibernating to switch does not run finally");
  // A new connection starts on v2, with no state.
  const c2 = collector();
  await using _client2 = await lineClient(transport, c2.handler);
  assert.equal(await c2.lines.next(), "v2 start null");
});

Deno.test("hibernate at the first yield after a wake, before the waking event is taken, ends the connection with ProtocolError", async () => {
  // It would be woken again at once by the same event, for ever.
  const transport = transportFor("hibernate-again");
  let generators = 0;
  await using s = await lineServer(transport, function* (_conn, state?: number) {
    generators++;
    yield hibernate(state ?? 0);
  }, { logger: capturingLogger() });
  await using _client = await lineClient(transport, idle);
  const conn = await s.conns.next();
  conn.cast("wake");
  const reason = await within(2000, conn.closed, "closed");
  assert.ok(reason instanceof ProtocolError, String(reason));
  assert.equal(generators, 2, "the start, and one wake");
});

// A hibernated connection drops a built-in decoder that holds nothing (it is made again when
// bytes come), and keeps one that holds part of a frame: the frame must come out whole.
for (const lend of [false, true]) {
  Deno.test(`hibernate: a frame begun before hibernating is completed after the wake (lengthPrefixed, lend: ${lend})`, async () => {
    const echoes: string[] = [];
    const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
      const ev = yield;
      if (ev.type !== "packet") return;
      echoes.push(new TextDecoder().decode(ev.data));
      yield [send(ev.data), hibernate()];
    }, { hostname: "127.0.0.1", port: 0, framing: lengthPrefixed(4, { lend }) });
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    const frame = (text: string) => wireOf([encoder.encode(text)]);
    const readEcho = async (length: number) =>
      new TextDecoder().decode(
        (await within(2000, readExactly(conn, length), "the echo")).subarray(4),
      );
    const a = frame("first"), b = frame("second, split");
    // A and B's first two header bytes in one write: A's handler hibernates with them held.
    await conn.write(new Uint8Array([...a, ...b.subarray(0, 2)]));
    assert.equal(await readEcho(a.length), "first");
    await conn.write(b.subarray(2, 7)); // the rest of the header and one byte of the body
    await conn.write(b.subarray(7));
    assert.equal(await readEcho(b.length), "second, split");
    // And a frame after a hibernation at a frame boundary (its decoder was dropped).
    const c = frame("third");
    await conn.write(c);
    assert.equal(await readEcho(c.length), "third");
    assert.deepEqual(echoes, ["first", "second, split", "third"]);
    conn.close();
    await server.stop();
  });
}
