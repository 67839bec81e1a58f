// The handler model without the driver: raw_echo.ts's loop, where every read
// goes through one step of the echo example's handler (an event in, a send
// action out) before it is written back. Against raw it measures what the
// generator step costs by itself; against etcp, what the driver around it costs.
//
//   deno run -A bench/step_echo.ts [--port 0] [--hostname 127.0.0.1] [--sync]
//     [--framing len4]
//
// The `async function*` echo by default, the `function*` one with --sync. Each
// read is one packet, as a whole (one frame per read in ping-pong). It takes
// run.ts's etcp flags, so that one run gives both steps beside raw:
//
//   deno run -A bench/run.ts --groups tcp --only ping-pong \
//     --servers raw,etcp,etcp-sync --etcp-cmd "deno run -A bench/step_echo.ts"
import { parseFlags, serveEchoes, writeAll } from "./_common.ts";
import { echo, echoSync } from "../examples/echo_server.ts";
import type { Event, SendAction, Yielded } from "../mod.ts";

const USAGE =
  "usage: deno run -A bench/step_echo.ts [--port 0] [--hostname 127.0.0.1] [--sync] [--framing len4]";
const opts = parseFlags(
  Deno.args,
  { port: 0, hostname: "127.0.0.1", sync: false, framing: "len4" },
  USAGE,
);
if (opts.framing !== "len4") {
  console.error(`--framing must be len4 (reads are echoed whole)\n\n${USAGE}`);
  Deno.exit(2);
}

type Step = IteratorResult<Yielded, void>;

async function serve(conn: Deno.Conn) {
  const buf = new Uint8Array(64 * 1024);
  const gen = opts.sync ? echoSync() : echo();
  await gen.next(undefined as unknown as Event); // to its first yield
  for (let n; (n = await conn.read(buf)) !== null;) {
    const ev: Event = { type: "packet", data: buf.subarray(0, n) };
    const step: Step = opts.sync
      ? (gen as Generator<Yielded, void, Event>).next(ev)
      : await gen.next(ev);
    if (step.done) return;
    await writeAll(conn, (step.value as SendAction).data as Uint8Array);
  }
}

await serveEchoes(
  Deno.listen({ port: opts.port, hostname: opts.hostname }),
  "step_echo",
  (conn) => {
    conn.setNoDelay(true);
    return serve(conn);
  },
);
