/**
 * In-process socket pairs: a server and its clients in one process, with no ports, so that
 * logic tests run fast and deterministically. Writes stall while the peer holds
 * `bufferSize` unread bytes, as a TCP socket's would.
 *
 * @module
 */

import type { Conn, Listener, MemoryAddr, Transport } from "./transport.ts";

/** Options of {@linkcode memory}. */
export interface MemoryOptions {
  /** Unread bytes a side holds before its peer's writes wait (default 64 KiB). */
  bufferSize?: number;
}

class Hub {
  readonly ready: MemoryConn[] = [];
  readonly waiting: Array<{ resolve(conn: MemoryConn): void; reject(err: Error): void }> = [];
  listeners = 0;

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
  #closed = false;
  #reader: { p: Uint8Array; resolve(n: number | null): void; reject(e: Error): void } | null = null;
  #drained: Array<{ resolve(): void; reject(e: Error): void }> = [];

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
      for (const w of this.#drained.splice(0)) w.resolve();
    }
    return n;
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.reject(new Deno.errors.BadResource("connection is closed"));
    if (this.#reader) return Promise.reject(new Deno.errors.Busy("another read is pending"));
    if (this.#bytes > 0) return Promise.resolve(this.#copyOut(p));
    if (this.#eof) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this.#reader = { p, resolve, reject };
    });
  }

  /** Called by the peer: bytes arrive. */
  deliver(bytes: Uint8Array): Promise<void> {
    this.#chunks.push(bytes);
    this.#bytes += bytes.length;
    const reader = this.#reader;
    if (reader) {
      this.#reader = null;
      reader.resolve(this.#copyOut(reader.p));
    }
    if (this.#bytes < this.#limit) return Promise.resolve();
    return new Promise((resolve, reject) => this.#drained.push({ resolve, reject }));
  }

  /** Called by the peer: it will write no more. */
  end(): void {
    this.#eof = true;
    const reader = this.#reader;
    if (reader && this.#bytes === 0) {
      this.#reader = null;
      reader.resolve(null);
    }
  }

  /** Called by the peer: it closed, so writes here now fail. */
  reset(): void {
    this.end();
    for (const w of this.#drained.splice(0)) {
      w.reject(new Deno.errors.ConnectionReset("peer closed the connection"));
    }
  }

  get peerGone(): boolean {
    return this.#closed;
  }

  async write(p: Uint8Array): Promise<number> {
    if (this.#closed) throw new Deno.errors.BadResource("connection is closed");
    if (this.peer.peerGone) throw new Deno.errors.ConnectionReset("peer closed the connection");
    if (this.#writeClosed) throw new Deno.errors.BrokenPipe("writing side is closed");
    await this.peer.deliver(p.slice());
    return p.length;
  }

  #writeClosed = false;

  closeWrite(): Promise<void> {
    if (!this.#writeClosed) {
      this.#writeClosed = true;
      this.peer.end();
    }
    return Promise.resolve();
  }

  close(): void {
    if (this.#closed) throw new Deno.errors.BadResource("connection is already closed");
    this.#closed = true;
    this.#chunks = [];
    this.#bytes = 0;
    const reader = this.#reader;
    this.#reader = null;
    reader?.reject(new Deno.errors.Interrupted("connection closed while reading"));
    for (const w of this.#drained.splice(0)) {
      w.reject(new Deno.errors.Interrupted("connection closed while writing"));
    }
    this.peer.reset();
  }
}

let pairs = 0;

/**
 * An in-process transport: `serve` on `memory("name")` and `connect` to the same name.
 *
 * @example
 * ```ts
 * import { connect, memory, send, serve } from "../mod.ts";
 * const transport = memory("doc-example");
 * const server = await serve(async function* () {
 *   yield send(new TextEncoder().encode("hi"));
 * }, { transport });
 * const client = await connect(async function* () {}, { transport });
 * await client.stop();
 * await server.stop();
 * ```
 */
export function memory(name = "default", options: MemoryOptions = {}): Transport {
  const limit = options.bufferSize ?? 64 * 1024;
  return {
    name: "memory",
    listen({ reusePort }) {
      let hub = hubs.get(name);
      if (hub && !reusePort) {
        throw new Deno.errors.AddrInUse(`memory address "${name}" is in use`);
      }
      if (!hub) hubs.set(name, hub = new Hub());
      const shared = hub;
      shared.listeners++;
      let closed = false;
      const listener: Listener = {
        addr: { transport: "memory", name },
        accept() {
          if (closed) return Promise.reject(new Deno.errors.BadResource("listener is closed"));
          const ready = shared.ready.shift();
          if (ready) return Promise.resolve(ready);
          return new Promise((resolve, reject) => shared.waiting.push({ resolve, reject }));
        },
        close() {
          if (closed) return;
          closed = true;
          if (--shared.listeners > 0) return;
          hubs.delete(name);
          for (const w of shared.waiting.splice(0)) {
            w.reject(new Deno.errors.BadResource("listener closed"));
          }
          for (const conn of shared.ready.splice(0)) conn.close();
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
