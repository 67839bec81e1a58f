// The baseline: a hand-written Deno.listen byte echo, what the framework is
// measured against. It echoes whole reads, so it needs no framing at all.
//
//   deno run -A bench/raw_echo.ts [--port 0] [--hostname 127.0.0.1] [--park N]
//
// --park 65536 (default): each connection loops read → write on its own 64 KiB
// buffer, and an idle connection sits in a read on that buffer.
// --park N (< 65536): an idle connection sits in a read on an N-byte buffer;
// once a byte arrives it is echoed, the rest of the burst is taken with one
// read on a 64 KiB buffer borrowed from a small shared free list, and the
// connection parks again. --park 1 is the idle-memory baseline for
// hibernation.
import { parseFlags, serveEchoes, writeAll } from "./_common.ts";

const USAGE =
  "usage: deno run -A bench/raw_echo.ts [--port 0] [--hostname 127.0.0.1] [--park 65536|1]";
const opts = parseFlags(
  Deno.args,
  { port: 0, hostname: "127.0.0.1", park: 65536 },
  USAGE,
);
const BIG = 64 * 1024;
if (!(opts.park >= 1)) {
  console.error(`--park must be at least 1\n\n${USAGE}`);
  Deno.exit(2);
}

async function echo(conn: Deno.Conn) {
  const buf = new Uint8Array(BIG);
  for (let n; (n = await conn.read(buf)) !== null;) {
    await writeAll(conn, buf.subarray(0, n));
  }
}

// Big buffers of bursts in progress come back here: a fresh 64 KiB per wake
// would leave megabytes of garbage in the RSS that idle.ts measures.
const freeBuffers: Uint8Array[] = [];
const KEEP_FREE = 16;

async function parkedEcho(conn: Deno.Conn) {
  const small = new Uint8Array(opts.park);
  for (let n; (n = await conn.read(small)) !== null;) {
    await writeAll(conn, small.subarray(0, n));
    // A frame usually follows its first byte at once: take it in one read.
    const big = freeBuffers.pop() ?? new Uint8Array(BIG);
    try {
      if ((n = await conn.read(big)) === null) return;
      await writeAll(conn, big.subarray(0, n));
    } finally {
      if (freeBuffers.length < KEEP_FREE) freeBuffers.push(big);
    }
  }
}

await serveEchoes(Deno.listen({ port: opts.port, hostname: opts.hostname }), "raw_echo", (conn) => {
  conn.setNoDelay(true);
  return (opts.park >= BIG ? echo : parkedEcho)(conn);
});
