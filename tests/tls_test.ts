/**
 * The TLS transport (transport/tls.ts) and upgradeTls, against the certificates in
 * tests/fixtures/ (see its README): echo with ALPN on both engines, certificates refused with
 * typed errors, bad options, SNI, client certificates as far as Deno allows, bad peers beside a
 * good client, the handshake timeout, 500 stuck handshakes, and STARTTLS on both sides. Every
 * wait is bounded.
 */

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  type Event,
  type Handler,
  lengthPrefixed,
  type Listener,
  type Logger,
  send,
  serve,
  type Server,
  tls,
  TlsConfigError,
  type TlsConn,
  TlsHandshakeError,
  type TlsOptions,
  type Transport,
  upgradeTls,
  type Yielded,
} from "../mod.ts";
import {
  acceptingWith,
  closeQuietly,
  HOST,
  portOf,
  readExactly,
  within,
  writeAll,
} from "./_support.ts";

const FIXTURES = new URL("./fixtures/", import.meta.url).pathname;
const pem = (name: string) => Deno.readTextFileSync(FIXTURES + name);
const CA = pem("ca.crt");
const OTHER_CA = pem("other_ca.crt");
const SERVER = { certFile: FIXTURES + "server.crt", keyFile: FIXTURES + "server.key" };
const ALT = { certFile: FIXTURES + "alt.crt", keyFile: FIXTURES + "alt.key" };
const EXPIRED = { certFile: FIXTURES + "expired.crt", keyFile: FIXTURES + "expired.key" };
const CLIENT = { certFile: FIXTURES + "client.crt", keyFile: FIXTURES + "client.key" };
const OTHER_CLIENT = {
  certFile: FIXTURES + "other_client.crt",
  keyFile: FIXTURES + "other_client.key",
};
const ENGINES = ["deno", "node"] as const;
const WAIT = 5000;

const utf8 = new TextEncoder();
const text = new TextDecoder();

/** A logger that keeps every line and resolves `lines(n)` once it holds `n` of them. */
function waitingLogger(): Logger & {
  entries: { level: string; line: string }[];
  lines(n: number): Promise<void>;
} {
  const entries: { level: string; line: string }[] = [];
  const waiters: { n: number; resolve(): void }[] = [];
  const at = (level: string) => (...data: unknown[]) => {
    entries.push({
      level,
      line: data.map((d) => d instanceof Error ? d.stack : String(d)).join(" "),
    });
    for (const w of waiters.filter((w) => entries.length >= w.n)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve();
    }
  };
  return {
    entries,
    error: at("error"),
    warn: at("warn"),
    debug: at("debug"),
    lines(n) {
      if (entries.length >= n) return Promise.resolve();
      const { promise, resolve } = Promise.withResolvers<void>();
      waiters.push({ n, resolve });
      return within(WAIT, promise, `${n} log lines (have ${entries.length})`);
    },
  };
}

/** Echoes every frame; answers "alpn?" with the connection's ALPN protocol. */
function* echoAlpn(conn: Connection<Uint8Array>): Generator<Yielded, void, Event<Uint8Array>> {
  let ev = yield;
  while (ev.type === "packet") {
    const asked = ev.data.length === 5 && text.decode(ev.data) === "alpn?";
    ev = yield send(asked ? utf8.encode(String(conn.alpnProtocol)) : ev.data);
  }
}

/** Serve {@linkcode echoAlpn} over `transport` on 127.0.0.1; `handled` counts handlers run. */
async function echoServer(
  transport: Transport<Deno.NetAddr>,
  extra: { logger?: Logger; handshakeTimeout?: number } = {},
): Promise<{ server: Server<Uint8Array>; port: number; handled: () => number }> {
  let handled = 0;
  const server = await serve(echoAlpn, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
    transport,
    onConnection: () => handled++,
    logger: extra.logger ?? waitingLogger(),
    handshakeTimeout: extra.handshakeTimeout,
  });
  return { server, port: portOf(server.addr), handled: () => handled };
}

/**
 * Connect over `transport`, send `frames` one at a time and collect the answers; resolves with
 * them and the client's `alpnProtocol` once all came back.
 */
async function exchange(
  transport: Transport<Deno.NetAddr>,
  port: number,
  frames: Uint8Array[],
  hostname = HOST,
): Promise<{ answers: Uint8Array[]; alpn: string | null | undefined }> {
  const answers: Uint8Array[] = [];
  const finished = Promise.withResolvers<void>();
  const handler: Handler<Uint8Array> = async function* (conn) {
    for (const frame of frames) {
      let ev = yield send(frame);
      while (ev.type !== "packet") {
        if (ev.type === "disconnect" || ev.type === "shutdown") {
          return finished.reject(new Error(`ended after ${answers.length} answers`));
        }
        ev = yield;
      }
      answers.push(ev.data);
    }
    alpn = conn.alpnProtocol;
    finished.resolve();
  };
  let alpn: string | null | undefined;
  const conn = await connect(handler, {
    hostname,
    port,
    transport,
    framing: lengthPrefixed(4),
    connectTimeout: WAIT,
  });
  await within(WAIT, finished.promise, "the exchange");
  await within(WAIT, conn.closed, "the client closes");
  return { answers, alpn };
}

/** A connect that must be refused: resolves with the error. */
async function refused(
  transport: Transport<Deno.NetAddr>,
  port: number,
  hostname = HOST,
): Promise<Error> {
  const err = await within(
    WAIT,
    connect(function* () {}, { hostname, port, transport, connectTimeout: WAIT }).then(
      (conn) => {
        conn.stop();
        throw new Error("connected");
      },
      (err) => err,
    ),
    "the refusal",
  );
  assert.ok(err instanceof Error);
  return err;
}

Deno.test("tls: echo over serve and connect, ALPN chosen and visible as conn.alpnProtocol on both ends", async () => {
  for (const engine of ENGINES) {
    const { server, port } = await echoServer(
      tls({ ...SERVER, engine, alpnProtocols: ["h2", "etcp/1"] }),
    );
    try {
      const big = new Uint8Array(1 << 20).map((_, i) => i * 7);
      for (const [hostname, clientEngine] of [["localhost", "deno"], [HOST, engine]] as const) {
        const client = tls({ caCerts: [CA], alpnProtocols: ["etcp/1", "x"], engine: clientEngine });
        const { answers, alpn } = await exchange(client, port, [
          utf8.encode("one"),
          big,
          utf8.encode("alpn?"),
        ], hostname);
        assert.equal(text.decode(answers[0]), "one");
        assert.deepEqual(answers[1], big, `${engine}: 1 MiB echoed intact`);
        assert.equal(text.decode(answers[2]), "etcp/1", `${engine}: the server's view`);
        assert.equal(alpn, "etcp/1", `${engine}: the client's view`);
      }
      // No ALPN offered: null on both ends (a tcp() connection has undefined).
      const { answers, alpn } = await exchange(tls({ caCerts: [CA] }), port, [
        utf8.encode("alpn?"),
      ]);
      assert.equal(text.decode(answers[0]), "null");
      assert.equal(alpn, null);
    } finally {
      await server.stop();
    }
  }
});

Deno.test("tls: no ALPN protocol in common: connect rejects with TlsHandshakeError, the server logs one debug line", async () => {
  for (const engine of ENGINES) {
    const logger = waitingLogger();
    const { server, port, handled } = await echoServer(
      tls({ ...SERVER, engine, alpnProtocols: ["h2"] }),
      { logger },
    );
    try {
      const err = await refused(tls({ caCerts: [CA], alpnProtocols: ["etcp/1"] }), port);
      await logger.lines(1);
      if (engine === "deno") {
        assert.ok(err instanceof TlsHandshakeError, String(err));
        assert.ok(err instanceof Deno.errors.InvalidData);
        assert.equal(err.failure, "no-application-protocol");
        assert.match(
          err.message,
          /no ALPN protocol in common with the server \(this end offers etcp\/1\)/,
        );
      } else {
        // node:tls closes without an alert: the client sees the connection end.
        assert.ok(err instanceof Deno.errors.UnexpectedEof || err instanceof TlsHandshakeError);
      }
      assert.deepEqual(logger.entries.map((e) => e.level), ["debug"]);
      assert.match(
        logger.entries[0].line,
        /handshake failed: TlsHandshakeError: .*no ALPN protocol in common with the client \(this end offers h2\)/,
      );
      assert.equal(handled(), 0, "no handler ran");
    } finally {
      await server.stop();
    }
  }
});

Deno.test("tls: an unknown CA, an expired certificate or another name: connect rejects with the verification error", async () => {
  const logger = waitingLogger();
  const good = await echoServer(tls(SERVER), { logger });
  const expired = await echoServer(tls(EXPIRED), { logger });
  const alt = await echoServer(tls(ALT), { logger });
  try {
    const cases: [string, Promise<Error>, string, RegExp][] = [
      [
        "the other CA trusted",
        refused(tls({ caCerts: [OTHER_CA] }), good.port),
        "unknown-issuer",
        /the server's certificate is not signed by a CA this end trusts \(pass its CA in caCerts\) \[invalid peer certificate: UnknownIssuer\]/,
      ],
      [
        "only the system's roots",
        refused(tls(), good.port, "localhost"),
        "unknown-issuer",
        /not signed by a CA this end trusts/,
      ],
      [
        "expired",
        refused(tls({ caCerts: [CA] }), expired.port),
        "expired",
        /the server's certificate has expired \(not valid after 2001-01-01T00:00:00\.000Z\)/,
      ],
      [
        "for alt.test, not localhost",
        refused(tls({ caCerts: [CA] }), alt.port, "localhost"),
        "name-mismatch",
        /the server's certificate is not for the name connected to .*"localhost"/,
      ],
    ];
    for (const [what, promise, failure, message] of cases) {
      const err = await promise;
      assert.ok(err instanceof TlsHandshakeError, `${what}: ${err}`);
      assert.ok(err instanceof Deno.errors.InvalidData, what);
      assert.equal(err.failure, failure, what);
      assert.match(err.message, message, what);
      assert.match(err.message, new RegExp(`^TLS handshake with 127\\.0\\.0\\.1:\\d+ failed: `));
      assert.ok(err.cause instanceof Deno.errors.InvalidData, `${what}: Deno's error is the cause`);
    }
    // Each server saw its client refuse its certificate: one debug line each, nothing else.
    await logger.lines(4);
    assert.deepEqual(logger.entries.map((e) => e.level), ["debug", "debug", "debug", "debug"]);
    for (const { line } of logger.entries) {
      assert.match(
        line,
        /handshake failed: TlsHandshakeError: .*the client refused this server's certificate/,
      );
    }
    assert.equal(good.handled() + expired.handled() + alt.handled(), 0, "no handler ran");
  } finally {
    await Promise.all([good.server.stop(), expired.server.stop(), alt.server.stop()]);
  }
});

Deno.test("tls: options that cannot work throw TlsConfigError naming the problem", async () => {
  const cases: [TlsOptions, RegExp][] = [
    [
      { certFile: FIXTURES + "missing.crt", keyFile: SERVER.keyFile },
      /tls: certificate: certFile ".*missing\.crt": cannot read it: NotFound/,
    ],
    [{ cert: "not a certificate", key: pem("server.key") }, /cert holds no PEM certificate/],
    [{ cert: pem("server.crt"), key: pem("server.crt") }, /key holds no PEM private key/],
    [
      { certFile: SERVER.certFile, keyFile: CLIENT.keyFile },
      /the key \(keyFile ".*client\.key"\) does not match the certificate \(certFile ".*server\.crt"\)/,
    ],
    [{ key: pem("server.key") }, /a key without a certificate/],
    [{ cert: pem("server.crt") }, /a certificate without its key/],
    [{ ...SERVER, cert: pem("server.crt") }, /give cert or certFile, not both/],
    [{ caCerts: ["-----BEGIN PRIVATE KEY-----"] }, /caCerts\[0\] is not a PEM certificate/],
    [{ ...SERVER, clientCaCerts: [CA, "x"] }, /clientCaCerts\[1\] is not a PEM certificate/],
    [{ alpnProtocols: ["h2", ""] }, /alpnProtocols: "" is not a protocol name/],
    [{ alpnProtocols: ["x".repeat(256)] }, /is not a protocol name \(1 to 255 bytes\)/],
    [
      { ...SERVER, sni: { "alt.test": { certFile: ALT.certFile, keyFile: SERVER.keyFile } } },
      /sni\["alt\.test"\]: the key .* does not match/,
    ],
    [{ ...SERVER, sni: { "not a name": ALT } }, /sni: "not a name" is not a host name/],
    [{ ...SERVER, engine: "deno", clientCaCerts: [CA] }, /clientCaCerts needs engine "node"/],
  ];
  for (const [options, message] of cases) {
    assert.throws(() => tls(options), (err: unknown) => {
      assert.ok(err instanceof TlsConfigError, `${message}: ${err}`);
      assert.equal((err as Error).name, "TlsConfigError");
      assert.match((err as Error).message, message);
      return true;
    });
  }
  const missing = (() => {
    try {
      tls({ certFile: FIXTURES + "missing.crt", keyFile: SERVER.keyFile });
    } catch (err) {
      return err;
    }
  })() as Error;
  assert.ok(missing.cause instanceof Deno.errors.NotFound, "Deno's error is the cause");
  // A server without a certificate: serve() rejects.
  await assert.rejects(
    () => serve(function* () {}, { hostname: HOST, port: 0, transport: tls({ caCerts: [CA] }) }),
    (err: unknown) =>
      err instanceof TlsConfigError && /a server needs a certificate and its key/.test(err.message),
  );
});

Deno.test("tls: SNI: the server's certificate is chosen by the name the client asks for", async () => {
  for (const engine of ENGINES) {
    const { server, port } = await echoServer(
      tls({ ...SERVER, engine, sni: { "alt.test": ALT } }),
    );
    const plain = await echoServer(tls({ ...SERVER, engine }));
    try {
      for (
        const [serverName, hostname] of [["alt.test", HOST], [undefined, "localhost"], [
          undefined,
          HOST,
        ]]
      ) {
        const { answers } = await exchange(
          tls({ caCerts: [CA], serverName }),
          port,
          [utf8.encode("hi")],
          hostname,
        );
        assert.equal(text.decode(answers[0]), "hi", `${engine}: ${serverName ?? hostname}`);
      }
      // Wildcards match one label; a server without the name answers with its own certificate.
      const wild = await echoServer(tls({ ...SERVER, engine, sni: { "*.test": ALT } }));
      try {
        const { answers } = await exchange(
          tls({ caCerts: [CA], serverName: "alt.test" }),
          wild.port,
          [
            utf8.encode("w"),
          ],
        );
        assert.equal(text.decode(answers[0]), "w");
      } finally {
        await wild.server.stop();
      }
      const err = await refused(tls({ caCerts: [CA], serverName: "alt.test" }), plain.port);
      assert.ok(err instanceof TlsHandshakeError && err.failure === "name-mismatch", String(err));
    } finally {
      await Promise.all([server.stop(), plain.server.stop()]);
    }
  }
});

/** Listen with `transport` and connect a raw client with `client`; both connections, handshaken. */
async function transportPair(
  server: Transport<Deno.NetAddr>,
  client: Transport<Deno.NetAddr>,
): Promise<
  {
    listener: Listener<Deno.NetAddr>;
    c: TlsConn;
    s: TlsConn;
    settled: PromiseSettledResult<unknown>[];
  }
> {
  const listener = await server.listen({ hostname: HOST, port: 0 });
  const accepted = listener.accept();
  const c = await client.connect({ hostname: HOST, port: listener.addr.port }) as TlsConn;
  const s = await accepted as TlsConn;
  const settled = await within(
    WAIT,
    Promise.allSettled([c.handshake(), s.handshake()]),
    "handshakes",
  );
  return { listener, c, s, settled };
}

function closeAll(...conns: { close(): void }[]): void {
  for (const conn of conns) closeQuietly(conn);
}

Deno.test("tls: client certificates: Deno.listenTls never asks for one; engine node with clientCaCerts verifies them", async () => {
  // Deno's own server: the client's certificate is not asked for, the connection works.
  {
    const { listener, c, s, settled } = await transportPair(
      tls(SERVER),
      tls({ ...CLIENT, caCerts: [CA] }),
    );
    assert.deepEqual(settled.map((r) => r.status), ["fulfilled", "fulfilled"]);
    assert.equal(s.peerCertificate, undefined, "Deno cannot tell the peer's certificate");
    closeAll(c, s, listener);
  }
  // engine node: a client certificate signed by the CA is verified and readable.
  for (const clientEngine of ENGINES) {
    const { listener, c, s, settled } = await transportPair(
      tls({ ...SERVER, clientCaCerts: [CA] }),
      tls({ ...CLIENT, caCerts: [CA], engine: clientEngine }),
    );
    assert.deepEqual(settled.map((r) => r.status), ["fulfilled", "fulfilled"], clientEngine);
    assert.equal(s.peerCertificate?.subject.CN, "etcp test client");
    assert.equal(s.peerCertificate?.issuer.CN, "etcp test CA");
    assert.ok(s.peerCertificate!.raw.length > 100);
    await writeAll(c, utf8.encode("ping"));
    assert.equal(text.decode(await readExactly(s, 4)), "ping");
    closeAll(c, s, listener);
  }
  // Refused by the server: no certificate, or one from another CA. TLS 1.3: the client's own
  // handshake has finished by then; it learns it when it reads.
  const cases: [TlsOptions, boolean, string, RegExp][] = [
    [
      { caCerts: [CA] },
      true,
      "certificate-required",
      /the client gave no certificate, and one is required/,
    ],
    [
      { ...OTHER_CLIENT, caCerts: [CA] },
      true,
      "unknown-issuer",
      /the client's certificate is not signed by a CA this end trusts \(clientCaCerts\)/,
    ],
    [
      { ...OTHER_CLIENT, caCerts: [CA] },
      false,
      "unknown-issuer",
      /UNABLE_TO_VERIFY_LEAF_SIGNATURE/,
    ],
  ];
  for (const [clientOptions, requireClientCert, failure, message] of cases) {
    const { listener, c, s, settled } = await transportPair(
      tls({ ...SERVER, clientCaCerts: [CA], requireClientCert }),
      tls(clientOptions),
    );
    const err = (settled[1] as PromiseRejectedResult).reason;
    assert.ok(err instanceof TlsHandshakeError, `${failure}: ${err}`);
    assert.equal(err.failure, failure);
    assert.match(err.message, message);
    await assert.rejects(
      () =>
        within(
          WAIT,
          c.read(new Uint8Array(16)).then((n) => {
            if (n === null) throw new Deno.errors.UnexpectedEof("closed");
          }),
          "the client's read",
        ),
      (e: unknown) =>
        e instanceof Deno.errors.InvalidData || e instanceof Deno.errors.UnexpectedEof,
    );
    closeAll(c, s, listener);
  }
  // requireClientCert: false lets a client without a certificate in.
  {
    const { listener, c, s, settled } = await transportPair(
      tls({ ...SERVER, clientCaCerts: [CA], requireClientCert: false }),
      tls({ caCerts: [CA] }),
    );
    assert.deepEqual(settled.map((r) => r.status), ["fulfilled", "fulfilled"]);
    assert.equal(s.peerCertificate, null);
    closeAll(c, s, listener);
  }
  // Through serve() and connect(): a client with the right certificate is echoed.
  const { server, port } = await echoServer(tls({ ...SERVER, clientCaCerts: [CA] }));
  try {
    const { answers } = await exchange(tls({ ...CLIENT, caCerts: [CA] }), port, [
      utf8.encode("mtls"),
    ]);
    assert.equal(text.decode(answers[0]), "mtls");
  } finally {
    await server.stop();
  }
});

/** Bytes of a TLS ClientHello cut short: a record header announcing more than follows. */
const PARTIAL_HELLO = new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]);

Deno.test("tls: garbage and peers gone mid-handshake cost their socket only; a good client keeps echoing", async () => {
  for (const engine of ENGINES) {
    const logger = waitingLogger();
    const { server, port, handled } = await echoServer(tls({ ...SERVER, engine }), { logger });
    try {
      // A good client echoing one frame at a time until told to stop; `reached(n)` resolves
      // once it has had n echoes.
      let echoes = 0;
      let stopping = false;
      const finished = Promise.withResolvers<void>();
      let waiter: { n: number; resolve(): void } | null = null;
      const reached = (n: number) => {
        const { promise, resolve } = Promise.withResolvers<void>();
        if (echoes >= n) resolve();
        else waiter = { n, resolve };
        return within(WAIT, promise, `${n} echoes (have ${echoes})`);
      };
      const good = await connect(
        async function* (): AsyncGenerator<Yielded, void, Event<Uint8Array>> {
          for (;;) {
            let ev = yield send(utf8.encode(`echo ${echoes}`));
            while (ev.type !== "packet") {
              if (ev.type === "disconnect" || ev.type === "shutdown") {
                return finished.reject(new Error(`the good client ended after ${echoes}`));
              }
              ev = yield;
            }
            assert.equal(text.decode(ev.data), `echo ${echoes}`);
            echoes++;
            if (waiter !== null && echoes >= waiter.n) waiter.resolve();
            if (stopping) return finished.resolve();
          }
        },
        {
          hostname: "localhost",
          port,
          transport: tls({ caCerts: [CA] }),
          framing: lengthPrefixed(4),
        },
      );

      const bad: (() => Promise<void>)[] = [];
      const raw = async (bytes: Uint8Array | null, end: "close" | "closeWrite") => {
        const conn = await Deno.connect({ hostname: HOST, port });
        if (bytes) await writeAll(conn, bytes);
        if (end === "closeWrite") {
          await conn.closeWrite();
          // The server ends it: the read sees the end or a reset.
          await within(WAIT, conn.read(new Uint8Array(64)).catch(() => null), "the server closes");
        }
        conn.close();
      };
      for (let i = 0; i < 4; i++) {
        bad.push(() => raw(utf8.encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "closeWrite"));
        bad.push(() => raw(PARTIAL_HELLO, "close")); // gone mid-handshake
        bad.push(() => raw(null, "close")); // gone before a byte
        bad.push(() => raw(new Uint8Array(300).fill(0xff), "closeWrite"));
      }
      await reached(3); // echoing, before the bad peers come
      await Promise.all(bad.map((peer) => peer()));
      await logger.lines(bad.length);
      await reached(echoes + 3); // and still echoing after them
      stopping = true;
      await within(WAIT, finished.promise, "the good client");
      await within(WAIT, good.closed, "the good client closes");
      // One debug line per bad peer, nothing else; no handler ran for them.
      assert.equal(logger.entries.length, bad.length, logger.entries.map((e) => e.line).join("\n"));
      assert.ok(logger.entries.every((e) => e.level === "debug"));
      assert.ok(logger.entries.every((e) => /handshake failed: /.test(e.line)));
      assert.ok(
        logger.entries.some((e) => /TlsHandshakeError: .*does not speak TLS/.test(e.line)),
        logger.entries.map((e) => e.line).join("\n"),
      );
      assert.equal(handled(), 1, "only the good client's handler ran");
    } finally {
      await server.stop();
    }
  }
});

Deno.test("tls: handshakeTimeout gives up on a peer that never completes the handshake, before any handler runs", async () => {
  for (const engine of ENGINES) {
    const logger = waitingLogger();
    const { server, port, handled } = await echoServer(tls({ ...SERVER, engine }), {
      logger,
      handshakeTimeout: 300,
    });
    try {
      for (const [i, bytes] of [null, PARTIAL_HELLO].entries()) {
        const conn = await Deno.connect({ hostname: HOST, port });
        try {
          const started = performance.now();
          if (bytes) await writeAll(conn, bytes);
          await logger.lines(i + 1);
          const elapsed = performance.now() - started;
          assert.ok(elapsed >= 250, `${engine}: gave up after ${elapsed} ms, before the timeout`);
          if (engine === "node") {
            // The socket is closed: the peer sees its end.
            const got = await within(
              WAIT,
              conn.read(new Uint8Array(64)).catch((err) => err),
              "the server closes the silent peer",
            );
            assert.ok(got === null || got instanceof Deno.errors.ConnectionReset, String(got));
          }
          // engine "deno": Deno.TlsConn.close() before the handshake completes leaves the socket
          // open until the peer leaves (rustls-tokio-stream's handshake task owns it): see
          // transport/tls.ts. The server has given up on it all the same.
        } finally {
          conn.close();
        }
      }
      assert.equal(logger.entries.length, 2);
      for (const { level, line } of logger.entries) {
        assert.equal(level, "debug");
        assert.match(line, /handshake failed: TimeoutError: handshake timed out after 300 ms/);
      }
      assert.equal(handled(), 0);
    } finally {
      await server.stop();
    }
  }
});

Deno.test("tls: 500 peers stuck mid-handshake do not delay a good client's accept and echo", async () => {
  const STUCK = 500;
  // The tls() transport, counting accepted connections: an event when all the stuck are in.
  let accepted = 0;
  const allIn = Promise.withResolvers<void>();
  const counting = acceptingWith(tls(SERVER), (conn) => {
    if (++accepted === STUCK) allIn.resolve();
    return conn;
  }, "counting-tls");
  const logger = waitingLogger();
  const { server, port, handled } = await echoServer(counting, {
    logger,
    handshakeTimeout: 60_000,
  });
  const stuck: Deno.Conn[] = [];
  try {
    for (let i = 0; i < STUCK; i += 100) {
      const batch = await Promise.all(
        Array.from({ length: 100 }, () => Deno.connect({ hostname: HOST, port })),
      );
      stuck.push(...batch);
      // Half send the start of a ClientHello and stop; the rest send nothing.
      await Promise.all(batch.filter((_, j) => j % 2 === 0).map((c) => writeAll(c, PARTIAL_HELLO)));
    }
    await within(10_000, allIn.promise, `the server accepts ${STUCK} stuck peers (${accepted})`);
    const started = performance.now();
    const { answers } = await exchange(tls({ caCerts: [CA] }), port, [utf8.encode("through")]);
    const elapsed = performance.now() - started;
    assert.equal(text.decode(answers[0]), "through");
    assert.ok(elapsed < 2000, `the good client took ${elapsed.toFixed(0)} ms`);
    assert.equal(accepted, STUCK + 1);
    assert.equal(handled(), 1, "the stuck peers' handlers never ran");
    assert.equal(logger.entries.length, 0, "nothing logged while they are stuck");
  } finally {
    for (const conn of stuck) closeQuietly(conn);
    await server.stop();
  }
  // Each stuck peer cost at most one debug line.
  assert.ok(logger.entries.length <= STUCK);
  assert.ok(logger.entries.every((e) => e.level === "debug"));
});

Deno.test("upgradeTls: plain connections switched to TLS mid-conversation, server side through node:tls", async () => {
  const listener = Deno.listen({ hostname: HOST, port: 0 });
  try {
    for (const clientOptions of [{}, CLIENT] as const) {
      const accepted = listener.accept();
      const plainClient = await Deno.connect({ hostname: HOST, port: listener.addr.port });
      const plainServer = await accepted;
      // A plain exchange first.
      await writeAll(plainClient, utf8.encode("STARTTLS\n"));
      assert.equal(text.decode(await readExactly(plainServer, 9)), "STARTTLS\n");
      await writeAll(plainServer, utf8.encode("GO\n"));
      assert.equal(text.decode(await readExactly(plainClient, 3)), "GO\n");
      const [client, server] = await Promise.all([
        upgradeTls(plainClient, {
          role: "client",
          serverName: "localhost",
          caCerts: [CA],
          alpnProtocols: ["etcp/1"],
          ...clientOptions,
        }),
        upgradeTls(plainServer, {
          role: "server",
          ...SERVER,
          alpnProtocols: ["etcp/1"],
          clientCaCerts: "certFile" in clientOptions ? [CA] : undefined,
        }),
      ]);
      try {
        await within(WAIT, Promise.all([client.handshake(), server.handshake()]), "handshakes");
        assert.equal(client.alpnProtocol, "etcp/1");
        assert.equal(server.alpnProtocol, "etcp/1");
        assert.equal(client.remoteAddr.transport, "tcp");
        assert.equal(
          server.peerCertificate?.subject.CN,
          "certFile" in clientOptions ? "etcp test client" : undefined,
        );
        // Both ways, more than the reader's buffers hold, then a half-close.
        const big = new Uint8Array(3 << 20).map((_, i) => i % 251);
        const [, echoed] = await Promise.all([
          writeAll(client, big),
          readExactly(server, big.length),
        ]);
        assert.deepEqual(echoed, big);
        await writeAll(server, utf8.encode("secret"));
        assert.equal(text.decode(await readExactly(client, 6)), "secret");
        await client.closeWrite();
        assert.equal(await within(WAIT, server.read(new Uint8Array(8)), "the end"), null);
        await writeAll(server, utf8.encode("after"));
        assert.equal(text.decode(await readExactly(client, 5)), "after");
      } finally {
        closeAll(client, server);
      }
    }
    // The server's certificate is checked: a client that does not trust its CA refuses it.
    const accepted = listener.accept();
    const plainClient = await Deno.connect({ hostname: HOST, port: listener.addr.port });
    const plainServer = await accepted;
    const [client, server] = await Promise.all([
      upgradeTls(plainClient, { role: "client", caCerts: [OTHER_CA] }),
      upgradeTls(plainServer, { role: "server", ...SERVER }),
    ]);
    const [c, s] = await within(
      WAIT,
      Promise.allSettled([client.handshake(), server.handshake()]),
      "handshakes",
    );
    closeAll(client, server);
    assert.equal(c.status, "rejected");
    const err = (c as PromiseRejectedResult).reason;
    assert.ok(err instanceof TlsHandshakeError && err.failure === "unknown-issuer", String(err));
    assert.equal(s.status, "rejected");
    await assert.rejects(
      () => upgradeTls(plainServer, { role: "server" }),
      (e: unknown) => e instanceof TlsConfigError && /a server needs a certificate/.test(e.message),
    );
  } finally {
    listener.close();
  }
});
