// The TLS baseline: a hand-written Deno.listenTls byte echo, what `tls()` is
// measured against. As bench/raw_echo.ts, it writes whole reads back, so it
// needs no framing at all.
//
//   deno run -A bench/raw_tls_echo.ts [--port 0] [--hostname 127.0.0.1]
//     [--cert tests/fixtures/server.crt] [--key tests/fixtures/server.key]
//
// The default certificate is the test fixture (for localhost, 127.0.0.1 and
// ::1, signed by tests/fixtures/ca.crt). The handshake happens on the first
// read, per connection, off the accept loop. Deno's TLS connections have no
// setNoDelay: Nagle stays on, as it does for every Deno TLS server.
import { isPeerGone, parseFlags, serveEchoes, writeAll } from "./_common.ts";

const FIXTURES = new URL("../tests/fixtures/", import.meta.url).pathname;
const USAGE = `usage: deno run -A bench/raw_tls_echo.ts [--port 0] [--hostname 127.0.0.1]
  [--cert ${FIXTURES}server.crt] [--key ${FIXTURES}server.key]`;
const opts = parseFlags(
  Deno.args,
  {
    port: 0,
    hostname: "127.0.0.1",
    cert: `${FIXTURES}server.crt`,
    key: `${FIXTURES}server.key`,
  },
  USAGE,
);
const BIG = 64 * 1024;

async function echo(conn: Deno.Conn) {
  const buf = new Uint8Array(BIG);
  for (let n; (n = await conn.read(buf)) !== null;) {
    await writeAll(conn, buf.subarray(0, n));
  }
}

// Over TLS the peer also goes with or without a close_notify.
function isTlsPeerGone(e: unknown): boolean {
  return isPeerGone(e) || e instanceof Deno.errors.UnexpectedEof ||
    (e instanceof Error && /peer closed connection|close_notify|unexpected eof/i.test(e.message));
}

const listener = Deno.listenTls({
  port: opts.port,
  hostname: opts.hostname,
  cert: Deno.readTextFileSync(opts.cert),
  key: Deno.readTextFileSync(opts.key),
});
await serveEchoes(listener, "raw_tls_echo", echo, isTlsPeerGone);
