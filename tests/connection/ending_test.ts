// How a connection ends: shutdown, stop, return, throw, bad yields; finally runs, reasons logged.

import assert from "node:assert/strict";
import {
  ConnectionClosed,
  type Event,
  type HandlerGenerator,
  hibernate,
  ProtocolError,
  reply,
  send,
  setTimeout as arm,
  stop,
} from "../../mod.ts";
import {
  capturingLogger,
  idle,
  label,
  lineClient,
  lineServer,
  logNames,
  readToEnd,
  transportFor,
  within,
} from "./_support.ts";

// ---- Shutdown and finally -----------------------------------------------------------------

Deno.test("shutdown: conn.stop(reason) delivers shutdown with the reason; returning ends it normally", async () => {
  const transport = transportFor("shutdown");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  const got: Event<string>[] = [];
  const client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    for (;;) {
      const ev: Event<string> = yield;
      got.push(ev);
      if (ev.type === "shutdown") return;
    }
  }, { logger });
  await within(1000, client.stop("maintenance", { timeout: 1000 }));
  assert.deepEqual(got, [{ type: "shutdown", reason: "maintenance" }]);
  assert.equal(await client.closed, "normal");
  assert.deepEqual(logger.calls, []);
});

Deno.test("shutdown: a handler that ignores it is forced after the timeout, and its finally runs", async () => {
  const transport = transportFor("shutdown-forced");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  const got: string[] = [];
  let finallyRan = false;
  const client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    try {
      let ev: Event<string> = yield;
      for (;;) {
        got.push(label(ev));
        // Ignore the shutdown; a marker well inside the stop timeout shows it was not forced
        // at once.
        ev = ev.type === "shutdown" ? yield arm(20, "marker") : yield;
      }
    } finally {
      finallyRan = true;
    }
  }, { logger });
  await within(2000, client.stop("bye", { timeout: 150 }));
  assert.deepEqual(got, ["shutdown bye", "timeout marker"]);
  assert.ok(finallyRan, "finally did not run");
  assert.equal(await client.closed, "bye");
  assert.equal(
    logger.calls.length,
    1,
    "a forced end with a reason other than normal is logged once",
  );
});

for (
  const [how, body, expected] of [
    ["the stop action", async function* (): HandlerGenerator<string> {
      yield;
      yield stop("done");
    }, "done"],
    ["return", async function* (): HandlerGenerator<string> {
      yield;
      return;
    }, "normal"],
    ["throw", async function* (): HandlerGenerator<string> {
      yield;
      throw new Error("boom");
    }, "boom"],
  ] as const
) {
  Deno.test(`finally: runs when the handler ends by ${how}`, async () => {
    const transport = transportFor("finally");
    await using _s = await lineServer(transport, idle);
    const logger = capturingLogger();
    let finallyRan = 0;
    const client = await lineClient(transport, async function* (conn): HandlerGenerator<string> {
      try {
        yield* body() as HandlerGenerator<string>;
      } finally {
        finallyRan++;
        assert.equal(conn.hibernating, false);
      }
    }, { logger });
    client.cast("go");
    const reason = await within(1000, client.closed);
    assert.equal(reason instanceof Error ? reason.message : reason, expected);
    assert.equal(finallyRan, 1);
  });
}

// ---- How a connection ends ----------------------------------------------------------------

Deno.test("stop action: pending sends are flushed, then closed resolves with the reason, logged once", async () => {
  const transport = transportFor("stop-action");
  const logger = capturingLogger();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    yield;
    yield [send("last words"), stop({ code: 42 })];
    throw new Error("unreachable: resumed after stop");
  }, { logger });
  const peer = await transport.connect({});
  const conn = await s.conns.next();
  conn.cast("go");
  assert.equal(await within(1000, readToEnd(peer)), "last words\n");
  peer.close();
  assert.deepEqual(await conn.closed, { code: 42 });
  assert.equal(logger.calls.length, 1);
  assert.ok(
    logger.calls[0].some((x) => typeof x === "object" && (x as { code?: number })?.code === 42),
  );
});

Deno.test("return: closed resolves with normal, nothing is logged, pending writes are flushed first", async () => {
  // A small transport buffer: 20 × 10 kB cannot go out before the handler returns.
  const transport = transportFor("return", 1024);
  const logger = capturingLogger();
  const big = (i: number) => `${i} ${"r".repeat(10_000)}`;
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    yield Array.from({ length: 20 }, (_, i) => send(big(i)));
  }, { logger });
  const peer = await transport.connect({});
  const conn = await s.conns.next();
  conn.cast("go");
  const text = await within(2000, readToEnd(peer));
  peer.close();
  assert.equal(text, Array.from({ length: 20 }, (_, i) => big(i) + "\n").join(""));
  assert.equal(await conn.closed, "normal");
  assert.deepEqual(logger.calls, []);
});

Deno.test("throw: ends only that connection; closed is the error, logged once, pending calls rejected", async () => {
  const transport = transportFor("throw");
  const logger = capturingLogger();
  const boom = new Error("boom");
  const heldCall = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call" && ev.message === "hold") heldCall.resolve(); // never answered
      else if (ev.type === "call") {
        ev = yield reply(ev.from, `echo ${ev.message}`);
        continue;
      } else if (ev.type === "cast") throw boom;
      else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      ev = yield;
    }
  }, { logger });
  const peers = [await transport.connect({}), await transport.connect({})];
  const [a, b] = [await s.conns.next(), await s.conns.next()];
  const pending = a.call("hold");
  await within(1000, heldCall.promise);
  a.cast("explode");
  const err = await within(1000, pending.catch((e) => e));
  assert.ok(err instanceof ConnectionClosed, `expected ConnectionClosed, got ${err}`);
  assert.equal(err.reason, boom);
  assert.equal(await a.closed, boom);
  assert.equal(logger.calls.length, 1);
  assert.ok(logNames(logger.calls[0], boom));
  // The other connection goes on.
  assert.equal(await within(1000, b.call("still there?")), "echo still there?");
  assert.deepEqual(s.server.connections().map((c) => c.id), [b.id]);
  for (const peer of peers) peer.close();
});

for (
  const [what, garbage] of [
    ["a number", 42],
    ["an object without a known type", { type: "teleport" }],
    ["an array holding a non-action", [send("ok"), "nope"]],
  ] as const
) {
  Deno.test(`yielding ${what} ends the connection with ProtocolError`, async () => {
    const transport = transportFor("garbage");
    await using _s = await lineServer(transport, idle);
    const logger = capturingLogger();
    let finallyRan = false;
    // At the first yield: the handler's start fails, so connect() rejects with the error once
    // the connection has closed.
    const reason = await within(
      1000,
      lineClient(transport, async function* (): HandlerGenerator<string> {
        try {
          // deno-lint-ignore no-explicit-any
          yield garbage as any;
        } finally {
          finallyRan = true;
        }
      }, { logger }).then(() => "connected", (err: unknown) => err),
    );
    assert.ok(reason instanceof ProtocolError, `expected ProtocolError, got ${reason}`);
    assert.ok(finallyRan);
    assert.equal(logger.calls.length, 1);
  });
}

Deno.test("actions after hibernate or stop in the same yield are still performed, in order", async () => {
  const transport = transportFor("after-terminal");
  await using s = await lineServer(
    transport,
    async function* (_conn, state?: unknown): HandlerGenerator<string> {
      if (state === undefined) {
        yield [send("a"), hibernate("slept"), send("b"), arm(10, "alarm")];
        return;
      }
      const ev: Event<string> = yield;
      yield [send(`c (${state}, woken by ${label(ev)})`), stop("done"), send("d")];
    },
  );
  const peer = await transport.connect({});
  const conn = await s.conns.next();
  assert.equal(
    await within(2000, readToEnd(peer)),
    "a\nb\nc (slept, woken by timeout alarm)\nd\n",
  );
  peer.close();
  assert.equal(await conn.closed, "done");
});
