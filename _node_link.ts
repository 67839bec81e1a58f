// Node links: how the nodes of a KvRegistry reach each other's connections. Each node runs a
// link server built with this library (lengthPrefixed(4) framing, the frames of
// _link_codec.ts) on an address it publishes in its node entry, and keeps one client link per
// peer it talks to, connected on first use. Requests go one way on a link (a node's own
// requests on its own client links), answers come back on the same link.
//
// Authentication, on connect: the server sends a random nonce; the client answers with its own
// nonce and an HMAC-SHA-256, under the shared cluster secret, of both nonces, both node names and
// the namespace; the server checks it (or closes the link) and proves the secret back the same
// way, so neither end talks to a peer that does not hold the secret, and a recorded exchange
// cannot be replayed.
//
// Failure: a request to a node that is down fails at once with NodeDown (its entry is stale,
// its link refuses or breaks); requests under way when a link breaks, or when the registry
// declares its node dead, are rejected with NodeDown. Nothing waits for ever: a call keeps its
// timeout, a stop waits at most until the node is declared dead.

import type { HandlerGenerator } from "./actions.ts";
import { send, setTimeout as eventTimeout } from "./actions.ts";
import { connect } from "./client.ts";
import type { Connection, Logger } from "./connection.ts";
import {
  ConnectionClosed,
  describeReason,
  MalformedFrame,
  NodeDown,
  TimeoutError,
} from "./errors.ts";
import { lengthPrefixed } from "./framing.ts";
import { type ConnectionRef, MemoryRegistry } from "./registry.ts";
import { serve, type Server } from "./server.ts";
import { formatAddr } from "./_socket.ts";
import { clearTimer, startTimer, type Timer } from "./_timer.ts";
import {
  decodeFrame,
  encodeFrame,
  fromWireError,
  Kind,
  type LinkFrame,
  toWireError,
} from "./_link_codec.ts";

/** Where a node's link listens, as published in its node entry. */
export interface LinkAddress {
  hostname: string;
  port: number;
}

/** What the links need from their registry. */
export interface LinkHost {
  /** This node's name. */
  readonly node: string;
  /** The registry's namespace (part of what the secret signs). */
  readonly namespace: string;
  /** Where link trouble is reported. */
  readonly logger: Logger;
  /** A live connection of this node, by id. */
  localConnection(id: string): ConnectionRef | undefined;
  /** Why `node` is known to be down, or undefined if it is not known to be. */
  downReason(node: string): string | undefined;
  /** Where `node`'s link listens, read afresh, or why it cannot be reached. */
  resolve(node: string): Promise<LinkAddress | string>;
}

/** How the links listen and connect. */
export interface NodeLinksOptions {
  /** Address to listen on. */
  hostname: string;
  /** Port to listen on (0: any). */
  port: number;
  /** The hostname peers connect to (published with the port). */
  advertise: string;
  /** The largest frame a link takes, in bytes. */
  maxFrameLength: number;
  /** Ms a link connect and its authentication may take. */
  connectTimeout: number;
  /** The cluster secret, as an HMAC-SHA-256 key. */
  key: CryptoKey;
}

const enum LinkState {
  Connecting,
  Ready,
  Closed,
}

interface Pending {
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: Timer;
}

// One client link to a peer node.
class PeerLink {
  state: LinkState = LinkState.Connecting;
  conn: Connection<Uint8Array> | null = null;
  /** Frames written before the link was ready. */
  waiting: Uint8Array[] = [];
  readonly pending = new Map<number, Pending>();
  constructor(readonly node: string) {}

  write(frame: Uint8Array): void {
    if (this.state === LinkState.Ready) this.conn!.send(frame);
    else if (this.state === LinkState.Connecting) this.waiting.push(frame);
  }
}

// What a Hello, Auth or Welcome frame says: a node, a nonce, a MAC (as each kind has them).
interface Greeting {
  node: string;
  nonce: Uint8Array<ArrayBuffer>;
  mac: Uint8Array<ArrayBuffer>;
}

const PROTOCOL_VERSION = 1;
const NONCE_BYTES = 32;
const MAC_BYTES = 32; // HMAC-SHA-256

/** A node's link server and its client links to other nodes. */
export class NodeLinks {
  /** Where this node's link listens, as peers should dial it. */
  readonly address: LinkAddress;
  readonly #host: LinkHost;
  readonly #options: NodeLinksOptions;
  readonly #server: Server<Uint8Array>;
  readonly #registry: MemoryRegistry;
  readonly #peers = new Map<string, PeerLink>();
  readonly #opening = new Set<Promise<void>>();
  #nextRef = 0;
  #closed = false;

  private constructor(
    host: LinkHost,
    options: NodeLinksOptions,
    server: Server<Uint8Array>,
    registry: MemoryRegistry,
  ) {
    this.#host = host;
    this.#options = options;
    this.#server = server;
    this.#registry = registry;
    this.address = { hostname: options.advertise, port: (server.addr as Deno.NetAddr).port };
  }

  /** Start this node's link server. */
  static async start(host: LinkHost, options: NodeLinksOptions): Promise<NodeLinks> {
    // Link connections are the library's own: they stay out of the user's registries.
    const registry = new MemoryRegistry();
    const holder: { links?: NodeLinks } = {};
    const server = await serve(
      (conn: Connection<Uint8Array>) => holder.links!.#serveLink(conn),
      {
        hostname: options.hostname,
        port: options.port,
        framing: lengthPrefixed(4, { maxLength: options.maxFrameLength }),
        registry,
        name: `etcp-link:${host.node}`,
        logger: host.logger,
        shutdownTimeout: 1000,
        maxBuffered: 64 * 1024 * 1024,
        maxConnections: Infinity,
      },
    );
    holder.links = new NodeLinks(host, options, server, registry);
    return holder.links;
  }

  /**
   * Send request `kind` (`Call` or `Stop`) for connection `id` on `node` and wait for the answer:
   * its value, the remote error, `TimeoutError` after `timeout` ms (`Call`), or `NodeDown`.
   */
  request(node: string, kind: Kind, id: string, value: unknown, timeout: number): Promise<unknown> {
    const why = this.#closed ? "this node's registry is closed" : this.#host.downReason(node);
    if (why !== undefined) return Promise.reject(new NodeDown(node, why));
    const ref = this.#nextRef = (this.#nextRef + 1) >>> 0;
    let frame: Uint8Array;
    try {
      frame = encodeFrame(kind, ref, id, value, timeout);
    } catch (err) {
      return Promise.reject(err);
    }
    const link = this.#link(node);
    return new Promise((resolve, reject) => {
      const timer = kind === Kind.Call && Number.isFinite(timeout)
        ? startTimer(() => {
          link.pending.delete(ref);
          reject(new TimeoutError(`call to connection ${id} timed out after ${timeout} ms`));
        }, timeout)
        : undefined;
      link.pending.set(ref, { resolve, reject, timer });
      link.write(frame);
    });
  }

  /**
   * Send message `kind` (`Cast`, `Info`, `Send`) to connection `id` on `node`, not waiting for
   * anything: dropped if the node is down. Throws if `value` cannot be serialized.
   */
  post(node: string, kind: Kind, id: string, value: unknown): void {
    const frame = encodeFrame(kind, 0, id, value);
    if (this.#closed || this.#host.downReason(node) !== undefined) return;
    this.#link(node).write(frame);
  }

  /** `node` was declared dead: close its link and fail what waits on it with `NodeDown`. */
  down(node: string, why: string): void {
    const link = this.#peers.get(node);
    if (link) this.#fail(link, why);
  }

  /** Close every link and the link server. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const conns: Promise<unknown>[] = [];
    for (const link of [...this.#peers.values()]) {
      if (link.conn) conns.push(link.conn.closed);
      this.#fail(link, "this node's registry is closed");
    }
    await Promise.all([...this.#opening]);
    await this.#server.stop("shutdown", { timeout: 1000 });
    // Client links that came up while closing: every link connection is in the links' registry.
    const left = await this.#registry.list();
    await Promise.all(left.map(async ({ id }) => (await this.#registry.lookup(id))?.stop()));
    await Promise.all(conns);
  }

  // ---- Client side --------------------------------------------------------------------------

  #link(node: string): PeerLink {
    let link = this.#peers.get(node);
    if (link !== undefined && link.state !== LinkState.Closed) return link;
    link = new PeerLink(node);
    this.#peers.set(node, link);
    const opening = this.#open(link);
    this.#opening.add(opening);
    opening.finally(() => this.#opening.delete(opening));
    return link;
  }

  async #open(link: PeerLink): Promise<void> {
    const { maxFrameLength, connectTimeout } = this.#options;
    try {
      const where = await this.#host.resolve(link.node);
      if (typeof where === "string") return this.#fail(link, where);
      if (link.state === LinkState.Closed) return;
      const conn = await connect((c: Connection<Uint8Array>) => this.#clientLink(c, link), {
        hostname: where.hostname,
        port: where.port,
        framing: lengthPrefixed(4, { maxLength: maxFrameLength }),
        registry: this.#registry,
        connectTimeout,
        logger: this.#host.logger,
        shutdownTimeout: 1000,
        maxBuffered: 64 * 1024 * 1024,
      });
      if ((link.state as LinkState) === LinkState.Closed) conn.stop();
    } catch (err) {
      this.#fail(link, `its link cannot be reached (${describeReason(err)})`, err);
    }
  }

  // A client link's handler: authenticate, then settle requests as answers come.
  async *#clientLink(conn: Connection<Uint8Array>, link: PeerLink): HandlerGenerator<Uint8Array> {
    link.conn = conn;
    const { key, connectTimeout } = this.#options;
    const me = this.#host.node;
    let why = "its link closed";
    try {
      let ev = yield eventTimeout(connectTimeout);
      if (ev.type !== "packet") {
        why = "its link did not greet this node";
        return;
      }
      const hello = greeting(ev.data, Kind.Hello);
      if (hello.node !== link.node) {
        why = `its link address now serves node ${hello.node}`;
        return;
      }
      const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
      const said = transcript("client", this.#host.namespace, link.node, me, hello.nonce, nonce);
      const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, said));
      ev = yield [
        send(encodeFrame(Kind.Auth, PROTOCOL_VERSION, me, concat(nonce, mac))),
        eventTimeout(connectTimeout),
      ];
      if (ev.type !== "packet") {
        why = "its link refused this node (a different cluster secret?)";
        return;
      }
      const welcome = greeting(ev.data, Kind.Welcome);
      const expected = transcript(
        "server",
        this.#host.namespace,
        link.node,
        me,
        hello.nonce,
        nonce,
      );
      if (!await crypto.subtle.verify("HMAC", key, welcome.mac, expected)) {
        why = "its link failed the cluster secret";
        this.#host.logger.warn(`etcp: node link to ${link.node}: ${why}`);
        return;
      }
      if (link.state !== LinkState.Connecting) return;
      link.state = LinkState.Ready;
      for (const frame of link.waiting) conn.send(frame);
      link.waiting = [];
      ev = yield eventTimeout(null);
      for (;;) {
        if (ev.type === "packet") {
          this.#answer(link, decodeFrame(ev.data));
          ev = yield;
        } else if (ev.type === "disconnect" || ev.type === "shutdown") {
          why = ev.type === "shutdown" ? "this node's registry is closed" : "its link closed";
          return;
        } else if (ev.type === "frameError") {
          why = `its link sent a bad frame (${describeReason(ev.error)})`;
          return;
        } else ev = yield;
      }
    } catch (err) {
      why = `its link sent a bad frame (${describeReason(err)})`;
      this.#host.logger.warn(`etcp: node link to ${link.node}: ${why}`);
    } finally {
      this.#fail(link, why);
    }
  }

  #answer(link: PeerLink, frame: LinkFrame): void {
    if (frame.kind !== Kind.Ok && frame.kind !== Kind.Err) {
      throw new MalformedFrame(`link: unexpected frame kind ${frame.kind} in an answer`);
    }
    const pending = link.pending.get(frame.ref);
    if (pending === undefined) return; // timed out
    link.pending.delete(frame.ref);
    clearTimer(pending.timer);
    if (frame.kind === Kind.Ok) pending.resolve(frame.value);
    else pending.reject(fromWireError(frame.value, frame.id));
  }

  #fail(link: PeerLink, why: string, cause?: unknown): void {
    if (link.state === LinkState.Closed) return;
    link.state = LinkState.Closed;
    if (this.#peers.get(link.node) === link) this.#peers.delete(link.node);
    const err = new NodeDown(link.node, why, cause === undefined ? undefined : { cause });
    for (const pending of link.pending.values()) {
      clearTimer(pending.timer);
      pending.reject(err);
    }
    link.pending.clear();
    link.waiting = [];
    link.conn?.stop();
  }

  // ---- Server side --------------------------------------------------------------------------

  // A link server connection's handler: challenge the peer, then serve its requests.
  async *#serveLink(conn: Connection<Uint8Array>): HandlerGenerator<Uint8Array> {
    const { key, connectTimeout } = this.#options;
    const me = this.#host.node;
    const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
    let ev = yield [
      send(encodeFrame(Kind.Hello, PROTOCOL_VERSION, me, nonce)),
      eventTimeout(connectTimeout),
    ];
    if (ev.type !== "packet") return;
    const peer = formatAddr(conn.remoteAddr);
    let auth: Greeting;
    try {
      auth = greeting(ev.data, Kind.Auth);
    } catch (err) {
      this.#host.logger.warn(`etcp: node link: refused ${peer}: ${describeReason(err)}`);
      return;
    }
    const said = transcript("client", this.#host.namespace, me, auth.node, nonce, auth.nonce);
    if (!await crypto.subtle.verify("HMAC", key, auth.mac, said)) {
      this.#host.logger.warn(
        `etcp: node link: refused ${peer} (node ${auth.node}): it failed the cluster secret`,
      );
      return;
    }
    const answer = transcript("server", this.#host.namespace, me, auth.node, nonce, auth.nonce);
    const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, answer));
    ev = yield [
      send(encodeFrame(Kind.Welcome, PROTOCOL_VERSION, me, mac)),
      eventTimeout(null),
    ];
    for (;;) {
      if (ev.type === "packet") {
        try {
          this.#serveRequest(conn, decodeFrame(ev.data));
        } catch (err) {
          this.#host.logger.warn(`etcp: node link from ${auth.node}: ${describeReason(err)}`);
          return;
        }
        ev = yield;
      } else if (ev.type === "disconnect" || ev.type === "shutdown" || ev.type === "frameError") {
        return; // a frame error ends the link with that error, logged by the connection
      } else ev = yield;
    }
  }

  #serveRequest(conn: Connection<Uint8Array>, frame: LinkFrame): void {
    const { kind, ref, id, value } = frame;
    const timeout = Number.isNaN(frame.timeout) ? undefined : frame.timeout;
    const target = this.#host.localConnection(id);
    switch (kind) {
      case Kind.Call:
        if (target === undefined) {
          return answer(conn, Kind.Err, ref, id, toWireError(new ConnectionClosed(id, "noproc")));
        }
        target.call(value, { timeout }).then(
          (result) => answer(conn, Kind.Ok, ref, id, result),
          (err) => answer(conn, Kind.Err, ref, id, toWireError(err)),
        );
        return;
      case Kind.Stop:
        if (target === undefined) return answer(conn, Kind.Ok, ref, id, undefined);
        target.stop(value, { timeout }).then(
          () => answer(conn, Kind.Ok, ref, id, undefined),
          (err) => answer(conn, Kind.Err, ref, id, toWireError(err)),
        );
        return;
      case Kind.Cast:
        return target?.cast(value);
      case Kind.Info:
        return target?.info(value);
      case Kind.Send:
        try {
          target?.send(value);
        } catch (err) {
          this.#host.logger.debug(`etcp: node link: send to ${id}: ${describeReason(err)}`);
        }
        return;
      default:
        throw new MalformedFrame(`link: unexpected frame kind ${kind} in a request`);
    }
  }
}

// Answer request `ref` on `conn`; a value that cannot cross the link is answered as an error.
function answer(
  conn: Connection<Uint8Array>,
  kind: Kind.Ok | Kind.Err,
  ref: number,
  id: string,
  value: unknown,
): void {
  let frame: Uint8Array;
  try {
    frame = encodeFrame(kind, ref, id, value);
  } catch (err) {
    frame = encodeFrame(Kind.Err, ref, id, toWireError(err));
  }
  conn.send(frame);
}

// A Hello (nonce), Auth (nonce and MAC) or Welcome (MAC) frame, checked: plain bytes only.
function greeting(data: Uint8Array, kind: Kind): Greeting {
  const frame = decodeFrame(data, false);
  const value = frame.value;
  const length = (kind === Kind.Hello ? NONCE_BYTES : 0) + (kind === Kind.Welcome ? MAC_BYTES : 0) +
    (kind === Kind.Auth ? NONCE_BYTES + MAC_BYTES : 0);
  if (
    frame.kind !== kind || frame.ref !== PROTOCOL_VERSION || frame.id === "" ||
    !(value instanceof Uint8Array) || value.length !== length
  ) {
    throw new MalformedFrame(`link: expected a ${GREETINGS[kind] ?? kind} greeting`);
  }
  const bytes = value as Uint8Array<ArrayBuffer>;
  const nonceBytes = kind === Kind.Welcome ? 0 : NONCE_BYTES;
  return {
    node: frame.id,
    nonce: bytes.subarray(0, nonceBytes),
    mac: bytes.subarray(nonceBytes),
  };
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

const GREETINGS: Record<number, string> = {
  [Kind.Hello]: "Hello",
  [Kind.Auth]: "Auth",
  [Kind.Welcome]: "Welcome",
};

// What each side signs: its role, the namespace, both node names and both nonces.
function transcript(
  role: "client" | "server",
  namespace: string,
  serverNode: string,
  clientNode: string,
  serverNonce: Uint8Array,
  clientNonce: Uint8Array,
): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(
    `etcp-link/1 ${role}\n${
      JSON.stringify([namespace, serverNode, clientNode, hex(serverNonce), hex(clientNonce)])
    }`,
  );
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
