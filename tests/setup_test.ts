// Setting up servers and clients: options are checked once, up front, with an error naming the
// option and the value; a connection whose setup fails costs only itself (the acceptor goes on);
// a vetoing onListen leaves nothing listening; the hooks a Node `net` user expects are there.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  type Decoder,
  type Framing,
  type Handler,
  lines,
  memory,
  raw,
  send,
  serve,
  type ServeOptions,
  tcp,
  tls,
} from "../mod.ts";
import { capturingLogger, evalInChild, HOST, Inbox, within } from "./_support.ts";

const noop = async function* () {};
// A client handler that waits for one event (connect() rejects for one that ends before its first yield).
const waitOnce = async function* () {
  yield;
};

Deno.test("serve: every bad option is refused up front, naming the option and the value", async () => {
  const cases: Array<[Record<string, unknown>, ErrorConstructor, RegExp]> = [
    [{ mode: "pasive" }, TypeError, /option mode must be "active" or "passive", not "pasive"/],
    [{ highWaterMark: 0 }, RangeError, /option highWaterMark must be an integer >= 1.*not 0/],
    [{ maxConnections: -5 }, RangeError, /option maxConnections .* not -5/],
    [{ maxConnections: "abc" }, TypeError, /option maxConnections .* not "abc"/],
    [{ shutdownTimeout: NaN }, RangeError, /option shutdownTimeout .* not NaN/],
    [{ idleTimeout: -1 }, RangeError, /option idleTimeout .* not -1/],
    [{ handshakeTimeout: "10" }, TypeError, /option handshakeTimeout .* not "10"/],
    [
      { framing: "lines" },
      TypeError,
      /option framing must be a framing .*did you mean lines\(\)\?/,
    ],
    [{ framing: {} }, TypeError, /option framing must be a framing/],
    [{ port: 70000 }, RangeError, /option port must be an integer from 0 to 65535, not 70000/],
    [{ acceptors: 0 }, RangeError, /option acceptors .* not 0/],
    [
      { logger: { error() {} } },
      TypeError,
      /option logger must be an object with error, warn, debug/,
    ],
    [{ maxBuffered: -1 }, RangeError, /option maxBuffered .* not -1/],
    [{ onBufferFull: "drop" }, TypeError, /option onBufferFull must be "stop" or "throw"/],
    [{ onListen: 5 }, TypeError, /option onListen must be a function/],
  ];
  for (const [options, type, message] of cases) {
    await assert.rejects(
      serve(noop, { hostname: HOST, ...options } as ServeOptions),
      (err: Error) => err instanceof type && message.test(err.message),
      JSON.stringify(options),
    );
  }
  await assert.rejects(serve(null as never), /serve: the handler must be a generator function/);
  await assert.rejects(serve(noop, "x" as never), /serve: options must be an object/);
});

Deno.test("serve: proxyProtocol with the tls() transport is refused up front, saying why", async () => {
  const fixtures = new URL("./fixtures/", import.meta.url).pathname;
  const transport = tls({ certFile: fixtures + "server.crt", keyFile: fixtures + "server.key" });
  await assert.rejects(
    serve(noop, { hostname: HOST, port: 0, transport, proxyProtocol: true }),
    (err: Error) =>
      err instanceof TypeError && /PROXY header precedes the TLS handshake/.test(err.message),
  );
});

Deno.test("connect: bad options are refused before anything connects", async () => {
  for (
    const [options, message] of [
      [{ connectTimeout: -1 }, /option connectTimeout .* not -1/],
      [{ mode: "pasive" }, /option mode/],
      [{ framing: "lines" }, /option framing/],
      [{ port: 1.5 }, /option port/],
    ] as const
  ) {
    await assert.rejects(connect(noop, options as never), message);
  }
});

Deno.test("transports: bad options are refused when the transport is made, naming the option", () => {
  const cases: Array<[() => unknown, ErrorConstructor, RegExp]> = [
    // (0 or less would hold every write for ever; NaN would never hold one.)
    [() => memory("m", { bufferSize: 0 }), RangeError, /memory: option bufferSize .* not 0/],
    [() => memory("m", { bufferSize: -1 }), RangeError, /option bufferSize .* not -1/],
    [() => memory("m", { bufferSize: NaN }), RangeError, /option bufferSize .* not NaN/],
    [() => memory("m", { bufferSize: "64" as never }), TypeError, /option bufferSize/],
    [() => tcp({ noDelay: "no" as never }), TypeError, /tcp: option noDelay must be true or false/],
    [() => tcp({ keepAlive: 1 as never }), TypeError, /tcp: option keepAlive/],
    [() => tcp({ backlog: 0 }), RangeError, /tcp: backlog/],
  ];
  for (const [make, type, message] of cases) {
    assert.throws(make, (err: Error) => err instanceof type && message.test(err.message));
  }
  // Good ones are taken.
  memory("m", { bufferSize: 1 });
  memory("m", { bufferSize: Infinity });
  tcp({ noDelay: false, keepAlive: true, backlog: 16 });
});

Deno.test("server.maxConnections: the live setter and the option agree on what is valid", async () => {
  const server = await serve(noop, { hostname: HOST, port: 0 });
  try {
    assert.throws(() => server.maxConnections = -5, RangeError);
    assert.throws(() => server.maxConnections = NaN, RangeError);
    server.maxConnections = Infinity;
    assert.equal(server.maxConnections, Infinity);
  } finally {
    await server.stop();
  }
});

/** lines(), except that the first decoder() it makes throws. */
function failingOnce(): Framing<string> {
  const base = lines();
  let made = 0;
  return {
    name: "failing-once",
    decoder(): Decoder<string> {
      if (++made === 1) throw new Error("decoder setup failed");
      return base.decoder();
    },
    encode: base.encode,
  };
}

Deno.test("a connection whose setup throws costs only itself: closed, logged once, the acceptor goes on", async () => {
  const logger = capturingLogger();
  const server = await serve(async function* () {
    for (let ev = yield; ev.type === "packet"; ev = yield send(`echo ${ev.data}`));
  }, { hostname: HOST, port: 0, framing: failingOnce(), logger });
  try {
    const port = server.addr.port;
    const first = await Deno.connect({ hostname: HOST, port });
    assert.equal(await within(3000, first.read(new Uint8Array(8)), "first closed"), null);
    first.close();
    assert.deepEqual(logger.levels, ["error"], "logged once");
    assert.equal(server.status, "running");
    assert.equal(server.acceptors()[0].state, "accepting");
    // Later clients are served.
    const got = Promise.withResolvers<string>();
    const client = await connect(async function* () {
      const ev = yield send("hi");
      if (ev.type === "packet") got.resolve(ev.data);
    }, { hostname: HOST, port, framing: lines() });
    assert.equal(await within(3000, got.promise, "echo"), "echo hi");
    await client.closed;
  } finally {
    await server.stop();
  }
});

Deno.test("onListen that throws: serve() rejects with its error and nothing is left listening", async () => {
  const boom = new Error("veto");
  let port = 0;
  await assert.rejects(
    serve(noop, {
      hostname: HOST,
      port: 0,
      onListen(addr) {
        port = addr.port;
        throw boom;
      },
    }),
    (err) => err === boom,
  );
  assert.ok(port > 0);
  await assert.rejects(Deno.connect({ hostname: HOST, port }), Deno.errors.ConnectionRefused);
});

Deno.test("onConnection and onClose hooks see every connection start and end, with its reason", async () => {
  const opened = new Inbox<string>();
  const closed = new Inbox<[string, unknown]>();
  const transport = memory(`hooks-${crypto.randomUUID()}`);
  const server = await serve(async function* () {
    yield;
  }, {
    transport,
    onConnection: (conn) => opened.push(conn.id),
    onClose: (conn, reason) => closed.push([conn.id, reason]),
  });
  try {
    const client = await connect(waitOnce, { transport });
    const id = await opened.next();
    await client.stop();
    assert.deepEqual(await closed.next(), [id, "normal"]);
  } finally {
    await server.stop();
  }
});

Deno.test("a handler that returns a Promise (an async function) is named as such", async () => {
  const transport = memory(`async-fn-${crypto.randomUUID()}`);
  const logger = capturingLogger();
  const conns = new Inbox<Connection<Uint8Array>>();
  const server = await serve((async () => {}) as unknown as Handler<Uint8Array>, {
    transport,
    logger,
    onConnection: (conn) => conns.push(conn),
  });
  try {
    const client = await connect(waitOnce, { transport });
    const reason = await (await conns.next()).closed;
    assert.match(String(reason), /handler returned a Promise \(an async function\?\)/);
    await client.closed;
  } finally {
    await server.stop();
  }
});

Deno.test("a memory connect that times out names the memory address, not a TCP host", async () => {
  const never: ReturnType<typeof memory> = {
    ...memory("never"),
    name: "memory",
    connect: () => new Promise(() => {}),
  };
  await assert.rejects(
    connect(noop, { transport: never, connectTimeout: 10 }),
    (err: Error) => err.name === "TimeoutError" && !err.message.includes("127.0.0.1"),
  );
});

Deno.test("unref: a server waiting for connections does not keep the process alive", async () => {
  const script = `
    import { serve } from "./mod.ts";
    const server = await serve(async function* () { yield; }, { hostname: "127.0.0.1", port: 0 });
    server.unref();
    console.log("listening, unref'd");
  `;
  const out = await evalInChild(script, 10_000);
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout.trim(), "listening, unref'd");
});

Deno.test("connect({ name }) that looks like a connection id is refused before connecting", async () => {
  let connects = 0;
  const transport = {
    ...memory("never-reached"),
    connect: () => (connects++, new Promise<never>(() => {})),
  };
  await assert.rejects(
    connect(noop, { transport, name: "c12" }),
    (err: Error) => err instanceof TypeError && /looks like a connection id/.test(err.message),
  );
  assert.equal(connects, 0);
});

Deno.test("unref: an idle client does not keep the process alive", async () => {
  const server = await serve(async function* () {
    yield;
  }, { hostname: HOST, port: 0, transport: tcp() });
  try {
    const script = `
      import { connect } from "./mod.ts";
      const conn = await connect(async function* () { yield; }, { port: ${server.addr.port} });
      conn.unref();
      console.log("unref'd");
    `;
    const out = await evalInChild(script, 10_000);
    assert.equal(out.code, 0, out.stderr);
    assert.equal(out.stdout.trim(), "unref'd");
  } finally {
    await server.stop();
  }
  void raw;
});
