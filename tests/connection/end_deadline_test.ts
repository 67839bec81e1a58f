// How a connection ends when its handler misbehaves at the end: one deadline bounds the
// finally, the linger and every stop, the earliest wins, and a failing upgrade or a stalled
// handshake costs only its own connection.

import assert from "node:assert/strict";
import {
  type Connection,
  type HandlerGenerator,
  hibernate,
  send,
  serve,
  stop,
  type Transport,
} from "../../mod.ts";
import { capturingLogger, Inbox, tracked, within } from "../_support.ts";
import { acceptingWith, freshMemory, lineRig, readUntil, until, writeText } from "./_rig.ts";

Deno.test("end: a finally stuck in an await after stop() is abandoned at the stop deadline; socket and entry go", async () => {
  const never = Promise.withResolvers<void>();
  await using rig = await lineRig("stuck-finally", async function* () {
    try {
      yield stop("done");
    } finally {
      await never.promise; // never settles
    }
  });
  const { peer, conn } = await rig.open();
  const stopping = tracked(rig.server.stop("shutdown", { timeout: 100 }));
  await within(2000, stopping.promise, "server.stop({ timeout: 100 })");
  assert.equal(await conn.closed, "done");
  assert.equal(await rig.server.registry.lookup(conn.id), undefined, "registry entry removed");
  assert.equal(await readUntil(peer, "\n"), "", "the peer sees the socket close");
  never.resolve();
});

Deno.test("end: a finally stuck in an await after a forced shutdown at a yield is abandoned too", async () => {
  const never = Promise.withResolvers<void>();
  let finallyStarted = false;
  await using rig = await lineRig("stuck-finally-forced", async function* () {
    try {
      for (;;) yield; // ignores shutdown
    } finally {
      finallyStarted = true;
      await never.promise;
    }
  });
  const { conn } = await rig.open();
  await within(2000, rig.server.stop("shutdown", { timeout: 100 }), "server.stop");
  assert.equal(finallyStarted, true, "its finally ran");
  assert.equal(await conn.closed, "shutdown");
  never.resolve();
});

Deno.test("end: a finally that yields send() has its sends written and runs to its end", async () => {
  let cleanedUp = false;
  await using rig = await lineRig("yielding-finally", async function* () {
    try {
      yield stop();
    } finally {
      const ev = yield send("bye");
      assert.equal(ev.type, "shutdown", "the yield resumes with a shutdown event");
      yield [send("and"), send("gone")];
      cleanedUp = true;
    }
  });
  const { peer, conn } = await rig.open();
  assert.equal(await readUntil(peer, "gone\n"), "bye\nand\ngone\n");
  assert.equal(await conn.closed, "normal");
  assert.equal(cleanedUp, true, "the rest of the finally ran");
});

Deno.test("end: a sync finally that yields for ever is cut off, not a hung thread", async () => {
  await using rig = await lineRig("endless-finally", function* () {
    try {
      yield stop();
    } finally {
      for (;;) yield;
    }
  });
  const { conn } = await rig.open();
  assert.equal(await within(2000, conn.closed, "closed"), "normal");
});

Deno.test("end: what a step sends before stop is written while its finally awaits, not lost at the deadline", async () => {
  const slow = Promise.withResolvers<void>();
  await using rig = await lineRig("sends-before-stop", async function* () {
    try {
      yield [send("bye"), stop("done")];
    } finally {
      await slow.promise; // longer than the deadline
    }
  }, { shutdownTimeout: 300 });
  const { peer, conn } = await rig.open();
  assert.equal(await readUntil(peer, "bye\n"), "bye\n", "written at once");
  assert.equal(await within(3000, conn.closed, "closed at the deadline"), "done");
  slow.resolve();
});

Deno.test("end: a second server.stop() with a shorter timeout wins over the first", async () => {
  await using rig = await lineRig("second-stop", async function* () {
    for (;;) yield; // ignores shutdown
  });
  const { conn } = await rig.open();
  const first = tracked(rig.server.stop("shutdown", { timeout: 60_000 }));
  await within(2000, rig.server.stop("shutdown", { timeout: 100 }), "the second stop");
  assert.equal(first.settled(), true);
  assert.equal(await conn.closed, "shutdown");
});

Deno.test("end: a shorter stop timeout wins over a shutdown already running", async () => {
  await using rig = await lineRig("earliest-wins", async function* () {
    for (;;) yield; // ignores shutdown
  });
  const { conn } = await rig.open();
  const slow = tracked(conn.stop("slow", { timeout: 60_000 }));
  await within(
    2000,
    rig.server.stop("shutdown", { timeout: 100 }),
    "server.stop({ timeout: 100 })",
  );
  assert.equal(slow.settled(), true, "the earlier stop resolved too");
  assert.equal(await conn.closed, "slow", "the first shutdown's reason stands");
});

Deno.test("end: an idle shutdown in progress does not hold a later, shorter stop", async () => {
  const events = new Inbox<string>(3000);
  await using rig = await lineRig("idle-then-stop", async function* () {
    for (;;) events.push((yield).type); // ignores shutdown("idle")
  }, { idleTimeout: 20, shutdownTimeout: 60_000 });
  await rig.open();
  assert.equal(await events.next(3000, "the idle shutdown"), "shutdown");
  await within(2000, rig.server.stop("shutdown", { timeout: 100 }), "server.stop");
});

Deno.test("end: a connection lingering for a peer that does not read is cut off by a later stop", async () => {
  const big = "x".repeat(60_000);
  const returned = Promise.withResolvers<void>();
  await using rig = await lineRig("linger", async function* () {
    try {
      // 10 lines of 60 KB (under the 1 MiB that holds a handler back) to a peer that reads
      // nothing, then stop: the end lingers.
      yield [...Array.from({ length: 10 }, () => send(big)), stop()];
    } finally {
      returned.resolve();
    }
  }, { bufferSize: 1024 });
  const { conn } = await rig.open();
  await within(3000, returned.promise, "the handler returns");
  assert.ok(conn.bufferedAmount > 0, "output is pending");
  await within(
    2000,
    rig.server.stop("shutdown", { timeout: 100 }),
    "server.stop({ timeout: 100 })",
  );
  assert.equal(await conn.closed, "normal");
});

Deno.test("upgrade: a codeChange that throws ends only that connection, with its error", async () => {
  const logger = capturingLogger();
  await using rig = await lineRig("bad-code-change", function* (_conn, state?: number) {
    const ev = yield;
    if (ev.type === "packet") {
      yield [send(`v1 ${ev.data} ${state ?? 0}`), hibernate((state ?? 0) + 1)];
    }
  }, { logger });
  const a = await rig.open();
  const b = await rig.open();
  await writeText(a.peer, "one\n");
  assert.equal(await readUntil(a.peer, "\n"), "v1 one 0\n");
  await writeText(b.peer, "one\n");
  assert.equal(await readUntil(b.peer, "\n"), "v1 one 0\n");
  await until(() => a.conn.hibernating && b.conn.hibernating, "both hibernate");
  const boom = new Error("codeChange failed");
  let changes = 0;
  rig.server.upgrade(function* () {
    const ev = yield;
    if (ev.type === "packet") yield send(`v2 ${ev.data}`);
  }, {
    codeChange(state) {
      if (++changes === 1) throw boom; // a's wake
      return state;
    },
  });
  await writeText(a.peer, "two\n");
  assert.equal(await within(2000, a.conn.closed, "a closes"), boom);
  await writeText(b.peer, "two\n");
  assert.equal(await readUntil(b.peer, "\n"), "v2 two\n", "b switched and goes on");
  assert.equal(rig.server.status, "running");
});

Deno.test("upgrade: two upgrades while hibernated compose their codeChanges in order", async () => {
  await using rig = await lineRig(
    "composed-upgrades",
    function* (_conn, state?: { v: number; n?: number }) {
      const ev = yield;
      if (ev.type === "packet") {
        yield [
          send(JSON.stringify(state ?? null)),
          hibernate(state ?? { v: 1 }),
        ];
      }
    },
  );
  const { peer, conn } = await rig.open();
  await writeText(peer, "a\n");
  assert.equal(await readUntil(peer, "\n"), "null\n");
  await until(() => conn.hibernating, "it hibernates");
  const handler = function* (_conn: Connection<string>, state?: unknown): HandlerGenerator<string> {
    const ev = yield;
    if (ev.type === "packet") yield send(JSON.stringify(state));
  };
  rig.server.upgrade(handler, { codeChange: (s) => ({ ...(s as object), v: 2, n: 7 }) });
  rig.server.upgrade(handler, { codeChange: (s) => ({ ...(s as object), v: 3 }) });
  await writeText(peer, "b\n");
  assert.deepEqual(JSON.parse(await readUntil(peer, "\n")), { v: 3, n: 7 });
});

/** A memory transport whose connections need a handshake that completes only when told. */
function handshaking(
  label: string,
): { transport: Transport; handshakes: Inbox<PromiseWithResolvers<void>> } {
  const handshakes = new Inbox<PromiseWithResolvers<void>>(3000);
  const transport = acceptingWith(freshMemory(label), (conn) => {
    const done = Promise.withResolvers<void>();
    handshakes.push(done);
    return {
      localAddr: conn.localAddr,
      remoteAddr: conn.remoteAddr,
      handshake: () => done.promise,
      read: (p) => conn.read(p),
      write: (p) => conn.write(p),
      closeWrite: () => conn.closeWrite(),
      close: () => conn.close(),
    };
  });
  return { transport, handshakes };
}

for (const outcome of ["succeeds", "fails"] as const) {
  Deno.test(`server.stop() during a transport handshake resolves, whether the handshake then ${outcome}`, async () => {
    const { transport, handshakes } = handshaking(`handshake-${outcome}`);
    let started = 0;
    const server = await serve(async function* () {
      started++;
      yield;
    }, { transport, logger: capturingLogger() });
    await transport.connect({});
    const handshake = await handshakes.next();
    const stopping = tracked(server.stop("shutdown", { timeout: 100 }));
    if (outcome === "succeeds") handshake.resolve();
    else handshake.reject(new Error("bad handshake"));
    await within(2000, stopping.promise, "server.stop");
    assert.equal(started, 0, "no handler ran");
  });
}

Deno.test("a stalled handshake does not hold back a good client, and is closed at handshakeTimeout", async () => {
  const { transport, handshakes } = handshaking("handshake-stalled");
  const logger = capturingLogger();
  const started = new Inbox<string>(3000);
  await using _server = {
    server: await serve(async function* (conn) {
      started.push(conn.id);
      yield;
    }, { transport, handshakeTimeout: 50, logger }),
    [Symbol.asyncDispose]() {
      return this.server.stop();
    },
  };
  const stalled = await transport.connect({});
  await handshakes.next(); // never completed
  await transport.connect({});
  (await handshakes.next()).resolve();
  await started.next(3000, "the good client starts");
  // The stalled one is closed at the timeout: its peer reads the end.
  assert.equal(await stalled.read(new Uint8Array(1)), null);
  assert.deepEqual(logger.levels, ["debug"], "one debug line for the bad peer");
});
