// A handler module for serveWorkers, run by tests/workers_test.ts: Worker 0 dies just after it
// listens, while Worker 1 is still starting (its import never ends).

import { workerContext, type WorkerServeOptions } from "../../mod.ts";

const { worker } = workerContext();
if (worker !== 0) await new Promise<never>(() => {});

export const options: WorkerServeOptions = {
  onListen() {
    // Once listening (a macrotask later: after the Worker has said so), it dies.
    setTimeout(() => {
      throw new Error("worker 0 dies after listening");
    });
  },
};

export default async function* () {
  yield;
}
