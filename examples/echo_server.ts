/**
 * An echo server: every frame is sent back as it came.
 *
 *     deno run -A examples/echo_server.ts [--port 7001] [--hostname 127.0.0.1]
 *       [--framing len4|line|raw] [--hibernate] [--sync] [--batch]
 *
 * `--hibernate` makes each connection hibernate between frames; `--batch` hands the handler the
 * frames of each read together (`batch(framing)`: one step per read); `--sync` runs the plain
 * `function*` handler (no promise per step) instead of the `async function*` one. Frames of the
 * byte framings are lent for one step (`lend: true`: sent back at once, kept nowhere). The default
 * port, 7001, leaves 7000 to the chat example. Once listening it prints
 * `listening on HOST:PORT`; SIGINT or SIGTERM stops it gracefully (exit 0). `--help` prints the
 * usage; a bad flag exits 2 with the usage on stderr; failing to listen exits 1.
 *
 * @module
 */

import {
  batch,
  type Event,
  type Framing,
  hibernate,
  lengthPrefixed,
  lines,
  raw,
  send,
  serve,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { stopOnSignals } from "./_stop_on_signals.ts";
import {
  argsOrStatus,
  type FlagValues,
  oneLine,
  type Parsed,
  parseFlags,
} from "./_command_line.ts";

/** Echo every frame; end on disconnect or shutdown. */
export async function* echo(): AsyncGenerator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    switch (ev.type) {
      case "packet":
        ev = yield send(ev.data);
        break;
      case "disconnect":
      case "shutdown":
        return;
      default:
        ev = yield;
    }
  }
}

/** The same as {@linkcode echo}, as a plain generator. */
export function* echoSync(): Generator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    switch (ev.type) {
      case "packet":
        ev = yield send(ev.data);
        break;
      case "disconnect":
      case "shutdown":
        return;
      default:
        ev = yield;
    }
  }
}

/** Echo one frame, then hibernate until the next event. */
export async function* echoHibernating(): AsyncGenerator<Yielded, void, Event> {
  const ev = yield; // the event that woke us
  if (ev.type === "disconnect" || ev.type === "shutdown") return;
  if (ev.type === "packet") yield [send(ev.data), hibernate()];
  else yield hibernate();
}

/**
 * The framings selectable with `--framing`. The byte framings lend their frames (`lend: true`):
 * an echo sends each frame back within its step and keeps nothing, so it needs no frame of its
 * own, and saves an allocation per frame.
 */
export const framings: Record<string, () => Framing<unknown>> = {
  len4: () => lengthPrefixed(4, { lend: true }) as Framing<unknown>,
  line: () => lines() as Framing<unknown>,
  raw: () => raw({ lend: true }) as Framing<unknown>,
};

/** The port the example listens on by default (the chat example has 7000). */
export const DEFAULT_PORT = 7001;

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/echo_server.ts [options]

Echo every frame back to its sender. Prints "listening on HOST:PORT" once listening;
SIGINT or SIGTERM stops it.

  --port N          port to listen on, 0 for any free one (default ${DEFAULT_PORT})
  --hostname HOST   address to bind (default 127.0.0.1)
  --framing NAME    len4 (4-byte length prefix, the default), line or raw
  --hibernate       hibernate each connection between frames
  --sync            run the plain function* handler instead of the async one
  --batch           take the frames of each read in one step (batch(framing))
                    (--hibernate wins if both are given)
  -h, --help        print this help and exit`;

/** The settings given on the command line. */
export interface EchoServerArgs {
  port: number;
  hostname: string;
  framing: string;
  hibernate: boolean;
  sync: boolean;
  batch: boolean;
}

/**
 * The flags both echo servers take (examples/tls_echo_server.ts adds its own), for
 * {@linkcode parseFlags}; `--port` defaults to `port`.
 */
export function echoServerFlags(port: number) {
  return {
    port: { type: "string", default: String(port) },
    hostname: { type: "string", default: "127.0.0.1" },
    framing: { type: "string", default: "len4" },
    hibernate: { type: "boolean", default: false },
    sync: { type: "boolean", default: false },
    batch: { type: "boolean", default: false },
  } as const;
}

/**
 * The settings both echo servers take, from the values of their {@linkcode echoServerFlags}, or
 * what is wrong with them. `check` looks at a server's own flags, after `--port` and
 * `--hostname` and before `--framing`, and says what is wrong with them, if anything.
 */
export function echoServerArgs(
  values: FlagValues<ReturnType<typeof echoServerFlags>>,
  check: () => string | undefined = () => undefined,
): Parsed<EchoServerArgs> {
  const port = /^\d{1,5}$/.test(values.port) ? Number(values.port) : NaN;
  if (!(port <= 65535)) {
    return {
      kind: "usage",
      error: `--port must be an integer from 0 to 65535, not "${values.port}"`,
    };
  }
  if (values.hostname === "") return { kind: "usage", error: "--hostname must not be empty" };
  const error = check();
  if (error !== undefined) return { kind: "usage", error };
  if (!Object.hasOwn(framings, values.framing)) {
    return { kind: "usage", error: `--framing must be len4, line or raw, not "${values.framing}"` };
  }
  return {
    kind: "run",
    args: {
      port,
      hostname: values.hostname,
      framing: values.framing,
      hibernate: values.hibernate,
      sync: values.sync,
      batch: values.batch,
    },
  };
}

/** Parse the server's command line; never throws. */
export function parseEchoServerArgs(argv: string[]): Parsed<EchoServerArgs> {
  const flags = parseFlags(argv, echoServerFlags(DEFAULT_PORT));
  return flags.kind === "flags" ? echoServerArgs(flags.values) : flags;
}

/**
 * Serve the echo handler `args` choose over `transport` (default: TCP) until SIGINT or SIGTERM,
 * printing `listening on HOST:PORT` once listening. Resolves with the exit status: 0 after a
 * graceful stop, 1 if it cannot listen (after one line on stderr, starting with `name: `).
 */
export async function runEchoServer(
  name: string,
  args: EchoServerArgs,
  transport?: Transport,
): Promise<number> {
  const handler = args.hibernate ? echoHibernating : args.sync ? echoSync : echo;
  const framing = framings[args.framing]();
  const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
  let server;
  try {
    // (The echo handlers send back whatever came: a batch goes back as a batch.)
    server = await serve(handler, {
      port: args.port,
      hostname: args.hostname,
      framing: args.batch ? batch(framing) as Framing<unknown> : framing,
      transport,
      maxConnections: Infinity,
      onListen(addr) {
        if (addr.transport === "tcp") console.log(`listening on ${addr.hostname}:${addr.port}`);
      },
    });
  } catch (err) {
    console.error(`${name}: cannot listen on ${args.hostname}:${args.port}: ${oneLine(err)}`);
    stop.remove();
    return 1;
  }
  await stop.until(server);
  return 0;
}

/**
 * Run the example with command-line `argv`; resolves with the exit status: 0 after a graceful
 * stop or `--help`, 1 if it cannot listen, 2 for a bad command line.
 */
async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("echo_server", parseEchoServerArgs(argv), USAGE);
  if (typeof args === "number") return args;
  return await runEchoServer("echo_server", args);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
