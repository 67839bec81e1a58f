// What the types promise, checked by `deno check` (the suite type-checks this file; each
// `@ts-expect-error` fails the check if the error it expects goes away): a handler annotated
// for one frame type is refused with a framing of another, events of annotated handlers are
// typed, inline handlers compile with any framing, and `server.addr.port` needs no cast.

import assert from "node:assert/strict";
import {
  connect,
  type Handler,
  type HandlerGenerator,
  lengthPrefixed,
  lines,
  memory,
  send,
  serve,
} from "../mod.ts";

async function* bytesEcho(): HandlerGenerator<Uint8Array> {
  for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data)) {
    const frame: Uint8Array = ev.data; // typed
    void frame;
  }
}

async function* lineEcho(): HandlerGenerator<string> {
  for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data.toUpperCase()));
}

const typedBytes: Handler<Uint8Array> = bytesEcho;

Deno.test("types: handlers are checked against their framing; addr.port needs no cast", async () => {
  const servers = [
    await serve(bytesEcho, { hostname: "127.0.0.1", port: 0 }),
    await serve(bytesEcho, { hostname: "127.0.0.1", port: 0, framing: lengthPrefixed(4) }),
    await serve(lineEcho, { hostname: "127.0.0.1", port: 0, framing: lines() }),
    // Inline handlers compile with any framing (their events are `any`).
    await serve(async function* () {
      yield;
    }, { hostname: "127.0.0.1", port: 0, framing: lines() }),
  ];
  for (const server of servers) {
    const port: number = server.addr.port; // a TCP server's address has a port
    assert.ok(port > 0);
  }
  const memoryServer = await serve(lineEcho, { transport: memory("types"), framing: lines() });
  const name: string = memoryServer.addr.name;
  assert.equal(name, "types");

  // @ts-expect-error a handler for bytes with lines()
  await assert.rejects(async () => await serve(typedBytes, { framing: lines(), port: -1 }));
  // @ts-expect-error a handler for lines with the default raw() framing
  await assert.rejects(async () => await serve(lineEcho, { port: -1 }));
  // @ts-expect-error the same for clients
  await assert.rejects(async () => await connect(bytesEcho, { framing: lines(), port: -1 }));

  for (const server of [...servers, memoryServer]) await server.stop();
});
