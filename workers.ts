/**
 * Many cores, one command: {@linkcode serveWorkers} runs a handler module on N `Worker`s that
 * share one port, each Worker a node of one {@linkcode KvRegistry}, so that `call`, `lookup`,
 * `list` and names work across them exactly as across processes. The `deno serve --parallel`
 * of TCP: a Deno process runs handlers on one thread; Erlang's etcp uses every core.
 *
 * A handler module's default export is the handler; it may export `options`, the
 * {@linkcode WorkerServeOptions} of its server; {@linkcode workerContext} gives it its Worker's
 * registry node. From the command line:
 *
 *     deno run -A --unstable-kv --unstable-net jsr:@etcp/etcp/workers handler.ts --workers 4 --port 7000
 *
 * @module
 */

import { loggerOf } from "./_logger.ts";
import { pathToFileURL } from "node:url";
import { resolve } from "node:path";
import type { Logger } from "./connection.ts";
import { describeValue, RegistryUnavailable } from "./errors.ts";
import { KvRegistry } from "./kv_registry.ts";
import type { ServeOptions } from "./server.ts";
import { Backoff, backoffSettings, checkReconnect, type ReconnectOptions } from "./_backoff.ts";
import { checkRegistryPeriods, OptionCheck } from "./_options.ts";
import { clearTimer, startTimer, type Timer } from "./_timer.ts";
import { withTimeout } from "./_with_timeout.ts";
import {
  type FromWorker,
  getWorkerContext,
  receiveError,
  type ToWorker,
  type WorkerConfig,
  type WorkerRegistryOptions,
} from "./_worker_protocol.ts";

export type { WorkerRegistryOptions } from "./_worker_protocol.ts";

/**
 * The options a handler module run by {@linkcode serveWorkers} exports as `options`: those of
 * `serve()`, but `registry` (every Worker is a node of the shared {@linkcode KvRegistry}) and
 * `reusePort` (always on). `port` and `hostname` are defaults that `serveWorkers`' own options
 * override. A `transport` must be one that listens with `reusePort` (`tcp()`, `tls()`): any
 * other is refused.
 */
export type WorkerServeOptions<T = Uint8Array> = Omit<ServeOptions<T>, "registry" | "reusePort">;

/** Where a handler module runs (see {@linkcode workerContext}). */
export interface WorkerContext {
  /** This Worker's node of the shared registry: `list`, `lookup` see every Worker's connections. */
  readonly registry: KvRegistry;
  /** This Worker's index, from 0. */
  readonly worker: number;
  /** How many Workers serve the module. */
  readonly workers: number;
}

/**
 * The context of the Worker a handler module runs in: its node of the shared registry, its
 * index and the number of Workers. Call it in the handler module (at its top level, say): the
 * registry is open before the module is imported. Throws an `Error` outside a Worker of
 * {@linkcode serveWorkers}.
 *
 * @example A handler module: the handler, its options, and its Worker's context
 * ```ts
 * import assert from "node:assert/strict";
 * import { type HandlerGenerator, lines, send, workerContext } from "./mod.ts";
 * import type { WorkerServeOptions } from "./mod.ts";
 *
 * // node_echo.ts, served by `deno run -A workers.ts node_echo.ts --workers 2`.
 * export const options: WorkerServeOptions<string> = { framing: lines(), name: "node-echo" };
 *
 * export default async function* nodeEcho(): HandlerGenerator<string> {
 *   const { registry, worker } = workerContext();
 *   for (let ev = yield send(`worker ${worker}, node ${registry.node}`); ev.type === "packet";) {
 *     ev = yield send(ev.data);
 *   }
 * }
 *
 * // Outside a Worker of serveWorkers, there is no context.
 * assert.throws(() => workerContext(), /not in a Worker of serveWorkers/);
 * ```
 */
export function workerContext(): WorkerContext {
  const context = getWorkerContext();
  if (context === undefined) {
    throw new Error(
      "workerContext(): not in a Worker of serveWorkers (run the module with serveWorkers, " +
        "or `deno run -A workers.ts MODULE`)",
    );
  }
  return context;
}

/**
 * The state of one Worker: `"starting"` (opening its registry node, importing the module,
 * listening), `"running"`, `"restarting"` (it died; waiting the backoff), `"stopping"`,
 * `"stopped"`, or `"failed"` (it died and restarting gave up).
 */
export type WorkerState =
  | "starting"
  | "running"
  | "restarting"
  | "stopping"
  | "stopped"
  | "failed";

/** What {@linkcode WorkerGroup.workers} reports of one Worker. */
export interface WorkerInfo {
  /** Its index, from 0. */
  index: number;
  /** Its node in the registry (a restarted Worker is a new node: `…-w0.1`, `…-w0.2`). */
  node: string;
  /** What it is doing. */
  state: WorkerState;
  /** How many times it was restarted. */
  restarts: number;
}

/** Options of {@linkcode serveWorkers}. */
export interface ServeWorkersOptions {
  /** How many Workers (default: `navigator.hardwareConcurrency`, the CPU cores). */
  workers?: number;
  /** The shared port (default: the module's `options.port`, else 0: any free port). */
  port?: number;
  /** The address to bind (default: the module's `options.hostname`, else every address). */
  hostname?: string;
  /**
   * The KV store every Worker's registry node opens: a file path or a KV Connect URL (default:
   * a file in a temporary directory made for this run, removed by `stop()`). `":memory:"`
   * cannot be shared between Workers and is refused.
   */
  kv?: string;
  /** The registry namespace (default `"workers"`). */
  namespace?: string;
  /** The cluster secret of the node links (default: the one kept in the namespace). */
  secret?: string | Uint8Array;
  /** The registry's tuning, for every Worker's node (`heartbeatMs`, `nodeTtlMs`, `batchMs`, `link`). */
  registry?: WorkerRegistryOptions;
  /**
   * Worker `i` is node `${nodePrefix}${i}` (default: `"${Deno.pid}-w"`, so `4242-w0`); its
   * restarts are `…-w0.1`, `…-w0.2`, ….
   */
  nodePrefix?: string;
  /**
   * Restart a Worker that dies (an uncaught error, `Deno.exit()`, no answer to pings for
   * `nodeTtlMs`), after a backoff (default `true`: 1 s, then × 1.6 up to 30 s, ± 20 %; see
   * `ReconnectOptions`); `false` leaves it dead.
   */
  restart?: boolean | ReconnectOptions;
  /** Ms a Worker may take to start (default 30000); past it, it counts as dead. */
  startTimeout?: number;
  /**
   * Ms a Worker may take to stop (its connections' `shutdown`, leaving the registry) before it
   * is terminated (default 10000).
   */
  stopTimeout?: number;
  /** Where Worker deaths and restarts are reported (default `console`). */
  logger?: Logger;
}

/** The Workers {@linkcode serveWorkers} started: where they listen, how they are, and `stop()`. */
export interface WorkerGroup extends AsyncDisposable {
  /** The shared address (the first Worker's, with the port it took if 0 was asked for). */
  readonly addr: Deno.NetAddr;
  /** The KV store of the registry (the temporary file's path unless `kv` was given). */
  readonly kv: string;
  /** The registry namespace. */
  readonly namespace: string;
  /** Resolves once `stop()` has finished. */
  readonly finished: Promise<void>;
  /** Each Worker's index, node, state and restarts. */
  workers(): WorkerInfo[];
  /**
   * Stop every Worker: each stops its server (`shutdown` to every connection, forced after
   * their `shutdownTimeout`) and leaves the registry; one that takes longer than `stopTimeout`
   * is terminated and its node removed. Removes a temporary KV store. Resolves when done.
   */
  stop(): Promise<void>;
}

/**
 * Serve the handler module `module` on `workers` Workers sharing one port (SO_REUSEPORT: each
 * Worker listens itself; the system spreads connections over them), each a node of one
 * {@linkcode KvRegistry} in the store `kv`: `registry.list()`, `lookup()`, `call` and names
 * work across Workers as across processes. Resolves once every Worker listens; rejects (with
 * nothing left running) if one cannot start: a module that does not load, a default export that
 * is not a handler, a port in use…
 *
 * A Worker that dies is terminated and its node removed from the registry at once (its
 * connections leave `list()`, requests to them fail with `NodeDown`), then it is started again
 * as a new node after the `restart` backoff. Needs `--unstable-kv` and `--unstable-net` (or
 * `"unstable": ["kv", "net"]` in deno.json), and the permissions the module needs (Workers
 * inherit this process's).
 *
 * `module` is a URL or a path (relative to the working directory). Deno's `terminate()` does not
 * stop a Worker stuck in a loop (denoland/deno#35657): one that stops answering is replaced, but
 * its thread and sockets live on until its loop ends.
 *
 * @example The chat example's handler module on two Workers, each a node of one registry
 * ```ts
 * import assert from "node:assert/strict";
 * import { serveWorkers } from "./mod.ts";
 *
 * const chat = new URL("./examples/chat_workers.ts", import.meta.url);
 * await using group = await serveWorkers(chat, { workers: 2, port: 0, hostname: "127.0.0.1" });
 * assert.deepEqual(group.workers().map((w) => w.state), ["running", "running"]);
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: group.addr.port });
 * const welcome = new Uint8Array(100);
 * await conn.read(welcome);
 * assert.match(new TextDecoder().decode(welcome), /^\* welcome!/);
 * conn.close();
 * await group.stop(); // each Worker stops its server and leaves the registry
 * ```
 */
export async function serveWorkers(
  module: string | URL,
  options: ServeWorkersOptions = {},
): Promise<WorkerGroup> {
  checkOptions(options);
  const url = moduleUrl(module);
  if (typeof Deno.openKv !== "function") {
    throw new RegistryUnavailable(
      'serveWorkers needs Deno KV: run with --unstable-kv (or "unstable": ["kv"] in deno.json)',
    );
  }
  let tempDir: string | undefined;
  let kv = options.kv;
  if (kv === undefined) {
    tempDir = await Deno.makeTempDir({ prefix: "etcp-workers-" });
    kv = `${tempDir}/registry.sqlite`;
  }
  const group = new Supervisor(url, kv, tempDir, options);
  try {
    await group.start();
  } catch (err) {
    await group.stop();
    throw err;
  }
  return group;
}

let groups = 0;

interface Slot {
  readonly index: number;
  /** Its first node name; restart n is `${base}.${n}`. */
  readonly base: string;
  node: string;
  state: WorkerState;
  restarts: number;
  worker?: Worker;
  /** performance.now() of its last message: a Worker silent for nodeTtlMs is dead. */
  lastSeen: number;
  /** Settles when the current run listens (or fails to). */
  listening?: PromiseWithResolvers<Deno.NetAddr>;
  /** Settles when the current run has stopped cleanly (or died while stopping). */
  stopped?: PromiseWithResolvers<void>;
  startTimer?: Timer;
  restartTimer?: Timer;
  readonly backoff?: Backoff;
}

const enum Phase {
  Starting,
  Running,
  Stopping,
}

// The parent's side: starts, pings, restarts and stops the Workers.
class Supervisor implements WorkerGroup {
  readonly kv: string;
  readonly namespace: string;
  readonly finished: Promise<void>;
  #addr: Deno.NetAddr | undefined;
  readonly #module: string;
  readonly #tempDir: string | undefined;
  readonly #options: ServeWorkersOptions;
  readonly #slots: Slot[] = [];
  readonly #heartbeatMs: number;
  readonly #ttlMs: number;
  readonly #logger: Logger;
  #phase = Phase.Starting;
  // Rejected by a Worker's death while starting (start() races it; nothing waits on it after).
  readonly #startFailed = Promise.withResolvers<never>();
  #pinger: ReturnType<typeof setInterval> | undefined;
  #store: Promise<Deno.Kv> | undefined; // opened on the first eviction
  readonly #evictions = new Set<Promise<void>>();
  #stopping: Promise<void> | undefined;
  readonly #finished = Promise.withResolvers<void>();

  constructor(
    module: string,
    kv: string,
    tempDir: string | undefined,
    options: ServeWorkersOptions,
  ) {
    this.#module = module;
    this.#startFailed.promise.catch(() => {}); // (handled by start()'s races)
    this.kv = kv;
    this.#tempDir = tempDir;
    this.#options = options;
    this.namespace = options.namespace ?? "workers";
    this.finished = this.#finished.promise;
    this.#heartbeatMs = options.registry?.heartbeatMs ?? 1000;
    this.#ttlMs = options.registry?.nodeTtlMs ?? Math.max(5000, 2 * this.#heartbeatMs);
    this.#logger = loggerOf(options.logger);
    const count = options.workers ?? navigator.hardwareConcurrency;
    const prefix = options.nodePrefix ?? `${Deno.pid}${++groups > 1 ? `.${groups}` : ""}-w`;
    const backoff = backoffSettings(options.restart, true);
    for (let index = 0; index < count; index++) {
      this.#slots.push({
        index,
        base: `${prefix}${index}`,
        node: `${prefix}${index}`,
        state: "starting",
        restarts: 0,
        lastSeen: 0,
        backoff: backoff && new Backoff(backoff),
      });
    }
  }

  get addr(): Deno.NetAddr {
    return { ...this.#addr! };
  }

  workers(): WorkerInfo[] {
    return this.#slots.map(({ index, node, state, restarts }) => ({
      index,
      node,
      state,
      restarts,
    }));
  }

  // The first Worker picks the port (if 0 was asked for), then the others join it. A Worker that
  // dies before all are listening fails the start, even one that was listening already.
  async start(): Promise<void> {
    this.#pinger = setInterval(() => this.#ping(), this.#heartbeatMs);
    const failed = this.#startFailed.promise;
    const [first, ...others] = this.#slots;
    this.#addr = await Promise.race([this.#launch(first), failed]);
    await Promise.race([Promise.all(others.map((slot) => this.#launch(slot))), failed]);
    if (this.#phase === Phase.Starting) this.#phase = Phase.Running;
  }

  stop(): Promise<void> {
    return this.#stopping ??= this.#stop();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  // Start a Worker for `slot`; resolves with its address once it listens.
  #launch(slot: Slot): Promise<Deno.NetAddr> {
    const listening = slot.listening = Promise.withResolvers<Deno.NetAddr>();
    listening.promise.catch(() => {}); // a restart's failure is handled by #died
    slot.state = "starting";
    slot.lastSeen = performance.now();
    const worker = slot.worker = new Worker(new URL("./_worker_entry.ts", import.meta.url), {
      type: "module",
      name: slot.node,
    });
    worker.onmessage = (event: MessageEvent<FromWorker>) => {
      if (slot.worker === worker) this.#heard(slot, event.data);
    };
    worker.onerror = (event) => {
      event.preventDefault(); // the parent lives on (the entry reports its errors as "crashed")
      if (slot.worker === worker) this.#died(slot, new Error(event.message)); // "Uncaught …"
    };
    worker.onmessageerror = () => {};
    const config: WorkerConfig = {
      module: this.#module,
      kv: this.kv,
      namespace: this.namespace,
      node: slot.node,
      secret: this.#options.secret,
      registry: this.#options.registry ?? {},
      // The first Worker: the port asked for (or the module's); the others: the one it took.
      port: this.#addr?.port ?? this.#options.port,
      hostname: this.#options.hostname,
      worker: slot.index,
      workers: this.#slots.length,
    };
    worker.postMessage({ kind: "start", config } satisfies ToWorker);
    const startTimeout = this.#options.startTimeout ?? 30_000;
    slot.startTimer = startTimer(
      () => this.#died(slot, new Error(`not listening after ${startTimeout} ms`)),
      startTimeout,
    );
    return listening.promise;
  }

  #heard(slot: Slot, message: FromWorker): void {
    slot.lastSeen = performance.now();
    switch (message.kind) {
      case "listening": {
        if (slot.state !== "starting") return;
        clearTimer(slot.startTimer);
        slot.state = "running";
        slot.backoff?.up();
        if (slot.restarts > 0) {
          this.#logger.warn(`etcp: serveWorkers: worker ${slot.index} is back as ${slot.node}`);
        }
        slot.listening?.resolve({
          transport: "tcp",
          hostname: message.hostname,
          port: message.port,
        });
        return;
      }
      case "failed":
        this.#died(slot, receiveError(message.error, `worker ${slot.index} (${slot.node})`));
        return;
      case "crashed":
        this.#died(
          slot,
          receiveError(message.error, `worker ${slot.index} (${slot.node}), uncaught`),
        );
        return;
      case "exited":
        this.#died(slot, new Error("it called Deno.exit()"));
        return;
      case "stopped":
        slot.stopped?.resolve();
        return;
      case "pong":
        return;
    }
  }

  // A Worker died (or is taken for dead): terminate it, remove its node from the registry at
  // once, and restart it after the backoff; while starting the group, fail the start instead.
  #died(slot: Slot, reason: Error): void {
    const worker = slot.worker;
    if (worker === undefined) return;
    slot.worker = undefined;
    clearTimer(slot.startTimer);
    worker.terminate();
    this.#evict(slot.node);
    const was = slot.state;
    if (was === "stopping") {
      slot.stopped?.reject(reason);
      return;
    }
    slot.listening?.reject(reason);
    if (this.#phase !== Phase.Running) {
      slot.state = "stopped";
      if (this.#phase === Phase.Starting) {
        this.#startFailed.reject(
          new Error(`worker ${slot.index} (${slot.node}) died while the group started`, {
            cause: reason,
          }),
        );
      }
      return;
    }
    if (was === "running") slot.backoff?.ended();
    const delay = slot.backoff?.next();
    if (delay === undefined) {
      slot.state = "failed";
      this.#logger.error(
        `etcp: serveWorkers: worker ${slot.index} (${slot.node}) died, not restarted:`,
        reason,
      );
      return;
    }
    slot.state = "restarting";
    this.#logger.error(
      `etcp: serveWorkers: worker ${slot.index} (${slot.node}) died; restarting in ${
        Math.round(delay)
      } ms:`,
      reason,
    );
    slot.restartTimer = startTimer(() => {
      slot.restartTimer = undefined;
      slot.restarts++;
      slot.node = `${slot.base}.${slot.restarts}`;
      this.#launch(slot);
    }, delay);
  }

  // Every heartbeat: ping each live Worker; one silent for nodeTtlMs (its registry node is
  // dead by then too) is terminated.
  #ping(): void {
    const now = performance.now();
    for (const slot of this.#slots) {
      if (slot.worker === undefined || slot.state !== "running") continue;
      if (now - slot.lastSeen > this.#ttlMs) {
        // Deno's terminate() does not stop a thread stuck in a loop (denoland/deno#35657): it runs
        // on, with its sockets, until its code yields. Say so; the replacement starts anyway.
        this.#died(
          slot,
          new Error(
            `no answer to pings for ${this.#ttlMs} ms; if it is stuck in a loop, Deno cannot ` +
              "stop it: it keeps its listening socket (and a share of new connections) until " +
              "its code yields",
          ),
        );
      } else slot.worker.postMessage({ kind: "ping" } satisfies ToWorker);
    }
  }

  // Remove `node`'s entry from the registry: every node leaves its connections out at once,
  // and a live one sweeps them.
  #evict(node: string): void {
    const evicting = (async () => {
      try {
        this.#store ??= Deno.openKv(this.kv);
        await KvRegistry.evict(await this.#store, this.namespace, node);
      } catch (err) {
        this.#logger.error(`etcp: serveWorkers: removing node ${node} failed:`, err);
      }
    })().finally(() => this.#evictions.delete(evicting));
    this.#evictions.add(evicting);
  }

  async #stop(): Promise<void> {
    this.#phase = Phase.Stopping;
    clearInterval(this.#pinger);
    await Promise.all(this.#slots.map((slot) => this.#stopSlot(slot)));
    await Promise.all([...this.#evictions]);
    if (this.#store !== undefined) (await this.#store.catch(() => undefined))?.close();
    if (this.#tempDir !== undefined) {
      await Deno.remove(this.#tempDir, { recursive: true }).catch(() => {});
    }
    this.#finished.resolve();
  }

  async #stopSlot(slot: Slot): Promise<void> {
    clearTimer(slot.restartTimer);
    clearTimer(slot.startTimer);
    const worker = slot.worker;
    if (worker === undefined) {
      if (slot.state !== "failed") slot.state = "stopped";
      return;
    }
    if (slot.state === "starting") {
      // Not listening yet (its import may never end): nothing to drain, so no stop to wait for.
      slot.worker = undefined;
      worker.terminate();
      this.#evict(slot.node);
      slot.state = "stopped";
      return;
    }
    slot.state = "stopping";
    slot.stopped = Promise.withResolvers<void>();
    worker.postMessage({ kind: "stop" } satisfies ToWorker);
    const stopTimeout = this.#options.stopTimeout ?? 10_000;
    try {
      await withTimeout(slot.stopped.promise, stopTimeout, `stopping worker ${slot.index}`);
    } catch (err) {
      this.#logger.error(`etcp: serveWorkers: worker ${slot.index} (${slot.node}):`, err);
      this.#evict(slot.node);
    }
    worker.terminate();
    slot.worker = undefined;
    slot.state = "stopped";
  }
}

// `module` as a URL: a URL as it is, a path from the working directory.
function moduleUrl(module: string | URL): string {
  if (module instanceof URL) return module.href;
  if (typeof module !== "string" || module === "") {
    throw new TypeError(
      `serveWorkers: the module must be a URL or a path, not ${describeValue(module)}`,
    );
  }
  // A scheme of two letters or more (one is a Windows drive: C:\…).
  if (/^[a-z][a-z0-9+.-]+:/i.test(module)) return new URL(module).href;
  return pathToFileURL(resolve(module)).href;
}

function checkOptions(options: ServeWorkersOptions): void {
  const check = new OptionCheck("serveWorkers", options);
  check.number("workers", 1, { integer: true });
  check.port("port");
  check.string("hostname");
  check.string("kv");
  check.string("namespace");
  check.string("nodePrefix");
  check.delay("startTimeout");
  check.delay("stopTimeout");
  check.methods("logger", ["error", "warn", "debug"], " (console fits)");
  checkReconnect("serveWorkers", options.restart, "restart");
  const o = options as Record<string, unknown>;
  if (o.kv === "" || o.kv === ":memory:") {
    throw new TypeError(
      `serveWorkers: option kv must be a file path or a KV Connect URL that every Worker can ` +
        `open, not ${describeValue(o.kv)} (a store of its own in each Worker)`,
    );
  }
  if (o.namespace === "") {
    throw new TypeError("serveWorkers: option namespace must not be empty");
  }
  const secret = o.secret;
  if (
    secret !== undefined &&
    !((typeof secret === "string" || secret instanceof Uint8Array) && secret.length > 0)
  ) {
    throw new TypeError(
      `serveWorkers: option secret must be a non-empty string or Uint8Array, not ${
        describeValue(secret)
      }`,
    );
  }
  if (o.registry === undefined) return;
  const registry = new OptionCheck("serveWorkers: registry", o.registry);
  checkRegistryPeriods(registry);
  const link = (o.registry as WorkerRegistryOptions).link;
  if (
    link?.port !== undefined && link.port !== 0 &&
    (options.workers ?? navigator.hardwareConcurrency) > 1
  ) {
    throw new RangeError(
      "serveWorkers: option registry.link.port must be 0 (each Worker's link takes a port of " +
        `its own), not ${link.port}`,
    );
  }
}

if (import.meta.main) {
  const { main } = await import("./_workers_cli.ts");
  Deno.exit(await main(Deno.args, serveWorkers));
}
