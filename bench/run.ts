// `deno task bench`: raw Deno, Node and etcp side by side, same load client,
// same run; over plain TCP and over TLS (raw = a hand-written Deno.listen /
// Deno.listenTls echo, node = bench/node_echo.mjs run by the `node` on PATH,
// etcp = examples/echo_server.ts / examples/tls_echo_server.ts), then the pool
// rows (issue 11: pool.call against Connection.call, both through this
// library's client, against one server).
//
//   deno run -A bench/run.ts [--duration 2] [--warmup 0.5] [--rounds 3]
//     [--connections 50] [--size 64] [--depth 16] [--bulk-size 65536]
//     [--idle-connections 10000] [--idle-from 2000] [--idle-rounds 3]
//     [--only SUBSTR[,SUBSTR]] [--groups tcp,tls,pool]
//     [--servers raw,node,etcp,etcp-sync,etcp-batch,etcp-trace,raw-tls,node-tls,etcp-tls
//       [,etcp-hibernate]]
//     [--node node] [--etcp-cmd CMD|raw] [--etcp-tls-cmd CMD] [--client c|deno]
//     [--pool-connections 8] [--pool-callers 64] [--pool-strategy round-robin]
//     [--pool-server raw] [--pool-spread rotate|fixed] [--json]
//
// Each run starts a fresh server process, waits for its `listening on
// HOST:PORT` line, drives it with the load client or bench/idle.ts (separate
// processes) and stops it. The load client is bench/load.c, compiled once per
// run with `cc -O2` into a temporary directory: it costs a fraction of the
// CPU of bench/load.ts, which saturates a core before a fast server does.
// Without a working `cc`, bench/load.ts runs instead (same flags, same JSON).
// The TLS rows (servers raw-tls, node-tls and etcp-tls; scenarios "TLS
// ping-pong" and "TLS bulk") use a second build of load.c with OpenSSL (cc
// -DETCP_TLS … -lssl -lcrypto), or load.ts --tls if that build fails; every
// TLS server is driven by that one client in the same run, and the ratios are
// against raw-tls. Without `node` (or --node CMD) the Node rows are skipped,
// with a line saying so on stderr and in the report.
// The pool rows (group "pool") run bench/pool_load.ts, this library's client in
// its own process, against --pool-server (raw_echo.ts by default: the cheapest
// server, so that the client, the thing measured, is the limit): the columns
// are Connection.call and pool.call, not servers, and one process per round
// measures both, its callers taking turns of 250 ms between them, so that the
// noise of other processes falls on both alike.
// Load scenarios run `rounds` times, servers alternating, and the best round
// counts: the noise of a shared 2-core machine only ever slows a run down. Prints a markdown table on stdout
// (progress on stderr) and, with --json, one JSON line after it.
import { parseFlags } from "./_common.ts";
import { type Listening, runJson, spawnListening, withOpenFiles } from "./_children.ts";
import { compileLoadClient, runLoadBenchmark } from "./_load_client.ts";

// Seconds of load before a server's later windows in a round: it is warm, only the load
// client's connections start.
const WARM_WARMUP = 0.1;

const USAGE = `usage: deno run -A bench/run.ts [options]
  --duration 2           seconds measured per server in a round of a load row, in
                         --windows 8 windows taken in turns with the other servers
  --warmup 0.5           seconds of load before a server's first window of a round
                         (before the others: ${WARM_WARMUP} s, the server being warm)
  --windows 8            load windows per server per round
  --rounds 3             rounds per load scenario (each: every server started
                         anew, then the windows); the best window counts
  --connections 50       concurrent connections of the load client
  --size 64              frame payload bytes (ping-pong, pipelined, accept, pool)
  --depth 16             frames in flight per connection when pipelined
  --bulk-size 65536      frame payload bytes of the bulk run
  --bulk-connections 4   connections of the bulk runs (plain and TLS)
  --idle-connections 10000
                         idle connections held at the end of an idle run
  --idle-from 2000       the idle rows are the slope of the server's RSS from this
                         many connections to --idle-connections (bytes per added
                         connection, without the runtime's fixed growth); 0: RSS
                         growth from none over all of them
  --idle-rounds 3        runs per idle row and server, servers alternating; the
                         median counts (one odd run, high or low, moves no ratio)
  --idle-semi-space 0    MB: idle servers (Deno and Node) start with V8's young
                         generation at this fixed size (--min/--max-semi-space-size),
                         so that its growth with the connections, a runtime cost
                         that stops at its cap, is left out of the slope; 0: V8's
                         defaults (the figure users get)
  --only SUBSTR,...      only scenarios whose name contains one of these
  --groups tcp,tls,pool  which tables: tcp (plain TCP rows), tls (TLS rows),
                         pool (pool.call against Connection.call); registry rows
                         (issue 12) are not built yet
  --servers raw,node,etcp,etcp-sync,etcp-batch,etcp-trace,raw-tls,node-tls,etcp-tls
                         among raw, node, etcp, etcp-sync (a function* handler),
                         etcp-batch (batch() packets), etcp-hibernate,
                         etcp-trace (tracing on: bench/trace_echo.ts) (plain
                         TCP: ratios against raw, etcp ones also against node) and
                         raw-tls, node-tls, etcp-tls (TLS: ratios against raw-tls)
  --node CMD             the Node binary for node and node-tls (default "node", also
                         env NODE_CMD); if it does not run, those rows are skipped
  --etcp-cmd CMD         runs CMD instead of "deno run -A examples/echo_server.ts"
                         for the plain etcp servers (also env ETCP_CMD); "raw" puts
                         raw_echo.ts (and raw_tls_echo.ts for etcp-tls) in their
                         place: a harness self-test, ratios ≈ 1
  --etcp-tls-cmd CMD     runs CMD instead of "deno run -A examples/tls_echo_server.ts"
                         for etcp-tls (also env ETCP_TLS_CMD); it must take --port,
                         --hostname, --framing len4 and serve the fixture certificate
  --client c|deno        the load client: bench/load.c (compiled with cc; with
                         OpenSSL for the TLS rows) or bench/load.ts; default: C if
                         cc compiles it, else Deno (per kind, plain or TLS)
  --pool-connections 8   connections of the second pool row (the first has 1)
  --pool-callers 64      concurrent callers of the pool rows, one call at a time each
  --pool-strategy round-robin
                         the pool's strategy (round-robin, random, least-busy)
  --pool-server raw      the server of the pool rows: raw, node or etcp
  --pool-spread rotate   how Connection.call callers share the connections: rotate
                         (each call on the next one, as round-robin does) or fixed
                         (caller i always on connection i % N)
  --json                 also print all results as one JSON line

Subsets: --groups tcp (plain rows only), --groups pool, --only ping-pong,bulk,
--servers raw,node,etcp (no TLS), --rounds 1 --duration 1 (a quick look).`;
const opts = parseFlags(Deno.args, {
  duration: 2,
  warmup: 0.5,
  windows: 8,
  rounds: 3,
  connections: 50,
  size: 64,
  depth: 16,
  "bulk-size": 64 * 1024,
  "bulk-connections": 4,
  "idle-connections": 10_000,
  "idle-from": 2000,
  "idle-rounds": 3,
  "idle-semi-space": 0,
  only: "",
  groups: "tcp,tls,pool",
  servers: "raw,node,etcp,etcp-sync,etcp-batch,etcp-trace,raw-tls,node-tls,etcp-tls",
  node: Deno.env.get("NODE_CMD") ?? "node",
  "etcp-cmd": Deno.env.get("ETCP_CMD") ?? "",
  "etcp-tls-cmd": Deno.env.get("ETCP_TLS_CMD") ?? "",
  client: "auto",
  "pool-connections": 8,
  "pool-callers": 64,
  "pool-strategy": "round-robin",
  "pool-server": "raw",
  "pool-spread": "rotate",
  json: false,
}, USAGE);
if (!Number.isInteger(opts.windows) || opts.windows < 1) {
  console.error(`--windows must be a positive integer, not ${opts.windows}\n\n${USAGE}`);
  Deno.exit(2);
}
if (!["auto", "c", "deno"].includes(opts.client)) {
  console.error(`--client must be c or deno, not ${opts.client}\n\n${USAGE}`);
  Deno.exit(2);
}
if (!["rotate", "fixed"].includes(opts["pool-spread"])) {
  console.error(`--pool-spread must be rotate or fixed, not ${opts["pool-spread"]}\n\n${USAGE}`);
  Deno.exit(2);
}
if (!["round-robin", "random", "least-busy"].includes(opts["pool-strategy"])) {
  console.error(
    `--pool-strategy must be round-robin, random or least-busy, not ${
      opts["pool-strategy"]
    }\n\n${USAGE}`,
  );
  Deno.exit(2);
}

const DENO = Deno.execPath();
const BENCH = new URL(".", import.meta.url).pathname;
const ROOT = new URL("..", import.meta.url).pathname;
const EXAMPLE = `${ROOT}examples/echo_server.ts`;
const TLS_EXAMPLE = `${ROOT}examples/tls_echo_server.ts`;
const NODE_ECHO = `${BENCH}node_echo.mjs`;
/** The CA of the fixture certificate every TLS server presents. */
const CA = `${ROOT}tests/fixtures/ca.crt`;
// The load clients and idle.ts bound themselves; these are backstops (pool_load.ts
// may take up to 10 s to connect).
const WINDOW_SECONDS = opts.duration / opts.windows;
const LOAD_TIMEOUT_MS = (opts.warmup + opts.duration) * 1000 + 25_000;
const IDLE_TIMEOUT_MS = 160_000; // idle.ts gives up after 150 s
const LISTEN_TIMEOUT_MS = 20_000; // a first run may compile the server
const NOISY_PCT = 25; // other processes' CPU that marks a run as disturbed

// ------------------------------------------------------------- load client

interface LoadClient {
  /** "C" or "Deno", for the table */
  name: string;
  /** the command, to which the scenario's flags are appended */
  cmd: string[];
}

const DENO_CLIENT: LoadClient = { name: "Deno", cmd: [DENO, "run", "-A", `${BENCH}load.ts`] };
const POOL_CLIENT: LoadClient = {
  name: "pool_load",
  cmd: [DENO, "run", "-A", `${BENCH}pool_load.ts`],
};
/** Compiles bench/load.c (once per run): plain, or with `-DETCP_TLS` and
 * OpenSSL for the TLS rows. Falls back to load.ts unless `--client c` insists;
 * the TLS build always falls back (to load.ts --tls), so that a machine
 * without OpenSSL headers still runs every row. */
async function loadClient(kind: "plain" | "tls"): Promise<LoadClient> {
  if (opts.client === "deno") return DENO_CLIENT;
  const tls = kind === "tls";
  const built = await compileLoadClient(tls);
  if ("bin" in built) return { name: tls ? "C+OpenSSL" : "C", cmd: [built.bin] };
  const { why } = built;
  if (opts.client === "c" && !tls) throw new Error(`--client c: ${why}`);
  console.error(
    `${why}\nfalling back to the Deno load client (bench/load.ts) for the ${kind} rows`,
  );
  return DENO_CLIENT;
}

// ------------------------------------------------------------------ servers

/** The server setup a scenario needs: load runs, plain idle, or idle with the
 * cheapest parking (etcp --hibernate vs raw parked on a 1-byte read). */
type Variant = "load" | "idle" | "hibernated";

interface ServerDef {
  name: string;
  cmd: string[];
  flags: Record<Variant, string[]>;
  /** Speaks TLS (the fixture certificate): runs the TLS scenarios only. */
  tls?: boolean;
  /** Run by Node: skipped if `--node` does not run. */
  node?: boolean;
}

const RAW: ServerDef = {
  name: "raw",
  cmd: [DENO, "run", "-A", `${BENCH}raw_echo.ts`],
  flags: { load: [], idle: ["--park", "65536"], hibernated: ["--park", "1"] },
};

// Node has no parking nor hibernation to choose: an idle Node socket holds no
// read buffer, so every variant is the same server.
const NODE: ServerDef = {
  name: "node",
  cmd: [...opts.node.trim().split(/\s+/), NODE_ECHO],
  flags: { load: [], idle: [], hibernated: [] },
  node: true,
};

function etcp(name: string, extra: string[]): ServerDef {
  if (opts["etcp-cmd"] === "raw") return { ...RAW, name };
  const cmd = opts["etcp-cmd"]
    ? opts["etcp-cmd"].trim().split(/\s+/)
    : [DENO, "run", "-A", EXAMPLE];
  const base = ["--framing", "len4", ...extra];
  const hibernate = extra.includes("--hibernate") ? [] : ["--hibernate"];
  return {
    name,
    cmd,
    flags: { load: base, idle: base, hibernated: [...base, ...hibernate] },
  };
}

// TLS servers serve load runs only (no idle scenario runs over TLS).
const RAW_TLS: ServerDef = {
  name: "raw-tls",
  cmd: [DENO, "run", "-A", `${BENCH}raw_tls_echo.ts`],
  flags: { load: [], idle: [], hibernated: [] },
  tls: true,
};

const NODE_TLS: ServerDef = { ...NODE, name: "node-tls", cmd: [...NODE.cmd, "--tls"], tls: true };

function etcpTls(name: string): ServerDef {
  if (opts["etcp-cmd"] === "raw") return { ...RAW_TLS, name };
  const cmd = opts["etcp-tls-cmd"]
    ? opts["etcp-tls-cmd"].trim().split(/\s+/)
    : [DENO, "run", "-A", TLS_EXAMPLE];
  const base = ["--framing", "len4"];
  return { name, cmd, flags: { load: base, idle: base, hibernated: base }, tls: true };
}

const SERVERS: Record<string, ServerDef> = {
  raw: RAW,
  node: NODE,
  etcp: etcp("etcp", []),
  "etcp-sync": etcp("etcp-sync", ["--sync"]),
  "etcp-hibernate": etcp("etcp-hibernate", ["--hibernate"]),
  // One packet event per read carrying all its frames (batch(), opt-in), instead of one per frame.
  "etcp-batch": etcp("etcp-batch", ["--batch"]),
  // The echo example with every connection traced to a counting function (tracing on's cost).
  "etcp-trace": {
    ...etcp("etcp-trace", []),
    cmd: [DENO, "run", "-A", `${ROOT}bench/trace_echo.ts`],
  },
  "raw-tls": RAW_TLS,
  "node-tls": NODE_TLS,
  "etcp-tls": etcpTls("etcp-tls"),
};

/** `node --version` (or the --node command's), or why it did not run. */
async function nodeVersion(): Promise<{ version?: string; why?: string }> {
  const cmd = NODE.cmd.slice(0, -1);
  try {
    const out = await new Deno.Command(cmd[0], {
      args: [...cmd.slice(1), "--version"],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.success ? out.stdout : out.stderr).trim();
    return out.success ? { version: text } : { why: `exit code ${out.code}: ${text}` };
  } catch (e) {
    return { why: e instanceof Deno.errors.NotFound ? "not found on PATH" : String(e) };
  }
}

/** `cmd` (deno run … or node …) with V8's young generation fixed at --idle-semi-space MB. */
function withSemiSpace(cmd: string[]): string[] {
  const mb = opts["idle-semi-space"];
  if (!mb) return cmd;
  const flags = [`--min-semi-space-size=${mb}`, `--max-semi-space-size=${mb}`];
  if (cmd[0] === DENO && cmd[1] === "run") {
    return [DENO, "run", `--v8-flags=${flags.join(",")}`, ...cmd.slice(2)];
  }
  return cmd.includes(NODE_ECHO) ? [cmd[0], ...flags, ...cmd.slice(1)] : cmd;
}

// An idle run holds a descriptor per connection at both ends, plus a few of its own.
const IDLE_FILES = opts["idle-connections"] + 256;

async function startServer(def: ServerDef, variant: Variant): Promise<Listening> {
  const cmd = [
    ...(variant === "load" ? def.cmd : withSemiSpace(def.cmd)),
    ...def.flags[variant],
    ...["--port", "0", "--hostname", "127.0.0.1"],
  ];
  return await spawnListening(
    variant === "load" ? cmd : withOpenFiles(cmd, IDLE_FILES),
    def.name,
    LISTEN_TIMEOUT_MS,
    ROOT,
  );
}

// -------------------------------------------------------------------- peers

/**
 * A column of a table. In the tcp and tls groups a peer is a server, each run
 * against its own process of it; in the pool group the peers are the two ways
 * of calling (Connection.call, pool.call), taking turns within one client
 * process against one server.
 */
interface Peer {
  name: string;
  server: ServerDef;
  /** Pool rows: how the calls go (pool_load.ts --via). */
  way?: "connection" | "pool";
}

const serverPeer = (server: ServerDef): Peer => ({ name: server.name, server });

/** The tables of the report, in order. Issue 12's registry rows (KvRegistry
 * against MemoryRegistry: accept rate with each, register/lookup/list per
 * second, a remote call against a local one) will be a group "registry" of
 * their own here, with their own client and peers, as the pool group is. */
type GroupId = "tcp" | "tls" | "pool";
const GROUP_IDS: GroupId[] = ["tcp", "tls", "pool"];

// ---------------------------------------------------------------- scenarios

interface Scenario {
  name: string;
  group: GroupId;
  variant: Variant;
  /** load: the group's load client; idle: bench/idle.ts; pool: bench/pool_load.ts. */
  tool: "load" | "idle" | "pool";
  args: string[];
  unit: string;
}

const bytes = (n: number) => n >= 1024 && n % 1024 === 0 ? `${n / 1024} KiB` : `${n} B`;
const timing = [`--duration`, `${opts.duration}`, "--warmup", `${opts.warmup}`];
// (A load window's --duration and --warmup are added per window: measureInterleaved.)
const load = (mode: string, size: number, depth: number, connections = opts.connections) => [
  ...["--mode", mode, "--size", `${size}`, "--depth", `${depth}`],
  ...["--connections", `${connections}`],
];
const idle = [
  ...["--connections", `${opts["idle-connections"]}`, "--from", `${opts["idle-from"]}`],
  ...["--send-one", "--size", `${opts.size}`],
];
const pool = (connections: number) => [
  ...["--connections", `${connections}`, "--callers", `${opts["pool-callers"]}`],
  ...["--size", `${opts.size}`],
  ...timing,
];
const idleWhat = opts["idle-from"]
  ? `slope ${opts["idle-from"]}→${opts["idle-connections"]} conns`
  : `memory per conn (${opts["idle-connections"]})`;
const plural = (n: number, what: string) => `${n} ${what}${n === 1 ? "" : "s"}`;

const SCENARIOS: Scenario[] = [
  {
    name: `ping-pong ${bytes(opts.size)}, depth 1`,
    group: "tcp",
    variant: "load",
    tool: "load",
    args: load("echo", opts.size, 1),
    unit: "frames/s",
  },
  {
    name: `pipelined ${bytes(opts.size)}, depth ${opts.depth}`,
    group: "tcp",
    variant: "load",
    tool: "load",
    args: load("echo", opts.size, opts.depth),
    unit: "frames/s",
  },
  {
    name: `bulk ${bytes(opts["bulk-size"])}, depth 1, ${opts["bulk-connections"]} conns`,
    group: "tcp",
    variant: "load",
    tool: "load",
    args: load("echo", opts["bulk-size"], 1, opts["bulk-connections"]),
    unit: "frames/s",
  },
  {
    name: `accept rate (connect, ${bytes(opts.size)}, close)`,
    group: "tcp",
    variant: "load",
    tool: "load",
    args: load("accept", opts.size, 1),
    unit: "conn/s",
  },
  {
    name: `idle ${idleWhat} (raw --park 65536)`,
    group: "tcp",
    variant: "idle",
    tool: "idle",
    args: idle,
    unit: "B/conn",
  },
  {
    name: `idle ${idleWhat}, hibernated (raw --park 1)`,
    group: "tcp",
    variant: "hibernated",
    tool: "idle",
    args: idle,
    unit: "B/conn",
  },
  {
    name: `TLS ping-pong ${bytes(opts.size)}, depth 1`,
    group: "tls",
    variant: "load",
    tool: "load",
    args: [...load("echo", opts.size, 1), "--tls", "--ca", CA],
    unit: "frames/s",
  },
  {
    name: `TLS bulk ${bytes(opts["bulk-size"])}, depth 1, ${opts["bulk-connections"]} conns`,
    group: "tls",
    variant: "load",
    tool: "load",
    args: [...load("echo", opts["bulk-size"], 1, opts["bulk-connections"]), "--tls", "--ca", CA],
    unit: "frames/s",
  },
  {
    name: `pool call ${bytes(opts.size)}, 1 connection, ${opts["pool-callers"]} callers`,
    group: "pool",
    variant: "load",
    tool: "pool",
    args: pool(1),
    unit: "calls/s",
  },
  {
    name: `pool call ${bytes(opts.size)}, ${plural(opts["pool-connections"], "connection")}, ${
      opts["pool-callers"]
    } callers`,
    group: "pool",
    variant: "load",
    tool: "pool",
    args: pool(opts["pool-connections"]),
    unit: "calls/s",
  },
];

/** One run of one scenario against one peer. */
interface Run {
  /** frames, connections or calls per second, or idle bytes per connection */
  value: number;
  /** the JSON line of the load client, idle.ts or pool_load.ts */
  data: Record<string, number>;
  /** the round it was measured in (load rows: the rounds of windows) */
  round: number;
}

interface Result {
  scenario: string;
  server: string;
  best?: Run; // the run that counts: the best (load, pool) or the median (idle)
  runs: Run[];
  failures: string[];
}

/** An idle row's run against its own process of the peer's server. */
async function measureIdle(s: Scenario, peer: Peer, round: number): Promise<Run> {
  const server = await startServer(peer.server, s.variant);
  try {
    const data = await runJson([
      ...withOpenFiles([DENO, "run", "-A", `${BENCH}idle.ts`], IDLE_FILES),
      ...s.args,
      ...["--host", server.host, "--port", `${server.port}`, "--pid", `${server.pid}`],
    ], IDLE_TIMEOUT_MS);
    return { value: data.slopeBytes ?? data.perConnBytes, data, round };
  } finally {
    await server.stop();
  }
}

/**
 * One round of a load row: every server of the group is started (a process each, alive
 * together: a server with no load uses no CPU), then each gets --windows windows of load in
 * turns, the order flipping every window. On this kind of machine the speed of the whole VM
 * moves by ±15% from one second to the next: taking the servers in short turns spreads the
 * slow spells over all of them alike, where a run per server (the way of this script until
 * 30 Nov) gave one server a slow spell and the next a quick one. Yields each window as it
 * is measured, or the reason a server could not start or a window failed.
 */
async function* measureInterleaved(
  s: Scenario,
  group: Group,
  round: number,
): AsyncGenerator<[number, Run | Error]> {
  const servers: Array<Listening | Error> = [];
  try {
    for (const peer of group.peers) {
      servers.push(await startServer(peer.server, s.variant).catch(asError));
    }
    for (const [i, server] of servers.entries()) if (server instanceof Error) yield [i, server];
    const order = [...group.peers.keys()];
    if (round % 2) order.reverse();
    for (let window = 0; window < opts.windows; window++, order.reverse()) {
      for (const i of order) {
        const server = servers[i];
        if (server instanceof Error) continue;
        const warmup = window === 0 ? opts.warmup : WARM_WARMUP;
        try {
          const data = await runJson([
            ...group.client.cmd,
            ...s.args,
            ...["--duration", `${WINDOW_SECONDS}`, "--warmup", `${warmup}`],
            ...["--host", server.host, "--port", `${server.port}`, "--server-pid", `${server.pid}`],
          ], LOAD_TIMEOUT_MS);
          yield [i, { value: data.framesPerSec, data, round }];
        } catch (e) {
          yield [i, asError(e)];
        }
      }
    }
  } finally {
    await Promise.all(servers.map((server) => server instanceof Error ? null : server.stop()));
  }
}

const asError = (e: unknown) => e instanceof Error ? e : new Error(String(e));

/** The pool rows: one pool_load.ts process takes turns between the group's
 * ways (the first way flips every round), against one server; a run per peer. */
async function measureWays(s: Scenario, group: Group, round: number): Promise<Run[]> {
  const ways = group.peers.map((p) => p.way!);
  if (round % 2) ways.reverse();
  const server = await startServer(group.baseline.server, s.variant);
  let data;
  try {
    data = await runJson([
      ...group.client.cmd,
      ...s.args,
      ...["--via", ways.join(",")],
      ...["--strategy", opts["pool-strategy"], "--spread", opts["pool-spread"]],
      ...["--host", server.host, "--port", `${server.port}`, "--server-pid", `${server.pid}`],
    ], LOAD_TIMEOUT_MS) as unknown as { via: Record<string, Record<string, number>> };
  } finally {
    await server.stop();
  }
  return group.peers.map((p) => {
    const d = data.via[p.way!];
    return { value: d.framesPerSec, data: d, round };
  });
}

/** One round of scenario `s`: runs (or the reasons they failed) by peer
 * index, each as soon as it is known. */
async function* measureRound(
  s: Scenario,
  group: Group,
  round: number,
): AsyncGenerator<[number, Run | Error]> {
  if (s.tool === "load") return yield* measureInterleaved(s, group, round);
  if (s.tool === "pool") {
    let runs: Run[] | Error;
    try {
      runs = await measureWays(s, group, round);
    } catch (e) {
      runs = asError(e);
    }
    for (const i of group.peers.keys()) yield [i, runs instanceof Error ? runs : runs[i]];
    return;
  }
  for (const [i, peer] of group.peers.entries()) {
    try {
      yield [i, await measureIdle(s, peer, round)];
    } catch (e) {
      yield [i, asError(e)];
    }
  }
}

// ------------------------------------------------------------------- report

const si = (n: number) =>
  n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : n.toFixed(0);

function valueCell(s: Scenario, r: Run): string {
  const d = r.data;
  const v = s.tool === "idle"
    ? `${(r.value / 1024).toFixed(1)} KiB/conn`
    : `${si(r.value)} ${s.unit}${d.otherCpuPct > NOISY_PCT ? " †" : ""}`;
  if (d.errors || d.corrupt) {
    return `${v} ⚠ ${d.errors} errors, ${d.corrupt} corrupt`;
  }
  if (d.accepted < d.connections) return `${v} ⚠ only ${d.accepted} accepted`;
  return v;
}

type Detail = [string, (d: Record<string, number>) => string];

const cpuDetail = (client: string): Detail => [
  `CPU: ${client} client s, client/server/other %`,
  (d) =>
    `${d.cpuSeconds.toFixed(1)} s, ` +
    [d.cpuPct, d.serverCpuPct, d.otherCpuPct].map(Math.round).join("/"),
];

// Columns shown for each peer, from its best run (load and pool runs only).
const details = (group: GroupId, client: LoadClient): Detail[] =>
  group === "pool"
    ? [
      ["p50/p99 µs", (d) => d.p50us == null ? "–" : `${d.p50us} / ${d.p99us}`],
      ["client µs/call", (d) => d.clientUsPerCall?.toFixed(2) ?? "–"],
      ["server µs/call", (d) => d.serverUsPerFrame?.toFixed(2) ?? "–"],
      cpuDetail("pool_load"),
    ]
    : [
      ["p50/p99 µs", (d) => d.p50us == null ? "–" : `${d.p50us} / ${d.p99us}`],
      ["MB/s", (d) => d.mbPerSec.toFixed(1)],
      ["server µs/frame", (d) => d.serverUsPerFrame?.toFixed(2) ?? "–"],
      cpuDetail(client.name),
    ];

/** One table of the report, with its baseline and load client. */
interface Group {
  id: GroupId;
  title: string;
  peers: Peer[];
  baseline: Peer;
  /** Ratio columns: [peer, against], rates divided (higher is better). */
  ratios: [Peer, Peer][];
  scenarios: Scenario[];
  client: LoadClient;
}

function table(group: Group, results: Result[]): string {
  const { peers, ratios } = group;
  const DETAILS = details(group.id, group.client);
  const pool = group.id === "pool";
  const header = [
    "scenario",
    ...peers.map((p) => p.name),
    ...ratios.map(([p, q]) => `${p.name}/${q.name}`),
    ...(pool ? ["pool routing cost (client CPU per call)"] : []),
    ...DETAILS.flatMap(([title]) => peers.map((p) => `${title} ${p.name}`)),
  ];
  const rows = group.scenarios.flatMap((s) => {
    const of = (p: Peer) => results.find((r) => r.scenario === s.name && r.server === p.name);
    if (!peers.some(of)) return [];
    const detail = (p: Peer, show: (d: Record<string, number>) => string) => {
      const best = of(p)?.best;
      return best && s.tool !== "idle" ? show(best.data) : "–";
    };
    const [conn, viaPool] = peers.map((p) => of(p)?.best?.data.clientUsPerCall);
    return [[
      s.name,
      ...peers.map((p) => {
        const { best, failures } = of(p)!;
        if (!best) return "failed";
        return valueCell(s, best) +
          (failures.length ? ` (${failures.length} runs failed)` : "");
      }),
      ...ratios.map(([p, q]) => {
        const a = of(p)?.best, b = of(q)?.best;
        return a && b ? `${(a.value / b.value).toFixed(2)}×` : "–";
      }),
      ...(pool ? [conn && viaPool ? `${((viaPool / conn - 1) * 100).toFixed(1)}%` : "–"] : []),
      ...DETAILS.flatMap(([, show]) => peers.map((p) => detail(p, show))),
    ]];
  });
  return [header, header.map(() => "---"), ...rows]
    .map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

/**
 * The load rows' ratios to the baseline round by round (each server's best window in the
 * round): how steady a ratio of the main table is. Empty if there is one round.
 */
function roundsTable(group: Group, results: Result[]): string {
  const ratios = group.ratios.filter(([, q]) => q === group.baseline);
  const scenarios = group.scenarios.filter((s) => s.tool === "load");
  if (opts.rounds < 2 || !ratios.length || !scenarios.length) return "";
  const bestIn = (r: Result | undefined, round: number) =>
    r?.runs.reduce((best, run) => run.round === round ? Math.max(best, run.value) : best, 0) ?? 0;
  const header = ["round by round", ...ratios.map(([p, q]) => `${p.name}/${q.name}`)];
  const rows = scenarios.map((s) => {
    const of = (p: Peer) => results.find((r) => r.scenario === s.name && r.server === p.name);
    return [
      s.name,
      ...ratios.map(([p, q]) =>
        Array.from({ length: opts.rounds }, (_, k) => {
          const a = bestIn(of(p), k), b = bestIn(of(q), k);
          return a && b ? (a / b).toFixed(2) : "–";
        }).join(" ")
      ),
    ];
  });
  return [header, header.map(() => "---"), ...rows]
    .map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

function machine(node: string | undefined) {
  const cpuinfo = Deno.readTextFileSync("/proc/cpuinfo");
  return {
    cpu: cpuinfo.match(/^model name\s*:\s*(.*)$/m)?.[1] ?? "unknown cpu",
    cores: navigator.hardwareConcurrency,
    os: `${Deno.build.os} ${Deno.osRelease()}`,
    deno: Deno.version.deno,
    node: node ?? null,
  };
}

// Above this share of a core in a best run, the load client may be the limit.
const CLIENT_BUSY_PCT = 90;

/** The load client's CPU (% of one core) over a group's load runs, for its header. */
function clientCpu(group: Group, results: Result[]): string {
  const { client } = group;
  const load = (r: Result) =>
    group.scenarios.find((s) => s.name === r.scenario)?.tool !== "idle" &&
    group.peers.some((p) => p.name === r.server);
  const pcts = results.filter(load).flatMap((r) => r.runs.map((run) => run.data.cpuPct))
    .filter((x) => typeof x === "number").toSorted((a, b) => a - b);
  const what = client === POOL_CLIENT
    ? `bench/pool_load.ts (this library's client, one Deno process, ${
      opts["pool-callers"]
    } callers) against ${group.baseline.server.name} (${
      group.baseline.server.cmd.at(-1)!.replace(ROOT, "")
    })`
    : client.name === "C"
    ? "C (bench/load.c, cc -O2, one thread, epoll)"
    : client.name === "C+OpenSSL"
    ? "C+OpenSSL (bench/load.c, cc -O2 -DETCP_TLS -lssl -lcrypto, one thread, epoll)"
    : `Deno (bench/load.ts${group.id === "tls" ? " --tls" : ""})`;
  if (!pcts.length) return `load client: ${what}`;
  const busiest = Math.max(
    ...results.filter(load).map((r) => r.best?.data.cpuPct ?? 0),
  );
  const median = pcts[Math.floor(pcts.length / 2)];
  // In the pool rows the client is what is measured: it should be the limit.
  const warning = busiest > CLIENT_BUSY_PCT && client !== POOL_CLIENT
    ? ` ⚠ a best run took ${Math.round(busiest)}%: there the client may be the limit`
    : "";
  return `load client: ${what}; its CPU in the measured windows: ${Math.round(pcts[0])}–${
    Math.round(pcts[pcts.length - 1])
  }% of one core (median ${Math.round(median)}%)${warning}`;
}

function tlsNote(client: LoadClient): string {
  const ack = client.name === "C+OpenSSL"
    ? `The C client ACKs a partly received echo at once (TCP_QUICKACK), lest
Linux's delayed ACK stall the tail of a bulk echo by up to 40 ms.`
    : `The Deno client cannot ACK early (no TCP_QUICKACK): the TLS bulk row
mostly measures Linux's 40 ms delayed ACK, not the servers (build bench/load.c
with OpenSSL for that row).`;
  return `TLS: TLS 1.3 with the fixture certificate (tests/fixtures/server.crt, ECDSA
P-256), handshakes done before the warmup. Deno's TLS connections cannot turn
Nagle off (node-tls does: setNoDelay): a Deno server holds the tail of a bulk
echo until its head is ACKed. ${ack}`;
}

const NODE_NOTE = `node: bench/node_echo.mjs (node:net, or node:tls for node-tls): frames
cut from each read and handed to an echo handler one by one, the socket corked
over one read's frames so their echoes leave in one write; a frame split across
reads is joined into one Buffer first. Idle rows: Node has no parking or
hibernation to choose, the same server runs in both.`;

const POOL_NOTE = `Pool rows: Connection.call = connect() connections, ${
  opts["pool-spread"] === "rotate"
    ? "each call on the next\nconnection in turn (by hand, as round-robin spreads them)"
    : "caller i always on\nconnection i % N (by hand)"
}; pool.call = createPool() of N connections (strategy ${
  opts["pool-strategy"]
}), the pool picking for each call. Same handler (examples/pool_client.ts's
echoCalls), same server, same client process: its callers take turns of 250 ms
between the two ways, each measured over its own turns. Routing cost: the
client's CPU per call through the pool over Connection.call's, minus one (the
target is under 10%); the calls/s ratio shows the same when the client is the
limit (its CPU near 100%).`;

function report(groups: Group[], results: Result[], node: string | undefined, skipped: string) {
  const m = machine(node);
  const tlsGroup = groups.find((g) => g.id === "tls");
  const tables = groups.map((g) => {
    const rounds = roundsTable(g, results);
    return `${g.title ? `${g.title}\n` : ""}${clientCpu(g, results)}\n\n${table(g, results)}${
      rounds ? `\n\n${rounds}` : ""
    }`;
  });
  const hasNode = groups.some((g) => g.peers.some((p) => p.server.node));
  const notes = [
    hasNode ? NODE_NOTE : "",
    skipped,
    tlsGroup ? tlsNote(tlsGroup.client) : "",
    groups.some((g) => g.id === "pool") ? POOL_NOTE : "",
  ].filter((x) => x);
  console.log(`## etcp bench, ${new Date().toISOString()}

${m.cpu}, ${m.cores} cores, ${m.os}, Deno ${m.deno}${node ? `, Node ${node}` : ""}
load: ${opts.connections} connections; ${
    plural(opts.rounds, "round")
  }, each starting every server of a table anew, then ${
    plural(opts.windows, "window")
  } of ${WINDOW_SECONDS} s per server in turns (${opts.warmup} s warmup before a server's first, ${WARM_WARMUP} s before the others); the best window of all counts, and the ratios round by round (best window in the round) follow each table; pool rows: best of ${opts.rounds} runs of ${opts.warmup} s warmup + ${opts.duration} s; idle: ${
    opts["idle-from"]
      ? `slope of the server's RSS from ${opts["idle-from"]} to ${
        opts["idle-connections"]
      } connections (least squares through 5 settled points), in bytes per added connection`
      : `server RSS growth over ${opts["idle-connections"]} connections`
  }, one echoed frame each, median of ${opts["idle-rounds"]}${
    opts["idle-semi-space"]
      ? `, V8 young generation fixed at ${opts["idle-semi-space"]} MB semi-spaces`
      : ""
  }${opts["etcp-cmd"] ? `; etcp = ${opts["etcp-cmd"]}` : ""}${
    opts["etcp-tls-cmd"] ? `; etcp-tls = ${opts["etcp-tls-cmd"]}` : ""
  }

${tables.join("\n\n")}

Ratios: rates divided (higher is better), memory divided (lower is better).
MB/s: echoed frame bytes, one way. Server µs/frame: the server's CPU per echoed
frame (per connection in the accept row); it tells servers apart even when the
load client is the limit (its CPU near 100%). CPU: the load client's CPU
seconds over its life, then the % of one core used in the measured window by
the load client, the server (over 100: its helper threads) and all other
processes. On loopback most of the C client's CPU is kernel TCP work that any
peer pays per write and read, little is its own code. † marks a best run during
which other processes used over ${NOISY_PCT}% of a core: rerun on a quieter machine.${
    notes.length ? `\n\n${notes.join("\n\n")}` : ""
  }`);
  if (opts.json) {
    const loadClient = Object.fromEntries(groups.map((g) => [g.id, g.client.name]));
    console.log(JSON.stringify({ machine: m, options: opts, loadClient, results }));
  }
}

// --------------------------------------------------------------------- main

/** The groups to run: tables with their peers, ratios and scenarios. */
async function plan(): Promise<{ groups: Group[]; node?: string; skipped: string }> {
  const wantedGroups = opts.groups.split(",").map((g) => g.trim()).filter((g) => g);
  for (const g of wantedGroups) {
    if (!GROUP_IDS.includes(g as GroupId)) {
      throw new Error(`unknown group ${g} (known: ${GROUP_IDS}; registry rows: not built yet)`);
    }
  }
  let servers = opts.servers.split(",").map((name) => {
    const def = SERVERS[name.trim()];
    if (!def) {
      throw new Error(`unknown server ${name} (known: ${Object.keys(SERVERS)})`);
    }
    return def;
  });
  const poolServer = SERVERS[opts["pool-server"]];
  if (!poolServer || poolServer.tls || !["raw", "node", "etcp"].includes(opts["pool-server"])) {
    throw new Error(`--pool-server must be raw, node or etcp, not ${opts["pool-server"]}`);
  }
  const wanted = opts.only.toLowerCase().split(",").filter((w) => w);
  const scenariosOf = (id: GroupId) =>
    SCENARIOS.filter((s) =>
      s.group === id && wantedGroups.includes(id) &&
      (!wanted.length || wanted.some((w) => s.name.toLowerCase().includes(w)))
    );
  // Node is needed if a node server would run.
  const needsNode =
    (["tcp", "tls"] as const).some((id) =>
      scenariosOf(id).length && servers.some((d) => d.node && !!d.tls === (id === "tls"))
    ) || (scenariosOf("pool").length > 0 && poolServer.node);
  let node: string | undefined;
  let skipped = "";
  if (needsNode) {
    const found = await nodeVersion();
    node = found.version;
    if (!node) {
      const names = servers.filter((d) => d.node).map((d) => d.name).join(", ");
      skipped = `Node rows skipped: "${
        NODE.cmd.slice(0, -1).join(" ")
      } --version" failed (${found.why}); no ${
        names || "node"
      } column. Install Node or pass --node CMD.`;
      console.error(skipped);
      servers = servers.filter((d) => !d.node);
    }
  }

  const groups: Group[] = [];
  for (const id of GROUP_IDS) {
    const scenarios = scenariosOf(id);
    if (!scenarios.length) continue;
    let peers: Peer[], baseline: Peer, ratios: [Peer, Peer][], title: string;
    let client: LoadClient;
    if (id === "pool") {
      if (poolServer.node && !node) continue;
      peers = [
        { name: "Connection.call", server: poolServer, way: "connection" },
        { name: "pool.call", server: poolServer, way: "pool" },
      ];
      baseline = peers[0];
      ratios = [[peers[1], peers[0]]];
      title =
        "Pools (issue 11): pool.call against Connection.call, this library's client in both, same server";
      client = POOL_CLIENT;
    } else {
      const tls = id === "tls";
      peers = servers.filter((d) => !!d.tls === tls).map(serverPeer);
      if (!peers.length) continue;
      const base = tls ? RAW_TLS : RAW;
      const nodePeer = peers.find((p) => p.server.node);
      baseline = peers.find((p) => p.server === base) ?? peers[0];
      ratios = peers.some((p) => p.server === base)
        ? peers.filter((p) => p !== baseline).map((p): [Peer, Peer] => [p, baseline])
        : [];
      if (nodePeer) {
        for (const p of peers) {
          if (p.name.startsWith("etcp")) ratios.push([p, nodePeer]);
        }
      }
      title = tls
        ? "TLS: raw-tls = bench/raw_tls_echo.ts (Deno.listenTls, writes whole reads back), " +
          "node-tls = bench/node_echo.mjs --tls (node:tls), " +
          "etcp-tls = examples/tls_echo_server.ts (tls()); ratios against raw-tls and node-tls"
        : "";
      client = scenarios.some((s) => s.tool === "load")
        ? await loadClient(tls ? "tls" : "plain")
        : DENO_CLIENT;
    }
    console.error(`load client (${id}): ${client.name} (${client.cmd.join(" ")})`);
    groups.push({ id, title, peers, baseline, ratios, scenarios, client });
  }
  if (!groups.length) {
    throw new Error(
      `--groups ${opts.groups} --only ${opts.only} --servers ${opts.servers}: no scenario`,
    );
  }
  for (const script of [EXAMPLE, TLS_EXAMPLE]) {
    if (!groups.some((g) => g.peers.some((p) => p.server.cmd.includes(script)))) continue;
    try {
      Deno.statSync(script);
    } catch {
      throw new Error(`${script} not found (--etcp-cmd raw to self-test)`);
    }
  }
  return { groups, node, skipped };
}

async function main() {
  const { groups, node, skipped } = await plan();
  const rounds = (s: Scenario) => s.tool === "idle" ? opts["idle-rounds"] : opts.rounds;
  const runsPerRound = (s: Scenario) => s.tool === "load" ? opts.windows : 1;
  const total = groups.reduce(
    (n, g) => n + g.scenarios.reduce((m, s) => m + rounds(s) * runsPerRound(s) * g.peers.length, 0),
    0,
  );
  let step = 0;
  const results: Result[] = [];
  for (const group of groups) {
    const { scenarios, peers } = group;
    for (const s of scenarios) {
      const rs = peers.map((p): Result => ({
        scenario: s.name,
        server: p.name,
        runs: [],
        failures: [],
      }));
      results.push(...rs);
      // Peers alternate within a scenario, so drift hits them alike.
      for (let round = 0; round < rounds(s); round++) {
        for await (const [i, run] of measureRound(s, group, round)) {
          const label = `[${++step}/${total}] ${s.name}, ${peers[i].name}${
            rounds(s) > 1 ? `, round ${round + 1}` : ""
          }`;
          if (run instanceof Error) {
            rs[i].failures.push(run.message);
            console.error(`${label}: failed: ${run.message}`);
            continue;
          }
          rs[i].runs.push(run);
          const d = run.data;
          const other = d.otherCpuPct !== undefined
            ? ` (CPU: client ${Math.round(d.cpuPct)}%, server ${
              Math.round(d.serverCpuPct)
            }%, other ${Math.round(d.otherCpuPct)}%)`
            : "";
          console.error(`${label}: ${valueCell(s, run)}${other}`);
        }
      }
      // Load rows: the best run (a slow spell only ever slows a run down). Idle rows: the
      // median, as a slope can come out low as well as high (raw parked read 7.7 KiB once,
      // against 8.5–8.6 in twenty runs around it).
      for (const r of rs) {
        r.best = s.tool === "idle"
          ? r.runs.toSorted((a, b) => a.value - b.value)[(r.runs.length - 1) >> 1]
          : r.runs.toSorted((a, b) => b.value - a.value)[0];
      }
      // The pool rows compare ways measured in one process: keep them paired,
      // from the round with the most calls in all (the least disturbed).
      if (s.tool === "pool" && rs.every((r) => r.runs.length === rs[0].runs.length)) {
        const total = (k: number) => rs.reduce((n, r) => n + r.runs[k].value, 0);
        const k = rs[0].runs.keys().reduce((a, b) => total(b) > total(a) ? b : a, 0);
        for (const r of rs) r.best = r.runs[k];
      }
    }
  }
  report(groups, results, node, skipped);
  // A benchmark that lost or mangled frames is a failed run, whatever its speed.
  const bad = results.some((r) =>
    r.failures.length || r.runs.some((run) => run.data.errors || run.data.corrupt)
  );
  if (bad) Deno.exitCode = 1;
}

await runLoadBenchmark(main);
