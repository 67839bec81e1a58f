// The pool rows' load client (issue 11): `callers` concurrent callers making
// `call`s, one at a time each, through this library's client connections to
// an echo server in another process: on plain `Connection`s, through a
// `Pool`, or both in turns. Run by bench/run.ts as its own process.
//
//   deno run -A bench/pool_load.ts --port P [--via connection,pool]
//     [--host 127.0.0.1] [--connections 1] [--callers 64] [--size 64]
//     [--strategy round-robin] [--spread rotate|fixed] [--slice 250]
//     [--duration 5] [--warmup 1] [--server-pid PID]
//
// --via connection: `connections` connections made with `connect()`, routed by
// hand at no cost: --spread rotate (default) puts each call on the next
// connection in turn, as a round-robin pool does; --spread fixed puts caller i
// always on connection i % connections (a caller's calls then share writes
// with the same neighbours': fewer, larger writes).
// --via pool: one `createPool()` of `connections` connections, every caller
// calls `pool.call()` and the pool's strategy picks the connection.
// --via connection,pool (the default): both sets of connections are open, and
// the callers use one way or the other in turns of --slice ms, the warmup and
// the measured window alike, in the order given. Each way is measured over its
// own turns only, so noise from the rest of the machine (a shared 2-core box)
// falls on both alike: that is how bench/run.ts compares them.
// Both ways run the same handler, examples/pool_client.ts's `echoCalls`: a
// call's message goes out as one length-prefixed frame, and each echo answers
// the oldest call waiting on that connection. Each caller sends `size` bytes
// (its number and a sequence number, then a pattern) and checks that the
// reply is exactly that.
//
// Prints one JSON line: the settings, and under "via" for each way load.ts's
// fields over its turns of the measured window (framesPerSec is calls/s, p50us
// and p99us the call's round trip, serverUsPerFrame the server's CPU per call)
// and clientUsPerCall: this process's CPU per call, the figure the pool's
// routing cost is read from. A call is counted for the way it went, in the
// turn it completes: at most `callers` calls per turn cross into the next.
import { connect, createPool, lengthPrefixed, type PoolStrategy } from "../mod.ts";
import { echoCalls } from "../examples/pool_client.ts";
import { parseFlags, sleep } from "./_common.ts";
import { cpuFields, type CpuSample, round, sampleCpu } from "./_cpu_window.ts";
import { HEADER } from "./_frames.ts";
import { Histogram } from "./_histogram.ts";

const USAGE = `usage: deno run -A bench/pool_load.ts --port P [--via connection,pool]
  [--host 127.0.0.1] [--connections 1] [--callers 64] [--size 64]
  [--strategy round-robin] [--spread rotate|fixed] [--slice 250]
  [--duration 5] [--warmup 1] [--server-pid PID]`;
const opts = parseFlags(Deno.args, {
  host: "127.0.0.1",
  port: 0,
  via: "connection,pool",
  connections: 1,
  callers: 64,
  size: 64,
  strategy: "round-robin",
  spread: "rotate",
  slice: 250,
  duration: 5,
  warmup: 1,
  "server-pid": 0,
}, USAGE);
const WAYS = ["connection", "pool"] as const;
type WayName = typeof WAYS[number];
const order = opts.via.split(",").map((w) => w.trim()) as WayName[];
if (!opts.port) fail("--port is required");
if (!order.length || order.some((w) => !WAYS.includes(w)) || new Set(order).size < order.length) {
  fail("--via must be connection, pool, or both (comma-separated, in turn order)");
}
if (!(opts.connections >= 1 && opts.callers >= 1)) fail("bad --connections/--callers");
if (!(opts.size >= 8)) fail("--size must be at least 8");
if (opts.spread !== "rotate" && opts.spread !== "fixed") fail("--spread must be rotate or fixed");
if (!(opts.slice >= 10)) fail("--slice must be at least 10 (ms)");

const GRACE_MS = 5000;
const CONNECT_TIMEOUT_MS = 10_000;

function fail(msg: string): never {
  console.error(`${msg}\n\n${USAGE}`);
  Deno.exit(2);
}

// Hard bound: whatever happens (a server that stops answering), this process
// is gone after the connects, warmup, duration and grace.
const deadline = setTimeout(() => {
  console.error("pool_load: did not finish in time");
  Deno.exit(3);
}, CONNECT_TIMEOUT_MS + (opts.warmup + opts.duration) * 1000 + GRACE_MS);

/** A call through one way, made by caller number `caller`. */
type Call = (caller: number, message: Uint8Array) => Promise<Uint8Array>;

/** One way to make calls, and what it did in its turns of the measured window. */
interface Way {
  name: WayName;
  call: Call;
  stop(): Promise<unknown>;
  calls: number;
  hist: Histogram;
  /** CPU counters summed over its turns (differences of samples). */
  cpu: CpuSample;
}

const framing = lengthPrefixed(4);
const address = { hostname: opts.host, port: opts.port };

async function open(name: WayName): Promise<Way> {
  const way = (call: Call, stop: () => Promise<unknown>): Way => ({
    name,
    call,
    stop,
    calls: 0,
    hist: new Histogram(),
    cpu: { t: 0, self: 0, server: 0, machine: 0 },
  });
  if (name === "connection") {
    const conns = await Promise.all(
      Array.from({ length: opts.connections }, () => connect(echoCalls, { ...address, framing })),
    );
    let next = 0;
    const call: Call = opts.spread === "fixed"
      ? (caller, message) => conns[caller % conns.length].call<Uint8Array>(message)
      : (_, message) => conns[next++ % conns.length].call<Uint8Array>(message);
    return way(
      call,
      () => Promise.all(conns.map((c) => c.stop("shutdown", { timeout: 1000 }))),
    );
  }
  const pool = await createPool(echoCalls, {
    addresses: [address],
    size: opts.connections,
    framing,
    strategy: opts.strategy as PoolStrategy,
    waitReady: CONNECT_TIMEOUT_MS,
    reconnect: false, // a connection lost is an error to show, not to hide
  });
  // Every connection up before the first call, as with plain connections.
  while (pool.connections().length < opts.connections) await sleep(1);
  return way(
    (_, message) => pool.call<Uint8Array>(message),
    () => pool.stop("shutdown", { timeout: 1000 }),
  );
}

const ways: Way[] = [];
for (const name of order) ways.push(await open(name));

const state = {
  phase: "warmup" as "warmup" | "measure" | "done",
  /** The way callers take for their next call. */
  current: ways[0],
  errors: 0,
  corrupt: 0,
};
// A function, not an inline test: the phase changes across awaits.
const done = () => state.phase === "done";

/** One caller: one call at a time, each reply checked against its message. */
async function caller(id: number): Promise<void> {
  const message = new Uint8Array(opts.size);
  const view = new DataView(message.buffer);
  view.setUint32(0, id);
  for (let i = 8; i < message.length; i++) message[i] = (i * 31 + id) & 255;
  for (let seq = 0; !done(); seq++) {
    view.setUint32(4, seq);
    const way = state.current;
    const t0 = performance.now();
    let reply: Uint8Array;
    try {
      // The message is not touched again until its reply is in: the write is long done.
      reply = await way.call(id, message);
    } catch (e) {
      if (done()) return;
      if (++state.errors <= 5) console.error(`pool_load: caller ${id} (${way.name}): ${e}`);
      await sleep(1); // a pool with nothing up fails at once: don't spin
      continue;
    }
    if (!sameBytes(reply, message)) {
      if (done()) return;
      if (++state.corrupt <= 5) {
        console.error(`pool_load: caller ${id} (${way.name}), call ${seq}: wrong reply`);
      }
      return;
    }
    if (state.phase === "measure") {
      way.calls++;
      way.hist.record(performance.now() - t0);
    }
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Runs `ms` of turns, each way `opts.slice` ms in order; with `measure`,
 * adds each turn's CPU counters to its way. */
async function turns(ms: number, measure: boolean): Promise<void> {
  const end = performance.now() + ms;
  for (let i = 0; performance.now() < end - 1; i++) {
    const way = ways[i % ways.length];
    state.current = way;
    const a = measure ? sampleCpu(opts["server-pid"]) : undefined;
    await sleep(Math.min(opts.slice, end - performance.now()));
    if (!a) continue;
    const b = sampleCpu(opts["server-pid"]);
    for (const k of ["t", "self", "server", "machine"] as const) way.cpu[k] += b[k] - a[k];
  }
}

const callers = Array.from({ length: opts.callers }, (_, i) => caller(i));
await turns(opts.warmup * 1000, false);
state.phase = "measure";
await turns(opts.duration * 1000, true);
state.phase = "done";
const zero: CpuSample = { t: 0, self: 0, server: 0, machine: 0 };
const results = Object.fromEntries(ways.map((w) => [w.name, {
  frames: w.calls,
  seconds: round(w.cpu.t, 3),
  framesPerSec: round(w.calls / w.cpu.t),
  mbPerSec: round(w.calls * (HEADER + opts.size) / w.cpu.t / 1e6, 2),
  p50us: w.hist.quantile(0.5),
  p99us: w.hist.quantile(0.99),
  errors: state.errors,
  corrupt: state.corrupt,
  ...cpuFields(zero, w.cpu, w.calls, opts["server-pid"]),
  clientUsPerCall: w.calls ? round(w.cpu.self * 1e6 / w.calls, 2) : null,
}]));
await Promise.all(ways.map((w) => w.stop()));
await Promise.all(callers);
clearTimeout(deadline);
console.log(JSON.stringify({
  connections: opts.connections,
  callers: opts.callers,
  size: opts.size,
  strategy: opts.strategy,
  spread: opts.spread,
  slice: opts.slice,
  via: results,
}));
Deno.exit(0);
