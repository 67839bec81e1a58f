// The examples' graceful stop: SIGINT or SIGTERM stops the server (shutdown to every
// connection, then force after the timeout); resolves once it has stopped.

import type { Server } from "../mod.ts";

/** Stop `server` on SIGINT or SIGTERM; resolves when it has finished. */
export async function stopOnSignals<T>(server: Server<T>): Promise<void> {
  const stop = () => server.stop();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await server.finished;
  Deno.removeSignalListener("SIGINT", stop);
  Deno.removeSignalListener("SIGTERM", stop);
}
