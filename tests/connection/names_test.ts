// conn.register: a name is unique in the registry, found by lookup, and freed on close.

import assert from "node:assert/strict";
import { type Event, type HandlerGenerator, MemoryRegistry, reply } from "../../mod.ts";
import { lineServer, transportFor } from "./_support.ts";

Deno.test("register: a name is unique, lookup finds its connection, and it is freed on close", async () => {
  const transport = transportFor("register");
  const registry = new MemoryRegistry();
  await using s = await lineServer(transport, async function* (conn): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call" && typeof ev.message === "string") {
        const ok = await conn.register(ev.message);
        ev = yield reply(ev.from, ok);
      } else if (ev.type === "call") ev = yield reply(ev.from, `I am ${conn.name}`);
      else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  }, { registry });
  const peers = [await transport.connect({}), await transport.connect({})];
  const [a, b] = [await s.conns.next(), await s.conns.next()];
  assert.equal(await a.call("alice"), true);
  assert.equal(a.name, "alice");
  assert.equal(await b.call("alice"), false);
  assert.equal(b.name, undefined);
  const found = await registry.lookup("alice");
  assert.equal(found?.id, a.id);
  assert.equal(await found!.call({ who: true }), "I am alice");
  assert.deepEqual((await registry.list()).map((e) => e.name).sort(), ["alice", undefined]);
  peers[0].close(); // a's handler returns on disconnect
  await a.closed;
  assert.equal(await registry.lookup("alice"), undefined);
  assert.equal(await b.call("alice"), true);
  assert.equal((await registry.lookup("alice"))?.id, b.id);
  peers[1].close();
});
