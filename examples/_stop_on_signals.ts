// The examples' graceful stop: SIGINT or SIGTERM stops the server (shutdown to every
// connection, then force after the timeout). `onSignals` is the listening part on its own, for
// examples with something other than a server to stop.
//
// Both listen from the moment they are called, and a server example calls them before it
// listens: a supervisor (or a test) may send SIGTERM the moment "listening on" is printed, and a
// signal with no listener yet ends the process at once (exit 143), with no graceful stop.

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

/** What {@linkcode stopOnSignals} returns. */
export interface StopOnSignals {
  /**
   * Stop `server` on SIGINT or SIGTERM (at once if one came already); resolves once it has
   * finished, and stops listening for signals.
   */
  until<T>(server: Server<T>): Promise<void>;
  /** Stop listening for signals (there is no server to stop: it failed to listen). */
  remove(): void;
}

/**
 * Listen for SIGINT and SIGTERM (Windows: SIGINT only) from now on, and stop the server that
 * `until` is given when one comes. Call it before the server listens.
 */
export function stopOnSignals(): StopOnSignals {
  let server: Server<unknown> | undefined;
  let asked = false; // a signal came before `until`
  const remove = onSignals(() => {
    asked = true;
    server?.stop();
  });
  return {
    async until<T>(target: Server<T>) {
      server = target as Server<unknown>;
      if (asked) target.stop();
      try {
        await target.finished;
      } finally {
        remove();
      }
    },
    remove,
  };
}
