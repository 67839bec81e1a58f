// The library's own CPU per frame, without the kernel: the echo example's handler served over
// sockets that are JavaScript objects (a read resolves at once with one 64-byte frame, a write
// at once), against bench/raw_echo.ts's read → writeAll loop over the same sockets. Loopback benchmarks
// of ping-pong are mostly kernel time and swing by ±15% between runs here; this one isolates
// the part a change to the driver can move, and repeats within a few percent.
//
//   deno run -A bench/driver_cost.ts [--frames 1000000] [--connections 50] [--rounds 3]
//     [--servers raw,etcp,etcp-sync]
//
// Prints ns per frame for raw (the loop), etcp (async function* handler) and etcp-sync
// (function* handler), the lowest of the rounds each, servers alternating. With one server per
// process (--servers etcp, say) V8's inline caches see one kind of generator, as in a real
// server: steadier figures for a change to the hot path.
import { parseFlags, writeAll } from "./_common.ts";
import { type Conn, lengthPrefixed, serve, type Transport } from "../mod.ts";
import { echo, echoSync } from "../examples/echo_server.ts";

const USAGE =
  "usage: deno run -A bench/driver_cost.ts [--frames 1000000] [--connections 50] [--rounds 3] [--servers raw,etcp,etcp-sync]";
const opts = parseFlags(
  Deno.args,
  { frames: 1_000_000, connections: 50, rounds: 3, servers: "raw,etcp,etcp-sync" },
  USAGE,
);
const SERVERS = ["raw", "etcp", "etcp-sync"] as const;
type Server = typeof SERVERS[number];
const chosen = opts.servers.split(",") as Server[];
const unknown = chosen.find((name) => !SERVERS.includes(name));
if (unknown !== undefined) {
  console.error(`unknown server ${unknown} (raw, etcp, etcp-sync)\n\n${USAGE}`);
  Deno.exit(2);
}

const FRAME = new Uint8Array(68);
new DataView(FRAME.buffer).setUint32(0, 64);
const ADDR: Deno.NetAddr = { transport: "tcp", hostname: "127.0.0.1", port: 1 };

// One round's sockets: each reads its share of the frames, then the end of the stream.
function sockets(onAllClosed: () => void): () => Conn {
  const perSocket = Math.ceil(opts.frames / opts.connections);
  let closed = 0;
  return () => {
    let left = perSocket;
    return {
      localAddr: ADDR,
      remoteAddr: ADDR,
      read(p: Uint8Array): Promise<number | null> {
        if (left-- <= 0) return Promise.resolve(null);
        p.set(FRAME);
        return Promise.resolve(FRAME.length);
      },
      write: (p: Uint8Array) => Promise.resolve(p.length),
      closeWrite: () => Promise.resolve(),
      close() {
        if (++closed === opts.connections) onAllClosed();
      },
    };
  };
}

// bench/raw_echo.ts's loop, over these sockets.
async function rawEcho(conn: Conn): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  for (let n; (n = await conn.read(buf)) !== null;) await writeAll(conn, buf.subarray(0, n));
  conn.close();
}

async function round(server: Server): Promise<number> {
  const { promise: done, resolve } = Promise.withResolvers<void>();
  const socket = sockets(resolve);
  const started = performance.now();
  if (server === "raw") {
    for (let i = 0; i < opts.connections; i++) rawEcho(socket());
    await done;
  } else {
    let accepted = 0;
    const closed = Promise.withResolvers<never>();
    const transport: Transport = {
      name: "in-memory objects",
      listen: () => ({
        addr: ADDR,
        close: () => closed.reject(new Deno.errors.BadResource("listener closed")),
        ref() {},
        unref() {},
        // The listener's connections, then none until it is closed.
        accept: () => accepted++ < opts.connections ? Promise.resolve(socket()) : closed.promise,
      }),
      connect: () => Promise.reject(new Error("not used")),
    };
    const handler = server === "etcp" ? echo : echoSync;
    const srv = await serve(handler, { transport, framing: lengthPrefixed(4, { lend: true }) });
    await done;
    await srv.stop();
  }
  return (performance.now() - started) * 1e6 / opts.frames;
}

const best = new Map(chosen.map((name) => [name, Infinity]));
for (let r = 0; r < opts.rounds; r++) {
  for (const server of chosen) best.set(server, Math.min(best.get(server)!, await round(server)));
}
const raw = best.get("raw");
for (const [server, ns] of best) {
  const over = raw === undefined ? "" : `  (${(ns - raw).toFixed(0)} over raw)`;
  console.log(`${server.padEnd(10)} ${ns.toFixed(0).padStart(5)} ns/frame${over}`);
}
