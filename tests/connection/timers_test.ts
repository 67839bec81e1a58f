// The event timeout and named timers: when they fire, what cancels, disarms or re-arms them.

import assert from "node:assert/strict";
import {
  type Connection,
  type Event,
  type HandlerGenerator,
  lines,
  recv,
  send,
  setTimeout as arm,
} from "../../mod.ts";
import {
  echo,
  idle,
  Inbox,
  label,
  lineClient,
  lineServer,
  NEXT_MS,
  transportFor,
  within,
} from "./_support.ts";

// ---- Timers -------------------------------------------------------------------------------

Deno.test("event timeout: fires once, without a name, when no event comes", async () => {
  const transport = transportFor("timeout-fires");
  await using _s = await lineServer(transport, idle);
  const got = new Inbox<Event<string>>(NEXT_MS);
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    got.push(yield arm(20));
    // It does not fire again: the next event is a later marker.
    got.push(yield arm(60, "marker"));
    for (;;) if ((yield).type === "shutdown") return;
  });
  const first = await got.next();
  assert.deepEqual(first, { type: "timeout" });
  assert.ok(!("name" in first), "the event timeout has no name");
  assert.deepEqual(await got.next(), { type: "timeout", name: "marker" });
});

Deno.test("event timeout: an event that arrives in time (a cast) cancels it", async () => {
  const transport = transportFor("timeout-cancel");
  const clientReady = Promise.withResolvers<Connection<string>>();
  // The server casts to the client once it has the client's packet: that is, after the client
  // armed its timeout in the same step that sent the packet.
  await using _s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    for (;;) {
      const ev: Event<string> = yield;
      if (ev.type === "packet") (await clientReady.promise).cast("hello");
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
    }
  });
  const got: Event<string>[] = [];
  const done = Promise.withResolvers<void>();
  const client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [arm(60), arm(200, "marker"), send("armed")];
    for (;;) {
      if (ev.type === "shutdown") return;
      got.push(ev);
      if (ev.type === "timeout" && ev.name === "marker") done.resolve();
      ev = yield;
    }
  });
  await using _client = client;
  clientReady.resolve(client);
  await within(2000, done.promise);
  assert.deepEqual(got, [
    { type: "cast", message: "hello" },
    { type: "timeout", name: "marker" }, // no nameless timeout in between
  ]);
});

Deno.test("event timeout: an event already waiting in the mailbox when it is armed cancels it", async () => {
  const transport = transportFor("timeout-queued");
  await using _s = await lineServer(transport, idle);
  const gotFirst = Promise.withResolvers<void>();
  const secondSent = Promise.withResolvers<void>();
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "shutdown") return;
      got.push(label(ev));
      if (ev.type === "cast" && ev.message === "first") {
        gotFirst.resolve();
        await secondSent.promise; // meanwhile "second" lands in the mailbox
        ev = yield [arm(40), arm(120, "marker")];
        continue;
      }
      if (ev.type === "timeout" && ev.name === "marker") done.resolve();
      ev = yield;
    }
  });
  client.cast("first");
  await within(1000, gotFirst.promise);
  client.cast("second");
  secondSent.resolve();
  await within(2000, done.promise);
  assert.deepEqual(got, ["cast first", "cast second", "timeout marker"]);
});

Deno.test("event timeout: does not fire while an event waits in the mailbox (handler held by a slow peer)", async () => {
  // The handler sends more than the write high-water mark to a peer that only starts reading
  // later, so it is not resumed for a while; a cast arrives meanwhile, well before its event
  // timeout expires. The timeout must not be delivered after the cast.
  const transport = transportFor("timeout-backpressure", 1024);
  const chunk = "p".repeat(60_000);
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [...Array.from({ length: 20 }, () => send(chunk)), arm(30)];
    for (;;) {
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      got.push(label(ev));
      if (ev.type === "timeout" && ev.name === "marker") done.resolve();
      ev = ev.type === "cast" ? yield arm(60, "marker") : yield;
    }
  });
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield arm(80, "start reading"); // after the server's timeout
    for (;;) {
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      ev = yield recv();
    }
  }, { mode: "passive", framing: lines({ maxLength: 100_000 }) });
  const conn = await s.conns.next();
  conn.cast("in time");
  await within(3000, done.promise);
  assert.deepEqual(got, ["cast in time", "timeout marker"]);
});

Deno.test("event timeout: setTimeout(null) disarms it", async () => {
  const transport = transportFor("timeout-null");
  await using _s = await lineServer(transport, idle);
  const got = new Inbox<Event<string>>(NEXT_MS);
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    got.push(yield [arm(20), arm(null), arm(80, "marker")]);
    for (;;) if ((yield).type === "shutdown") return;
  });
  assert.deepEqual(await got.next(), { type: "timeout", name: "marker" });
});

Deno.test("event timeout: re-armed on every event, it fires only once the events stop", async () => {
  const transport = transportFor("timeout-rearm");
  await using _s = await lineServer(transport, idle);
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    // A tick every 15 ms, five times, each event re-arming a 50 ms event timeout: the timeout
    // only comes 50 ms after the last tick.
    let ticks = 0;
    let ev: Event<string> = yield [arm(50), arm(15, "tick")];
    for (;;) {
      if (ev.type === "shutdown") return;
      if (ev.type === "timeout") got.push(ev.name ?? "timeout");
      if (ev.type === "timeout" && ev.name === undefined) {
        done.resolve();
        ev = yield;
      } else if (++ticks < 5) ev = yield [arm(50), arm(15, "tick")];
      else ev = yield arm(50);
    }
  });
  await within(2000, done.promise);
  assert.deepEqual(got, ["tick", "tick", "tick", "tick", "tick", "timeout"]);
});

Deno.test("named timer: survives other events and fires with its name", async () => {
  const transport = transportFor("named-survives");
  await using _s = await lineServer(transport, echo);
  const got: Event<string>[] = [];
  const done = Promise.withResolvers<void>();
  await using client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [arm(80, "tick"), send("a"), send("b")];
    for (;;) {
      if (ev.type === "shutdown") return;
      got.push(ev);
      if (ev.type === "timeout") done.resolve();
      ev = yield;
    }
  });
  client.cast("c");
  await within(2000, done.promise);
  const seen = got.map(label);
  assert.deepEqual(seen.slice(0, 3).toSorted(), ["cast c", "packet a", "packet b"]);
  assert.ok(seen.indexOf("packet a") < seen.indexOf("packet b"));
  assert.deepEqual(seen.slice(3), ["timeout tick"]);
});

Deno.test("named timer: setTimeout(null, name) cancels it", async () => {
  const transport = transportFor("named-cancel");
  await using _s = await lineServer(transport, echo);
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [arm(40, "doomed"), arm(120, "marker"), send("x")];
    for (;;) {
      if (ev.type === "shutdown") return;
      got.push(label(ev));
      if (ev.type === "timeout") done.resolve();
      // On the echo (well before 40 ms): cancel "doomed".
      ev = ev.type === "packet" ? yield arm(null, "doomed") : yield;
    }
  });
  await within(2000, done.promise);
  assert.deepEqual(got, ["packet x", "timeout marker"]);
});

Deno.test("named timer: arming a name again replaces its timer", async () => {
  const transport = transportFor("named-rearm");
  await using _s = await lineServer(transport, echo);
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _client = await lineClient(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield [arm(30, "t"), send("x")];
    for (;;) {
      if (ev.type === "shutdown") return;
      got.push(label(ev));
      if (ev.type === "packet") ev = yield [arm(100, "t"), arm(50, "m1")]; // "t" moves past m1
      else if (ev.type === "timeout" && ev.name === "t") ev = yield arm(60, "m2"); // no 2nd "t"
      else if (ev.type === "timeout" && ev.name === "m2") {
        done.resolve();
        ev = yield;
      } else ev = yield;
    }
  });
  await within(2000, done.promise);
  assert.deepEqual(got, ["packet x", "timeout m1", "timeout t", "timeout m2"]);
});
