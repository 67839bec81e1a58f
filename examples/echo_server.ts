/**
 * An echo server: every frame is sent back as it came.
 *
 *     deno run -A examples/echo_server.ts [--port 7000] [--hostname 127.0.0.1]
 *       [--framing len4|line|raw] [--hibernate] [--sync]
 *
 * `--hibernate` makes each connection hibernate between frames; `--sync` runs the plain
 * `function*` handler (no promise per step) instead of the `async function*` one.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  type Event,
  type Framing,
  hibernate,
  lengthPrefixed,
  lines,
  raw,
  send,
  serve,
  type Yielded,
} from "../mod.ts";
import { stopOnSignals } from "./_stop_on_signals.ts";

/** Echo every frame; end on disconnect or shutdown. */
export async function* echo(): AsyncGenerator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    switch (ev.type) {
      case "packet":
        ev = yield send(ev.data);
        break;
      case "disconnect":
      case "shutdown":
        return;
      default:
        ev = yield;
    }
  }
}

/** The same as {@linkcode echo}, as a plain generator. */
export function* echoSync(): Generator<Yielded, void, Event> {
  let ev = yield;
  for (;;) {
    switch (ev.type) {
      case "packet":
        ev = yield send(ev.data);
        break;
      case "disconnect":
      case "shutdown":
        return;
      default:
        ev = yield;
    }
  }
}

/** Echo one frame, then hibernate until the next event. */
export async function* echoHibernating(): AsyncGenerator<Yielded, void, Event> {
  const ev = yield; // the event that woke us
  if (ev.type === "disconnect" || ev.type === "shutdown") return;
  if (ev.type === "packet") yield [send(ev.data), hibernate()];
  else yield hibernate();
}

/** The framings selectable with `--framing`. */
export const framings: Record<string, () => Framing<unknown>> = {
  len4: () => lengthPrefixed(4) as Framing<unknown>,
  line: () => lines() as Framing<unknown>,
  raw: () => raw() as Framing<unknown>,
};

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      port: { type: "string", default: "7000" },
      hostname: { type: "string", default: "127.0.0.1" },
      framing: { type: "string", default: "len4" },
      hibernate: { type: "boolean", default: false },
      sync: { type: "boolean", default: false },
    },
  });
  const framing = framings[values.framing];
  if (!framing) {
    console.error(`unknown --framing ${values.framing}: use len4, line or raw`);
    Deno.exit(2);
  }
  const handler = values.hibernate ? echoHibernating : values.sync ? echoSync : echo;
  const server = await serve(handler, {
    port: Number(values.port),
    hostname: values.hostname,
    framing: framing(),
    maxConnections: Infinity,
    onListen(addr) {
      if (addr.transport === "tcp") console.log(`listening on ${addr.hostname}:${addr.port}`);
    },
  });
  await stopOnSignals(server);
}
