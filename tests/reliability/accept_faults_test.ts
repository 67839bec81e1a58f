// Peers that reset before the server accepts them (found by bench/soak.ts): Deno's accept()
// then fails with NotConnected. That is the peer's connection gone, not the listener: the
// server must go on accepting at once, without logging and without backing off.

import assert from "node:assert/strict";
import net from "node:net";
import { lengthPrefixed, serve } from "../../mod.ts";
import { echo } from "../../examples/echo_server.ts";

const HOST = "127.0.0.1";

async function within<V>(ms: number, promise: Promise<V>, what: string): Promise<V> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

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
    const frame = new Uint8Array(4 + payload.length);
    new DataView(frame.buffer).setUint32(0, payload.length);
    frame.set(payload, 4);
    await conn.write(frame);
    const got = new Uint8Array(frame.length);
    let n = 0;
    while (n < got.length) {
      const r = await conn.read(got.subarray(n));
      assert.ok(r !== null, "the echo arrived before the end");
      n += r;
    }
    return got.subarray(4);
  } finally {
    conn.close();
  }
}

Deno.test("accept: 12 peers that reset in the backlog are skipped at once and quietly; the next peer is served", async () => {
  const logged: unknown[][] = [];
  const server = await serve(echo, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
    logger: { error: (...a: unknown[]) => void logged.push(a) },
  });
  const port = (server.addr as Deno.NetAddr).port;
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
    assert.deepEqual(logged, [], "a peer's reset is not a server error");
    assert.equal(server.status, "running");
    assert.equal(server.acceptors()[0].state, "accepting");
  } finally {
    await server.stop();
  }
});
