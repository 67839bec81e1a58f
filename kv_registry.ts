/**
 * {@linkcode KvRegistry}: a {@linkcode Registry} in Deno KV, shared by every process (node) that
 * opens the same store under the same namespace, so that any node lists, finds and talks to any
 * connection, and a dead node's connections vanish.
 *
 * @module
 */

import { loggerOf } from "./_logger.ts";
import type { Logger } from "./connection.ts";
import { describeValue, RegistryUnavailable } from "./errors.ts";
import {
  checkName,
  type ConnectionRef,
  isConnectionId,
  type ListFilter,
  type Registry,
  type RegistryEntry,
} from "./registry.ts";
import { loadLinkCodec } from "./_link_codec.ts";
import { type LinkAddress, type LinkHost, NodeLinks } from "./_node_link.ts";
import { checkRegistryPeriods, OptionCheck } from "./_options.ts";
import { RemoteConnection } from "./_remote_connection.ts";

/** Where a node's link listens and how links behave (see {@linkcode KvRegistryOptions.link}). */
export interface KvRegistryLinkOptions {
  /** Address the link server listens on (default `"127.0.0.1"`: this machine only). */
  hostname?: string;
  /** Port it listens on (default 0: any free port; the one taken is published). */
  port?: number;
  /**
   * The hostname other nodes dial, published in the node entry (default: `hostname`; required
   * when `hostname` is a wildcard such as `"0.0.0.0"`).
   */
  advertiseHostname?: string;
  /** The largest link frame, in bytes (default 16 MiB); a larger one closes that link. */
  maxFrameLength?: number;
  /** Ms a link connect and its authentication may take (default: `nodeTtlMs`). */
  connectTimeout?: number;
}

/** Options of {@linkcode KvRegistry.open}. */
export interface KvRegistryOptions {
  /** The registry's name in the store: nodes share connections under the same namespace. */
  namespace: string;
  /** This node's name, unique among the live nodes of the namespace (default: pid and random). */
  node?: string;
  /** Ms between heartbeats of this node's entry (default 1000). */
  heartbeatMs?: number;
  /**
   * Ms after its last heartbeat at which a node counts as dead (default 5000, at least twice
   * `heartbeatMs`): its connections leave `list()` at once and are removed soon after, and
   * requests to them fail with `NodeDown`.
   */
  nodeTtlMs?: number;
  /**
   * The cluster secret that node links prove to each other (HMAC-SHA-256). Default: a random
   * secret kept in the namespace, so that whoever can read the store is trusted; give one
   * (the same to every node) when nodes on other machines share a remote store.
   */
  secret?: string | Uint8Array;
  /**
   * Ms a new connection's entry waits before it is written, with the others due, in one atomic
   * operation (default 50; 0: at once, batching only what comes while a write is under way).
   * Other nodes see an unnamed new connection up to twice that later; a connection that ends
   * sooner is never written. A claim of a name writes at once, as do removals (in the next
   * batch).
   */
  batchMs?: number;
  /** Where the node link listens (default: loopback, any port). */
  link?: KvRegistryLinkOptions;
  /** Where registry and link trouble is reported (default `console`). */
  logger?: Logger;
}

// What the store holds under ["etcp", namespace]:
//   ["node", node]   NodeRecord, rewritten every heartbeat (expireIn nodeTtlMs)
//   ["member", node] MemberRecord, from join to leave; a dead node's member says who sweeps it
//   ["conn", id]     RegistryEntry, written once (and again when named); not refreshed
//   ["name", name]   NameRecord
//   ["secret"]       the default cluster secret
interface NodeRecord {
  node: string;
  link: LinkAddress;
  heartbeatAt: number;
  ttlMs: number;
  startedAt: number;
}

interface MemberRecord {
  node: string;
  startedAt: number;
  sweep?: { by: string; at: number; ttlMs: number };
}

interface NameRecord {
  id: string;
  node: string;
}

// A write of this node's own entries, waiting for the next batch.
type Write =
  | { kind: "set"; entry: RegistryEntry; since: number }
  | { kind: "delete"; name?: string; nameVersionstamp?: string };

// A claim waiting for the writer.
interface Claim {
  id: string;
  name: string;
  resolve(won: boolean): void;
  reject(err: unknown): void;
}

const enum State {
  /** Joined, heartbeating. */
  Live,
  /** Declared dead by the others (a heartbeat was missed for nodeTtlMs): rejoining. */
  Detached,
  Closing,
  Closed,
}

// Deno KV's limits: 1000 mutations and 100 checks per atomic operation; some room is kept.
const MAX_MUTATIONS = 500;
const MAX_CHECKS = 90;
const LIST_BATCH = 1000;
const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;

/**
 * A registry in Deno KV, shared by the processes (nodes) that open the same store and
 * namespace: etcp's Mnesia. Each node records its own connections; `list()` and `lookup()` see
 * every live node's, and `lookup()` gives a handle whose `call`, `cast`, `info`, `send` and
 * `stop` reach a connection of another node over that node's link (a small server of this
 * library, authenticated with the cluster secret). Names are unique across nodes.
 *
 * Liveness: each node rewrites its node entry every `heartbeatMs`; a node whose last heartbeat
 * is older than `nodeTtlMs` is dead, its entries are left out of `list()` at once and removed by
 * a live node soon after. Connection entries are written once (in batches: starting a
 * connection does not wait for the store) and never refreshed. `close()` removes this node's
 * entries at once. Needs `--unstable-kv` (or `"unstable": ["kv"]` in deno.json); nothing else
 * in the library does.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, KvRegistry, memory, reply, serve } from "./mod.ts";
 *
 * const kv = await Deno.openKv(":memory:");
 * // Two nodes of one registry (in one process here; normally two processes sharing a store).
 * await using a = await KvRegistry.open(kv, { namespace: "doc", node: "a" });
 * await using b = await KvRegistry.open(kv, { namespace: "doc", node: "b" });
 * const transport = memory("kv-registry-doc");
 * const server = await serve(async function* (conn) {
 *   await conn.register("echo");
 *   for (let ev = yield; ev.type !== "shutdown";) {
 *     ev = ev.type === "call" ? yield reply(ev.from, `${a.node} got ${ev.message}`) : yield;
 *   }
 * }, { transport, registry: a });
 * const client = await connect(async function* () {
 *   yield;
 * }, { transport });
 * // Node b finds the connection of node a by name, and calls it over a's link.
 * let echo;
 * for (let i = 0; i < 1000 && !(echo = await b.lookup("echo")); i++) {
 *   await new Promise((r) => setTimeout(r, 2));
 * }
 * assert.equal(await echo!.call("hi"), "a got hi");
 * assert.deepEqual((await b.list({ name: "echo" })).map((e) => e.node), ["a"]);
 * await client.stop();
 * await server.stop();
 * await a.close();
 * await b.close();
 * kv.close();
 * ```
 */
export class KvRegistry implements Registry, AsyncDisposable {
  /** This node's name, recorded in every entry it adds. */
  readonly node: string;
  /** The namespace the registry lives under. */
  readonly namespace: string;
  readonly #kv: Deno.Kv;
  readonly #ownsKv: boolean;
  readonly #prefix: string[];
  readonly #heartbeatMs: number;
  readonly #ttlMs: number;
  readonly #logger: Logger;
  readonly #startedAt = Date.now();
  #links: NodeLinks | null = null;
  #state: State = State.Live;
  #nodeVersionstamp: string | null = null;
  // This node's connections, and the names they hold (with the versionstamp of the claim).
  readonly #local = new Map<string, { entry: RegistryEntry; conn: ConnectionRef }>();
  readonly #names = new Map<string, { id: string; versionstamp: string }>();
  // Writes and claims waiting for the writer, which runs one batch at a time.
  #pending = new Map<string, Write>();
  #claims: Claim[] = [];
  #writer: Promise<void> | null = null;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #batchTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #batchMs: number;
  #flushes = 0; // flush() calls under way: every pending write goes, young or not
  #writeFailures = 0;
  // What the last survey found: every node's record, and why the dead ones are dead.
  #nodes = new Map<string, NodeRecord>();
  readonly #dead = new Map<string, string>();
  #beatTimer: ReturnType<typeof setTimeout> | undefined;
  #beating: Promise<void> | null = null;
  #beatFailures = 0;
  readonly #sweeps = new Set<Promise<void>>();
  #surveys = 0;
  readonly #orphansEvery: number;
  #closing: Promise<void> | null = null;

  private constructor(
    kv: Deno.Kv,
    ownsKv: boolean,
    options: KvRegistryOptions,
  ) {
    this.#kv = kv;
    this.#ownsKv = ownsKv;
    this.namespace = options.namespace;
    this.node = options.node ?? `${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
    this.#prefix = ["etcp", options.namespace];
    this.#heartbeatMs = options.heartbeatMs ?? 1000;
    this.#ttlMs = options.nodeTtlMs ?? Math.max(5000, 2 * this.#heartbeatMs);
    this.#logger = loggerOf(options.logger);
    this.#batchMs = options.batchMs ?? 50;
    // About every ten node TTLs, at a different beat on each node.
    this.#orphansEvery = Math.ceil(10 * this.#ttlMs / this.#heartbeatMs) +
      Math.floor(Math.random() * 10);
  }

  /**
   * Open the registry `namespace` in a Deno KV store: `kvOrPath` is an open `Deno.Kv` (left
   * open by `close()`), or what `Deno.openKv` takes: a file path, `":memory:"`, or a KV Connect
   * URL (`https://…`, with `DENO_KV_ACCESS_TOKEN` set). Joins as node `node`, starts its link
   * server and heartbeat. Rejects with a `TypeError` or `RangeError` for a bad option, and with
   * `RegistryUnavailable` if the store cannot be opened or `node` is live already.
   */
  static async open(
    kvOrPath: Deno.Kv | string,
    options: KvRegistryOptions,
  ): Promise<KvRegistry> {
    checkOptions(options);
    const link = options.link ?? {};
    const hostname = link.hostname ?? "127.0.0.1";
    const advertise = link.advertiseHostname ?? hostname;
    if (isWildcard(advertise)) {
      throw new TypeError(
        `KvRegistry.open: option link.advertiseHostname is needed with link.hostname ${
          JSON.stringify(hostname)
        } (which address should other nodes dial?)`,
      );
    }
    const kv = await openStore(kvOrPath);
    const registry = new KvRegistry(kv, typeof kvOrPath === "string", options);
    try {
      await loadLinkCodec();
      const key = await registry.#secretKey(options.secret);
      const host: LinkHost = {
        node: registry.node,
        namespace: registry.namespace,
        logger: registry.#logger,
        localConnection: (id) => registry.#local.get(id)?.conn,
        downReason: (node) => registry.#downReason(node),
        resolve: (node) => registry.#resolve(node),
      };
      registry.#links = await NodeLinks.start(host, {
        hostname,
        port: link.port ?? 0,
        advertise,
        maxFrameLength: link.maxFrameLength ?? DEFAULT_MAX_FRAME,
        connectTimeout: link.connectTimeout ?? registry.#ttlMs,
        key,
      });
      await registry.#join();
      await registry.#survey();
    } catch (err) {
      registry.#state = State.Closed;
      await registry.#links?.close();
      if (registry.#ownsKv) kv.close();
      throw err;
    }
    registry.#scheduleBeat();
    return registry;
  }

  /** Where this node's link listens, as other nodes dial it. */
  get linkAddress(): { hostname: string; port: number } {
    return { ...this.#links!.address };
  }

  // ---- Registry -------------------------------------------------------------------------------

  /**
   * Record a starting connection of this node. Returns at once: the entry is written with
   * others in the next batch (see {@linkcode KvRegistry.flush}).
   */
  add(entry: RegistryEntry, conn: ConnectionRef): void {
    if (this.#state >= State.Closing) {
      throw new RegistryUnavailable(`KvRegistry ${this.node} is closed`);
    }
    this.#local.set(entry.id, { entry, conn });
    this.#pending.set(entry.id, { kind: "set", entry, since: performance.now() });
    this.#scheduleWrites();
  }

  /** Forget a connection of this node and free its name (written in the next batch). */
  remove(id: string): void {
    const local = this.#local.get(id);
    // Closing: the entry stays listed here, so that leaving deletes it with the rest.
    if (local === undefined || this.#state >= State.Closing) return;
    this.#local.delete(id);
    const name = local.entry.name;
    const held = name !== undefined ? this.#names.get(name) : undefined;
    if (held?.id === id) this.#names.delete(name!);
    if (this.#pending.get(id)?.kind === "set") {
      this.#pending.delete(id); // never written, and named only once written
      return;
    }
    this.#pending.set(
      id,
      held?.id === id
        ? { kind: "delete", name, nameVersionstamp: held.versionstamp }
        : { kind: "delete" },
    );
    this.#scheduleWrites();
  }

  /**
   * Give connection `id` of this node the name `name` if no live connection of any node holds
   * it (or it is already this connection's); its previous name is freed. Resolves once the
   * store has it: when several nodes race for a name, exactly one wins. Throws a `TypeError`
   * for a name that is not a non-empty string or that looks like a connection id.
   */
  claim(id: string, name: string): Promise<boolean> {
    checkName(name);
    if (this.#state >= State.Closing) {
      return Promise.reject(new RegistryUnavailable(`KvRegistry ${this.node} is closed`));
    }
    if (!this.#local.has(id)) return Promise.resolve(false);
    const held = this.#names.get(name);
    if (held !== undefined) return Promise.resolve(held.id === id);
    // After the batch that holds the connection's entry: a name never points to nothing.
    return new Promise((resolve, reject) => {
      this.#claims.push({ id, name, resolve, reject });
      this.#scheduleWrites(true);
    });
  }

  /**
   * The entries matching `filter`, of every live node: this node's from memory, the others'
   * read from the store, leaving out every node whose heartbeat is stale.
   */
  async list(filter: ListFilter = {}): Promise<RegistryEntry[]> {
    checkFilter(filter);
    const matches = (e: RegistryEntry) =>
      (filter.owner === undefined || e.owner === filter.owner) &&
      (filter.kind === undefined || e.kind === filter.kind) &&
      (filter.name === undefined || e.name === filter.name);
    const out: RegistryEntry[] = [];
    if (filter.node === undefined || filter.node === this.node) {
      for (const { entry } of this.#local.values()) if (matches(entry)) out.push({ ...entry });
      if (filter.node === this.node) return out;
    }
    if (this.#state >= State.Closing) return out;
    const alive = await this.#aliveNodes();
    const wanted = (e: unknown): e is RegistryEntry =>
      isEntry(e) && e.node !== this.node && alive.has(e.node) &&
      (filter.node === undefined || e.node === filter.node) && matches(e);
    if (filter.node !== undefined && !alive.has(filter.node)) return out;
    if (filter.name !== undefined) {
      const named = (await this.#get<NameRecord>(this.#key("name", filter.name))).value;
      if (!isNameRecord(named)) return out;
      const entry = (await this.#get(this.#key("conn", named.id))).value;
      if (wanted(entry)) out.push(entry);
      return out;
    }
    for (const { value } of await this.#list("conn")) if (wanted(value)) out.push(value);
    return out;
  }

  /**
   * Find a connection by id or name: this node's own connection, or a handle on another live
   * node's, whose `call`, `cast`, `info`, `send` and `stop` go over that node's link
   * (`NodeDown` once it cannot be reached). `undefined` if there is none, or its node is dead.
   */
  async lookup(idOrName: string): Promise<ConnectionRef | undefined> {
    if (typeof idOrName !== "string" || idOrName === "") return undefined;
    const local = this.#local.get(this.#names.get(idOrName)?.id ?? idOrName);
    if (local !== undefined) return local.conn;
    if (this.#state >= State.Closing) return undefined;
    let found: { id: string; name?: string; node: string };
    if (isConnectionId(idOrName)) {
      const entry = (await this.#get(this.#key("conn", idOrName))).value;
      if (!isEntry(entry)) return undefined;
      found = entry;
    } else {
      const named = (await this.#get(this.#key("name", idOrName))).value;
      if (!isNameRecord(named)) return undefined;
      found = { id: named.id, name: idOrName, node: named.node };
    }
    if (found.node === this.node || !(await this.#isAlive(found.node))) return undefined;
    return new RemoteConnection(this.#links!, found.id, found.name, found.node);
  }

  /**
   * Write what waits for the next batch now; resolves once everything this node recorded so
   * far is in the store (or writing failed: failures are logged, and tried again later).
   */
  async flush(): Promise<void> {
    this.#flushes++;
    try {
      for (;;) {
        this.#scheduleWrites(true);
        if (this.#writer === null) return;
        await this.#writer;
      }
    } finally {
      this.#flushes--;
    }
  }

  /**
   * Leave: stop the heartbeat and the links, and remove this node's entries and names from the
   * store at once; close the store if `open` opened it. Connections still running stay up,
   * unrecorded.
   */
  close(): Promise<void> {
    return this.#closing ??= this.#leave();
  }

  /** Closes the registry (`await using registry = await KvRegistry.open(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /**
   * Declare node `node` of `namespace` dead at once, without waiting for its `nodeTtlMs`: for
   * a supervisor that knows the node is gone (a terminated Worker, a killed process). Its node
   * entry is removed: every node leaves its connections out of `list()` and `lookup()` from
   * now on, requests to them fail with `NodeDown`, and a live node removes its entries and
   * names at its next heartbeat. A node that is in fact alive finds itself declared dead and
   * rejoins.
   */
  static async evict(kv: Deno.Kv, namespace: string, node: string): Promise<void> {
    await whileBusy(() => kv.delete(["etcp", namespace, "node", node]));
  }

  // ---- Keys and records -----------------------------------------------------------------------

  #key(...parts: string[]): string[] {
    return [...this.#prefix, ...parts];
  }

  // The store's operations, each tried again while a local SQLite file is "locked": another
  // process sharing it holds the write lock at that moment.
  #atomic(): Deno.AtomicOperation {
    const op = this.#kv.atomic();
    const commit = op.commit.bind(op);
    op.commit = () => whileBusy(commit);
    return op;
  }

  #get<V = unknown>(key: Deno.KvKey): Promise<Deno.KvEntryMaybe<V>> {
    return whileBusy(() => this.#kv.get<V>(key));
  }

  #getMany<V extends readonly unknown[]>(
    keys: readonly [...{ [K in keyof V]: Deno.KvKey }],
  ): Promise<{ [K in keyof V]: Deno.KvEntryMaybe<V[K]> }> {
    return whileBusy(() => this.#kv.getMany<V>(keys));
  }

  // Every entry under prefix `part` of the namespace, read in one go.
  #list(part: string): Promise<Deno.KvEntry<unknown>[]> {
    return whileBusy(async () => {
      const out: Deno.KvEntry<unknown>[] = [];
      const entries = this.#kv.list({ prefix: this.#key(part) }, { batchSize: LIST_BATCH });
      for await (const entry of entries) out.push(entry);
      return out;
    });
  }

  #nodeRecord(): NodeRecord {
    return {
      node: this.node,
      link: this.#links!.address,
      heartbeatAt: Date.now(),
      ttlMs: this.#ttlMs,
      startedAt: this.#startedAt,
    };
  }

  async #secretKey(secret: string | Uint8Array | undefined): Promise<CryptoKey> {
    let bytes: Uint8Array<ArrayBuffer>;
    if (typeof secret === "string") bytes = new TextEncoder().encode(secret);
    else if (secret !== undefined) bytes = new Uint8Array(secret);
    else {
      // The namespace's own secret: made once, by whichever node comes first.
      const key = this.#key("secret");
      const stored = await this.#get(key);
      let value = stored.value;
      if (!(value instanceof Uint8Array)) {
        const fresh = crypto.getRandomValues(new Uint8Array(32));
        const made = await this.#atomic().check(stored).set(key, fresh).commit();
        value = made.ok ? fresh : (await this.#get(key)).value;
      }
      if (!(value instanceof Uint8Array)) {
        throw new RegistryUnavailable(`KvRegistry: the secret of ${this.namespace} is unreadable`);
      }
      bytes = new Uint8Array(value);
    }
    return await crypto.subtle.importKey("raw", bytes, { name: "HMAC", hash: "SHA-256" }, false, [
      "sign",
      "verify",
    ]);
  }

  // ---- Writes: batched, one batch at a time ---------------------------------------------------

  // Start the writer within batchMs, or at once if `now` (a claim, a flush). Detached, writes
  // wait for the rejoin, which writes everything again anyway.
  #scheduleWrites(now = false): void {
    if (this.#writer !== null || this.#retryTimer !== undefined) return;
    if (this.#state === State.Detached || (this.#pending.size === 0 && this.#claims.length === 0)) {
      return;
    }
    if (now || this.#batchMs === 0) {
      clearTimeout(this.#batchTimer);
      this.#batchTimer = undefined;
      this.#writer = this.#write();
    } else {
      this.#batchTimer ??= setTimeout(() => {
        this.#batchTimer = undefined;
        this.#scheduleWrites(true);
      }, this.#batchMs);
    }
  }

  async #write(): Promise<void> {
    await null; // the connections started in this same turn join the batch
    try {
      // One batch, and more at once only for claims: other writes wait for the next batch.
      do {
        // Removals go at once; an entry only once it is batchMs old, so that a connection
        // shorter than that is never written.
        const batch = new Map<string, Write>();
        const young = new Map<string, Write>();
        const due = this.#flushes > 0 ? Infinity : performance.now() - this.#batchMs;
        for (const [id, write] of this.#pending) {
          if (write.kind === "delete" || write.since <= due) batch.set(id, write);
          else young.set(id, write);
        }
        this.#pending = young;
        let claims = this.#claims;
        this.#claims = [];
        // A connection's entry not written yet goes out with its first claim, in one commit.
        const unwritten = new Set<string>();
        for (const { id } of claims) {
          if (unwritten.has(id)) continue;
          if (batch.get(id)?.kind === "set") batch.delete(id);
          else if (young.get(id)?.kind === "set") young.delete(id);
          else continue;
          unwritten.add(id);
        }
        if (batch.size > 0 && !(await this.#commitWrites(batch))) {
          for (const id of unwritten) this.#unwritten(id);
          this.#claims = [...claims, ...this.#claims];
          return this.#retryLater();
        }
        // In waves of claims for different connections and names, each wave at once.
        while (claims.length > 0) {
          const wave: Claim[] = [];
          const later: Claim[] = [];
          const ids = new Set<string>();
          const names = new Set<string>();
          for (const claim of claims) {
            if (ids.has(claim.id) || names.has(claim.name)) later.push(claim);
            else {
              wave.push(claim);
              ids.add(claim.id);
              names.add(claim.name);
            }
          }
          await Promise.all(wave.map(async ({ id, name, resolve, reject }) => {
            const withEntry = unwritten.delete(id);
            try {
              resolve(await this.#commitClaim(id, name, withEntry));
            } catch (err) {
              if (withEntry) this.#unwritten(id);
              reject(err);
            }
          }));
          claims = later;
        }
      } while (this.#state !== State.Detached && this.#claims.length > 0);
      this.#writeFailures = 0;
    } finally {
      this.#writer = null;
      this.#scheduleWrites(); // what came during the last round, in the next batch
    }
  }

  // Connection `id`'s entry, taken out of a batch for its claim, is written after all.
  #unwritten(id: string): void {
    const local = this.#local.get(id);
    if (local !== undefined && !this.#pending.has(id)) {
      this.#pending.set(id, { kind: "set", entry: local.entry, since: 0 });
    }
  }

  // Write a batch in atomic operations; false (with the writes put back) if the store failed.
  async #commitWrites(batch: Map<string, Write>): Promise<boolean> {
    const groups: Array<Array<[string, Write]>> = [[]];
    let mutations = 0;
    let checks = 0;
    for (const item of batch) {
      const named = item[1].kind === "delete" && item[1].name !== undefined;
      if (mutations + 2 > MAX_MUTATIONS || (named && checks + 1 > MAX_CHECKS)) {
        groups.push([]);
        mutations = checks = 0;
      }
      groups.at(-1)!.push(item);
      mutations += named ? 2 : 1;
      if (named) checks++;
    }
    const results = await Promise.allSettled(groups.map((group) => this.#commitGroup(group)));
    let failed: unknown;
    for (let i = 0; i < groups.length; i++) {
      const result = results[i];
      if (result.status === "fulfilled") continue;
      failed = result.reason;
      // Put back what no newer write replaced.
      for (const [id, write] of groups[i]) if (!this.#pending.has(id)) this.#pending.set(id, write);
    }
    if (failed === undefined) return true;
    if (this.#writeFailures++ === 0) {
      this.#logger.error(`etcp: KvRegistry ${this.node}: writing entries failed:`, failed);
    }
    return false;
  }

  async #commitGroup(group: Array<[string, Write]>): Promise<void> {
    const op = this.#atomic();
    for (const [id, write] of group) this.#addWrite(op, id, write);
    if ((await op.commit()).ok) return;
    // A name check failed: a name of this node was taken over while it was declared dead.
    // One by one, so the rest go through.
    for (const [id, write] of group) {
      const one = this.#atomic();
      this.#addWrite(one, id, write);
      if (!(await one.commit()).ok) await this.#atomic().delete(this.#key("conn", id)).commit();
    }
  }

  #addWrite(op: Deno.AtomicOperation, id: string, write: Write): void {
    const key = this.#key("conn", id);
    if (write.kind === "set") {
      op.set(key, write.entry);
      return;
    }
    op.delete(key);
    if (write.name !== undefined) {
      const nameKey = this.#key("name", write.name);
      op.check({ key: nameKey, versionstamp: write.nameVersionstamp ?? null }).delete(nameKey);
    }
  }

  #retryLater(): void {
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      if (this.#state < State.Closing) this.#scheduleWrites(true);
    }, this.#heartbeatMs);
  }

  // Claim `name` for `id` in the store; `withEntry`: its entry is not written yet, and is written
  // here, with the name or (if the name is not won) without.
  async #commitClaim(id: string, name: string, withEntry: boolean): Promise<boolean> {
    const won = await this.#commitName(id, name);
    if (withEntry && !won) this.#unwritten(id);
    return won;
  }

  async #commitName(id: string, name: string): Promise<boolean> {
    const nameKey = this.#key("name", name);
    for (let attempt = 0; attempt < 8; attempt++) {
      const local = this.#local.get(id);
      if (local === undefined || this.#state >= State.Closing) return false;
      const held = this.#names.get(name);
      if (held !== undefined) return held.id === id;
      const current = await this.#get<NameRecord>(nameKey);
      const holder = current.value;
      if (
        isNameRecord(holder) && holder.id !== id && await this.#isAlive(holder.node, holder.id)
      ) return false;
      const old = local.entry.name;
      const oldHeld = old !== undefined ? this.#names.get(old) : undefined;
      const op = this.#atomic()
        .check(current)
        .set(nameKey, { id, node: this.node } satisfies NameRecord)
        .set(this.#key("conn", id), { ...local.entry, name });
      if (oldHeld?.id === id) {
        const oldKey = this.#key("name", old!);
        op.check({ key: oldKey, versionstamp: oldHeld.versionstamp }).delete(oldKey);
      }
      const done = await op.commit();
      if (!done.ok) {
        // Lost a race for the name, or the old name is no longer this node's: look again.
        if (oldHeld?.id === id) {
          const now = await this.#get(this.#key("name", old!));
          if (now.versionstamp !== oldHeld.versionstamp) this.#names.delete(old!);
        }
        continue;
      }
      if (oldHeld?.id === id) this.#names.delete(old!);
      if (!this.#local.has(id)) {
        // It closed while claiming, and its removal went out without this name.
        await this.#atomic()
          .check({ key: nameKey, versionstamp: done.versionstamp })
          .delete(nameKey)
          .delete(this.#key("conn", id))
          .commit();
        return false;
      }
      local.entry.name = name;
      this.#names.set(name, { id, versionstamp: done.versionstamp });
      return true;
    }
    return false;
  }

  // ---- Liveness -------------------------------------------------------------------------------

  #isFresh(record: NodeRecord, now = Date.now()): boolean {
    return now - record.heartbeatAt <= record.ttlMs;
  }

  // Whether `node` is alive, read afresh; for this node, whether connection `id` is its own.
  async #isAlive(node: string, id?: string): Promise<boolean> {
    if (node === this.node) return id === undefined || this.#local.has(id);
    const record = (await this.#get(this.#key("node", node))).value;
    if (!isNodeRecord(record) || !this.#isFresh(record)) return false;
    // Alive now (a new run of a node that left, say): what the last survey knew of it is stale,
    // and must not fail requests to it until the next one.
    this.#dead.delete(node);
    this.#nodes.set(node, record);
    return true;
  }

  async #aliveNodes(): Promise<Set<string>> {
    const alive = new Set<string>();
    const now = Date.now();
    for (const { value } of await this.#list("node")) {
      if (isNodeRecord(value) && this.#isFresh(value, now)) alive.add(value.node);
    }
    return alive;
  }

  #downReason(node: string): string | undefined {
    const why = this.#dead.get(node);
    if (why !== undefined) return why;
    const record = this.#nodes.get(node);
    return record !== undefined && !this.#isFresh(record) ? "its heartbeat stopped" : undefined;
  }

  async #resolve(node: string): Promise<LinkAddress | string> {
    const record = (await this.#get(this.#key("node", node))).value;
    if (!isNodeRecord(record)) return "it is not in the registry";
    if (!this.#isFresh(record)) return "its heartbeat stopped";
    return record.link;
  }

  // Join as this node: clear what a previous run of the same node left, then write the member
  // and node entries, unless a live node holds the name.
  async #join(): Promise<void> {
    const memberKey = this.#key("member", this.node);
    const nodeKey = this.#key("node", this.node);
    for (let attempt = 0; attempt < 5; attempt++) {
      const [member, current] = await this.#getMany([memberKey, nodeKey]);
      if (isNodeRecord(current.value) && this.#isFresh(current.value)) {
        throw new RegistryUnavailable(
          `KvRegistry: node ${this.node} is live in namespace ${this.namespace} already; ` +
            `give each process its own node name (or wait ${current.value.ttlMs} ms)`,
        );
      }
      if (member.value !== null) {
        await this.#clearNode(this.node);
        await this.#atomic().check(member).delete(memberKey).commit();
        continue;
      }
      const joined = await this.#atomic()
        .check(member)
        .check(current)
        .set(memberKey, { node: this.node, startedAt: this.#startedAt } satisfies MemberRecord)
        .set(nodeKey, this.#nodeRecord(), { expireIn: this.#ttlMs })
        .commit();
      if (joined.ok) {
        this.#nodeVersionstamp = joined.versionstamp;
        return;
      }
    }
    throw new RegistryUnavailable(`KvRegistry: node ${this.node} could not join ${this.namespace}`);
  }

  #scheduleBeat(): void {
    if (this.#state >= State.Closing) return;
    this.#beatTimer = setTimeout(() => {
      this.#beatTimer = undefined;
      this.#beating = this.#beat().finally(() => {
        this.#beating = null;
        this.#scheduleBeat();
      });
    }, this.#heartbeatMs);
  }

  async #beat(): Promise<void> {
    try {
      if (this.#state === State.Live) {
        const nodeKey = this.#key("node", this.node);
        const beat = await this.#atomic()
          .check({ key: nodeKey, versionstamp: this.#nodeVersionstamp })
          .set(nodeKey, this.#nodeRecord(), { expireIn: this.#ttlMs })
          .commit();
        if (beat.ok) this.#nodeVersionstamp = beat.versionstamp;
        else if (this.#state === State.Live) {
          this.#state = State.Detached;
          this.#logger.warn(
            `etcp: KvRegistry ${this.node}: the cluster declared this node dead ` +
              `(no heartbeat for ${this.#ttlMs} ms); rejoining`,
          );
        }
      }
      if (this.#state === State.Detached) await this.#rejoin();
      if (this.#state < State.Closing) await this.#survey();
      this.#beatFailures = 0;
    } catch (err) {
      if (this.#beatFailures++ === 0) {
        this.#logger.error(`etcp: KvRegistry ${this.node}: heartbeat failed:`, err);
      }
    }
  }

  // Back after being declared dead: once the sweep of this node's entries is done (or if none
  // began), join again and write every live connection and name anew.
  async #rejoin(): Promise<void> {
    const memberKey = this.#key("member", this.node);
    const nodeKey = this.#key("node", this.node);
    const [member, current] = await this.#getMany<[MemberRecord, NodeRecord]>([
      memberKey,
      nodeKey,
    ]);
    const sweep = member.value?.sweep;
    if (member.value !== null && sweep === undefined) {
      // Not swept: the node entry only expired. Put it back; the entries are all there.
      const back = await this.#atomic()
        .check(member)
        .check(current)
        .set(nodeKey, this.#nodeRecord(), { expireIn: this.#ttlMs })
        .commit();
      if (back.ok) {
        this.#nodeVersionstamp = back.versionstamp;
        this.#state = State.Live;
      }
      return;
    }
    if (sweep !== undefined && Date.now() - sweep.at <= sweep.ttlMs) return; // still sweeping
    if (member.value !== null) {
      await this.#clearNode(this.node); // its sweeper died: finish the sweep
      await this.#atomic().check(member).delete(memberKey).commit();
    }
    const joined = await this.#atomic()
      .check({ key: memberKey, versionstamp: null })
      .check({ key: nodeKey, versionstamp: null })
      .set(memberKey, { node: this.node, startedAt: this.#startedAt } satisfies MemberRecord)
      .set(nodeKey, this.#nodeRecord(), { expireIn: this.#ttlMs })
      .commit();
    if (!joined.ok) return;
    this.#nodeVersionstamp = joined.versionstamp;
    this.#state = State.Live;
    const named: Array<[string, string]> = [];
    for (const [id, { entry }] of this.#local) {
      if (entry.name !== undefined) named.push([id, entry.name]);
      entry.name = undefined;
      this.#pending.set(id, { kind: "set", entry: { ...entry }, since: 0 });
    }
    this.#names.clear();
    for (const [id, name] of named) {
      this.claim(id, name).then((ok) => {
        if (!ok) this.#logger.warn(`etcp: KvRegistry ${this.node}: ${id} lost its name ${name}`);
      }, () => {});
    }
    this.#scheduleWrites();
  }

  // Read every node's record; fail requests to the dead; sweep the dead nodes nobody sweeps.
  async #survey(): Promise<void> {
    const now = Date.now();
    const nodes = new Map<string, NodeRecord>();
    const versionstamps = new Map<string, string>();
    for (const { value, versionstamp } of await this.#list("node")) {
      if (!isNodeRecord(value)) continue;
      nodes.set(value.node, value);
      versionstamps.set(value.node, versionstamp);
    }
    for (const [node, record] of nodes) {
      if (this.#isFresh(record, now)) this.#dead.delete(node);
      else this.#declareDead(node, "its heartbeat stopped");
    }
    for (const node of this.#nodes.keys()) {
      if (!nodes.has(node)) this.#declareDead(node, "it left the registry");
    }
    this.#nodes = nodes;
    for (const entry of await this.#list("member")) {
      const member = entry.value;
      if (!isMemberRecord(member) || member.node === this.node) continue;
      const record = nodes.get(member.node);
      if (record !== undefined && this.#isFresh(record, now)) continue;
      const sweep = member.sweep;
      if (sweep !== undefined && now - sweep.at <= sweep.ttlMs) continue;
      // Claim the sweep: whoever changes the member first clears the node.
      const nodeKey = this.#key("node", member.node);
      const claimed = await this.#atomic()
        .check(entry)
        .check({ key: nodeKey, versionstamp: versionstamps.get(member.node) ?? null })
        .set(entry.key, { ...member, sweep: { by: this.node, at: now, ttlMs: this.#ttlMs } })
        .delete(nodeKey)
        .commit();
      if (!claimed.ok) continue;
      this.#declareDead(member.node, "its heartbeat stopped");
      const sweeping = this.#clearNode(member.node)
        .then(() =>
          this.#atomic()
            .check({ key: entry.key, versionstamp: claimed.versionstamp })
            .delete(entry.key)
            .commit()
        )
        .then(
          () => {},
          (err) => this.#logger.error(`etcp: KvRegistry ${this.node}: sweep failed:`, err),
        )
        .finally(() => this.#sweeps.delete(sweeping));
      this.#sweeps.add(sweeping);
    }
    if (++this.#surveys % this.#orphansEvery === 0) {
      const collecting = this.#collectOrphans()
        .catch((err) => this.#logger.error(`etcp: KvRegistry ${this.node}: cleanup failed:`, err))
        .finally(() => this.#sweeps.delete(collecting));
      this.#sweeps.add(collecting);
    }
  }

  // A safety net behind the sweeps: remove entries and names of nodes that are not members
  // (a sweeper that died after deleting the member, a write that landed after a sweep). The
  // entries are read before the members, so a node joining meanwhile keeps its own; each
  // delete is checked, so an entry written again since it was read stays.
  async #collectOrphans(): Promise<void> {
    const conns = await this.#list("conn");
    const names = await this.#list("name");
    const members = new Set<string>();
    for (const { value } of await this.#list("member")) {
      if (isMemberRecord(value)) members.add(value.node);
    }
    const orphans: Deno.AtomicCheck[] = [];
    for (const { key, value, versionstamp } of [...conns, ...names]) {
      const node = isEntry(value) || isNameRecord(value) ? value.node : undefined;
      if (node !== undefined && !members.has(node)) orphans.push({ key, versionstamp });
    }
    await this.#deleteChecked(orphans);
  }

  #declareDead(node: string, why: string): void {
    if (node === this.node) return;
    if (!this.#dead.has(node)) {
      if (this.#dead.size >= 1000) this.#dead.delete(this.#dead.keys().next().value!);
      this.#dead.set(node, why);
    }
    this.#links?.down(node, this.#dead.get(node)!);
  }

  // Remove every connection entry and name of `node` (a dead one, or this one's previous run).
  async #clearNode(node: string): Promise<void> {
    const commits: Promise<unknown>[] = [];
    let op = this.#atomic();
    let mutations = 0;
    for (const { key, value } of await this.#list("conn")) {
      if (!isEntry(value) || value.node !== node) continue;
      op.delete(key);
      if (++mutations === MAX_MUTATIONS) {
        commits.push(op.commit());
        op = this.#atomic();
        mutations = 0;
      }
    }
    if (mutations > 0) commits.push(op.commit());
    await Promise.all(commits);
    // Names with a check each: a name someone took over meanwhile stays theirs.
    const names: Deno.AtomicCheck[] = [];
    for (const { key, value, versionstamp } of await this.#list("name")) {
      if (isNameRecord(value) && value.node === node) names.push({ key, versionstamp });
    }
    await this.#deleteChecked(names);
  }

  // Delete each key unless it changed since its versionstamp: in groups, one by one if a group
  // fails.
  async #deleteChecked(checks: Deno.AtomicCheck[]): Promise<void> {
    const groups: Promise<void>[] = [];
    for (let i = 0; i < checks.length; i += MAX_CHECKS) {
      const group = checks.slice(i, i + MAX_CHECKS);
      groups.push((async () => {
        const op = this.#atomic();
        for (const check of group) op.check(check).delete(check.key);
        if ((await op.commit()).ok) return;
        for (const check of group) await this.#atomic().check(check).delete(check.key).commit();
      })());
    }
    await Promise.all(groups);
  }

  // ---- Leaving --------------------------------------------------------------------------------

  async #leave(): Promise<void> {
    this.#state = State.Closing;
    clearTimeout(this.#beatTimer);
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    await this.#beating;
    await this.#links?.close();
    await this.flush();
    await Promise.all([...this.#sweeps]);
    try {
      const keys = [...this.#local.keys()].map((id) => this.#key("conn", id));
      const commits: Promise<unknown>[] = [];
      for (let i = 0; i < keys.length; i += MAX_MUTATIONS) {
        const op = this.#atomic();
        for (const key of keys.slice(i, i + MAX_MUTATIONS)) op.delete(key);
        commits.push(op.commit());
      }
      await Promise.all(commits);
      await this.#deleteChecked(
        [...this.#names].map(([name, { versionstamp }]) => ({
          key: this.#key("name", name),
          versionstamp,
        })),
      );
      await this.#atomic()
        .check({ key: this.#key("node", this.node), versionstamp: this.#nodeVersionstamp })
        .delete(this.#key("node", this.node))
        .delete(this.#key("member", this.node))
        .commit();
    } catch (err) {
      this.#logger.error(`etcp: KvRegistry ${this.node}: leaving failed:`, err);
    } finally {
      clearTimeout(this.#batchTimer);
      this.#local.clear();
      this.#names.clear();
      this.#state = State.Closed;
      if (this.#ownsKv) this.#kv.close();
    }
  }
}

// Runs `operation` again (a few ms later, up to about a second in all) while it fails with
// SQLite's "database is locked".
async function whileBusy<V>(operation: () => Promise<V>): Promise<V> {
  for (let attempt = 1;; attempt++) {
    try {
      return await operation();
    } catch (err) {
      if (attempt >= 100 || !(err instanceof Error) || !/database is locked/.test(err.message)) {
        throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, 2 + Math.random() * 10));
    }
  }
}

async function openStore(kvOrPath: Deno.Kv | string): Promise<Deno.Kv> {
  if (typeof kvOrPath !== "string") {
    const kv = kvOrPath as unknown as Record<string, unknown> | null;
    if (
      kv === null || typeof kv !== "object" ||
      !["get", "getMany", "list", "atomic", "delete"].every((m) => typeof kv[m] === "function")
    ) {
      throw new TypeError(
        'KvRegistry.open: the store must be a Deno.Kv or a path, URL or ":memory:" for ' +
          "Deno.openKv",
      );
    }
    return kvOrPath;
  }
  if (typeof Deno.openKv !== "function") {
    throw new RegistryUnavailable(
      'KvRegistry needs Deno KV: run with --unstable-kv (or "unstable": ["kv"] in deno.json)',
    );
  }
  try {
    return await whileBusy(() => Deno.openKv(kvOrPath === "" ? undefined : kvOrPath));
  } catch (err) {
    throw new RegistryUnavailable(
      `KvRegistry: cannot open the KV store ${JSON.stringify(kvOrPath)}: ${
        err instanceof Error ? err.message : String(err)
      }`,
      { cause: err },
    );
  }
}

function checkOptions(options: KvRegistryOptions): void {
  const check = new OptionCheck("KvRegistry.open", options);
  const o = options as unknown as Record<string, unknown>;
  if (typeof o.namespace !== "string" || o.namespace === "") {
    throw new TypeError(
      `KvRegistry.open: option namespace must be a non-empty string, not ${
        describeValue(o.namespace)
      }`,
    );
  }
  if (o.node !== undefined && (typeof o.node !== "string" || o.node === "")) {
    throw new TypeError(
      `KvRegistry.open: option node must be a non-empty string, not ${describeValue(o.node)}`,
    );
  }
  checkRegistryPeriods(check);
  const heartbeat = (o.heartbeatMs as number | undefined) ?? 1000;
  if (o.nodeTtlMs !== undefined && (o.nodeTtlMs as number) < 2 * heartbeat) {
    throw new RangeError(
      `KvRegistry.open: option nodeTtlMs must be at least twice heartbeatMs (${heartbeat}), ` +
        `not ${o.nodeTtlMs}`,
    );
  }
  if (!Number.isFinite(heartbeat)) {
    throw new RangeError("KvRegistry.open: option heartbeatMs must be finite");
  }
  const secret = o.secret;
  if (
    secret !== undefined &&
    !((typeof secret === "string" || secret instanceof Uint8Array) && secret.length > 0)
  ) {
    throw new TypeError(
      `KvRegistry.open: option secret must be a non-empty string or Uint8Array, not ${
        describeValue(secret)
      }`,
    );
  }
  check.methods("logger", ["error", "warn", "debug"], " (console fits)");
  if (o.link === undefined) return;
  const link = new OptionCheck("KvRegistry.open: link", o.link);
  link.string("hostname");
  link.port("port");
  link.string("advertiseHostname");
  link.number("maxFrameLength", 64, { integer: true });
  link.delay("connectTimeout");
}

function checkFilter(filter: ListFilter): void {
  const check = new OptionCheck("KvRegistry.list", filter);
  check.string("owner");
  check.string("node");
  check.string("name");
  check.oneOf("kind", ["server", "client", "pool"]);
}

function isWildcard(hostname: string): boolean {
  return hostname === "0.0.0.0" || hostname === "::" || hostname === "[::]" || hostname === "";
}

// Shapes of what the store holds: anything else there (another program's keys, a corrupted
// value) is passed over, never trusted.
function isEntry(value: unknown): value is RegistryEntry {
  const v = value as RegistryEntry | null;
  return v !== null && typeof v === "object" && typeof v.id === "string" &&
    typeof v.node === "string" && typeof v.owner === "string";
}

function isNodeRecord(value: unknown): value is NodeRecord {
  const v = value as NodeRecord | null;
  return v !== null && typeof v === "object" && typeof v.node === "string" &&
    typeof v.heartbeatAt === "number" && typeof v.ttlMs === "number" &&
    v.link !== null && typeof v.link === "object";
}

function isMemberRecord(value: unknown): value is MemberRecord {
  const v = value as MemberRecord | null;
  return v !== null && typeof v === "object" && typeof v.node === "string";
}

function isNameRecord(value: unknown): value is NameRecord {
  const v = value as NameRecord | null;
  return v !== null && typeof v === "object" && typeof v.id === "string" &&
    typeof v.node === "string";
}
