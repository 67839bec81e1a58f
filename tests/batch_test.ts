// batch(framing): the frames of one read in one packet event, over real TCP. Every frame arrives
// once, in order, in non-empty batches (several per batch when they come in one write); sending an
// array writes each frame; bad input gives the batch of good frames before it, then frameError;
// lent frames stay valid for the step of their batch; sending something else than an array is a
// TypeError; a send that throws part-way (a bad frame in the array) queues nothing of it.

import assert from "node:assert/strict";
import {
  batch,
  connect,
  decodeFrames,
  type Event,
  FrameTooLarge,
  type FrameWriter,
  type Framing,
  type HandlerGenerator,
  lengthPrefixed,
  lines,
  send,
  serve,
} from "../mod.ts";
import { HOST, Inbox, portOf, readExactly, wireOf, within, writeAll } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };

Deno.test("batch() decodes a chunk's frames into one array, and keeps a partial frame", () => {
  const framing = batch(lengthPrefixed(1));
  const decoder = framing.decoder();
  const got: unknown[] = [];
  const collect = (frames: unknown) => void got.push(frames); // (deepEqual narrows `got`)
  decoder.decode(new Uint8Array([1, 7, 2, 8, 9, 3, 1]), collect);
  assert.deepEqual(got, [[new Uint8Array([7]), new Uint8Array([8, 9])]]);
  assert.equal(decoder.buffered, 2);
  decoder.decode(new Uint8Array([2]), collect);
  assert.equal(got.length, 1, "no batch before a frame is whole");
  decoder.decode(new Uint8Array([3]), collect);
  assert.deepEqual(got[1], [new Uint8Array([1, 2, 3])]);
  assert.deepEqual(decodeFrames(framing, new Uint8Array([0])), [[new Uint8Array(0)]]);
  assert.deepEqual(decodeFrames(framing, new Uint8Array([5, 1])), []);
});

Deno.test("batched frames over TCP arrive once, in order, and an array is echoed frame by frame", async () => {
  const batches = new Inbox<number>();
  const server = await serve(async function* (): HandlerGenerator<Uint8Array[]> {
    for (let ev: Event<Uint8Array[]> = yield; ev.type === "packet";) {
      batches.push(ev.data.length);
      ev = yield send(ev.data);
    }
  }, {
    hostname: HOST,
    port: 0,
    framing: batch(lengthPrefixed(4, { lend: true })),
    logger: quiet,
  });
  const conn = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  try {
    const frames = Array.from({ length: 300 }, (_, i) => new Uint8Array(50 + (i % 7)).fill(i));
    const wire = wireOf(frames);
    await within(10_000, writeAll(conn, wire), "write");
    assert.deepEqual(await within(10_000, readExactly(conn, wire.length), "echo"), wire);
    let total = 0;
    let most = 0;
    while (total < frames.length) {
      const n = await batches.next();
      assert.ok(n > 0, "never an empty batch");
      total += n;
      most = Math.max(most, n);
    }
    assert.equal(total, frames.length);
    assert.ok(most > 1, "frames of one write share a batch");
  } finally {
    conn.close();
    await server.stop();
  }
});

Deno.test("bad input after good frames: their batch first, then frameError", async () => {
  const events = new Inbox<Event<string[]>>();
  const server = await serve(async function* (): HandlerGenerator<string[]> {
    for (let ev: Event<string[]> = yield; ev.type === "packet" || ev.type === "frameError";) {
      events.push(ev);
      ev = yield;
    }
  }, { hostname: HOST, port: 0, framing: batch(lines({ maxLength: 5 })), logger: quiet });
  const conn = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  try {
    await writeAll(conn, new TextEncoder().encode("ab\ncd\nmuch too long\n"));
    const first = await events.next();
    assert.deepEqual(first, { type: "packet", data: ["ab", "cd"] });
    const second = await events.next();
    assert.equal(second.type, "frameError");
    assert.ok(second.type === "frameError" && second.error instanceof FrameTooLarge);
  } finally {
    conn.close();
    await server.stop();
  }
});

Deno.test("batch() refuses to send something else than an array", () => {
  const framing = batch(lines());
  assert.throws(
    () =>
      framing.encode("x" as unknown as string[], { write() {}, writeString() {}, writeUint() {} }),
    TypeError,
  );
});

Deno.test("a send that throws part-way queues nothing of it: batch(), or a framing that writes a header first", async () => {
  // A framing that writes its header, then finds it cannot encode the body.
  const headerFirst = {
    name: "header-first",
    decoder: () => lines().decoder(),
    encode(frame: string, out: FrameWriter) {
      out.writeString("HEADER ");
      if (frame === "bad") throw new TypeError("cannot encode bad");
      out.writeString(`${frame}\n`);
    },
  } as Framing<string>;
  const cases: Array<[string, Framing<unknown>, unknown, unknown]> = [
    ["batch(lines())", batch(lines()) as Framing<unknown>, ["good", "bad\nline"], ["next"]],
    ["a framing that writes a header first", headerFirst as Framing<unknown>, "bad", "next"],
  ];
  for (const [what, framing, bad, good] of cases) {
    const got = new Inbox<string>();
    const server = await serve(async function* (): HandlerGenerator<string> {
      for (let ev = yield; ev.type === "packet"; ev = yield) got.push(ev.data);
    }, { hostname: HOST, port: 0, framing: lines() });
    const client = await connect(async function* () {
      for (let ev = yield; ev.type !== "shutdown" && ev.type !== "disconnect"; ev = yield);
    }, { port: portOf(server.addr), framing });
    assert.throws(() => client.send(bad), TypeError, what);
    client.send(good);
    // The first line the server reads is the good send's: nothing of the bad one went out.
    assert.match(await got.next(), /next$/, what);
    await client.stop();
    await server.stop();
  }
});
