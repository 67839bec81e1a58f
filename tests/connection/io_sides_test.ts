// Reading and writing end separately, and output is bounded: a failed write is not an end of
// input, sends after it are dropped (and counted), a peer that does not read cannot grow the
// server without limit, and what was sent can be measured and waited for.

import assert from "node:assert/strict";
import {
  BufferFull,
  ConnectionClosed,
  type Event,
  lines,
  recv,
  send,
  serve,
  type Transport,
} from "../../mod.ts";
import { capturingLogger, Inbox, within } from "../_support.ts";
import { acceptingWith, freshMemory, lineRig, readUntil, until, writeText } from "./_rig.ts";

/** A memory transport whose server-side writes fail (BrokenPipe) once `breakWrites()` is called. */
function breakableWrites(label: string): { transport: Transport; breakWrites(): void } {
  let broken = false;
  const transport = acceptingWith(freshMemory(label), (conn) => ({
    localAddr: conn.localAddr,
    remoteAddr: conn.remoteAddr,
    read: (p) => conn.read(p),
    write: (p) =>
      broken ? Promise.reject(new Deno.errors.BrokenPipe("write side broken")) : conn.write(p),
    closeWrite: () => conn.closeWrite(),
    close: () => conn.close(),
  }));
  return { transport, breakWrites: () => broken = true };
}

const shape = (ev: Event<string>) =>
  ev.type === "disconnect"
    ? `disconnect ${ev.side}${ev.error ? ` ${ev.error.name}` : ""}`
    : ev.type === "packet"
    ? `packet ${ev.data}`
    : ev.type;

for (const mode of ["active", "passive"] as const) {
  Deno.test(`${mode}: a failed write is reported as the write side's end; packets and the real end of input still come`, async () => {
    const { transport, breakWrites } = breakableWrites(`broken-${mode}`);
    const events = new Inbox<string>(3000);
    const server = await serve(async function* (conn) {
      let ev = yield mode === "passive" ? recv() : undefined;
      for (;;) {
        events.push(shape(ev));
        if (ev.type === "disconnect" && ev.side === "read") return;
        if (ev.type === "packet" && ev.data === "send") {
          breakWrites();
          // The write fails; in passive mode the recv is answered by its report.
          ev = yield mode === "passive" ? [send("doomed"), recv()] : send("doomed");
          continue;
        }
        ev = yield mode === "passive" ? recv() : undefined;
        void conn;
      }
    }, { transport, framing: lines(), mode, logger: capturingLogger() });
    try {
      const peer = await transport.connect({});
      await writeText(peer, "send\n");
      assert.equal(await events.next(), "packet send");
      assert.equal(await events.next(), "disconnect write BrokenPipe");
      await writeText(peer, "after\n");
      assert.equal(await events.next(), "packet after", "packets still arrive");
      await peer.closeWrite();
      assert.equal(await events.next(), "disconnect read", "the end of input is reported");
    } finally {
      await within(5000, server.stop(), "stop");
    }
  });
}

Deno.test("after a write error the handler's sends are dropped and counted, never buffered", async () => {
  const { transport, breakWrites } = breakableWrites("dropped");
  const conns = new Inbox<import("../../mod.ts").Connection<string>>(3000);
  const events = new Inbox<string>(3000);
  const server = await serve(async function* () {
    let ev = yield;
    for (;;) {
      events.push(shape(ev));
      if (ev.type === "packet") {
        breakWrites();
        ev = yield send("x");
      } else if (ev.type === "disconnect" && ev.side === "write") {
        // 100 sends of 1 MiB after the write side broke.
        ev = yield Array.from({ length: 100 }, () => send("y".repeat(1 << 20 - 1)));
      } else return;
    }
  }, {
    transport,
    framing: lines({ maxLength: 1 << 20 }),
    logger: capturingLogger(),
    onConnection: (conn) => conns.push(conn),
  });
  try {
    const peer = await transport.connect({});
    const conn = await conns.next();
    await writeText(peer, "go\n");
    assert.equal(await events.next(), "packet go");
    assert.equal(await events.next(), "disconnect write BrokenPipe");
    await until(() => conn.framesDropped === 100, "100 frames dropped");
    assert.equal(conn.bufferedAmount, 0, "nothing buffered");
    await assert.rejects(conn.sendSync("z"), ConnectionClosed);
    await peer.closeWrite();
    assert.equal(await events.next(), "disconnect read");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("sendSync of nothing (raw framing, zero bytes) resolves at once", async () => {
  const transport = freshMemory("sendsync-zero");
  const server = await serve(async function* () {
    yield;
  }, { transport, logger: capturingLogger() });
  try {
    const conns = new Inbox<import("../../mod.ts").Connection<Uint8Array>>(3000);
    await transport.connect({});
    await until(() => server.connections().length === 1, "the connection starts");
    conns.push(server.connections()[0]);
    const conn = await conns.next();
    await within(1000, conn.sendSync(new Uint8Array(0)), "sendSync of 0 bytes");
    await within(1000, conn.sendSync(""), "sendSync of an empty string");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("outside sends to a peer that does not read end it with BufferFull at maxBuffered", async () => {
  await using rig = await lineRig("slow-consumer", async function* () {
    for (let ev = yield; ev.type !== "shutdown"; ev = yield);
  }, { maxBuffered: 256 * 1024, bufferSize: 1024 });
  const { conn } = await rig.open();
  const line = "z".repeat(16 * 1024);
  let sent = 0;
  // 200 MB would be queued without a bound; the connection ends long before.
  while (sent < 12_800 && conn.closeReason === undefined) {
    conn.send(line);
    sent++;
  }
  assert.ok(sent < 100, `ended after ${sent} sends`);
  const reason = await within(3000, conn.closed, "closed");
  assert.ok(reason instanceof BufferFull, `closed with ${reason}`);
  assert.equal(reason.limit, 256 * 1024);
  assert.ok(reason.buffered > 256 * 1024);
  assert.deepEqual(rig.logger.levels, ["warn"], "one warning, no stack trace");
  assert.equal(typeof rig.logger.calls[0][0], "string");
  conn.send(line); // dropped: the connection has ended
});

Deno.test('onBufferFull: "throw" makes the send throw BufferFull; the connection goes on, and drain() waits for the peer', async () => {
  await using rig = await lineRig("slow-consumer-throw", async function* () {
    for (let ev = yield; ev.type !== "shutdown"; ev = yield);
  }, { maxBuffered: 64 * 1024, onBufferFull: "throw", bufferSize: 1024 });
  const { peer, conn } = await rig.open();
  const line = "q".repeat(8 * 1024);
  let sent = 0;
  assert.throws(() => {
    for (;;) {
      conn.send(line);
      sent++;
    }
  }, BufferFull);
  await assert.rejects(conn.sendSync(line), BufferFull);
  assert.ok(conn.bufferedAmount > 64 * 1024);
  const drained = conn.drain();
  // The peer reads everything: the connection drains and takes sends again.
  const want = (line.length + 1) * sent;
  let got = 0;
  const buf = new Uint8Array(64 * 1024);
  while (got < want) got += (await peer.read(buf))!;
  await within(3000, drained, "drain()");
  assert.equal(conn.bufferedAmount, 0);
  conn.send("again");
  assert.equal(await readUntil(peer, "again\n"), "again\n");
  assert.equal(conn.closeReason, undefined, "still open");
});

Deno.test("bytesRead and bytesWritten count the socket's bytes, across hibernation", async () => {
  await using rig = await lineRig("byte-counts", async function* () {
    for (let ev = yield; ev.type === "packet"; ev = yield send(`echo ${ev.data}`));
  });
  const { peer, conn } = await rig.open();
  await writeText(peer, "abc\n");
  assert.equal(await readUntil(peer, "\n"), "echo abc\n");
  assert.equal(conn.bytesRead, 4);
  await until(() => conn.bytesWritten === 9, "the write is counted");
});

Deno.test("a slow consumer ended while its handler is inside a stuck async step still closes, at shutdownTimeout", async () => {
  const never = Promise.withResolvers<void>();
  const stepping = Promise.withResolvers<void>();
  await using rig = await lineRig("slow-consumer-stuck-step", async function* () {
    const ev = yield;
    if (ev.type === "packet") {
      stepping.resolve();
      await never.promise; // stuck
    }
    yield;
  }, { maxBuffered: 64 * 1024, bufferSize: 1024, shutdownTimeout: 100 });
  const { peer, conn } = await rig.open();
  await writeText(peer, "go\n");
  await within(3000, stepping.promise, "the handler is in its step");
  const line = "s".repeat(8 * 1024);
  for (let i = 0; i < 100 && !(conn.closeReason instanceof BufferFull); i++) conn.send(line);
  assert.ok(await within(3000, conn.closed, "closed within shutdownTimeout") instanceof BufferFull);
  never.resolve();
});

Deno.test("a slow consumer ended during an async step that then returns closes at once", async () => {
  const release = Promise.withResolvers<void>();
  const stepping = Promise.withResolvers<void>();
  await using rig = await lineRig("slow-consumer-step-returns", async function* () {
    const ev = yield;
    if (ev.type === "packet") {
      stepping.resolve();
      await release.promise;
    }
  }, { maxBuffered: 64 * 1024, bufferSize: 1024, shutdownTimeout: 60_000 });
  const { peer, conn } = await rig.open();
  await writeText(peer, "go\n");
  await within(3000, stepping.promise, "the handler is in its step");
  const line = "s".repeat(8 * 1024);
  for (let i = 0; i < 100 && !(conn.closeReason instanceof BufferFull); i++) conn.send(line);
  release.resolve(); // the step returns: the handler is done
  assert.ok(await within(3000, conn.closed, "closed") instanceof BufferFull);
});
