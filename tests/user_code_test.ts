// Code and values the user hands the library, failing every way it can: async hooks that reject,
// a logger that throws, a handler that is a hand-made iterator, a slow registry, bad timeouts and
// bad upgrades. What fails is reported (or refused up front) and costs at most the connection it
// belongs to: the server serves on, every stop() settles, nothing is left behind (the suite
// runs with the op and resource sanitizers on).

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  createPool,
  type Handler,
  type Logger,
  memory,
  MemoryRegistry,
  ProtocolError,
  type Registry,
  reply,
  send,
  serve,
  type Transport,
} from "../mod.ts";
import { capturingLogger, within } from "./_support.ts";

let transports = 0;
function fresh(): Transport {
  return memory(`user-code-${++transports}`);
}

const text = new TextEncoder();

// The server: echoes every frame; ends on shutdown or disconnect.
const echo: Handler<Uint8Array> = async function* () {
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    ev = ev.type === "packet" ? yield send(ev.data) : yield;
  }
};

// A client: a call sends its message to the server and replies with the echo.
const asker: Handler<Uint8Array> = async function* () {
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    if (ev.type !== "call") {
      ev = yield;
      continue;
    }
    const from = ev.from;
    ev = yield send(text.encode(String(ev.message)));
    if (ev.type === "packet") ev = yield reply(from, new TextDecoder().decode(ev.data));
  }
};

/** Whether the server still takes a connection and echoes on it. */
async function stillServes(transport: Transport): Promise<void> {
  const probe = await connect(asker, { transport });
  assert.equal(await probe.call("ping"), "ping");
  await probe.stop();
}

Deno.test("an async onConnection, onClose or alarm callback that rejects is logged; the server serves on", async () => {
  for (const hook of ["onConnection", "onClose", "alarm"] as const) {
    const transport = fresh();
    const captured = capturingLogger();
    const logged = Promise.withResolvers<unknown[]>();
    const logger = {
      ...captured,
      error(...data: unknown[]) {
        captured.error(...data);
        if (String(data[0]).includes(`${hook} threw`)) logged.resolve(data);
      },
    };
    const failed = Promise.withResolvers<void>();
    const rejecting = async () => {
      await Promise.resolve();
      failed.resolve();
      throw new Error(`${hook} failed`);
    };
    const server = await serve(echo, {
      transport,
      logger,
      ...(hook === "alarm"
        ? { alarms: [{ threshold: 1, callback: rejecting }] }
        : { [hook]: rejecting }),
    });
    const client = await connect(asker, { transport });
    await client.stop();
    await within(2000, failed.promise, `${hook} called`);
    const call = await within(2000, logged.promise, `${hook}'s rejection logged`);
    assert.equal((call[1] as Error).message, `${hook} failed`);
    await stillServes(transport);
    await server.stop();
  }
});

Deno.test("a logger that throws cannot keep a connection from closing, nor stop() from settling", async () => {
  const transport = fresh();
  let thrown = 0;
  const broken: Logger = {
    error() {
      thrown++;
      throw new Error("log sink closed");
    },
    warn() {
      thrown++;
      throw new Error("log sink closed");
    },
    debug() {
      thrown++;
      throw new Error("log sink closed");
    },
  };
  // (What it could not log goes to console.error: quiet it for the test.)
  const consoleError = console.error;
  console.error = () => {};
  try {
    const crashed = Promise.withResolvers<Connection<Uint8Array>>();
    const server = await serve(async function* (conn) {
      crashed.resolve(conn);
      yield;
      throw new Error("handler crash");
    }, { transport, logger: broken });
    const client = await connect(asker, { transport });
    const conn = await crashed.promise;
    client.send(new Uint8Array([1])); // the server's handler throws on it
    const reason = await within(2000, conn.closed, "the crashed connection closed");
    assert.equal((reason as Error).message, "handler crash");
    assert.ok(thrown > 0, "the crash was reported to the logger (which threw)");
    await within(2000, client.closed, "the client saw the end");
    await within(2000, server.stop(), "server.stop()");
  } finally {
    console.error = consoleError;
  }
});

Deno.test("a handler that is a hand-made iterator ends only its connection, with a ProtocolError", async () => {
  const cases: Array<[string, () => unknown, RegExp]> = [
    ["no return()", () => ({ next: () => ({ value: undefined, done: false }) }), /not a generator/],
    [
      "next() gives undefined",
      () => ({ next: () => undefined, return: () => ({ value: undefined, done: true }) }),
      /next\(\) gave undefined/,
    ],
    [
      "next() resolves to 42",
      () => ({
        next: () => Promise.resolve(42),
        return: () => Promise.resolve({ value: undefined, done: true }),
      }),
      /next\(\) gave 42/,
    ],
  ];
  for (const [what, make, message] of cases) {
    const transport = fresh();
    const logger = capturingLogger();
    const ended = Promise.withResolvers<unknown>();
    const server = await serve(make as unknown as Handler<Uint8Array>, {
      transport,
      logger,
      onClose: (_conn, reason) => ended.resolve(reason),
    });
    const client = await connect(asker, { transport });
    const reason = await within(2000, ended.promise, `${what}: the connection ended`);
    assert.ok(reason instanceof ProtocolError, `${what}: ended with ${reason}`);
    assert.match(reason.message, message);
    await within(2000, client.closed, `${what}: the client saw the end`);
    assert.deepEqual(server.connections(), [], what);
    await server.stop();
  }
});

Deno.test("stop() while an async registry's remove() is pending leaves no timer behind", async () => {
  const transport = fresh();
  const removing = Promise.withResolvers<void>();
  const release = Promise.withResolvers<void>();
  const inner = new MemoryRegistry();
  // A registry whose remove() takes its time (a database, say).
  const slow: Registry = {
    node: inner.node,
    add: (entry, conn) => inner.add(entry, conn),
    remove(id) {
      removing.resolve();
      return release.promise.then(() => inner.remove(id));
    },
    claim: (id, name) => inner.claim(id, name),
    list: (filter) => inner.list(filter),
    lookup: (idOrName) => inner.lookup(idOrName),
  };
  const server = await serve(async function* () {
    yield;
  }, { transport, registry: slow, shutdownTimeout: 60_000 });
  const client = await connect(asker, { transport });
  await client.stop(); // the server's connection ends, and is removed from the registry
  await within(2000, removing.promise, "the registry's remove() called");
  // The connection is releasing: a stop with a timeout must arm nothing that outlives it.
  const stopping = server.stop("shutdown", { timeout: 30_000 });
  release.resolve();
  await within(2000, stopping, "server.stop()");
  // (The op sanitizer fails this test if a 30-second end timer is still armed.)
});

Deno.test("every method that takes a timeout refuses a bad one: it rejects at once, and nothing changes", async () => {
  const transport = fresh();
  const server = await serve(echo, { transport });
  const client = await connect(asker, { transport });
  const pool = await createPool(asker, { addresses: [{ transport }], size: 1 });
  await pool.ready;
  const methods: Array<[string, (options: { timeout: number }) => Promise<unknown>]> = [
    ["server.stop", (o) => server.stop("shutdown", o)],
    ["conn.stop", (o) => client.stop("normal", o)],
    ["conn.call", (o) => client.call("ping", o)],
    ["conn.sendSync", (o) => client.sendSync(new Uint8Array(1), o)],
    ["conn.whenUp", (o) => client.whenUp(o)],
    ["pool.stop", (o) => pool.stop("shutdown", o)],
    ["pool.removeAddress", (o) => pool.removeAddress({ transport }, o)],
    ["pool.withConnection", (o) => pool.withConnection(() => {}, o)],
    ["pool.call", (o) => pool.call("ping", o)],
    ["server.waitForConnections", (o) => server.waitForConnections("==", 9, o)],
  ];
  for (const [name, call] of methods) {
    for (const bad of [NaN, -1, "5" as unknown as number]) {
      let result: Promise<unknown>;
      try {
        result = call({ timeout: bad });
      } catch (err) {
        assert.fail(`${name}({ timeout: ${String(bad)} }) threw ${err}: it should reject`);
      }
      await assert.rejects(
        within(1000, result, `${name}({ timeout: ${String(bad)} })`),
        (err: Error) =>
          (err instanceof RangeError || err instanceof TypeError) && /timeout/.test(err.message),
        name,
      );
    }
  }
  // A null timeout is no timeout given (a configuration read from JSON may say so).
  assert.equal(await client.call("ping", { timeout: null as unknown as number }), "ping");
  // Nothing was stopped or removed by the refused calls.
  assert.equal(client.state, "up");
  assert.equal(pool.connections().length, 1);
  assert.equal(await client.call("ping"), "ping");
  await pool.stop();
  await client.stop();
  await server.stop();
});

Deno.test("upgrade() refuses what is not a handler, or a codeChange that is not a function", async () => {
  const transport = fresh();
  const server = await serve(echo, { transport });
  const client = await connect(asker, { transport });
  const pool = await createPool(asker, { addresses: [{ transport }], size: 1 });
  await pool.ready;
  const upgrades: Array<[string, (h: unknown, o?: unknown) => void]> = [
    ["server.upgrade", (h, o) => server.upgrade(h as Handler<Uint8Array>, o as never)],
    ["conn.upgrade", (h, o) => client.upgrade(h as Handler<Uint8Array>, o as never)],
    ["pool.upgrade", (h, o) => pool.upgrade(h as Handler<Uint8Array>, o as never)],
  ];
  for (const [name, upgrade] of upgrades) {
    assert.throws(() => upgrade(undefined), TypeError, name);
    assert.throws(() => upgrade("pong"), TypeError, name);
    assert.throws(() => upgrade(echo, { codeChange: 42 }), /codeChange/, name);
  }
  // The refused upgrades changed nothing: new connections still run the server's handler.
  const other = await connect(asker, { transport });
  assert.equal(await other.call("ping"), "ping");
  await other.stop();
  await pool.stop();
  await client.stop();
  await server.stop();
});
