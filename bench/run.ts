// `deno task bench`: raw Deno vs etcp, same load client, same run.
//
//   deno run -A bench/run.ts [--duration 5] [--warmup 1] [--connections 50]
//     [--size 64] [--depth 16] [--bulk-size 65536] [--idle-connections 2000]
//     [--only SUBSTR[,SUBSTR]] [--servers raw,etcp[,etcp-sync,etcp-hibernate]]
//     [--etcp-cmd CMD|raw] [--json]
//
// Every scenario starts a fresh server process per server, waits for its
// `listening on HOST:PORT` line, drives it with bench/load.ts or bench/idle.ts
// (separate processes), then stops it. Prints a markdown table to stdout
// (progress goes to stderr) and, with --json, one JSON line after it.
// --etcp-cmd replaces `deno run -A examples/echo_server.ts` for the etcp
// servers (env ETCP_CMD too); `--etcp-cmd raw` runs raw_echo.ts in the etcp
// slots, a self-test of the harness whose ratios should all be about 1.
import { cpuSeconds, parseFlags, within } from "./_common.ts";

const USAGE = `usage: deno run -A bench/run.ts [options]
  --duration 5           seconds measured per load run (after --warmup 1)
  --connections 50       concurrent connections of the load client
  --size 64              frame payload bytes (ping-pong, pipelined, accept)
  --depth 16             frames in flight per connection when pipelined
  --bulk-size 65536      frame payload bytes of the bulk run
  --idle-connections 2000
  --only SUBSTR          run only scenarios whose name contains one of SUBSTR,…
  --servers raw,etcp     among raw, etcp, etcp-sync, etcp-hibernate
  --etcp-cmd CMD         command of the etcp server (or "raw": harness self-test)
  --json                 also print the results as one JSON line`;
const opts = parseFlags(Deno.args, {
  duration: 5,
  warmup: 1,
  connections: 50,
  size: 64,
  depth: 16,
  "bulk-size": 64 * 1024,
  "idle-connections": 2000,
  only: "",
  servers: "raw,etcp",
  "etcp-cmd": Deno.env.get("ETCP_CMD") ?? "",
  json: false,
}, USAGE);

const DENO = Deno.execPath();
const BENCH = new URL(".", import.meta.url).pathname;
const ROOT = new URL("..", import.meta.url).pathname;
const LOAD_GRACE_MS = 15_000; // load.ts bounds itself; this is the backstop
const IDLE_TIMEOUT_MS = 75_000; // idle.ts gives up after 60 s
const LISTEN_TIMEOUT_MS = 20_000; // a first run may compile the server

// ------------------------------------------------------------------ servers

/** Which server setup a scenario needs: load runs, plain idle, or idle with
 * the cheapest parking (etcp --hibernate vs raw parked on a 1-byte read). */
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
    : [DENO, "run", "-A", `${ROOT}examples/echo_server.ts`];
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

// Children still running; every exit path kills them.
const children = new Set<Deno.ChildProcess>();

function killAll() {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }
  children.clear();
}

interface Output {
  firstLine: Promise<string | null>;
  /** Resolves once the pipe is closed and read to the end. */
  done: Promise<void>;
  tail(): string;
}

/** Drains a child's pipe (a full pipe would block it), remembering the first
 * line and the last few KB for error messages. */
function collect(stream: ReadableStream<Uint8Array>): Output {
  let text = "";
  let lineFound = false;
  let resolveLine!: (line: string | null) => void;
  const firstLine = new Promise<string | null>((r) => resolveLine = r);
  const done = (async () => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      const nl = text.indexOf("\n");
      if (!lineFound && nl >= 0) {
        lineFound = true;
        resolveLine(text.slice(0, nl));
      }
      if (lineFound && text.length > 16_384) text = text.slice(-8192);
    }
  })().catch(() => {}).finally(() => resolveLine(null));
  return { firstLine, done, tail: () => text.slice(-8192) };
}

function spawn(cmd: string[]): {
  child: Deno.ChildProcess;
  stdout: Output;
  stderr: Output;
} {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  children.add(child);
  child.status.finally(() => children.delete(child));
  return { child, stdout: collect(child.stdout), stderr: collect(child.stderr) };
}

/** SIGTERM, then SIGKILL if it is still there after 3 s. */
async function stop(child: Deno.ChildProcess) {
  const kill = (sig: Deno.Signal) => {
    try {
      child.kill(sig);
    } catch { /* already exited */ }
  };
  kill("SIGTERM");
  if (await within(child.status, 3000, "late") === "late") {
    kill("SIGKILL");
    await child.status;
  }
}

interface Running {
  pid: number;
  host: string;
  port: number;
  stop(): Promise<void>;
}

async function startServer(def: ServerDef, variant: Variant): Promise<Running> {
  const p = spawn([
    ...def.cmd,
    ...def.flags[variant],
    ...["--port", "0", "--hostname", "127.0.0.1"],
  ]);
  const line = await within(p.stdout.firstLine, LISTEN_TIMEOUT_MS, null);
  const m = line?.match(/^listening on (.+):(\d+)\s*$/);
  if (!m) {
    await stop(p.child);
    throw new Error(
      `${def.name} did not print "listening on HOST:PORT" (got ${
        JSON.stringify(line)
      })\n${p.stderr.tail()}`,
    );
  }
  return {
    pid: p.child.pid,
    host: m[1].replace(/^\[(.*)\]$/, "$1"),
    port: Number(m[2]),
    stop: () => stop(p.child),
  };
}

/** Runs a bench child to completion and parses its last stdout line. */
async function runJson(
  cmd: string[],
  timeoutMs: number,
): Promise<Record<string, number>> {
  const p = spawn(cmd);
  const timer = setTimeout(() => {
    console.error(`killing ${cmd.slice(3).join(" ")}: over ${timeoutMs} ms`);
    try {
      p.child.kill("SIGKILL");
    } catch { /* just exited */ }
  }, timeoutMs);
  const status = await p.child.status;
  clearTimeout(timer);
  await p.stdout.done;
  const lines = p.stdout.tail().trim().split("\n");
  if (!status.success) {
    throw new Error(
      `${cmd.slice(3).join(" ")} failed (${status.code})\n` +
        p.stderr.tail(),
    );
  }
  return JSON.parse(lines[lines.length - 1]);
}

// ---------------------------------------------------------------- scenarios

interface Scenario {
  name: string;
  variant: Variant;
  tool: "load.ts" | "idle.ts";
  args: string[];
}

const bytes = (n: number) => n >= 1024 && n % 1024 === 0 ? `${n / 1024} KiB` : `${n} B`;
const load = (size: number, depth: number, mode = "echo") => [
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
    tool: "load.ts",
    args: load(opts.size, 1),
  },
  {
    name: `pipelined ${bytes(opts.size)}, depth ${opts.depth}`,
    variant: "load",
    tool: "load.ts",
    args: load(opts.size, opts.depth),
  },
  {
    name: `bulk ${bytes(opts["bulk-size"])}, depth 1`,
    variant: "load",
    tool: "load.ts",
    args: load(opts["bulk-size"], 1),
  },
  {
    name: `accept rate (connect, ${bytes(opts.size)}, close)`,
    variant: "load",
    tool: "load.ts",
    args: load(opts.size, 1, "accept"),
  },
  {
    name: "idle memory per conn (raw --park 65536)",
    variant: "idle",
    tool: "idle.ts",
    args: idle,
  },
  {
    name: "idle memory hibernated (raw --park 1)",
    variant: "hibernated",
    tool: "idle.ts",
    args: idle,
  },
];

interface Result {
  scenario: string;
  server: string;
  /** frames (or connections) per second, or idle bytes per connection */
  value?: number;
  data?: Record<string, number>;
  serverCpuPct?: number;
  error?: string;
}

async function measure(s: Scenario, def: ServerDef): Promise<Result> {
  const server = await startServer(def, s.variant);
  try {
    const where = ["--host", server.host, "--port", `${server.port}`];
    if (s.tool === "idle.ts") {
      const data = await runJson(
        [DENO, "run", "-A", `${BENCH}idle.ts`, ...where, "--pid", `${server.pid}`, ...s.args],
        IDLE_TIMEOUT_MS,
      );
      return { scenario: s.name, server: def.name, value: data.perConnBytes, data };
    }
    const cpu0 = cpuSeconds(server.pid), t0 = performance.now();
    const data = await runJson(
      [DENO, "run", "-A", `${BENCH}load.ts`, ...where, ...s.args],
      (opts.warmup + opts.duration) * 1000 + LOAD_GRACE_MS,
    );
    // Over the load client's whole life (startup included): a lower bound.
    const serverCpuPct = (cpuSeconds(server.pid) - cpu0) /
      ((performance.now() - t0) / 1000) * 100;
    return {
      scenario: s.name,
      server: def.name,
      value: data.framesPerSec,
      data,
      serverCpuPct: Math.round(serverCpuPct),
    };
  } finally {
    await server.stop();
  }
}

// ------------------------------------------------------------------- report

const si = (n: number) =>
  n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : n.toFixed(0);

function valueCell(s: Scenario, r: Result | undefined): string {
  if (!r) return "–";
  if (r.error !== undefined) return "failed";
  const d = r.data!;
  const v = s.tool === "idle.ts"
    ? `${(r.value! / 1024).toFixed(1)} KiB/conn`
    : `${si(r.value!)} ${s.args.includes("accept") ? "conn" : "frames"}/s`;
  const bad = (d.errors ?? 0) + (d.corrupt ?? 0) > 0
    ? ` ⚠ ${d.errors} errors, ${d.corrupt} corrupt`
    : d.accepted !== undefined && d.accepted < d.connections
    ? ` ⚠ ${d.accepted} accepted`
    : "";
  return v + bad;
}

function table(servers: ServerDef[], results: Result[]): string {
  const others = servers.filter((s) => s.name !== "raw");
  const hasRaw = servers.length > others.length;
  const find = (scenario: string, server: string) =>
    results.find((r) => r.scenario === scenario && r.server === server);
  const header = [
    "scenario",
    ...servers.map((s) => s.name),
    ...(hasRaw ? others.map((s) => `${s.name}/raw`) : []),
    ...servers.map((s) => `p50/p99 µs ${s.name}`),
    ...servers.map((s) => `MB/s ${s.name}`),
    ...servers.map((s) => `CPU load/server ${s.name}`),
  ];
  const rows = SCENARIOS.filter((s) => results.some((r) => r.scenario === s.name))
    .map((s) => {
      const rs = servers.map((d) => find(s.name, d.name));
      const ok = (r?: Result) => r && r.error === undefined ? r : undefined;
      const raw = ok(find(s.name, "raw"));
      return [
        s.name,
        ...rs.map((r) => valueCell(s, r)),
        ...(hasRaw
          ? others.map((d) => {
            const r = ok(find(s.name, d.name));
            return raw && r && raw.value ? `${(r.value! / raw.value).toFixed(2)}×` : "–";
          })
          : []),
        ...rs.map((r) =>
          ok(r) && r!.data!.p50us != null ? `${r!.data!.p50us} / ${r!.data!.p99us}` : "–"
        ),
        ...rs.map((r) => ok(r) && r!.data!.mbPerSec != null ? `${r!.data!.mbPerSec}` : "–"),
        ...rs.map((r) =>
          ok(r) && r!.serverCpuPct !== undefined
            ? `${r!.data!.cpuSeconds.toFixed(1)} s ${r!.data!.cpuPct}% / ${r!.serverCpuPct}%`
            : "–"
        ),
      ];
    });
  return [header, header.map(() => "---"), ...rows]
    .map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

function machine() {
  const cpu = Deno.readTextFileSync("/proc/cpuinfo").match(/^model name\s*:\s*(.*)$/m)?.[1];
  return {
    cpu: cpu ?? "unknown cpu",
    cores: navigator.hardwareConcurrency,
    os: `${Deno.build.os} ${Deno.osRelease()}`,
    deno: Deno.version.deno,
  };
}

// --------------------------------------------------------------------- main

async function main() {
  const servers = opts.servers.split(",").map((name) => {
    const def = SERVERS[name.trim()];
    if (!def) throw new Error(`unknown server ${name}; known: ${Object.keys(SERVERS)}`);
    return def;
  });
  const wanted = opts.only.toLowerCase().split(",").filter((x) => x);
  const scenarios = SCENARIOS.filter((s) =>
    !wanted.length || wanted.some((w) => s.name.toLowerCase().includes(w))
  );
  if (!scenarios.length) throw new Error(`--only ${opts.only} matches no scenario`);
  const needsExample = servers.some((s) =>
    s.cmd.some((a) => a.endsWith("examples/echo_server.ts"))
  );
  if (needsExample) {
    try {
      Deno.statSync(`${ROOT}examples/echo_server.ts`);
    } catch {
      throw new Error("examples/echo_server.ts not found (use --etcp-cmd raw to self-test)");
    }
  }

  const results: Result[] = [];
  const total = scenarios.length * servers.length;
  for (const s of scenarios) {
    // Servers alternate within a scenario, so drift hits them alike.
    for (const def of servers) {
      console.error(`[${results.length + 1}/${total}] ${s.name} — ${def.name}`);
      try {
        const r = await measure(s, def);
        results.push(r);
        console.error(`    ${valueCell(s, r)}`);
      } catch (e) {
        const error = e instanceof Error ? e.message : String(e);
        results.push({ scenario: s.name, server: def.name, error });
        console.error(`    failed: ${error}`);
      }
    }
  }

  const m = machine();
  console.log(`## etcp bench, ${new Date().toISOString()}\n`);
  console.log(`${m.cpu}, ${m.cores} cores, ${m.os}, Deno ${m.deno}`);
  console.log(
    `load: ${opts.connections} connections, warmup ${opts.warmup} s + ${opts.duration} s per run; ` +
      `idle: ${opts["idle-connections"]} connections, one frame each, RSS growth of the server\n`,
  );
  console.log(table(servers, results));
  console.log(
    "\nRatios are other/raw: higher is better for rates, lower for memory. " +
      "MB/s counts echoed frame bytes one way. CPU: load client's CPU seconds " +
      "and % of one core over the measured window / server's % of one core.",
  );
  if (opts.json) console.log(JSON.stringify({ machine: m, options: opts, results }));
}

for (const sig of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(sig, () => {
    killAll();
    Deno.exit(130);
  });
}
globalThis.addEventListener("unload", killAll);
try {
  await main();
} catch (e) {
  console.error(e instanceof Error ? e.message : e);
  Deno.exitCode = 1;
} finally {
  killAll();
}
