/**
 * A pool against the echo server: `--concurrency` callers make calls through `--size`
 * connections, and every second it prints the calls and failures of that second and a summary of
 * `pool.stats()`. Kill and restart the server while it runs to watch the pool back off and
 * reconnect.
 *
 *     deno run -A examples/pool_client.ts [--port 7001] [--hostname 127.0.0.1]
 *       [--size 4] [--concurrency 16] [--duration 0]
 *
 * The echo server answers frames, not calls: each pool connection's handler sends a call's
 * message as one frame and keeps the call's `from` in a FIFO queue; echoes come back in order,
 * so each one answers the oldest call waiting.
 *
 * Exits 0 after `--duration` seconds, or on SIGINT or SIGTERM (0 runs until then), once the pool
 * has stopped; 1 if the pool cannot start; 2 with the usage on stderr for a bad command line
 * (`--help` prints it).
 *
 * @module
 */

import {
  createPool,
  type Event,
  type From,
  lengthPrefixed,
  type PoolStats,
  reply,
  send,
  type Yielded,
} from "../mod.ts";
import { DEFAULT_PORT } from "./echo_server.ts";
import { onSignals } from "./_stop_on_signals.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags, QUIET } from "./_command_line.ts";

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/pool_client.ts [options]

Call an echo server (examples/echo_server.ts, --framing len4) through a pool of connections and
print, every second, the calls and failures of that second and the pool's stats. Kill and restart
the server meanwhile: the pool backs off and reconnects.

  --port N          the server's port (default ${DEFAULT_PORT})
  --hostname HOST   the server's address (default 127.0.0.1)
  --size N          connections in the pool, at least 1 (default 4)
  --concurrency N   callers, each making one call at a time, at least 1 (default 16)
  --duration SECS   seconds to run, 0 for until SIGINT or SIGTERM (default 0)
  -h, --help        print this help and exit

Exit status: 0 once stopped, 1 if the pool cannot start, 2 for a bad command line.`;

/** The settings given on the command line. */
export interface PoolClientArgs {
  port: number;
  hostname: string;
  size: number;
  concurrency: number;
  duration: number;
}

/** Parse the pool client's command line; never throws. */
export function parsePoolClientArgs(argv: string[]): Parsed<PoolClientArgs> {
  const flags = parseFlags(argv, {
    port: { type: "string", default: String(DEFAULT_PORT) },
    hostname: { type: "string", default: "127.0.0.1" },
    size: { type: "string", default: "4" },
    concurrency: { type: "string", default: "16" },
    duration: { type: "string", default: "0" },
  });
  if (flags.kind !== "flags") return flags;
  const { values } = flags;
  const port = integer(values.port, 1, 65535);
  const size = integer(values.size, 1, 10_000);
  const concurrency = integer(values.concurrency, 1, 1_000_000);
  const duration = integer(values.duration, 0);
  const error = port === undefined
    ? `--port must be an integer from 1 to 65535, not "${values.port}"`
    : size === undefined
    ? `--size must be an integer from 1 to 10000, not "${values.size}"`
    : concurrency === undefined
    ? `--concurrency must be an integer from 1 to 1000000, not "${values.concurrency}"`
    : duration === undefined
    ? `--duration must be an integer of at least 0 (seconds), not "${values.duration}"`
    : values.hostname === ""
    ? "--hostname must not be empty"
    : undefined;
  if (error !== undefined) return { kind: "usage", error };
  return {
    kind: "run",
    args: {
      port: port!,
      hostname: values.hostname,
      size: size!,
      concurrency: concurrency!,
      duration: duration!,
    },
  };
}

/**
 * A pool connection's handler: each call is sent as one frame; each echo answers the oldest call
 * still waiting (the server echoes in order). Calls still waiting when the connection ends fail
 * with `ConnectionClosed`.
 */
export async function* echoCalls(): AsyncGenerator<Yielded, void, Event<Uint8Array>> {
  const waiting: From[] = [];
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    if (ev.type === "call") {
      waiting.push(ev.from);
      ev = yield send(ev.message);
    } else if (ev.type === "packet" && waiting.length > 0) {
      ev = yield reply(waiting.shift()!, ev.data);
    } else ev = yield;
  }
}

/** `pool.stats()` in a few words: connections by state, reconnects and failures in all. */
export function summary(stats: PoolStats): string {
  const sum = (key: "up" | "connecting" | "backingOff" | "down") =>
    stats.addresses.reduce((n, a) => n + a[key], 0);
  let text = `up ${sum("up")}, connecting ${sum("connecting")}, backing-off ${
    sum("backingOff")
  }, down ${sum("down")}; reconnects ${stats.reconnects}, failures ${stats.failures}`;
  const lastError = stats.addresses.find((a) => a.lastError !== undefined)?.lastError;
  if (sum("up") === 0 && lastError !== undefined) text += ` (last error: ${oneLine(lastError)})`;
  return text;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Run the pool client until `--duration` is over or `stopped` resolves; print one line a second.
 * Resolves once the pool has stopped and every caller has returned.
 */
export async function poolClient(args: PoolClientArgs, stopped: Promise<void>): Promise<void> {
  const pool = await createPool(echoCalls, {
    addresses: [{ hostname: args.hostname, port: args.port }],
    size: args.size,
    framing: lengthPrefixed(4),
    reconnect: { initialDelay: 250, maxDelay: 2000 },
    logger: QUIET, // ends of connections show in the stats instead
  });
  let running = true;
  let calls = 0;
  let failures = 0;

  async function caller(id: number): Promise<void> {
    const message = new Uint8Array(8);
    const view = new DataView(message.buffer);
    view.setUint32(0, id);
    await pool.ready.catch(() => {}); // no calls to fail before a first connection is up
    for (let seq = 0; running; seq++) {
      view.setUint32(4, seq);
      try {
        const echo = await pool.call<Uint8Array>(message.slice());
        if (echo.length !== 8 || echo.some((b, i) => b !== message[i])) {
          throw new Error("wrong echo");
        }
        calls++;
      } catch {
        if (!running) return;
        failures++;
        // A pool with no connection up fails at once: wait, rather than spin.
        await sleep(100);
      }
    }
  }
  const callers = Array.from({ length: args.concurrency }, (_, i) => caller(i));

  const { promise: over, resolve: end } = Promise.withResolvers<void>();
  let seconds = 0;
  const ticker = setInterval(() => {
    seconds++;
    console.log(`${seconds}s: ${calls} calls/s, ${failures} failures/s; ${summary(pool.stats())}`);
    calls = failures = 0;
    if (seconds === args.duration) end();
  }, 1000);
  await Promise.race([over, stopped]);
  clearInterval(ticker);
  running = false;
  await pool.stop("shutdown", { timeout: 1000 });
  await Promise.all(callers);
}

/**
 * Run the example with command-line `argv`; resolves with the exit status: 0 once stopped (or
 * for `--help`), 1 if the pool cannot start, 2 for a bad command line.
 */
async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("pool_client", parsePoolClientArgs(argv), USAGE);
  if (typeof args === "number") return args;
  const { promise: stopped, resolve: stop } = Promise.withResolvers<void>();
  const removeListeners = onSignals(() => stop());
  try {
    await poolClient(args, stopped);
    return 0;
  } catch (err) {
    console.error(`pool_client: ${oneLine(err)}`);
    return 1;
  } finally {
    removeListeners();
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
