// The program each Worker of serveWorkers (workers.ts) runs: it joins the shared KvRegistry as
// its own node, imports the handler module (default export: the handler; `options`: its serve
// options), serves it on the shared port with reusePort (each Worker has its own listening
// socket; Linux spreads connections over them), answers the parent's pings, and on "stop"
// stops its server and leaves the registry cleanly before it closes.

import { KvRegistry } from "./kv_registry.ts";
import { serve, type ServeOptions, type Server } from "./server.ts";
import type { Handler } from "./actions.ts";
import { describeValue } from "./errors.ts";
import {
  type FromWorker,
  sendError,
  setWorkerContext,
  type ToWorker,
  type WorkerConfig,
} from "./_worker_protocol.ts";

interface WorkerScope {
  postMessage(message: FromWorker): void;
  onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
  close(): void;
}

const scope = globalThis as unknown as WorkerScope;

const enum Phase {
  Idle,
  Starting,
  Serving,
  Stopping,
  Stopped,
}

let phase = Phase.Idle;
let starting: Promise<void> = Promise.resolve();
let registry: KvRegistry | undefined;
let server: Server<unknown> | undefined;

scope.onmessage = (event) => {
  const message = event.data;
  switch (message.kind) {
    case "start":
      if (phase === Phase.Idle) starting = start(message.config);
      break;
    case "ping":
      scope.postMessage({ kind: "pong" });
      break;
    case "stop":
      stop();
      break;
  }
};

// Deno.exit() in a Worker ends only the Worker, and tells no one: say so.
globalThis.addEventListener("unload", () => {
  if (phase !== Phase.Stopped) scope.postMessage({ kind: "exited" });
});

// An error that escapes every handler (a throwing timer callback, a rejection nobody handles)
// ends the Worker: the parent hears it (and logs it with the group's logger), terminates this
// Worker and starts another. Prevented here, so that Deno does not print it to stderr as well.
globalThis.addEventListener("error", (event) => {
  event.preventDefault();
  crashed(event.error ?? event.message);
});
globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  crashed(event.reason);
});

function crashed(err: unknown): void {
  if (phase === Phase.Stopped) return;
  scope.postMessage({ kind: "crashed", error: sendError(err) });
}

async function start(config: WorkerConfig): Promise<void> {
  phase = Phase.Starting;
  try {
    registry = await KvRegistry.open(config.kv, {
      ...config.registry,
      namespace: config.namespace,
      node: config.node,
      secret: config.secret,
    });
    setWorkerContext({ registry, worker: config.worker, workers: config.workers });
    const { handler, options } = checkModule(config.module, await import(config.module));
    if (phase !== Phase.Starting) return; // stopped meanwhile
    server = await serve(handler, {
      ...options,
      port: config.port ?? options.port ?? 0,
      hostname: config.hostname ?? options.hostname,
      reusePort: true,
      registry,
    });
    if (phase !== Phase.Starting) return;
    phase = Phase.Serving;
    const addr = server.addr as Partial<Deno.NetAddr>;
    scope.postMessage({
      kind: "listening",
      hostname: addr.hostname ?? "",
      port: addr.port ?? 0,
    });
  } catch (err) {
    await leave();
    if (phase !== Phase.Starting) return; // stop() says "stopped"
    phase = Phase.Stopped;
    scope.postMessage({ kind: "failed", error: sendError(err) });
    scope.close();
  }
}

async function stop(): Promise<void> {
  if (phase >= Phase.Stopping) return;
  phase = Phase.Stopping;
  await starting;
  await leave();
  phase = Phase.Stopped;
  scope.postMessage({ kind: "stopped" });
  scope.close();
}

// Stop the server (its connections get `shutdown`), then leave the registry: this node's
// entries leave the store at once.
async function leave(): Promise<void> {
  try {
    await server?.stop();
  } catch (err) {
    console.error("etcp: worker: stopping the server failed:", err);
  }
  try {
    await registry?.close();
  } catch (err) {
    console.error("etcp: worker: leaving the registry failed:", err);
  }
}

// The handler module's default export and options, checked.
function checkModule(
  url: string,
  module: Record<string, unknown>,
): { handler: Handler; options: ServeOptions<unknown> } {
  const handler = module.default;
  if (typeof handler !== "function") {
    throw new TypeError(
      `serveWorkers: ${url} must export the handler as its default export ` +
        `(export default async function* (conn) {…}), not ${describeValue(handler)}`,
    );
  }
  const options = module.options ?? {};
  if (options === null || typeof options !== "object") {
    throw new TypeError(
      `serveWorkers: the options that ${url} exports must be an object, not ${
        describeValue(options)
      }`,
    );
  }
  if ((options as ServeOptions<unknown>).registry !== undefined) {
    throw new TypeError(
      `serveWorkers: the options of ${url} must not set registry: every Worker is a node of ` +
        "the shared KvRegistry (workerContext().registry)",
    );
  }
  const transport = (options as ServeOptions<unknown>).transport;
  if (transport !== undefined && transport.name !== "tcp" && transport.name !== "tls") {
    // (memory() would listen in each Worker's isolate alone, out of everyone's reach.)
    throw new TypeError(
      `serveWorkers: the options of ${url} must use a transport that shares a port between ` +
        `Workers (tcp() or tls()), not ${transport.name}`,
    );
  }
  return {
    handler: handler as Handler,
    options: options as ServeOptions<unknown>,
  };
}
