/**
 * The transport interface: how the library listens, accepts and connects. `tcp()`, `tls()`,
 * `unix()` and `memory()` ship; write your own by implementing {@linkcode Transport}.
 *
 * @module
 */

import type { TlsPeerCertificate } from "./tls.ts";

/** The address of an in-process {@linkcode memory} endpoint. */
export interface MemoryAddr {
  /** Discriminant. */
  transport: "memory";
  /** The name the server listens on. */
  name: string;
}

/** An endpoint address: Deno's own, or a memory transport's. */
export type Addr = Deno.Addr | MemoryAddr;

/**
 * A stream connection: the subset of `Deno.Conn` the library uses. Any `Deno.Conn`
 * (TCP, TLS, Unix) already is one.
 */
export interface Conn {
  /** This end's address. */
  readonly localAddr: Addr;
  /** The peer's address. */
  readonly remoteAddr: Addr;
  /** Read into `p`; resolve with the byte count, or `null` at end of stream. */
  read(p: Uint8Array): Promise<number | null>;
  /** Write some of `p` (at least one byte); resolve with how many were written. */
  write(p: Uint8Array): Promise<number>;
  /**
   * Close the writing side (half-close, TCP's FIN): the peer reads the end of the stream, this
   * side may go on reading. The `closeWrite` action calls it once pending output is written; a
   * transport that cannot half-close rejects (the handler then gets `disconnect` with
   * `side: "write"` and the error).
   */
  closeWrite(): Promise<void>;
  /** Close both sides and release the resource; pending reads reject. */
  close(): void;
  /**
   * Complete a handshake the connection needs before its handler may run (TLS), as Ranch's
   * transport `handshake` callback. Optional: without it the connection is ready at once.
   * The result is ignored (`Deno.TlsConn` resolves with its handshake info).
   */
  handshake?(): Promise<unknown>;
  /** Disable (`true`) or enable Nagle's algorithm (`TCP_NODELAY`). TCP only. */
  setNoDelay?(on: boolean): void;
  /**
   * Turn TCP keep-alive probes on or off (`SO_KEEPALIVE`). On or off only: the probes' idle
   * time, interval and count are the operating system's. TCP only.
   */
  setKeepAlive?(on: boolean): void;
  /** Let this connection keep the process alive again (the default), after `unref`. */
  ref?(): void;
  /** Stop this connection from keeping the process alive while it waits for I/O. */
  unref?(): void;
  /** TLS: the protocol ALPN chose in the handshake (`null` if none); absent on other transports. */
  readonly alpnProtocol?: string | null;
  /** What a PROXY protocol header said of this connection (servers with `proxyProtocol` only). */
  readonly proxy?: ProxyHeader;
  /** TLS over `node:tls`: the peer's certificate after the handshake (`null` if it gave none). */
  readonly peerCertificate?: TlsPeerCertificate | null;
}

/**
 * A PROXY protocol header (HAProxy's v1 text or v2 binary form), as a server with
 * `proxyProtocol: true` read it before the handler ran.
 */
export interface ProxyHeader {
  /** 1 (text) or 2 (binary). */
  readonly version: 1 | 2;
  /** `"PROXY"`: the addresses are the original client's and destination's; `"LOCAL"`: the proxy's own connection (health checks), addresses are the socket's. */
  readonly command: "PROXY" | "LOCAL";
  /** The original client, if the header carried one. */
  readonly source?: Deno.NetAddr | Deno.UnixAddr;
  /** The address the client connected to, if the header carried one. */
  readonly destination?: Deno.NetAddr | Deno.UnixAddr;
  /** v2 type-length-value extensions, raw (e.g. type 0x01 ALPN, 0x02 authority). */
  readonly tlvs: ReadonlyArray<{ readonly type: number; readonly value: Uint8Array }>;
}

/** A listening endpoint. */
export interface Listener<A extends Addr = Addr> {
  /** Where it listens (with the real port when asked for port 0). */
  readonly addr: A;
  /** Wait for the next connection. Only one `accept` may be pending at a time. */
  accept(): Promise<Conn>;
  /** Stop listening; a pending `accept` rejects. */
  close(): void;
  /** Let this listener keep the process alive again (the default), after `unref`. */
  ref?(): void;
  /** Stop this listener (its pending `accept`) from keeping the process alive. */
  unref?(): void;
}

/** What `serve` passes to {@linkcode Transport.listen}. */
export interface ListenOptions {
  /**
   * Host name or address to bind. Unset, the transport picks: `tcp()` listens on every
   * address, IPv6 and IPv4 where the system allows one socket to take both.
   */
  hostname?: string;
  /** Port to bind; 0 picks a free one. */
  port?: number;
  /** Let several listeners share the address (used when a server runs several acceptors). */
  reusePort?: boolean;
}

/** What `connect` passes to {@linkcode Transport.connect}. */
export interface ConnectOptions {
  /** Host name or address of the server. */
  hostname?: string;
  /** Port of the server. */
  port?: number;
}

/**
 * How to listen and connect (etcp's transporter behaviour).
 *
 * @example A transport that records every accepted connection
 * ```ts
 * import assert from "node:assert/strict";
 * import { type Addr, tcp, type Transport } from "../mod.ts";
 * const base = tcp();
 * const accepted: Addr[] = [];
 * const logged: Transport = {
 *   name: "logged-tcp",
 *   async listen(options) {
 *     const listener = await base.listen(options);
 *     return {
 *       addr: listener.addr,
 *       close: () => listener.close(),
 *       async accept() {
 *         const conn = await listener.accept();
 *         accepted.push(conn.remoteAddr); // or log it
 *         return conn;
 *       },
 *     };
 *   },
 *   connect: (options) => base.connect(options),
 * };
 * const listener = await logged.listen({ hostname: "127.0.0.1", port: 0 });
 * const port = (listener.addr as Deno.NetAddr).port;
 * const [client, server] = await Promise.all([
 *   logged.connect({ hostname: "127.0.0.1", port }),
 *   listener.accept(),
 * ]);
 * assert.deepEqual(accepted, [server.remoteAddr]);
 * assert.equal((server.remoteAddr as Deno.NetAddr).port, (client.localAddr as Deno.NetAddr).port);
 * client.close();
 * server.close();
 * listener.close();
 * ```
 */
export interface Transport<A extends Addr = Addr> {
  /** A short name for logs. */
  readonly name: string;
  /** Start listening. */
  listen(options: ListenOptions): Listener<A> | Promise<Listener<A>>;
  /** Open a connection. */
  connect(options: ConnectOptions): Promise<Conn>;
}
