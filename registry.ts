/**
 * Who is connected: the {@linkcode Registry} interface and {@linkcode MemoryRegistry}, the
 * per-process default.
 *
 * @module
 */

import type { Connection } from "./connection.ts";
import type { Addr } from "./transport/transport.ts";
import { epochToStamp, stampToEpoch } from "./_stats.ts";

/** What a registry knows of one connection. */
export interface RegistryEntry {
  /** The connection's id. */
  id: string;
  /** Its registered name, if any. */
  name?: string;
  /** The server, pool or client that owns it (its `name`). */
  owner: string;
  /** The process (node) it lives in. */
  node: string;
  /** What kind of owner it has. */
  kind: "server" | "client" | "pool";
  /** The peer's address. */
  remoteAddr: Addr;
  /** This end's address. */
  localAddr: Addr;
  /** When it started, in ms since the epoch. */
  startedAt: number;
}

/** Which entries {@linkcode Registry.list} returns; unset fields match all. */
export interface ListFilter {
  /** Only connections of this owner. */
  owner?: string;
  /** Only connections of this node. */
  node?: string;
  /** Only connections of this kind. */
  kind?: RegistryEntry["kind"];
  /** Only the connection registered under this name. */
  name?: string;
}

/** What a lookup returns: enough of a connection to talk to it. */
export type ConnectionRef = Pick<
  Connection,
  "id" | "name" | "call" | "cast" | "info" | "send" | "stop"
>;

/**
 * Keeps who is connected. Servers and clients add each connection when it starts and remove
 * it when it ends; `conn.register(name)` claims a unique name.
 */
export interface Registry {
  /** This process's node name, recorded in every entry it adds. */
  readonly node: string;
  /** Record a starting connection. */
  add(entry: RegistryEntry, conn: ConnectionRef): void | Promise<void>;
  /** Forget a connection (and free its name). */
  remove(id: string): void | Promise<void>;
  /**
   * Give connection `id` the name `name` if it is free (or already its own); its old name is
   * freed. Throws a `TypeError` for a name that is not a non-empty string, or that looks like
   * a connection id (see {@linkcode isConnectionId}).
   */
  claim(id: string, name: string): boolean | Promise<boolean>;
  /** The entries matching `filter`. */
  list(filter?: ListFilter): Promise<RegistryEntry[]>;
  /** Find a connection by id or name. */
  lookup(idOrName: string): Promise<ConnectionRef | undefined>;
}

/** A name for this process, unique enough to tell processes apart in a shared registry. */
export const localNode: string = `${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;

// What makes this module instance's connection ids unique across processes and workers: 8
// random base-36 digits (41 bits), so that processes sharing a registry (KvRegistry) never
// hand out the same id, however many there are at once.
const ID_SUFFIX = `.${randomBase36(8)}`;

let connections = 0;

/**
 * A new connection id, unique across processes: `c1.k3x9a0qz`, `c2.k3x9a0qz`, … (a counter
 * and this process's random part). Ids and registered names share {@linkcode Registry.lookup},
 * so no name may have this form (see {@linkcode isConnectionId}).
 */
export function newConnectionId(): string {
  return `c${++connections}${ID_SUFFIX}`;
}

/**
 * Whether `text` has the form of a connection id, which no name may have: `c` and digits,
 * optionally followed by a dot and lowercase letters and digits (`c7`, `c7.k3x9a0qz`).
 */
export function isConnectionId(text: string): boolean {
  return /^c[0-9]+(?:\.[0-9a-z]+)?$/.test(text);
}

function randomBase36(digits: number): string {
  const bytes = crypto.getRandomValues(new Uint8Array(digits));
  let out = "";
  for (const byte of bytes) out += (byte % 36).toString(36);
  return out;
}

/**
 * Throws a `TypeError` unless `name` may be registered: a non-empty string that does not look
 * like a connection id. For {@linkcode Registry.claim} implementations.
 */
export function checkName(name: unknown): asserts name is string {
  if (typeof name !== "string") {
    throw new TypeError(`a registered name must be a string, not ${typeof name}`);
  }
  if (name === "") throw new TypeError("a registered name must not be empty");
  if (isConnectionId(name)) {
    throw new TypeError(
      `name "${name}" looks like a connection id; ids and names share lookup()`,
    );
  }
}

/**
 * A registry in this process's memory: the default for servers and clients that name none.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, memory, MemoryRegistry, serve } from "./mod.ts";
 * const registry = new MemoryRegistry();
 * const transport = memory("registry-doc");
 * const server = await serve(async function* (conn) {
 *   await conn.register("alice");
 *   yield;
 * }, { transport, registry, name: "chat" });
 * const client = await connect(async function* () {
 *   yield;
 * }, { transport });
 * // The server's handler registers on its own schedule: wait for it, but not forever.
 * for (let i = 0; i < 1000 && !(await registry.lookup("alice")); i++) {
 *   await new Promise((r) => setTimeout(r, 1));
 * }
 * const [entry] = await registry.list({ owner: "chat" });
 * assert.equal(entry.name, "alice");
 * assert.equal((await registry.lookup("alice"))?.id, entry.id);
 * await client.stop();
 * await server.stop();
 * ```
 */
export class MemoryRegistry implements Registry {
  /** This process's node name. */
  readonly node: string = localNode;
  readonly #entries = new Map<string, Registered>();
  readonly #names = new Map<string, string>();

  /** Record a starting connection. */
  add(entry: RegistryEntry, conn: ConnectionRef): void {
    this.#entries.set(entry.id, new Registered(entry, conn));
  }

  /** Forget a connection and free its name. */
  remove(id: string): void {
    const found = this.#entries.get(id);
    if (!found) return;
    this.#entries.delete(id);
    const name = found.name;
    if (name !== undefined && this.#names.get(name) === id) this.#names.delete(name);
  }

  /**
   * Give `id` the name `name` if free or already its own; its previous name is freed. Throws
   * a `TypeError` for an empty or non-string name, or one that looks like a connection id.
   */
  claim(id: string, name: string): boolean {
    checkName(name);
    const found = this.#entries.get(id);
    if (!found) return false;
    const holder = this.#names.get(name);
    if (holder !== undefined && holder !== id) return false;
    const old = found.name;
    if (old !== undefined && old !== name) this.#names.delete(old);
    this.#names.set(name, id);
    found.name = name;
    return true;
  }

  /** The entries matching `filter` (copies). */
  list(filter: ListFilter = {}): Promise<RegistryEntry[]> {
    const out: RegistryEntry[] = [];
    for (const entry of this.#entries.values()) {
      if (filter.owner !== undefined && entry.owner !== filter.owner) continue;
      if (filter.node !== undefined && entry.node !== filter.node) continue;
      if (filter.kind !== undefined && entry.kind !== filter.kind) continue;
      if (filter.name !== undefined && entry.name !== filter.name) continue;
      out.push(entry.toEntry());
    }
    return Promise.resolve(out);
  }

  /** Find a live connection by id or name. */
  lookup(idOrName: string): Promise<ConnectionRef | undefined> {
    const id = this.#names.get(idOrName) ?? idOrName;
    return Promise.resolve(this.#entries.get(id)?.conn);
  }

  /** How many connections are registered. */
  get size(): number {
    return this.#entries.size;
  }
}

// A MemoryRegistry's record of one connection: the entry and the handle in one object, the
// start time as a stamp (_stats.ts: a small integer, where a time since 1970 in ms would take a
// heap number of its own): every live connection has one, so it is kept small.
class Registered {
  readonly id: string;
  name: string | undefined;
  readonly owner: string;
  readonly node: string;
  readonly kind: RegistryEntry["kind"];
  readonly remoteAddr: RegistryEntry["remoteAddr"];
  readonly localAddr: RegistryEntry["localAddr"];
  readonly #startedAt: number; // a stamp
  readonly conn: ConnectionRef;
  constructor(entry: RegistryEntry, conn: ConnectionRef) {
    this.id = entry.id;
    this.name = entry.name;
    this.owner = entry.owner;
    this.node = entry.node;
    this.kind = entry.kind;
    this.remoteAddr = entry.remoteAddr;
    this.localAddr = entry.localAddr;
    this.#startedAt = epochToStamp(entry.startedAt);
    this.conn = conn;
  }
  toEntry(): RegistryEntry {
    const entry: RegistryEntry = {
      id: this.id,
      owner: this.owner,
      node: this.node,
      kind: this.kind,
      remoteAddr: this.remoteAddr,
      localAddr: this.localAddr,
      startedAt: stampToEpoch(this.#startedAt),
    };
    if (this.name !== undefined) entry.name = this.name;
    return entry;
  }
}

/** The registry used by servers and clients that are given none. */
export const defaultRegistry: MemoryRegistry = new MemoryRegistry();
