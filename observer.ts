/**
 * {@linkcode serveObserver}: a live view of servers, pools and connections (Erlang's observer),
 * as one web page and a JSON API, served over HTTP by this process.
 *
 * @module
 */

import { MAX_DELAY } from "./_timer.ts";
import { Connection, type ConnectionStats } from "./connection.ts";
import { Pool, type PoolStats } from "./pool.ts";
import { localNode, type Registry, type RegistryEntry } from "./registry.ts";
import { Server, type ServerStats } from "./server.ts";
import type { Addr } from "./transport/transport.ts";
import { describeReason, describeValue } from "./errors.ts";
import { formatAddr } from "./_socket.ts";
import { render, type TraceEntry } from "./_trace.ts";
import { OptionCheck } from "./_options.ts";
import { OBSERVER_CSS, OBSERVER_JS, observerHtml } from "./_observer_page.ts";

/**
 * What an observer shows: a server (its connections and stats), a pool, or a registry (every
 * connection it lists: with a `KvRegistry`, those of every node of the cluster).
 */
// deno-lint-ignore no-explicit-any
export type ObserverTarget = Server<any, any> | Pool<any> | Registry;

/** Options of {@linkcode serveObserver}. */
export interface ObserverOptions {
  /** Port to listen on (default 0: any free port; see `observer.url`). */
  port?: number;
  /**
   * Address to bind (default `"127.0.0.1"`: this machine only). On a loopback address, requests
   * must also name a loopback host (`Host: 127.0.0.1:…`, `localhost:…`), which keeps web pages
   * elsewhere from reaching it through DNS rebinding.
   */
  hostname?: string;
  /**
   * The secret every request that changes anything must carry (`Authorization: Bearer …`);
   * default: a random one, in `observer.token` and in `observer.url`'s fragment, where the page
   * reads it. Reading needs none.
   */
  token?: string;
  /** Milliseconds between the page's refreshes (default 1000). */
  refresh?: number;
}

/** One connection as the observer lists it (`GET /api/overview`). */
export interface ObservedConnection {
  /** Its id. */
  id: string;
  /** Its registered name, if any. */
  name?: string;
  /** Its server's or pool's name (`"client"` for `connect()`'s). */
  owner: string;
  /** What owns it. */
  kind: RegistryEntry["kind"];
  /** The process (node) it lives in. */
  node: string;
  /** The peer's address. */
  remoteAddr: string;
  /** This end's address. */
  localAddr: string;
  /** When it started, in ms since the Unix epoch. */
  startedAt: number;
  /** Its statistics, if it lives in this process (else only its registry entry is known). */
  stats?: ConnectionStats;
}

/** One connection in detail (`GET /api/connections/:id`). */
export interface ObservedConnectionDetail extends ObservedConnection {
  /** A short rendering of its handler's state (see `Connection.handlerState`). */
  handlerState?: string;
  /** Its recent trace, while it is traced (see `Connection.recentTrace`). */
  trace: TraceEntry[];
}

/** What `GET /api/overview` returns. */
export interface ObserverOverview {
  /** This process's node name. */
  node: string;
  /** When, in ms since the Unix epoch. */
  time: number;
  /** The servers observed. */
  servers: ServerStats[];
  /** The pools observed (`lastError` rendered as text). */
  pools: PoolStats[];
  /** Every connection of the servers, pools and registries observed. */
  connections: ObservedConnection[];
}

/**
 * A running observer (see {@linkcode serveObserver}). Its JSON API, for scripts:
 *
 * - `GET /api/overview`: servers, pools and connections ({@linkcode ObserverOverview}).
 * - `GET /api/connections/:id`: one connection, its handler state and recent trace.
 * - `POST /api/connections/:id/stop`: stop it (202; it closes as `conn.stop()` closes it).
 * - `POST /api/connections/:id/trace` with `{"on": true|false}`: trace it or stop tracing it.
 * - `POST /api/servers/:name/suspend` and `…/resume`: as `server.suspend()` and `resume()`.
 *
 * A `POST` without the token (`Authorization: Bearer <token>`) gets 401 and changes nothing;
 * an unknown connection or server gets 404.
 */
export class Observer {
  /** The address the observer listens on. */
  readonly addr: Deno.NetAddr;
  /** The token that requests that change something carry. */
  readonly token: string;
  /** The page's address, with the token in its fragment (`http://127.0.0.1:PORT/#token=…`). */
  readonly url: string;
  readonly #http: Deno.HttpServer<Deno.NetAddr>;

  /** Made by {@linkcode serveObserver}; not constructed directly. */
  constructor(http: Deno.HttpServer<Deno.NetAddr>, token: string) {
    this.#http = http;
    this.addr = http.addr;
    this.token = token;
    this.url = `http://${hostForUrl(this.addr.hostname)}:${this.addr.port}/#token=${token}`;
  }

  /** Stop serving; resolves once the HTTP server is closed. The targets are not touched. */
  async stop(): Promise<void> {
    await this.#http.shutdown();
  }

  /** Stops the observer (`await using observer = await serveObserver(…)`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/**
 * Serve a live view of `target` (a server, a pool, a registry, or a list of them): one page of
 * plain HTML, CSS and JavaScript, served from this module, that lists the servers, pools and
 * connections, refreshing every second; sorts and filters the connections; shows one
 * connection's statistics, handler state and recent trace; and stops a connection, suspends or
 * resumes a server, or traces one connection. The same data is a JSON API for scripts (see
 * {@linkcode Observer}); `deno task observe URL` prints it as a live table in a terminal.
 *
 * Bound to `127.0.0.1` unless `hostname` says otherwise; every request that changes something
 * needs the token. Needs `--allow-net`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memory, serve, serveObserver } from "./mod.ts";
 * const server = await serve(async function* () {
 *   yield;
 * }, { transport: memory("observer-doc"), name: "echo" });
 * await using observer = await serveObserver(server);
 * const overview = await (await fetch(new URL("/api/overview", observer.url))).json();
 * assert.equal(overview.servers[0].name, "echo");
 * const refused = await fetch(new URL("/api/servers/echo/suspend", observer.url), { method: "POST" });
 * assert.equal(refused.status, 401);
 * await refused.body?.cancel();
 * await server.stop();
 * ```
 */
export async function serveObserver(
  target: ObserverTarget | ObserverTarget[],
  options: ObserverOptions = {},
): Promise<Observer> {
  const targets = Array.isArray(target) ? target : [target];
  for (const t of targets) checkTarget(t);
  const check = new OptionCheck("serveObserver", options);
  check.port("port");
  check.string("hostname");
  check.string("token");
  check.number("refresh", 50, { integer: true, max: MAX_DELAY });
  if (options.token === "") throw new TypeError("serveObserver: option token must not be empty");
  const token = options.token ?? randomToken();
  const hostname = options.hostname ?? "127.0.0.1";
  const view = new View(targets, options.refresh ?? 1000);
  const listening = Promise.withResolvers<void>();
  const http: Deno.HttpServer<Deno.NetAddr> = Deno.serve({
    hostname,
    port: options.port ?? 0,
    onListen: () => listening.resolve(),
    onError: (err) => json(500, { error: describeReason(err) }),
  }, (req): Promise<Response> => view.handle(req, token, http.addr));
  await listening.promise;
  return new Observer(http, token);
}

function checkTarget(target: unknown): void {
  if (target instanceof Server || target instanceof Pool) return;
  const t = target as Partial<Registry> | null;
  if (t !== null && typeof t === "object" && typeof t.list === "function") {
    if (typeof t.lookup === "function") return;
  }
  throw new TypeError(
    `serveObserver: a target must be a Server, a Pool or a Registry, not ${describeValue(target)}`,
  );
}

function randomToken(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function hostForUrl(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

// A 127/8 address, written as one: "127.evil.example" is a name (DNS rebinding), not loopback.
const LOOPBACK_V4 = /^127(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function isLoopback(hostname: string): boolean {
  return hostname === "localhost" || hostname === "::1" || LOOPBACK_V4.test(hostname);
}

// Whether the path's %-escapes decode; then each segment's do too (the ids and names in it).
function decodes(path: string): boolean {
  try {
    decodeURIComponent(path);
    return true;
  } catch {
    return false;
  }
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", "cache-control": "no-store" },
  });
}

// Compares without stopping at the first difference, so that timing tells nothing of the token.
function sameToken(given: string, token: string): boolean {
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(token);
  let diff = a.length ^ b.length;
  for (let i = 0; i < b.length; i++) diff |= (a[i] ?? 0) ^ b[i];
  return diff === 0;
}

const PAGE_HEADERS = {
  "cache-control": "no-store",
  "x-content-type-options": "nosniff",
  "content-security-policy":
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
};

// A connection the observer can act on: a local one (stats, trace) or another node's.
type Found = { local: Connection<unknown> } | { remote: { stop(): Promise<void> } };

// What the observer reads and acts on.
class View {
  readonly #servers: Server<unknown>[] = [];
  readonly #pools: Pool<unknown>[] = [];
  readonly #registries: Registry[] = [];
  readonly #refresh: number;

  constructor(targets: ObserverTarget[], refresh: number) {
    for (const t of targets) {
      if (t instanceof Server) this.#servers.push(t as Server<unknown>);
      else if (t instanceof Pool) this.#pools.push(t as Pool<unknown>);
      else this.#registries.push(t);
    }
    this.#refresh = refresh;
  }

  async handle(req: Request, token: string, addr: Deno.NetAddr): Promise<Response> {
    const host = req.headers.get("host") ?? "";
    if (isLoopback(addr.hostname) && !isLoopbackHost(host, addr.port)) {
      return json(403, { error: `unexpected Host ${JSON.stringify(host)}` });
    }
    const url = new URL(req.url);
    const path = url.pathname;
    if (!decodes(path)) {
      await req.body?.cancel();
      return json(400, { error: "malformed %-escape in the path" });
    }
    if (req.method === "GET" || req.method === "HEAD") {
      if (path === "/") {
        return new Response(observerHtml(this.#refresh), {
          headers: { ...PAGE_HEADERS, "content-type": "text/html; charset=utf-8" },
        });
      }
      if (path === "/observer.js") {
        return new Response(OBSERVER_JS, {
          headers: { ...PAGE_HEADERS, "content-type": "text/javascript; charset=utf-8" },
        });
      }
      if (path === "/observer.css") {
        return new Response(OBSERVER_CSS, {
          headers: { ...PAGE_HEADERS, "content-type": "text/css; charset=utf-8" },
        });
      }
      if (path === "/api/overview") return json(200, await this.overview());
      const one = /^\/api\/connections\/([^/]+)$/.exec(path);
      if (one) {
        const detail = await this.detail(decodeURIComponent(one[1]));
        return detail ? json(200, detail) : json(404, { error: "no such connection" });
      }
      return json(404, { error: "not found" });
    }
    if (req.method !== "POST") return json(405, { error: "method not allowed" });
    const auth = req.headers.get("authorization") ?? "";
    const given = auth.startsWith("Bearer ") ? auth.slice(7) : "";
    if (!sameToken(given, token)) {
      await req.body?.cancel();
      return json(401, { error: "a valid token is required (Authorization: Bearer <token>)" });
    }
    return await this.#act(path, req);
  }

  async #act(path: string, req: Request): Promise<Response> {
    const conn = /^\/api\/connections\/([^/]+)\/(stop|trace)$/.exec(path);
    if (conn) {
      const found = await this.#find(decodeURIComponent(conn[1]));
      if (found === undefined) {
        await req.body?.cancel();
        return json(404, { error: "no such connection" });
      }
      if (conn[2] === "stop") {
        await req.body?.cancel();
        if ("local" in found) {
          found.local.stop().catch(() => {}); // (it never rejects)
          return json(202, { stopping: true });
        }
        try {
          await found.remote.stop();
          return json(200, { stopped: true });
        } catch (err) {
          return json(502, { error: describeReason(err) });
        }
      }
      let on: unknown;
      try {
        on = (await req.json())?.on;
      } catch {
        on = undefined;
      }
      if (typeof on !== "boolean") {
        return json(400, { error: 'send {"on": true} or {"on": false}' });
      }
      if (!("local" in found)) {
        return json(409, { error: "that connection lives in another process" });
      }
      // Turned on from here, entries are kept for the page (recentTrace) and sent nowhere else;
      // a connection traced already keeps its own sink.
      if (!on) found.local.trace(false);
      else if (!found.local.stats().traced) found.local.trace(() => {});
      return json(200, { traced: on });
    }
    await req.body?.cancel();
    const server = /^\/api\/servers\/([^/]+)\/(suspend|resume)$/.exec(path);
    if (server) {
      const name = decodeURIComponent(server[1]);
      const found = this.#servers.find((s) => s.name === name);
      if (found === undefined) return json(404, { error: "no such server" });
      try {
        await (server[2] === "suspend" ? found.suspend() : found.resume());
      } catch (err) {
        return json(409, { error: describeReason(err) });
      }
      return json(200, { status: found.status });
    }
    return json(404, { error: "not found" });
  }

  async overview(): Promise<ObserverOverview> {
    const connections: ObservedConnection[] = [];
    const seen = new Set<string>();
    const add = (row: ObservedConnection) => {
      if (seen.has(row.id)) return;
      seen.add(row.id);
      connections.push(row);
    };
    for (const server of this.#servers) {
      for (const conn of server.connections()) add(rowOf(conn, server.name, "server"));
    }
    for (const pool of this.#pools) {
      for (const conn of pool.connections()) add(rowOf(conn, pool.name, "pool"));
    }
    for (const registry of this.#registries) {
      for (const entry of await registry.list()) {
        if (seen.has(entry.id)) continue;
        const local = await this.#localOf(registry, entry);
        add(local ? rowOf(local, entry.owner, entry.kind, entry) : entryRow(entry));
      }
    }
    return {
      node: this.#registries[0]?.node ?? localNode,
      time: Date.now(),
      servers: this.#servers.map((s) => s.stats()),
      pools: this.#pools.map((p) => {
        const stats = p.stats();
        return {
          ...stats,
          addresses: stats.addresses.map((a) =>
            a.lastError === undefined ? a : { ...a, lastError: describeReason(a.lastError) }
          ),
        };
      }),
      connections,
    };
  }

  async detail(id: string): Promise<ObservedConnectionDetail | undefined> {
    const row = (await this.overview()).connections.find((c) => c.id === id);
    if (row === undefined) return undefined;
    const found = await this.#find(id);
    if (found === undefined || !("local" in found)) return { ...row, trace: [] };
    return {
      ...row,
      handlerState: render(found.local.handlerState(), 2000),
      trace: found.local.recentTrace(),
    };
  }

  async #find(id: string): Promise<Found | undefined> {
    for (const owner of [...this.#servers, ...this.#pools]) {
      const conn = owner.connections().find((c) => c.id === id);
      if (conn) return { local: conn };
    }
    for (const registry of this.#registries) {
      const ref = await registry.lookup(id);
      if (ref === undefined || ref.id !== id) continue;
      return ref instanceof Connection ? { local: ref } : { remote: ref };
    }
    return undefined;
  }

  // A registry's entry of this process: its Connection (for its stats), if the registry has it.
  async #localOf(registry: Registry, entry: RegistryEntry): Promise<Connection | undefined> {
    if (entry.node !== registry.node) return undefined;
    const ref = await registry.lookup(entry.id);
    return ref instanceof Connection ? ref : undefined;
  }
}

function isLoopbackHost(host: string, port: number): boolean {
  const parts = /^(\[::1\]|[^:[\]]+)(?::(\d{1,5}))?$/.exec(host);
  if (parts === null) return false;
  const name = parts[1] === "[::1]" ? "::1" : parts[1];
  return isLoopback(name) && (parts[2] === undefined || Number(parts[2]) === port);
}

function addrText(addr: Addr | undefined): string {
  return addr === undefined ? "" : formatAddr(addr);
}

function rowOf(
  conn: Connection<unknown>,
  owner: string,
  kind: RegistryEntry["kind"],
  entry?: RegistryEntry,
): ObservedConnection {
  const stats = conn.stats();
  const row: ObservedConnection = {
    id: conn.id,
    owner: entry?.owner ?? owner,
    kind: entry?.kind ?? kind,
    node: entry?.node ?? localNode,
    remoteAddr: safeAddr(() => conn.remoteAddr),
    localAddr: safeAddr(() => conn.localAddr),
    startedAt: entry?.startedAt ?? stats.startedAt,
    stats,
  };
  const name = conn.name ?? entry?.name;
  if (name !== undefined) row.name = name;
  return row;
}

// (A reconnecting client between sockets still answers with its last socket's addresses.)
function safeAddr(read: () => Addr): string {
  try {
    return addrText(read());
  } catch {
    return "";
  }
}

function entryRow(entry: RegistryEntry): ObservedConnection {
  const row: ObservedConnection = {
    id: entry.id,
    owner: entry.owner,
    kind: entry.kind,
    node: entry.node,
    remoteAddr: addrText(entry.remoteAddr),
    localAddr: addrText(entry.localAddr),
    startedAt: entry.startedAt,
  };
  if (entry.name !== undefined) row.name = entry.name;
  return row;
}
