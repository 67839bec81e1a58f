// The transports against programs this library did not write: HAProxy in front of a
// `proxyProtocol: true` server, sending PROXY headers version 1 (`send-proxy`) and 2
// (`send-proxy-v2`), and terminating TLS itself (`send-proxy-v2-ssl`: the TLS facts come as
// TLVs); OpenSSL's `s_client` (with ALPN and a client certificate) against the TLS echo example,
// and the library's TLS client against OpenSSL's `s_server`. Each test is skipped, saying
// which program is missing, only where it is not installed (.ci/run installs haproxy).

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  type HandlerGenerator,
  lines,
  send,
  serve,
  type Server,
  tls,
} from "../mod.ts";
import { capturingLogger, HOST, portOf, within } from "./_support.ts";
import { findTool, freePort } from "./_redis_tools.ts";

const FIXTURES = new URL("./fixtures/", import.meta.url).pathname;
const TLS_ECHO = new URL("../examples/tls_echo_server.ts", import.meta.url).pathname;
const haproxy = findTool("haproxy");
const openssl = findTool("openssl");
const text = new TextDecoder();
const utf8 = new TextEncoder();

function testWith(tool: string | undefined, name: string, pkg: string, fn: () => Promise<void>) {
  const why = tool === undefined
    ? ` (skipped: ${pkg} not found on PATH; Debian: apt-get install ${pkg})`
    : "";
  Deno.test({ name: name + why, ignore: tool === undefined, fn });
}

/** A child process whose output is read as it comes, kept, and searched. */
class Program {
  readonly #child: Deno.ChildProcess;
  #output = "";
  #changed = Promise.withResolvers<void>();
  readonly #drained: Promise<void>;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array> | undefined;

  constructor(cmd: string[], options: { stdin?: boolean; cwd?: string } = {}) {
    this.#child = new Deno.Command(cmd[0], {
      args: cmd.slice(1),
      cwd: options.cwd,
      stdin: options.stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = options.stdin ? this.#child.stdin.getWriter() : undefined;
    const drain = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream) {
        this.#output += text.decode(chunk);
        this.#changed.resolve();
        this.#changed = Promise.withResolvers<void>();
      }
    };
    this.#drained = Promise.all([drain(this.#child.stdout), drain(this.#child.stderr)]).then(
      () => this.#changed.resolve(),
    );
  }

  get output(): string {
    return this.#output;
  }

  /** Resolves once the output (stdout and stderr) matches `pattern`; fails after `ms`. */
  async until(pattern: RegExp, ms = 10_000): Promise<RegExpMatchArray> {
    return await within(
      ms,
      (async () => {
        for (;;) {
          const found = this.#output.match(pattern);
          if (found) return found;
          let ended = false;
          this.#drained.then(() => ended = true);
          await this.#changed.promise;
          if (ended && !this.#output.match(pattern)) {
            throw new Error(`${pattern} never printed; output:\n${this.#output}`);
          }
        }
      })(),
      `output matching ${pattern}`,
    );
  }

  async write(line: string): Promise<void> {
    await this.#stdin!.write(utf8.encode(line));
  }

  /** Close its stdin (if piped), SIGTERM it, and wait for it and its output. */
  async stop(): Promise<void> {
    await this.#stdin?.close().catch(() => {});
    try {
      this.#child.kill("SIGTERM");
    } catch { /* exited */ }
    await within(10_000, this.#child.status, "the program exits");
    await this.#drained;
  }

  /** Its exit status, once it exits by itself. */
  get status(): Promise<Deno.CommandStatus> {
    return this.#child.status;
  }
}

/** Resolves once something accepts TCP connections on `port` (10 s at most). */
async function accepting(port: number): Promise<void> {
  await within(
    10_000,
    (async () => {
      for (;;) {
        try {
          (await Deno.connect({ hostname: HOST, port })).close();
          return;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
    })(),
    `a listener on port ${port}`,
  );
}

// ---- HAProxy -------------------------------------------------------------------------------------

/** Who the handler says the peer is: its address, and the PROXY header's version and TLVs. */
async function* whoIsThere(conn: Connection<string>): HandlerGenerator<string> {
  const ev = yield;
  if (ev.type !== "packet") return;
  const from = conn.remoteAddr as Deno.NetAddr;
  const tlvs = conn.proxy?.tlvs.map((t) => t.type.toString(16)).join(",") ?? "";
  const alpn = conn.proxy?.tlvs.find((t) => t.type === 0x01);
  yield send(
    `${ev.data} from ${from.hostname}:${from.port} v${conn.proxy?.version} tlvs ${tlvs} alpn ${
      alpn ? text.decode(alpn.value) : "-"
    }`,
  );
}

/**
 * Run `body` with HAProxy relaying a free port of its own to `server`, as `frontend` and `option`
 * (a server line option such as `send-proxy`) say; HAProxy is started on another port if the
 * one picked was taken meanwhile.
 */
async function withHaproxy(
  server: Server<string>,
  frontend: (port: number) => string,
  option: string,
  body: (port: number) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/server.pem`,
      await Deno.readTextFile(`${FIXTURES}server.crt`) +
        await Deno.readTextFile(`${FIXTURES}server.key`),
    );
    for (let attempt = 0;; attempt++) {
      const port = freePort();
      const config = `${dir}/haproxy.cfg`;
      await Deno.writeTextFile(
        config,
        `global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend fe
  ${frontend(port).replace("PEM", `${dir}/server.pem`)}
  default_backend be
backend be
  server s1 127.0.0.1:${portOf(server.addr)} ${option}
`,
      );
      const proxy = new Program([haproxy!, "-db", "-f", config]);
      try {
        const up = await Promise.race([
          accepting(port).then(() => true),
          proxy.status.then(() => false),
        ]);
        if (!up) {
          if (attempt < 3 && /cannot bind|Address already in use/i.test(proxy.output)) continue;
          throw new Error(`haproxy did not start:\n${proxy.output}`);
        }
        await body(port);
        return;
      } finally {
        await proxy.stop();
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function askThroughProxy(conn: Deno.Conn, line: string): Promise<string> {
  await conn.write(utf8.encode(`${line}\n`));
  let answer = "";
  const buf = new Uint8Array(1024);
  while (!answer.endsWith("\n")) {
    const n = await within(5000, conn.read(buf), "the answer");
    if (n === null) break;
    answer += text.decode(buf.subarray(0, n));
  }
  return answer.trimEnd();
}

for (const [option, version] of [["send-proxy", 1], ["send-proxy-v2", 2]] as const) {
  testWith(
    haproxy,
    `haproxy (${option}): the handler sees the original client's address`,
    "haproxy",
    async () => {
      const logger = capturingLogger();
      const server = await serve(whoIsThere, {
        hostname: HOST,
        port: 0,
        framing: lines(),
        proxyProtocol: true,
        logger,
      });
      try {
        await withHaproxy(server, (port) => `bind 127.0.0.1:${port}`, option, async (port) => {
          for (let i = 0; i < 3; i++) {
            const client = await Deno.connect({ hostname: HOST, port });
            try {
              const me = client.localAddr as Deno.NetAddr;
              // The address is the client's own (not HAProxy's), and the header's version the
              // one configured.
              assert.match(
                await askThroughProxy(client, `hello ${i}`),
                new RegExp(
                  `^hello ${i} from 127\\.0\\.0\\.1:${me.port} v${version} tlvs \\S* ?alpn -$`,
                ),
              );
            } finally {
              client.close();
            }
          }
        });
      } finally {
        await server.stop();
      }
    },
  );
}

testWith(
  haproxy,
  "haproxy (TLS termination, send-proxy-v2-ssl): plain TCP behind, the client's address and TLS facts as TLVs",
  "haproxy",
  async () => {
    const logger = capturingLogger();
    const server = await serve(whoIsThere, {
      hostname: HOST,
      port: 0,
      framing: lines(),
      proxyProtocol: true,
      logger,
    });
    try {
      await withHaproxy(
        server,
        (port) => `bind 127.0.0.1:${port} ssl crt PEM alpn etcp/1`,
        "send-proxy-v2-ssl",
        async (port) => {
          // The library's TLS client, to HAProxy's TLS.
          let answer = "";
          let local: Deno.NetAddr | undefined;
          let alpn: string | null | undefined;
          const client = await connect(async function* (conn): HandlerGenerator<string> {
            local = conn.localAddr as Deno.NetAddr;
            alpn = conn.alpnProtocol;
            const ev = yield send("over tls");
            if (ev.type === "packet") answer = ev.data;
          }, {
            hostname: "localhost",
            port,
            framing: lines(),
            transport: tls({
              caCerts: [await Deno.readTextFile(`${FIXTURES}ca.crt`)],
              alpnProtocols: ["etcp/1"],
            }),
          });
          await within(5000, client.closed, "the answer");
          assert.equal(alpn, "etcp/1");
          // 0x01 ALPN, 0x20 SSL (with its own sub-TLVs): HAProxy says what the TLS side agreed.
          const match = /^over tls from 127\.0\.0\.1:(\d+) v2 tlvs (\S+) alpn etcp\/1$/.exec(
            answer,
          );
          assert.ok(match, answer);
          assert.equal(Number(match[1]), local!.port);
          assert.ok(match[2].split(",").includes("20"), `an SSL TLV among ${match[2]}`);
        },
      );
      assert.deepEqual(logger.levels.filter((l) => l !== "debug"), []);
    } finally {
      await server.stop();
    }
  },
);

// ---- OpenSSL --------------------------------------------------------------------------------------

testWith(
  openssl,
  "openssl s_client (ALPN, client certificate) talks to the TLS echo example; one without a certificate is refused",
  "openssl",
  async () => {
    const server = new Program([
      Deno.execPath(),
      "run",
      "-A",
      TLS_ECHO,
      "--port",
      "0",
      "--framing",
      "line",
      "--alpn",
      "etcp/1",
      "--client-ca",
      `${FIXTURES}ca.crt`,
    ]);
    try {
      const port = Number((await server.until(/listening on 127\.0\.0\.1:(\d+)\n/))[1]);
      const clientArgs = [
        openssl!,
        "s_client",
        "-connect",
        `127.0.0.1:${port}`,
        "-servername",
        "localhost",
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-CAfile",
        `${FIXTURES}ca.crt`,
        "-alpn",
        "etcp/1",
      ];
      const withCertificate = [
        ...clientArgs,
        "-cert",
        `${FIXTURES}client.crt`,
        "-key",
        `${FIXTURES}client.key`,
      ];
      // The handshake: ALPN agreed, the server's certificate verified (stdin closed at once).
      const handshake = new Program(withCertificate, { stdin: true });
      try {
        await handshake.write("");
        await handshake.until(/ALPN protocol: etcp\/1/);
        await handshake.until(/Verify return code: 0 \(ok\)/);
      } finally {
        await handshake.stop();
      }
      // A line, echoed (-brief: a short summary of the handshake, then the data).
      const client = new Program([...withCertificate, "-brief"], { stdin: true });
      try {
        await client.until(/Verification: OK/);
        await client.write("hello from openssl\n");
        await client.until(/\nhello from openssl\n/);
      } finally {
        await client.stop();
      }
      // No client certificate: the server refuses it (under TLS 1.3 the client hears it late, at
      // its first read); nothing is echoed.
      const refused = new Program([...clientArgs, "-brief"], { stdin: true });
      try {
        await refused.write("let me in\n");
        await refused.until(/error:|alert/);
        assert.ok(!/\nlet me in\n/.test(refused.output), refused.output);
      } finally {
        await refused.stop();
      }
    } finally {
      await server.stop();
    }
  },
);

testWith(
  openssl,
  "the library's TLS client (ALPN, client certificate) talks to openssl s_server",
  "openssl",
  async () => {
    for (let attempt = 0;; attempt++) {
      const port = freePort();
      const server = new Program([
        openssl!,
        "s_server",
        "-accept",
        `127.0.0.1:${port}`,
        "-cert",
        `${FIXTURES}server.crt`,
        "-key",
        `${FIXTURES}server.key`,
        "-alpn",
        "etcp/1",
        "-Verify",
        "1",
        "-CAfile",
        `${FIXTURES}ca.crt`,
        "-rev", // answers each line reversed
      ]);
      try {
        const started = await Promise.race([
          server.until(/ACCEPT/).then(() => true),
          server.status.then(() => false),
        ]);
        if (!started) {
          if (attempt < 3 && /in use/i.test(server.output)) continue;
          throw new Error(`openssl s_server did not start:\n${server.output}`);
        }
        let answer = "";
        let alpn: string | null | undefined;
        const client = await connect(async function* (conn): HandlerGenerator<string> {
          alpn = conn.alpnProtocol;
          const ev = yield send("hello openssl");
          if (ev.type === "packet") answer = ev.data;
        }, {
          hostname: "localhost",
          port,
          framing: lines(),
          transport: tls({
            caCerts: [await Deno.readTextFile(`${FIXTURES}ca.crt`)],
            alpnProtocols: ["etcp/1"],
            certFile: `${FIXTURES}client.crt`,
            keyFile: `${FIXTURES}client.key`,
          }),
        });
        await within(10_000, client.closed, "the reversed line");
        assert.equal(answer, "lssnepo olleh");
        assert.equal(alpn, "etcp/1");
        await server.until(/Peer certificate: CN = etcp test client/);
        return;
      } finally {
        await server.stop();
      }
    }
  },
);
