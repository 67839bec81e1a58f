// Shared by the reliability suites: seeded randomness, self-checking payloads, a raw-socket
// frame reader, a transport wrapper that chops and counts reads and writes, a recording server
// and busy peers. The general test helpers (../_support.ts) are re-exported from here, so that
// a reliability suite imports all it uses from this one file.

import assert from "node:assert/strict";
import {
  type Addr,
  type Conn,
  type Connection,
  type Event,
  lengthPrefixed,
  type Listener,
  send,
  serve,
  type ServeOptions,
  type Server,
  type Transport,
  type Yielded,
} from "../../mod.ts";
import {
  closeQuietly,
  fnv1a,
  HOST,
  Inbox,
  pause,
  portOf,
  prng,
  wireOf,
  within,
  writeAll,
} from "../_support.ts";

export * from "../_support.ts";

// ---- Seeded randomness --------------------------------------------------------------------

/** A seeded PRNG ({@linkcode prng}) that also gives integers in a range. */
export class Rand {
  readonly seed: number;
  /** In [0, 1). */
  readonly float: () => number;
  constructor(seed: number) {
    this.seed = seed >>> 0;
    this.float = prng(this.seed);
  }
  /** An integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.float() * (hi - lo + 1));
  }
}

/**
 * A test run with a random seed (or `RELIABILITY_SEED`), which a failure reports together with
 * how to run it again.
 */
export function seededTest(name: string, fn: (rand: Rand) => Promise<void>): void {
  Deno.test(name, async () => {
    const fixed = Deno.env.get("RELIABILITY_SEED");
    const seed = fixed ? Number(fixed) >>> 0 : Math.floor(Math.random() * 2 ** 32);
    try {
      await fn(new Rand(seed));
    } catch (err) {
      if (err instanceof Error) {
        err.message += `\n  (seed ${seed}: rerun with RELIABILITY_SEED=${seed})`;
      }
      throw err;
    }
  });
}

// ---- Self-checking payloads ---------------------------------------------------------------

/** The smallest payload: stream u16, seq u32, checksum u32. */
export const MIN_PAYLOAD = 10;

/**
 * A payload of `size` bytes (at least {@linkcode MIN_PAYLOAD}) that says which stream it
 * belongs to and its sequence number in it, and ends with an FNV-1a of all that precedes.
 */
export function payload(stream: number, seq: number, size: number): Uint8Array {
  assert.ok(size >= MIN_PAYLOAD, `payload of ${size} bytes`);
  const p = new Uint8Array(size);
  const view = new DataView(p.buffer);
  view.setUint16(0, stream);
  view.setUint32(2, seq);
  for (let i = 6; i < size - 4; i++) p[i] = (seq * 131 + i * 7 + stream * 17) & 0xff;
  view.setUint32(size - 4, fnv1a(p.subarray(0, size - 4)));
  return p;
}

/** Check a payload's checksum; return its stream and sequence number. */
export function verify(p: Uint8Array): { stream: number; seq: number } {
  assert.ok(p.length >= MIN_PAYLOAD, `a payload of ${p.length} bytes`);
  const view = new DataView(p.buffer, p.byteOffset, p.length);
  const stream = view.getUint16(0);
  const seq = view.getUint32(2);
  const sum = view.getUint32(p.length - 4);
  if (sum !== fnv1a(p.subarray(0, p.length - 4))) {
    assert.fail(`stream ${stream} frame ${seq} (${p.length} bytes) is corrupted`);
  }
  return { stream, seq };
}

/**
 * Checks, per stream, that frames come exactly once and in order: each stream's sequence
 * numbers must be 0, 1, 2, … with nothing skipped or repeated.
 */
export class SequenceChecker {
  readonly #next = new Map<number, number>();
  /** Frames seen per stream. */
  count(stream: number): number {
    return this.#next.get(stream) ?? 0;
  }
  /** Record one payload; fails on corruption, loss, duplication or reordering. */
  see(p: Uint8Array, what = "frame"): { stream: number; seq: number } {
    const { stream, seq } = verify(p);
    const expected = this.#next.get(stream) ?? 0;
    if (seq !== expected) {
      assert.fail(
        seq < expected
          ? `${what}: stream ${stream} frame ${seq} again (duplicated or reordered)`
          : `${what}: stream ${stream} frames ${expected}..${seq - 1} lost or reordered`,
      );
    }
    this.#next.set(stream, seq + 1);
    return { stream, seq };
  }
}

/** `bytes` cut at random points: about a third of the pieces are single bytes. */
export function* randomPieces(
  bytes: Uint8Array,
  rand: Rand,
  largest = 8192,
): Generator<Uint8Array> {
  let at = 0;
  while (at < bytes.length) {
    const r = rand.float();
    const n = r < 0.35 ? 1 : r < 0.6 ? rand.int(2, 16) : rand.int(17, largest);
    yield bytes.subarray(at, Math.min(bytes.length, at + n));
    at += n;
  }
}

/**
 * Reads 4-byte length-prefixed frames from a raw socket, with its own decoder. `readSize`
 * caps each read; `beforeRead` runs before each read (a slow reader pauses there).
 */
export class RawFrames {
  readonly conn: Conn;
  readonly #readSize: number;
  readonly #beforeRead?: () => Promise<void>;
  #buf = new Uint8Array(64 * 1024);
  #start = 0;
  #end = 0;
  #eof = false;
  readonly #tolerateTail: boolean;
  /** Bytes read so far. */
  bytesRead = 0;
  /** Bytes of an incomplete frame left at the end of the stream (only with `tolerateTail`). */
  tail = 0;

  constructor(
    conn: Conn,
    options: { readSize?: number; beforeRead?: () => Promise<void>; tolerateTail?: boolean } = {},
  ) {
    this.conn = conn;
    this.#readSize = options.readSize ?? 64 * 1024;
    this.#beforeRead = options.beforeRead;
    this.#tolerateTail = options.tolerateTail ?? false;
  }

  /**
   * The next frame's payload, or null at the end of the stream. A partial frame there fails,
   * unless `tolerateTail` (a connection cut on purpose may end inside a frame).
   */
  async next(): Promise<Uint8Array | null> {
    for (;;) {
      const avail = this.#end - this.#start;
      let need = 4;
      if (avail >= 4) {
        const length = new DataView(this.#buf.buffer, this.#start, 4).getUint32(0);
        need = 4 + length;
        if (avail >= need) {
          const p = this.#buf.slice(this.#start + 4, this.#start + need);
          this.#start += need;
          return p;
        }
      }
      if (this.#eof) {
        this.tail = avail;
        if (avail > 0 && !this.#tolerateTail) {
          assert.fail(`the stream ended inside a frame (${avail} bytes held)`);
        }
        return null;
      }
      // Make room for the whole frame plus one read.
      if (this.#start > 0) {
        this.#buf.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      if (this.#buf.length < need + this.#readSize) {
        const grown = new Uint8Array(Math.max(need + this.#readSize, this.#buf.length * 2));
        grown.set(this.#buf.subarray(0, this.#end));
        this.#buf = grown;
      }
      await this.#beforeRead?.();
      const n = await this.conn.read(this.#buf.subarray(this.#end, this.#end + this.#readSize));
      if (n === null) this.#eof = true;
      else {
        this.#end += n;
        this.bytesRead += n;
      }
    }
  }

  /** Every frame until the end of the stream; a reset counts as the end too. */
  async rest(onFrame: (p: Uint8Array) => void): Promise<"eof" | "reset"> {
    try {
      for (let p = await this.next(); p !== null; p = await this.next()) onFrame(p);
      return "eof";
    } catch (err) {
      if (err instanceof Deno.errors.ConnectionReset) return "reset";
      throw err;
    }
  }
}

// ---- A transport wrapper ------------------------------------------------------------------

/** What a {@linkcode wrapped} transport's sockets did. */
export interface IoStats {
  writes: number;
  /** Writes the socket took only part of (the kernel's buffer was full). */
  partialWrites: number;
  bytesWritten: number;
  reads: number;
  bytesRead: number;
}

export interface WrapOptions {
  /** Read at most this many bytes at a time. */
  readMax?: number;
  /** Offer at most this many bytes to each write. */
  writeMax?: number;
}

class WrappedConn implements Conn {
  readonly inner: Conn;
  readonly #opts: WrapOptions;
  readonly stats: IoStats;
  readonly #onPartialWrite: () => void;
  constructor(inner: Conn, opts: WrapOptions, stats: IoStats, onPartialWrite: () => void) {
    this.inner = inner;
    this.#opts = opts;
    this.stats = stats;
    this.#onPartialWrite = onPartialWrite;
  }
  get localAddr(): Addr {
    return this.inner.localAddr;
  }
  get remoteAddr(): Addr {
    return this.inner.remoteAddr;
  }
  async read(p: Uint8Array): Promise<number | null> {
    const max = this.#opts.readMax;
    const n = await this.inner.read(max !== undefined && p.length > max ? p.subarray(0, max) : p);
    if (n !== null) {
      this.stats.reads++;
      this.stats.bytesRead += n;
    }
    return n;
  }
  async write(p: Uint8Array): Promise<number> {
    const max = this.#opts.writeMax;
    const offered = max !== undefined && p.length > max ? p.subarray(0, max) : p;
    const n = await this.inner.write(offered);
    this.stats.writes++;
    this.stats.bytesWritten += n;
    if (n < offered.length) {
      if (this.stats.partialWrites++ === 0) this.#onPartialWrite();
    }
    return n;
  }
  closeWrite(): Promise<void> {
    return this.inner.closeWrite();
  }
  close(): void {
    this.inner.close();
  }
}

/**
 * `base`, with every accepted and connected socket chopped and counted per `options`;
 * `stalled` resolves the first time a socket takes only part of a write (not counting
 * `writeMax` cuts): the kernel's buffer is full.
 */
export function wrapped<A extends Addr>(
  base: Transport<A>,
  options: WrapOptions = {},
): { transport: Transport<A>; accepted: IoStats[]; connected: IoStats[]; stalled: Promise<void> } {
  const accepted: IoStats[] = [];
  const connected: IoStats[] = [];
  const stalled = Promise.withResolvers<void>();
  const onPartialWrite = () => stalled.resolve();
  const fresh = (): IoStats => ({
    writes: 0,
    partialWrites: 0,
    bytesWritten: 0,
    reads: 0,
    bytesRead: 0,
  });
  const transport: Transport<A> = {
    name: `wrapped-${base.name}`,
    async listen(listenOptions): Promise<Listener<A>> {
      const listener = await base.listen(listenOptions);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        async accept() {
          const conn = await listener.accept();
          const stats = fresh();
          accepted.push(stats);
          return new WrappedConn(conn, options, stats, onPartialWrite);
        },
      };
    },
    async connect(connectOptions) {
      const stats = fresh();
      connected.push(stats);
      return new WrappedConn(await base.connect(connectOptions), options, stats, onPartialWrite);
    },
  };
  return { transport, accepted, connected, stalled: stalled.promise };
}

// ---- A recording server -------------------------------------------------------------------

/** One accepted connection of a {@linkcode recordingServer}. */
export interface Session {
  conn: Connection<Uint8Array>;
  /** The peer's port (TCP), to match a raw client with its session; 0 otherwise. */
  remotePort: number;
  /** Every packet the handler got, in order. */
  got: Uint8Array[];
  /** The type of every event the handler got, in order. */
  events: string[];
  /** The error of the `disconnect` event, if it had one. */
  disconnectError?: Error;
  /** What ended the handler: "disconnect", "shutdown", or "finally" (ended by the driver). */
  end: Promise<string>;
}

export interface RecordingOptions {
  /** Send every packet back. */
  echo?: boolean;
  /** Keep every packet and a "packet" entry per packet in `events` (default true; turn off under long load). */
  keepPackets?: boolean;
  /** Go on after a `shutdown` event (so that stopping must force the connection). */
  ignoreShutdown?: boolean;
  /** Called as each connection's handler starts, before its first yield. */
  onStart?: (session: Session) => void;
}

/** A length-prefixed server (127.0.0.1, port 0) whose handler records what it gets. */
export async function recordingServer(
  options: ServeOptions<Uint8Array>,
  { echo = false, keepPackets = true, ignoreShutdown = false, onStart }: RecordingOptions = {},
): Promise<
  {
    server: Server<Uint8Array>;
    port: number;
    sessions: Inbox<Session>;
    byPort: Map<number, Session>;
    /** The session of the peer on `port` (its local port), once its handler has started. */
    sessionFor(port: number): Promise<Session>;
  } & AsyncDisposable
> {
  const sessions = new Inbox<Session>();
  const byPort = new Map<number, Session>();
  const portWaiters = new Map<number, (session: Session) => void>();
  const handler = async function* (
    conn: Connection<Uint8Array>,
  ): AsyncGenerator<Yielded, void, Event<Uint8Array>> {
    const end = Promise.withResolvers<string>();
    const remote = conn.remoteAddr;
    const session: Session = {
      conn,
      remotePort: remote.transport === "tcp" ? remote.port : 0,
      got: [],
      events: [],
      end: end.promise,
    };
    byPort.set(session.remotePort, session);
    portWaiters.get(session.remotePort)?.(session);
    sessions.push(session);
    onStart?.(session);
    try {
      let ev = yield;
      for (;;) {
        if (keepPackets || ev.type !== "packet") session.events.push(ev.type);
        if (ev.type === "packet") {
          if (keepPackets) session.got.push(ev.data);
          ev = yield echo ? send(ev.data) : undefined;
        } else if (ev.type === "disconnect" || (ev.type === "shutdown" && !ignoreShutdown)) {
          if (ev.type === "disconnect") session.disconnectError = ev.error;
          end.resolve(ev.type);
          return;
        } else {
          ev = yield;
        }
      }
    } finally {
      end.resolve("finally");
    }
  };
  const server = await serve(handler, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4),
    ...options,
  });
  return {
    server,
    port: server.addr.transport === "tcp" ? portOf(server.addr) : 0,
    sessions,
    byPort,
    sessionFor(port: number): Promise<Session> {
      const known = byPort.get(port);
      if (known) return Promise.resolve(known);
      const started = new Promise<Session>((resolve) => portWaiters.set(port, resolve));
      return within(5000, started, `the session of the peer on port ${port}`)
        .finally(() => portWaiters.delete(port));
    },
    [Symbol.asyncDispose]: () => server.stop(),
  };
}

export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ---- Busy peers ---------------------------------------------------------------------------

/** Connect `n` raw peers (all connected before any starts its loop) and start them. */
export async function openBusyPeers(
  port: number,
  n: number,
  firstId = 0,
  check?: (id: number) => (echo: Uint8Array, sent: Uint8Array) => void,
): Promise<BusyPeer[]> {
  const conns = await Promise.all(
    Array.from({ length: n }, () => Deno.connect({ hostname: HOST, port })),
  );
  return conns.map((conn, i) => new BusyPeer(conn, firstId + i, check?.(firstId + i)));
}

/**
 * A raw TCP client that echoes through a length-prefixed echo server without a pause: one
 * frame out (its own stream number, sequence, checksum), the echo back and checked, again,
 * until {@linkcode BusyPeer.stop} or until the server ends the connection.
 */
export class BusyPeer {
  // Each round trip ends with a turn of the event loop (a 0 ms timer). Without it, when more
  // than ~128 sockets of one process ping-pong without a pause, Deno 2.9 never again polls
  // the others' reads, nor a new connect: their ops starve (plain Deno.listen/Deno.connect
  // code shows it too, with no etcp involved; peers in another process do not).
  readonly conn: Deno.TcpConn;
  readonly id: number;
  /** Round trips completed, each echo checked. */
  rounds = 0;
  /** How the loop ended: stopped by us, or the server closed ("eof") or reset the connection. */
  readonly ended: Promise<"stopped" | "eof" | "reset">;
  #stopping = false;
  #waiters: Array<{ at: number; resolve(): void }> = [];

  readonly #check: ((echo: Uint8Array, sent: Uint8Array) => void) | undefined;

  /** `check` replaces the default check (the echo is the frame sent, byte for byte). */
  static async open(
    port: number,
    id: number,
    check?: (echo: Uint8Array, sent: Uint8Array) => void,
  ): Promise<BusyPeer> {
    return new BusyPeer(await Deno.connect({ hostname: HOST, port }), id, check);
  }

  constructor(
    conn: Deno.TcpConn,
    id: number,
    check?: (echo: Uint8Array, sent: Uint8Array) => void,
  ) {
    this.conn = conn;
    this.id = id;
    this.#check = check;
    this.ended = this.#run();
    this.ended.catch(() => {}).finally(() => {
      for (const w of this.#waiters.splice(0)) w.resolve();
    });
  }

  get localPort(): number {
    return (this.conn.localAddr as Deno.NetAddr).port;
  }

  async #run(): Promise<"stopped" | "eof" | "reset"> {
    const frames = new RawFrames(this.conn);
    try {
      for (let seq = 0; !this.#stopping; seq++) {
        const sent = payload(this.id, seq, MIN_PAYLOAD + (seq % 40));
        await writeAll(this.conn, wireOf([sent]));
        const echo = await frames.next();
        if (echo === null) return "eof";
        if (this.#check) this.#check(echo, sent);
        else if (!sameBytes(echo, sent)) {
          const { stream, seq: got } = verify(echo);
          assert.fail(`peer ${this.id}: echo of ${stream}/${got} for frame ${seq}`);
        }
        this.rounds++;
        for (let i = 0; i < this.#waiters.length; i++) {
          if (this.#waiters[i].at <= this.rounds) this.#waiters.splice(i--, 1)[0].resolve();
        }
        await pause(0);
      }
      return "stopped";
    } catch (err) {
      if (
        err instanceof Deno.errors.ConnectionReset || err instanceof Deno.errors.BrokenPipe ||
        err instanceof Deno.errors.ConnectionAborted
      ) return "reset";
      throw err;
    }
  }

  /** Resolves after `n` more round trips (or once the loop has ended). */
  progress(n = 1): Promise<void> {
    const at = this.rounds + n;
    return new Promise((resolve) => this.#waiters.push({ at, resolve }));
  }

  /** Finish the current round trip, then close; how the loop ended. */
  async stop(): Promise<"stopped" | "eof" | "reset"> {
    this.#stopping = true;
    try {
      return await this.ended;
    } finally {
      closeQuietly(this.conn);
    }
  }
}
