// Registry rows (issue 12): MemoryRegistry against KvRegistry (a KV file in a temporary
// directory, as `deno task start` would use), same run.
//
//   deno run -A --unstable-kv bench/registry.ts [--duration 2] [--rounds 3]
//     [--connections 32] [--entries 1000] [--accept-only] [--json]
//
// - accept: a server in a child process (lengthPrefixed(4), the registry under test, a handler
//   that ends at once) and a raw client here that connects, waits for the server's close and
//   closes, `--connections` at a time; connections accepted per second, and the server's CPU time
//   per connection (from /proc: steadier than the rate on a busy machine). Rounds alternate the
//   registries; the best counts. The client waits for the server's close so that it cannot run
//   ahead of the server's accept loop: a client that closes as soon as its connect returns fills
//   the listen backlog (511) whenever the server is a little slower, the kernel then drops the
//   handshakes and the client's connects stall for the 1 s SYN retransmission, which measured
//   those stalls rather than the server (kv 0.54x of memory for 1.16x the CPU per connection).
//   The listen overflows during each run are counted (from /proc/net/netstat) and reported.
// - register, lookup (remote: a name of another node; memory: a local name), list (`--entries`
//   entries): operations per second, one at a time.
// - call round trip: Connection.call on a local connection against a RemoteConnection's call
//   over the node link (another node in this process, loopback TCP), one at a time and 64 in
//   flight.
//
// Prints a markdown table (progress on stderr) and, with --json, one JSON line.

import { parseFlags } from "./_common.ts";
import { spawnListening } from "./_children.ts";
import {
  type ConnectionRef,
  KvRegistry,
  lengthPrefixed,
  lines,
  memory,
  MemoryRegistry,
  type Registry,
  type RegistryEntry,
  reply,
  serve,
} from "../mod.ts";
import { connect } from "../mod.ts";

const USAGE = `usage: deno run -A --unstable-kv bench/registry.ts [options]
  --duration 2       seconds per measured run
  --rounds 3         runs per accept measurement and registry; the best counts
  --connections 32   connections opened at once by the accept client
  --entries 1000     entries listed by the list rows
  --accept-only      measure the accept rows only
  --json             also print one JSON line
  (internal: --serve memory|kv --kv PATH runs the accept server)`;

const flags = parseFlags(Deno.args, {
  duration: 2,
  rounds: 3,
  connections: 32,
  entries: 1000,
  "accept-only": false,
  json: false,
  serve: "",
  kv: "",
}, USAGE);

const quiet = { error() {}, warn() {}, debug() {} };

if (flags.serve !== "") {
  // The accept server, recording in the registry under test: each connection is added, its
  // handler ends at once, the server closes it (the client waits for that) and removes it.
  const registry: Registry = flags.serve === "kv"
    ? await KvRegistry.open(flags.kv, { namespace: "bench", logger: quiet })
    : new MemoryRegistry();
  const server = await serve(async function* () {}, {
    port: 0,
    hostname: "127.0.0.1",
    framing: lengthPrefixed(4),
    registry,
    logger: quiet,
    maxConnections: Infinity,
  });
  console.log(`listening on 127.0.0.1:${(server.addr as Deno.NetAddr).port}`);
  await new Promise(() => {}); // until killed
}

const dir = await Deno.makeTempDir({ prefix: "etcp-bench-registry-" });
const rows: Array<{ row: string; memory: number; kv: number; unit: string }> = [];

function report(row: string, memoryRate: number, kvRate: number, unit: string): void {
  rows.push({ row, memory: memoryRate, kv: kvRate, unit });
  console.error(`${row}: memory ${memoryRate.toFixed(0)}, kv ${kvRate.toFixed(0)} ${unit}`);
}

/** Runs `op` one at a time for `seconds`; operations per second. */
async function rate(seconds: number, op: (i: number) => Promise<unknown>): Promise<number> {
  const end = performance.now() + seconds * 1000;
  const start = performance.now();
  let n = 0;
  while (performance.now() < end) await op(n++);
  return n / ((performance.now() - start) / 1000);
}

/** Runs `op` with `depth` in flight for `seconds`; operations per second. */
async function rateIn(
  seconds: number,
  depth: number,
  op: () => Promise<unknown>,
): Promise<number> {
  const end = performance.now() + seconds * 1000;
  const start = performance.now();
  let n = 0;
  await Promise.all(Array.from({ length: depth }, async () => {
    while (performance.now() < end) {
      await op();
      n++;
    }
  }));
  return n / ((performance.now() - start) / 1000);
}

// ---- accept ---------------------------------------------------------------------------------

/** The CPU time (user + system, ms) process `pid` has used so far, from /proc. */
function cpuMs(pid: number): number {
  const fields = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 1000 / 100; // clock ticks of 10 ms
}

/** The listen queue overflows of this machine so far (handshakes the kernel dropped). */
function listenOverflows(): number {
  const lines = Deno.readTextFileSync("/proc/net/netstat").split("\n");
  const at = lines.findIndex((line) => line.startsWith("TcpExt:"));
  const names = lines[at].split(" ");
  return Number(lines[at + 1].split(" ")[names.indexOf("ListenOverflows")]);
}

/** Connections accepted per second, and the server's CPU µs per connection. */
async function acceptRate(
  which: "memory" | "kv",
  kvPath: string,
): Promise<{ rate: number; cpuUs: number }> {
  const server = await spawnListening(
    [
      ...[Deno.execPath(), "run", "-A", "--unstable-kv", new URL(import.meta.url).pathname],
      ...["--serve", which, "--kv", kvPath],
    ],
    `accept server (${which})`,
    20_000, // a first run may compile it
  );
  const buffer = new Uint8Array(16);
  const once = async () => {
    const socket = await Deno.connect({ hostname: server.host, port: server.port });
    try {
      while (await socket.read(buffer) !== null); // until the server has accepted and closed it
    } finally {
      socket.close();
    }
  };
  await rateIn(0.3, flags.connections, once); // warm up
  const before = cpuMs(server.pid);
  const overflowsBefore = listenOverflows();
  const result = await rateIn(flags.duration, flags.connections, once);
  const used = cpuMs(server.pid) - before;
  const overflows = listenOverflows() - overflowsBefore;
  if (overflows > 0) {
    console.error(
      `accept (${which}): ${overflows} listen overflows: connects stalled, rate too low`,
    );
  }
  await server.stop();
  return { rate: result, cpuUs: used * 1000 / (result * flags.duration) };
}

{
  let best = { memory: 0, kv: 0 };
  let cpu = { memory: Infinity, kv: Infinity };
  for (let round = 0; round < flags.rounds; round++) {
    for (const which of ["memory", "kv"] as const) {
      const r = await acceptRate(which, `${dir}/accept-${round}.sqlite`);
      best = { ...best, [which]: Math.max(best[which], r.rate) };
      cpu = { ...cpu, [which]: Math.min(cpu[which], r.cpuUs) };
    }
  }
  report("accept (connections/s)", best.memory, best.kv, "conn/s");
  report("accept: server CPU per connection (lower is better)", cpu.memory, cpu.kv, "µs");
}

if (flags["accept-only"]) {
  await Deno.remove(dir, { recursive: true });
  printTable();
  Deno.exit(0);
}

// ---- register, lookup, list -----------------------------------------------------------------

const addr = { transport: "memory" as const, name: "bench" };
const stub = { id: "stub" } as unknown as ConnectionRef;
function entry(id: string, node: string): RegistryEntry {
  return {
    id,
    owner: "bench",
    node,
    kind: "server",
    remoteAddr: addr,
    localAddr: addr,
    startedAt: 0,
  };
}

const kv = await Deno.openKv(`${dir}/ops.sqlite`);
const a = await KvRegistry.open(kv, { namespace: "ops", node: "a", logger: quiet });
const b = await KvRegistry.open(kv, { namespace: "ops", node: "b", logger: quiet });
const mem = new MemoryRegistry();

{
  let i = 0;
  const memRate = await rate(flags.duration, async () => {
    const id = `c${++i}.benchmem`;
    mem.add(entry(id, "m"), stub);
    await mem.claim(id, `name-${i}`);
  });
  let j = 0;
  const kvRate = await rate(flags.duration, async () => {
    const id = `c${++j}.benchkva`;
    a.add(entry(id, "a"), stub);
    await a.claim(id, `name-${j}`);
  });
  report("register (add + claim a free name)", memRate, kvRate, "op/s");
  await a.flush();
  const names = Math.min(i, j);
  const memLookup = await rate(flags.duration, (k) => mem.lookup(`name-${(k % names) + 1}`));
  const kvLookup = await rate(flags.duration, (k) => b.lookup(`name-${(k % names) + 1}`));
  report("lookup of a name (kv: another node's)", memLookup, kvLookup, "op/s");
  for (let k = 1; k <= Math.max(i, j); k++) {
    mem.remove(`c${k}.benchmem`);
    a.remove(`c${k}.benchkva`);
  }
  await a.flush();
}

{
  for (let k = 0; k < flags.entries; k++) {
    mem.add(entry(`c${k}.listmem`, "m"), stub);
    a.add(entry(`c${k}.listkva`, "a"), stub);
  }
  await a.flush();
  const memList = await rate(flags.duration, () => mem.list({ owner: "bench" }));
  const kvList = await rate(flags.duration, () => b.list({ owner: "bench" }));
  report(`list of ${flags.entries} entries (kv: another node's)`, memList, kvList, "op/s");
}

// ---- call round trip ------------------------------------------------------------------------

{
  const transport = memory("bench-registry-calls");
  const server = await serve(async function* (conn) {
    await conn.register("callee");
    for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect";) {
      ev = ev.type === "call" ? yield reply(ev.from, ev.message) : yield;
    }
  }, { transport, framing: lines(), registry: a, logger: quiet });
  const client = await connect(async function* () {
    yield;
  }, { transport, framing: lines(), logger: quiet });
  let local: ConnectionRef | undefined;
  while (!(local = await a.lookup("callee"))) await new Promise((r) => setTimeout(r, 1));
  await a.flush();
  const remote = (await b.lookup("callee"))!;
  await remote.call("warm");
  const localOne = await rate(flags.duration, () => local.call("ping"));
  const remoteOne = await rate(flags.duration, () => remote.call("ping"));
  report("call round trip, one at a time (kv: over the node link)", localOne, remoteOne, "call/s");
  const localMany = await rateIn(flags.duration, 64, () => local.call("ping"));
  const remoteMany = await rateIn(flags.duration, 64, () => remote.call("ping"));
  report("call, 64 in flight (kv: over the node link)", localMany, remoteMany, "call/s");
  await client.stop();
  await server.stop();
}

await a.close();
await b.close();
kv.close();
await Deno.remove(dir, { recursive: true });
printTable();

function printTable(): void {
  console.log("| registry row | MemoryRegistry | KvRegistry | kv / memory |");
  console.log("| --- | ---: | ---: | ---: |");
  for (const { row, memory: m, kv: k, unit } of rows) {
    console.log(
      `| ${row} | ${m.toFixed(0)} ${unit} | ${k.toFixed(0)} ${unit} | ${(k / m).toFixed(2)} |`,
    );
  }
  if (flags.json) console.log(JSON.stringify({ registry: rows }));
}
