// Idle memory: how much a server's RSS grows per idle connection.
//
//   deno run -A bench/idle.ts --pid PID --port P [--host 127.0.0.1]
//     [--connections 10000] [--from 2000] [--steps 4] [--send-one] [--size 64]
//     [--settle 500]
//
// Opens `connections` connections to the server (whose pid we read from
// /proc: the client's own memory is not counted), optionally exchanging one
// length-prefixed frame on each (--send-one: the server has been active once
// before going idle). With --from F (0 < F < connections) it first opens F
// connections and waits for the server's RSS to settle, then opens the rest in
// --steps equal steps, the RSS settling after each: the slope of RSS over
// connections from F on (a least-squares line through those points) is the
// marginal memory of one idle connection, without the runtime's fixed growth
// (code, heap pages, buffers the first connections bring) that RSS growth from
// zero includes. Waits each time until the server has accepted them all (the
// echo, or else its fd count). Prints one JSON line: {"connections",
// "accepted","rssBeforeKB","rssAfterKB","perConnBytes"} (growth from zero over
// all connections) and with --from also "from","rssAtFromKB","slopeBytes"
// (bytes per connection) and "fitErrorKB" (the largest distance of a point
// from the line: large means GC or other noise moved the RSS).
import { fdCount, parseFlags, rssKB, sleep } from "./_common.ts";
import { echoOne, makePattern, MIN_SIZE } from "./_frames.ts";

const USAGE = `usage: deno run -A bench/idle.ts --pid PID --port P [--host 127.0.0.1]
  [--connections 10000] [--from 2000] [--steps 4] [--send-one] [--size 64] [--settle 500]`;
const opts = parseFlags(Deno.args, {
  host: "127.0.0.1",
  port: 0,
  pid: 0,
  connections: 2000,
  from: 0, // 0: growth from zero only, no slope
  steps: 4,
  "send-one": false,
  size: 64,
  settle: 500, // ms the RSS must hold still to count as settled
}, USAGE);
if (!opts.port || !opts.pid) fail("--pid and --port are required");
if (opts.size < MIN_SIZE) fail(`--size must be at least ${MIN_SIZE}`);
if (opts.connections < 1 || opts.connections > 50_000) {
  fail("--connections must be 1..50000");
}
if (opts.from < 0 || (opts.from && opts.from >= opts.connections)) {
  fail("--from must be 0 (no slope) or below --connections");
}
if (!(opts.steps >= 1 && opts.steps <= 100)) fail("--steps must be 1..100");
// Each connection is a descriptor here and one in the server: say so now,
// rather than fail with EMFILE half way (bench/run.ts raises the soft limit).
for (const [who, pid] of [["idle.ts", Deno.pid], ["the server", opts.pid]] as const) {
  const limit = openFilesLimit(pid);
  if (limit !== undefined && limit < opts.connections + 64) {
    fail(
      `${who} (pid ${pid}) may open ${limit} files, fewer than --connections ${opts.connections}` +
        ` + 64: raise "ulimit -n" (bench/run.ts does, up to the hard limit)`,
    );
  }
}

const CONNECT_CONCURRENCY = 128; // stay well inside the listen backlog
// Few exchanges at a time: a server that borrows a read buffer per wake-up
// then needs only a few, instead of leaving hundreds as garbage in its RSS.
const EXCHANGE_CONCURRENCY = 8;
// Per step of connections: a slow server on a busy machine gets that long.
const ACCEPT_TIMEOUT_MS = 15_000;
const SETTLE_TIMEOUT_MS = 5_000;
const HARD_TIMEOUT_MS = opts.from ? 150_000 : 60_000;

const conns: Deno.Conn[] = [];
const pattern = makePattern(opts.size);

// Whatever happens (a server that stops accepting), we are gone in time.
const deadline = setTimeout(() => {
  console.error("idle: did not finish in time");
  Deno.exit(3);
}, HARD_TIMEOUT_MS);

const rssBeforeKB = await settledRss();
// [connections held, settled RSS in KiB] at each step from --from on.
const points: [number, number][] = [];
let accepted = 0;
for (const target of targets()) {
  accepted += await openUpTo(target);
  if (opts.from) points.push([conns.length, await settledRss()]);
}
if (points.length) {
  console.error(`idle: RSS KiB at ${points.map(([n, kb]) => `${n}: ${kb}`).join(", ")}`);
}
const rssAfterKB = points.at(-1)?.[1] ?? await settledRss();
console.log(JSON.stringify({
  connections: opts.connections,
  accepted,
  sendOne: opts["send-one"],
  rssBeforeKB,
  rssAfterKB,
  perConnBytes: Math.round((rssAfterKB - rssBeforeKB) * 1024 / Math.max(accepted, 1)),
  ...(opts.from ? slope(points) : {}),
}));
for (const conn of conns) conn.close();
clearTimeout(deadline);

/** The connection counts to measure at: --from, then --steps equal steps to --connections. */
function targets(): number[] {
  if (!opts.from) return [opts.connections];
  const span = opts.connections - opts.from;
  return [
    opts.from,
    ...Array.from(
      { length: opts.steps },
      (_, i) => opts.from + Math.round(span * (i + 1) / opts.steps),
    ),
  ];
}

/** Opens (and with --send-one exchanges a frame on) connections up to `target`
 * in all; returns how many of the new ones the server was seen to accept. */
async function openUpTo(target: number): Promise<number> {
  const first = conns.length;
  const fdBefore = fdCount(opts.pid);
  await forEach(target - first, CONNECT_CONCURRENCY, async () => {
    conns.push(await Deno.connect({ hostname: opts.host, port: opts.port }));
  });
  if (opts["send-one"]) {
    await forEach(
      target - first,
      EXCHANGE_CONCURRENCY,
      (i) => echoOne(conns[first + i], first + i, opts.size, pattern),
    );
    return target - first; // an echo proves its connection was accepted
  }
  return await waitAccepted(fdBefore, target - first); // silent ones need the fd count
}

/** The least-squares slope of RSS over connections, in bytes per connection. */
function slope(points: [number, number][]) {
  const n = points.length;
  const mx = points.reduce((a, [x]) => a + x, 0) / n;
  const my = points.reduce((a, [, y]) => a + y, 0) / n;
  const sxx = points.reduce((a, [x]) => a + (x - mx) ** 2, 0);
  const sxy = points.reduce((a, [x, y]) => a + (x - mx) * (y - my), 0);
  const kbPerConn = sxy / sxx;
  return {
    from: opts.from,
    rssAtFromKB: points[0][1],
    slopeBytes: Math.round(kbPerConn * 1024),
    fitErrorKB: Math.round(
      Math.max(...points.map(([x, y]) => Math.abs(y - (my + kbPerConn * (x - mx))))),
    ),
  };
}

/** The soft limit on open files of process `pid`, if /proc tells. */
function openFilesLimit(pid: number): number | undefined {
  try {
    const limits = Deno.readTextFileSync(`/proc/${pid}/limits`);
    const soft = limits.match(/^Max open files\s+(\S+)/m)?.[1];
    return soft === undefined || soft === "unlimited" ? undefined : Number(soft);
  } catch {
    return undefined;
  }
}

/** Runs `job(0 .. count-1)`, at most `concurrency` at a time. */
async function forEach(
  count: number,
  concurrency: number,
  job: (i: number) => Promise<void>,
) {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) await job(next++);
    }),
  );
}

// Connects complete in the kernel before the server accepts them; the
// server's fd count tells when it really holds every connection.
async function waitAccepted(fdBefore: number, count: number): Promise<number> {
  if (fdBefore < 0) return count; // /proc/PID/fd unreadable: trust
  const until = Date.now() + ACCEPT_TIMEOUT_MS;
  let n = 0;
  while ((n = fdCount(opts.pid) - fdBefore) < count) {
    if (Date.now() > until) {
      console.error(`idle: only ${n} of ${count} accepted`);
      return Math.max(n, 0);
    }
    await sleep(20);
  }
  return count;
}

// RSS once it held within 1% (or 64 KiB) for `settle` ms, or at the timeout.
async function settledRss(): Promise<number> {
  const step = 50;
  const window: number[] = [];
  const until = Date.now() + SETTLE_TIMEOUT_MS;
  for (;;) {
    window.push(rssKB(opts.pid));
    if (window.length > opts.settle / step) window.shift();
    const lo = Math.min(...window), hi = Math.max(...window);
    const full = window.length >= opts.settle / step;
    if ((full && hi - lo <= Math.max(64, lo / 100)) || Date.now() > until) {
      return window[window.length - 1];
    }
    await sleep(step);
  }
}

function fail(msg: string): never {
  console.error(`${msg}\n\n${USAGE}`);
  Deno.exit(2);
}
