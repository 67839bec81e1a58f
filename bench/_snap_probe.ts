// Memory per idle connection measured inside the server with GC forced, so that the garbage
// of setting connections up does not count (bench/idle.ts measures RSS from outside, without).
//
//   deno run -A --v8-flags=--expose-gc bench/idle_heap.ts [--server etcp|etcp-hibernate|raw]
//     [--connections 2000] [--from 0]
//
// The server runs in this process; a child process opens the connections, sends one
// length-prefixed frame on each, reads its echo, and keeps them open. Prints one JSON line:
// RSS, V8 heap (used and committed) and external memory growth per connection, from none
// or, with --from F, from F connections on (the slope, as bench/idle.ts --from measures it).
import { parseFlags } from "./_common.ts";
import v8 from "node:v8";
import { echo, echoHibernating } from "../examples/echo_server.ts";
import { lengthPrefixed, serve } from "../mod.ts";

const FRAME = new Uint8Array([0, 0, 0, 2, 1, 2]);

if (Deno.args[0] === "--client") {
  // The child: for each count read from stdin, open connections one by one up to it, one echoed
  // frame each, say "ready" and hold them.
  const port = Number(Deno.args[1]);
  const held: Deno.Conn[] = [];
  const killer = setTimeout(() => Deno.exit(3), 120_000); // killed long before
  for await (const line of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) {
    for (const count of line.trim().split(/\s+/).map(Number)) {
      while (held.length < count) {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        await conn.write(FRAME);
        await conn.read(new Uint8Array(16));
        held.push(conn);
      }
      console.log("ready");
    }
  }
  clearTimeout(killer);
  Deno.exit(0);
}

const opts = parseFlags(
  Deno.args,
  { server: "etcp-hibernate", connections: 2000, from: 0 },
  "see above",
);
if (opts.from < 0 || (opts.from && opts.from >= opts.connections)) {
  throw new RangeError("--from must be 0 or below --connections");
}
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error("run with --v8-flags=--expose-gc");

function listen(): number {
  if (opts.server === "raw") {
    // The baseline: each connection parked on a 1-byte read, as bench/raw_echo.ts --park 1.
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    (async () => {
      for await (const conn of listener) {
        (async () => {
          const park = new Uint8Array(1);
          const rest = new Uint8Array(64);
          while (await conn.read(park) !== null) {
            await conn.read(rest);
            await conn.write(FRAME);
          }
        })();
      }
    })();
    return listener.addr.port;
  }
  return -1;
}

let port = listen();
if (port < 0) {
  const server = await serve(opts.server === "etcp" ? echo : echoHibernating, {
    hostname: "127.0.0.1",
    framing: lengthPrefixed(4),
    maxConnections: Infinity,
  });
  port = (server.addr as Deno.NetAddr).port;
}

function usage(): Deno.MemoryUsage {
  gc!();
  gc!();
  return Deno.memoryUsage();
}

const child = new Deno.Command(Deno.execPath(), {
  args: ["run", "-A", import.meta.filename!, "--client", String(port)],
  stdin: "piped",
  stdout: "piped",
}).spawn();
const writer = child.stdin.getWriter();
const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();

/** Memory once the child holds `count` connections (0: now). */
async function usageAt(count: number): Promise<Deno.MemoryUsage> {
  if (count > 0) {
    await writer.write(new TextEncoder().encode(`${count}\n`));
    await lines.read(); // "ready"
    await new Promise((resolve) => setTimeout(resolve, 500)); // let the last wakes settle
  }
  return usage();
}

const before = await usageAt(opts.from);
v8.writeHeapSnapshot(`/tmp/snap-${opts.server}-a.heapsnapshot`);
const after = await usageAt(opts.connections);
v8.writeHeapSnapshot(`/tmp/snap-${opts.server}-b.heapsnapshot`);
child.kill();
await child.status;
const per = (key: keyof Deno.MemoryUsage) =>
  Math.round((after[key] - before[key]) / (opts.connections - opts.from));
console.log(JSON.stringify({
  server: opts.server,
  connections: opts.connections,
  from: opts.from,
  rssPerConn: per("rss"),
  heapTotalPerConn: per("heapTotal"),
  heapUsedPerConn: per("heapUsed"),
  externalPerConn: per("external"),
}));
Deno.exit(0);
