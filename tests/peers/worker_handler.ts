// A handler module for serveWorkers, run by tests/workers_test.ts: lines; `node` answers with
// the Worker's node, `crash` throws an uncaught error in the Worker (which dies of it), `exit`
// calls Deno.exit() (which ends the Worker alone), `hang` keeps the Worker's thread busy for 2 s (so
// it answers no ping), and any other line is echoed.

import { lines, send, workerContext, type WorkerServeOptions } from "../../mod.ts";
import type { HandlerGenerator } from "../../mod.ts";

const { registry } = workerContext();

export const options: WorkerServeOptions<string> = { framing: lines(), name: "probe" };

export default async function* probe(): HandlerGenerator<string> {
  for (let ev = yield; ev.type === "packet";) {
    if (ev.data === "node") ev = yield send(registry.node);
    else if (ev.data === "crash") {
      setTimeout(() => {
        throw new Error("crash on purpose");
      });
      ev = yield;
    } else if (ev.data === "exit") Deno.exit(70);
    else if (ev.data === "hang") {
      for (const end = Date.now() + 2000; Date.now() < end;) { /* busy */ }
      ev = yield;
    } else ev = yield send(ev.data);
  }
}
