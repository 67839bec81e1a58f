// The memory transport on its own: several listeners on one name (reusePort), and what each
// side of a socket pair sees when one side closes. Where TCP has an answer, the same scenario
// runs over tcp() on 127.0.0.1 and memory must give the same outcomes.

import assert from "node:assert/strict";
import {
  type Conn,
  connect,
  type Event,
  type Listener,
  memory,
  send,
  serve,
  tcp,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { HOST, tracked, within } from "./_support.ts";

const WAIT_MS = 5000;

/** A handler's generator, over frames of bytes (the default framing). */
type Bytes = AsyncGenerator<Yielded, void, Event<Uint8Array>>;

let names = 0;
function fresh(label: string): Transport {
  return memory(`memory-transport-test-${label}-${++names}`);
}

/** How a promise ends: `value <v>`, or the name of the error class it rejects with. */
function outcome(p: Promise<unknown>): Promise<string> {
  return p.then((v) => `value ${v}`, (e: Error) => e.name);
}

/** What a synchronous call does: `ok`, or the name of the error class it throws. */
function thrown(f: () => unknown): string {
  try {
    f();
    return "ok";
  } catch (err) {
    return (err as Error).name;
  }
}

/** A listener of `transport` and a connected pair: `client` and `server`, the accepted side. */
async function pair(transport: Transport): Promise<{
  listener: Listener;
  client: Conn;
  server: Conn;
  connectAgain(): Promise<Conn>;
}> {
  const listener = await transport.listen({ hostname: HOST, port: 0 });
  const port = "port" in listener.addr ? listener.addr.port : undefined;
  const connectAgain = () => transport.connect({ hostname: HOST, port });
  const [client, server] = await within(WAIT_MS, Promise.all([connectAgain(), listener.accept()]));
  return { listener, client, server, connectAgain };
}

/**
 * Writes 1 MiB chunks to `conn` until a write fails (its peer never reads): `ended` is how
 * that ended. `full` resolves once the peer's buffers are known full, so that the next write
 * stalls: at once for memory (1 MiB is more than its 64 KiB buffer), after a partial write
 * for TCP.
 */
function writeUntilBroken(conn: Conn, transport: Transport): {
  ended: Promise<string>;
  full: Promise<void>;
} {
  const full = Promise.withResolvers<void>();
  if (transport.name === "memory") full.resolve();
  const chunk = new Uint8Array(1 << 20);
  const ended = (async () => {
    for (;;) {
      const n = await conn.write(chunk);
      if (n < chunk.length) full.resolve();
    }
  })();
  return { ended: outcome(ended), full: full.promise };
}

/** Reads until end of stream or an error; how it ended. */
async function readToEnd(conn: Conn): Promise<string> {
  const buf = new Uint8Array(1 << 16);
  for (;;) {
    let n: number | null;
    try {
      n = await conn.read(buf);
    } catch (err) {
      return (err as Error).name;
    }
    if (n === null) return "eof";
  }
}

function closeAll(...conns: Array<{ close(): void }>): void {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed by the test */ }
  }
}

// ---- Several listeners on one name ----------------------------------------------------------

Deno.test("memory: closing one of several listeners rejects its own pending accept, and the next client goes to a live one", async () => {
  const transport = fresh("reuse");
  const first = await transport.listen({ reusePort: true });
  const second = await transport.listen({ reusePort: true });
  const firstAccept = outcome(first.accept());
  const secondAccept = second.accept();
  first.close(); // not the last listener on the name
  assert.equal(await within(WAIT_MS, firstAccept, "first accept"), "BadResource");

  const client = await transport.connect({});
  const server = await within(WAIT_MS, secondAccept, "second accept");
  await client.write(new Uint8Array([7]));
  const buf = new Uint8Array(1);
  assert.equal(await server.read(buf), 1);
  assert.equal(buf[0], 7);
  closeAll(client, server, second);
});

Deno.test("memory: listeners behave as TCP ones: accept after close, double close, a second accept, the name in use", async () => {
  const transport = fresh("listener");
  const listener = await transport.listen({});
  const accepting = tracked(listener.accept());
  assert.equal(await outcome(listener.accept()), "Busy"); // one accept at a time, as Deno's
  assert.equal(thrown(() => transport.listen({})), "AddrInUse");
  assert.equal(thrown(() => transport.listen({ reusePort: true })), "AddrInUse"); // not shared
  listener.close();
  assert.equal(await within(WAIT_MS, outcome(accepting.promise)), "BadResource");
  assert.equal(await outcome(listener.accept()), "BadResource");
  assert.equal(thrown(() => listener.close()), "BadResource");
  assert.equal(await outcome(transport.connect({})), "ConnectionRefused");
});

Deno.test("memory: a server stops while another server shares its name, and that one serves the next client", async () => {
  const name = `memory-transport-test-servers-${++names}`;
  const transport = memory(name);
  const greeter = (greeting: string) =>
    async function* (): Bytes {
      yield send(new TextEncoder().encode(greeting));
    };
  const one = await serve(greeter("one"), { transport, reusePort: true });
  const two = await serve(greeter("two"), { transport, reusePort: true });
  try {
    await within(WAIT_MS, one.stop(), "stop of the first server");
    const got = Promise.withResolvers<string>();
    const client = await connect(async function* (): Bytes {
      const ev = yield;
      if (ev.type === "packet") got.resolve(new TextDecoder().decode(ev.data));
      else got.reject(new Error(`got ${ev.type}`));
    }, { transport });
    assert.equal(await within(WAIT_MS, got.promise, "greeting"), "two");
    await within(WAIT_MS, client.stop());
  } finally {
    await within(WAIT_MS, two.stop(), "stop of the second server");
    await within(WAIT_MS, one.stop());
  }
});

// ---- Closing: memory against TCP ----------------------------------------------------------

const transports: Array<[string, () => Transport]> = [
  ["tcp", () => tcp()],
  ["memory", () => fresh("close")],
];

/** The side that closes: its own pending read and stalled write, and calls after the close. */
async function closerScenario(transport: Transport): Promise<Record<string, string>> {
  const { listener, client: a, server: b } = await pair(transport);
  try {
    const reading = outcome(a.read(new Uint8Array(16))); // b sends nothing
    const writer = writeUntilBroken(a, transport); // b reads nothing yet
    await within(WAIT_MS, writer.full, "buffers full");
    a.close();
    return {
      "own pending read": await within(WAIT_MS, reading),
      "own stalled write": await within(WAIT_MS, writer.ended),
      "read after close": await outcome(a.read(new Uint8Array(16))),
      "write after close": await outcome(a.write(new Uint8Array(1))),
      "closeWrite after close": await outcome(a.closeWrite()),
      "close again": thrown(() => a.close()),
      "peer reads": await within(WAIT_MS, readToEnd(b), "peer reading to the end"),
    };
  } finally {
    closeAll(a, b, listener);
  }
}

/** The peer of the side that closes: its stalled write and its pending read. */
async function peerScenario(transport: Transport): Promise<Record<string, string>> {
  const { listener, client: a, server: b } = await pair(transport);
  try {
    const writer = writeUntilBroken(b, transport); // a never reads: it closes with bytes unread
    const reading = outcome(b.read(new Uint8Array(16))); // a sends nothing
    await within(WAIT_MS, writer.full, "buffers full");
    a.close();
    return {
      "peer's stalled write": await within(WAIT_MS, writer.ended),
      "peer's pending read": await within(WAIT_MS, reading),
      "peer's next write": await within(WAIT_MS, outcome(b.write(new Uint8Array(1)))),
      "peer's next read": await within(WAIT_MS, outcome(b.read(new Uint8Array(16)))),
    };
  } finally {
    closeAll(a, b, listener);
  }
}

/** A client no one accepted when the listener closes (in TCP, a connection in the backlog). */
async function backlogScenario(transport: Transport): Promise<Record<string, string>> {
  const listener = await transport.listen({ hostname: HOST, port: 0 });
  const port = "port" in listener.addr ? listener.addr.port : undefined;
  const client = await within(WAIT_MS, transport.connect({ hostname: HOST, port }));
  try {
    const reading = outcome(client.read(new Uint8Array(16)));
    listener.close();
    return {
      "pending read": await within(WAIT_MS, reading),
      "next write": await within(WAIT_MS, outcome(client.write(new Uint8Array(1)))),
      "next read": await within(WAIT_MS, outcome(client.read(new Uint8Array(16)))),
    };
  } finally {
    closeAll(client);
  }
}

const expected = {
  closer: {
    "own pending read": "Interrupted",
    "own stalled write": "Interrupted",
    "read after close": "BadResource",
    "write after close": "BadResource",
    "closeWrite after close": "BadResource",
    "close again": "BadResource",
    "peer reads": "eof",
  },
  peer: {
    "peer's stalled write": "BrokenPipe",
    "peer's pending read": "value null",
    "peer's next write": "BrokenPipe",
    "peer's next read": "value null",
  },
  backlog: {
    "pending read": "ConnectionReset",
    "next write": "BrokenPipe",
    "next read": "value null",
  },
};

for (const [label, make] of transports) {
  // TCP is the reference: if Deno's TCP ever answers differently, these say so first.
  Deno.test(`${label}: the side that closes: its pending read and stalled write are Interrupted, later calls BadResource; the peer reads to the end`, async () => {
    assert.deepEqual(await closerScenario(make()), expected.closer);
  });

  Deno.test(`${label}: the peer of the side that closes: its stalled write and later writes fail with BrokenPipe, its reads end`, async () => {
    assert.deepEqual(await peerScenario(make()), expected.peer);
  });

  Deno.test(`${label}: a client not yet accepted when the listener closes reads ConnectionReset`, async () => {
    assert.deepEqual(await backlogScenario(make()), expected.backlog);
  });
}

Deno.test("memory: a side closes while both sides' writes are stalled: its own is Interrupted, its peer's fails with BrokenPipe", async () => {
  const transport = fresh("own-stall");
  const { listener, client: a, server: b } = await pair(transport);
  const aWrite = tracked(a.write(new Uint8Array(1 << 20))); // more than b's 64 KiB buffer
  const bWrite = tracked(b.write(new Uint8Array(1 << 20))); // more than a's
  a.close();
  assert.equal(await within(WAIT_MS, outcome(aWrite.promise)), "Interrupted");
  assert.equal(await within(WAIT_MS, outcome(bWrite.promise)), "BrokenPipe");
  closeAll(b, listener);
});

Deno.test("memory: the peer still reads what was sent before the close, then end of stream", async () => {
  const transport = fresh("drain");
  const { listener, client: a, server: b } = await pair(transport);
  await a.write(new Uint8Array([1, 2, 3]));
  a.close();
  const buf = new Uint8Array(8);
  assert.equal(await b.read(buf), 3);
  assert.deepEqual(buf.subarray(0, 3), new Uint8Array([1, 2, 3]));
  assert.equal(await b.read(buf), null);
  assert.equal(await outcome(b.write(new Uint8Array(1))), "BrokenPipe");
  closeAll(b, listener);
});
