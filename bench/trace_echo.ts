// The echo example with every connection traced to a function that only counts the entries: the
// cost of tracing on (an entry built per event in and action out), for the load rows of
// bench/run.ts:
//
//   deno run -A bench/run.ts --groups tcp --servers raw,etcp --etcp-cmd "deno run -A bench/trace_echo.ts"
//
// Takes the echo example's flags (--port, --hostname, --framing, --hibernate, --sync).
import { serve } from "../mod.ts";
import {
  echo,
  echoHibernating,
  echoSync,
  framings,
  parseEchoServerArgs,
  USAGE,
} from "../examples/echo_server.ts";
import { argsOrStatus } from "../examples/_command_line.ts";
import { stopOnSignals } from "../examples/_stop_on_signals.ts";

const args = argsOrStatus("trace_echo", parseEchoServerArgs(Deno.args), USAGE);
if (typeof args === "number") Deno.exit(args);
let entries = 0;
const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
const server = await serve(args.hibernate ? echoHibernating : args.sync ? echoSync : echo, {
  port: args.port,
  hostname: args.hostname,
  framing: framings[args.framing](),
  maxConnections: Infinity,
  trace: () => void entries++,
  onListen(addr) {
    if (addr.transport === "tcp") console.log(`listening on ${addr.hostname}:${addr.port}`);
  },
});
await stop.until(server);
console.error(`trace_echo: ${entries} trace entries`);
Deno.exit(0);
