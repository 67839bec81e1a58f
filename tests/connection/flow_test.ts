// Writing and flow control: sends in order and batched, and backpressure in both directions.

import assert from "node:assert/strict";
import {
  ConnectionClosed,
  type Event,
  type HandlerGenerator,
  lines,
  recv,
  send,
  setTimeout as arm,
} from "../../mod.ts";
import type { Conn } from "../../transport/transport.ts";
import { Outbox } from "../../_outbox.ts";
import {
  capturingLogger,
  collector,
  counting,
  echo,
  idle,
  Inbox,
  lineClient,
  lineServer,
  NEXT_MS,
  tracked,
  transportFor,
  within,
} from "./_support.ts";

// ---- Writing ------------------------------------------------------------------------------

Deno.test("send: several sends in one yield arrive in order, in one write", async () => {
  const counted = counting(transportFor("batched"));
  await using s = await lineServer(counted.transport, async function* (): HandlerGenerator<string> {
    const ev: Event<string> = yield;
    if (ev.type !== "cast") return;
    yield ["one", "two", "three", "four"].map((x) => send(x));
    for (;;) if ((yield).type === "shutdown") return;
  });
  const c = collector();
  await using _client = await lineClient(counted.transport, c.handler);
  const conn = await s.conns.next();
  conn.cast("go");
  for (const x of ["one", "two", "three", "four"]) assert.equal(await c.lines.next(), x);
  assert.equal(counted.accepted[0].writes, 1);
  assert.equal(counted.accepted[0].bytesWritten, "one\ntwo\nthree\nfour\n".length);
});

Deno.test("sendSync: resolves once the bytes have been written to the socket", async () => {
  const counted = counting(transportFor("send-sync"));
  await using _s = await lineServer(counted.transport, echo);
  const c = collector();
  await using client = await lineClient(counted.transport, c.handler);
  const written = client.sendSync("hello");
  assert.equal(counted.connected[0].bytesWritten, 0, "written synchronously?");
  await written;
  assert.equal(counted.connected[0].bytesWritten, "hello\n".length);
  assert.equal(await c.lines.next(), "hello");
});

Deno.test("send: from outside the handler, in order, interleaved with the handler's own sends", async () => {
  const transport = transportFor("send-outside");
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "cast") ev = yield send(`handler ${ev.message}`);
      else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  });
  const c = collector();
  await using _client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  conn.send("outside 1");
  conn.send("outside 2");
  assert.equal(await c.lines.next(), "outside 1");
  assert.equal(await c.lines.next(), "outside 2");
  conn.cast(3);
  assert.equal(await c.lines.next(), "handler 3");
  await conn.sendSync("outside 4");
  assert.equal(await c.lines.next(), "outside 4");
});

Deno.test("send: data the framing cannot encode throws (send) or rejects (sendSync) at once", async () => {
  const transport = transportFor("send-bad");
  await using _s = await lineServer(transport, echo);
  const c = collector();
  await using client = await lineClient(transport, c.handler);
  // deno-lint-ignore no-explicit-any
  assert.throws(() => client.send(42 as any), TypeError);
  // deno-lint-ignore no-explicit-any
  await assert.rejects(client.sendSync({ not: "a line" } as any), TypeError);
  // The connection is unharmed.
  await client.sendSync("fine");
  assert.equal(await c.lines.next(), "fine");
});

Deno.test("after close: sendSync and call reject with ConnectionClosed, send is ignored, register is false", async () => {
  const transport = transportFor("after-close");
  await using _s = await lineServer(transport, idle);
  const client = await lineClient(transport, idle);
  await client.stop();
  assert.equal(await client.closed, "normal");
  await assert.rejects(client.sendSync("too late"), ConnectionClosed);
  await assert.rejects(client.call("anyone?"), ConnectionClosed);
  assert.doesNotThrow(() => client.send("into the void"));
  assert.doesNotThrow(() => client.cast("nobody"));
  assert.equal(await client.register("ghost"), false);
  await client.stop(); // stopping again is harmless
});

Deno.test("sends are written while the handler awaits something between events", async () => {
  // Two frames in one read: the handler answers the first, takes the second from its mailbox
  // at once, and then awaits something that only happens once the first answer got out.
  const transport = transportFor("send-latency");
  const answered = Promise.withResolvers<void>();
  await using _s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "packet") {
        if (ev.data === "second") await within(1000, answered.promise, "first answer");
        ev = yield send(`answer ${ev.data}`);
      } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  });
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [send("first"), send("second")];
    for (;;) {
      if (ev.type === "packet") {
        got.push(ev.data);
        if (ev.data === "answer first") answered.resolve();
        if (got.length === 2) done.resolve();
      } else if (ev.type === "shutdown") return;
      ev = yield;
    }
  });
  await within(2000, done.promise);
  assert.deepEqual(got, ["answer first", "answer second"]);
});

Deno.test("flushLater: outboxes share one timer; one giving up leaves the others' flush, the last no timer", async () => {
  // The timers armed and not yet fired or cleared, counted around the real ones.
  const armed = new Set<unknown>();
  const g = globalThis as unknown as Record<string, unknown>;
  const real = { setTimeout, clearTimeout };
  g.setTimeout = (fn: () => void, ms?: number) => {
    const id = real.setTimeout(() => (armed.delete(id), fn()), ms);
    armed.add(id);
    return id;
  };
  g.clearTimeout = (id?: number) => {
    armed.delete(id);
    real.clearTimeout(id);
  };
  try {
    const written: string[] = [];
    const drained = Promise.withResolvers<void>();
    const socket = (name: string) =>
      ({
        write: (p: Uint8Array) => (written.push(`${name}:${p.length}`), Promise.resolve(p.length)),
        closeWrite: () => Promise.resolve(),
      }) as unknown as Conn;
    const owner = (onDrained = () => {}) => ({ outboxDrained: onDrained, outboxFailed() {} });
    const a = new Outbox(socket("a"), owner());
    const b = new Outbox(socket("b"), owner(drained.resolve));
    a.encode(lines(), "x");
    b.encode(lines(), "yy");
    a.flushLater();
    b.flushLater();
    a.flushLater();
    assert.equal(armed.size, 1, "one timer for both");
    a.abort(new Error("gone")); // a gives up; b still waits for the timer
    assert.equal(armed.size, 1, "b still waits");
    assert.deepEqual(written, [], "nothing is written before the next macrotask");
    await within(1000, drained.promise, "b's flush");
    assert.deepEqual(written, ["b:3"]);
    // An outbox that gives up alone takes the timer with it.
    const c = new Outbox(socket("c"), owner());
    c.encode(lines(), "z");
    c.flushLater();
    assert.equal(armed.size, 1);
    c.abort(new Error("gone"));
    assert.equal(armed.size, 0, "no timer left behind");
    assert.ok(c.idle);
  } finally {
    g.setTimeout = real.setTimeout;
    g.clearTimeout = real.clearTimeout;
  }
});

// ---- Flow control -------------------------------------------------------------------------

/** A client whose handler fires a named marker timer after `arm` casts; each firing lands in `fired`. */
function markerClient() {
  const fired = new Inbox<void>(NEXT_MS);
  const handler = async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "cast" && ev.message === "arm") {
        ev = yield arm(40, "marker");
        continue;
      }
      if (ev.type === "timeout" && ev.name === "marker") fired.push();
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      ev = yield;
    }
  };
  return { fired, handler };
}

Deno.test("flow control: a handler that takes no more events stalls the peer's writes; released, all arrive in order", async () => {
  const counted = counting(transportFor("flow-in", 1024));
  const release = Promise.withResolvers<void>();
  const got: string[] = [];
  const N = 300;
  const allIn = Promise.withResolvers<void>();
  await using _s = await lineServer(
    counted.transport,
    async function* (): HandlerGenerator<string> {
      let ev: Event<string> = yield;
      for (;;) {
        if (ev.type === "packet") {
          got.push(ev.data);
          if (got.length === 1) await release.promise; // stuck: takes no events for now
          if (got.length === N) allIn.resolve();
        } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
        ev = yield;
      }
    },
    { highWaterMark: 4 },
  );
  const peer = markerClient();
  await using client = await lineClient(counted.transport, peer.handler);
  const frame = (i: number) => `frame ${i} ${"x".repeat(90)}`;
  const total = Array.from({ length: N }, (_, i) => frame(i).length + 1).reduce((a, b) => a + b);
  const writes = Array.from({ length: N }, (_, i) => tracked(client.sendSync(frame(i))));
  // Let a marker timer on the client fire: by then the server has long had its chance to read.
  client.cast("arm");
  await peer.fired.next();
  assert.equal(got.length, 1, "the stuck handler took another event");
  assert.equal(writes[N - 1].settled(), false, "the peer's last write went through");
  const read = counted.accepted[0].bytesRead;
  assert.ok(read < 16 * 1024 && read < total / 2, `the server read ${read} of ${total} bytes`);
  // Once released, everything arrives, in order, and every write completes.
  release.resolve();
  await within(3000, allIn.promise);
  await within(1000, Promise.all(writes.map((w) => w.promise)));
  assert.deepEqual(got, Array.from({ length: N }, (_, i) => frame(i)));
  assert.equal(counted.accepted[0].bytesRead, total);
});

Deno.test("flow control: reading waits while the mailbox holds highWaterMark frames", async () => {
  // 12000 frames (~1.2 MB) written at once to a handler that takes them one by one: the driver
  // may read ahead by about one read (at most 256 KiB), never by the whole stream.
  const counted = counting(transportFor("flow-hwm"));
  const N = 12_000;
  const frame = (i: number) => `${String(i).padStart(5, "0")} ${"h".repeat(94)}`;
  let consumed = 0;
  let ahead = 0;
  const allIn = Promise.withResolvers<void>();
  await using _s = await lineServer(
    counted.transport,
    async function* (): HandlerGenerator<string> {
      let ev: Event<string> = yield;
      for (;;) {
        if (ev.type === "packet") {
          assert.equal(ev.data, frame(consumed));
          consumed++;
          ahead = Math.max(ahead, counted.accepted[0].bytesRead - consumed * 101);
          if (consumed === N) allIn.resolve();
        } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
        ev = yield;
      }
    },
    { highWaterMark: 4 },
  );
  await using client = await lineClient(counted.transport, idle);
  for (let i = 0; i < N; i++) client.send(frame(i));
  await within(5000, allIn.promise);
  // One read (the driver's largest is 256 KiB today) plus the few frames the mailbox may hold;
  // without the high-water mark it reads the whole ~1.2 MB ahead.
  assert.ok(ahead <= 320 * 1024, `read ${ahead} bytes ahead of the handler`);
});

Deno.test("flow control: a peer that never reads stops the handler at the write high-water mark", async () => {
  const transport = transportFor("flow-out", 1024);
  const chunk = "o".repeat(60_000);
  const N = 100; // 6 MB in all, far past the driver's write high-water mark
  let handled = 0;
  const allHandled = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "cast") {
        if (++handled === N) allHandled.resolve();
        ev = yield send(chunk);
      } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  });
  // The peer: passive, so it reads nothing until told to; then it receives everything.
  const fired = new Inbox<number>(NEXT_MS);
  let received = 0;
  const allReceived = Promise.withResolvers<void>();
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "cast" && ev.message === "arm") ev = yield arm(40, "marker");
      else if (ev.type === "timeout") {
        fired.push(handled);
        ev = yield;
      } else if (ev.type === "cast" && ev.message === "read") ev = yield recv();
      else if (ev.type === "packet") {
        assert.equal(ev.data, chunk);
        if (++received === N) allReceived.resolve();
        ev = yield recv();
      } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  }, { mode: "passive", framing: lines({ maxLength: 100_000 }) });
  const conn = await s.conns.next();
  for (let i = 0; i < N; i++) conn.cast(i);
  client.cast("arm");
  const handledAtMarker = await fired.next();
  assert.ok(handledAtMarker >= 1, "the handler never ran");
  assert.ok(handledAtMarker < N, "the handler was resumed for every event");
  assert.ok(
    handledAtMarker * chunk.length <= 2 * 1024 * 1024,
    `${handledAtMarker} frames of 60 kB queued for a peer that does not read`,
  );
  // A second marker: still stuck (not merely slow).
  client.cast("arm");
  assert.equal(await fired.next(), handledAtMarker);
  // The peer reads: the handler goes on, and everything arrives.
  client.cast("read");
  await within(5000, allHandled.promise);
  await within(5000, allReceived.promise);
  assert.equal(received, N);
});

Deno.test("flow control: stopping a connection stuck on a peer that never reads forces it after the timeout", async () => {
  const transport = transportFor("flow-stop", 1024);
  const chunk = "s".repeat(60_000);
  let finallyRan = false;
  const logger = capturingLogger();
  const busy = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    try {
      let ev: Event<string> = yield;
      for (;;) {
        if (ev.type === "cast" && ev.message === 3) busy.resolve(); // output is piling up
        if (ev.type === "cast") ev = yield send(chunk);
        else ev = yield; // ignores shutdown
      }
    } finally {
      finallyRan = true;
    }
  }, { logger });
  const peer = await transport.connect({}); // never reads
  const conn = await s.conns.next();
  for (let i = 0; i < 100; i++) conn.cast(i);
  await within(1000, busy.promise);
  const sync = conn.sendSync("behind all that").catch((e) => e);
  const started = performance.now();
  await within(2000, s.server.stop("going away", { timeout: 50 }));
  assert.ok(performance.now() - started >= 45, "forced before the timeout");
  assert.equal(await conn.closed, "going away");
  assert.ok(finallyRan, "finally did not run");
  assert.ok(
    await sync instanceof Error,
    "a pending sendSync must reject when the connection is forced",
  );
  peer.close();
});
