// The load client, run as its own process so its CPU is not the server's.
//
//   deno run -A bench/load.ts --port P [--host 127.0.0.1] [--connections 50]
//     [--size 64] [--depth 1] [--duration 5] [--warmup 1] [--mode echo|accept]
//     [--server-pid PID] [--tls --ca FILE]
//
// echo: every connection keeps `depth` length-prefixed frames in flight and
// checks each echo (order and content). accept: `connections` loops of
// connect → one frame → echo → close. Counts only what completes in the
// measured window after the warmup, then prints one JSON line:
// frames, seconds, framesPerSec, mbPerSec (frame bytes incl. header, one way,
// 10^6 B), p50us/p99us (round trip; whole connect..echo cycle in accept mode),
// errors, corrupt, cpuSeconds (this process, whole run) and cpuPct (this
// process's CPU during the window: near 100 means the client was the limit).
// With --server-pid, also for the window: serverCpuPct, serverUsPerFrame (the
// server's cost per frame, telling servers apart even when the client is the
// limit) and otherCpuPct (every other process: high means a noisy run).
// --tls: every connection is Deno.connectTls, verified against the CA in
// --ca (PEM) and --host as the server name (the fixture certificate covers
// localhost, 127.0.0.1 and ::1); echo connections finish their handshake
// before the warmup starts, accept cycles count theirs.
import { parseFlags, sleep, writeAll } from "./_common.ts";
import { cpuFields, type CpuSample, round, sampleCpu } from "./_cpu_window.ts";
import {
  CorruptFrame,
  echoOne,
  expectFrame,
  FrameReader,
  HEADER,
  makePattern,
  MIN_SIZE,
  writeFrame,
} from "./_frames.ts";
import { Histogram } from "./_histogram.ts";

const USAGE = `usage: deno run -A bench/load.ts --port P [--host 127.0.0.1] [--connections 50]
  [--size 64] [--depth 1] [--duration 5] [--warmup 1] [--mode echo|accept]
  [--server-pid PID] [--tls --ca FILE]`;
const opts = parseFlags(Deno.args, {
  host: "127.0.0.1",
  port: 0,
  connections: 50,
  size: 64,
  depth: 1,
  duration: 5,
  warmup: 1,
  mode: "echo",
  "server-pid": 0,
  tls: false,
  ca: "",
}, USAGE);
if (!opts.port) fail("--port is required");
if (opts.size < MIN_SIZE) fail(`--size must be at least ${MIN_SIZE}`);
if (opts.depth < 1 || opts.connections < 1) fail("bad --depth/--connections");
if (opts.mode !== "echo" && opts.mode !== "accept") fail("bad --mode");
if (opts.tls && !opts.ca) {
  fail("--tls needs --ca FILE (the CA that signed the server's certificate)");
}
if (opts.ca && !opts.tls) fail("--ca is for --tls");
const caCerts = opts.tls ? [Deno.readTextFileSync(opts.ca)] : [];

const GRACE_MS = 5000;
const FRAME = HEADER + opts.size;
const pattern = makePattern(opts.size);

const stats = {
  phase: "warmup" as "warmup" | "measure" | "done",
  frames: 0,
  errors: 0,
  corrupt: 0,
  hist: new Histogram(),
};
const open = new Set<Deno.Conn>();
// A function, not an inline test: the phase changes across awaits.
const done = () => stats.phase === "done";

// One connection's echo traffic. Reads never wait for writes (a big write can
// block until the server reads, which may need us to read its echoes first);
// the sends that one read triggers go out as one write.
class EchoConn {
  #sent = 0;
  #received = 0;
  #due = 0;
  #writing = false;
  #sentAt = new Float64Array(opts.depth); // in flight ≤ depth, in order
  #out = new Uint8Array(opts.depth * FRAME);
  #reader = new FrameReader(Math.max(64 * 1024, 2 * FRAME), opts.size);

  constructor(readonly conn: Deno.Conn) {}

  async run() {
    this.#send(opts.depth);
    const r = this.#reader;
    for (;;) {
      const n = await this.conn.read(r.space());
      if (n === null) throw new Error("server closed the connection");
      r.commit(n);
      const now = performance.now();
      const measuring = stats.phase === "measure";
      let echoed = 0;
      for (let at; (at = r.next()) >= 0; echoed++) {
        const seq = this.#received++;
        expectFrame(r, at, seq, opts.size, pattern);
        if (measuring) {
          stats.frames++;
          stats.hist.record(now - this.#sentAt[seq % opts.depth]);
        }
      }
      if (echoed > 0) this.#send(echoed);
    }
  }

  #send(count: number) {
    this.#due += count;
    if (!this.#writing) this.#flush().catch(onConnError(this.conn));
  }

  async #flush() {
    this.#writing = true;
    try {
      while (this.#due > 0 && !done()) {
        const k = this.#due;
        this.#due = 0;
        const now = performance.now();
        for (let i = 0; i < k; i++, this.#sent++) {
          writeFrame(this.#out, i * FRAME, this.#sent, opts.size, pattern);
          this.#sentAt[this.#sent % opts.depth] = now;
        }
        await writeAll(this.conn, this.#out.subarray(0, k * FRAME));
      }
    } finally {
      this.#writing = false;
    }
  }
}

async function connect(): Promise<Deno.Conn> {
  if (opts.tls) {
    // No setNoDelay on a Deno.TlsConn: Nagle stays on (each frame is one write).
    const conn = await Deno.connectTls({ hostname: opts.host, port: opts.port, caCerts });
    open.add(conn);
    if (opts.mode === "echo") await conn.handshake();
    return conn;
  }
  const conn = await Deno.connect({ hostname: opts.host, port: opts.port });
  conn.setNoDelay(true);
  open.add(conn);
  return conn;
}

function close(conn: Deno.Conn) {
  if (!open.delete(conn)) return;
  try {
    conn.close();
  } catch { /* already closed */ }
}

// Failures after the window closed are our own teardown, not errors.
function onConnError(conn?: Deno.Conn) {
  return (e: unknown) => {
    if (!done()) {
      if (e instanceof CorruptFrame) stats.corrupt++;
      else stats.errors++;
      if (stats.errors + stats.corrupt <= 5) console.error(`load: ${e}`);
    }
    if (conn) close(conn);
  };
}

async function echoMode() {
  const conns = await Promise.all(
    Array.from({ length: opts.connections }, connect),
  );
  for (const conn of conns) new EchoConn(conn).run().catch(onConnError(conn));
}

let acceptSeq = 0;
async function acceptLoop() {
  while (!done()) {
    const t0 = performance.now();
    let conn: Deno.Conn | undefined;
    try {
      conn = await connect();
      await echoOne(conn, acceptSeq++, opts.size, pattern);
      if (stats.phase === "measure") {
        stats.frames++;
        stats.hist.record(performance.now() - t0);
      }
      close(conn);
    } catch (e) {
      onConnError(conn)(e);
      await sleep(1); // e.g. out of ephemeral ports: don't spin
    }
  }
}

function fail(msg: string): never {
  console.error(`${msg}\n\n${USAGE}`);
  Deno.exit(2);
}

function report(a: CpuSample, b: CpuSample) {
  const seconds = b.t - a.t;
  console.log(JSON.stringify({
    mode: opts.mode,
    connections: opts.connections,
    size: opts.size,
    depth: opts.mode === "echo" ? opts.depth : 1,
    frames: stats.frames,
    seconds: round(seconds, 3),
    framesPerSec: round(stats.frames / seconds),
    mbPerSec: round(stats.frames * FRAME / seconds / 1e6, 2),
    p50us: stats.hist.quantile(0.5),
    p99us: stats.hist.quantile(0.99),
    errors: stats.errors,
    corrupt: stats.corrupt,
    ...cpuFields(a, b, stats.frames, opts["server-pid"]),
  }));
}

// Hard bound: whatever happens (a server that stops answering, connects that
// hang), this process is gone after warmup + duration + grace.
const deadline = setTimeout(() => {
  console.error("load: did not finish in time");
  Deno.exit(3);
}, (opts.warmup + opts.duration) * 1000 + GRACE_MS);

if (opts.mode === "echo") {
  await echoMode();
} else {
  for (let i = 0; i < opts.connections; i++) acceptLoop();
}
await sleep(opts.warmup * 1000);
stats.phase = "measure";
const start = sampleCpu(opts["server-pid"]);
await sleep(opts.duration * 1000);
stats.phase = "done";
const end = sampleCpu(opts["server-pid"]);
for (const conn of [...open]) close(conn);
clearTimeout(deadline);
report(start, end);
Deno.exit(0);
