/**
 * The echo examples as command-line programs: `examples/echo_client.ts`,
 * `examples/pool_client.ts` and `examples/echo_server.ts` run as processes, against an echo server started here (or as a
 * process), checking their exit status and output. Every run is bounded: a process that has not
 * exited in time is killed and the test fails.
 */

import assert from "node:assert/strict";
import { type Event, type Handler, lengthPrefixed, send, serve, type Yielded } from "../mod.ts";
import { echo, parseEchoServerArgs } from "../examples/echo_server.ts";
import { parseEchoClientArgs } from "../examples/echo_client.ts";
import { tls as tlsTransport } from "../mod.ts";
import { parseTlsEchoServerArgs } from "../examples/tls_echo_server.ts";
import { capturingLogger, HOST, portOf, startProcess, within } from "./_support.ts";

const CLIENT = new URL("../examples/echo_client.ts", import.meta.url).pathname;
const SERVER = new URL("../examples/echo_server.ts", import.meta.url).pathname;
const POOL_CLIENT = new URL("../examples/pool_client.ts", import.meta.url).pathname;
const RUN_WAIT_MS = 10_000;

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Start `deno run -A script ...args`, with no stdin, its stdout and stderr piped. */
function spawn(script: string, args: string[]): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** Run `deno run -A script ...args` to its end; kill it and fail if it takes over `ms`. */
async function run(script: string, args: string[], ms = RUN_WAIT_MS): Promise<Ran> {
  const child = spawn(script, args);
  const output = child.output();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<"expired">((resolve) => {
    timer = setTimeout(() => resolve("expired"), ms);
  });
  try {
    const result = await Promise.race([output, expired]);
    if (result === "expired") {
      try {
        child.kill("SIGKILL");
      } catch { /* exited just now */ }
      const late = await output;
      const text = new TextDecoder();
      throw new Error(
        `${script.split("/").pop()} ${args.join(" ")}: still running after ${ms} ms (killed)\n` +
          `stdout: ${text.decode(late.stdout)}\nstderr: ${text.decode(late.stderr)}`,
      );
    }
    const text = new TextDecoder();
    return {
      code: result.code,
      stdout: text.decode(result.stdout),
      stderr: text.decode(result.stderr),
    };
  } finally {
    clearTimeout(timer);
  }
}

const client = (args: string[], ms?: number) => run(CLIENT, args, ms);

/** Run `body` with the port of an in-process server running `handler` over `lengthPrefixed(4)`. */
async function withServer(
  handler: Handler,
  body: (port: number) => Promise<void>,
  maxLength?: number,
): Promise<void> {
  const server = await serve(handler, {
    port: 0,
    hostname: HOST,
    framing: lengthPrefixed(4, { maxLength }),
    logger: capturingLogger(), // servers that misbehave on purpose: keep the output clean
  });
  try {
    await body(portOf(server.addr));
  } finally {
    await server.stop();
  }
}

/** The one line of a failed run's stderr, checked to start with `echo_client: `. */
function errorLine(ran: Ran, what: string): string {
  assert.equal(ran.code, 1, `${what}: exit code (stderr: ${ran.stderr})`);
  assert.equal(ran.stdout, "", `${what}: stdout`);
  const lines = ran.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `${what}: one line on stderr, not:\n${ran.stderr}`);
  assert.match(lines[0], /^echo_client: \S/, what);
  return lines[0];
}

/** The name an example's messages start with: its file name without `.ts`. */
const nameOf = (script: string) => script.split("/").pop()!.replace(/\.ts$/, "");

/**
 * Checks that `ran`, `script` run with `args`, refused its command line: exit 2, nothing on
 * stdout, and on stderr a first line `NAME: ` matching `error`, then the usage.
 */
function assertRefusedFlags(ran: Ran, script: string, args: string[], error: RegExp): void {
  const name = nameOf(script);
  const what = `${name} ${args.join(" ")}`;
  assert.equal(ran.code, 2, `${what}: exit code (stderr: ${ran.stderr})`);
  assert.equal(ran.stdout, "", `${what}: stdout`);
  const [first, ...rest] = ran.stderr.split("\n");
  assert.ok(first.startsWith(`${name}: `), `${what}: ${first}`);
  assert.match(first, error, what);
  assert.ok(rest.join("\n").includes(`usage: deno run -A examples/${name}.ts`), what);
}

/**
 * Start `deno run -A script ...args` (a server example), wait (10 s at most) for its first line,
 * `listening on 127.0.0.1:PORT`, and run `body` with that port; then SIGTERM it and expect exit
 * 0 within 5 s. Killed if it has not exited by the end.
 */
async function withServerProcess(
  script: string,
  args: string[],
  body: (port: string) => Promise<void>,
): Promise<void> {
  const server = await startProcess(["run", "-A", script, ...args], /^(.*)\n/, {
    timeoutMs: 10_000,
  });
  try {
    const match = /^listening on 127\.0\.0\.1:(\d+)$/.exec(server.match[1]);
    assert.ok(match, `unexpected first line: ${JSON.stringify(server.match[1])}`);
    await body(match[1]);
    server.child.kill("SIGTERM");
    const status = await within(5000, server.child.status, "the exit after SIGTERM");
    assert.equal(status.code, 0, await server.stderr);
  } finally {
    await server.end();
  }
}

Deno.test("examples: --help prints the usage on stdout and exits 0", async () => {
  const [c, s, h] = await Promise.all([
    client(["--help"]),
    run(SERVER, ["--help"]),
    client(["-h"]),
  ]);
  for (
    const [ran, script] of [[c, "echo_client.ts"], [s, "echo_server.ts"], [
      h,
      "echo_client.ts",
    ]] as const
  ) {
    assert.equal(ran.code, 0, ran.stderr);
    assert.equal(ran.stderr, "");
    assert.ok(ran.stdout.startsWith(`usage: deno run -A examples/${script}`), ran.stdout);
    assert.match(ran.stdout, /--port N .*\(default 7001\b/);
    assert.match(ran.stdout, /--help/);
  }
  assert.match(c.stdout, /--count N/);
  assert.match(c.stdout, /--size BYTES/);
  assert.match(s.stdout, /--framing NAME/);
});

Deno.test("examples: the echo examples default to port 7001, clear of the chat example's 7000", () => {
  assert.deepEqual(parseEchoServerArgs([]), {
    kind: "run",
    args: {
      port: 7001,
      hostname: "127.0.0.1",
      framing: "len4",
      hibernate: false,
      sync: false,
      batch: false,
    },
  });
  assert.deepEqual(parseEchoClientArgs([]), {
    kind: "run",
    args: { port: 7001, hostname: "127.0.0.1", count: 1000, size: 64, timeout: 10_000 },
  });
});

Deno.test("examples: a bad flag or value exits 2 at once, with the usage on stderr", async () => {
  // A live server, so that a client which did not refuse its flags would run (or loop) instead.
  await withServer(echo, async (port) => {
    const p = ["--port", String(port)];
    const cases: [string, string[], RegExp][] = [
      [CLIENT, ["--bogus", ...p], /Unknown option '--bogus'/],
      [CLIENT, ["--count", "0", ...p], /--count must be an integer of at least 1, not "0"/],
      [CLIENT, ["--count", "abc", ...p], /--count must be .*"abc"/],
      [CLIENT, ["--count", "-5", ...p], /--count/],
      [CLIENT, ["--count", "1.5", ...p], /--count must be .*"1\.5"/],
      [CLIENT, ["--size", "3", ...p], /--size must be .*"3"/],
      [CLIENT, ["--size", "", ...p], /--size must be/],
      [CLIENT, ["--port", "0"], /--port must be an integer from 1 to 65535/],
      [CLIENT, ["--port", "70000"], /--port must be/],
      [CLIENT, ["--timeout", "soon", ...p], /--timeout must be/],
      [CLIENT, [...p, "--count"], /'--count <value>' argument missing/],
      [CLIENT, [...p, "extra"], /Unexpected argument 'extra'/],
      [SERVER, ["--bogus"], /Unknown option '--bogus'/],
      [SERVER, ["--port", "abc"], /--port must be an integer from 0 to 65535, not "abc"/],
      [SERVER, ["--port", "65536"], /--port must be/],
      [SERVER, ["--framing", "xml", "--port", "0"], /--framing must be len4, line or raw/],
      [SERVER, ["--hibernate=yes", "--port", "0"], /'--hibernate' does not take an argument/],
    ];
    const started = performance.now();
    const results = await Promise.all(cases.map(([script, args]) => run(script, args, 5000)));
    results.forEach((ran, i) => assertRefusedFlags(ran, ...cases[i]));
    assert.ok(performance.now() - started < 5000, "bad flags are refused at once");
  });
});

Deno.test("examples: echo_client --size 9000000 against the default 8 MiB maxLength exits 1, no hang", async () => {
  await withServer(echo, async (port) => {
    const ran = await client(["--port", String(port), "--size", "9000000", "--count", "3"]);
    const line = errorLine(ran, "--size 9000000");
    assert.match(line, /FrameTooLarge: frame of 9000000 bytes exceeds maxLength 8388608/);
  });
});

Deno.test("examples: echo_client exits 0 after a normal run, and frames of exactly 8 MiB go through", async () => {
  await withServer(echo, async (port) => {
    const [small, big] = await Promise.all([
      client(["--port", String(port), "--hostname", HOST, "--count", "500", "--size", "100"]),
      client(["--port", String(port), "--count", "2", "--size", String(8 * 1024 * 1024)]),
    ]);
    assert.equal(small.code, 0, small.stderr);
    assert.equal(small.stderr, "");
    assert.match(small.stdout, /^500 frames echoed in \d+\.\d\d s \(\d+\/s\)\n$/);
    assert.equal(big.code, 0, big.stderr);
    assert.match(big.stdout, /^2 frames echoed in /);
  });
});

Deno.test("examples: echo_client fails with exit 1 and one line when the server is gone, closes early, is silent or wrong", async () => {
  // A port nobody listens on: a server's, once stopped.
  const gone = await serve(echo, { port: 0, hostname: HOST });
  const gonePort = portOf(gone.addr);
  await gone.stop();

  /** Echo `n` frames, then close the connection. */
  const echoThenClose = (n: number): Handler =>
    async function* () {
      let ev: Event = yield;
      for (let i = 0; i < n && ev.type === "packet"; i++) ev = yield send(ev.data);
    };
  /** Read every frame, answer none. */
  async function* silent(): AsyncGenerator<Yielded, void, Event> {
    let ev = yield;
    while (ev.type === "packet") ev = yield;
  }
  /** Echo each frame with its last byte changed. */
  async function* garbled(): AsyncGenerator<Yielded, void, Event> {
    let ev = yield;
    while (ev.type === "packet") {
      const data = (ev.data as Uint8Array).slice();
      data[data.length - 1] ^= 0xff;
      ev = yield send(data);
    }
  }

  await withServer(
    echoThenClose(3),
    (closesEarly) =>
      withServer(
        silent,
        (silentPort) =>
          withServer(garbled, (garbledPort) =>
            withServer(echo, async (smallMax) => {
              const started = performance.now();
              const [refused, early, quiet, wrong, tooBig] = await Promise.all([
                client(["--port", String(gonePort)]),
                client(["--port", String(closesEarly), "--count", "10"]),
                client(["--port", String(silentPort), "--timeout", "300"]),
                client(["--port", String(garbledPort)]),
                // The server ends the connection (FrameTooLarge on its side): the client sees it end.
                client(["--port", String(smallMax), "--size", "2000"]),
              ]);
              assert.match(
                errorLine(refused, "server gone"),
                new RegExp(`^echo_client: cannot connect to 127\\.0\\.0\\.1:${gonePort}: `),
              );
              assert.match(
                errorLine(early, "server closes early"),
                /the server closed the connection after 3 of 10 echoes/,
              );
              assert.match(errorLine(quiet, "silent server"), /no echo of frame 0 within 300 ms/);
              assert.match(errorLine(wrong, "garbled echo"), /echo 0 does not match what was sent/);
              assert.match(
                errorLine(tooBig, "over the server's maxLength"),
                /the server closed the connection after 0 of 1000 echoes/,
              );
              assert.ok(performance.now() - started < RUN_WAIT_MS);
            }, 1024)),
      ),
  );
});

Deno.test("examples: echo_server --port 0 serves echo_client, exits 0 on SIGTERM; a port in use exits 1", async () => {
  await withServerProcess(SERVER, ["--port", "0", "--sync"], async (port) => {
    const [ok, inUse] = await Promise.all([
      client(["--port", port, "--count", "100"]),
      run(SERVER, ["--port", port]),
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^100 frames echoed in /);
    assert.equal(inUse.code, 1, inUse.stderr);
    assert.match(
      inUse.stderr,
      new RegExp(`^echo_server: cannot listen on 127\\.0\\.0\\.1:${port}: AddrInUse: .*\n$`),
    );
  });
});

Deno.test("examples: pool_client --duration 1 calls an echo server, prints a line a second and exits 0; --help exits 0; bad flags exit 2", async () => {
  await withServer(echo, async (port) => {
    const p = ["--port", String(port)];
    const cases: [string, string[], RegExp][] = [
      [POOL_CLIENT, ["--size", "0", ...p], /--size must be an integer from 1 to 10000, not "0"/],
      [POOL_CLIENT, ["--concurrency", "x", ...p], /--concurrency must be/],
      [POOL_CLIENT, ["--duration", "-1", ...p], /--duration/],
      [POOL_CLIENT, ["--bogus"], /Unknown option '--bogus'/],
    ];
    const [ran, help, ...refused] = await Promise.all([
      run(POOL_CLIENT, [...p, "--size", "2", "--concurrency", "4", "--duration", "1"]),
      run(POOL_CLIENT, ["--help"], 5000),
      ...cases.map(([script, args]) => run(script, args, 5000)),
    ]);
    assert.equal(ran.code, 0, ran.stderr);
    assert.equal(ran.stderr, "");
    const lines = ran.stdout.trimEnd().split("\n");
    assert.equal(lines.length, 1, ran.stdout);
    const match =
      /^1s: (\d+) calls\/s, (\d+) failures\/s; up [12], connecting \d+, backing-off \d+, down \d+; reconnects \d+, failures \d+$/
        .exec(lines[0]);
    assert.ok(match, lines[0]);
    assert.ok(Number(match[1]) > 0, lines[0]);
    assert.equal(help.code, 0, help.stderr);
    assert.equal(help.stderr, "");
    assert.ok(help.stdout.startsWith("usage: deno run -A examples/pool_client.ts"), help.stdout);
    assert.match(help.stdout, /--concurrency N/);
    assert.match(help.stdout, /--duration SECS/);
    refused.forEach((r, i) => assertRefusedFlags(r, ...cases[i]));
  });
});

// ---- TLS: examples/tls_echo_server.ts and echo_client.ts --tls ---------------------------------

const TLS_SERVER = new URL("../examples/tls_echo_server.ts", import.meta.url).pathname;
const FIXTURES = new URL("./fixtures/", import.meta.url).pathname;

Deno.test("examples (TLS): --tls means port 7002 and the test CA; tls_echo_server's defaults; bad TLS flags exit 2", async () => {
  assert.deepEqual(parseEchoClientArgs(["--tls"]), {
    kind: "run",
    args: {
      port: 7002,
      hostname: "127.0.0.1",
      count: 1000,
      size: 64,
      timeout: 10_000,
      tls: { ca: `${FIXTURES}ca.crt` },
    },
  });
  // --ca and --servername imply --tls; --port still wins.
  const named = parseEchoClientArgs(["--servername", "localhost", "--port", "9"]);
  assert.equal(named.kind, "run");
  if (named.kind === "run") {
    assert.equal(named.args.port, 9);
    assert.deepEqual(named.args.tls, { ca: `${FIXTURES}ca.crt`, serverName: "localhost" });
  }
  assert.deepEqual(parseTlsEchoServerArgs([]), {
    kind: "run",
    args: {
      port: 7002,
      hostname: "127.0.0.1",
      cert: `${FIXTURES}server.crt`,
      key: `${FIXTURES}server.key`,
      alpn: [],
      framing: "len4",
      hibernate: false,
      sync: false,
      batch: false,
    },
  });
  const cases: [string, string[], RegExp][] = [
    [CLIENT, ["--ca", "", "--port", "1"], /--ca must name a file/],
    [CLIENT, ["--servername", "", "--port", "1"], /--servername must not be empty/],
    [CLIENT, ["--tls=yes"], /'--tls' does not take an argument/],
    [TLS_SERVER, ["--cert", "x.crt", "--port", "0"], /--cert and --key go together/],
    [TLS_SERVER, ["--alpn", "a,,b", "--port", "0"], /--alpn must be protocol names/],
    [TLS_SERVER, ["--port", "70000"], /--port must be an integer from 0 to 65535/],
    [TLS_SERVER, ["--bogus"], /Unknown option '--bogus'/],
  ];
  const [help, ...results] = await Promise.all([
    run(TLS_SERVER, ["--help"], 5000),
    ...cases.map(([script, args]) => run(script, args, 5000)),
  ]);
  assert.equal(help.code, 0, help.stderr);
  assert.ok(help.stdout.startsWith("usage: deno run -A examples/tls_echo_server.ts"));
  assert.match(help.stdout, /--cert FILE/);
  results.forEach((ran, i) => assertRefusedFlags(ran, ...cases[i]));
});

Deno.test("examples (TLS): echo_client --tls exits 0 against a TLS echo server; a wrong CA, name or CA file exits 1 with one line", async () => {
  const server = await serve(echo, {
    port: 0,
    hostname: HOST,
    framing: lengthPrefixed(4),
    transport: tlsTransport({
      certFile: `${FIXTURES}server.crt`,
      keyFile: `${FIXTURES}server.key`,
    }),
    logger: capturingLogger(), // refused handshakes are logged: keep the output clean
  });
  try {
    const p = String(portOf(server.addr));
    const [ok, named, wrongCa, wrongName, noCaFile, notPem] = await Promise.all([
      client(["--tls", "--port", p, "--count", "50"]),
      client(["--servername", "localhost", "--port", p, "--count", "5"]),
      client(["--ca", `${FIXTURES}other_ca.crt`, "--port", p]),
      client(["--servername", "alt.test", "--port", p]),
      client(["--ca", `${FIXTURES}missing.crt`, "--port", p]),
      client(["--ca", `${FIXTURES}server.key`, "--port", p]),
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^50 frames echoed in /);
    assert.equal(named.code, 0, named.stderr);
    assert.match(
      errorLine(wrongCa, "--ca other_ca.crt"),
      new RegExp(
        `^echo_client: cannot connect to 127\\.0\\.0\\.1:${p}: TlsHandshakeError: .*the server's certificate is not signed by a CA this end trusts`,
      ),
    );
    assert.match(
      errorLine(wrongName, "--servername alt.test"),
      /TlsHandshakeError: .*not for the name connected to .*"alt\.test"/,
    );
    assert.match(
      errorLine(noCaFile, "--ca missing.crt"),
      /^echo_client: cannot read the CA file .*missing\.crt: NotFound: /,
    );
    assert.match(
      errorLine(notPem, "--ca server.key"),
      /^echo_client: TlsConfigError: tls: caCerts\[0\] is not a PEM certificate/,
    );
  } finally {
    await server.stop();
  }
});

Deno.test("examples (TLS): tls_echo_server --port 0 serves echo_client --tls, exits 0 on SIGTERM; a certificate it cannot use exits 1", async () => {
  await withServerProcess(TLS_SERVER, ["--port", "0", "--alpn", "etcp/1"], async (port) => {
    const [ok, missing, mismatch] = await Promise.all([
      client(["--tls", "--port", port, "--count", "100"]),
      run(TLS_SERVER, ["--port", "0", "--cert", `${FIXTURES}missing.crt`, "--key", "x.key"]),
      run(TLS_SERVER, [
        "--port",
        "0",
        "--cert",
        `${FIXTURES}server.crt`,
        "--key",
        `${FIXTURES}client.key`,
      ]),
    ]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^100 frames echoed in /);
    for (
      const [ran, message] of [
        [
          missing,
          /^tls_echo_server: TlsConfigError: tls: certificate: certFile ".*missing\.crt": cannot read it: NotFound: .*\n$/,
        ],
        [
          mismatch,
          /^tls_echo_server: TlsConfigError: tls: certificate: the key .*client\.key.* does not match the certificate .*\n$/,
        ],
      ] as const
    ) {
      assert.equal(ran.code, 1, ran.stderr);
      assert.equal(ran.stdout, "");
      assert.match(ran.stderr, message);
    }
  });
});
