// connect() and the client Connection over real TCP on 127.0.0.1, port 0 (a custom transport
// for the connect timeout): addresses, timeouts, refusal, names, call/cast/info/send/sendSync,
// stop, closed, and `await using`.

import assert from "node:assert/strict";
import {
  type Conn,
  connect,
  Connection,
  ConnectionClosed,
  type ConnectOptions,
  type Event,
  type Handler,
  lines,
  memory,
  MemoryRegistry,
  NameTaken,
  reply,
  send,
  serve,
  type Server,
  stop,
  TimeoutError,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { capturingLogger, HOST, Inbox, portOf, tracked, within } from "./_support.ts";

/** How long a test waits for an inbox's next value (ms). */
const NEXT_MS = 3000;

// ---- Helpers ------------------------------------------------------------------------------

/**
 * The server side: greets with "hello", echoes lines, closes its side on "quit", and ends on
 * disconnect or shutdown. Records each connection and its close reason.
 */
async function startServer(): Promise<
  Server<string> & { conns: Inbox<Connection<string>>; ended: Inbox<string> }
> {
  const conns = new Inbox<Connection<string>>(NEXT_MS);
  const ended = new Inbox<string>(NEXT_MS); // ids of server connections, as they end
  const server = await serve(
    async function* (conn: Connection<string>): AsyncGenerator<Yielded, void, Event<string>> {
      conns.push(conn);
      try {
        let ev = yield send("hello");
        for (;;) {
          if (ev.type === "packet") {
            if (ev.data === "quit") return;
            ev = yield send(ev.data);
          } else if (ev.type === "disconnect" || ev.type === "shutdown") {
            return;
          } else {
            ev = yield;
          }
        }
      } finally {
        ended.push(conn.id);
      }
    },
    { hostname: HOST, port: 0, framing: lines() },
  );
  return Object.assign(server, { conns, ended });
}

interface Recorder {
  /** Every event the client handler received, in order. */
  events: Inbox<Event<string>>;
  /** How many times the handler's finally ran. */
  finallies: number;
  handler: Handler<string>;
}

/**
 * A client handler that records its events; replies `{ echo: message }` to calls (unless
 * told not to); on a cast `{ say }` sends `say` to the server; ends on disconnect and (unless
 * told to ignore it) on shutdown.
 */
function recorder({ replyToCalls = true, ignoreShutdown = false } = {}): Recorder {
  const rec: Recorder = {
    events: new Inbox(NEXT_MS),
    finallies: 0,
    handler: async function* (): AsyncGenerator<Yielded, void, Event<string>> {
      try {
        let ev = yield;
        for (;;) {
          rec.events.push(ev);
          if (ev.type === "call" && replyToCalls) {
            ev = yield reply(ev.from, { echo: ev.message });
          } else if (ev.type === "cast" && (ev.message as { say?: string }).say !== undefined) {
            ev = yield send((ev.message as { say: string }).say);
          } else if (ev.type === "disconnect" || (ev.type === "shutdown" && !ignoreShutdown)) {
            return;
          } else {
            ev = yield;
          }
        }
      } finally {
        rec.finallies++;
      }
    },
  };
  return rec;
}

function connectTo(
  server: Server<string>,
  rec: Recorder,
  options: Omit<ConnectOptions<string>, "framing"> = {},
): Promise<Connection<string>> {
  return connect(rec.handler, {
    hostname: HOST,
    port: portOf(server.addr),
    framing: lines(),
    ...options,
  });
}

async function expectPacket(rec: Recorder, data: string): Promise<void> {
  assert.deepEqual(await rec.events.next(), { type: "packet", data });
}

// ---- connect ------------------------------------------------------------------------------

Deno.test("connect() resolves with a Connection: id, remoteAddr, localAddr", async () => {
  const server = await startServer();
  const registry = new MemoryRegistry();
  const rec = recorder();
  const client = await connectTo(server, rec, { registry });
  try {
    assert.ok(client instanceof Connection);
    assert.equal(typeof client.id, "string");
    assert.ok(client.id.length > 0);
    assert.equal(client.name, undefined);
    assert.equal(client.remoteAddr.transport, "tcp");
    assert.equal((client.remoteAddr as Deno.NetAddr).hostname, HOST);
    assert.equal(portOf(client.remoteAddr), portOf(server.addr));
    assert.equal(client.localAddr.transport, "tcp");
    assert.equal((client.localAddr as Deno.NetAddr).hostname, HOST);

    await expectPacket(rec, "hello"); // the handler runs and hears the server
    const serverSide = await server.conns.next();
    assert.notEqual(serverSide.id, client.id);
    assert.equal(portOf(serverSide.remoteAddr), portOf(client.localAddr));
    assert.equal(portOf(serverSide.localAddr), portOf(client.remoteAddr));

    const [entry] = await registry.list();
    assert.equal(entry.id, client.id);
    assert.equal(entry.kind, "client");
    assert.deepEqual(entry.remoteAddr, client.remoteAddr);
    assert.deepEqual(entry.localAddr, client.localAddr);
    assert.equal(await registry.lookup(client.id), client);
  } finally {
    await client.stop();
    await server.stop();
  }
  assert.deepEqual(await registry.list(), [], "the ended connection left the registry");
});

Deno.test("connect(): connectTimeout gives a TimeoutError; a late socket is closed", async () => {
  const late = Promise.withResolvers<Conn>();
  let connects = 0;
  const stuck: Transport = {
    name: "stuck",
    listen() {
      throw new Error("not for listening");
    },
    connect(options) {
      connects++;
      assert.deepEqual(options, { hostname: "stuck.invalid", port: 1 });
      return late.promise; // resolved only after the timeout, below
    },
  };
  const rec = recorder();
  const started = performance.now();
  await assert.rejects(
    within(
      3000,
      connect(rec.handler, {
        transport: stuck,
        hostname: "stuck.invalid",
        port: 1,
        framing: lines(),
        connectTimeout: 50,
      }),
    ),
    (err: unknown) => {
      assert.ok(err instanceof TimeoutError, `a TimeoutError, not ${err}`);
      assert.match(err.message, /timed out after 50 ms/);
      return true;
    },
  );
  assert.ok(performance.now() - started >= 45, "waited for the timeout");
  assert.equal(connects, 1);

  // The connect finishing after the timeout: that socket is closed, not leaked or driven.
  let closed = 0;
  const fake: Conn = {
    localAddr: { transport: "memory", name: "late-local" },
    remoteAddr: { transport: "memory", name: "late-remote" },
    read: () => Promise.resolve(null),
    write: (p) => Promise.resolve(p.length),
    closeWrite: () => Promise.resolve(),
    close: () => void closed++,
  };
  late.resolve(fake);
  await late.promise;
  await Promise.resolve();
  assert.equal(closed, 1);
  assert.equal(rec.events.pushed, 0, "the handler never ran");
});

Deno.test("connect() to a closed port rejects with ConnectionRefused", async () => {
  const listener = Deno.listen({ hostname: HOST, port: 0 });
  const port = listener.addr.port;
  listener.close();
  await assert.rejects(
    within(3000, connect(recorder().handler, { hostname: HOST, port, framing: lines() })),
    Deno.errors.ConnectionRefused,
  );
});

Deno.test("connect(): `name` registers the connection; a second client with it fails", async () => {
  const server = await startServer();
  const registry = new MemoryRegistry();
  const first = recorder();
  const alice = await connectTo(server, first, { name: "alice", registry });
  try {
    assert.equal(alice.name, "alice");
    assert.equal(await registry.lookup("alice"), alice);
    assert.deepEqual((await registry.list()).map((e) => e.name), ["alice"]);
    await expectPacket(first, "hello");
    await server.conns.next();

    const second = recorder();
    await assert.rejects(
      within(3000, connectTo(server, second, { name: "alice", registry })),
      (err) => err instanceof NameTaken && /"alice" is already registered/.test(err.message),
    );
    // Its socket was closed: the server saw that connection end.
    const secondServerSide = await server.conns.next();
    assert.equal(await server.ended.next(), secondServerSide.id);
    // The name was claimed before the handler could run: it never started, sent nothing.
    assert.equal(second.finallies, 0, "the refused client's handler never ran");
    assert.deepEqual((await registry.list()).map((e) => e.id), [alice.id]);
    assert.equal(await registry.lookup("alice"), alice, "the name stays with the first");

    // Once the first is gone, the name is free again.
    await alice.stop();
    assert.equal(await registry.lookup("alice"), undefined);
    const third = recorder();
    const again = await connectTo(server, third, { name: "alice", registry });
    assert.equal(await registry.lookup("alice"), again);
    await expectPacket(third, "hello");
    await again.stop();
  } finally {
    await alice.stop();
    await server.stop();
  }
});

// ---- Start failures reach the caller --------------------------------------------------------

Deno.test("connect() rejects with the handler's error if it throws before its first yield; nothing is left", async () => {
  const server = await startServer();
  const registry = new MemoryRegistry();
  const logger = capturingLogger();
  let finallyRan = 0;
  const boom = new Error("no credentials");
  try {
    for (
      const handler of [
        async function* (): AsyncGenerator<Yielded, void, Event<string>> {
          try {
            if (finallyRan >= 0) throw boom;
            yield;
          } finally {
            finallyRan++;
          }
        },
        // A plain generator throws inside start(): the same.
        function* (): Generator<Yielded, void, Event<string>> {
          try {
            if (finallyRan >= 0) throw boom;
            yield;
          } finally {
            finallyRan++;
          }
        },
      ]
    ) {
      await assert.rejects(
        connect(handler, {
          hostname: HOST,
          port: portOf(server.addr),
          framing: lines(),
          name: "starter",
          registry,
          logger,
        }),
        (err) => err === boom,
      );
      // Closed before connect() rejected: its socket, its registry entry and its name are gone.
      const serverSide = await server.conns.next();
      assert.equal(await within(3000, serverSide.closed), "normal");
      assert.deepEqual(await registry.list(), []);
      assert.equal(await registry.lookup("starter"), undefined);
    }
    assert.equal(finallyRan, 2);
  } finally {
    await server.stop();
  }
});

Deno.test("connect() rejects with ConnectionClosed if the handler returns or stops before its first wait", async () => {
  const server = await startServer();
  try {
    const cases: [string, () => AsyncGenerator<Yielded, void, Event<string>>, unknown][] = [
      ["return", async function* () {}, "normal"],
      ["stop", async function* () {
        yield stop("not today");
      }, "not today"],
      ["send then stop in one yield", async function* () {
        yield [send("bye"), stop()];
      }, "normal"],
    ];
    for (const [what, handler, reason] of cases) {
      const err = await connect(handler, {
        hostname: HOST,
        port: portOf(server.addr),
        framing: lines(),
        logger: capturingLogger(),
      }).then(() => undefined, (e: unknown) => e);
      assert.ok(err instanceof ConnectionClosed, `${what}: ${err}`);
      assert.deepEqual(err.reason, reason, what);
      await server.conns.next();
    }
    // A handler that stops at its second yield started fine: connect() resolves.
    const late = await connect(async function* () {
      yield;
      yield stop();
    }, { hostname: HOST, port: portOf(server.addr), framing: lines() });
    assert.equal(await within(3000, late.closed), "normal"); // woken by the server's "hello"
  } finally {
    await server.stop();
  }
});

Deno.test("connect(): a handler stuck before its first yield times out after connectTimeout and is stopped", async () => {
  const server = await startServer();
  const never = Promise.withResolvers<void>();
  try {
    const started = performance.now();
    await assert.rejects(
      connect(async function* () {
        await never.promise;
        yield;
      }, {
        hostname: HOST,
        port: portOf(server.addr),
        framing: lines(),
        connectTimeout: 50,
        logger: capturingLogger(),
      }),
      (err) =>
        err instanceof TimeoutError && /handler start timed out after 50 ms/.test(err.message),
    );
    assert.ok(performance.now() - started < 2000);
    const serverSide = await server.conns.next();
    assert.equal(await within(3000, serverSide.closed), "normal", "its socket was closed");
  } finally {
    never.resolve();
    await server.stop();
  }
});

// ---- Messages to a client connection -------------------------------------------------------

Deno.test("client connection: call, cast and info reach its handler, in order", async () => {
  const server = await startServer();
  const rec = recorder();
  const client = await connectTo(server, rec);
  try {
    await expectPacket(rec, "hello");
    assert.deepEqual(await within(3000, client.call("ping")), { echo: "ping" });
    assert.equal((await rec.events.next()).type, "call");

    client.cast("c1");
    client.info({ i: 1 });
    client.cast("c2");
    assert.deepEqual(await rec.events.next(), { type: "cast", message: "c1" });
    assert.deepEqual(await rec.events.next(), { type: "info", message: { i: 1 } });
    assert.deepEqual(await rec.events.next(), { type: "cast", message: "c2" });

    // A cast whose handling sends over the socket: the server's echo comes back as a packet.
    client.cast({ say: "through the handler" });
    assert.equal((await rec.events.next()).type, "cast");
    await expectPacket(rec, "through the handler");

    // Several calls at once each get their own reply.
    const answers = await within(
      3000,
      Promise.all([1, 2, 3].map((n) => client.call<{ echo: number }>(n))),
    );
    assert.deepEqual(answers.map((a) => a.echo), [1, 2, 3]);
  } finally {
    await client.stop();
    await server.stop();
  }
});

Deno.test("client connection: a call nobody answers times out with a TimeoutError", async () => {
  const server = await startServer();
  const rec = recorder({ replyToCalls: false });
  const client = await connectTo(server, rec);
  try {
    await expectPacket(rec, "hello");
    const started = performance.now();
    await assert.rejects(within(3000, client.call("anyone?", { timeout: 50 })), TimeoutError);
    assert.ok(performance.now() - started >= 45);
    assert.deepEqual((await rec.events.next()).type, "call", "the handler did get it");
  } finally {
    await client.stop();
    await server.stop();
  }
});

Deno.test("client connection: send and sendSync write to the server, in order", async () => {
  const server = await startServer();
  const rec = recorder();
  const client = await connectTo(server, rec);
  try {
    await expectPacket(rec, "hello");
    client.send("one");
    client.send("two");
    const written = client.sendSync("three");
    assert.ok(written instanceof Promise);
    await within(3000, written);
    await expectPacket(rec, "one");
    await expectPacket(rec, "two");
    await expectPacket(rec, "three");
    // Framing errors surface to the caller.
    await assert.rejects(client.sendSync(42 as unknown as string), TypeError);
    assert.throws(() => client.send({} as unknown as string), TypeError);
  } finally {
    await client.stop();
    await server.stop();
  }
  // Once closed, sendSync rejects and send is a no-op.
  await assert.rejects(client.sendSync("late"), ConnectionClosed);
  client.send("late");
  await assert.rejects(client.call("late"), ConnectionClosed);
});

// ---- Ending -------------------------------------------------------------------------------

Deno.test("client connection: stop(reason) sends shutdown, runs finally, closes both sides", async () => {
  const server = await startServer();
  const rec = recorder();
  const client = await connectTo(server, rec);
  await expectPacket(rec, "hello");
  const serverSide = await server.conns.next();
  const closed = tracked(client.closed);
  await within(3000, client.stop("bye"));
  assert.deepEqual(await rec.events.next(), { type: "shutdown", reason: "bye" });
  assert.equal(rec.finallies, 1);
  assert.ok(closed.settled());
  assert.equal(await client.closed, "normal", "the handler returned: a normal end");
  assert.equal(await server.ended.next(), serverSide.id, "the server saw the disconnect");
  assert.equal(await serverSide.closed, "normal");
  await server.stop();
});

Deno.test("client connection: stop() forces a handler that ignores shutdown after the timeout", async () => {
  const server = await startServer();
  const logger = capturingLogger();
  const rec = recorder({ ignoreShutdown: true });
  const client = await connectTo(server, rec, { logger });
  await expectPacket(rec, "hello");
  const started = performance.now();
  await within(3000, client.stop("now", { timeout: 100 }));
  assert.ok(performance.now() - started >= 90, "waited for the timeout");
  assert.deepEqual(await rec.events.next(), { type: "shutdown", reason: "now" });
  assert.equal(rec.finallies, 1, "its finally ran");
  assert.equal(await client.closed, "now");
  assert.equal(logger.calls.length, 1, "a forced end is reported once");
  await server.ended.next();
  await server.stop();
});

Deno.test("client connection: closed resolves when the server side closes", async () => {
  const server = await startServer();
  const rec = recorder({ replyToCalls: false });
  const client = await connectTo(server, rec);
  await expectPacket(rec, "hello");
  const pending = client.call("never answered", { timeout: 10_000 });
  assert.equal((await rec.events.next()).type, "call");
  client.send("quit"); // the server's handler returns: it closes its side
  assert.equal(await within(3000, client.closed), "normal");
  const last = await rec.events.next();
  assert.equal(last.type, "disconnect");
  assert.equal(rec.finallies, 1);
  // The call it never answered fails at once instead of waiting for its timeout.
  await assert.rejects(within(1000, pending), ConnectionClosed);
  await server.stop();
});

Deno.test("client connection: closed resolves when the server stops", async () => {
  const server = await startServer();
  const recs = [recorder(), recorder(), recorder()];
  const clients = [];
  for (const rec of recs) clients.push(await connectTo(server, rec));
  for (const rec of recs) await expectPacket(rec, "hello");
  await within(3000, server.stop());
  const reasons = await within(3000, Promise.all(clients.map((c) => c.closed)));
  assert.deepEqual(reasons, ["normal", "normal", "normal"]);
  for (const rec of recs) assert.equal((await rec.events.next()).type, "disconnect");
});

Deno.test("client connection: `await using` stops it at the end of the scope", async () => {
  const server = await startServer();
  const rec = recorder();
  let kept: Connection<string>;
  {
    await using client = await connectTo(server, rec);
    kept = client;
    await expectPacket(rec, "hello");
    assert.deepEqual(await within(3000, client.call("inside")), { echo: "inside" });
  }
  const closed = tracked(kept.closed);
  await Promise.resolve();
  assert.ok(closed.settled(), "closed already when the scope ended");
  assert.equal(await kept.closed, "normal");
  assert.equal(rec.finallies, 1);
  const serverSide = await server.conns.next();
  assert.equal(await within(3000, serverSide.closed), "normal", "the server saw it go");
  assert.equal(server.connections().length, 0);
  await server.stop();
});

Deno.test("connect({ signal }): aborted before, during the handler's start, or after: nothing is left open", async () => {
  const transport = memory("connect-signal");
  const server = await serve(async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect"; ev = yield);
  }, { transport });
  const waitOn: Handler = async function* () {
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect"; ev = yield);
  };
  // Before: rejects with the reason, connects nothing.
  await assert.rejects(
    connect(waitOn, { transport, signal: AbortSignal.abort("not now") }),
    (reason) => reason === "not now",
  );
  // During a handler's start that would never end (no connectTimeout).
  const during = new AbortController();
  const starting = Promise.withResolvers<void>();
  const connecting = connect(async function* () {
    starting.resolve();
    await new Promise<void>(() => {});
    yield;
  }, { transport, signal: during.signal, connectTimeout: Infinity });
  await within(2000, starting.promise, "the handler's start");
  during.abort("gave up");
  await assert.rejects(within(2000, connecting, "the connect"), (r) => r === "gave up");
  await within(2000, server.waitForConnections("==", 0), "its socket closed");
  // After: stops the connection with the reason; a reconnecting one for good.
  for (const reconnect of [false, { initialDelay: 1 }]) {
    const after = new AbortController();
    const shutdownWith = Promise.withResolvers<unknown>();
    const conn = await connect(async function* () {
      let ev = yield;
      while (ev.type !== "shutdown" && ev.type !== "disconnect") ev = yield;
      if (ev.type === "shutdown") shutdownWith.resolve(ev.reason);
    }, { transport, signal: after.signal, reconnect });
    after.abort("done");
    assert.equal(await within(2000, shutdownWith.promise, "shutdown"), "done");
    await within(2000, conn.closed, "closed");
    assert.equal(conn.state, "closed", `reconnect: ${JSON.stringify(reconnect)}`);
  }
  await assert.rejects(
    connect(waitOn, { transport, signal: "yes" as never }),
    (err: Error) => err instanceof TypeError && /option signal/.test(err.message),
  );
  await server.stop();
});
