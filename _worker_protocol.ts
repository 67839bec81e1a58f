// What serveWorkers (workers.ts) and each of its Workers (_worker_entry.ts) say to each other,
// over postMessage; where a Worker keeps the context a handler module reads
// (`workerContext()`); and errors across the boundary (sent by name and message, made again on
// the other side with the same class where it is a known one).

import type { KvRegistry, KvRegistryOptions } from "./kv_registry.ts";
import { MalformedFrame, ProtocolError, RegistryUnavailable, TimeoutError } from "./errors.ts";

/** The registry options a Worker's node takes from serveWorkers (structured-cloneable ones). */
export type WorkerRegistryOptions = Pick<
  KvRegistryOptions,
  "heartbeatMs" | "nodeTtlMs" | "batchMs" | "link"
>;

/** What a Worker needs to start. */
export interface WorkerConfig {
  /** The handler module's URL. */
  module: string;
  /** The KV store every node opens (a path or KV Connect URL). */
  kv: string;
  namespace: string;
  node: string;
  secret?: string | Uint8Array;
  registry: WorkerRegistryOptions;
  /** undefined: the module's `options.port`, else 0. */
  port?: number;
  /** undefined: the module's `options.hostname`, else the server's default. */
  hostname?: string;
  /** This Worker's index, and how many there are. */
  worker: number;
  workers: number;
}

/** Parent → Worker. */
export type ToWorker =
  | { kind: "start"; config: WorkerConfig }
  | { kind: "ping" }
  | { kind: "stop" };

/** An error as it crosses: enough to make it again. */
export interface SentError {
  name: string;
  message: string;
  stack?: string;
}

/** Worker → parent. */
export type FromWorker =
  | { kind: "listening"; hostname: string; port: number }
  | { kind: "failed"; error: SentError }
  /** An uncaught error or unhandled rejection: the Worker is to be terminated. */
  | { kind: "crashed"; error: SentError }
  | { kind: "pong" }
  | { kind: "stopped" }
  /** Deno.exit() inside the Worker: it is gone. */
  | { kind: "exited" };

/** What a handler module run by serveWorkers learns of where it runs (see `workerContext`). */
export interface WorkerContextValue {
  registry: KvRegistry;
  worker: number;
  workers: number;
}

// A registered symbol: the same in every copy of this module that a Worker loads (the entry's
// and, say, the handler module's from another URL of the same package).
const CONTEXT = Symbol.for("etcp.workerContext");

/** Set this Worker's context, before the handler module is imported. */
export function setWorkerContext(context: WorkerContextValue): void {
  (globalThis as Record<symbol, unknown>)[CONTEXT] = context;
}

/** This Worker's context, or undefined outside a Worker of serveWorkers. */
export function getWorkerContext(): WorkerContextValue | undefined {
  return (globalThis as Record<symbol, unknown>)[CONTEXT] as WorkerContextValue | undefined;
}

/** `err` as it can cross postMessage. */
export function sendError(err: unknown): SentError {
  if (err instanceof Error) return { name: err.name, message: err.message, stack: err.stack };
  return { name: "Error", message: String(err) };
}

// Errors made again with their class: JavaScript's, Deno's, and this library's whose
// constructor takes just a message (others come back as an Error with their name).
const KNOWN: Record<string, new (message: string) => Error> = {
  Error,
  TypeError,
  RangeError,
  SyntaxError,
  ReferenceError,
  MalformedFrame,
  ProtocolError,
  RegistryUnavailable,
  TimeoutError,
};

/** The error `sent` describes, of the same class where it is a known one. */
export function receiveError(sent: SentError, where: string): Error {
  const message = `${where}: ${sent.message}`;
  const Known = KNOWN[sent.name] ??
    (Deno.errors as unknown as Record<string, new (message: string) => Error>)[sent.name];
  const err = Known !== undefined ? new Known(message) : new Error(message);
  if (Known === undefined) err.name = sent.name;
  if (sent.stack !== undefined) err.stack = sent.stack.replace(sent.message, message);
  return err;
}
