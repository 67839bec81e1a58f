// The command line of workers.ts: `deno run -A workers.ts MODULE [--workers N] [--port P] …`
// serves MODULE on N Workers until SIGINT or SIGTERM, then stops them cleanly.

import { parseArgs } from "node:util";
import type { serveWorkers, WorkerGroup } from "./workers.ts";

/** The usage text. */
export const USAGE = `usage: deno run -A --unstable-kv --unstable-net workers.ts MODULE [options]
  MODULE           a handler module: its default export is the handler, its export
                   "options" the server's options (see workerContext() for the registry)
  --workers N      Workers sharing the port (default: the CPU cores, ${navigator.hardwareConcurrency})
  --port N         the port (default: the module's options.port, else 0: any free port)
  --hostname H     the address to bind (default: the module's, else every address)
  --kv PATH        the registry's KV store, a file or a KV Connect URL (default: a
                   temporary file for this run)
  --namespace NS   the registry namespace (default "workers")
  -h, --help       this text
The cluster secret is ETCP_CLUSTER_SECRET if set (else the one kept in the namespace).`;

/**
 * Run the command line `args` with `serve` (workers.ts's serveWorkers, passed in: this module
 * is loaded by workers.ts as the main module, which it cannot import back while loading);
 * resolves with the exit status (0 after a signal's clean stop).
 */
export async function main(args: string[], serve: typeof serveWorkers): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        workers: { type: "string" },
        port: { type: "string" },
        hostname: { type: "string" },
        kv: { type: "string" },
        namespace: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    return usage(String((err as Error).message).split("\n", 1)[0]);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (positionals.length !== 1) return usage("give one MODULE");
  const workers = integer(values.workers, 1, 1024);
  if (workers === null) return usage("--workers: a number from 1 to 1024");
  const port = integer(values.port, 0, 65535);
  if (port === null) return usage("--port: a number from 0 to 65535");
  // Listening for the signals before the Workers listen: a supervisor may send SIGTERM the
  // moment "listening on" is printed, and a signal with no listener ends the process at once.
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
  let group: WorkerGroup | undefined;
  let stopAsked = false;
  const stop = () => {
    stopAsked = true;
    group?.stop();
  };
  for (const signal of signals) Deno.addSignalListener(signal, stop);
  try {
    try {
      group = await serve(positionals[0], {
        workers,
        port,
        hostname: values.hostname,
        kv: values.kv,
        namespace: values.namespace,
        secret: Deno.env.get("ETCP_CLUSTER_SECRET") || undefined,
      });
    } catch (err) {
      console.error(`workers: ${err instanceof Error ? `${err.name}: ${err.message}` : err}`);
      return 1;
    }
    const { hostname, port: taken } = group.addr;
    const count = group.workers().length;
    console.log(`listening on ${hostname.includes(":") ? `[${hostname}]` : hostname}:${taken}`);
    console.log(
      `${count} worker${count === 1 ? "" : "s"} of ${positionals[0]} (nodes ${
        group.workers().map((w) => w.node).join(", ")
      }), registry "${group.namespace}" in ${group.kv}`,
    );
    if (stopAsked) group.stop();
    await group.finished;
    return 0;
  } finally {
    for (const signal of signals) Deno.removeSignalListener(signal, stop);
  }
}

function usage(error: string): number {
  console.error(`workers: ${error}\n\n${USAGE}`);
  return 2;
}

// `text` as an integer in [min, max]; undefined if not given, null if not such a number.
function integer(text: string | undefined, min: number, max: number): number | undefined | null {
  if (text === undefined) return undefined;
  if (!/^\d{1,15}$/.test(text)) return null;
  const n = Number(text);
  return n >= min && n <= max ? n : null;
}
