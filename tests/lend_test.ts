// Lent frames (`raw({ lend: true })`, `lengthPrefixed(n, { lend: true })`): a received frame is a
// view of the connection's read memory, valid for the step that receives it. Shown here over
// real TCP: frames are intact during their step, small and large (read in place across reads,
// their memory reused for the next large frame), with bursts and a highWaterMark above 1 (the
// next read waits for the handler anyway) and in passive mode; a frame kept without slice() is
// overwritten by later input while a slice() stays intact; a bad option is a TypeError.

import assert from "node:assert/strict";
import {
  decodeFrames,
  type Event,
  type Framing,
  type HandlerGenerator,
  lengthPrefixed,
  raw,
  recv,
  send,
  serve,
  type Server,
} from "../mod.ts";
import { HOST, Inbox, portOf, readExactly, wireOf, within, writeAll } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };

/** A payload of `size` bytes whose content depends on `seed`. */
function payload(size: number, seed: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i < size; i++) out[i] = (i * 7 + seed * 13) & 0xff;
  return out;
}

async function withServer(
  handler: () => HandlerGenerator<Uint8Array>,
  framing: Framing<Uint8Array>,
  body: (conn: Deno.TcpConn, server: Server) => Promise<void>,
  options: { highWaterMark?: number; mode?: "active" | "passive" } = {},
): Promise<void> {
  const server = await serve(handler, {
    hostname: HOST,
    port: 0,
    framing,
    logger: quiet,
    ...options,
  });
  const conn = await Deno.connect({ hostname: HOST, port: portOf(server.addr) });
  try {
    await within(20_000, body(conn, server), "the exchange");
  } finally {
    conn.close();
    await server.stop("normal", { timeout: 2000 });
  }
}

Deno.test("lent frames are views of the bytes given, and lend must be a boolean", () => {
  const bytes = wireOf([new Uint8Array([1, 2]), new Uint8Array([3])], 2);
  const frames = decodeFrames(lengthPrefixed(2, { lend: true }), bytes);
  assert.deepEqual(frames, [new Uint8Array([1, 2]), new Uint8Array([3])]);
  assert.ok(frames.every((f) => f.buffer === bytes.buffer));
  const owned = decodeFrames(lengthPrefixed(2), bytes);
  assert.ok(owned.every((f) => f.buffer !== bytes.buffer));
  const chunk = new Uint8Array([9, 8]);
  assert.equal(decodeFrames(raw({ lend: true }), chunk)[0].buffer, chunk.buffer);
  assert.notEqual(decodeFrames(raw(), chunk)[0].buffer, chunk.buffer);
  assert.throws(() => raw({ lend: 1 as unknown as boolean }), TypeError);
  assert.throws(() => lengthPrefixed(4, { lend: "yes" as unknown as boolean }), TypeError);
});

for (const size of [64, 20 * 1024, 64 * 1024, 300 * 1024]) {
  Deno.test(`lent ${size}-byte frames are intact during their step, sent back as they came`, async () => {
    const count = 12;
    await withServer(
      async function* (): HandlerGenerator<Uint8Array> {
        for (let ev: Event<Uint8Array> = yield; ev.type === "packet";) {
          ev = yield send(ev.data); // sending copies: the frame may then be reused
        }
      },
      lengthPrefixed(4, { lend: true }),
      async (conn) => {
        const frames = Array.from({ length: count }, (_, i) => payload(size, i));
        // All at once: several frames per read, frames across reads, the big-frame memory reused.
        const writing = writeAll(conn, wireOf(frames));
        const back = await readExactly(conn, count * (4 + size));
        await writing;
        assert.deepEqual(back, wireOf(frames));
      },
    );
  });
}

Deno.test("large lent frames sent back to a slow reader stay intact (written from the read memory)", async () => {
  const size = 64 * 1024;
  const count = 160; // 10 MiB: more than the sockets buffer, so writes stay under way
  await withServer(
    async function* (): HandlerGenerator<Uint8Array> {
      for (let ev: Event<Uint8Array> = yield; ev.type === "packet";) ev = yield send(ev.data);
    },
    lengthPrefixed(4, { lend: true }),
    async (conn) => {
      const frames = Array.from({ length: count }, (_, i) => payload(size, i + 50));
      const wire = wireOf(frames);
      const writing = writeAll(conn, wire);
      // Nothing is read at first: the server's writes fill the socket and stay under way while
      // more frames wait for it to read them (a pacing pause, not a sync).
      await new Promise((resolve) => setTimeout(resolve, 300));
      const back = await readExactly(conn, wire.length);
      await writing;
      for (let i = 0; i < count; i++) {
        const at = i * (4 + size);
        assert.deepEqual(
          back.subarray(at, at + 4 + size),
          wire.subarray(at, at + 4 + size),
          `frame ${i}`,
        );
      }
    },
  );
});

Deno.test("with highWaterMark 8, lent frames stay intact until their step", async () => {
  const checked = new Inbox<boolean>();
  await withServer(
    async function* (): HandlerGenerator<Uint8Array> {
      for (let ev: Event<Uint8Array> = yield; ev.type === "packet"; ev = yield) {
        const seq = ev.data[0];
        await new Promise((resolve) => setTimeout(resolve, 5)); // slow: reads could run ahead
        checked.push(ev.data.length === 100 && ev.data.every((b) => b === seq));
      }
    },
    lengthPrefixed(4, { lend: true }),
    async (conn) => {
      const frames = Array.from({ length: 40 }, (_, seq) => new Uint8Array(100).fill(seq));
      // Small writes, each read well under the read buffer (so it is read into again) while
      // frames of earlier reads still wait for the handler.
      for (let i = 0; i < frames.length; i += 4) {
        await writeAll(conn, wireOf(frames.slice(i, i + 4)));
        await new Promise((resolve) => setTimeout(resolve, 2)); // (pacing, not a sync)
      }
      for (let i = 0; i < frames.length; i++) {
        assert.equal(await checked.next(), true, `frame ${i}`);
      }
    },
    { highWaterMark: 8 },
  );
});

Deno.test("in passive mode, a lent frame is intact until the next recv", async () => {
  const got = new Inbox<string>();
  const text = new TextDecoder();
  await withServer(
    async function* (): HandlerGenerator<Uint8Array> {
      for (let ev: Event<Uint8Array> = yield recv(); ev.type === "packet"; ev = yield recv()) {
        got.push(text.decode(ev.data));
      }
    },
    lengthPrefixed(1, { lend: true }),
    async (conn) => {
      const encode = (s: string) => new TextEncoder().encode(s);
      await writeAll(conn, wireOf([encode("one"), encode("two"), encode("three")], 1));
      assert.equal(await got.next(), "one");
      assert.equal(await got.next(), "two");
      assert.equal(await got.next(), "three");
    },
    { mode: "passive" },
  );
});

Deno.test("a lent frame kept without slice() is overwritten by later input; a slice() is not", async () => {
  const seen = new Inbox<{ kept: string; sliced: string; now: string }>();
  const text = new TextDecoder();
  for (
    const [name, framing, wire] of [
      ["lengthPrefixed", lengthPrefixed(4, { lend: true }), (s: string) => wireOf([enc(s)])],
      ["raw", raw({ lend: true }), enc],
    ] as const
  ) {
    await withServer(
      async function* (): HandlerGenerator<Uint8Array> {
        let ev: Event<Uint8Array> = yield;
        if (ev.type !== "packet") return;
        const kept = ev.data; // kept across the yield without slice(): a contract violation
        const sliced = ev.data.slice();
        ev = yield send(enc("ok"));
        if (ev.type !== "packet") return;
        seen.push({
          kept: text.decode(kept),
          sliced: text.decode(sliced),
          now: text.decode(ev.data),
        });
      },
      framing,
      async (conn) => {
        await writeAll(conn, wire("first"));
        await readExactly(conn, name === "raw" ? 2 : 6); // the step is over
        await writeAll(conn, wire("later"));
        const { kept, sliced, now } = await seen.next();
        assert.equal(now, "later");
        assert.equal(sliced, "first", name);
        // The kept view shows the bytes read after it: the memory was read into again.
        assert.equal(kept, "later", name);
      },
    );
  }
});

Deno.test("a large lent frame kept without slice() is overwritten by the next large frame", async () => {
  const size = 64 * 1024;
  const result = new Inbox<{ keptIsSecond: boolean; slicedIsFirst: boolean }>();
  await withServer(
    async function* (): HandlerGenerator<Uint8Array> {
      let ev: Event<Uint8Array> = yield;
      if (ev.type !== "packet") return;
      const kept = ev.data;
      const sliced = ev.data.slice();
      ev = yield send(enc("ok"));
      if (ev.type !== "packet") return;
      const second = ev.data.slice();
      const first = payload(size, 1);
      result.push({
        keptIsSecond: kept.every((b, i) => b === second[i]),
        slicedIsFirst: sliced.every((b, i) => b === first[i]),
      });
    },
    lengthPrefixed(4, { lend: true }),
    async (conn) => {
      // Header and payload in separate writes: the frame spans reads and is read in place.
      for (const seed of [1, 2]) {
        await writeAll(conn, wireOf([payload(size, seed)]).subarray(0, 100));
        await new Promise((resolve) => setTimeout(resolve, 20)); // (a pacing pause, not a sync)
        await writeAll(conn, wireOf([payload(size, seed)]).subarray(100));
        if (seed === 1) await readExactly(conn, 6);
      }
      const { keptIsSecond, slicedIsFirst } = await result.next();
      assert.ok(slicedIsFirst);
      assert.ok(keptIsSecond, "the kept view reads the next large frame");
    },
  );
});

function enc(s: string): Uint8Array {
  return new TextEncoder().encode(s);
}
