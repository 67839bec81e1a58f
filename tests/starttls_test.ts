// STARTTLS: a live plain connection switches to TLS in place with a yielded
// startTls(); what was sent before goes out in plain text, what is sent after (even in the same
// yield) encrypted, nothing lost or reordered; bytes read past the switch point, a switch with a
// read under way are refused. Against Node's STARTTLS server (tests/peers/starttls_server.mjs),
// a third-party peer, and against a server of this library switching its side too.

import assert from "node:assert/strict";
import {
  connect,
  type Event,
  type HandlerGenerator,
  hibernate,
  lines,
  ProtocolError,
  send,
  serve,
  startTls,
} from "../mod.ts";
import { capturingLogger, evalInChild, Inbox, logNames, within } from "./_support.ts";

const fixtures = new URL("./fixtures/", import.meta.url);
const ca = Deno.readTextFileSync(new URL("ca.crt", fixtures));

/** The Node STARTTLS server, on a free port; stopped when disposed. */
async function nodeStartTlsServer(): Promise<{ port: number } & AsyncDisposable> {
  const child = new Deno.Command("node", {
    args: [
      new URL("./peers/starttls_server.mjs", import.meta.url).pathname,
      new URL("server.crt", fixtures).pathname,
      new URL("server.key", fixtures).pathname,
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  while (!out.includes("\n")) {
    const { value, done } = await within(10_000, reader.read(), "the node server's port");
    if (done) throw new Error("node server exited");
    out += value;
  }
  reader.releaseLock();
  return {
    port: Number(out.trim()),
    async [Symbol.asyncDispose]() {
      await child.stdin.close();
      await within(10_000, child.status, "node server exit");
      await child.stdout.cancel().catch(() => {});
    },
  };
}

const label = (ev: Event<string>) => ev.type === "packet" ? ev.data : ev.type;

Deno.test("startTls: plain before, encrypted after, in order; ALPN visible", async () => {
  await using server = await nodeStartTlsServer();
  const got = new Inbox<string>(5000);
  const conn = await connect(async function* (): HandlerGenerator<string> {
    let ev = yield [send("one"), send("STARTTLS")];
    while (ev.type === "packet") {
      got.push(label(ev));
      if (ev.data === "GO") {
        // Switch, and send in the same yield: that frame goes out encrypted.
        ev = yield [
          startTls({ serverName: "localhost", caCerts: [ca], alpnProtocols: ["etcp/1"] }),
          send("two"),
        ];
      } else if (ev.data.startsWith("tls:two")) {
        ev = yield send("three");
      } else if (ev.data.startsWith("tls:three")) return;
      else ev = yield;
    }
  }, { port: server.port, framing: lines() });
  assert.equal(await got.next(), "plain:one");
  assert.equal(await got.next(), "GO");
  assert.equal(await got.next(), "tls:two alpn:etcp/1");
  assert.equal(await got.next(), "tls:three alpn:etcp/1");
  assert.equal(await within(5000, conn.closed, "closed"), "normal");
  assert.equal(conn.alpnProtocol, "etcp/1");
});

Deno.test("startTls: sends from outside during the switch go out encrypted, after it", async () => {
  await using server = await nodeStartTlsServer();
  const got = new Inbox<string>(5000);
  const conn = await connect(async function* (): HandlerGenerator<string> {
    let ev = yield send("STARTTLS");
    for (; ev.type === "packet"; ev = yield) {
      got.push(label(ev));
      if (ev.data === "GO") {
        ev = yield startTls({ serverName: "localhost", caCerts: [ca] });
        got.push(label(ev));
      }
    }
  }, { port: server.port, framing: lines() });
  assert.equal(await got.next(), "GO");
  conn.send("outside"); // the handshake is under way: held, then encrypted
  assert.match(await got.next(), /^tls:outside/);
  await conn.stop();
});

Deno.test("startTls: bytes read past the switch point end the connection with ProtocolError", async () => {
  await using server = await nodeStartTlsServer();
  const logger = capturingLogger();
  const conn = await connect(async function* (): HandlerGenerator<string> {
    // "GO" and "EXTRA" come in one write: EXTRA was read as plain text before the switch.
    for (let ev = yield send("STARTTLS-EXTRA"); ev.type === "packet"; ev = yield) {
      if (ev.data === "GO") yield startTls({ serverName: "localhost", caCerts: [ca] });
    }
  }, { port: server.port, framing: lines(), logger });
  const reason = await within(5000, conn.closed, "closed");
  assert.ok(reason instanceof ProtocolError, `closed with ${reason}`);
  assert.match(reason.message, /past the switch point/);
});

Deno.test("startTls on both sides: a server of this library switches too, ALPN agreed", async () => {
  const cert = new URL("server.crt", fixtures).pathname;
  const key = new URL("server.key", fixtures).pathname;
  const server = await serve(async function* (conn): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      if (ev.data === "STARTTLS") {
        ev = yield [
          send("GO"),
          startTls({ certFile: cert, keyFile: key, alpnProtocols: ["etcp/1"] }),
        ];
      } else ev = yield send(`${conn.alpnProtocol ? "tls" : "plain"}:${ev.data}`);
    }
  }, { hostname: "127.0.0.1", port: 0, framing: lines(), logger: capturingLogger() });
  try {
    const got = new Inbox<string>(5000);
    const client = await connect(async function* (): HandlerGenerator<string> {
      let ev = yield [send("one"), send("STARTTLS")];
      for (; ev.type === "packet"; ev = yield) {
        got.push(ev.data);
        if (ev.data === "GO") {
          ev = yield [
            startTls({ serverName: "localhost", caCerts: [ca], alpnProtocols: ["etcp/1"] }),
            send("two"),
          ];
          got.push(label(ev));
        }
      }
    }, { port: server.addr.port, framing: lines() });
    assert.equal(await got.next(), "plain:one");
    assert.equal(await got.next(), "GO");
    assert.equal(await got.next(), "tls:two");
    assert.equal(client.alpnProtocol, "etcp/1");
    await client.stop();
  } finally {
    await server.stop();
  }
});

Deno.test("startTls: with a read under way (not in answer to a packet) it is refused", async () => {
  await using server = await nodeStartTlsServer();
  const conn = await connect(async function* (): HandlerGenerator<string> {
    const ev = yield; // a cast: the reader is waiting for the peer
    if (ev.type === "cast") yield startTls({ serverName: "localhost", caCerts: [ca] });
  }, { port: server.port, framing: lines(), logger: capturingLogger() });
  conn.cast("now");
  const reason = await within(5000, conn.closed, "closed");
  assert.ok(reason instanceof ProtocolError);
  assert.match((reason as Error).message, /read is under way/);
});

for (
  const [label, actions, message] of [
    ["startTls then hibernate", () => [startTls(), hibernate()], /startTls and hibernate/],
    ["hibernate then startTls", () => [hibernate(), startTls()], /startTls and hibernate/],
    [
      "two startTls",
      () => [send("a"), startTls(), send("b"), startTls()],
      /one startTls per yield/,
    ],
  ] as const
) {
  Deno.test(`startTls: ${label} in one yield is a ProtocolError`, async () => {
    await using server = await nodeStartTlsServer();
    const got = new Inbox<string>(5000);
    const conn = await connect(async function* (): HandlerGenerator<string> {
      for (let ev = yield send("STARTTLS"); ev.type === "packet"; ev = yield) {
        got.push(ev.data);
        if (ev.data === "GO") yield [send("before"), ...actions()];
      }
    }, { port: server.port, framing: lines(), logger: capturingLogger() });
    assert.equal(await got.next(), "GO");
    const reason = await within(5000, conn.closed, "closed");
    assert.ok(reason instanceof ProtocolError, `closed with ${reason}`);
    assert.match(reason.message, message);
  });
}

Deno.test("startTls: a peer that stalls the handshake ends the connection at handshakeTimeout", async () => {
  // A plain server that agrees to switch and then never answers the ClientHello.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepted = (async () => {
    const peer = await listener.accept();
    await peer.read(new Uint8Array(64)); // "STARTTLS\n"
    await peer.write(new TextEncoder().encode("GO\n"));
    return peer; // and then silence
  })();
  const logger = capturingLogger();
  try {
    const conn = await connect(async function* (): HandlerGenerator<string> {
      for (let ev = yield send("STARTTLS"); ev.type === "packet"; ev = yield) {
        if (ev.data === "GO") yield startTls({ serverName: "localhost", caCerts: [ca] });
      }
    }, {
      port: listener.addr.port,
      framing: lines(),
      connectTimeout: 300,
      logger,
    });
    const reason = await within(5000, conn.closed, "closed at the timeout");
    assert.equal((reason as Error).name, "TimeoutError");
    // The peer's fault: one line at warn, not a crash's stack at error.
    assert.deepEqual(logger.levels, ["warn"]);
    assert.ok(logNames(logger.calls[0], reason));
    (await accepted).close();
  } finally {
    listener.close();
  }
});

Deno.test("startTls: the handler's own bad TLS options are its fault, logged at error; the peer's handshake failure at warn", async () => {
  const logger = capturingLogger();
  const closed = Promise.withResolvers<unknown>();
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      ev = ev.data === "STARTTLS"
        ? yield [
          send("GO"),
          startTls({ certFile: "/nonexistent.crt", keyFile: "/nonexistent.key" }),
        ]
        : yield;
    }
  }, {
    hostname: "127.0.0.1",
    port: 0,
    framing: lines(),
    logger,
    onClose: (_conn, reason) => closed.resolve(reason),
  });
  const client = await connect(async function* (): HandlerGenerator<string> {
    for (let ev = yield send("STARTTLS"); ev.type === "packet"; ev = yield);
  }, { port: server.addr.port, framing: lines(), logger: capturingLogger() });
  const reason = await within(5000, closed.promise, "closed");
  assert.equal((reason as Error).name, "TlsConfigError");
  assert.deepEqual(logger.levels, ["error"]);
  assert.ok(logNames(logger.calls[0], reason));
  await client.stop();
  await server.stop();
});

Deno.test("startTls: unref() holds for the TLS socket that takes the plain one's place", async () => {
  const server = await serve(async function* (): HandlerGenerator<string> {
    for (let ev = yield; ev.type === "packet";) {
      ev = ev.data === "STARTTLS"
        ? yield [
          send("GO"),
          startTls({
            certFile: new URL("server.crt", fixtures).pathname,
            keyFile: new URL("server.key", fixtures).pathname,
          }),
        ]
        : ev.data === "after"
        ? yield send("ok")
        : yield;
    }
  }, { hostname: "127.0.0.1", port: 0, framing: lines(), logger: capturingLogger() });
  try {
    const script = `
      import { connect, lines, send, startTls } from "./mod.ts";
      const ca = Deno.readTextFileSync("${new URL("ca.crt", fixtures).pathname}");
      const switched = Promise.withResolvers();
      const conn = await connect(async function* () {
        let ev = yield send("STARTTLS");
        for (; ev.type === "packet"; ev = yield) {
          if (ev.data === "GO") {
            ev = yield [startTls({ serverName: "localhost", caCerts: [ca] }), send("after")];
          }
          if (ev.type === "packet" && ev.data === "ok") switched.resolve();
        }
      }, { port: ${server.addr.port}, framing: lines() });
      conn.unref();
      await switched.promise;
      console.log("switched, unref'd");
    `;
    const out = await evalInChild(script, 10_000);
    assert.equal(out.code, 0, out.stderr);
    assert.equal(out.stdout.trim(), "switched, unref'd");
  } finally {
    await server.stop();
  }
});
