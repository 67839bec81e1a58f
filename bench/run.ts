// `deno task bench`: raw Deno vs etcp, same load client, same run; over
// plain TCP, and over TLS (raw = a hand-written Deno.listenTls echo, etcp =
// examples/tls_echo_server.ts: the plain row's handler served over `tls()`).
//
//   deno run -A bench/run.ts [--duration 2] [--warmup 0.5] [--rounds 3]
//     [--connections 50] [--size 64] [--depth 16] [--bulk-size 65536]
//     [--idle-connections 2000] [--only SUBSTR[,SUBSTR]]
//     [--servers raw,etcp,raw-tls,etcp-tls[,etcp-sync,etcp-hibernate]]
//     [--etcp-cmd CMD|raw] [--etcp-tls-cmd CMD] [--client c|deno] [--json]
//
// Each run starts a fresh server process, waits for its `listening on
// HOST:PORT` line, drives it with the load client or bench/idle.ts (separate
// processes) and stops it. The load client is bench/load.c, compiled once per
// run with `cc -O2` into a temporary directory: it costs a fraction of the
// CPU of bench/load.ts, which saturates a core before a fast server does.
// Without a working `cc`, bench/load.ts runs instead (same flags, same JSON).
// The TLS rows (servers raw-tls and etcp-tls; scenarios "TLS ping-pong" and
// "TLS bulk") use a second build of load.c with OpenSSL (cc -DETCP_TLS …
// -lssl -lcrypto), or load.ts --tls if that build fails; both TLS servers are
// driven by that one client in the same run, and their ratios are etcp-tls
// against raw-tls.
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
  --servers raw,etcp,raw-tls,etcp-tls
                         among raw, etcp, etcp-sync, etcp-hibernate (plain TCP:
                         ratios against raw) and raw-tls, etcp-tls (TLS: ratios
                         against raw-tls)
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
  servers: "raw,etcp,raw-tls,etcp-tls",
  "etcp-cmd": Deno.env.get("ETCP_CMD") ?? "",
  "etcp-tls-cmd": Deno.env.get("ETCP_TLS_CMD") ?? "",
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
const TLS_EXAMPLE = `${ROOT}examples/tls_echo_server.ts`;
/** The CA of the fixture certificate both TLS servers present. */
const CA = `${ROOT}tests/fixtures/ca.crt`;
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

/** Compiles bench/load.c (once per run): plain, or with `-DETCP_TLS` and
 * OpenSSL for the TLS rows. Falls back to load.ts unless `--client c` insists;
 * the TLS build always falls back (to load.ts --tls), so that a machine
 * without OpenSSL headers still runs every row. */
async function loadClient(kind: "plain" | "tls"): Promise<LoadClient> {
  if (opts.client === "deno") return DENO_CLIENT;
  const tls = kind === "tls";
  let why: string;
  try {
    tempDir ??= await Deno.makeTempDir({ prefix: "etcp-bench-" });
    const bin = `${tempDir}/etcp-load${tls ? "-tls" : ""}`;
    const args = tls
      ? ["-O2", "-DETCP_TLS", "-o", bin, `${BENCH}load.c`, "-lssl", "-lcrypto"]
      : ["-O2", "-o", bin, `${BENCH}load.c`];
    const out = await new Deno.Command("cc", {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (out.success) return { name: tls ? "C+OpenSSL" : "C", cmd: [bin] };
    why = `cc ${tls ? "with OpenSSL " : ""}failed (exit code ${out.code}):\n${
      new TextDecoder().decode(out.stderr).trim()
    }`;
  } catch (e) {
    why = e instanceof Deno.errors.NotFound ? "no cc found" : `cc: ${e}`;
  }
  if (opts.client === "c" && !tls) throw new Error(`--client c: ${why}`);
  console.error(
    `${why}\nfalling back to the Deno load client (bench/load.ts) for the ${kind} rows`,
  );
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
  /** Speaks TLS (the fixture certificate): runs the TLS scenarios only. */
  tls?: boolean;
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

// TLS servers serve load runs only (no idle scenario runs over TLS).
const RAW_TLS: ServerDef = {
  name: "raw-tls",
  cmd: [DENO, "run", "-A", `${BENCH}raw_tls_echo.ts`],
  flags: { load: [], idle: [], hibernated: [] },
  tls: true,
};

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
  etcp: etcp("etcp", []),
  "etcp-sync": etcp("etcp-sync", ["--sync"]),
  "etcp-hibernate": etcp("etcp-hibernate", ["--hibernate"]),
  "raw-tls": RAW_TLS,
  "etcp-tls": etcpTls("etcp-tls"),
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
  /** Runs against the TLS servers (with the TLS load client) instead of the plain ones. */
  tls?: boolean;
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
  {
    name: `TLS ping-pong ${bytes(opts.size)}, depth 1`,
    variant: "load",
    tool: "load",
    args: [...load("echo", opts.size, 1), "--tls", "--ca", CA],
    unit: "frames/s",
    tls: true,
  },
  {
    name: `TLS bulk ${bytes(opts["bulk-size"])}, depth 1`,
    variant: "load",
    tool: "load",
    args: [...load("echo", opts["bulk-size"], 1), "--tls", "--ca", CA],
    unit: "frames/s",
    tls: true,
  },
];

/** The servers a scenario runs against: the TLS ones for TLS scenarios. */
const serversFor = (s: Scenario, servers: ServerDef[]) =>
  servers.filter((d) => !!d.tls === !!s.tls);

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

/** One table of the report: plain TCP or TLS, with its baseline and load client. */
interface Group {
  title: string;
  servers: ServerDef[];
  baseline: ServerDef;
  scenarios: Scenario[];
  client: LoadClient;
}

function table(group: Group, results: Result[]): string {
  const { servers, baseline, client } = group;
  const DETAILS = details(client);
  const ratios = servers.includes(baseline) ? servers.filter((d) => d !== baseline) : [];
  const header = [
    "scenario",
    ...servers.map((d) => d.name),
    ...ratios.map((d) => `${d.name}/${baseline.name}`),
    ...DETAILS.flatMap(([title]) => servers.map((d) => `${title} ${d.name}`)),
  ];
  const rows = group.scenarios.flatMap((s) => {
    const of = (d: ServerDef) => results.find((r) => r.scenario === s.name && r.server === d.name);
    if (!servers.some(of)) return [];
    const raw = of(baseline)?.best;
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

/** The load client's CPU (% of one core) over a group's load runs, for its header. */
function clientCpu(group: Group, results: Result[]): string {
  const { client } = group;
  const load = (r: Result) =>
    group.scenarios.find((s) => s.name === r.scenario)?.tool === "load" &&
    group.servers.some((d) => d.name === r.server);
  const pcts = results.filter(load).flatMap((r) => r.runs.map((run) => run.data.cpuPct))
    .filter((x) => typeof x === "number").toSorted((a, b) => a - b);
  const what = client.name === "C"
    ? "C (bench/load.c, cc -O2, one thread, epoll)"
    : client.name === "C+OpenSSL"
    ? "C+OpenSSL (bench/load.c, cc -O2 -DETCP_TLS -lssl -lcrypto, one thread, epoll)"
    : `Deno (bench/load.ts${group.baseline.tls ? " --tls" : ""})`;
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

function tlsNote(client: LoadClient): string {
  const ack = client.name === "C+OpenSSL"
    ? `The C client ACKs a partly received echo at once (TCP_QUICKACK), lest
Linux's delayed ACK stall the tail of a bulk echo by up to 40 ms.`
    : `The Deno client cannot ACK early (no TCP_QUICKACK): the TLS bulk row
mostly measures Linux's 40 ms delayed ACK, not the servers (build bench/load.c
with OpenSSL for that row).`;
  return `TLS: TLS 1.3 with the fixture certificate (tests/fixtures/server.crt, ECDSA
P-256), handshakes done before the warmup. Deno's TLS connections cannot turn
Nagle off: a server holds the tail of a bulk echo until its head is ACKed.
${ack}`;
}

function report(groups: Group[], results: Result[]) {
  const m = machine();
  const tlsGroup = groups.find((g) => g.baseline.tls);
  const tables = groups.map((g) =>
    `${g.title ? `${g.title}\n` : ""}${clientCpu(g, results)}\n\n${table(g, results)}`
  );
  console.log(`## etcp bench, ${new Date().toISOString()}

${m.cpu}, ${m.cores} cores, ${m.os}, Deno ${m.deno}
load: ${opts.connections} connections, best of ${opts.rounds} runs of ${opts.warmup} s warmup + ${opts.duration} s; idle: ${
    opts["idle-connections"]
  } connections, one echoed frame each, server RSS growth${
    opts["etcp-cmd"] ? `; etcp = ${opts["etcp-cmd"]}` : ""
  }${opts["etcp-tls-cmd"] ? `; etcp-tls = ${opts["etcp-tls-cmd"]}` : ""}

${tables.join("\n\n")}

Ratios: other/raw, other/raw-tls over TLS (rates: higher is better; memory: lower is better).
MB/s: echoed frame bytes, one way. Server µs/frame: the server's CPU per echoed
frame (per connection in the accept row); it tells servers apart even when the
load client is the limit (its CPU near 100%). CPU: the load client's CPU
seconds over its life, then the % of one core used in the measured window by
the load client, the server (over 100: its helper threads) and all other
processes. On loopback most of the C client's CPU is kernel TCP work that any
peer pays per write and read, little is its own code. † marks a best run during
which other processes used over ${NOISY_PCT}% of a core: rerun on a quieter machine.${
    tlsGroup ? `\n${tlsNote(tlsGroup.client)}` : ""
  }`);
  if (opts.json) {
    const loadClient = Object.fromEntries(groups.map((g) => [g.baseline.name, g.client.name]));
    console.log(JSON.stringify({ machine: m, options: opts, loadClient, results }));
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
    (!wanted.length || wanted.some((w) => s.name.toLowerCase().includes(w))) &&
    serversFor(s, servers).length
  );
  if (!scenarios.length) {
    throw new Error(`--only ${opts.only} --servers ${opts.servers}: no scenario`);
  }
  for (const script of [EXAMPLE, TLS_EXAMPLE]) {
    if (!servers.some((d) => d.cmd.includes(script))) continue;
    try {
      Deno.statSync(script);
    } catch {
      throw new Error(`${script} not found (--etcp-cmd raw to self-test)`);
    }
  }

  const groups: Group[] = [];
  for (const tls of [false, true]) {
    const inGroup = scenarios.filter((s) => !!s.tls === tls);
    if (!inGroup.length) continue;
    const client = inGroup.some((s) => s.tool === "load")
      ? await loadClient(tls ? "tls" : "plain")
      : DENO_CLIENT;
    console.error(`load client${tls ? " (TLS)" : ""}: ${client.name} (${client.cmd.join(" ")})`);
    groups.push({
      title: tls
        ? "TLS: raw-tls = bench/raw_tls_echo.ts (Deno.listenTls, writes whole reads back), " +
          "etcp-tls = examples/tls_echo_server.ts (tls()); ratios against raw-tls"
        : "",
      servers: servers.filter((d) => !!d.tls === tls),
      baseline: tls ? RAW_TLS : RAW,
      scenarios: inGroup,
      client,
    });
  }
  const groupOf = (s: Scenario) => groups.find((g) => g.scenarios.includes(s))!;
  const rounds = (s: Scenario) => s.tool === "load" ? opts.rounds : 1;
  const total = scenarios.reduce((n, s) => n + rounds(s) * serversFor(s, servers).length, 0);
  let step = 0;
  const results: Result[] = [];
  for (const s of scenarios) {
    const { servers, client } = groupOf(s);
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
  report(groups, results);
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
