// The pool's routing cost with no socket in the way: pool.call against
// Connection.call in one process, both on connections whose handler replies
// to a call itself (the memory transport, no frame goes out). What is left is
// the JavaScript of a call: the driver's call path, which both ways share,
// and the pool's choosing and counting on top. bench/pool_load.ts measures
// the same over TCP, where a call costs several times more (its reads and
// writes) and a shared machine's noise is larger than the difference.
//
//   deno run -A bench/pool_call.ts [--connections 1] [--callers 64]
//     [--calls 5000] [--rounds 40] [--strategy round-robin]
//
// Each round runs `--calls` calls through each way, `--callers` at a time
// (the first way flips every round), and measures this process's CPU over
// it. Prints one JSON line: per way the least and the median µs of CPU per
// call over the rounds, and the routing cost (pool over Connection, minus
// one) from the least (the steadiest figure here: a round that a collection
// or another process hit only costs more) and as the median of the rounds'
// pairs.
import process from "node:process";
import {
  connect,
  createPool,
  type Handler,
  memory,
  type PoolStrategy,
  reply,
  serve,
} from "../mod.ts";
import { parseFlags } from "./_common.ts";

const USAGE = `usage: deno run -A bench/pool_call.ts [--connections 1] [--callers 64]
  [--calls 5000] [--rounds 40] [--strategy round-robin]`;
const opts = parseFlags(Deno.args, {
  connections: 1,
  callers: 64,
  calls: 5000,
  rounds: 40,
  strategy: "round-robin",
}, USAGE);
if (!(opts.connections >= 1 && opts.callers >= 1 && opts.calls >= 1 && opts.rounds >= 1)) {
  console.error(`--connections, --callers, --calls and --rounds must be at least 1\n\n${USAGE}`);
  Deno.exit(2);
}
if (!["round-robin", "random", "least-busy"].includes(opts.strategy)) {
  console.error(`--strategy must be round-robin, random or least-busy\n\n${USAGE}`);
  Deno.exit(2);
}

const WARMUP_ROUNDS = 4;

// Replies to each call with its message: a call never leaves the process.
const replier: Handler = async function* () {
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
    ev = ev.type === "call" ? yield reply(ev.from, ev.message) : yield;
  }
};

const transport = memory("bench-pool-call");
const server = await serve(async function* () {
  for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) ev = yield;
}, { transport });
const n = opts.connections;
const conns = await Promise.all(Array.from({ length: n }, () => connect(replier, { transport })));
const pool = await createPool(replier, {
  addresses: [{ transport }],
  size: n,
  strategy: opts.strategy as PoolStrategy,
  waitReady: true,
  reconnect: false,
});
while (pool.connections().length < n) await new Promise((r) => setTimeout(r, 1));

const message = { n: 1 };
let next = 0;
const ways = {
  connection: () => conns[next++ % n].call(message),
  pool: () => pool.call(message),
};
type WayName = keyof typeof ways;

const cpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

// µs of CPU per call for `opts.calls` calls through `call`, `opts.callers` at a time.
async function round(call: () => Promise<unknown>): Promise<number> {
  // Calls settle in microtasks alone: let timers and I/O run between rounds.
  await new Promise((r) => setTimeout(r, 0));
  let left = opts.calls;
  const caller = async () => {
    while (left-- > 0) await call();
  };
  const start = cpuSeconds();
  await Promise.all(Array.from({ length: opts.callers }, caller));
  return (cpuSeconds() - start) * 1e6 / opts.calls;
}

const us: Record<WayName, number[]> = { connection: [], pool: [] };
const ratios: number[] = [];
for (let r = 0; r < WARMUP_ROUNDS + opts.rounds; r++) {
  const order: WayName[] = r % 2 ? ["pool", "connection"] : ["connection", "pool"];
  const t = {} as Record<WayName, number>;
  for (const way of order) t[way] = await round(ways[way]);
  if (r < WARMUP_ROUNDS) continue;
  us.connection.push(t.connection);
  us.pool.push(t.pool);
  ratios.push(t.pool / t.connection);
}
await pool.stop();
await Promise.all(conns.map((c) => c.stop()));
await server.stop();

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const least = (xs: number[]) => Math.min(...xs);
const round3 = (x: number) => Math.round(x * 1000) / 1000;
const percent = (ratio: number) => Math.round((ratio - 1) * 1000) / 10;
console.log(JSON.stringify({
  connections: n,
  callers: opts.callers,
  calls: opts.calls,
  rounds: opts.rounds,
  strategy: opts.strategy,
  usPerCall: Object.fromEntries(
    (Object.keys(us) as WayName[]).map((w) => [w, {
      least: round3(least(us[w])),
      median: round3(median(us[w])),
    }]),
  ),
  routingCostPct: {
    least: percent(least(us.pool) / least(us.connection)),
    medianOfPairs: percent(median(ratios)),
  },
}));
