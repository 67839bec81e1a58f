// Load rows measured steadily: each server is started once per process round, then many short
// load windows of the C load client (bench/load.c) run against the servers in turn, the order
// flipping every round of windows (A B C, then C B A, ...), and the table shows per-server
// medians and their ratios to the first server's.
//
//   deno run -A bench/interleaved.ts [--servers raw,etcp] [--processes 2] [--windows 6]
//     [--duration 1] [--warmup 0.3] [--connections 50] [--size 64] [--depth 1]
//
// Why: on a shared 2-core VM loopback throughput swings by ±15% between 1-second windows, and
// bench/run.ts's best of 3 rounds (a fresh server per run) picks one lucky window per server.
// Here every server sees many windows spread over the same stretch of time, so slow spells fall
// on all of them alike; the median of the windows and the ratio of the medians move much less
// from one run to the next. Each server is started --processes times (one after the other,
// all of them alive during a process round) so that the variance between processes counts too.
// Needs cc (the C load client); node is skipped, with a line on stderr, if it does not run.
import { parseFlags } from "./_common.ts";
import { type Listening, runJson, spawnListening } from "./_children.ts";
import { compileLoadClient, runLoadBenchmark } from "./_load_client.ts";

const USAGE = `usage: deno run -A bench/interleaved.ts [options]
  --servers raw,etcp     among raw, node, etcp, etcp-sync, etcp-batch; the first is the baseline;
                         NAME#2 runs NAME again as another server (raw,raw#2: the noise floor)
  --processes 2          times each server is started (a process round each)
  --windows 6            load windows per server per process
  --duration 1           seconds measured per window, after --warmup 0.3
  --connections 50       concurrent connections of the load client
  --size 64              frame payload bytes
  --depth 1              frames in flight per connection (1: ping-pong, 16: pipelined)`;
const opts = parseFlags(Deno.args, {
  servers: "raw,etcp",
  processes: 2,
  windows: 6,
  duration: 1,
  warmup: 0.3,
  connections: 50,
  size: 64,
  depth: 1,
}, USAGE);
for (const name of ["processes", "windows", "connections", "size", "depth"] as const) {
  if (!Number.isInteger(opts[name]) || opts[name] < 1) {
    console.error(`--${name} wants a positive integer, got ${opts[name]}\n\n${USAGE}`);
    Deno.exit(2);
  }
}

const DENO = Deno.execPath();
const ROOT = new URL("..", import.meta.url).pathname;
const ECHO = [DENO, "run", "-A", `${ROOT}examples/echo_server.ts`, "--framing", "len4"];
const SERVERS: Record<string, string[]> = {
  raw: [DENO, "run", "-A", `${ROOT}bench/raw_echo.ts`],
  node: ["node", `${ROOT}bench/node_echo.mjs`],
  etcp: ECHO,
  "etcp-sync": [...ECHO, "--sync"],
  "etcp-batch": [...ECHO, "--batch"],
};
const LISTEN_TIMEOUT_MS = 20_000; // a first run may compile the server
const WINDOW_TIMEOUT_MS = (opts.warmup + opts.duration) * 1000 + 10_000; // load.c: + 5 s at most

/** bench/load.c built with `cc -O2`, or an error saying why not. */
async function buildLoadClient(): Promise<string> {
  const built = await compileLoadClient(false);
  if ("why" in built) throw new Error(`cannot build bench/load.c: ${built.why}`);
  return built.bin;
}

async function nodeRuns(): Promise<boolean> {
  try {
    return (await new Deno.Command("node", { args: ["--version"], stdout: "null", stderr: "null" })
      .output()).success;
  } catch {
    return false;
  }
}

interface Server extends Listening {
  name: string;
}

/** Starts server `name` on port 0 (see spawnListening). */
async function startServer(name: string): Promise<Server> {
  const cmd = [...SERVERS[name.split("#")[0]], "--port", "0", "--hostname", "127.0.0.1"];
  return { name, ...await spawnListening(cmd, name, LISTEN_TIMEOUT_MS, ROOT) };
}

const median = (xs: number[]) => {
  const s = xs.toSorted((a, b) => a - b), h = s.length >> 1;
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
};
const quote = (arg: string) =>
  /^[\w.,=:/+-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
const si = (n: number) =>
  n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : n.toFixed(0);

async function main(): Promise<boolean> {
  let names = opts.servers.split(",").map((s) => s.trim()).filter((s) => s);
  for (const name of names) {
    if (!SERVERS[name.split("#")[0]]) {
      console.error(`unknown server ${name} (known: ${Object.keys(SERVERS)})\n\n${USAGE}`);
      Deno.exit(2);
    }
  }
  const isNode = (n: string) => n.split("#")[0] === "node";
  if (names.some(isNode) && !await nodeRuns()) {
    console.error(`"node --version" failed: node skipped`);
    names = names.filter((n) => !isNode(n));
  }
  if (!names.length) throw new Error("no server to measure");
  const load = await buildLoadClient();

  const windows = new Map(names.map((n) => [n, [] as Record<string, number>[]]));
  let failures = 0, step = 0, round = 0;
  const total = opts.processes * opts.windows * names.length;
  for (let p = 1; p <= opts.processes; p++) {
    const servers: Server[] = [];
    try {
      for (const name of names) servers.push(await startServer(name));
      // Window 0 of each process warms its servers up (a fresh process's first second is ~30%
      // slower while its code is compiled) and is not counted.
      for (let w = 0; w <= opts.windows; w++) {
        // A B C, then C B A: drift over a round of windows falls on all servers alike.
        for (const s of round++ % 2 ? servers.toReversed() : servers) {
          const label = w === 0
            ? `[warm-up] process ${p}, ${s.name}`
            : `[${++step}/${total}] process ${p}, window ${w}, ${s.name}`;
          try {
            const d = await runJson([
              load,
              ...["--port", `${s.port}`, "--server-pid", `${s.pid}`],
              ...["--connections", `${opts.connections}`, "--size", `${opts.size}`],
              ...["--depth", `${opts.depth}`],
              ...["--duration", `${opts.duration}`, "--warmup", `${opts.warmup}`],
            ], WINDOW_TIMEOUT_MS);
            if (d.errors || d.corrupt) throw new Error(`${d.errors} errors, ${d.corrupt} corrupt`);
            if (w > 0) windows.get(s.name)!.push(d);
            console.error(
              `${label}: ${si(d.framesPerSec)} frames/s, ${
                d.serverUsPerFrame?.toFixed(2) ?? "–"
              } server µs/frame (other CPU ${Math.round(d.otherCpuPct)}%)`,
            );
          } catch (e) {
            failures++;
            console.error(`${label}: failed: ${e instanceof Error ? e.message : e}`);
          }
        }
      }
    } finally {
      await Promise.all(servers.map((s) => s.stop()));
    }
  }

  const rates = (n: string) => windows.get(n)!.map((d) => d.framesPerSec);
  const base = rates(names[0]);
  const rows = names.map((n) => {
    const r = rates(n);
    if (!r.length) return [n, "0", "–", "–", "–", "–", "–"];
    const us = windows.get(n)!.map((d) => d.serverUsPerFrame).filter((x) => x != null);
    const ratio = (f: (xs: number[]) => number) =>
      base.length ? `${(f(r) / f(base)).toFixed(3)}×` : "–";
    return [
      n,
      `${r.length}`,
      si(median(r)),
      `${si(Math.min(...r))}–${si(Math.max(...r))}`,
      us.length ? median(us).toFixed(2) : "–",
      ratio(median),
      ratio((xs) => Math.max(...xs)),
    ];
  });
  const header = [
    "server",
    "windows",
    "median frames/s",
    "min–max",
    "median server µs/frame",
    `median ratio to ${names[0]}`,
    `best ratio to ${names[0]}`,
  ];
  console.log(
    [header, header.map(() => "---"), ...rows].map((c) => `| ${c.join(" | ")} |`)
      .join("\n"),
  );
  console.log(`
${opts.processes} process(es) × ${opts.windows} window(s) per server of ${opts.warmup} s warmup + ${opts.duration} s, C load client, ${opts.connections} connections, ${opts.size} B, depth ${opts.depth}${
    failures ? `; ${failures} window(s) failed` : ""
  }
command: deno run -A bench/interleaved.ts ${Deno.args.map(quote).join(" ")}`.trimEnd());
  return failures === 0;
}

await runLoadBenchmark(main);
