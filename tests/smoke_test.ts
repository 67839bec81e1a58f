import assert from "node:assert/strict";
import { connect, lengthPrefixed, memory, send, serve, setTimeout as arm } from "../mod.ts";

Deno.test("echo over tcp", async () => {
  const server = await serve(async function* () {
    let ev = yield arm(5000);
    for (;;) {
      if (ev.type === "packet") ev = yield [send(ev.data), arm(5000)];
      else return;
    }
  }, { hostname: "127.0.0.1", framing: lengthPrefixed(4) });
  const port = (server.addr as Deno.NetAddr).port;
  const got: Uint8Array[] = [];
  const done = Promise.withResolvers<void>();
  const client = await connect(async function* () {
    let ev = yield [send(new Uint8Array([1, 2, 3])), send(new Uint8Array([4]))];
    for (;;) {
      if (ev.type === "packet") {
        got.push(ev.data);
        if (got.length === 2) done.resolve();
      }
      ev = yield;
    }
  }, { port, framing: lengthPrefixed(4) });
  await done.promise;
  assert.deepEqual(got, [new Uint8Array([1, 2, 3]), new Uint8Array([4])]);
  await client.stop();
  await server.stop();
});

Deno.test("echo over memory with call", async () => {
  const transport = memory("smoke");
  const server = await serve(function* () {
    let ev = yield;
    for (;;) {
      if (ev.type === "call") ev = yield { type: "reply", from: ev.from, value: ev.message };
      else if (ev.type === "shutdown") return;
      else ev = yield;
    }
  }, { transport });
  const client = await connect(async function* () {}, { transport });
  await client.closed;
  const [conn] = server.connections();
  assert.equal(await conn.call(42), 42);
  await server.stop();
});
