// The Node peer: a hand-written `node:net` (or, with --tls, `node:tls`) echo
// of length-prefixed frames, what people would otherwise write in Node. Run it
// with Node, not Deno:
//
//   node bench/node_echo.mjs [--port 0] [--hostname 127.0.0.1] [--tls]
//     [--cert tests/fixtures/server.crt] [--key tests/fixtures/server.key]
//     [--max-frame 16777216]
//
// Frames are a 4-byte big-endian length, then that many bytes (the library's
// `lengthPrefixed(4)`). Each connection cuts what it reads into whole frames
// and hands each to a handler as one Buffer, the way a framed server would;
// the echo handler writes it back. The socket is corked while one read's
// frames are handled, so they go out in one write (as etcp writes one read's
// sends at once, and as bench/raw_echo.ts writes whole reads). A frame split
// across reads is kept until its last byte has come and then handed over as
// one Buffer (one copy: the handler sees a whole frame), so replies are
// byte-identical to what was sent, frame for frame. A length over --max-frame
// ends that connection alone. TCP_NODELAY is set on every connection, TLS ones
// included (Node can; Deno's TLS connections cannot).
//
// Prints `listening on HOST:PORT` once listening; SIGTERM or SIGINT exits 0.
import { readFileSync } from "node:fs";
import net from "node:net";
import process from "node:process";
import tls from "node:tls";

const HEADER = 4;
const FIXTURES = new URL("../tests/fixtures/", import.meta.url).pathname;
const USAGE = `usage: node bench/node_echo.mjs [--port 0] [--hostname 127.0.0.1] [--tls]
  [--cert ${FIXTURES}server.crt] [--key ${FIXTURES}server.key] [--max-frame 16777216]`;

/** Parses `--name value` and bare `--tls` into a copy of `defaults`. */
function parseArgs(args, defaults) {
  const out = { ...defaults };
  const fail = (msg) => {
    console.error(`${msg}\n\n${USAGE}`);
    process.exit(2);
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "-h" || arg === "--help") {
      console.log(USAGE);
      process.exit(0);
    }
    const name = arg.startsWith("--") ? arg.slice(2) : "";
    if (!(name in defaults)) fail(`unknown argument: ${arg}`);
    if (typeof defaults[name] === "boolean") {
      out[name] = true;
      continue;
    }
    const value = args[++i];
    if (value === undefined) fail(`--${name} needs a value`);
    if (typeof defaults[name] === "number") {
      out[name] = Number(value);
      if (value === "" || !Number.isInteger(out[name]) || out[name] < 0) {
        fail(`--${name} wants an integer >= 0, got ${value}`);
      }
    } else out[name] = value;
  }
  return out;
}

const opts = parseArgs(process.argv.slice(2), {
  port: 0,
  hostname: "127.0.0.1",
  tls: false,
  cert: `${FIXTURES}server.crt`,
  key: `${FIXTURES}server.key`,
  "max-frame": 16 * 1024 * 1024,
});
const MAX_FRAME = opts["max-frame"];

/**
 * Cuts a byte stream into length-prefixed frames: `push(chunk)` calls
 * `onFrame` with each whole frame (header included: the echo sends it back
 * as is) and keeps an incomplete tail for the next chunk. Frames within one
 * chunk are views of it; a frame split across chunks is joined into one
 * Buffer once complete. Returns false on a length over MAX_FRAME.
 */
class FrameCutter {
  /** Chunks of the frame being assembled, and their total length. */
  #parts = [];
  #have = 0;
  /** Bytes of that frame with its header, once the header is known (else 0). */
  #need = 0;

  constructor(onFrame) {
    this.onFrame = onFrame;
  }

  push(chunk) {
    if (this.#have > 0) {
      this.#parts.push(chunk);
      this.#have += chunk.length;
      if (this.#need === 0 && this.#have >= HEADER) {
        const head = this.#parts.length === 1 ? this.#parts[0] : Buffer.concat(this.#parts);
        this.#parts = [head];
        const len = head.readUInt32BE(0);
        if (len > MAX_FRAME) return false;
        this.#need = HEADER + len;
      }
      if (this.#need === 0 || this.#have < this.#need) return true;
      chunk = Buffer.concat(this.#parts, this.#have);
      this.#parts = [];
      this.#have = this.#need = 0;
    }
    // `chunk` starts at a frame boundary.
    let at = 0;
    while (chunk.length - at >= HEADER) {
      const len = chunk.readUInt32BE(at);
      if (len > MAX_FRAME) return false;
      const end = at + HEADER + len;
      if (end > chunk.length) break;
      this.onFrame(at === 0 && end === chunk.length ? chunk : chunk.subarray(at, end));
      at = end;
    }
    if (at < chunk.length) {
      const rest = chunk.subarray(at);
      this.#parts.push(rest);
      this.#have = rest.length;
      if (this.#have >= HEADER) this.#need = HEADER + rest.readUInt32BE(0);
    }
    return true;
  }
}

// The load client ends by closing (or resetting) its sockets mid-stream: the
// normal end of a connection here, anything else is worth a line.
const PEER_GONE = new Set(["ECONNRESET", "EPIPE", "ECONNABORTED"]);

function onConnection(socket) {
  socket.setNoDelay(true);
  const cutter = new FrameCutter((frame) => socket.write(frame));
  socket.on("data", (chunk) => {
    socket.cork();
    const ok = cutter.push(chunk);
    socket.uncork();
    if (!ok) {
      console.error("node_echo: frame longer than --max-frame, closing the connection");
      socket.destroy();
    }
  });
  socket.on("error", (e) => {
    if (!PEER_GONE.has(e.code)) console.error("node_echo:", e.message);
  });
  socket.on("end", () => socket.end());
}

const server = opts.tls
  ? tls.createServer(
    { cert: readFileSync(opts.cert), key: readFileSync(opts.key) },
    onConnection,
  )
  : net.createServer(onConnection);
// A TLS connection whose client leaves mid-handshake is not this server's problem.
server.on("tlsClientError", () => {});
server.on("error", (e) => {
  console.error(`node_echo: cannot listen on ${opts.hostname}:${opts.port}: ${e.message}`);
  process.exit(1);
});
server.listen({ port: opts.port, host: opts.hostname }, () => {
  const { address, port } = server.address();
  console.log(`listening on ${address}:${port}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
