// Code change for every connection (etcp's code_change): `conn.upgrade` switches a `connect()`
// client, `pool.upgrade` every connection of a pool and the ones it makes later; a hibernated
// connection switches at its next wake with `codeChange(state)`, a running one gets an `upgrade`
// event and switches by hibernating, and one that never hibernates keeps its code.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  createPool,
  type Event,
  type Handler,
  type HandlerGenerator,
  hibernate,
  lines,
  send,
  serve,
} from "../../mod.ts";
import { capturingLogger, Inbox, within } from "../_support.ts";
import { freshMemory } from "./_rig.ts";

/** An echo server over its own memory transport. */
async function echoServer(label: string) {
  const transport = freshMemory(label);
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
  }, { transport, framing: lines(), logger: capturingLogger() });
  return { transport, server, [Symbol.asyncDispose]: () => within(5000, server.stop(), "stop") };
}

/**
 * Version `v` of a handler that hibernates between events, counting them in its state: at start
 * it hibernates at once; woken, its first yield returns the waking event.
 */
function counter(v: string, seen: Inbox<string>): Handler<string, number> {
  return function* (_conn, count?: number): HandlerGenerator<string> {
    const ev: Event<string> = yield count === undefined ? hibernate(0) : undefined;
    if (ev.type === "cast") {
      seen.push(`${v} ${ev.message} ${count}`);
      yield hibernate(count! + 1);
    }
  };
}

Deno.test("conn.upgrade: a hibernated connect() client switches at its next wake, with codeChange(state)", async () => {
  await using echo = await echoServer("upgrade-client");
  const seen = new Inbox<string>(3000);
  const client = await connect(counter("v1", seen), {
    transport: echo.transport,
    framing: lines(),
  });
  client.cast("a");
  assert.equal(await seen.next(), "v1 a 0");
  assert.ok(client.hibernating);
  client.upgrade(counter("v2", seen), { codeChange: (n) => (n as number) * 10 });
  client.upgrade(counter("v3", seen), { codeChange: (n) => (n as number) + 5 });
  client.cast("b");
  assert.equal(await seen.next(), "v3 b 15", "both upgrades, in order");
  await client.stop();
});

Deno.test("conn.upgrade: a running client gets the upgrade event and switches by hibernating", async () => {
  await using echo = await echoServer("upgrade-client-live");
  const seen = new Inbox<string>(3000);
  const v1 = async function* (_conn: Connection<string>, state?: string): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "shutdown";) {
      if (ev.type === "upgrade") ev = yield hibernate(`from v1 (${state ?? "first"})`);
      else {
        if (ev.type === "cast") seen.push(`v1 ${ev.message}`);
        ev = yield;
      }
    }
  };
  const v2 = async function* (_conn: Connection<string>, state?: string): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "shutdown"; ev = yield) {
      if (ev.type === "cast") seen.push(`v2 ${ev.message} ${state}`);
    }
  };
  const client = await connect(v1, { transport: echo.transport, framing: lines() });
  client.cast("a");
  assert.equal(await seen.next(), "v1 a");
  client.upgrade(v2);
  client.cast("b");
  assert.equal(await seen.next(), "v2 b from v1 (first)");
  await client.stop();
});

Deno.test("conn.upgrade: a connection that never hibernates gets the event and keeps its code", async () => {
  await using echo = await echoServer("upgrade-never");
  const seen = new Inbox<string>(3000);
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type !== "shutdown"; ev = yield) {
      seen.push(ev.type === "cast" ? `v1 ${ev.message}` : ev.type);
    }
  }, { transport: echo.transport, framing: lines() });
  client.upgrade(counter("v2", seen));
  assert.equal(await seen.next(), "upgrade");
  client.cast("still v1");
  assert.equal(await seen.next(), "v1 still v1");
  await client.stop();
});

Deno.test("pool.upgrade: live connections switch; connections made later run the new code", async () => {
  await using echo = await echoServer("upgrade-pool");
  const seen = new Inbox<string>(3000);
  const handler = (v: string) =>
    async function* (conn: Connection<string>): HandlerGenerator<string> {
      for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
        if (ev.type === "upgrade") ev = yield hibernate();
        else {
          if (ev.type === "cast") seen.push(`${v} ${conn.id} ${ev.message}`);
          ev = yield;
        }
      }
    };
  await using pool = await createPool(handler("v1"), {
    addresses: [{ transport: echo.transport }],
    size: 2,
    framing: lines(),
    waitReady: 2000,
    reconnect: false,
  });
  const before = pool.connections();
  assert.equal(before.length, 2);
  pool.upgrade(handler("v2"));
  for (const conn of before) conn.cast("x");
  const got = [await seen.next(), await seen.next()].sort();
  assert.deepEqual(got, before.map((c) => `v2 ${c.id} x`).sort());
  const added = await pool.addConnection({ transport: echo.transport });
  added.cast("y");
  assert.equal(await seen.next(), `v2 ${added.id} y`, "a connection made later runs v2");
});
