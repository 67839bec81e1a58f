/**
 * Soak: the echo server (examples/echo_server.ts's `echo`, lengthPrefixed(4)) runs in a child
 * process for N minutes under mixed load from loopback clients in this process, and every
 * frame is checked.
 *
 *     deno task soak                      # 30 s warm-up, then 2 minutes
 *     deno task soak --seconds 30         # a quick run
 *     options: --minutes N | --seconds N, --warmup-seconds N (30), --small N (40), --large N (4),
 *              --reset N (4), --churn N (4), --rss-noise-mb N (24), --heap-noise-mb N (4)
 *
 * Load (all at once): `small` clients pipeline many small frames (up to 32 in flight, 5% of
 * them up to 8 KiB) and disconnect cleanly after a random number of them, then reconnect;
 * `large` clients send frames of up to 1 MiB; `reset` clients send a few frames, then part of
 * one, and end abruptly without reading: half with a real RST (node:net's resetAndDestroy()),
 * half with a close mid-frame; `churn` clients connect, echo one frame and leave, or connect and
 * leave at once. Every frame carries its client, a sequence number and an FNV-1a checksum; each
 * echo is checked for all three and for its length, and one in ten frames is written in two
 * pieces cut anywhere. On a clean close every frame sent must have come back: anything missing
 * is lost. (The frame counts include the warm-up.)
 *
 * The server runs in a child process (`--serve`, with `--v8-flags=--expose-gc`), so that its
 * memory and file descriptors are its own. When asked, it reports after a full GC its RSS, V8
 * heap and open file descriptors (/proc/self/fd: Deno 2 has no Deno.resources()): cold
 * (listening, never used), warm (after the warm-up round of load, all clients gone), every 10 s
 * under load, and at the end (after the main run, all clients gone). Warm vs end is the leak
 * check: the warm-up lets V8's heap and the allocator reach their working size under this load
 * (RSS climbs from ~45 to ~175 MiB in the first ~20 s, then stays within a few MiB), so RSS
 * growth past `--rss-noise-mb`, or heap growth past `--heap-noise-mb`, fails the run; as do
 * lost or corrupt frames, unexpected client errors, more descriptors or sockets at the end than
 * when warm, a connection left over, anything the server logged, or its exiting non-zero.
 *
 * Exit code: 0 if all is well, 1 otherwise.
 *
 * @module
 */

import net from "node:net";
import { type Event, lengthPrefixed, serve, type Yielded } from "../mod.ts";
import { echo } from "../examples/echo_server.ts";

const MAX_FRAME = 1024 * 1024; // payload bytes of the largest frame
const HOST = "127.0.0.1";

// ---- Arguments ------------------------------------------------------------------------------

interface Options {
  serve: boolean;
  seconds: number;
  small: number;
  large: number;
  reset: number;
  churn: number;
  warmupSeconds: number;
  rssNoiseMb: number;
  heapNoiseMb: number;
}

function parseOptions(args: string[]): Options {
  const o: Options = {
    serve: false,
    seconds: 120,
    small: 40,
    large: 4,
    reset: 4,
    churn: 4,
    warmupSeconds: 30,
    rssNoiseMb: 24,
    heapNoiseMb: 4,
  };
  const usage = "usage: deno run -A bench/soak.ts [--minutes N | --seconds N] [--small N] " +
    "[--large N] [--reset N] [--churn N] [--warmup-seconds N] [--rss-noise-mb N] " +
    "[--heap-noise-mb N]";
  for (let i = 0; i < args.length; i++) {
    const [flag, inline] = args[i].split("=", 2);
    const value = () => {
      const v = Number(inline ?? args[++i]);
      if (!Number.isFinite(v) || v < 0) throw new Error(`${flag} wants a number\n${usage}`);
      return v;
    };
    switch (flag) {
      case "--serve":
        o.serve = true;
        break;
      case "--minutes":
        o.seconds = value() * 60;
        break;
      case "--seconds":
        o.seconds = value();
        break;
      case "--small":
        o.small = value();
        break;
      case "--large":
        o.large = value();
        break;
      case "--reset":
        o.reset = value();
        break;
      case "--churn":
        o.churn = value();
        break;
      case "--warmup-seconds":
        o.warmupSeconds = value();
        break;
      case "--rss-noise-mb":
        o.rssNoiseMb = value();
        break;
      case "--heap-noise-mb":
        o.heapNoiseMb = value();
        break;
      case "-h":
      case "--help":
        console.log(usage);
        Deno.exit(0);
        break;
      default:
        console.error(`unknown argument ${args[i]}\n${usage}`);
        Deno.exit(2);
    }
  }
  return o;
}

// ---- The server (child process) -----------------------------------------------------------------

interface Stats {
  rssMb: number;
  heapMb: number;
  heapTotalMb: number;
  externalMb: number;
  fds: number;
  fdKinds: Record<string, number>;
  connections: number;
  logged: number;
  resetsSeen: number;
  eofsSeen: number;
}

/** Open descriptors by kind: "socket", "pipe", "anon_inode:[eventpoll]", a path… */
function kinds(targets: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const t of targets) {
    const kind = t.replace(/:\[\d+\]$/, "");
    out[kind] = (out[kind] ?? 0) + 1;
  }
  return out;
}

async function runServer(): Promise<void> {
  const logged: unknown[][] = [];
  // Anything the server logs, at any level, fails the run (see the module doc).
  const record = (level: string) => (...a: unknown[]) => {
    logged.push(a);
    if (logged.length <= 10) console.error(`server logged (${level}):`, ...a);
  };
  // The example's echo handler, watched from outside: how each connection ended.
  let resetsSeen = 0;
  let eofsSeen = 0;
  async function* watchedEcho(): AsyncGenerator<Yielded, void, Event> {
    const inner = echo();
    try {
      let step = await inner.next();
      while (!step.done) {
        const ev: Event = yield step.value;
        if (ev.type === "disconnect") ev.error ? resetsSeen++ : eofsSeen++;
        step = await inner.next(ev);
      }
    } finally {
      await inner.return();
    }
  }
  const server = await serve(watchedEcho, {
    hostname: HOST,
    port: 0,
    framing: lengthPrefixed(4, { maxLength: MAX_FRAME + 64 }),
    maxConnections: Infinity,
    logger: { error: record("error"), warn: record("warn"), debug: record("debug") },
  });
  const gc = (globalThis as { gc?: () => void }).gc;
  const stats = async (): Promise<Stats> => {
    for (let i = 0; i < 3; i++) {
      gc?.();
      await new Promise((r) => setTimeout(r, 20));
    }
    const mem = Deno.memoryUsage();
    const fds = [...Deno.readDirSync("/proc/self/fd")].map((e) => {
      try {
        return Deno.readLinkSync(`/proc/self/fd/${e.name}`);
      } catch {
        return "gone"; // the directory listing's own descriptor
      }
    });
    return {
      rssMb: mem.rss / 2 ** 20,
      heapMb: mem.heapUsed / 2 ** 20,
      heapTotalMb: mem.heapTotal / 2 ** 20,
      externalMb: mem.external / 2 ** 20,
      fds: fds.length,
      fdKinds: kinds(fds),
      connections: server.connections().length,
      logged: logged.length,
      resetsSeen,
      eofsSeen,
    };
  };
  const out = (line: unknown) =>
    Deno.stdout.writeSync(new TextEncoder().encode(JSON.stringify(line) + "\n"));
  out({ port: (server.addr as Deno.NetAddr).port, gc: gc !== undefined });
  // Commands on stdin, one a line: "stats", "stop".
  const decoder = new TextDecoderStream();
  const reader = Deno.stdin.readable.pipeThrough(decoder).getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
    let nl: number;
    while ((nl = text.indexOf("\n")) >= 0) {
      const cmd = text.slice(0, nl).trim();
      text = text.slice(nl + 1);
      if (cmd === "stats") out(await stats());
      if (cmd === "stop") {
        await server.stop("shutdown", { timeout: 2000 });
        out({ stopped: true, logged: logged.length });
        await reader.cancel();
        return;
      }
    }
  }
  await server.stop();
}

class ServerProcess {
  readonly #child: Deno.ChildProcess;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #lines: ReadableStreamDefaultReader<string>;
  #text = "";

  constructor() {
    this.#child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--v8-flags=--expose-gc", import.meta.filename!, "--serve"],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
      env: Deno.env.get("SOAK_MALLOC") === "mmap" ? { MALLOC_MMAP_THRESHOLD_: "131072" } : {},
    }).spawn();
    this.#writer = this.#child.stdin.getWriter();
    this.#lines = this.#child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  }

  get pid(): number {
    return this.#child.pid;
  }

  async next<T>(): Promise<T> {
    for (;;) {
      const nl = this.#text.indexOf("\n");
      if (nl >= 0) {
        const line = this.#text.slice(0, nl);
        this.#text = this.#text.slice(nl + 1);
        return JSON.parse(line) as T;
      }
      const { value, done } = await this.#lines.read();
      if (done) throw new Error("the server process ended");
      this.#text += value;
    }
  }

  async ask<T>(cmd: string): Promise<T> {
    await this.#writer.write(new TextEncoder().encode(cmd + "\n"));
    return await this.next<T>();
  }

  async stop(): Promise<{ logged: number; code: number }> {
    const { logged } = await this.ask<{ logged: number }>("stop");
    await this.#writer.close();
    await this.#lines.cancel();
    const { code } = await this.#child.status;
    return { logged, code };
  }
}

// ---- Frames -------------------------------------------------------------------------------------

// Payload: client u32, seq u32, body, fnv1a(client..body) u32. On the wire: u32 length first.
const OVERHEAD = 12;

function fnv1a(bytes: Uint8Array, from: number, to: number): number {
  let h = 0x811c9dc5;
  for (let i = from; i < to; i++) h = Math.imul(h ^ bytes[i], 0x01000193);
  return h >>> 0;
}

/** xorshift32: fast, seeded filler for frame bodies. */
function fill(bytes: Uint8Array, from: number, to: number, seed: number): void {
  let x = seed | 1;
  let i = from;
  for (; i + 4 <= to; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x;
    bytes[i + 1] = x >>> 8;
    bytes[i + 2] = x >>> 16;
    bytes[i + 3] = x >>> 24;
  }
  for (; i < to; i++) bytes[i] = i;
}

function makeFrame(client: number, seq: number, body: number): Uint8Array {
  const length = OVERHEAD + body;
  const wire = new Uint8Array(4 + length);
  const view = new DataView(wire.buffer);
  view.setUint32(0, length);
  view.setUint32(4, client);
  view.setUint32(8, seq);
  fill(wire, 12, 12 + body, (client * 2654435761) ^ seq);
  view.setUint32(12 + body, fnv1a(wire, 4, 12 + body));
  return wire;
}

// ---- Load ---------------------------------------------------------------------------------------

interface Counters {
  connects: number;
  cleanCloses: number;
  resets: number;
  aborts: number;
  sent: number; // frames sent on connections that are checked to the end
  received: number; // echoes checked and correct
  lost: number;
  corrupt: number;
  abandoned: number; // frames sent by reset clients, not expected back
  bytes: number;
  largest: number;
  errors: string[]; // unexpected errors
}

const counters: Counters = {
  connects: 0,
  cleanCloses: 0,
  resets: 0,
  aborts: 0,
  sent: 0,
  received: 0,
  lost: 0,
  corrupt: 0,
  abandoned: 0,
  bytes: 0,
  largest: 0,
  errors: [],
};

let nextClient = 0;
const rand = (() => {
  let s = 0x9e3779b9;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
})();

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  while (bytes.length > 0) bytes = bytes.subarray(await conn.write(bytes));
}

/** Reads length-prefixed frames; null at the end. */
class Reader {
  #buf = new Uint8Array(256 * 1024);
  #start = 0;
  #end = 0;
  constructor(readonly conn: Deno.Conn) {}

  async next(): Promise<Uint8Array | null> {
    for (;;) {
      const have = this.#end - this.#start;
      if (have >= 4) {
        const b = this.#buf;
        const s = this.#start;
        const length = ((b[s] << 24) | (b[s + 1] << 16) | (b[s + 2] << 8) | b[s + 3]) >>> 0;
        if (have >= 4 + length) {
          this.#start += 4 + length;
          return this.#buf.subarray(s + 4, s + 4 + length);
        }
        if (4 + length > this.#buf.length) {
          const grown = new Uint8Array(4 + length);
          grown.set(this.#buf.subarray(this.#start, this.#end));
          this.#buf = grown;
          this.#end -= this.#start;
          this.#start = 0;
        }
      }
      if (this.#start > 0 && (this.#end === this.#buf.length || this.#start === this.#end)) {
        this.#buf.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      const n = await this.conn.read(this.#buf.subarray(this.#end));
      if (n === null) {
        if (this.#end > this.#start) throw new Error("the stream ended inside a frame");
        return null;
      }
      this.#end += n;
    }
  }
}

/** Checks one echo: length, client, sequence, checksum. */
function check(payload: Uint8Array, client: number, seq: number, body: number): boolean {
  if (payload.length !== OVERHEAD + body) return false;
  const view = new DataView(payload.buffer, payload.byteOffset, payload.length);
  return view.getUint32(0) === client && view.getUint32(4) === seq &&
    view.getUint32(8 + body) === fnv1a(payload, 0, 8 + body);
}

/**
 * One connection that sends `frames` frames (bodies from `size()`), at most `window` in
 * flight, checks every echo, then half-closes and expects the clean end.
 */
async function checkedConnection(
  port: number,
  frames: number,
  window: number,
  size: () => number,
): Promise<void> {
  const client = ++nextClient;
  let conn: Deno.TcpConn;
  try {
    conn = await Deno.connect({ hostname: HOST, port });
  } catch (err) {
    counters.errors.push(`client ${client}: connect: ${err}`);
    return;
  }
  counters.connects++;
  const reader = new Reader(conn);
  const inFlight: number[] = []; // body sizes, in order
  let sent = 0;
  let received = 0;
  let dead = false;
  let wake = null as (() => void) | null;
  const writing = (async () => {
    for (let seq = 0; seq < frames && !dead; seq++) {
      while (inFlight.length >= window && !dead) await new Promise<void>((r) => wake = r);
      if (dead) return;
      const body = size();
      inFlight.push(body);
      const frame = makeFrame(client, seq, body);
      // Sometimes in two writes, cut anywhere.
      if (rand() < 0.1) {
        const at = 1 + Math.floor(rand() * (frame.length - 1));
        await writeAll(conn, frame.subarray(0, at));
        await writeAll(conn, frame.subarray(at));
      } else {
        await writeAll(conn, frame);
      }
      sent++;
      counters.sent++;
      counters.bytes += frame.length;
      if (body > counters.largest) counters.largest = body;
    }
    if (!dead) await conn.closeWrite();
  })();
  try {
    for (;;) {
      const payload = await reader.next();
      if (payload === null) break;
      const body = inFlight.shift();
      if (body === undefined || !check(payload, client, received, body)) {
        counters.corrupt++;
        throw new Error(`client ${client}: frame ${received} is corrupt or extra`);
      }
      received++;
      counters.received++;
      const w = wake;
      wake = null;
      w?.();
    }
    await writing;
    if (received < sent) {
      counters.lost += sent - received;
      counters.errors.push(`client ${client}: ${sent - received} frames lost`);
    } else counters.cleanCloses++;
  } catch (err) {
    counters.errors.push(`client ${client}: ${err}`);
    dead = true;
    wake?.();
    try {
      conn.close();
    } catch { /* closed */ }
    await writing.catch(() => {});
    counters.lost += Math.max(0, sent - received);
    return;
  }
  conn.close();
}

/**
 * Sends a few frames, then part of one, and ends abruptly: half the time with a real reset
 * (node:net's resetAndDestroy(): SO_LINGER 0, so the server's next read or write fails with
 * ECONNRESET; Deno's own close() sends FIN even with unread data), else with a plain close
 * mid-frame. The echoes are never read.
 */
async function resetConnection(port: number): Promise<void> {
  const client = ++nextClient;
  const n = 1 + Math.floor(rand() * 20);
  const frames = Array.from(
    { length: n },
    (_, seq) => makeFrame(client, seq, Math.floor(rand() * 4096)),
  );
  const last = makeFrame(client, n, 1000 + Math.floor(rand() * 60_000));
  frames.push(last.subarray(0, 1 + Math.floor(rand() * (last.length - 2))));
  const bytes = new Uint8Array(frames.reduce((sum, f) => sum + f.length, 0));
  let at = 0;
  for (const f of frames) {
    bytes.set(f, at);
    at += f.length;
  }
  const pause = () => new Promise((r) => setTimeout(r, 5 + rand() * 20));
  try {
    if (rand() < 0.5) {
      const sock = net.connect(port, HOST);
      const closed = new Promise((resolve) => sock.once("close", resolve));
      sock.on("error", () => {}); // the reset is ours
      await new Promise<void>((resolve, reject) => {
        sock.once("connect", resolve);
        sock.once("error", reject);
      });
      counters.connects++;
      await new Promise<void>((resolve, reject) =>
        sock.write(bytes, (err) => err ? reject(err) : resolve())
      );
      await pause();
      sock.resetAndDestroy();
      await closed;
      counters.resets++;
    } else {
      const conn = await Deno.connect({ hostname: HOST, port });
      counters.connects++;
      try {
        await writeAll(conn, bytes);
        await pause();
      } finally {
        conn.close();
      }
      counters.aborts++;
    }
    counters.abandoned += frames.length;
  } catch (err) {
    counters.errors.push(`reset client ${client}: ${err}`);
  }
}

async function load(port: number, o: Options, ms: number): Promise<void> {
  const deadline = performance.now() + ms;
  const until = async (work: () => Promise<void>, pauseMs = 0) => {
    while (performance.now() < deadline) {
      await work();
      if (pauseMs) await new Promise((r) => setTimeout(r, pauseMs));
    }
  };
  const small = () => Math.floor(rand() * (rand() < 0.05 ? 8192 : 256));
  const large = () => Math.min(MAX_FRAME - OVERHEAD, Math.floor(rand() ** 2 * MAX_FRAME));
  await Promise.all([
    ...Array.from(
      { length: o.small },
      () => until(() => checkedConnection(port, 50 + Math.floor(rand() * 2000), 32, small)),
    ),
    ...Array.from(
      { length: o.large },
      () => until(() => checkedConnection(port, 1 + Math.floor(rand() * 20), 2, large)),
    ),
    ...Array.from({ length: o.reset }, () => until(() => resetConnection(port), 5)),
    ...Array.from({ length: o.churn }, () =>
      until(async () => {
        if (rand() < 0.5) {
          await checkedConnection(port, 1, 1, small);
        } else {
          (await Deno.connect({ hostname: HOST, port })).close(); // connect and leave
          counters.connects++;
        }
      }, 2)),
  ]);
}

// ---- Main ---------------------------------------------------------------------------------------

async function waitForNoConnections(server: ServerProcess): Promise<Stats> {
  for (let i = 0; i < 100; i++) {
    const stats = await server.ask<Stats>("stats");
    if (stats.connections === 0) return stats;
    await new Promise((r) => setTimeout(r, 100));
  }
  return await server.ask<Stats>("stats");
}

function fmt(s: Stats): string {
  return `RSS ${s.rssMb.toFixed(1)} MiB, heap ${s.heapMb.toFixed(2)} of ` +
    `${s.heapTotalMb.toFixed(1)} MiB, external ` +
    `${s.externalMb.toFixed(2)} MiB, fds ${s.fds} (${s.fdKinds.socket ?? 0} sockets), ` +
    `connections ${s.connections}`;
}

async function main(): Promise<number> {
  const o = parseOptions(Deno.args);
  if (o.serve) {
    await runServer();
    return 0;
  }
  const server = new ServerProcess();
  const { port, gc } = await server.next<{ port: number; gc: boolean }>();
  // Deno opens a couple of sockets of its own shortly after start: let it settle first.
  await new Promise((r) => setTimeout(r, 2000));
  const cold = await server.ask<Stats>("stats");
  const warmupMs = o.warmupSeconds * 1000;
  console.log(
    `soak: echo server in child process ${server.pid} on ${HOST}:${port} (gc ${
      gc ? "on" : "off"
    }); ` +
      `${o.small} small, ${o.large} large (≤ 1 MiB), ${o.reset} reset, ${o.churn} churn clients; ` +
      `warm-up ${(warmupMs / 1000).toFixed(0)} s, then ${o.seconds} s`,
  );
  console.log(`cold:  ${fmt(cold)}`);

  const started = performance.now();
  await load(port, o, warmupMs);
  const warm = await waitForNoConnections(server);
  console.log(`warm:  ${fmt(warm)}`);

  // The main run, sampling the server as it goes (no GC: the working size under load).
  const rssNow = () =>
    Number(
      Deno.readTextFileSync(`/proc/${server.pid}/status`).match(/VmRSS:\s+(\d+)/)?.[1] ?? 0,
    ) / 1024;
  let peakRss = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      await new Promise((r) => setTimeout(r, 1000));
      peakRss = Math.max(peakRss, rssNow());
    }
  })();
  const mainStart = performance.now();
  // Every 10 s: progress, and the server's memory after a GC, under load.
  const samples: Stats[] = [];
  let reporting = Promise.resolve();
  const progress = setInterval(() => {
    reporting = reporting.then(async () => {
      const s = ((performance.now() - mainStart) / 1000).toFixed(0);
      const rss = rssNow();
      const st = await server.ask<Stats>("stats");
      samples.push(st);
      console.log(
        `  ${s} s: sent ${counters.sent}, received ${counters.received}, lost ${counters.lost}, ` +
          `corrupt ${counters.corrupt}, connects ${counters.connects}, resets ` +
          `${counters.resets}; server RSS ${rss.toFixed(1)} MiB, after GC ${
            st.rssMb.toFixed(1)
          } MiB (heap ${st.heapMb.toFixed(1)} of ${st.heapTotalMb.toFixed(1)}), ` +
          `${st.connections} conns`,
      );
    });
  }, 10_000);
  await load(port, o, o.seconds * 1000);
  clearInterval(progress);
  await reporting;
  sampling = false;
  await sampler;
  const end = await waitForNoConnections(server);
  const elapsed = (performance.now() - started) / 1000;
  console.log(`end:   ${fmt(end)}  (peak RSS under load ${peakRss.toFixed(1)} MiB)`);
  const stopped = await server.stop();

  const rssGrowth = end.rssMb - warm.rssMb;
  // The trend of the server's RSS after GC under load, for the record: MiB per minute.
  const slope = (() => {
    const n = samples.length;
    if (n < 2) return 0;
    const xs = samples.map((_, i) => i * 10 / 60);
    const ys = samples.map((st) => st.rssMb);
    const mx = xs.reduce((a, b) => a + b) / n;
    const my = ys.reduce((a, b) => a + b) / n;
    let num = 0;
    let den = 0;
    for (let i = 0; i < n; i++) {
      num += (xs[i] - mx) * (ys[i] - my);
      den += (xs[i] - mx) ** 2;
    }
    return num / den;
  })();
  const heapGrowth = end.heapMb - warm.heapMb;
  const failures: string[] = [];
  if (counters.lost > 0) failures.push(`${counters.lost} frames lost`);
  if (counters.corrupt > 0) failures.push(`${counters.corrupt} frames corrupt`);
  if (counters.sent !== counters.received) {
    failures.push(`sent ${counters.sent} != received ${counters.received}`);
  }
  if (counters.errors.length > 0) {
    failures.push(`${counters.errors.length} unexpected errors, first: ${counters.errors[0]}`);
  }
  if (rssGrowth > o.rssNoiseMb) {
    failures.push(`RSS grew ${rssGrowth.toFixed(1)} MiB (noise threshold ${o.rssNoiseMb} MiB)`);
  }
  if (heapGrowth > o.heapNoiseMb) {
    failures.push(
      `heap grew ${heapGrowth.toFixed(2)} MiB (noise threshold ${o.heapNoiseMb} MiB)`,
    );
  }
  if (end.fds > warm.fds) failures.push(`${end.fds - warm.fds} file descriptors more than warm`);
  if ((end.fdKinds.socket ?? 0) > (warm.fdKinds.socket ?? 0)) {
    failures.push(`${end.fdKinds.socket - warm.fdKinds.socket} sockets more than warm`);
  }
  if (end.connections !== 0) failures.push(`${end.connections} connections left`);
  if (stopped.logged > 0) failures.push(`the server logged ${stopped.logged} errors`);
  if (stopped.code !== 0) failures.push(`the server exited with ${stopped.code}`);

  const mb = (counters.bytes / 2 ** 20).toFixed(0);
  console.log(
    [
      `--- soak: ${elapsed.toFixed(0)} s ---`,
      `frames   sent ${counters.sent}, received ${counters.received}, lost ${counters.lost}, ` +
      `corrupt ${counters.corrupt} (${mb} MiB sent, largest ${counters.largest + OVERHEAD} B)`,
      `conns    ${counters.connects} connects, ${counters.cleanCloses} checked clean closes, ` +
      `${counters.resets} resets (RST) and ${counters.aborts} closes mid-frame (FIN) ` +
      `(${counters.abandoned} frames abandoned by them, not counted)`,
      `server   saw ${end.resetsSeen} disconnects with an error (resets), ${end.eofsSeen} clean`,
      `RSS      cold ${cold.rssMb.toFixed(1)}, warm ${warm.rssMb.toFixed(1)}, end ` +
      `${end.rssMb.toFixed(1)} MiB: ${rssGrowth >= 0 ? "+" : ""}${rssGrowth.toFixed(1)} MiB ` +
      `warm→end (threshold ${o.rssNoiseMb}); under load, after GC: ${
        samples.map((st) => st.rssMb.toFixed(0)).join(" ")
      } (${slope >= 0 ? "+" : ""}${slope.toFixed(1)} MiB/min)`,
      `heap     cold ${cold.heapMb.toFixed(2)}, warm ${warm.heapMb.toFixed(2)}, end ` +
      `${end.heapMb.toFixed(2)} MiB: ${heapGrowth >= 0 ? "+" : ""}${heapGrowth.toFixed(2)} MiB ` +
      `warm→end (threshold ${o.heapNoiseMb})`,
      `fds      cold ${cold.fds}, warm ${warm.fds}, end ${end.fds}; server logged ` +
      `${stopped.logged}, exited ${stopped.code}`,
      failures.length === 0 ? "PASS" : `FAIL: ${failures.join("; ")}`,
    ].join("\n"),
  );
  for (const e of counters.errors.slice(0, 10)) console.error(`  ${e}`);
  return failures.length === 0 ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main());
