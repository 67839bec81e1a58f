/**
 * The chat server (examples/chat_server.ts) run by several worker processes on one port, as one
 * chat: the workers share the port (SO_REUSEPORT: the system spreads connections over them) and
 * a KvRegistry in one KV file, so two people who land on different workers can `/msg` each
 * other, `/who` lists everyone, and a line for everyone reaches every worker's users.
 *
 *     deno run -A --unstable-kv --unstable-net examples/cluster.ts [--workers 2] [--port 7000]
 *       [--data data]
 *
 * The KV file is `DATA/cluster.sqlite` (the `data` folder is gitignored). Each worker is a node
 * of the registry named `worker-N`, its node link on 127.0.0.1; the cluster secret is
 * `ETCP_CLUSTER_SECRET` if set (else one kept in the KV file). SIGINT or SIGTERM stops every
 * worker, each leaving the registry cleanly. Killing one worker (`kill -9`) drops its users;
 * the others see them leave `/who` within the registry's node TTL (5 s).
 *
 * @module
 */

import { KvRegistry } from "../mod.ts";
import { chatServer } from "./chat_server.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags } from "./_command_line.ts";
import { onSignals, stopOnSignals } from "./_stop_on_signals.ts";

/** What the command line asks for. */
export interface ClusterArgs {
  /** Worker processes to start (default 2). */
  workers: number;
  /** The shared port (default 7000; 0: any free port, the first worker's). */
  port: number;
  /** The folder of the KV file (default `data`). */
  data: string;
  /** Run as worker N (set by the parent for its children). */
  worker?: number;
}

/** The usage text. */
export const USAGE = `usage: deno run -A --unstable-kv --unstable-net examples/cluster.ts [options]
  --workers N   worker processes sharing the port (default 2)
  --port N      the port (default 7000; 0: any free port)
  --data DIR    folder of the shared KV file cluster.sqlite (default data)
  -h, --help    this text`;

/** Parse the command line. */
export function parseClusterArgs(argv: string[]): Parsed<ClusterArgs> {
  const parsed = parseFlags(argv, {
    workers: { type: "string", default: "2" },
    port: { type: "string", default: "7000" },
    data: { type: "string", default: "data" },
    worker: { type: "string" },
  });
  if (parsed.kind !== "flags") return parsed;
  const { values } = parsed;
  const workers = integer(values.workers, 1, 64);
  if (workers === undefined) return { kind: "usage", error: "--workers: a number from 1 to 64" };
  const port = integer(values.port, 0, 65535);
  if (port === undefined) return { kind: "usage", error: "--port: a number from 0 to 65535" };
  const worker = values.worker === undefined ? undefined : integer(values.worker, 0, 63);
  if (values.worker !== undefined && worker === undefined) {
    return { kind: "usage", error: "--worker: a number from 0 to 63" };
  }
  return { kind: "run", args: { workers, port, data: values.data, worker } };
}

// One worker: a node of the registry, the chat server on the shared port.
async function runWorker(args: ClusterArgs & { worker: number }): Promise<void> {
  const registry = await KvRegistry.open(`${args.data}/cluster.sqlite`, {
    namespace: "chat",
    node: `worker-${args.worker}`,
    secret: Deno.env.get("ETCP_CLUSTER_SECRET") || undefined,
  });
  // A line for everyone also goes to the named users of the other workers, over their links.
  const relay = async (line: string) => {
    for (const entry of await registry.list({ owner: "chat" })) {
      if (entry.node === registry.node || entry.name === undefined) continue;
      (await registry.lookup(entry.id))?.send(line);
    }
  };
  const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
  const server = await chatServer({
    port: args.port,
    reusePort: true,
    registry,
    relay: (line) => relay(line).catch(() => {}),
    onListen: (addr) => {
      if (addr.transport === "tcp") {
        console.log(`worker ${args.worker} listening on ${addr.hostname}:${addr.port}`);
      }
    },
  });
  await stop.until(server);
  await registry.close();
}

// The parent: start the workers one by one (the first picks the port if it is 0), relay their
// output, and stop them all on a signal.
async function runCluster(args: ClusterArgs): Promise<number> {
  await Deno.mkdir(args.data, { recursive: true });
  const children: Deno.ChildProcess[] = [];
  let port = args.port;
  const stopAll = () => {
    for (const child of children) {
      try {
        child.kill("SIGTERM");
      } catch { /* exited already */ }
    }
  };
  const removeSignals = onSignals(stopAll);
  try {
    for (let i = 0; i < args.workers; i++) {
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          "--unstable-kv",
          "--unstable-net",
          new URL(import.meta.url).pathname,
          ...["--worker", `${i}`, "--port", `${port}`, "--data", args.data],
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "inherit",
      }).spawn();
      children.push(child);
      port = await relayOutput(child, i);
    }
    console.log(`chat cluster of ${args.workers} workers on port ${port}`);
    console.log(`talk to it with: nc localhost ${port}`);
    const statuses = await Promise.all(children.map((c) => c.status));
    return statuses.every((s) => s.success) ? 0 : 1;
  } catch (err) {
    console.error(`cluster: ${oneLine(err)}`);
    stopAll();
    await Promise.all(children.map((c) => c.status));
    return 1;
  } finally {
    removeSignals();
  }
}

// Print a worker's lines as they come; resolves with its port once it listens.
function relayOutput(child: Deno.ChildProcess, worker: number): Promise<number> {
  return new Promise((resolve, reject) => {
    (async () => {
      let buffered = "";
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        buffered += chunk;
        let newline: number;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          console.log(line);
          const listening = line.match(/^worker \d+ listening on \S+:(\d+)$/);
          if (listening) resolve(Number(listening[1]));
        }
      }
      reject(new Error(`worker ${worker} exited before listening`));
    })().catch(reject);
  });
}

if (import.meta.main) {
  const args = argsOrStatus("cluster", parseClusterArgs(Deno.args), USAGE);
  if (typeof args === "number") Deno.exit(args);
  if (args.worker !== undefined) await runWorker({ ...args, worker: args.worker });
  else Deno.exit(await runCluster(args));
}
