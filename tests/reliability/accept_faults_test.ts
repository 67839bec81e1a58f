// Peers that reset before the server accepts them (found by bench/soak.ts): Deno's accept()
// then fails with NotConnected. That is the peer's connection gone, not the listener: the
// server must go on accepting at once, without logging and without backing off.

import assert from "node:assert/strict";
import net from "node:net";
import { lengthPrefixed, serve } from "../../mod.ts";
import { echo } from "../../examples/echo_server.ts";
import {
  capturingLogger,
  HOST,
  portOf,
  readExactly,
  wireOf,
  within,
  writeAll,
} from "./_support.ts";

/** Connects, then resets the connection (SO_LINGER 0: RST, not FIN). */
async function connectAndReset(port: number): Promise<void> {
  const sock = net.connect(port, HOST);
  sock.on("error", () => {});
  await new Promise((resolve) => sock.once("connect", resolve));
  const closed = new Promise((resolve) => sock.once("close", resolve));
  sock.resetAndDestroy();
  await closed;
}

async function echoOnce(port: number, payload: Uint8Array): Promise<Uint8Array> {
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    const frame = wireOf([payload]);
    await writeAll(conn, frame);
    return (await readExactly(conn, frame.length)).subarray(4);
  } finally {
    conn.close();
  }
}

Deno.test("accept: 12 peers that reset in the backlog are skipped at once and quietly; the next peer is served", async () => {
  const logger = capturingLogger();
  const server = await serve(echo, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
    logger,
  });
  const port = portOf(server.addr);
  try {
    // Suspended: they wait in the backlog, and reset there.
    server.suspend();
    for (let i = 0; i < 12; i++) await connectAndReset(port);
    server.resume();
    // With a backoff per failed accept (10, 20, 40 … 1000 ms) this took seconds.
    const started = performance.now();
    const payload = new TextEncoder().encode("after the resets");
    assert.deepEqual(await within(1000, echoOnce(port, payload), "echo"), payload);
    assert.ok(performance.now() - started < 1000);
    assert.deepEqual(logger.calls, [], "a peer's reset is not a server error");
    assert.equal(server.status, "running");
    assert.equal(server.acceptors()[0].state, "accepting");
  } finally {
    await server.stop();
  }
});
