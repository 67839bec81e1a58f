/**
 * A client for the echo server: sends `--count` length-prefixed frames, checks each echo, and
 * prints the round-trip rate.
 *
 *     deno run -A examples/echo_client.ts [--port 7000] [--hostname 127.0.0.1]
 *       [--count 1000] [--size 64]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { connect, type Event, lengthPrefixed, send, type Yielded } from "../mod.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    port: { type: "string", default: "7000" },
    hostname: { type: "string", default: "127.0.0.1" },
    count: { type: "string", default: "1000" },
    size: { type: "string", default: "64" },
  },
});
const count = Number(values.count);
const size = Math.max(4, Number(values.size));

function frame(seq: number): Uint8Array {
  const data = new Uint8Array(size);
  new DataView(data.buffer).setUint32(0, seq);
  for (let i = 4; i < size; i++) data[i] = (seq + i) & 0xff;
  return data;
}

const done = Promise.withResolvers<number>();
const started = performance.now();
const conn = await connect(
  async function* (): AsyncGenerator<Yielded, void, Event<Uint8Array>> {
    let seq = 0;
    let ev = yield send(frame(seq));
    while (ev.type === "packet") {
      const expected = frame(seq);
      if (ev.data.length !== size || ev.data.some((b, i) => b !== expected[i])) {
        throw new Error(`echo ${seq} does not match what was sent`);
      }
      if (++seq === count) return done.resolve(seq);
      ev = yield send(frame(seq));
    }
    done.reject(new Error(`connection ended after ${seq} echoes: ${ev.type}`));
  },
  { hostname: values.hostname, port: Number(values.port), framing: lengthPrefixed(4) },
);
const echoed = await done.promise;
const seconds = (performance.now() - started) / 1000;
console.log(
  `${echoed} frames echoed in ${seconds.toFixed(2)} s (${(echoed / seconds).toFixed(0)}/s)`,
);
await conn.closed;
