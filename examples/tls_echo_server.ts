/**
 * The echo server over TLS: every frame is sent back as it came.
 *
 *     deno run -A examples/tls_echo_server.ts [--port 7002] [--hostname 127.0.0.1]
 *       [--cert FILE --key FILE] [--alpn PROTO,...] [--client-ca FILE]
 *       [--framing len4|line|raw] [--hibernate] [--sync]
 *
 * Without `--cert`/`--key` it serves the test certificate (tests/fixtures/server.crt, for
 * `localhost` and `127.0.0.1`, signed by tests/fixtures/ca.crt), so that
 * `deno run -A examples/echo_client.ts --tls` talks to it as it is. `--client-ca` asks every
 * client for a certificate signed by that CA (mutual TLS). Once listening it prints
 * `listening on HOST:PORT`; SIGINT or SIGTERM stops it gracefully (exit 0). `--help` prints the
 * usage; a bad flag exits 2 with the usage on stderr; a certificate that cannot be used, or
 * failing to listen, exits 1 with one line on stderr.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { serve, tls } from "../mod.ts";
import { echo, echoHibernating, echoSync, framings } from "./echo_server.ts";
import { stopOnSignals } from "./_stop_on_signals.ts";
import { argsOrStatus, oneLine, type Parsed } from "./_command_line.ts";

const FIXTURES = new URL("../tests/fixtures/", import.meta.url).pathname;

/** The port the example listens on by default (7000 is the chat's, 7001 the plain echo's). */
export const DEFAULT_TLS_PORT = 7002;

/** The certificate served by default: the test fixture, for localhost and 127.0.0.1. */
export const DEFAULT_CERT = `${FIXTURES}server.crt`;
/** The key of {@linkcode DEFAULT_CERT}. */
export const DEFAULT_KEY = `${FIXTURES}server.key`;
/** The CA that signed {@linkcode DEFAULT_CERT} (what a client must trust). */
export const DEFAULT_CA = `${FIXTURES}ca.crt`;

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/tls_echo_server.ts [options]

Echo every frame back to its sender, over TLS. Prints "listening on HOST:PORT" once
listening; SIGINT or SIGTERM stops it.

  --port N          port to listen on, 0 for any free one (default ${DEFAULT_TLS_PORT})
  --hostname HOST   address to bind (default 127.0.0.1)
  --cert FILE       the server's certificate chain, PEM (default: the test certificate,
                    tests/fixtures/server.crt, for localhost and 127.0.0.1)
  --key FILE        its private key, PEM (default: tests/fixtures/server.key); give both
                    --cert and --key, or neither
  --alpn LIST       ALPN protocols to accept, comma-separated (default: no ALPN)
  --client-ca FILE  require a client certificate signed by this CA (mutual TLS)
  --framing NAME    len4 (4-byte length prefix, the default), line or raw
  --hibernate       hibernate each connection between frames
  --sync            run the plain function* handler instead of the async one
  -h, --help        print this help and exit`;

/** The settings given on the command line. */
export interface TlsEchoServerArgs {
  port: number;
  hostname: string;
  cert: string;
  key: string;
  alpn: string[];
  clientCa?: string;
  framing: string;
  hibernate: boolean;
  sync: boolean;
}

/** Parse the server's command line; never throws. */
export function parseTlsEchoServerArgs(argv: string[]): Parsed<TlsEchoServerArgs> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        port: { type: "string", default: String(DEFAULT_TLS_PORT) },
        hostname: { type: "string", default: "127.0.0.1" },
        cert: { type: "string" },
        key: { type: "string" },
        alpn: { type: "string" },
        "client-ca": { type: "string" },
        framing: { type: "string", default: "len4" },
        hibernate: { type: "boolean", default: false },
        sync: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (err) {
    // parseArgs's own errors (unknown flag, missing value, …): the first line says it.
    return { kind: "usage", error: String((err as Error).message).split("\n", 1)[0] };
  }
  if (values.help) return { kind: "help" };
  const port = /^\d{1,5}$/.test(values.port) ? Number(values.port) : NaN;
  if (!(port <= 65535)) {
    return {
      kind: "usage",
      error: `--port must be an integer from 0 to 65535, not "${values.port}"`,
    };
  }
  if (values.hostname === "") return { kind: "usage", error: "--hostname must not be empty" };
  if ((values.cert === undefined) !== (values.key === undefined)) {
    return { kind: "usage", error: "--cert and --key go together: give both, or neither" };
  }
  if (values.cert === "" || values.key === "" || values["client-ca"] === "") {
    return { kind: "usage", error: "--cert, --key and --client-ca take a file name" };
  }
  const alpn = values.alpn === undefined ? [] : values.alpn.split(",");
  if (alpn.some((p) => p === "")) {
    return { kind: "usage", error: `--alpn must be protocol names separated by commas` };
  }
  if (!Object.hasOwn(framings, values.framing)) {
    return { kind: "usage", error: `--framing must be len4, line or raw, not "${values.framing}"` };
  }
  const args: TlsEchoServerArgs = {
    port,
    hostname: values.hostname,
    cert: values.cert ?? DEFAULT_CERT,
    key: values.key ?? DEFAULT_KEY,
    alpn,
    framing: values.framing,
    hibernate: values.hibernate,
    sync: values.sync,
  };
  if (values["client-ca"] !== undefined) args.clientCa = values["client-ca"];
  return { kind: "run", args };
}

/**
 * Run the example with command-line `argv`; resolves with the exit status: 0 after a graceful
 * stop or `--help`, 1 if the certificate cannot be used or it cannot listen, 2 for a bad
 * command line.
 */
async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("tls_echo_server", parseTlsEchoServerArgs(argv), USAGE);
  if (typeof args === "number") return args;
  const handler = args.hibernate ? echoHibernating : args.sync ? echoSync : echo;
  let transport;
  try {
    const clientCaCerts = args.clientCa === undefined
      ? undefined
      : [Deno.readTextFileSync(args.clientCa)];
    transport = tls({
      certFile: args.cert,
      keyFile: args.key,
      alpnProtocols: args.alpn.length > 0 ? args.alpn : undefined,
      clientCaCerts,
    });
  } catch (err) {
    console.error(`tls_echo_server: ${oneLine(err)}`);
    return 1;
  }
  let server;
  try {
    server = await serve(handler, {
      port: args.port,
      hostname: args.hostname,
      framing: framings[args.framing](),
      transport,
      maxConnections: Infinity,
      onListen(addr) {
        if (addr.transport === "tcp") console.log(`listening on ${addr.hostname}:${addr.port}`);
      },
    });
  } catch (err) {
    console.error(
      `tls_echo_server: cannot listen on ${args.hostname}:${args.port}: ${oneLine(err)}`,
    );
    return 1;
  }
  await stopOnSignals(server);
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
