// Memory per idle connection measured inside the server with GC forced, so that the garbage
// of setting connections up does not count (bench/idle.ts measures RSS from outside, without).
//
//   deno run -A --v8-flags=--expose-gc bench/idle_heap.ts [--server etcp|etcp-hibernate|raw]
//     [--connections 2000]
//
// The server runs in this process; a child process opens the connections, sends one
// length-prefixed frame on each, reads its echo, and keeps them open. Prints one JSON line:
// RSS, V8 heap and external memory growth per connection.
import { parseFlags } from "./_common.ts";
import { echo, echoHibernating } from "../examples/echo_server.ts";
import { lengthPrefixed, serve } from "../mod.ts";

const FRAME = new Uint8Array([0, 0, 0, 2, 1, 2]);

if (Deno.args[0] === "--client") {
  // The child: open the connections one by one, one echoed frame each, then hold them.
  const [port, count] = Deno.args.slice(1).map(Number);
  const held: Deno.Conn[] = [];
  for (let i = 0; i < count; i++) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(FRAME);
    await conn.read(new Uint8Array(16));
    held.push(conn);
  }
  console.log("ready");
  await new Promise((resolve) => setTimeout(resolve, 60_000)); // killed long before
  Deno.exit(0);
}

const opts = parseFlags(Deno.args, { server: "etcp-hibernate", connections: 2000 }, "see above");
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

const before = usage();
const child = new Deno.Command(Deno.execPath(), {
  args: ["run", "-A", import.meta.filename!, "--client", String(port), String(opts.connections)],
  stdout: "piped",
}).spawn();
await child.stdout.getReader().read(); // "ready"
await new Promise((resolve) => setTimeout(resolve, 500)); // let the last wakes settle
const after = usage();
child.kill();
await child.status;
const per = (key: keyof Deno.MemoryUsage) =>
  Math.round((after[key] - before[key]) / opts.connections);
console.log(JSON.stringify({
  server: opts.server,
  connections: opts.connections,
  rssPerConn: per("rss"),
  heapUsedPerConn: per("heapUsed"),
  externalPerConn: per("external"),
}));
Deno.exit(0);
