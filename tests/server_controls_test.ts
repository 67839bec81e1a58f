// The server's operator controls (Ranch's) and its start: onListen vetoes or adjusts a server;
// suspend({ refuse: true }) closes the listening sockets so peers are refused, and resume()
// listens again on the same address; removeConnection, waitForConnections, connection-count
// alarms and setOptions. Real TCP on 127.0.0.1, port 0, and the memory transport.

import assert from "node:assert/strict";
import {
  type Addr,
  type Conn,
  connect,
  type Connection,
  type Event,
  type HandlerGenerator,
  lines,
  memory,
  send,
  serve,
  type ServeOptions,
  type Server,
  stop,
  tcp,
  TimeoutError,
  type Transport,
  unix,
} from "../mod.ts";
import {
  acceptingWith,
  assertRefused,
  capturingLogger,
  closeQuietly,
  HOST,
  Inbox,
  portOf,
  tracked,
  within,
  writeAll,
} from "./_support.ts";

const encoder = new TextEncoder();

// ---- Helpers ------------------------------------------------------------------------------

/** A raw TCP peer speaking lines; it reads all the time, so `close()` leaves no op behind. */
class Peer {
  readonly conn: Deno.TcpConn;
  readonly #lines = new Inbox<string | null>();
  readonly ended: Promise<void>;

  static async open(port: number): Promise<Peer> {
    return new Peer(await Deno.connect({ hostname: HOST, port }));
  }

  constructor(conn: Deno.TcpConn) {
    this.conn = conn;
    this.ended = this.#pump();
  }

  async #pump(): Promise<void> {
    const decoder = new TextDecoder();
    const buf = new Uint8Array(4096);
    let text = "";
    try {
      for (let n = await this.conn.read(buf); n !== null; n = await this.conn.read(buf)) {
        text += decoder.decode(buf.subarray(0, n), { stream: true });
        for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n")) {
          this.#lines.push(text.slice(0, nl));
          text = text.slice(nl + 1);
        }
      }
    } catch {
      // Closed by this side, or reset by the peer: either way, the end.
    }
    this.#lines.push(null);
  }

  /** The next line, or null once the connection has ended (bounded). */
  next(what = "a line"): Promise<string | null> {
    return this.#lines.next(5000, what);
  }

  /** Send a line and wait for the answer line. */
  async request(line: string): Promise<string | null> {
    await writeAll(this.conn, encoder.encode(line + "\n"));
    return await this.next(`the answer to ${line}`);
  }

  async close(): Promise<void> {
    closeQuietly(this.conn);
    await this.ended;
  }
}

/**
 * Greets each connection with "hello", then echoes lines; ends on disconnect, and on shutdown
 * after saying "bye" and the reason.
 */
async function* greeter(): HandlerGenerator<string> {
  let ev: Event<string> = yield send("hello");
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "shutdown") return void (yield [send(`bye ${ev.reason}`), stop()]);
    else if (ev.type === "disconnect") return;
    else ev = yield;
  }
}

/** Waits until its connection ends (a client for servers over the memory transport). */
async function* waiting(): HandlerGenerator<Uint8Array> {
  for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown"; ev = yield);
}

function serveLines(options: ServeOptions<string> = {}): Promise<Server<string>> {
  return serve(greeter, { hostname: HOST, port: 0, framing: lines(), ...options });
}

function serveMemory(
  options: ServeOptions<Uint8Array, Addr> = {},
): Promise<{ server: Server<Uint8Array, Addr>; transport: Transport<Addr> }> {
  const transport = options.transport ?? memory(`controls-${crypto.randomUUID()}`);
  return serve(waiting, { transport, ...options }).then((server) => ({ server, transport }));
}

/** Opens peers and closes them all at the end. */
class Peers {
  readonly all: Peer[] = [];
  constructor(readonly port: number) {}
  async open(): Promise<Peer> {
    const peer = await Peer.open(this.port);
    this.all.push(peer);
    return peer;
  }
  async close(): Promise<void> {
    for (const peer of this.all) await peer.close();
  }
}

// ---- onListen -----------------------------------------------------------------------------

Deno.test("onListen that rejects (async): serve() rejects with its error, nothing is left listening", async () => {
  const veto = new Error("not today");
  let port = 0;
  await assert.rejects(
    serveLines({
      async onListen(addr) {
        port = portOf(addr);
        await Promise.resolve();
        throw veto;
      },
    }),
    (err) => err === veto,
  );
  assert.ok(port > 0);
  await assertRefused(port);
});

Deno.test("onListen: serve() waits for an async onListen before accepting", async () => {
  const release = Promise.withResolvers<void>();
  const heard = Promise.withResolvers<number>();
  const serving = tracked(serveLines({
    async onListen(addr) {
      heard.resolve(portOf(addr));
      await release.promise;
    },
  }));
  const port = await within(3000, heard.promise, "onListen");
  // The socket listens (the connect succeeds) but nothing is accepted until onListen is done.
  const peer = await Peer.open(port);
  const greeting = tracked(peer.next("the greeting"));
  assert.equal(serving.settled(), false);
  release.resolve();
  const server = await within(3000, serving.promise, "serve");
  try {
    assert.equal(await greeting.promise, "hello");
  } finally {
    await peer.close();
    await server.stop();
  }
});

Deno.test("onListen returns settings: they apply before the first accept", async () => {
  const alarms = new Inbox<number>();
  const server = await serveLines({
    maxConnections: 10,
    onListen: () => ({
      maxConnections: 1,
      alarms: [{ threshold: 1, cooldown: 0, callback: (count) => alarms.push(count) }],
    }),
  });
  const peers = new Peers(portOf(server.addr));
  try {
    assert.equal(server.maxConnections, 1);
    const a = await peers.open();
    assert.equal(await a.next(), "hello");
    assert.equal(await alarms.next(), 1);
    const b = await peers.open();
    const greetB = tracked(b.next("b's greeting"));
    for (let i = 0; i < 3; i++) assert.equal(await a.request(`a${i}`), `a${i}`);
    assert.equal(greetB.settled(), false, "the limit onListen set holds");
    await a.close();
    assert.equal(await greetB.promise, "hello");
  } finally {
    await peers.close();
    await server.stop();
  }
});

Deno.test("onListen returns wrong settings: serve() rejects with the check's error, nothing is left listening", async () => {
  const cases: [Record<string, unknown>, ErrorConstructor, RegExp][] = [
    [{ maxConnections: -1 }, RangeError, /onListen: option maxConnections .* not -1/],
    [{ port: 7 }, TypeError, /onListen: option port cannot change on a running server/],
    [{ framing: lines() }, TypeError, /option framing cannot change .*serve again/],
    [{ maxConection: 5 }, TypeError, /option maxConection .* not an option of serve\(\)/],
    [{ alarms: [{ threshold: 1 }] }, TypeError, /alarms\[0\]\.callback must be a function/],
    [{ transport: tcp() }, TypeError, /transport can change only while suspend/],
  ];
  for (const [settings, type, message] of cases) {
    let port = 0;
    await assert.rejects(
      serveLines({
        onListen: (addr) => {
          port = portOf(addr);
          return settings as never;
        },
      }),
      (err: Error) => err instanceof type && message.test(err.message),
      JSON.stringify(Object.keys(settings)),
    );
    await assertRefused(port);
  }
});

Deno.test("onListen returning something other than a plain object (a hook written before settings) changes nothing", async () => {
  const seen: Addr[] = [];
  const server = await serveLines({ onListen: (addr) => seen.push(addr) }); // returns a number
  const other = await serveLines({ onListen: () => new Map([["maxConnections", 1]]) as never });
  try {
    assert.equal(seen.length, 1);
    assert.equal(server.maxConnections, 1024);
    assert.equal(other.maxConnections, 1024);
  } finally {
    await server.stop();
    await other.stop();
  }
});

// ---- suspend({ refuse: true }) ------------------------------------------------------------

Deno.test("suspend({ refuse: true }): new peers are refused, live ones go on; resume() listens again on the same port", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  const peers = new Peers(port);
  try {
    const live = await peers.open();
    assert.equal(await live.next(), "hello");

    await server.suspend({ refuse: true });
    assert.equal(server.status, "suspended");
    assert.equal(server.acceptors()[0].state, "suspended");
    await assertRefused(port);
    assert.equal(await live.request("still here"), "still here");
    assert.equal(server.connections().length, 1);
    assert.equal(portOf(server.addr), port, "addr is where resume() will listen");
    await server.suspend({ refuse: true }); // again: nothing changes
    await server.suspend(); // a queueing suspend of a refusing server: nothing changes
    await assertRefused(port);

    await server.resume();
    assert.equal(server.status, "running");
    assert.equal(portOf(server.addr), port);
    const late = await peers.open();
    assert.equal(await late.next(), "hello");
    assert.equal(await late.request("late"), "late");
    assert.equal(await live.request("live"), "live");
    assert.equal(server.connections().length, 2);
    assert.equal(server.acceptors()[0].accepted, 2);
  } finally {
    await peers.close();
    await server.stop();
  }
  await assertRefused(port);
});

Deno.test("suspend({ refuse: true }) after a queueing suspend: the peers waiting are dropped with the backlog", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  const peers = new Peers(port);
  try {
    await server.suspend();
    const waitingPeer = await peers.open(); // connects: the backlog holds it
    await server.suspend({ refuse: true });
    assert.equal(await waitingPeer.next("the end"), null, "closed, never greeted");
    await assertRefused(port);
    await server.resume();
    const peer = await peers.open();
    assert.equal(await peer.next(), "hello");
    assert.equal(server.connections().length, 1);
  } finally {
    await peers.close();
    await server.stop();
  }
});

Deno.test("suspend and resume asked without waiting take effect in order", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  const peers = new Peers(port);
  try {
    const refusing = server.suspend({ refuse: true });
    const resuming = server.resume();
    const refusingAgain = server.suspend({ refuse: true });
    await within(3000, Promise.all([refusing, resuming, refusingAgain]), "the three");
    assert.equal(server.status, "suspended");
    await assertRefused(port);
    const first = server.resume(); // listens again
    await within(3000, server.resume(), "a second resume, after the first");
    await first;
    assert.equal(server.status, "running");
    const peer = await peers.open();
    assert.equal(await peer.next(), "hello");
  } finally {
    await peers.close();
    await server.stop();
  }
});

Deno.test("resume() after refusing: a port taken meanwhile rejects with AddrInUse, the server stays suspended and can resume later", async () => {
  const server = await serveLines();
  const port = portOf(server.addr);
  const peers = new Peers(port);
  try {
    await server.suspend({ refuse: true });
    const squatter = Deno.listen({ hostname: HOST, port });
    try {
      await assert.rejects(server.resume(), Deno.errors.AddrInUse);
      assert.equal(server.status, "suspended");
      assert.equal(server.acceptors()[0].state, "suspended");
    } finally {
      squatter.close();
    }
    await server.resume();
    assert.equal(server.status, "running");
    const peer = await peers.open();
    assert.equal(await peer.next(), "hello");
  } finally {
    await peers.close();
    await server.stop();
  }
});

Deno.test("stop() while refusing, and while a resume listens again: nothing is left listening", async () => {
  const a = await serveLines();
  const portA = portOf(a.addr);
  await a.suspend({ refuse: true });
  await within(3000, a.stop(), "stop while refusing");
  assert.equal(a.status, "stopped");
  await assertRefused(portA);
  await a.resume(); // after stop: nothing
  await assertRefused(portA);

  const b = await serveLines();
  const portB = portOf(b.addr);
  await b.suspend({ refuse: true });
  const resuming = b.resume();
  await within(3000, b.stop(), "stop during resume");
  await resuming;
  assert.equal(b.status, "stopped");
  await assertRefused(portB);
});

Deno.test({
  name:
    "suspend({ refuse: true }) with acceptors: 2: both sockets close, and both listen again on the port",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const server = await serveLines({ acceptors: 2 });
    const port = portOf(server.addr);
    const peers = new Peers(port);
    try {
      await server.suspend({ refuse: true });
      for (let i = 0; i < 4; i++) await assertRefused(port);
      await server.resume();
      assert.deepEqual(server.acceptors().map((info) => portOf(info.addr)), [port, port]);
      for (let i = 0; i < 4; i++) assert.equal(await (await peers.open()).next(), "hello");
    } finally {
      await peers.close();
      await server.stop();
    }
  },
});

Deno.test("suspend({ refuse: true }) over memory() and unix(): connects are refused until resume()", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const transport of [memory(`refuse-${crypto.randomUUID()}`), unix(`${dir}/s.sock`)]) {
      const server = await serve(waiting, { transport: transport as Transport<Addr> });
      try {
        await server.suspend({ refuse: true });
        await assert.rejects(
          connect(waiting, { transport: transport as Transport<Addr> }),
          transport.name === "unix" ? Deno.errors.NotFound : Deno.errors.ConnectionRefused,
        );
        await server.resume();
        const client = await connect(waiting, { transport: transport as Transport<Addr> });
        await server.waitForConnections("==", 1, { timeout: 3000 });
        await client.stop();
      } finally {
        await server.stop();
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("suspend(): a refuse option that is not a boolean is a TypeError", async () => {
  const { server } = await serveMemory();
  try {
    assert.throws(
      () => server.suspend({ refuse: "yes" as never }),
      TypeError,
      "suspend: option refuse must be true or false",
    );
    assert.equal(server.status, "running");
  } finally {
    await server.stop();
  }
});

// ---- removeConnection ---------------------------------------------------------------------

Deno.test("removeConnection: a tunnel no longer counts against maxConnections, but is still listed and stopped", async () => {
  const server = await serveLines({ maxConnections: 1 });
  const peers = new Peers(portOf(server.addr));
  try {
    const tunnel = await peers.open();
    assert.equal(await tunnel.next(), "hello");
    const [conn] = server.connections();
    const next = await peers.open();
    const greetNext = tracked(next.next("the greeting"));
    assert.equal(await tunnel.request("t"), "t");
    assert.equal(greetNext.settled(), false, "at the limit");

    assert.equal(server.removeConnection(conn), true);
    assert.equal(await greetNext.promise, "hello", "room for one more");
    assert.equal(server.removeConnection(conn), false, "removed already");
    assert.equal(server.connections().length, 2);
    assert.equal(server.acceptors()[0].state, "waiting", "the one counted fills the limit");
    await server.waitForConnections("==", 2, { timeout: 1000 });

    await tunnel.close();
    await within(3000, conn.closed);
    assert.equal(server.removeConnection(conn), false, "closed");
    assert.equal(server.removeConnection({ id: "c0" } as Connection<string>), false, "not ours");
    await server.stop();
    assert.equal(await next.next("the goodbye"), "bye shutdown");
  } finally {
    await peers.close();
    await server.stop();
  }
});

// ---- waitForConnections -------------------------------------------------------------------

Deno.test("waitForConnections: resolves on the accept or close that satisfies it, at once if it already holds", async () => {
  const { server, transport } = await serveMemory();
  try {
    await server.waitForConnections("==", 0);
    await server.waitForConnections("<", 1);
    const twoUp = tracked(server.waitForConnections(">=", 2, { timeout: 5000 }));
    const moreThanOne = tracked(server.waitForConnections(">", 1, { timeout: 5000 }));
    const a = await connect(waiting, { transport });
    await server.waitForConnections("==", 1, { timeout: 5000 });
    assert.equal(twoUp.settled(), false);
    const b = await connect(waiting, { transport });
    await within(3000, Promise.all([twoUp.promise, moreThanOne.promise]), ">= 2");
    const atMostOne = tracked(server.waitForConnections("<=", 1, { timeout: 5000 }));
    await server.waitForConnections("<=", 2);
    assert.equal(atMostOne.settled(), false);
    await a.stop();
    await within(3000, atMostOne.promise, "<= 1");
    await b.stop();
    await server.waitForConnections("==", 0, { timeout: 5000 });
  } finally {
    await server.stop();
  }
});

Deno.test("waitForConnections: a timeout rejects with TimeoutError; the server's stop rejects what can no longer hold", async () => {
  const { server } = await serveMemory();
  await assert.rejects(
    server.waitForConnections(">=", 3, { timeout: 20 }),
    TimeoutError,
    'waitForConnections(">=", 3) timed out after 20 ms with 0 connections',
  );
  const never = server.waitForConnections(">", 0);
  const drained = server.waitForConnections("==", 0);
  await server.stop();
  await assert.rejects(never, Deno.errors.Interrupted);
  await drained;
  await assert.rejects(server.waitForConnections("==", 1), Deno.errors.Interrupted);
  await server.waitForConnections("<", 5); // holds after stop too
});

Deno.test("waitForConnections: a bad op or count is refused before waiting", async () => {
  const { server } = await serveMemory();
  try {
    // (A method that returns a promise rejects on bad arguments: it never throws.)
    await assert.rejects(server.waitForConnections("=<" as never, 1), TypeError, "op must be");
    await assert.rejects(server.waitForConnections("==", -1), RangeError);
    await assert.rejects(server.waitForConnections("==", 1.5), RangeError);
    await assert.rejects(server.waitForConnections("<", 0), RangeError, 'with "<"');
    await assert.rejects(server.waitForConnections("==", "1" as never), TypeError);
    await assert.rejects(server.waitForConnections("==", 1, { timeout: -1 }), RangeError);
    await assert.rejects(server.waitForConnections("==", 1, { timeout: NaN }), RangeError);
  } finally {
    await server.stop();
  }
});

// ---- alarms -------------------------------------------------------------------------------

Deno.test("alarms: called at each accept at or above the threshold (cooldown 0), with the count and the counted connections", async () => {
  const calls = new Inbox<[number, string[]]>();
  const { server, transport } = await serveMemory({
    alarms: [{
      threshold: 2,
      cooldown: 0,
      callback: (count, conns) => calls.push([count, conns.map((c) => c.id)]),
    }],
  });
  const clients: Connection<Uint8Array>[] = [];
  try {
    clients.push(await connect(waiting, { transport }));
    await server.waitForConnections("==", 1, { timeout: 5000 });
    assert.equal(calls.size, 0, "below the threshold");
    // A removed connection does not count.
    assert.equal(server.removeConnection(server.connections()[0]), true);
    clients.push(await connect(waiting, { transport }));
    await server.waitForConnections("==", 2, { timeout: 5000 });
    assert.equal(calls.size, 0, "one counted");
    clients.push(await connect(waiting, { transport }));
    const [count, ids] = await calls.next();
    assert.equal(count, 2);
    assert.deepEqual(ids, server.connections().slice(1).map((c) => c.id));
    clients.push(await connect(waiting, { transport }));
    assert.equal((await calls.next())[0], 3);
  } finally {
    for (const client of clients) await client.stop();
    await server.stop();
  }
});

Deno.test("alarms: quiet during the cooldown, then checked again at once; a throwing callback is logged", async () => {
  const once = new Inbox<number>();
  const again = new Inbox<number>();
  const logger = capturingLogger();
  const { server, transport } = await serveMemory({
    logger,
    alarms: [
      { threshold: 1, cooldown: Infinity, callback: (count) => once.push(count) },
      { threshold: 3, cooldown: 30, callback: (count) => again.push(count) },
      {
        threshold: 1,
        cooldown: 0,
        callback: () => {
          throw new Error("alarm bug");
        },
      },
    ],
  });
  const clients: Connection<Uint8Array>[] = [];
  try {
    for (let i = 0; i < 3; i++) clients.push(await connect(waiting, { transport }));
    await server.waitForConnections("==", 3, { timeout: 5000 });
    assert.equal(await once.next(), 1);
    assert.equal(await again.next(), 3);
    // No new connection: the cooldown's end checks again, and the count is still up.
    assert.equal(await again.next(), 3);
    assert.equal(once.size, 0, "cooldown Infinity: once");
    assert.equal(logger.calls.length, 3, "each throw logged once");
    assert.ok(logger.calls.every((call) => String(call[0]).includes("alarm threw")));
  } finally {
    for (const client of clients) await client.stop();
    await server.stop(); // clears the cooldown timer (the sanitizers check)
  }
});

Deno.test("alarms: wrong alarms are refused up front", async () => {
  const ok = () => {};
  const cases: [unknown, ErrorConstructor, RegExp][] = [
    [5, TypeError, /option alarms must be an array/],
    [[null], TypeError, /option alarms\[0\] must be/],
    [[{ threshold: -1, callback: ok }], RangeError, /alarms\[0\]\.threshold must be an integer/],
    [[{ threshold: "2", callback: ok }], TypeError, /alarms\[0\]\.threshold/],
    [[{ threshold: 2, cooldown: -5, callback: ok }], RangeError, /alarms\[0\]\.cooldown/],
    [[{ threshold: 2, callback: ok }, { threshold: 3 }], TypeError, /alarms\[1\]\.callback/],
  ];
  for (const [alarms, type, message] of cases) {
    await assert.rejects(
      serve(waiting, { transport: memory(`alarms-${crypto.randomUUID()}`), alarms: alarms as [] }),
      (err: Error) => err instanceof type && message.test(err.message),
    );
  }
});

// ---- setOptions ---------------------------------------------------------------------------

Deno.test("setOptions: maxConnections at once; idleTimeout for the connections accepted after it", async () => {
  const server = await serveLines({ maxConnections: 1 });
  const peers = new Peers(portOf(server.addr));
  try {
    const old = await peers.open();
    assert.equal(await old.next(), "hello");
    const [oldConn] = server.connections();
    const waitingPeer = await peers.open();
    const greeting = tracked(waitingPeer.next("the greeting"));
    server.setOptions({ maxConnections: 2, idleTimeout: 50 });
    assert.equal(server.maxConnections, 2);
    assert.equal(await greeting.promise, "hello");
    const newConn = server.connections().find((c) => c !== oldConn)!;
    // The new connection idles out; the old one, idle longer, keeps no idle timeout.
    assert.equal(await waitingPeer.next("the goodbye"), "bye idle");
    await within(3000, newConn.closed);
    assert.equal(server.connections()[0], oldConn);
    assert.equal(await old.request("still"), "still");
  } finally {
    await peers.close();
    await server.stop();
  }
});

Deno.test("setOptions: handshakeTimeout for the connections accepted after it", async () => {
  const logger = capturingLogger();
  const failed = Promise.withResolvers<void>();
  logger.debug = (...data: unknown[]) => {
    logger.calls.push(data);
    if (String(data[0]).includes("handshake failed")) failed.resolve();
  };
  // Every accepted socket has a handshake that never completes.
  const base = memory(`handshake-${crypto.randomUUID()}`);
  const stalling = acceptingWith(base, (conn): Conn => ({
    localAddr: conn.localAddr,
    remoteAddr: conn.remoteAddr,
    read: (p) => conn.read(p),
    write: (p) => conn.write(p),
    closeWrite: () => conn.closeWrite(),
    close: () => conn.close(),
    handshake: () => new Promise(() => {}),
  }));
  const server = await serve(waiting, { transport: stalling, logger });
  try {
    server.setOptions({ handshakeTimeout: 20 });
    const client = await connect(waiting, { transport: base });
    await within(3000, failed.promise, "the handshake given up");
    assert.match(String(logger.calls[0][0]), /handshake timed out after 20 ms/);
    assert.equal(await within(3000, client.closed), "normal", "its socket was closed");
    assert.equal(server.connections().length, 0);
  } finally {
    await server.stop();
  }
});

Deno.test("setOptions: shutdownTimeout becomes stop()'s default", async () => {
  const transport = memory(`stubborn-${crypto.randomUUID()}`);
  // A handler that never finishes after shutdown: only the timeout ends it.
  const server = await serve(async function* () {
    for (;;) yield;
  }, { transport, shutdownTimeout: 60_000 });
  const client = await connect(waiting, { transport });
  await server.waitForConnections("==", 1, { timeout: 5000 });
  const [conn] = server.connections();
  server.setOptions({ shutdownTimeout: 20 });
  await within(3000, server.stop(), "forced after the new shutdownTimeout");
  assert.equal(await conn.closed, "shutdown");
  await within(3000, client.closed);
});

Deno.test("setOptions: every value is checked before any applies; what cannot change says why", async () => {
  const { server } = await serveMemory({ maxConnections: 7 });
  try {
    assert.throws(
      () => server.setOptions({ maxConnections: 3, idleTimeout: -1 }),
      RangeError,
      "setOptions: option idleTimeout must be a number of ms >= 0, not -1",
    );
    assert.equal(server.maxConnections, 7, "nothing applied");
    assert.throws(
      () => server.setOptions({ port: 1 } as never),
      TypeError,
      "setOptions: option port cannot change on a running server: the listening sockets are bound",
    );
    assert.throws(
      () => server.setOptions({ mode: "passive" } as never),
      TypeError,
      "option mode cannot change on a running server: the handler's code is written for it",
    );
    assert.throws(() => server.setOptions({ onBufferFull: "drop" } as never), TypeError);
    assert.throws(() => server.setOptions(null as never), TypeError, "settings must be an object");
    assert.throws(
      () => server.setOptions({ transport: memory("elsewhere") }),
      TypeError,
      "transport can change only while suspend({ refuse: true })",
    );
    server.setOptions({ maxConnections: undefined, port: undefined } as never); // nothing given
    assert.equal(server.maxConnections, 7);
    assert.equal(server.status, "running");
  } finally {
    await server.stop();
  }
});

Deno.test("setOptions: a transport given while refusing is the one resume() listens with", async () => {
  const accepted = new Inbox<string>();
  const server = await serveLines();
  const port = portOf(server.addr);
  const peers = new Peers(port);
  try {
    await server.suspend({ refuse: true });
    server.setOptions({
      transport: acceptingWith(tcp(), (conn) => {
        accepted.push("through the new transport");
        return conn;
      }),
    });
    await server.resume();
    assert.equal(portOf(server.addr), port);
    const peer = await peers.open();
    assert.equal(await peer.next(), "hello");
    assert.equal(await accepted.next(), "through the new transport");
  } finally {
    await peers.close();
    await server.stop();
  }
});
