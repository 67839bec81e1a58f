// The close reason in cleanup (etcp's terminate/3 reason): `conn.closeReason` is set before the
// handler's finally runs, for every end the connection decides: a clean stop, a frame too large,
// a write-side failure (the peer does not read: BufferFull; a failed write the handler stops on),
// a forced shutdown (a `conn.stop` timeout, a server's stop, idleTimeout); and it is `undefined`
// in a finally reached by the handler's own `return`. `sendSync` with a timeout rejects with
// `TimeoutError` and the connection goes on.

import assert from "node:assert/strict";
import {
  BufferFull,
  type Connection,
  FrameTooLarge,
  type HandlerGenerator,
  lines,
  recv,
  send,
  serve,
  stop,
  TimeoutError,
  type Transport,
} from "../../mod.ts";
import { capturingLogger, Inbox, within } from "../_support.ts";
import { acceptingWith, freshMemory, lineRig, readUntil, writeText } from "./_rig.ts";

/**
 * A handler whose finally records `conn.closeReason`: it stops on `stop`, returns on `return`,
 * ignores everything else (so shutdowns are forced), and stops with a failed write's error.
 */
function recording(inFinally: Inbox<unknown>) {
  return async function* (conn: Connection<string>): HandlerGenerator<string> {
    try {
      let ev = yield;
      for (;;) {
        if (ev.type === "packet" && ev.data === "stop") ev = yield stop();
        else if (ev.type === "packet" && ev.data === "return") return;
        else if (ev.type === "packet" && ev.data === "write") ev = yield send("x");
        else if (ev.type === "disconnect" && ev.side === "write") ev = yield stop(ev.error);
        else ev = yield;
      }
    } finally {
      inFinally.push(conn.closeReason);
    }
  };
}

/** A memory transport whose server side's writes fail with BrokenPipe. */
function failingWrites(label: string): Transport {
  return acceptingWith(freshMemory(label), (conn) => ({
    localAddr: conn.localAddr,
    remoteAddr: conn.remoteAddr,
    read: (p) => conn.read(p),
    write: () => Promise.reject(new Deno.errors.BrokenPipe("the peer is gone")),
    closeWrite: () => conn.closeWrite(),
    close: () => conn.close(),
  }));
}

Deno.test("closeReason in finally: clean stop, FrameTooLarge, a forced conn.stop, idle, server stop; undefined after the handler's own return", async () => {
  const inFinally = new Inbox<unknown>(3000);
  await using rig = await lineRig("close-reasons", recording(inFinally), {
    framing: lines({ maxLength: 10 }),
    shutdownTimeout: 50,
  });

  const clean = await rig.open();
  await writeText(clean.peer, "stop\n");
  assert.equal(await inFinally.next(), "normal", "a clean stop");
  assert.equal(await clean.conn.closed, "normal");

  const own = await rig.open();
  await writeText(own.peer, "return\n");
  assert.equal(await inFinally.next(), undefined, "its own return: it knows why");
  assert.equal(await own.conn.closed, "normal");

  const tooLarge = await rig.open();
  await writeText(tooLarge.peer, "x".repeat(50) + "\n");
  const framing = await inFinally.next();
  assert.ok(framing instanceof FrameTooLarge, `a frame too large: ${framing}`);

  const forced = await rig.open();
  const stopping = forced.conn.stop("maintenance", { timeout: 20 });
  assert.equal(await inFinally.next(), "maintenance", "forced at the stop's timeout");
  await stopping;

  const last = await rig.open();
  await rig.server.stop();
  assert.equal(await inFinally.next(), "shutdown", "forced by the server's stop");
  assert.equal(await last.conn.closed, "shutdown");
});

Deno.test("closeReason in finally: idle, forced by idleTimeout", async () => {
  const inFinally = new Inbox<unknown>(3000);
  await using rig = await lineRig("close-reason-idle", recording(inFinally), {
    idleTimeout: 20,
    shutdownTimeout: 20,
  });
  await rig.open();
  assert.equal(await inFinally.next(), "idle");
});

Deno.test("closeReason in finally: the write side: BufferFull for a peer that does not read, a failed write the handler stops on", async () => {
  const inFinally = new Inbox<unknown>(3000);
  await using rig = await lineRig("close-reason-buffer-full", recording(inFinally), {
    maxBuffered: 64 * 1024,
    bufferSize: 1024,
    mode: "passive", // reads nothing: only output happens
  });
  const slow = await rig.open();
  for (let i = 0; i < 100 && slow.conn.closeReason === undefined; i++) {
    slow.conn.send("y".repeat(8 * 1024));
  }
  const full = await inFinally.next();
  assert.ok(full instanceof BufferFull, `the peer does not read: ${full}`);

  const transport = failingWrites("close-reason-write-error");
  const logger = capturingLogger();
  const server = await serve(recording(inFinally), { transport, framing: lines(), logger });
  try {
    const peer = await transport.connect({});
    await writeText(peer, "write\n");
    const broken = await inFinally.next();
    assert.ok(broken instanceof Deno.errors.BrokenPipe, `a failed write: ${broken}`);
    assert.deepEqual(logger.levels, ["warn"], "a peer's fault: one line");
  } finally {
    await within(5000, server.stop(), "stop");
  }
});

Deno.test("sendSync with a timeout rejects with TimeoutError when the peer does not read; the connection goes on", async () => {
  await using rig = await lineRig("send-sync-timeout", async function* () {
    for (let ev = yield recv(); ev.type === "packet"; ev = yield recv()) yield send(ev.data);
  }, { mode: "passive", bufferSize: 1024 });
  const { peer, conn } = await rig.open();
  const big = "z".repeat(32 * 1024);
  await assert.rejects(conn.sendSync(big, { timeout: 30 }), TimeoutError);
  assert.equal(conn.closeReason, undefined, "still open");
  assert.ok(conn.bufferedAmount > 0, "the data stays queued");
  // The peer reads: the queued line arrives whole, then what is sent later, in order.
  const after = conn.sendSync("after", { timeout: 3000 });
  assert.equal(await readUntil(peer, "after\n"), `${big}\nafter\n`);
  await after;
  await conn.sendSync("quick", { timeout: 1000 });
  await assert.rejects(conn.sendSync("x", { timeout: -1 }), RangeError);
  await assert.rejects(conn.sendSync("x", { timeout: Number.NaN }), RangeError);
});
