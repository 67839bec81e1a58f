/**
 * The transport interface: how the library listens, accepts and connects. `tcp()` and
 * `memory()` ship; write your own by implementing {@linkcode Transport}.
 *
 * @module
 */

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
  /** Close the writing side (half-close). */
  closeWrite(): Promise<void>;
  /** Close both sides and release the resource; pending reads reject. */
  close(): void;
}

/** A listening endpoint. */
export interface Listener {
  /** Where it listens (with the real port when asked for port 0). */
  readonly addr: Addr;
  /** Wait for the next connection. Only one `accept` may be pending at a time. */
  accept(): Promise<Conn>;
  /** Stop listening; a pending `accept` rejects. */
  close(): void;
}

/** What `serve` passes to {@linkcode Transport.listen}. */
export interface ListenOptions {
  /** Host name or address to bind. */
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
 * @example A transport that logs every accepted connection
 * ```ts
 * import { tcp, type Transport } from "../mod.ts";
 * const base = tcp();
 * const logged: Transport = {
 *   name: "logged-tcp",
 *   async listen(options) {
 *     const listener = await base.listen(options);
 *     return {
 *       addr: listener.addr,
 *       close: () => listener.close(),
 *       async accept() {
 *         const conn = await listener.accept();
 *         console.log("accepted", conn.remoteAddr);
 *         return conn;
 *       },
 *     };
 *   },
 *   connect: (options) => base.connect(options),
 * };
 * console.assert(logged.name === "logged-tcp");
 * ```
 */
export interface Transport {
  /** A short name for logs. */
  readonly name: string;
  /** Start listening. */
  listen(options: ListenOptions): Listener | Promise<Listener>;
  /** Open a connection. */
  connect(options: ConnectOptions): Promise<Conn>;
}
