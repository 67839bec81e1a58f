// The examples' graceful stop: SIGINT or SIGTERM stops the server (shutdown to every
// connection, then force after the timeout); resolves once it has stopped. `onSignals` is the
// listening part on its own, for examples with something other than a server to stop.

import type { Server } from "../mod.ts";

/**
 * Call `fn` on SIGINT or SIGTERM (Windows: SIGINT only), every time one comes, until the
 * returned function is called; that removes the listeners.
 */
export function onSignals(fn: () => void): () => void {
  const listener = () => fn();
  // Windows has no SIGTERM listener: adding one throws.
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
  for (const signal of signals) Deno.addSignalListener(signal, listener);
  return () => {
    for (const signal of signals) Deno.removeSignalListener(signal, listener);
  };
}

/** Stop `server` on SIGINT or SIGTERM (Windows: SIGINT only); resolves when it has finished. */
export async function stopOnSignals<T>(server: Server<T>): Promise<void> {
  const remove = onSignals(() => server.stop());
  try {
    await server.finished;
  } finally {
    remove();
  }
}
