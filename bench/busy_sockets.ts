// More than 128 busy sockets in one Deno thread: both ends of N saturated echo
// connections live in this one process, and each client connection counts its
// round trips for a fixed time. Prints the per-connection counts (min, median,
// max) and how many connections starved (fewer than 1/10 of the mean: a fair
// share), the CPU per round trip, and what a newcomer sees: once the measured
// window starts, one more connection connects (the time it takes is printed)
// and does one round trip every 50 ms (how many it completed is printed).
//
//   deno run -A bench/busy_sockets.ts [--connections 256] [--duration 3]
//     [--size 64] [--variant raw|etcp|etcp-fair-off|etcp-worker] [--json]
//
// --variant raw (default): plain Deno, no library: a Deno.listen echo and N
// Deno.connect clients, each looping write → read of one 4-byte-length-prefixed
// frame. Deno 2.9.6 completes every op of the thread from one task, and
// tokio's cooperative budget (128 operations per poll) lets 128 connections
// through per turn: past 128, the rest get nothing (at 200, 72 starve; at
// 500 the newcomer does not even connect).
// --variant etcp: the same traffic through the library, serve() with an echo
// handler and N connect() clients whose handlers send the next frame as each
// reply arrives, with the library's fair-share gate (_fair_share.ts) on: past
// 120 busy connections with both ends here, reads take turns, 64 per timer
// tick (everyone moves; throughput is capped).
// --variant etcp-fair-off: the same with the gate turned off
// (setFairShare(false) of the private _fair_share.ts), to see what it buys.
// --variant etcp-worker: the server runs in a Worker (bench/_busy_echo_worker.ts),
// its own thread: no gate is needed, as with a server in another process.
//
// Bounded: the run stops after --duration seconds of measurement (after a
// 0.5 s warmup), every socket is closed, and a watchdog exits 1 if stopping
// takes more than 10 s.
import { cpuSeconds, parseFlags, sleep } from "./_common.ts";

const USAGE = `usage: deno run -A bench/busy_sockets.ts [options]
  --connections 256   echo connections, both ends in this process
  --duration 3        seconds measured, after a 0.5 s warmup
  --size 64           frame payload bytes
  --variant raw       raw (plain Deno), etcp (the library, fair-share gate on),
                      etcp-fair-off (the library with the gate off) or
                      etcp-worker (the library, the server in a Worker)
  --json              also print the result as one JSON line`;
const opts = parseFlags(Deno.args, {
  connections: 256,
  duration: 3,
  size: 64,
  variant: "raw",
  json: false,
}, USAGE);
if (!["raw", "etcp", "etcp-fair-off", "etcp-worker"].includes(opts.variant)) {
  console.error(
    `--variant must be raw, etcp, etcp-fair-off or etcp-worker, not ${opts.variant}\n\n${USAGE}`,
  );
  Deno.exit(2);
}
if (!(opts.connections >= 1 && opts.size >= 0 && opts.duration > 0)) {
  console.error(`bad --connections, --size or --duration\n\n${USAGE}`);
  Deno.exit(2);
}

const HOST = "127.0.0.1";
const WARMUP_MS = 500;
const frame = new Uint8Array(4 + opts.size);
new DataView(frame.buffer).setUint32(0, opts.size);

/** Round trips per client connection, counted only while `measuring`. */
const counts = new Array<number>(opts.connections).fill(0);
let measuring = false;
let running = true;
const PROBE_EVERY_MS = 50;

/** What the newcomer saw. */
interface Probe {
  connectMs: number;
  roundTrips: number;
}

/** A running variant: `probe` connects one more client and paces it until `measuring` ends. */
interface Busy {
  probe(): Promise<Probe>;
  stop(): Promise<void>;
}

// ------------------------------------------------------------------ raw Deno

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
}

/** Reads exactly `buf.length` bytes; false at end of stream. */
async function readFull(conn: Deno.Conn, buf: Uint8Array): Promise<boolean> {
  for (let off = 0; off < buf.length;) {
    const n = await conn.read(buf.subarray(off));
    if (n === null) return false;
    off += n;
  }
  return true;
}

async function runRaw(): Promise<Busy> {
  const listener = Deno.listen({ hostname: HOST, port: 0 });
  const served: Deno.Conn[] = [];
  const serving: Promise<void>[] = [];
  const accepting = (async () => {
    for await (const conn of listener) {
      conn.setNoDelay(true);
      served.push(conn);
      serving.push((async () => {
        const buf = new Uint8Array(64 * 1024);
        try {
          for (let n; (n = await conn.read(buf)) !== null;) {
            await writeAll(conn, buf.subarray(0, n));
          }
        } catch { /* closed at the end */ }
      })());
    }
  })();
  const clients: Deno.Conn[] = [];
  for (let i = 0; i < opts.connections; i++) {
    const conn = await Deno.connect({ hostname: HOST, port: listener.addr.port });
    conn.setNoDelay(true);
    clients.push(conn);
  }
  const looping = clients.map(async (conn, i) => {
    const reply = new Uint8Array(frame.length);
    try {
      while (running) {
        await writeAll(conn, frame);
        if (!await readFull(conn, reply)) return;
        if (measuring) counts[i]++;
      }
    } catch { /* closed at the end */ }
  });
  const probe = async (): Promise<Probe> => {
    const t0 = performance.now();
    const conn = await Deno.connect({ hostname: HOST, port: listener.addr.port });
    const connectMs = performance.now() - t0;
    conn.setNoDelay(true);
    clients.push(conn); // closed with the others
    const reply = new Uint8Array(frame.length);
    let roundTrips = 0;
    try {
      while (measuring) {
        await writeAll(conn, frame);
        if (!await readFull(conn, reply)) break;
        roundTrips++;
        await sleep(PROBE_EVERY_MS);
      }
    } catch { /* closed at the end */ }
    return { connectMs, roundTrips };
  };
  const stop = async () => {
    running = false;
    for (const conn of clients) conn.close();
    await Promise.all(looping);
    listener.close();
    for (const conn of served) {
      try {
        conn.close();
      } catch { /* the echo loop closed it */ }
    }
    await Promise.all([accepting.catch(() => {}), ...serving]);
  };
  return { probe, stop };
}

// ------------------------------------------------------------------- library

async function runEtcp(): Promise<Busy> {
  const { connect, lengthPrefixed, send, serve, setTimeout: after } = await import("../mod.ts");
  if (opts.variant === "etcp-fair-off") (await import("../_fair_share.ts")).setFairShare(false);
  type Ev = import("../mod.ts").Event<Uint8Array>;
  type Out = import("../mod.ts").HandlerGenerator<Uint8Array>;
  type Client = import("../mod.ts").Connection<Uint8Array>;
  const framing = lengthPrefixed(4);
  const payload = frame.subarray(4);
  let port: number;
  let stopServer: () => Promise<unknown>;
  if (opts.variant === "etcp-worker") {
    const worker = new Worker(new URL("./_busy_echo_worker.ts", import.meta.url), {
      type: "module",
    });
    const message = () =>
      new Promise<unknown>((resolve) => worker.onmessage = (e) => resolve(e.data));
    port = await message() as number;
    stopServer = async () => {
      const stopped = message();
      worker.postMessage("stop");
      await stopped;
      worker.terminate();
    };
  } else {
    const server = await serve(async function* (): Out {
      let ev: Ev = yield;
      while (ev.type === "packet") ev = yield send(ev.data);
    }, { hostname: HOST, port: 0, framing, maxConnections: Infinity });
    port = server.addr.port;
    stopServer = () => server.stop("normal", { timeout: 1000 });
  }
  const conns: Client[] = [];
  for (let i = 0; i < opts.connections; i++) {
    conns.push(
      await connect(async function* (): Out {
        let ev: Ev = yield; // the "go" info, once every connection is up
        if (ev.type !== "info") return;
        ev = yield send(payload);
        while (ev.type === "packet" && running) {
          if (measuring) counts[i]++;
          ev = yield send(payload);
        }
      }, { hostname: HOST, port, framing }),
    );
  }
  // Traffic starts once all are connected: past 128 busy connections, connects starve too.
  for (const conn of conns) conn.info("go");
  const probe = async (): Promise<Probe> => {
    let roundTrips = 0;
    const t0 = performance.now();
    const conn = await connect(async function* (): Out {
      let ev: Ev = yield send(payload);
      while (measuring) {
        if (ev.type === "packet") {
          roundTrips++;
          ev = yield after(PROBE_EVERY_MS);
        } else if (ev.type === "timeout") ev = yield send(payload);
        else return;
      }
    }, { hostname: HOST, port, framing });
    const connectMs = performance.now() - t0;
    conns.push(conn); // stopped with the others
    await conn.closed;
    return { connectMs, roundTrips };
  };
  const stop = async () => {
    running = false;
    await Promise.all(conns.map((c) => c.stop("normal", { timeout: 1000 })));
    await stopServer();
  };
  return { probe, stop };
}

// ---------------------------------------------------------------------- main

const started = performance.now();
const busy = opts.variant === "raw" ? await runRaw() : await runEtcp();
const connectMs = performance.now() - started;
await sleep(WARMUP_MS);
measuring = true;
const cpuBefore = cpuSeconds(Deno.pid);
const probing = busy.probe();
await sleep(opts.duration * 1000);
measuring = false;
const cpu = cpuSeconds(Deno.pid) - cpuBefore;
const watchdog = setTimeout(() => {
  console.error("busy_sockets: stopping took over 10 s");
  Deno.exit(1);
}, 10_000);
// A newcomer that has not even connected by now is given up (the stop closes the rest).
const probe = await Promise.race([probing, sleep(1000).then(() => null)]);
await busy.stop();
await probing.catch(() => {});
clearTimeout(watchdog);

const sorted = counts.toSorted((a, b) => a - b);
const median = sorted[Math.floor(sorted.length / 2)];
const total = counts.reduce((a, b) => a + b, 0);
const starved = counts.filter((c) => c < total / counts.length / 10).length;
const result = {
  variant: opts.variant,
  connections: opts.connections,
  seconds: opts.duration,
  connectMs: Math.round(connectMs),
  roundTripsPerSec: Math.round(total / opts.duration),
  cpuUsPerRoundTrip: Number((cpu * 1e6 / Math.max(total, 1)).toFixed(2)),
  perConnection: { min: sorted[0], median, max: sorted[sorted.length - 1] },
  starved,
  newcomer: probe && {
    connectMs: Math.round(probe.connectMs),
    roundTrips: probe.roundTrips,
    paced: Math.floor(opts.duration * 1000 / PROBE_EVERY_MS),
  },
};
const newcomer = result.newcomer
  ? `connected in ${result.newcomer.connectMs} ms, then ${result.newcomer.roundTrips} of ` +
    `${result.newcomer.paced} paced round trips`
  : "not connected after the run";
console.log(
  `${opts.variant}, ${opts.connections} connections, ${opts.duration} s: ` +
    `${result.roundTripsPerSec} round trips/s (${result.cpuUsPerRoundTrip} µs CPU each); ` +
    `per connection min ${sorted[0]}, median ${median}, max ${sorted[sorted.length - 1]}; ` +
    `starved (< mean/10): ${starved}; newcomer: ${newcomer}`,
);
if (opts.json) console.log(JSON.stringify(result));
