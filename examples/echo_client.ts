/**
 * A client for the echo server: sends `--count` length-prefixed frames one at a time, checks
 * each echo, and prints the round-trip rate.
 *
 *     deno run -A examples/echo_client.ts [--port 7001] [--hostname 127.0.0.1]
 *       [--count 1000] [--size 64] [--timeout 10000] [--tls [--ca FILE] [--servername NAME]]
 *       [--reconnect]
 *
 * `--tls` talks to examples/tls_echo_server.ts instead (port 7002 by default), trusting the
 * test CA unless `--ca` names another; `--ca` and `--servername` imply `--tls`. `--reconnect`
 * survives the server going away: the client reconnects with backoff (`connect`'s `reconnect`
 * option; it gives up after 10 failed reconnects in a row) and goes on from the frame in flight.
 *
 * Exits 0 once every echo came back intact; 1 with a one-line error if the server cannot be
 * reached, a frame is too large, an echo is wrong or late, or the connection ends before every
 * echo came back; 2 with the usage on stderr for a bad command line (`--help` prints it).
 *
 * @module
 */

import {
  connect,
  type Connection,
  type Event,
  lengthPrefixed,
  send,
  setTimeout,
  tls,
  type Yielded,
} from "../mod.ts";
import { DEFAULT_PORT } from "./echo_server.ts";
import { DEFAULT_CA, DEFAULT_TLS_PORT } from "./tls_echo_server.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags, QUIET } from "./_command_line.ts";

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/echo_client.ts [options]

Send --count frames of --size bytes to an echo server (examples/echo_server.ts, --framing len4),
one at a time, check every echo, and print the round-trip rate.

  --port N          the server's port (default ${DEFAULT_PORT}, ${DEFAULT_TLS_PORT} with --tls)
  --hostname HOST   the server's address (default 127.0.0.1)
  --count N         frames to send, at least 1 (default 1000)
  --size BYTES      bytes per frame, at least 4 (default 64)
  --timeout MS      how long the connect and each echo may take (default 10000)
  --tls             connect over TLS (examples/tls_echo_server.ts)
  --ca FILE         with TLS: trust the CA in FILE, PEM, besides the system's (default:
                    tests/fixtures/ca.crt, the CA of tls_echo_server.ts's default certificate)
  --servername NAME with TLS: the name to check the server's certificate against (default:
                    --hostname)
  --reconnect       when the connection drops (try restarting the server), reconnect with
                    backoff and go on from the frame in flight; give up after 10 failed
                    reconnects in a row
  -h, --help        print this help and exit

Exit status: 0 if every echo came back intact, 1 on failure, 2 for a bad command line.`;

/** The settings given on the command line. */
export interface EchoClientArgs {
  port: number;
  hostname: string;
  count: number;
  size: number;
  timeout: number;
  /** TLS (`--tls`, `--ca`, `--servername`); absent for plain TCP. */
  tls?: { ca: string; serverName?: string };
  /** `--reconnect`: go on across dropped connections; absent without it. */
  reconnect?: true;
}

/** Parse the client's command line; never throws. */
export function parseEchoClientArgs(argv: string[]): Parsed<EchoClientArgs> {
  const flags = parseFlags(argv, {
    port: { type: "string" },
    hostname: { type: "string", default: "127.0.0.1" },
    count: { type: "string", default: "1000" },
    size: { type: "string", default: "64" },
    timeout: { type: "string", default: "10000" },
    tls: { type: "boolean", default: false },
    ca: { type: "string" },
    servername: { type: "string" },
    reconnect: { type: "boolean", default: false },
  });
  if (flags.kind !== "flags") return flags;
  const { values } = flags;
  const useTls = values.tls || values.ca !== undefined || values.servername !== undefined;
  values.port ??= String(useTls ? DEFAULT_TLS_PORT : DEFAULT_PORT);
  const port = integer(values.port, 1, 65535);
  const count = integer(values.count, 1);
  const size = integer(values.size, 4);
  const timeout = integer(values.timeout, 1);
  const error = port === undefined
    ? `--port must be an integer from 1 to 65535, not "${values.port}"`
    : count === undefined
    ? `--count must be an integer of at least 1, not "${values.count}"`
    : size === undefined
    ? `--size must be an integer of at least 4 (the sequence number), not "${values.size}"`
    : timeout === undefined
    ? `--timeout must be an integer of at least 1 (ms), not "${values.timeout}"`
    : values.hostname === ""
    ? "--hostname must not be empty"
    : values.ca === ""
    ? "--ca must name a file"
    : values.servername === ""
    ? "--servername must not be empty"
    : undefined;
  if (error !== undefined) return { kind: "usage", error };
  const args: EchoClientArgs = {
    port: port!,
    hostname: values.hostname,
    count: count!,
    size: size!,
    timeout: timeout!,
  };
  if (useTls) {
    args.tls = { ca: values.ca ?? DEFAULT_CA };
    if (values.servername !== undefined) args.tls.serverName = values.servername;
  }
  if (values.reconnect) args.reconnect = true;
  return { kind: "run", args };
}

/** Frame `seq`: the sequence number (big-endian), then a pattern that depends on it. */
function frame(seq: number, size: number): Uint8Array {
  const data = new Uint8Array(size);
  new DataView(data.buffer).setUint32(0, seq);
  for (let i = 4; i < size; i++) data[i] = (seq + i) & 0xff;
  return data;
}

/**
 * Send `count` frames of `size` bytes one at a time and check each echo. Resolves with the time
 * taken once every echo came back; rejects if the connect fails, a frame cannot be sent, an
 * echo is wrong or takes over `timeout` ms, or the connection ends first (with `reconnect`:
 * if reconnecting gives up). Never hangs.
 */
export async function echoClient(args: EchoClientArgs): Promise<{ seconds: number }> {
  const { count, size, timeout } = args;
  let echoed = 0;
  const started = performance.now();
  let conn: Connection<Uint8Array>;
  let transport;
  if (args.tls !== undefined) {
    let ca: string;
    try {
      ca = Deno.readTextFileSync(args.tls.ca);
    } catch (err) {
      throw new Error(`cannot read the CA file ${args.tls.ca}: ${oneLine(err)}`);
    }
    transport = tls({ caCerts: [ca], serverName: args.tls.serverName });
  }
  try {
    conn = await connect(
      // With --reconnect, each new socket runs this again: it goes on from frame `echoed`.
      async function* (self): AsyncGenerator<Yielded, void, Event<Uint8Array>> {
        // The event timeout is re-armed with every send: it bounds the wait for each echo.
        let ev = yield [send(frame(echoed, size)), setTimeout(timeout)];
        for (;;) {
          if (ev.type === "packet") {
            const expected = frame(echoed, size);
            if (ev.data.length !== size || ev.data.some((b, i) => b !== expected[i])) {
              self.stop(); // a wrong echo ends it for good, reconnecting or not
              throw new Error(`echo ${echoed} does not match what was sent`);
            }
            if (++echoed === count) {
              self.stop(); // done: no reconnect after this end
              return;
            }
            ev = yield [send(frame(echoed, size)), setTimeout(timeout)];
          } else if (ev.type === "timeout") {
            throw new Error(`no echo of frame ${echoed} within ${timeout} ms`);
          } else if (ev.type === "disconnect" && args.reconnect) {
            return; // the client connects again, and a fresh run resends frame `echoed`
          } else if (ev.type === "disconnect" || ev.type === "shutdown") {
            const who = ev.type === "disconnect" ? "the server closed" : "something stopped";
            throw new Error(`${who} the connection after ${echoed} of ${count} echoes`);
          } else {
            ev = yield setTimeout(timeout); // any event cancels the event timeout: re-arm it
          }
        }
      },
      {
        hostname: args.hostname,
        port: args.port,
        framing: lengthPrefixed(4),
        transport,
        connectTimeout: timeout,
        reconnect: args.reconnect && { initialDelay: 100, maxDelay: 2000, maxAttempts: 10 },
        // Every abnormal end is the close reason, reported once by the caller: nothing to log.
        logger: QUIET,
      },
    );
  } catch (err) {
    throw new Error(`cannot connect to ${args.hostname}:${args.port}: ${oneLine(err)}`);
  }
  await conn.done; // rejects on an abnormal end (a frame too large, a reset)
  if (echoed !== count) throw new Error(`connection ended after ${echoed} of ${count} echoes`);
  return { seconds: (performance.now() - started) / 1000 };
}

/**
 * Run the example with command-line `argv`; resolves with the exit status: 0 if every echo came
 * back, 1 on failure, 2 for a bad command line (0 for `--help`).
 */
async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("echo_client", parseEchoClientArgs(argv), USAGE);
  if (typeof args === "number") return args;
  const { count } = args;
  try {
    const { seconds } = await echoClient(args);
    const rate = (count / seconds).toFixed(0);
    console.log(`${count} frames echoed in ${seconds.toFixed(2)} s (${rate}/s)`);
    return 0;
  } catch (err) {
    console.error(`echo_client: ${oneLine(err)}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
