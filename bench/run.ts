// `deno task bench`: raw Deno vs etcp, same load client, same run.
//
//   deno run -A bench/run.ts [--duration 2] [--warmup 0.5] [--rounds 3]
//     [--connections 50] [--size 64] [--depth 16] [--bulk-size 65536]
//     [--idle-connections 2000] [--only SUBSTR[,SUBSTR]]
//     [--servers raw,etcp[,etcp-sync,etcp-hibernate]] [--etcp-cmd CMD|raw]
//     [--client c|deno] [--json]
//
// Each run starts a fresh server process, waits for its `listening on
// HOST:PORT` line, drives it with the load client or bench/idle.ts (separate
// processes) and stops it. The load client is bench/load.c, compiled once per
// run with `cc -O2` into a temporary directory: it costs a fraction of the
// CPU of bench/load.ts, which saturates a core before a fast server does.
// Without a working `cc`, bench/load.ts runs instead (same flags, same JSON).
// Load scenarios run `rounds` times, servers alternating, and the best round
// counts: the noise of a shared 2-core machine only ever slows a run down. Prints a markdown table on stdout
// (progress on stderr) and, with --json, one JSON line after it.
import { parseFlags, within } from "./_common.ts";
import { killAll, runJson, spawn } from "./_children.ts";

const USAGE = `usage: deno run -A bench/run.ts [options]
  --duration 2           seconds measured per load run, after --warmup 0.5
  --rounds 3             runs per load scenario and server; the best counts
  --connections 50       concurrent connections of the load client
  --size 64              frame payload bytes (ping-pong, pipelined, accept)
  --depth 16             frames in flight per connection when pipelined
  --bulk-size 65536      frame payload bytes of the bulk run
  --idle-connections 2000
  --only SUBSTR,...      only scenarios whose name contains one of these
  --servers raw,etcp     among raw, etcp, etcp-sync, etcp-hibernate
  --etcp-cmd CMD         runs CMD instead of "deno run -A examples/echo_server.ts"
                         for the etcp servers (also env ETCP_CMD); "raw" puts
                         raw_echo.ts in their place: a harness self-test, ratios ≈ 1
  --client c|deno        the load client: bench/load.c (compiled with cc) or
                         bench/load.ts; default: C if cc compiles it, else Deno
  --json                 also print all results as one JSON line`;
const opts = parseFlags(Deno.args, {
  duration: 2,
  warmup: 0.5,
  rounds: 3,
  connections: 50,
  size: 64,
  depth: 16,
  "bulk-size": 64 * 1024,
  "idle-connections": 2000,
  only: "",
  servers: "raw,etcp",
  "etcp-cmd": Deno.env.get("ETCP_CMD") ?? "",
  client: "auto",
  json: false,
}, USAGE);
if (!["auto", "c", "deno"].includes(opts.client)) {
  console.error(`--client must be c or deno, not ${opts.client}\n\n${USAGE}`);
  Deno.exit(2);
}

const DENO = Deno.execPath();
const BENCH = new URL(".", import.meta.url).pathname;
const ROOT = new URL("..", import.meta.url).pathname;
const EXAMPLE = `${ROOT}examples/echo_server.ts`;
// The load clients and idle.ts bound themselves; these are backstops.
const LOAD_TIMEOUT_MS = (opts.warmup + opts.duration) * 1000 + 15_000;
const IDLE_TIMEOUT_MS = 75_000;
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
let tempDir: string | undefined;

/** Compiles bench/load.c (once per run); falls back to load.ts unless
 * `--client c` insists. */
async function loadClient(): Promise<LoadClient> {
  if (opts.client === "deno") return DENO_CLIENT;
  let why: string;
  try {
    tempDir = await Deno.makeTempDir({ prefix: "etcp-bench-" });
    const bin = `${tempDir}/etcp-load`;
    const out = await new Deno.Command("cc", {
      args: ["-O2", "-o", bin, `${BENCH}load.c`],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (out.success) return { name: "C", cmd: [bin] };
    why = `cc failed (exit code ${out.code}):\n${new TextDecoder().decode(out.stderr).trim()}`;
  } catch (e) {
    why = e instanceof Deno.errors.NotFound ? "no cc found" : `cc: ${e}`;
  }
  if (opts.client === "c") throw new Error(`--client c: ${why}`);
  console.error(`${why}\nfalling back to the Deno load client (bench/load.ts)`);
  return DENO_CLIENT;
}

function removeTempDir() {
  if (!tempDir) return;
  try {
    Deno.removeSync(tempDir, { recursive: true });
  } catch { /* already gone */ }
  tempDir = undefined;
}
// Also on Deno.exit (the signal handlers of _children.ts).
globalThis.addEventListener("unload", removeTempDir);

// ------------------------------------------------------------------ servers

/** The server setup a scenario needs: load runs, plain idle, or idle with the
 * cheapest parking (etcp --hibernate vs raw parked on a 1-byte read). */
type Variant = "load" | "idle" | "hibernated";

interface ServerDef {
  name: string;
  cmd: string[];
  flags: Record<Variant, string[]>;
}

const RAW: ServerDef = {
  name: "raw",
  cmd: [DENO, "run", "-A", `${BENCH}raw_echo.ts`],
  flags: { load: [], idle: ["--park", "65536"], hibernated: ["--park", "1"] },
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

const SERVERS: Record<string, ServerDef> = {
  raw: RAW,
  etcp: etcp("etcp", []),
  "etcp-sync": etcp("etcp-sync", ["--sync"]),
  "etcp-hibernate": etcp("etcp-hibernate", ["--hibernate"]),
};

interface Running {
  pid: number;
  host: string;
  port: number;
  stop(): Promise<void>;
}

async function startServer(def: ServerDef, variant: Variant): Promise<Running> {
  const child = spawn([
    ...def.cmd,
    ...def.flags[variant],
    ...["--port", "0", "--hostname", "127.0.0.1"],
  ], ROOT);
  // null if stdout closed first: the server died.
  const line = await within(child.stdout.firstLine, LISTEN_TIMEOUT_MS, null);
  const m = line?.match(/^listening on (.+):(\d+)\s*$/);
  if (!m) {
    await child.stop();
    await child.stderr.done;
    throw new Error(
      `${def.name}: no "listening on HOST:PORT" line (got ${
        JSON.stringify(line)
      })\n${child.stderr.tail()}`,
    );
  }
  return {
    pid: child.process.pid,
    host: m[1].replace(/^\[(.*)\]$/, "$1"),
    port: Number(m[2]),
    stop: child.stop,
  };
}

// ---------------------------------------------------------------- scenarios

interface Scenario {
  name: string;
  variant: Variant;
  tool: "load" | "idle";
  args: string[];
  unit: string;
}

const bytes = (n: number) => n >= 1024 && n % 1024 === 0 ? `${n / 1024} KiB` : `${n} B`;
const load = (mode: string, size: number, depth: number) => [
  ...["--mode", mode, "--size", `${size}`, "--depth", `${depth}`],
  ...["--connections", `${opts.connections}`],
  ...["--duration", `${opts.duration}`, "--warmup", `${opts.warmup}`],
];
const idle = [
  ...["--connections", `${opts["idle-connections"]}`],
  ...["--send-one", "--size", `${opts.size}`],
];

const SCENARIOS: Scenario[] = [
  {
    name: `ping-pong ${bytes(opts.size)}, depth 1`,
    variant: "load",
    tool: "load",
    args: load("echo", opts.size, 1),
    unit: "frames/s",
  },
  {
    name: `pipelined ${bytes(opts.size)}, depth ${opts.depth}`,
    variant: "load",
    tool: "load",
    args: load("echo", opts.size, opts.depth),
    unit: "frames/s",
  },
  {
    name: `bulk ${bytes(opts["bulk-size"])}, depth 1`,
    variant: "load",
    tool: "load",
    args: load("echo", opts["bulk-size"], 1),
    unit: "frames/s",
  },
  {
    name: `accept rate (connect, ${bytes(opts.size)}, close)`,
    variant: "load",
    tool: "load",
    args: load("accept", opts.size, 1),
    unit: "conn/s",
  },
  {
    name: "idle memory per conn (raw --park 65536)",
    variant: "idle",
    tool: "idle",
    args: idle,
    unit: "B/conn",
  },
  {
    name: "idle memory hibernated (raw --park 1)",
    variant: "hibernated",
    tool: "idle",
    args: idle,
    unit: "B/conn",
  },
];

/** One run of one scenario against one server. */
interface Run {
  /** frames (or connections) per second, or idle bytes per connection */
  value: number;
  /** the JSON line of the load client or idle.ts */
  data: Record<string, number>;
}

interface Result {
  scenario: string;
  server: string;
  best?: Run;
  runs: Run[];
  failures: string[];
}

async function measure(s: Scenario, def: ServerDef, client: LoadClient): Promise<Run> {
  const server = await startServer(def, s.variant);
  try {
    const data = await runJson([
      ...(s.tool === "idle" ? [DENO, "run", "-A", `${BENCH}idle.ts`] : client.cmd),
      ...s.args,
      ...["--host", server.host, "--port", `${server.port}`],
      ...[s.tool === "idle" ? "--pid" : "--server-pid", `${server.pid}`],
    ], s.tool === "idle" ? IDLE_TIMEOUT_MS : LOAD_TIMEOUT_MS);
    const value = s.tool === "idle" ? data.perConnBytes : data.framesPerSec;
    return { value, data };
  } finally {
    await server.stop();
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

// Columns shown for each server, from its best run (load runs only).
const details = (client: LoadClient): [string, (d: Record<string, number>) => string][] => [
  ["p50/p99 µs", (d) => d.p50us == null ? "–" : `${d.p50us} / ${d.p99us}`],
  ["MB/s", (d) => d.mbPerSec.toFixed(1)],
  ["server µs/frame", (d) => d.serverUsPerFrame?.toFixed(2) ?? "–"],
  [
    `CPU: ${client.name} client s, client/server/other %`,
    (d) =>
      `${d.cpuSeconds.toFixed(1)} s, ` +
      [d.cpuPct, d.serverCpuPct, d.otherCpuPct].map(Math.round).join("/"),
  ],
];

function table(servers: ServerDef[], results: Result[], client: LoadClient): string {
  const DETAILS = details(client);
  const ratios = servers.includes(RAW) ? servers.filter((d) => d !== RAW) : [];
  const header = [
    "scenario",
    ...servers.map((d) => d.name),
    ...ratios.map((d) => `${d.name}/raw`),
    ...DETAILS.flatMap(([title]) => servers.map((d) => `${title} ${d.name}`)),
  ];
  const rows = SCENARIOS.flatMap((s) => {
    const of = (d: ServerDef) => results.find((r) => r.scenario === s.name && r.server === d.name);
    if (!servers.some(of)) return [];
    const raw = of(RAW)?.best;
    const detail = (d: ServerDef, show: (d: Record<string, number>) => string) => {
      const best = of(d)?.best;
      return best && s.tool === "load" ? show(best.data) : "–";
    };
    return [[
      s.name,
      ...servers.map((d) => {
        const { best, failures } = of(d)!;
        if (!best) return "failed";
        return valueCell(s, best) +
          (failures.length ? ` (${failures.length} runs failed)` : "");
      }),
      ...ratios.map((d) => {
        const best = of(d)?.best;
        return best && raw ? `${(best.value / raw.value).toFixed(2)}×` : "–";
      }),
      ...DETAILS.flatMap(([, show]) => servers.map((d) => detail(d, show))),
    ]];
  });
  return [header, header.map(() => "---"), ...rows]
    .map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

function machine() {
  const cpuinfo = Deno.readTextFileSync("/proc/cpuinfo");
  return {
    cpu: cpuinfo.match(/^model name\s*:\s*(.*)$/m)?.[1] ?? "unknown cpu",
    cores: navigator.hardwareConcurrency,
    os: `${Deno.build.os} ${Deno.osRelease()}`,
    deno: Deno.version.deno,
  };
}

// Above this share of a core in a best run, the load client may be the limit.
const CLIENT_BUSY_PCT = 90;

/** The load client's CPU (% of one core) over all load runs, for the header. */
function clientCpu(client: LoadClient, results: Result[]): string {
  const load = (r: Result) => SCENARIOS.find((s) => s.name === r.scenario)?.tool === "load";
  const pcts = results.filter(load).flatMap((r) => r.runs.map((run) => run.data.cpuPct))
    .filter((x) => typeof x === "number").toSorted((a, b) => a - b);
  const what = client.name === "C"
    ? "C (bench/load.c, cc -O2, one thread, epoll)"
    : "Deno (bench/load.ts)";
  if (!pcts.length) return `load client: ${what}`;
  const busiest = Math.max(
    ...results.filter(load).map((r) => r.best?.data.cpuPct ?? 0),
  );
  const median = pcts[Math.floor(pcts.length / 2)];
  return `load client: ${what}; its CPU in the measured windows: ${Math.round(pcts[0])}–${
    Math.round(pcts[pcts.length - 1])
  }% of one core (median ${Math.round(median)}%)${
    busiest > CLIENT_BUSY_PCT
      ? ` ⚠ a best run took ${Math.round(busiest)}%: there the client may be the limit`
      : ""
  }`;
}

function report(servers: ServerDef[], results: Result[], client: LoadClient) {
  const m = machine();
  console.log(`## etcp bench, ${new Date().toISOString()}

${m.cpu}, ${m.cores} cores, ${m.os}, Deno ${m.deno}
load: ${opts.connections} connections, best of ${opts.rounds} runs of ${opts.warmup} s warmup + ${opts.duration} s; idle: ${
    opts["idle-connections"]
  } connections, one echoed frame each, server RSS growth${
    opts["etcp-cmd"] ? `; etcp = ${opts["etcp-cmd"]}` : ""
  }
${clientCpu(client, results)}

${table(servers, results, client)}

Ratios: other/raw (rates: higher is better; memory: lower is better).
MB/s: echoed frame bytes, one way. Server µs/frame: the server's CPU per echoed
frame (per connection in the accept row); it tells servers apart even when the
load client is the limit (its CPU near 100%). CPU: the load client's CPU
seconds over its life, then the % of one core used in the measured window by
the load client, the server (over 100: its helper threads) and all other
processes. On loopback most of the C client's CPU is kernel TCP work that any
peer pays per write and read, little is its own code. † marks a best run during
which other processes used over ${NOISY_PCT}% of a core: rerun on a quieter machine.`);
  if (opts.json) {
    console.log(JSON.stringify({ machine: m, options: opts, loadClient: client.name, results }));
  }
}

// --------------------------------------------------------------------- main

async function main() {
  const servers = opts.servers.split(",").map((name) => {
    const def = SERVERS[name.trim()];
    if (!def) {
      throw new Error(`unknown server ${name} (known: ${Object.keys(SERVERS)})`);
    }
    return def;
  });
  const wanted = opts.only.toLowerCase().split(",").filter((w) => w);
  const scenarios = SCENARIOS.filter((s) =>
    !wanted.length || wanted.some((w) => s.name.toLowerCase().includes(w))
  );
  if (!scenarios.length) throw new Error(`--only ${opts.only}: no scenario`);
  if (servers.some((d) => d.cmd.includes(EXAMPLE))) {
    try {
      Deno.statSync(EXAMPLE);
    } catch {
      throw new Error(`${EXAMPLE} not found (--etcp-cmd raw to self-test)`);
    }
  }

  const client = scenarios.some((s) => s.tool === "load") ? await loadClient() : DENO_CLIENT;
  console.error(`load client: ${client.name} (${client.cmd.join(" ")})`);
  const rounds = (s: Scenario) => s.tool === "load" ? opts.rounds : 1;
  const total = scenarios.reduce((n, s) => n + rounds(s), 0) * servers.length;
  let step = 0;
  const results: Result[] = [];
  for (const s of scenarios) {
    const rs = servers.map((d): Result => ({
      scenario: s.name,
      server: d.name,
      runs: [],
      failures: [],
    }));
    results.push(...rs);
    // Servers alternate within a scenario, so drift hits them alike.
    for (let round = 0; round < rounds(s); round++) {
      for (const [i, def] of servers.entries()) {
        const label = `[${++step}/${total}] ${s.name}, ${def.name}`;
        try {
          const run = await measure(s, def, client);
          rs[i].runs.push(run);
          const d = run.data;
          const other = d.otherCpuPct !== undefined
            ? ` (CPU: client ${Math.round(d.cpuPct)}%, server ${
              Math.round(d.serverCpuPct)
            }%, other ${Math.round(d.otherCpuPct)}%)`
            : "";
          console.error(`${label}: ${valueCell(s, run)}${other}`);
        } catch (e) {
          const msg = e instanceof Error ? e.message : String(e);
          rs[i].failures.push(msg);
          console.error(`${label}: failed: ${msg}`);
        }
      }
    }
    const better = s.tool === "idle"
      ? (a: Run, b: Run) => a.value - b.value
      : (a: Run, b: Run) => b.value - a.value;
    for (const r of rs) r.best = r.runs.toSorted(better)[0];
  }
  report(servers, results, client);
  // A benchmark that lost or mangled frames is a failed run, whatever its speed.
  const bad = results.some((r) =>
    r.failures.length || r.runs.some((run) => run.data.errors || run.data.corrupt)
  );
  if (bad) Deno.exitCode = 1;
}

try {
  await main();
} catch (e) {
  console.error(e instanceof Error ? e.message : e);
  Deno.exitCode = 1;
} finally {
  killAll();
  removeTempDir();
}
