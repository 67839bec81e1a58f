// Messages across connections and what a handler learns of its end: a reply may come from any
// handler, a framing error is an event the handler can answer, and the close reason is readable
// in the finally and from `done`.

import assert from "node:assert/strict";
import {
  type Connection,
  FrameTooLarge,
  type From,
  lines,
  MalformedFrame,
  reply,
  send,
  stop,
} from "../../mod.ts";
import { Inbox, within } from "../_support.ts";
import { lineRig, readUntil, writeText } from "./_rig.ts";

Deno.test("reply: a call answered from another connection's handler resolves the caller", async () => {
  const conns = new Inbox<Connection<string>>(3000);
  await using rig = await lineRig("reply-elsewhere", async function* (conn) {
    conns.push(conn);
    let ev = yield;
    for (;;) {
      if (ev.type === "call") {
        // Hand the caller's `from` to the other connection, which replies.
        const [other] = (ev.message as { via: Connection<string>[] }).via;
        other.info({ answer: ev.from });
        ev = yield;
      } else if (ev.type === "info") {
        ev = yield reply((ev.message as { answer: From }).answer, `answered by ${conn.id}`);
      } else if (ev.type === "shutdown") return;
      else ev = yield;
    }
  });
  const a = await rig.open();
  const b = await rig.open();
  assert.equal(
    await within(2000, a.conn.call({ via: [b.conn] }), "the call"),
    `answered by ${b.conn.id}`,
  );
});

Deno.test("reply: a call still fails with ConnectionClosed if the called connection ends first", async () => {
  await using rig = await lineRig("reply-too-late", async function* () {
    const ev = yield;
    if (ev.type === "call") yield stop("gone"); // no reply
  });
  const { conn } = await rig.open();
  await assert.rejects(conn.call("hello"), { name: "ConnectionClosed" });
});

Deno.test("frameError: the handler sees the bad frame as an event, can answer it, then the connection ends", async () => {
  const seen = new Inbox<string>(3000);
  await using rig = await lineRig("frame-error", async function* () {
    let ev = yield;
    for (;;) {
      if (ev.type === "packet") {
        seen.push(`packet ${ev.data}`);
        ev = yield send(`ok ${ev.data}`);
      } else if (ev.type === "frameError") {
        seen.push(`frameError ${ev.error.name}`);
        ev = yield send(ev.error instanceof FrameTooLarge ? "line too long" : "bad line");
      } else return;
    }
  }, { framing: lines({ maxLength: 20 }) });
  const { peer, conn } = await rig.open();
  await writeText(peer, "short\n" + "x".repeat(50) + "\n");
  assert.equal(await seen.next(), "packet short", "the frames before it come first");
  assert.equal(await seen.next(), "frameError FrameTooLarge");
  assert.equal(await readUntil(peer, "line too long\n"), "ok short\nline too long\n");
  const reason = await within(2000, conn.closed, "closed");
  assert.ok(reason instanceof FrameTooLarge);
  assert.deepEqual(rig.logger.levels, ["warn"], "a peer's fault: one warning");
  assert.equal(rig.logger.calls[0].length, 1, "one line, no error object (no stack trace)");
  assert.match(String(rig.logger.calls[0][0]), /FrameTooLarge: frame of \d+ bytes exceeds/);
});

Deno.test("closeReason: set before the finally runs; done rejects on an abnormal end and resolves on a clean one", async () => {
  const inFinally = new Inbox<unknown>(3000);
  await using rig = await lineRig("close-reason", async function* (conn) {
    try {
      for (let ev = yield; ev.type === "packet"; ev = yield);
    } finally {
      inFinally.push(conn.closeReason);
    }
  }, { framing: lines({ maxLength: 4 }) });
  const bad = await rig.open();
  assert.equal(bad.conn.closeReason, undefined, "open: no reason yet");
  await bad.peer.write(Uint8Array.of(0xff, 0x0a)); // not UTF-8
  const reason = await inFinally.next();
  assert.ok(reason instanceof MalformedFrame, `the finally saw ${reason}`);
  await assert.rejects(bad.conn.done, MalformedFrame);

  const good = await rig.open();
  const stopping = good.conn.stop();
  assert.equal(await inFinally.next(), undefined, "it returned by itself, on shutdown");
  await stopping;
  await within(1000, good.conn.done, "done resolves");
});

Deno.test("logging: idle and shutdown ends are not logged; a custom stop reason is one debug line", async () => {
  await using rig = await lineRig("log-levels", async function* () {
    for (;;) {
      const ev = yield; // ignores shutdown: the idle one is forced, with reason "idle"
      if (ev.type === "packet") yield stop({ code: "kicked" });
    }
  }, { idleTimeout: 20, shutdownTimeout: 30 });
  const idle = await rig.open();
  assert.equal(await within(3000, idle.conn.closed, "idle end"), "idle");
  const kicked = await rig.open();
  await writeText(kicked.peer, "x\n");
  assert.deepEqual(await kicked.conn.closed, { code: "kicked" });
  assert.deepEqual(rig.logger.levels, ["debug"]);
});
