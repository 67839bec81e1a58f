// Idle memory: how much a server's RSS grows per idle connection.
//
//   deno run -A bench/idle.ts --pid PID --port P [--host 127.0.0.1]
//     [--connections 2000] [--send-one] [--size 64] [--settle 500]
//
// Opens `connections` connections to the server (whose pid we read from
// /proc: the client's own memory is not counted), optionally exchanges one
// length-prefixed frame on each (--send-one: the server has been active once
// before going idle), waits until the server has accepted them all (the echo,
// or else its fd count) and its RSS has settled, then prints one JSON line:
// {"connections","accepted","rssBeforeKB","rssAfterKB","perConnBytes"}.
import { fdCount, parseFlags, rssKB, sleep } from "./_common.ts";
import { echoOne, makePattern, MIN_SIZE } from "./_frames.ts";

const USAGE = `usage: deno run -A bench/idle.ts --pid PID --port P [--host 127.0.0.1]
  [--connections 2000] [--send-one] [--size 64] [--settle 500]`;
const opts = parseFlags(Deno.args, {
  host: "127.0.0.1",
  port: 0,
  pid: 0,
  connections: 2000,
  "send-one": false,
  size: 64,
  settle: 500, // ms the RSS must hold still to count as settled
}, USAGE);
if (!opts.port || !opts.pid) fail("--pid and --port are required");
if (opts.size < MIN_SIZE) fail(`--size must be at least ${MIN_SIZE}`);
if (opts.connections < 1 || opts.connections > 50_000) {
  fail("--connections must be 1..50000");
}

const CONNECT_CONCURRENCY = 128; // stay well inside the listen backlog
// Few exchanges at a time: a server that borrows a read buffer per wake-up
// then needs only a few, instead of leaving hundreds as garbage in its RSS.
const EXCHANGE_CONCURRENCY = 8;
const ACCEPT_TIMEOUT_MS = 15_000;
const SETTLE_TIMEOUT_MS = 5_000;
const HARD_TIMEOUT_MS = 60_000;

const conns: Deno.Conn[] = [];
const pattern = makePattern(opts.size);

// Whatever happens (a server that stops accepting), we are gone in a minute.
const deadline = setTimeout(() => {
  console.error("idle: did not finish in time");
  Deno.exit(3);
}, HARD_TIMEOUT_MS);

const rssBeforeKB = await settledRss();
const fdBefore = fdCount(opts.pid);
await forEach(opts.connections, CONNECT_CONCURRENCY, async () => {
  const conn = await Deno.connect({ hostname: opts.host, port: opts.port });
  conns.push(conn);
});
if (opts["send-one"]) {
  await forEach(
    conns.length,
    EXCHANGE_CONCURRENCY,
    (i) => echoOne(conns[i], i, opts.size, pattern),
  );
}
// An echo proves its connection was accepted; silent ones need the fd count.
const accepted = opts["send-one"] ? opts.connections : await waitAccepted(fdBefore);
const rssAfterKB = await settledRss();
console.log(JSON.stringify({
  connections: opts.connections,
  accepted,
  sendOne: opts["send-one"],
  rssBeforeKB,
  rssAfterKB,
  perConnBytes: Math.round((rssAfterKB - rssBeforeKB) * 1024 / accepted),
}));
for (const conn of conns) conn.close();
clearTimeout(deadline);

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
async function waitAccepted(fdBefore: number): Promise<number> {
  if (fdBefore < 0) return opts.connections; // /proc/PID/fd unreadable: trust
  const until = Date.now() + ACCEPT_TIMEOUT_MS;
  let n = 0;
  while ((n = fdCount(opts.pid) - fdBefore) < opts.connections) {
    if (Date.now() > until) {
      console.error(`idle: only ${n} of ${opts.connections} accepted`);
      return Math.max(n, 1);
    }
    await sleep(20);
  }
  return opts.connections;
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
