/**
 * The chat server (examples/chat_server.ts) as a handler module, to run on every core with
 * workers.ts: N Workers share the port, each a node of one KvRegistry, so `/msg` reaches a user
 * of any Worker, `/who` lists everyone, and a line for everyone reaches every Worker's users.
 *
 *     deno run -A workers.ts examples/chat_workers.ts --workers 4 --port 7000
 *
 * (`deno task workers examples/chat_workers.ts --workers 4 --port 7000` is the same.) Its
 * default export is the handler, `options` its server's options; `workerContext()` gives the
 * Worker's registry node.
 *
 * @module
 */

import { type Connection, workerContext, type WorkerServeOptions } from "../mod.ts";
import { CHAT_FRAMING, chatHandler } from "./chat_server.ts";

const OWNER = "chat";
const { registry } = workerContext();

/** The server's options: the chat's framing; users are the registry entries of `chat`. */
export const options: WorkerServeOptions<string> = {
  framing: CHAT_FRAMING,
  name: OWNER,
  port: 7000,
};

// A line for everyone: to every named user of every Worker, by the registry (a user of this
// Worker is its own connection, one of another Worker a handle over that Worker's link).
async function broadcast(line: string, except: Connection<string>): Promise<void> {
  for (const entry of await registry.list({ owner: OWNER })) {
    if (entry.name === undefined || entry.id === except.id) continue;
    (await registry.lookup(entry.id))?.send(line);
  }
}

/** The chat's handler. */
export default chatHandler({
  registry,
  owner: OWNER,
  broadcast: (line, except) => {
    broadcast(line, except).catch(() => {}); // a user gone meanwhile misses the line
  },
});
