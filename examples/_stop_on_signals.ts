// The examples' graceful stop: SIGINT or SIGTERM stops the server (shutdown to every
// connection, then force after the timeout); resolves once it has stopped.

import type { Server } from "../mod.ts";

/** Stop `server` on SIGINT or SIGTERM (Windows: SIGINT only); resolves when it has finished. */
export async function stopOnSignals<T>(server: Server<T>): Promise<void> {
  const stop = () => server.stop();
  // Windows has no SIGTERM listener: adding one throws.
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
  for (const signal of signals) Deno.addSignalListener(signal, stop);
  try {
    await server.finished;
  } finally {
    for (const signal of signals) Deno.removeSignalListener(signal, stop);
  }
}
