// The echo of examples/echo_server.ts (async function*, 4-byte length prefix, frames lent) as a
// handler module, for bench/workers.ts: served by workers.ts on N Workers, or, run as the main
// module, on this process's main thread (the row without Workers):
//
//   deno run -A workers.ts bench/_workers_echo.ts --workers 2 --port 0 --hostname 127.0.0.1
//   deno run -A bench/_workers_echo.ts --port 0 --hostname 127.0.0.1

import { lengthPrefixed, serve, type WorkerServeOptions } from "../mod.ts";
import { echo } from "../examples/echo_server.ts";
import { stopOnSignals } from "../examples/_stop_on_signals.ts";

export const options: WorkerServeOptions<Uint8Array> = {
  framing: lengthPrefixed(4, { lend: true }),
  maxConnections: Infinity,
};

export default echo;

if (import.meta.main) {
  const at = (flag: string) => {
    const i = Deno.args.indexOf(flag);
    return i < 0 ? undefined : Deno.args[i + 1];
  };
  const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
  const server = await serve(echo, {
    ...options,
    port: Number(at("--port") ?? 0),
    hostname: at("--hostname") ?? "127.0.0.1",
  });
  const addr = server.addr as Deno.NetAddr;
  console.log(`listening on ${addr.hostname}:${addr.port}`);
  await stop.until(server);
  Deno.exit(0);
}
