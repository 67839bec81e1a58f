/**
 * In-process socket pairs: a server and its clients in one process, with no ports, so that
 * logic tests run fast and deterministically. Writes stall while the peer holds
 * `bufferSize` unread bytes, as a TCP socket's would, and the errors are those Deno's TCP
 * sockets give:
 *
 * - after `close()` on one side, that side's pending read and stalled writes reject with
 *   `Deno.errors.Interrupted`, and any later call with `Deno.errors.BadResource`;
 * - its peer reads what was already sent, then end of stream (`null`), and its writes (stalled
 *   or new) reject with `Deno.errors.BrokenPipe`;
 * - a client whose connection no listener accepted before the last one closed gets
 *   `Deno.errors.ConnectionReset` from its next read;
 * - after `closeWrite()` (a half-close) the peer reads what was sent, then end of stream, while
 *   this side goes on reading; its own writes then fail with `Deno.errors.BrokenPipe`.
 *
 * @module
 */

import type { Conn, Listener, MemoryAddr, Transport } from "./transport.ts";
import { OptionCheck } from "../_options.ts";

/** Options of {@linkcode memory}. */
export interface MemoryOptions {
  /** Unread bytes a side holds before its peer's writes wait (default 64 KiB). */
  bufferSize?: number;
}

interface Waiter<V> {
  resolve(value: V): void;
  reject(err: Error): void;
}

/** The listeners of one name: connections not yet accepted, and the accepts waiting. */
class Hub {
  readonly ready: MemoryConn[] = [];
  readonly waiting: Waiter<MemoryConn>[] = []; // pending accepts of open listeners, oldest first
  listeners = 0;
  readonly reusePort: boolean;

  constructor(reusePort: boolean) {
    this.reusePort = reusePort;
  }

  offer(conn: MemoryConn): void {
    const waiter = this.waiting.shift();
    if (waiter) waiter.resolve(conn);
    else this.ready.push(conn);
  }
}

const hubs = new Map<string, Hub>();

/** One side of an in-process socket pair. */
class MemoryConn implements Conn {
  readonly localAddr: MemoryAddr;
  readonly remoteAddr: MemoryAddr;
  peer!: MemoryConn;
  readonly #limit: number;
  #chunks: Uint8Array[] = []; // unread bytes, oldest first
  #bytes = 0;
  #eof = false; // the peer will write no more
  #reset: Error | null = null; // the next read fails with this (then end of stream)
  #closed = false;
  #writeClosed = false;
  #reader: (Waiter<number | null> & { p: Uint8Array }) | null = null;
  #stalled: Waiter<void>[] = []; // this side's writes, waiting for the peer to read

  constructor(local: string, remote: string, limit: number) {
    this.localAddr = { transport: "memory", name: local };
    this.remoteAddr = { transport: "memory", name: remote };
    this.#limit = limit;
  }

  #copyOut(p: Uint8Array): number {
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const chunk = this.#chunks[0];
      const take = Math.min(chunk.length, p.length - n);
      p.set(chunk.subarray(0, take), n);
      n += take;
      if (take === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(take);
    }
    this.#bytes -= n;
    if (this.#bytes < this.#limit) {
      for (const w of this.peer.#stalled.splice(0)) w.resolve();
    }
    return n;
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.reject(new Deno.errors.BadResource("connection is closed"));
    if (this.#reader) return Promise.reject(new Deno.errors.Busy("another read is pending"));
    if (this.#bytes > 0) return Promise.resolve(this.#copyOut(p));
    const reset = this.#reset;
    if (reset) {
      this.#reset = null;
      return Promise.reject(reset);
    }
    if (this.#eof) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this.#reader = { p, resolve, reject };
    });
  }

  async write(p: Uint8Array): Promise<number> {
    if (this.#closed) throw new Deno.errors.BadResource("connection is closed");
    if (this.#writeClosed) throw new Deno.errors.BrokenPipe("writing side is closed");
    const peer = this.peer;
    if (peer.#closed) throw new Deno.errors.BrokenPipe("peer closed the connection");
    peer.#receive(p.slice());
    if (peer.#bytes >= peer.#limit) {
      await new Promise<void>((resolve, reject) => this.#stalled.push({ resolve, reject }));
    }
    return p.length;
  }

  closeWrite(): Promise<void> {
    if (this.#closed) return Promise.reject(new Deno.errors.BadResource("connection is closed"));
    if (!this.#writeClosed) {
      this.#writeClosed = true;
      this.peer.#end();
    }
    return Promise.resolve();
  }

  close(): void {
    if (this.#closed) throw new Deno.errors.BadResource("connection is already closed");
    this.#shut();
    this.peer.#peerClosed(null);
  }

  /** Close a connection no listener accepted: its peer reads a reset, as from the backlog. */
  abort(): void {
    if (this.#closed) return;
    this.#shut();
    this.peer.#peerClosed(
      new Deno.errors.ConnectionReset("the listener closed before accepting the connection"),
    );
  }

  // This side closes: what it was doing fails as a local close does in Deno.
  #shut(): void {
    this.#closed = true;
    this.#chunks = [];
    this.#bytes = 0;
    const reader = this.#reader;
    this.#reader = null;
    reader?.reject(new Deno.errors.Interrupted("connection closed while reading"));
    for (const w of this.#stalled.splice(0)) {
      w.reject(new Deno.errors.Interrupted("connection closed while writing"));
    }
  }

  // Bytes from the peer arrive.
  #receive(bytes: Uint8Array): void {
    this.#chunks.push(bytes);
    this.#bytes += bytes.length;
    const reader = this.#reader;
    if (reader) {
      this.#reader = null;
      reader.resolve(this.#copyOut(reader.p));
    }
  }

  // The peer will write no more: reads end once the bytes already here are read.
  #end(): void {
    this.#eof = true;
    const reader = this.#reader;
    if (reader && this.#bytes === 0) {
      this.#reader = null;
      reader.resolve(null);
    }
  }

  // The peer closed (`reset` set: it never accepted): writes here fail from now on.
  #peerClosed(reset: Error | null): void {
    if (this.#closed) return;
    if (reset) {
      const reader = this.#reader;
      if (reader && this.#bytes === 0) {
        this.#reader = null;
        reader.reject(reset);
      } else {
        this.#reset = reset;
      }
    }
    this.#end();
    for (const w of this.#stalled.splice(0)) {
      w.reject(new Deno.errors.BrokenPipe("peer closed the connection"));
    }
  }
}

let pairs = 0;

/**
 * An in-process transport: `serve` on `memory("name")` and `connect` to the same name.
 * Several listeners may share a name when each asks for `reusePort` (a server with
 * `acceptors > 1`); each new connection goes to one of their pending accepts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, memory, send, serve } from "../mod.ts";
 * const transport = memory("doc-example");
 * const server = await serve(async function* () {
 *   yield send(new TextEncoder().encode("hi"));
 * }, { transport });
 * const received = Promise.withResolvers<Uint8Array>();
 * const client = await connect(async function* () {
 *   const ev = yield;
 *   if (ev.type === "packet") received.resolve(ev.data);
 * }, { transport });
 * assert.equal(new TextDecoder().decode(await received.promise), "hi");
 * await client.stop();
 * await server.stop();
 * ```
 */
export function memory(name = "default", options: MemoryOptions = {}): Transport<MemoryAddr> {
  // (0 or less would hold every write for ever; NaN would never hold one.)
  new OptionCheck("memory", options).number("bufferSize", 1, { integer: true, infinite: true });
  const limit = options.bufferSize ?? 64 * 1024;
  return {
    name: "memory",
    listen({ reusePort }) {
      let hub = hubs.get(name);
      if (hub && !(reusePort && hub.reusePort)) {
        throw new Deno.errors.AddrInUse(`memory address "${name}" is in use`);
      }
      if (!hub) hubs.set(name, hub = new Hub(reusePort ?? false));
      const shared = hub;
      shared.listeners++;
      let closed = false;
      let pending: Waiter<MemoryConn> | null = null; // this listener's accept under way
      const listener: Listener<MemoryAddr> = {
        addr: { transport: "memory", name },
        accept() {
          if (closed) return Promise.reject(new Deno.errors.BadResource("listener is closed"));
          if (pending) return Promise.reject(new Deno.errors.Busy("another accept is pending"));
          const ready = shared.ready.shift();
          if (ready) return Promise.resolve(ready);
          return new Promise<MemoryConn>((resolve, reject) => {
            const waiter: Waiter<MemoryConn> = {
              resolve(conn) {
                pending = null;
                resolve(conn);
              },
              reject(err) {
                pending = null;
                reject(err);
              },
            };
            pending = waiter;
            shared.waiting.push(waiter);
          });
        },
        close() {
          if (closed) throw new Deno.errors.BadResource("listener is already closed");
          closed = true;
          // Its own pending accept fails, and is no longer offered connections.
          if (pending) {
            const waiter = pending;
            shared.waiting.splice(shared.waiting.indexOf(waiter), 1);
            waiter.reject(new Deno.errors.BadResource("listener is closed"));
          }
          if (--shared.listeners > 0) return;
          hubs.delete(name);
          for (const conn of shared.ready.splice(0)) conn.abort();
        },
      };
      return listener;
    },
    connect() {
      const hub = hubs.get(name);
      if (!hub) {
        return Promise.reject(
          new Deno.errors.ConnectionRefused(`nothing listens on memory address "${name}"`),
        );
      }
      const id = `${name}#${++pairs}`;
      const client = new MemoryConn(id, name, limit);
      const server = new MemoryConn(name, id, limit);
      client.peer = server;
      server.peer = client;
      hub.offer(server);
      return Promise.resolve(client);
    },
  };
}
