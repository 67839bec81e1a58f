// The connection driver's semantics, over the in-process memory transport: every event and
// action of DESIGN.md, hibernation and upgrade, flow control in both directions, and how a
// connection ends. Tests synchronise on events and promises; timers appear only as the thing
// under test (or as a named "marker" timer whose firing orders the other events).

import assert from "node:assert/strict";
import {
  type Action,
  type CallEvent,
  type Conn,
  connect,
  type Connection,
  ConnectionClosed,
  type ConnectOptions,
  type Event,
  hibernate,
  lines,
  memory,
  MemoryRegistry,
  ProtocolError,
  recv,
  reply,
  send,
  serve,
  type ServeOptions,
  type Server,
  setTimeout as arm,
  stop,
  TimeoutError,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { capturingLogger, Inbox, tracked, within } from "./_support.ts";

// ---- Helpers ------------------------------------------------------------------------------

/** How long a test waits for an inbox's next value (ms). */
const NEXT_MS = 2000;

type Gen = AsyncGenerator<Yielded, void, Event<string>>;
type Handler = (
  conn: Connection<string>,
  state?: unknown,
) => Gen | Generator<Yielded, void, Event<string>>;

let names = 0;
/** A memory transport on a name no other test uses. */
function transportFor(label: string, bufferSize?: number): Transport {
  return memory(`connection-test-${label}-${++names}`, bufferSize ? { bufferSize } : {});
}

/** A lines() server whose connections (their handles, in accept order) land in `conns`. */
async function lineServer(
  transport: Transport,
  handler: Handler,
  options: Partial<ServeOptions<string>> = {},
): Promise<
  {
    server: Server<string>;
    conns: Inbox<Connection<string>>;
    [Symbol.asyncDispose](): Promise<void>;
  }
> {
  const conns = new Inbox<Connection<string>>(NEXT_MS);
  const seen = new WeakSet<Connection<string>>();
  const server = await serve<string>((conn: Connection<string>, state?: unknown) => {
    if (!seen.has(conn)) {
      seen.add(conn);
      conns.push(conn);
    }
    return handler(conn, state);
  }, { transport, framing: lines(), shutdownTimeout: 200, ...options });
  return { server, conns, [Symbol.asyncDispose]: () => server.stop() };
}

function lineClient(
  transport: Transport,
  handler: Handler,
  options: Partial<ConnectOptions<string>> = {},
): Promise<Connection<string>> {
  return connect<string>(handler, {
    transport,
    framing: lines(),
    shutdownTimeout: 200,
    ...options,
  });
}

/** Waits for events; ends on shutdown or disconnect. */
async function* idle(): Gen {
  for (;;) {
    const ev: Event<string> = yield;
    if (ev.type === "shutdown" || ev.type === "disconnect") return;
  }
}

/** Echoes every line; ends on shutdown or disconnect. */
async function* echo(): Gen {
  let ev: Event<string> = yield;
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "shutdown" || ev.type === "disconnect") return;
    else ev = yield;
  }
}

/** A client that queues every line it receives in `lines`. */
function collector(): { lines: Inbox<string>; handler: Handler } {
  const got = new Inbox<string>(NEXT_MS);
  return {
    lines: got,
    handler: async function* (): Gen {
      for (;;) {
        const ev: Event<string> = yield;
        if (ev.type === "packet") got.push(ev.data);
        else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      }
    },
  };
}

/** A client that queues every event in `events`, and ends on shutdown. */
function eventCollector(): { events: Inbox<Event<string>>; handler: Handler } {
  const events = new Inbox<Event<string>>(NEXT_MS);
  return {
    events,
    handler: async function* (): Gen {
      for (;;) {
        const ev: Event<string> = yield;
        if (ev.type === "shutdown") return;
        events.push(ev);
      }
    },
  };
}

/** Reads a raw socket to end of stream. */
async function readToEnd(sock: Conn): Promise<string> {
  const text = new TextDecoder();
  const buf = new Uint8Array(4096);
  let out = "";
  for (;;) {
    const n = await sock.read(buf);
    if (n === null) return out + text.decode();
    out += text.decode(buf.subarray(0, n), { stream: true });
  }
}

interface Counts {
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
}

/** Wraps a Conn to count its reads and writes. */
class CountingConn implements Conn {
  readonly counts: Counts = { reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0 };
  constructor(readonly inner: Conn) {}
  get localAddr() {
    return this.inner.localAddr;
  }
  get remoteAddr() {
    return this.inner.remoteAddr;
  }
  async read(p: Uint8Array): Promise<number | null> {
    const n = await this.inner.read(p);
    if (n !== null) {
      this.counts.reads++;
      this.counts.bytesRead += n;
    }
    return n;
  }
  async write(p: Uint8Array): Promise<number> {
    this.counts.writes++;
    const n = await this.inner.write(p);
    this.counts.bytesWritten += n;
    return n;
  }
  closeWrite(): Promise<void> {
    return this.inner.closeWrite();
  }
  close(): void {
    this.inner.close();
  }
}

/** A transport whose accepted and connected sockets count their reads and writes. */
function counting(
  base: Transport,
): { transport: Transport; accepted: Counts[]; connected: Counts[] } {
  const accepted: Counts[] = [];
  const connected: Counts[] = [];
  const transport: Transport = {
    name: `counting-${base.name}`,
    async listen(options) {
      const listener = await base.listen(options);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        async accept() {
          const conn = new CountingConn(await listener.accept());
          accepted.push(conn.counts);
          return conn;
        },
      };
    },
    async connect(options) {
      const conn = new CountingConn(await base.connect(options));
      connected.push(conn.counts);
      return conn;
    },
  };
  return { transport, accepted, connected };
}

const encoder = new TextEncoder();

/** A short text for an event, to compare sequences of events. */
function label(ev: Event<string>): string {
  switch (ev.type) {
    case "packet":
      return `packet ${ev.data}`;
    case "cast":
    case "info":
      return `${ev.type} ${ev.message}`;
    case "call":
      return `call ${ev.message}`;
    case "timeout":
      return ev.name === undefined ? "timeout" : `timeout ${ev.name}`;
    case "shutdown":
      return `shutdown ${ev.reason}`;
    case "disconnect":
      return ev.error ? `disconnect ${ev.error.name}` : "disconnect";
    default:
      return ev.type;
  }
}

// ---- packet, call, cast, info -------------------------------------------------------------

Deno.test("packet: a frame from the peer arrives as a packet event, and send answers it", async () => {
  const transport = transportFor("packet");
  await using _s = await lineServer(transport, async function* (): Gen {
    const ev: Event<string> = yield;
    assert.equal(ev.type, "packet");
    if (ev.type === "packet") yield [send(ev.data.toUpperCase()), stop()];
  });
  const got = new Inbox<Event<string>>(NEXT_MS);
  await using client = await lineClient(transport, async function* (): Gen {
    let ev: Event<string> = yield send("ping");
    for (;;) {
      got.push(ev);
      if (ev.type !== "packet") return;
      ev = yield;
    }
  });
  assert.deepEqual(await got.next(), { type: "packet", data: "PING" });
  // The server stopped after answering: the client sees the disconnect, then ends normally.
  assert.deepEqual(await got.next(), { type: "disconnect" });
  assert.equal(await within(1000, client.closed), "normal");
});

Deno.test("call: a reply in the same step resolves the caller with the value", async () => {
  const transport = transportFor("call");
  await using _s = await lineServer(transport, idle);
  const seen: unknown[] = [];
  await using client = await lineClient(transport, async function* (): Gen {
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
  await using client = await lineClient(transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
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
  await using client = await lineClient(transport, async function* (): Gen {
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

// ---- Timers -------------------------------------------------------------------------------

Deno.test("event timeout: fires once, without a name, when no event comes", async () => {
  const transport = transportFor("timeout-fires");
  await using _s = await lineServer(transport, idle);
  const got = new Inbox<Event<string>>(NEXT_MS);
  await using _client = await lineClient(transport, async function* (): Gen {
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
  await using _s = await lineServer(transport, async function* (): Gen {
    for (;;) {
      const ev: Event<string> = yield;
      if (ev.type === "packet") (await clientReady.promise).cast("hello");
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
    }
  });
  const got: Event<string>[] = [];
  const done = Promise.withResolvers<void>();
  const client = await lineClient(transport, async function* (): Gen {
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
  await using client = await lineClient(transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
    let ev: Event<string> = yield [...Array.from({ length: 20 }, () => send(chunk)), arm(30)];
    for (;;) {
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      got.push(label(ev));
      if (ev.type === "timeout" && ev.name === "marker") done.resolve();
      ev = ev.type === "cast" ? yield arm(60, "marker") : yield;
    }
  });
  await using _client = await lineClient(transport, async function* (): Gen {
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
  await using _client = await lineClient(transport, async function* (): Gen {
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
  await using _client = await lineClient(transport, async function* (): Gen {
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
  await using client = await lineClient(transport, async function* (): Gen {
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
  await using _client = await lineClient(transport, async function* (): Gen {
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
  await using _client = await lineClient(transport, async function* (): Gen {
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

// ---- Passive mode -------------------------------------------------------------------------

Deno.test("passive: frames are read only on recv, one packet per recv, in order", async () => {
  const counted = counting(transportFor("passive"));
  const got = new Inbox<string>(NEXT_MS);
  await using s = await lineServer(counted.transport, async function* (): Gen {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      got.push(label(ev));
      // Events other than packets come without recv; reading starts with the cast "go".
      const reading = ev.type === "packet" || (ev.type === "cast" && ev.message === "go");
      ev = reading ? yield recv() : yield; // recv without a timeout: waits as long as it takes
    }
  }, { mode: "passive" });
  await using client = await lineClient(counted.transport, idle);
  await Promise.all([client.sendSync("a"), client.sendSync("b"), client.sendSync("c")]);
  const conn = await s.conns.next();
  conn.info("probe");
  assert.equal(await got.next(), "info probe");
  assert.equal(counted.accepted[0].bytesRead, 0, "read before any recv");
  conn.cast("go");
  assert.equal(await got.next(), "cast go");
  assert.equal(await got.next(), "packet a");
  assert.equal(await got.next(), "packet b");
  assert.equal(await got.next(), "packet c");
  // The fourth recv finds nothing buffered and waits for the next frame.
  await client.sendSync("d");
  assert.equal(await got.next(), "packet d");
  assert.equal(got.size, 0);
});

Deno.test("passive: recv(timeoutMs) yields recvTimeout when nothing comes; a frame in time cancels it", async () => {
  const transport = transportFor("passive-timeout");
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _s = await lineServer(transport, async function* (): Gen {
    let ev: Event<string> = yield recv(30); // the client sends nothing yet
    got.push(label(ev));
    // Ask the client for a frame and wait for it with a timeout it beats; a later marker shows
    // that no recvTimeout follows.
    ev = yield [send("please"), recv(100), arm(160, "marker")];
    got.push(label(ev));
    ev = yield;
    got.push(label(ev));
    done.resolve();
    for (;;) if ((yield).type === "shutdown") return;
  }, { mode: "passive" });
  await using _client = await lineClient(transport, echo);
  await within(2000, done.promise);
  assert.deepEqual(got, ["recvTimeout", "packet please", "timeout marker"]);
});

Deno.test("passive: recv after the peer closed yields the buffered frames, then disconnect", async () => {
  const transport = transportFor("passive-eof");
  const got: string[] = [];
  await using s = await lineServer(transport, async function* (): Gen {
    for (;;) {
      const ev: Event<string> = yield recv(1000);
      got.push(label(ev));
      if (ev.type !== "packet") return;
    }
  }, { mode: "passive" });
  const peer = await transport.connect({});
  await peer.write(encoder.encode("last\nwords\n"));
  peer.close();
  const conn = await s.conns.next();
  assert.equal(await within(2000, conn.closed), "normal");
  assert.deepEqual(got, ["packet last", "packet words", "disconnect"]);
});

Deno.test("active: yielding recv ends the connection with ProtocolError (logged, finally run)", async () => {
  const transport = transportFor("active-recv");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  let finallyRan = false;
  const client = await lineClient(transport, async function* (): Gen {
    try {
      yield recv();
    } finally {
      finallyRan = true;
    }
  }, { logger });
  const reason = await within(1000, client.closed);
  assert.ok(reason instanceof ProtocolError, `expected ProtocolError, got ${reason}`);
  assert.match(reason.message, /passive/);
  assert.ok(finallyRan);
  assert.equal(logger.calls.length, 1);
  assert.ok(logger.calls[0].includes(reason));
});

// ---- Disconnect and half-close ------------------------------------------------------------

Deno.test("disconnect: the peer closing delivers disconnect (no error) to the handler", async () => {
  const transport = transportFor("disconnect");
  const got: Event<string>[] = [];
  await using s = await lineServer(transport, async function* (): Gen {
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
  assert.deepEqual(got, [{ type: "packet", data: "hi" }, { type: "disconnect" }]);
});

Deno.test("half-close: after the peer's closeWrite the handler gets disconnect and can still reply", async () => {
  const transport = transportFor("half-close");
  const got: string[] = [];
  await using s = await lineServer(transport, async function* (): Gen {
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

// ---- Shutdown and finally -----------------------------------------------------------------

Deno.test("shutdown: conn.stop(reason) delivers shutdown with the reason; returning ends it normally", async () => {
  const transport = transportFor("shutdown");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  const got: Event<string>[] = [];
  const client = await lineClient(transport, async function* (): Gen {
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
  const client = await lineClient(transport, async function* (): Gen {
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
    ["the stop action", async function* (): Gen {
      yield stop("done");
    }, "done"],
    ["return", async function* (): Gen {
      yield;
      return;
    }, "normal"],
    ["throw", async function* (): Gen {
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
    const client = await lineClient(transport, async function* (conn): Gen {
      try {
        yield* body() as Gen;
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

// ---- Hibernation --------------------------------------------------------------------------

/**
 * A server handler that hibernates between events. Started fresh (no state) it hibernates at
 * once with state 0; woken with state n it sends "awake n" from its first yield, answers the
 * waking event, then sends "zz n+1" and hibernates with n+1. `extra` adds actions to every
 * hibernation (timers armed before sleeping).
 */
function sleeper(extra: () => Action[] = () => []) {
  const calls: unknown[] = []; // the state each generator was started with
  const woke: Event<string>[] = []; // the event each first yield returned
  const awake: boolean[] = []; // conn.hibernating while a generator runs
  let finallies = 0;
  const handler = async function* (conn: Connection<string>, state?: unknown): Gen {
    calls.push(state);
    awake.push(!conn.hibernating);
    try {
      if (state === undefined) {
        yield [...extra(), send("zz 0"), hibernate(0)];
        throw new Error("unreachable: resumed after hibernate");
      }
      const n = state as number;
      const ev: Event<string> = yield send(`awake ${n}`);
      woke.push(ev);
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      const answer = ev.type === "call" ? [reply(ev.from, `reply ${n} to ${ev.message}`)] : [];
      yield [...answer, ...extra(), send(`zz ${n + 1}`), hibernate(n + 1)];
      throw new Error("unreachable: resumed after hibernate");
    } finally {
      finallies++;
    }
  };
  return { handler, calls, woke, awake, finallies: () => finallies };
}

/** A hibernating server, a client collecting its lines, and the server side's handle. */
async function hibernating(label: string, extra?: () => Action[]) {
  const transport = transportFor(label);
  const h = sleeper(extra);
  const s = await lineServer(transport, h.handler);
  const c = collector();
  const client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  return {
    transport,
    h,
    s,
    client,
    conn,
    lines: c.lines,
    async [Symbol.asyncDispose]() {
      await client.stop();
      await s.server.stop();
    },
  };
}

Deno.test("hibernate: the generator is dropped without its finally; conn.hibernating is true", async () => {
  await using t = await hibernating("hib-flag");
  assert.equal(await t.lines.next(), "zz 0"); // written as the connection hibernated
  assert.equal(t.conn.hibernating, true);
  assert.equal(t.h.finallies(), 0);
  assert.deepEqual(t.h.calls, [undefined]);
});

Deno.test("hibernate: woken by a cast, handler(conn, state) runs its first yield's actions, then gets the cast", async () => {
  await using t = await hibernating("hib-cast");
  assert.equal(await t.lines.next(), "zz 0");
  t.conn.cast("wake up");
  assert.equal(await t.lines.next(), "awake 0"); // the new generator's first yield
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.calls, [undefined, 0]);
  assert.deepEqual(t.h.woke, [{ type: "cast", message: "wake up" }]);
  assert.deepEqual(t.h.awake, [true, true]);
  assert.equal(t.conn.hibernating, true);
  assert.equal(t.h.finallies(), 0);
  // And again, with the next state.
  t.conn.cast("again");
  assert.equal(await t.lines.next(), "awake 1");
  assert.equal(await t.lines.next(), "zz 2");
  assert.deepEqual(t.h.calls, [undefined, 0, 1]);
});

Deno.test("hibernate: woken by a packet", async () => {
  await using t = await hibernating("hib-packet");
  assert.equal(await t.lines.next(), "zz 0");
  t.client.send("knock knock");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.woke, [{ type: "packet", data: "knock knock" }]);
  assert.equal(t.h.finallies(), 0);
});

Deno.test("hibernate: woken by a call, whose reply reaches the caller", async () => {
  await using t = await hibernating("hib-call");
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await within(1000, t.conn.call("ping")), "reply 0 to ping");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.equal(t.h.woke[0].type, "call");
  assert.equal(await within(1000, t.conn.call("pong")), "reply 1 to pong");
});

Deno.test("hibernate: woken by a named timer armed before hibernating", async () => {
  let armed = 0;
  await using t = await hibernating("hib-timer", () => armed++ === 0 ? [arm(20, "alarm")] : []);
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await t.lines.next(), "awake 0");
  assert.equal(await t.lines.next(), "zz 1");
  assert.deepEqual(t.h.woke, [{ type: "timeout", name: "alarm" }]);
});

Deno.test("hibernate: woken by the event timeout armed before hibernating", async () => {
  let armed = 0;
  await using t = await hibernating("hib-timeout", () => armed++ === 0 ? [arm(20)] : []);
  assert.equal(await t.lines.next(), "zz 0");
  assert.equal(await t.lines.next(), "awake 0");
  assert.deepEqual(t.h.woke, [{ type: "timeout" }]);
});

Deno.test("hibernate: a shutdown wakes it, and stopping it does not run the dropped finally", async () => {
  await using t = await hibernating("hib-stop");
  assert.equal(await t.lines.next(), "zz 0");
  await within(1000, t.conn.stop("closing time"));
  assert.deepEqual(t.h.woke, [{ type: "shutdown", reason: "closing time" }]);
  // Only the woken generator's finally ran; the dropped one's never does.
  assert.equal(t.h.finallies(), 1);
  assert.equal(await t.conn.closed, "normal");
});

// ---- Upgrade ------------------------------------------------------------------------------

Deno.test("upgrade: a hibernated connection switches at its next wake, with codeChange(state)", async () => {
  await using t = await hibernating("upgrade-hibernated");
  assert.equal(await t.lines.next(), "zz 0");
  const states: unknown[] = [];
  const changes: unknown[] = [];
  t.s.server.upgrade(async function* (_conn: Connection<string>, state?: unknown): Gen {
    states.push(state);
    const ev: Event<string> = yield send(`v2 ${JSON.stringify(state)}`);
    if (ev.type === "shutdown" || ev.type === "disconnect") return;
    yield [send(`v2 got ${label(ev)}`), hibernate(state)];
  }, {
    codeChange(state) {
      changes.push(state);
      return { version: 2, count: state };
    },
  });
  // Nothing happens until it wakes: hibernated connections get no upgrade event.
  assert.equal(t.conn.hibernating, true);
  assert.deepEqual(changes, []);
  t.conn.cast("wake");
  assert.equal(await t.lines.next(), 'v2 {"version":2,"count":0}');
  assert.equal(await t.lines.next(), "v2 got cast wake");
  assert.deepEqual(changes, [0]);
  assert.deepEqual(states, [{ version: 2, count: 0 }]);
  assert.deepEqual(t.h.woke, [], "the old handler never woke");
  // codeChange runs once, at the switch; later wakes keep the new handler and state.
  t.conn.cast("again");
  assert.equal(await t.lines.next(), 'v2 {"version":2,"count":0}');
  assert.equal(await t.lines.next(), "v2 got cast again");
  assert.deepEqual(changes, [0]);
});

Deno.test("upgrade: a live connection gets `upgrade`, switches when it hibernates; new connections run the new code", async () => {
  const transport = transportFor("upgrade-live");
  const v1Events: string[] = [];
  let finallies = 0;
  async function* v2(_conn: Connection<string>, state?: unknown): Gen {
    const ev: Event<string> = yield send(`v2 start ${JSON.stringify(state ?? null)}`);
    if (ev.type === "shutdown" || ev.type === "disconnect") return;
    yield [send(`v2 got ${label(ev)}`), hibernate(state)];
  }
  await using s = await lineServer(transport, async function* (): Gen {
    try {
      let count = 0;
      let ev: Event<string> = yield;
      for (;;) {
        v1Events.push(label(ev));
        if (ev.type === "upgrade") {
          assert.equal(ev.handler, v2);
          ev = yield [send("v1 switching"), hibernate({ count })];
        } else if (ev.type === "cast") {
          count++;
          ev = yield send(`v1 cast ${count}`);
        } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
        else ev = yield;
      }
    } finally {
      finallies++;
    }
  });
  const c = collector();
  await using _client = await lineClient(transport, c.handler);
  const conn = await s.conns.next();
  conn.cast("one");
  assert.equal(await c.lines.next(), "v1 cast 1");
  const changes: unknown[] = [];
  s.server.upgrade(v2, {
    codeChange: (state) => {
      changes.push(state);
      return { ...(state as object), version: 2 };
    },
  });
  assert.equal(await c.lines.next(), "v1 switching");
  assert.equal(conn.hibernating, true);
  conn.cast("two");
  assert.equal(await c.lines.next(), 'v2 start {"count":1,"version":2}');
  assert.equal(await c.lines.next(), "v2 got cast two");
  assert.deepEqual(v1Events, ["cast one", "upgrade"]);
  assert.deepEqual(changes, [{ count: 1 }]);
  assert.equal(finallies, 0, "hibernating to switch does not run finally");
  // A new connection starts on v2, with no state.
  const c2 = collector();
  await using _client2 = await lineClient(transport, c2.handler);
  assert.equal(await c2.lines.next(), "v2 start null");
});

// ---- How a connection ends ----------------------------------------------------------------

Deno.test("stop action: pending sends are flushed, then closed resolves with the reason, logged once", async () => {
  const transport = transportFor("stop-action");
  const logger = capturingLogger();
  await using s = await lineServer(transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
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
  assert.ok(logger.calls[0].includes(boom));
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
    const client = await lineClient(transport, async function* (): Gen {
      try {
        // deno-lint-ignore no-explicit-any
        yield garbage as any;
      } finally {
        finallyRan = true;
      }
    }, { logger });
    const reason = await within(1000, client.closed);
    assert.ok(reason instanceof ProtocolError, `expected ProtocolError, got ${reason}`);
    assert.ok(finallyRan);
    assert.equal(logger.calls.length, 1);
  });
}

Deno.test("actions after hibernate or stop in the same yield are still performed, in order", async () => {
  const transport = transportFor("after-terminal");
  await using s = await lineServer(transport, async function* (_conn, state?: unknown): Gen {
    if (state === undefined) {
      yield [send("a"), hibernate("slept"), send("b"), arm(10, "alarm")];
      return;
    }
    const ev: Event<string> = yield;
    yield [send(`c (${state}, woken by ${label(ev)})`), stop("done"), send("d")];
  });
  const peer = await transport.connect({});
  const conn = await s.conns.next();
  assert.equal(
    await within(2000, readToEnd(peer)),
    "a\nb\nc (slept, woken by timeout alarm)\nd\n",
  );
  peer.close();
  assert.equal(await conn.closed, "done");
});

// ---- Writing ------------------------------------------------------------------------------

Deno.test("send: several sends in one yield arrive in order, in one write", async () => {
  const counted = counting(transportFor("batched"));
  await using s = await lineServer(counted.transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
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
  await using _s = await lineServer(transport, async function* (): Gen {
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
  await using _client = await lineClient(transport, async function* (): Gen {
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

// ---- Flow control -------------------------------------------------------------------------

/** A client whose handler fires a named marker timer after `arm` casts; each firing lands in `fired`. */
function markerClient() {
  const fired = new Inbox<void>(NEXT_MS);
  const handler = async function* (): Gen {
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
  await using _s = await lineServer(counted.transport, async function* (): Gen {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "packet") {
        got.push(ev.data);
        if (got.length === 1) await release.promise; // stuck: takes no events for now
        if (got.length === N) allIn.resolve();
      } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      ev = yield;
    }
  }, { highWaterMark: 4 });
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
  // 4000 frames (~400 kB) written at once to a handler that takes them one by one: the driver
  // may read ahead by about one read (at most 64 kB), never by the whole stream.
  const counted = counting(transportFor("flow-hwm"));
  const N = 4000;
  const frame = (i: number) => `${String(i).padStart(5, "0")} ${"h".repeat(94)}`;
  let consumed = 0;
  let ahead = 0;
  const allIn = Promise.withResolvers<void>();
  await using _s = await lineServer(counted.transport, async function* (): Gen {
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
  }, { highWaterMark: 4 });
  await using client = await lineClient(counted.transport, idle);
  for (let i = 0; i < N; i++) client.send(frame(i));
  await within(5000, allIn.promise);
  // One read (the driver's largest is 64 kB today) plus the few frames the mailbox may hold;
  // without the high-water mark it reads the whole ~400 kB ahead.
  assert.ok(ahead <= 128 * 1024, `read ${ahead} bytes ahead of the handler`);
});

Deno.test("flow control: a peer that never reads stops the handler at the write high-water mark", async () => {
  const transport = transportFor("flow-out", 1024);
  const chunk = "o".repeat(60_000);
  const N = 100; // 6 MB in all, far past the driver's write high-water mark
  let handled = 0;
  const allHandled = Promise.withResolvers<void>();
  await using s = await lineServer(transport, async function* (): Gen {
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
  await using client = await lineClient(transport, async function* (): Gen {
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
  await using s = await lineServer(transport, async function* (): Gen {
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

// ---- Plain generators, registry -----------------------------------------------------------

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

Deno.test("register: a name is unique, lookup finds its connection, and it is freed on close", async () => {
  const transport = transportFor("register");
  const registry = new MemoryRegistry();
  await using s = await lineServer(transport, async function* (conn): Gen {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "call" && typeof ev.message === "string") {
        const ok = await conn.register(ev.message);
        ev = yield reply(ev.from, ok);
      } else if (ev.type === "call") ev = yield reply(ev.from, `I am ${conn.name}`);
      else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      else ev = yield;
    }
  }, { registry });
  const peers = [await transport.connect({}), await transport.connect({})];
  const [a, b] = [await s.conns.next(), await s.conns.next()];
  assert.equal(await a.call("alice"), true);
  assert.equal(a.name, "alice");
  assert.equal(await b.call("alice"), false);
  assert.equal(b.name, undefined);
  const found = await registry.lookup("alice");
  assert.equal(found?.id, a.id);
  assert.equal(await found!.call({ who: true }), "I am alice");
  assert.deepEqual((await registry.list()).map((e) => e.name).sort(), ["alice", undefined]);
  peers[0].close(); // a's handler returns on disconnect
  await a.closed;
  assert.equal(await registry.lookup("alice"), undefined);
  assert.equal(await b.call("alice"), true);
  assert.equal((await registry.lookup("alice"))?.id, b.id);
  peers[1].close();
});
