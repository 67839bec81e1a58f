/**
 * The echo server over TLS: every frame is sent back as it came.
 *
 *     deno run -A examples/tls_echo_server.ts [--port 7002] [--hostname 127.0.0.1]
 *       [--cert FILE --key FILE] [--alpn PROTO,...] [--client-ca FILE]
 *       [--framing len4|line|raw] [--hibernate] [--sync] [--batch]
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

import { tls } from "../mod.ts";
import {
  type EchoServerArgs,
  echoServerArgs,
  echoServerFlags,
  runEchoServer,
} from "./echo_server.ts";
import { argsOrStatus, oneLine, type Parsed, parseFlags } from "./_command_line.ts";

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
  --batch           take the frames of each read in one step (batch(framing))
  -h, --help        print this help and exit`;

/** The settings given on the command line. */
export interface TlsEchoServerArgs extends EchoServerArgs {
  cert: string;
  key: string;
  alpn: string[];
  clientCa?: string;
}

/** Parse the server's command line; never throws. */
export function parseTlsEchoServerArgs(argv: string[]): Parsed<TlsEchoServerArgs> {
  const flags = parseFlags(argv, {
    ...echoServerFlags(DEFAULT_TLS_PORT),
    cert: { type: "string" },
    key: { type: "string" },
    alpn: { type: "string" },
    "client-ca": { type: "string" },
  });
  if (flags.kind !== "flags") return flags;
  const { values } = flags;
  const alpn = values.alpn === undefined ? [] : values.alpn.split(",");
  const common = echoServerArgs(
    values,
    () =>
      (values.cert === undefined) !== (values.key === undefined)
        ? "--cert and --key go together: give both, or neither"
        : values.cert === "" || values.key === "" || values["client-ca"] === ""
        ? "--cert, --key and --client-ca take a file name"
        : alpn.some((p) => p === "")
        ? `--alpn must be protocol names separated by commas`
        : undefined,
  );
  if (common.kind !== "run") return common;
  const args: TlsEchoServerArgs = {
    ...common.args,
    cert: values.cert ?? DEFAULT_CERT,
    key: values.key ?? DEFAULT_KEY,
    alpn,
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
  return await runEchoServer("tls_echo_server", args, transport);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
