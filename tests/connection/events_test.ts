// Events reach async and plain generator handlers: packet, call/reply, cast, info, disconnect.

import assert from "node:assert/strict";
import {
  type CallEvent,
  ConnectionClosed,
  type Event,
  type HandlerGenerator,
  hibernate,
  reply,
  send,
  setTimeout as arm,
  stop,
  TimeoutError,
  type Yielded,
} from "../../mod.ts";
import {
  capturingLogger,
  collector,
  encoder,
  eventCollector,
  idle,
  Inbox,
  label,
  lineClient,
  lineServer,
  NEXT_MS,
  readToEnd,
  tracked,
  transportFor,
  within,
} from "./_support.ts";

// ---- packet, call, cast, info -------------------------------------------------------------

Deno.test("packet: a frame from the peer arrives as a packet event, and send answers it", async () => {
  const transport = transportFor("packet");
  await using _s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    const ev: Event<string> = yield;
    assert.equal(ev.type, "packet");
    if (ev.type === "packet") yield [send(ev.data.toUpperCase()), stop()];
  });
  const got = new Inbox<Event<string>>(NEXT_MS);
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield send("ping");
    for (;;) {
      got.push(ev);
      if (ev.type !== "packet") return;
      ev = yield;
    }
  });
  assert.deepEqual(await got.next(), { type: "packet", data: "PING" });
  // The server stopped after answering: the client sees the disconnect, then ends normally.
  assert.deepEqual(await got.next(), { type: "disconnect", side: "read" });
  assert.equal(await within(1000, client.closed), "normal");
});

Deno.test("call: a reply in the same step resolves the caller with the value", async () => {
  const transport = transportFor("call");
  await using _s = await lineServer(transport, idle);
  const seen: unknown[] = [];
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call") {
        seen.push(ev.message);
        ev = yield reply(ev.from, { doubled: (ev.message as number) * 2 });
      } else if (ev.type === "shutdown") return;
      else ev = yield;
    }
  });
  assert.deepEqual(await client.call(21), { doubled: 42 });
  assert.deepEqual(await client.call(5), { doubled: 10 });
  assert.deepEqual(seen, [21, 5]);
});

Deno.test("call: a reply deferred to a later event (a cast) resolves the caller then", async () => {
  const transport = transportFor("deferred");
  await using _s = await lineServer(transport, idle);
  const infoSeen = Promise.withResolvers<void>();
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    const waiting: CallEvent[] = [];
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call") waiting.push(ev);
      else if (ev.type === "info") infoSeen.resolve();
      else if (ev.type === "cast") {
        // Answer every waiting caller, from this later event.
        const { message } = ev;
        ev = yield waiting.splice(0).map((w) =>
          reply(w.from, `${w.message} answered by ${message}`)
        );
        continue;
      } else if (ev.type === "shutdown") return;
      ev = yield;
    }
  });
  const first = tracked(client.call("q1"));
  const second = tracked(client.call("q2"));
  // The info is handled after both calls: they are held, not answered.
  client.info("probe");
  await within(1000, infoSeen.promise);
  assert.equal(first.settled(), false);
  assert.equal(second.settled(), false);
  client.cast("go");
  assert.equal(await first.promise, "q1 answered by go");
  assert.equal(await second.promise, "q2 answered by go");
});

Deno.test("call: the connection dying before it replies rejects the caller with ConnectionClosed", async () => {
  const transport = transportFor("call-dies");
  const callSeen = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    for (;;) {
      const ev: Event<string> = yield;
      if (ev.type === "call") callSeen.resolve(); // held, never answered
      if (ev.type === "disconnect" || ev.type === "shutdown") return;
    }
  });
  const peer = await transport.connect({});
  const conn = await s.conns.next();
  const call = conn.call("are you there?");
  await within(1000, callSeen.promise);
  peer.close(); // the peer goes away: the handler returns on disconnect without replying
  const err = await within(1000, call.catch((e) => e));
  assert.ok(err instanceof ConnectionClosed, `expected ConnectionClosed, got ${err}`);
  assert.equal(err.reason, "normal");
  assert.equal(await conn.closed, "normal");
});

Deno.test("call: no reply in time rejects with TimeoutError; the late reply is ignored", async () => {
  const transport = transportFor("call-timeout");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    const held: CallEvent[] = [];
    let answering = false;
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call") {
        if (answering) {
          ev = yield reply(ev.from, `answer to ${ev.message}`);
          continue;
        }
        held.push(ev);
      } else if (ev.type === "cast") {
        answering = true;
        ev = yield held.splice(0).map((c) => reply(c.from, "too late")); // stale replies
        continue;
      } else if (ev.type === "shutdown") return;
      ev = yield;
    }
  }, { logger });
  const started = performance.now();
  const err = await within(1000, client.call("slow", { timeout: 30 }).catch((e) => e));
  assert.ok(err instanceof TimeoutError, `expected TimeoutError, got ${err}`);
  assert.ok(performance.now() - started >= 25, "rejected before the timeout");
  client.cast("answer now"); // replies to the timed-out call: ignored, nothing breaks
  assert.equal(await client.call("next"), "answer to next");
  assert.deepEqual(logger.calls, []);
});

Deno.test("cast: delivered as a cast event with its message, in order", async () => {
  const transport = transportFor("cast");
  await using _s = await lineServer(transport, idle);
  const { events, handler } = eventCollector();
  await using client = await lineClient(transport, handler);
  client.cast({ n: 1 });
  client.cast("two");
  assert.deepEqual(await events.next(), { type: "cast", message: { n: 1 } });
  assert.deepEqual(await events.next(), { type: "cast", message: "two" });
});

Deno.test("info: delivered as an info event with its message", async () => {
  const transport = transportFor("info");
  await using _s = await lineServer(transport, idle);
  const { events, handler } = eventCollector();
  await using client = await lineClient(transport, handler);
  client.info(["down", 7]);
  assert.deepEqual(await events.next(), { type: "info", message: ["down", 7] });
});

// ---- Disconnect and half-close ------------------------------------------------------------

Deno.test("disconnect: the peer closing delivers disconnect (no error) to the handler", async () => {
  const transport = transportFor("disconnect");
  const got: Event<string>[] = [];
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    for (;;) {
      const ev: Event<string> = yield;
      got.push(ev);
      if (ev.type === "disconnect") return;
    }
  });
  const peer = await transport.connect({});
  await peer.write(encoder.encode("hi\n"));
  peer.close();
  const conn = await s.conns.next();
  assert.equal(await within(1000, conn.closed), "normal");
  assert.deepEqual(got, [{ type: "packet", data: "hi" }, { type: "disconnect", side: "read" }]);
});

Deno.test("half-close: after the peer's closeWrite the handler gets disconnect and can still reply", async () => {
  const transport = transportFor("half-close");
  const got: string[] = [];
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    const heard: string[] = [];
    for (;;) {
      const ev: Event<string> = yield;
      got.push(label(ev));
      if (ev.type === "packet") heard.push(ev.data);
      if (ev.type === "disconnect") {
        // The peer will send no more; answer everything it said, then close.
        yield [...heard.map((h) => send(`got ${h}`)), stop()];
      }
    }
  });
  const peer = await transport.connect({});
  await peer.write(encoder.encode("one\ntwo\n"));
  await peer.closeWrite();
  assert.equal(await within(2000, readToEnd(peer)), "got one\ngot two\n");
  peer.close();
  const conn = await s.conns.next();
  assert.equal(await conn.closed, "normal");
  assert.deepEqual(got, ["packet one", "packet two", "disconnect"]);
});

// ---- Plain generators ------------------------------------------------------------------

Deno.test("a plain function* handler works like an async one", async () => {
  const transport = transportFor("sync-gen");
  await using s = await lineServer(
    transport,
    function* (): Generator<Yielded, void, Event<string>> {
      let count = 0;
      let ev: Event<string> = yield arm(30, "tick");
      for (;;) {
        switch (ev.type) {
          case "packet":
            ev = yield send(`echo ${ev.data}`);
            break;
          case "call":
            ev = yield reply(ev.from, ++count);
            break;
          case "timeout":
            ev = yield send(`tick ${ev.name}`);
            break;
          case "cast":
            ev = yield [send("sleeping"), hibernate(count)];
            break;
          case "shutdown":
          case "disconnect":
            return;
          default:
            ev = yield;
        }
      }
    },
  );
  const c = collector();
  await using client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  client.send("hi");
  assert.equal(await c.lines.next(), "echo hi");
  assert.equal(await conn.call("n"), 1);
  assert.equal(await conn.call("n"), 2);
  assert.equal(await c.lines.next(), "tick tick");
  conn.cast("sleep");
  assert.equal(await c.lines.next(), "sleeping");
  assert.equal(conn.hibernating, true);
});
