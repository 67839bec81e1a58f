// The PROXY protocol (HAProxy's doc/proxy-protocol.txt, v1 and v2): parsing and encoding,
// serve(…, { proxyProtocol: true }) end to end (addresses, first data not lost, headers split
// byte by byte, every kind of bad header closing its own connection only), the option off, the
// proxyHeader option of connect(), and custom transports written from the Transport interface.
// Headers are built by hand here (not with the library's encoder) wherever the bytes matter.

import assert from "node:assert/strict";
import {
  type Addr,
  type Conn,
  connect,
  type Connection,
  encodeProxyHeader,
  type HandlerGenerator,
  lines,
  type Listener,
  memory,
  type MemoryAddr,
  parseProxyHeader,
  type ProxyHeader,
  ProxyHeaderError,
  type ProxyHeaderErrorKind,
  type ProxyHeaderInit,
  readProxyHeader,
  send,
  serve,
  type ServeOptions,
  type Transport,
  unix,
  withProxyProtocol,
} from "../mod.ts";
import {
  capturingLogger,
  closeQuietly,
  concat,
  HOST,
  Inbox,
  portOf,
  readExactly,
  within,
  writeAll,
} from "./_support.ts";

const WAIT_MS = 5000;
const text = new TextEncoder();
const enc = (s: string) => text.encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

// ---- Hand-made headers ---------------------------------------------------------------------------

const SIG = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];

/** A v2 header: signature, version/command byte, family byte, length (default: the body's). */
function v2(verCmd: number, fam: number, body: number[], length = body.length): Uint8Array {
  return new Uint8Array([...SIG, verCmd, fam, length >> 8, length & 0xff, ...body]);
}

const be16 = (n: number) => [n >> 8, n & 0xff];
const tlv = (type: number, value: number[]) => [type, ...be16(value.length), ...value];
const ascii = (s: string) => Array.from(enc(s));
/** A 108-byte AF_UNIX address field. */
const unixField = (path: string) => [...ascii(path), ...new Array(108 - path.length).fill(0)];

// TCP over IPv4: 192.0.2.1:56324 -> 198.51.100.2:443
const TCP4_BLOCK = [192, 0, 2, 1, 198, 51, 100, 2, ...be16(56324), ...be16(443)];
// TCP over IPv6: 2001:db8::1:4000 -> 2001:db8::2:443
const IP6_SRC = [0x20, 0x01, 0x0d, 0xb8, ...new Array(11).fill(0), 1];
const IP6_DST = [0x20, 0x01, 0x0d, 0xb8, ...new Array(11).fill(0), 2];
const TCP6_BLOCK = [...IP6_SRC, ...IP6_DST, ...be16(4000), ...be16(443)];

/** CRC32C, bit by bit (RFC 4960 appendix B), independent of the library's table. */
function crc32c(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (const b of bytes) {
    crc ^= b;
    for (let k = 0; k < 8; k++) crc = crc & 1 ? (crc >>> 1) ^ 0x82f63b78 : crc >>> 1;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

/** `header` (a v2 header ending with a 4-byte CRC32C TLV) with its checksum filled in. */
function withCrc(header: Uint8Array): Uint8Array {
  const out = header.slice();
  new DataView(out.buffer).setUint32(out.length - 4, crc32c(out));
  return out;
}

const tcp = (hostname: string, port: number): Deno.NetAddr => ({
  transport: "tcp",
  hostname,
  port,
});

// ---- A proxyProtocol line-echo server ------------------------------------------------------------

interface Seen {
  remote: Addr;
  local: Addr;
  proxy: ProxyHeader | undefined;
  line: string;
}

async function* reporter(
  conn: Connection<string>,
  seen: Inbox<Seen>,
): HandlerGenerator<string> {
  let ev = yield;
  while (ev.type === "packet") {
    seen.push({
      remote: conn.remoteAddr,
      local: conn.localAddr,
      proxy: conn.proxy,
      line: ev.data,
    });
    ev = yield send(`echo ${ev.data}`);
  }
}

/** A lines() server with `options` whose handler, {@linkcode reporter}, reports to `seen`. */
async function reportingServer(options: Partial<ServeOptions<string>>) {
  const seen = new Inbox<Seen>(WAIT_MS);
  const server = await serve((conn: Connection<string>) => reporter(conn, seen), {
    framing: lines(),
    ...options,
  });
  return { server, seen };
}

async function proxyServer(handshakeTimeout = 10_000) {
  const logger = capturingLogger();
  const { server, seen } = await reportingServer({
    hostname: HOST,
    port: 0,
    proxyProtocol: true,
    handshakeTimeout,
    logger,
  });
  return { server, seen, logger, port: portOf(server.addr) };
}

/** Runs `body` against a fresh {@linkcode proxyServer}, stopped afterwards. */
async function withProxyServer(
  body: (proxy: Awaited<ReturnType<typeof proxyServer>>) => Promise<void>,
  handshakeTimeout?: number,
): Promise<void> {
  const proxy = await proxyServer(handshakeTimeout);
  try {
    await body(proxy);
  } finally {
    await proxy.server.stop();
  }
}

/** Runs `body` with a raw TCP connection to `port`, closed afterwards. */
async function withRawConn(
  port: number,
  body: (conn: Deno.TcpConn) => Promise<void>,
): Promise<void> {
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    await body(conn);
  } finally {
    conn.close();
  }
}

/** Over a raw TCP connection: write `bytes`, read the echo of `line`. */
async function exchange(conn: Deno.Conn, bytes: Uint8Array, line: string): Promise<string> {
  await writeAll(conn, bytes);
  const want = `echo ${line}\n`;
  return dec(await within(WAIT_MS, readExactly(conn, want.length), `echo of ${line}`));
}

/** Opens a raw connection, sends `bytes` (`end`: then closes its writing side), and checks
 *  that the server closes the connection. */
async function assertClosedAfter(port: number, bytes: Uint8Array, end = false): Promise<void> {
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    const peerGone = (err: unknown) =>
      err instanceof Deno.errors.ConnectionReset || err instanceof Deno.errors.BrokenPipe;
    try {
      if (bytes.length > 0) await writeAll(conn, bytes);
      if (end) await conn.closeWrite();
    } catch (err) {
      if (!peerGone(err)) throw err; // closed already, early: fine
    }
    const n = await within(
      WAIT_MS,
      conn.read(new Uint8Array(64)).catch((err) => {
        if (peerGone(err)) return null;
        throw err;
      }),
      "the server closes the connection",
    );
    assert.equal(n, null, "the server sent nothing and closed");
  } finally {
    closeQuietly(conn);
  }
}

// ---- Parsing ---------------------------------------------------------------------------------------

Deno.test("proxy parse: v1 TCP4, TCP6 and UNKNOWN lines; every prefix asks for more", () => {
  const cases: Array<[string, Partial<ProxyHeader>]> = [
    [
      "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
      { source: tcp("192.0.2.1", 56324), destination: tcp("198.51.100.2", 443) },
    ],
    [
      "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", // the longest TCP4 line
      { source: tcp("255.255.255.255", 65535), destination: tcp("255.255.255.255", 65535) },
    ],
    [
      "PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n",
      { source: tcp("0.0.0.0", 0), destination: tcp("10.0.0.1", 0) },
    ],
    [
      // Written as Deno writes IPv6 addresses: lower case, "::", IPv4-mapped dotted.
      "PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:c000:205 4000 443\r\n",
      { source: tcp("2001:db8::1", 4000), destination: tcp("::ffff:192.0.2.5", 443) },
    ],
    [
      "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 1 2\r\n",
      { source: tcp("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1), destination: tcp("::1", 2) },
    ],
    ["PROXY UNKNOWN\r\n", {}],
    // UNKNOWN: whatever follows, up to the CRLF, is ignored (the 107-byte worst case).
    [
      `PROXY UNKNOWN ${"ffff:".repeat(7)}ffff ${"ffff:".repeat(7)}ffff 65535 65535\r\n`,
      {},
    ],
  ];
  for (const [line, want] of cases) {
    const bytes = enc(`${line}after`);
    const length = line.length;
    assert.ok(length <= 107, line);
    for (let n = 0; n < length; n++) {
      assert.equal(parseProxyHeader(bytes.subarray(0, n)), null, `${line.trim()}: ${n} bytes`);
    }
    const parsed = parseProxyHeader(bytes);
    assert.ok(parsed, line);
    assert.equal(parsed.length, length);
    assert.deepEqual(parsed.header, { version: 1, command: "PROXY", tlvs: [], ...want });
  }
});

Deno.test("proxy parse: v2 TCP4, TCP6, UDP, UNIX, LOCAL, UNSPEC and TLVs", () => {
  const tlvs = [
    ...tlv(0x01, ascii("h2")), // ALPN
    ...tlv(0x02, ascii("example.com")), // AUTHORITY
    ...tlv(0x04, [0, 0, 0]), // NOOP
    ...tlv(0x05, new Array(16).fill(7)), // UNIQUE_ID
    ...tlv(0x20, [0x01, 0, 0, 0, 0, ...tlv(0x21, ascii("TLSv1.3"))]), // SSL with a sub-TLV
    ...tlv(0xe0, [1, 2, 3]), // application-specific
  ];
  const rawTlvs = [
    { type: 0x01, value: enc("h2") },
    { type: 0x02, value: enc("example.com") },
    { type: 0x04, value: new Uint8Array(3) },
    { type: 0x05, value: new Uint8Array(16).fill(7) },
    { type: 0x20, value: new Uint8Array([0x01, 0, 0, 0, 0, ...tlv(0x21, ascii("TLSv1.3"))]) },
    { type: 0xe0, value: new Uint8Array([1, 2, 3]) },
  ];
  const crcHeader = withCrc(v2(0x21, 0x11, [...TCP4_BLOCK, ...tlv(0x03, [0, 0, 0, 0])]));
  const cases: Array<[string, Uint8Array, ProxyHeader]> = [
    ["TCP4", v2(0x21, 0x11, TCP4_BLOCK), {
      version: 2,
      command: "PROXY",
      source: tcp("192.0.2.1", 56324),
      destination: tcp("198.51.100.2", 443),
      tlvs: [],
    }],
    ["TCP6 with TLVs", v2(0x21, 0x21, [...TCP6_BLOCK, ...tlvs]), {
      version: 2,
      command: "PROXY",
      source: tcp("2001:db8::1", 4000),
      destination: tcp("2001:db8::2", 443),
      tlvs: rawTlvs,
    }],
    ["UDP over IPv4", v2(0x21, 0x12, TCP4_BLOCK), {
      version: 2,
      command: "PROXY",
      source: { transport: "udp", hostname: "192.0.2.1", port: 56324 },
      destination: { transport: "udp", hostname: "198.51.100.2", port: 443 },
      tlvs: [],
    }],
    ["UNIX stream", v2(0x21, 0x31, [...unixField("/run/c.sock"), ...unixField("/run/s.sock")]), {
      version: 2,
      command: "PROXY",
      source: { transport: "unix", path: "/run/c.sock" },
      destination: { transport: "unix", path: "/run/s.sock" },
      tlvs: [],
    }],
    ["UNIX datagram", v2(0x21, 0x32, [...unixField("/a"), ...unixField("/b")]), {
      version: 2,
      command: "PROXY",
      source: { transport: "unixpacket", path: "/a" },
      destination: { transport: "unixpacket", path: "/b" },
      tlvs: [],
    }],
    // LOCAL: no addresses, whatever the block says (its length is still skipped); TLVs kept.
    ["LOCAL", v2(0x20, 0x00, []), { version: 2, command: "LOCAL", tlvs: [] }],
    ["LOCAL with an address block", v2(0x20, 0x11, [...TCP4_BLOCK, ...tlv(0xe1, [9])]), {
      version: 2,
      command: "LOCAL",
      tlvs: [{ type: 0xe1, value: new Uint8Array([9]) }],
    }],
    // LOCAL with a family that does not fit its block, or one unknown: the spec says the family is
    // ignored and the block discarded (a health check is accepted whatever it says there).
    ["LOCAL, TCP4 and no block", v2(0x20, 0x11, []), { version: 2, command: "LOCAL", tlvs: [] }],
    ["LOCAL, unknown family", v2(0x20, 0x41, [1, 2, 3]), {
      version: 2,
      command: "LOCAL",
      tlvs: [],
    }],
    ["PROXY UNSPEC", v2(0x21, 0x00, tlv(0x02, ascii("h"))), {
      version: 2,
      command: "PROXY",
      tlvs: [{ type: 0x02, value: enc("h") }],
    }],
    ["CRC32C", crcHeader, {
      version: 2,
      command: "PROXY",
      source: tcp("192.0.2.1", 56324),
      destination: tcp("198.51.100.2", 443),
      tlvs: [{ type: 0x03, value: crcHeader.slice(-4) }],
    }],
  ];
  for (const [label, header, want] of cases) {
    const bytes = concat([header, enc("data")]);
    for (let n = 0; n < header.length; n++) {
      assert.equal(parseProxyHeader(bytes.subarray(0, n)), null, `${label}: ${n} bytes`);
    }
    const parsed = parseProxyHeader(bytes);
    assert.ok(parsed, label);
    assert.equal(parsed.length, header.length, label);
    assert.deepEqual(parsed.header, want, label);
  }
  assert.equal(crc32c(enc("123456789")), 0xe3069283, "the test's own CRC32C is right");
});

/** Bad headers: label, bytes, kind, what the message says. `truncated` ones are complete
 *  prefixes: the parser waits for more, and the server sees the stream end. */
const BAD: Array<[string, Uint8Array, ProxyHeaderErrorKind, RegExp]> = [
  ["HTTP instead", enc("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "missing", /no PROXY protocol header/],
  ["TLS instead", new Uint8Array([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01]), "missing", /16 03 01/],
  ["PROXX", enc("PROXX TCP4\r\n"), "missing", /no PROXY protocol header/],
  [
    "v2 signature broken",
    new Uint8Array([...SIG.slice(0, 6), 0x00, ...SIG.slice(7)]),
    "missing",
    /no PROXY/,
  ],
  ["PROXY without its space", enc("PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n"), "malformed", /one space/],
  [
    "unknown protocol",
    enc("PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n"),
    "malformed",
    /unknown protocol "UDP4"/,
  ],
  [
    "TCP4 carrying IPv6",
    enc("PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n"),
    "malformed",
    /TCP4 header carries the IPv6 address "2001:db8::1"/,
  ],
  [
    "TCP6 carrying IPv4",
    enc("PROXY TCP6 2001:db8::1 192.0.2.1 1 2\r\n"),
    "malformed",
    /TCP6 header carries the IPv4 address "192.0.2.1"/,
  ],
  ["octet over 255", enc("PROXY TCP4 256.0.0.1 1.2.3.4 1 2\r\n"), "malformed", /not an IPv4/],
  [
    "octet with a leading zero",
    enc("PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n"),
    "malformed",
    /not an IPv4/,
  ],
  ["two ::", enc("PROXY TCP6 1::2::3 ::1 1 2\r\n"), "malformed", /not an IPv6/],
  ["port over 65535", enc("PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n"), "malformed", /port "65536"/],
  [
    "port with a leading zero",
    enc("PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n"),
    "malformed",
    /port "080"/,
  ],
  ["two spaces", enc("PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n"), "malformed", /one space apart/],
  ["field missing", enc("PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n"), "malformed", /one space apart/],
  ["LF alone", enc("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n"), "malformed", /LF without CR/],
  ["CR alone", enc("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX"), "malformed", /CR without LF/],
  [
    "no CRLF in 107 bytes",
    enc(`PROXY UNKNOWN ${"x".repeat(100)}`),
    "malformed",
    /no CRLF within the first 107/,
  ],
  ["v2 version 1", v2(0x11, 0x11, TCP4_BLOCK), "malformed", /version 1 in byte 13/],
  ["v2 command 2", v2(0x22, 0x11, TCP4_BLOCK), "malformed", /unknown command 2/],
  [
    "v2 family 4",
    v2(0x21, 0x41, TCP4_BLOCK),
    "malformed",
    /unknown address family and protocol 0x41/,
  ],
  ["v2 protocol 3", v2(0x21, 0x13, TCP4_BLOCK), "malformed", /0x13/],
  [
    "v2 IPv4 family, 8 address bytes",
    v2(0x21, 0x11, TCP4_BLOCK.slice(0, 8)),
    "malformed",
    /needs 12 address bytes, the header carries 8/,
  ],
  [
    "v2 IPv6 family, IPv4 addresses",
    v2(0x21, 0x21, TCP4_BLOCK),
    "malformed",
    /needs 36 address bytes, the header carries 12/,
  ],
  [
    "v2 UNIX family, IPv6 addresses",
    v2(0x21, 0x31, TCP6_BLOCK),
    "malformed",
    /needs 216 address bytes/,
  ],
  [
    // Refused from the fixed part alone, without waiting for the 16 bytes it announces.
    "v2 UNIX family, 16-byte length, nothing after",
    new Uint8Array([...SIG, 0x21, 0x31, 0x00, 0x10]),
    "malformed",
    /needs 216 address bytes, the header carries 16/,
  ],
  [
    "v2 TLV past the end",
    v2(0x21, 0x11, [...TCP4_BLOCK, 0x02, 0x00, 0x09, 1, 2]),
    "malformed",
    /runs 7 bytes past/,
  ],
  ["v2 stray bytes", v2(0x21, 0x11, [...TCP4_BLOCK, 0x02, 0x00]), "malformed", /2 stray bytes/],
  [
    "v2 CRC32C wrong",
    v2(0x21, 0x11, [...TCP4_BLOCK, ...tlv(0x03, [1, 2, 3, 4])]),
    "malformed",
    /CRC32C checksum 0x01020304 does not match/,
  ],
  [
    "v2 CRC32C of 2 bytes",
    v2(0x21, 0x11, [...TCP4_BLOCK, ...tlv(0x03, [1, 2])]),
    "malformed",
    /CRC32C TLV of 2 bytes/,
  ],
  [
    "v2 UNIQUE_ID of 129 bytes",
    v2(0x21, 0x00, tlv(0x05, new Array(129).fill(1))),
    "malformed",
    /UNIQUE_ID TLV of 129/,
  ],
  ["v1 cut short", enc("PROXY TCP4 192.0.2.1 19"), "truncated", /closed after 23 bytes/],
  [
    "v1 cut before LF",
    enc("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r"),
    "truncated",
    /closed after 31 bytes/,
  ],
  ["v2 cut in the fixed part", new Uint8Array(SIG), "truncated", /closed after 12 bytes/],
  [
    "v2 cut in the addresses",
    v2(0x21, 0x11, TCP4_BLOCK.slice(0, 4), 12),
    "truncated",
    /closed after 20 bytes/,
  ],
];

Deno.test("proxy parse: each kind of bad header throws a ProxyHeaderError that says what", () => {
  for (const [label, bytes, kind, message] of BAD) {
    if (kind === "truncated") {
      assert.equal(parseProxyHeader(bytes), null, `${label}: waits for more`);
      continue;
    }
    assert.throws(() => parseProxyHeader(bytes), (err: unknown) => {
      assert.ok(err instanceof ProxyHeaderError, label);
      assert.equal(err.name, "ProxyHeaderError");
      assert.equal(err.kind, kind, label);
      assert.match(err.message, message, label);
      return true;
    });
  }
});

// ---- Encoding --------------------------------------------------------------------------------------

Deno.test("proxy encode: the bytes of v1 and v2 headers, and parse reads them back", () => {
  const source = tcp("192.0.2.1", 56324);
  const destination = tcp("198.51.100.2", 443);
  assert.equal(
    dec(encodeProxyHeader({ version: 1, source, destination })),
    "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
  );
  assert.equal(
    dec(encodeProxyHeader({
      version: 1,
      source: tcp("2001:db8::1", 4000),
      destination: tcp("::ffff:192.0.2.5", 443),
    })),
    "PROXY TCP6 2001:db8::1 ::ffff:c000:205 4000 443\r\n", // hex groups only, as v1 says
  );
  assert.equal(dec(encodeProxyHeader({ version: 1 })), "PROXY UNKNOWN\r\n");
  assert.deepEqual(
    encodeProxyHeader({ version: 2, source, destination }),
    v2(0x21, 0x11, TCP4_BLOCK),
  );
  assert.deepEqual(
    encodeProxyHeader({
      version: 2,
      source: tcp("2001:db8::1", 4000),
      destination: tcp("2001:db8::2", 443),
      tlvs: [{ type: 0x01, value: enc("h2") }],
    }),
    v2(0x21, 0x21, [...TCP6_BLOCK, ...tlv(0x01, ascii("h2"))]),
  );
  assert.deepEqual(
    encodeProxyHeader({
      version: 2,
      source: { transport: "unix", path: "/run/c.sock" },
      destination: { transport: "unix", path: "/run/s.sock" },
    }),
    v2(0x21, 0x31, [...unixField("/run/c.sock"), ...unixField("/run/s.sock")]),
  );
  assert.deepEqual(encodeProxyHeader({ version: 2, command: "LOCAL" }), v2(0x20, 0x00, []));
  assert.deepEqual(encodeProxyHeader({ version: 2 }), v2(0x21, 0x00, []));
  assert.deepEqual(
    encodeProxyHeader({ version: 2, source, destination, crc32c: true }),
    withCrc(v2(0x21, 0x11, [...TCP4_BLOCK, ...tlv(0x03, [0, 0, 0, 0])])),
  );
  // A parsed header encodes back to the same bytes (a proxy passing it on).
  const header = v2(0x21, 0x21, [...TCP6_BLOCK, ...tlv(0xe0, [1]), ...tlv(0x02, ascii("a.b"))]);
  assert.deepEqual(encodeProxyHeader(parseProxyHeader(header)!.header), header);
});

Deno.test("proxy encode: what a header cannot say is a TypeError or RangeError naming it", () => {
  const four = tcp("192.0.2.1", 1);
  const six = tcp("2001:db8::1", 1);
  const unixAddr: Deno.UnixAddr = { transport: "unix", path: "/a" };
  const bad: Array<[ProxyHeaderInit, ErrorConstructor, RegExp]> = [
    [{ version: 3 as 2 }, RangeError, /version must be 1 or 2/],
    [{ version: 1, command: "LOCAL" }, RangeError, /version 1 has no LOCAL/],
    [{ version: 1, source: unixAddr, destination: unixAddr }, RangeError, /TCP addresses only/],
    [{ version: 1, tlvs: [{ type: 1, value: enc("x") }] }, RangeError, /carries no TLVs/],
    [{ version: 1, source: four, destination: six }, RangeError, /two address families/],
    [{ version: 2, source: four, destination: six }, RangeError, /two address families/],
    [{ version: 2, source: four }, TypeError, /both source and destination/],
    [{ version: 2, command: "LOCAL", source: four, destination: four }, TypeError, /no addresses/],
    [
      { version: 2, source: tcp("localhost", 1), destination: four },
      RangeError,
      /hostname "localhost" is not an IPv4 or IPv6 address/,
    ],
    [{ version: 2, source: tcp("1.2.3.4", 70000), destination: four }, RangeError, /port/],
    [{ version: 2, source: four, destination: unixAddr }, RangeError, /source is tcp/],
    [
      {
        version: 2,
        source: { transport: "unix", path: "x".repeat(109) },
        destination: unixAddr,
      },
      RangeError,
      /109 bytes/,
    ],
    [{ version: 2, tlvs: [{ type: 256, value: enc("") }] }, RangeError, /type must be 0 to 255/],
    [{ version: 2, tlvs: [{ type: 1, value: new Uint8Array(70000) }] }, RangeError, /70000 bytes/],
    [
      {
        version: 2,
        tlvs: [{ type: 1, value: new Uint8Array(40000) }, {
          type: 2,
          value: new Uint8Array(40000),
        }],
      },
      RangeError,
      /max 65535/,
    ],
  ];
  for (const [header, type, message] of bad) {
    assert.throws(() => encodeProxyHeader(header), (err: unknown) => {
      assert.ok(err instanceof type, `${JSON.stringify(header).slice(0, 80)}: ${err}`);
      assert.match((err as Error).message, message);
      return true;
    });
  }
});

// ---- serve(…, { proxyProtocol: true }) -------------------------------------------------------------

Deno.test("proxy serve: v1 and v2 headers set remoteAddr, localAddr and conn.proxy; the data after the header in the same packet is not lost", async () => {
  await withProxyServer(async ({ seen, port }) => {
    const cases: Array<[string, Uint8Array, Partial<ProxyHeader> | null]> = [
      ["v1 TCP4", enc("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"), {
        version: 1,
        source: tcp("192.0.2.1", 56324),
        destination: tcp("198.51.100.2", 443),
      }],
      ["v1 TCP6", enc("PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"), {
        version: 1,
        source: tcp("2001:db8::1", 4000),
        destination: tcp("2001:db8::2", 443),
      }],
      ["v1 UNKNOWN", enc("PROXY UNKNOWN\r\n"), null],
      ["v2 TCP4", v2(0x21, 0x11, TCP4_BLOCK), {
        version: 2,
        source: tcp("192.0.2.1", 56324),
        destination: tcp("198.51.100.2", 443),
      }],
      ["v2 TCP6", v2(0x21, 0x21, TCP6_BLOCK), {
        version: 2,
        source: tcp("2001:db8::1", 4000),
        destination: tcp("2001:db8::2", 443),
      }],
      ["v2 UNIX", v2(0x21, 0x31, [...unixField("/run/c.sock"), ...unixField("/run/s.sock")]), {
        version: 2,
        source: { transport: "unix", path: "/run/c.sock" },
        destination: { transport: "unix", path: "/run/s.sock" },
      }],
      ["v2 LOCAL", v2(0x20, 0x00, []), null],
      ["v2 UNSPEC", v2(0x21, 0x00, []), null],
    ];
    for (const [label, header, want] of cases) {
      await withRawConn(port, async (conn) => {
        // Header and first line in one write.
        assert.equal(
          await exchange(conn, concat([header, enc("hello\n")]), "hello"),
          "echo hello\n",
        );
        const got = await seen.next();
        assert.equal(got.line, "hello", label);
        assert.ok(got.proxy, label);
        if (want) {
          assert.deepEqual(got.remote, want.source, label);
          assert.deepEqual(got.local, want.destination, label);
          assert.equal(got.proxy.version, want.version, label);
          assert.equal(got.proxy.command, "PROXY", label);
          assert.deepEqual(got.proxy.source, want.source, label);
        } else {
          // LOCAL, UNKNOWN, UNSPEC: the socket's own addresses.
          assert.deepEqual(got.remote, conn.localAddr, label);
          assert.deepEqual(got.local, conn.remoteAddr, label);
          assert.equal(got.proxy.source, undefined, label);
          assert.equal(got.proxy.command, label === "v2 LOCAL" ? "LOCAL" : "PROXY", label);
        }
      });
    }
  });
});

Deno.test("proxy serve: v2 TLVs are on conn.proxy raw, a CRC32C checked", async () => {
  await withProxyServer(async ({ seen, port }) => {
    const header = withCrc(v2(0x21, 0x11, [
      ...TCP4_BLOCK,
      ...tlv(0x01, ascii("h2")),
      ...tlv(0x02, ascii("example.com")),
      ...tlv(0x20, [0x05, 0, 0, 0, 0, ...tlv(0x22, ascii("client-cn"))]),
      ...tlv(0x03, [0, 0, 0, 0]),
    ]));
    await withRawConn(port, async (conn) => {
      await exchange(conn, concat([header, enc("tlv\n")]), "tlv");
      const { proxy } = await seen.next();
      assert.deepEqual(proxy?.tlvs.map((t) => t.type), [0x01, 0x02, 0x20, 0x03]);
      assert.equal(dec(proxy!.tlvs[0].value), "h2");
      assert.equal(dec(proxy!.tlvs[1].value), "example.com");
      assert.deepEqual(
        proxy!.tlvs[2].value,
        new Uint8Array([0x05, 0, 0, 0, 0, ...tlv(0x22, ascii("client-cn"))]),
      );
      assert.deepEqual(proxy!.tlvs[3].value, header.slice(-4));
    });
  });
});

Deno.test("proxy serve: a header written byte by byte, then the data", async () => {
  await withProxyServer(async ({ seen, port }) => {
    for (
      const header of [
        enc("PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"),
        v2(0x21, 0x21, [...TCP6_BLOCK, ...tlv(0x02, ascii("example.com"))]),
      ]
    ) {
      await withRawConn(port, async (conn) => {
        conn.setNoDelay(true);
        for (let i = 0; i < header.length; i++) await conn.write(header.subarray(i, i + 1));
        assert.equal(await exchange(conn, enc("split\n"), "split"), "echo split\n");
        const got = await seen.next();
        assert.deepEqual(got.remote, tcp("2001:db8::1", 4000));
        assert.equal(got.line, "split");
      });
    }
  });
});

/**
 * A custom transport written from the documented Transport interface only: it wraps memory()
 * and hands the server's reads at most one byte each, so that a header always arrives byte by
 * byte. `reads` counts the server side's reads.
 */
function trickle(name: string): Transport<MemoryAddr> & { reads: number } {
  const base = memory(name);
  const wrap = (conn: Conn, count: () => void): Conn => ({
    get localAddr() {
      return conn.localAddr;
    },
    get remoteAddr() {
      return conn.remoteAddr;
    },
    read(p: Uint8Array) {
      count();
      return conn.read(p.subarray(0, Math.min(1, p.length)));
    },
    write: (p) => conn.write(p),
    closeWrite: () => conn.closeWrite(),
    close: () => conn.close(),
  });
  const transport = {
    name: "trickle",
    reads: 0,
    async listen(options: Parameters<Transport["listen"]>[0]): Promise<Listener<MemoryAddr>> {
      const listener = await base.listen(options);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        accept: async () => wrap(await listener.accept(), () => transport.reads++),
      };
    },
    connect: (options: Parameters<Transport["connect"]>[0]) => base.connect(options),
  };
  return transport;
}

Deno.test("proxy serve: over a custom transport that delivers one byte per read", async () => {
  const transport = trickle("proxy-test-trickle");
  const { server, seen } = await reportingServer({ transport, proxyProtocol: true });
  try {
    for (
      const [header, source] of [
        [enc("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"), tcp("192.0.2.1", 56324)],
        [v2(0x21, 0x31, [...unixField("/c"), ...unixField("/s")]), {
          transport: "unix",
          path: "/c",
        }],
      ] as const
    ) {
      const before = transport.reads;
      const client = await transport.connect({});
      try {
        await client.write(concat([header, enc("one\ntwo\n")])); // all at once
        const first = await seen.next();
        const second = await seen.next();
        assert.deepEqual([first.line, second.line], ["one", "two"]);
        assert.deepEqual(first.remote, source);
        assert.ok(transport.reads - before >= header.length, "the header came a byte at a time");
      } finally {
        client.close();
      }
    }
  } finally {
    await server.stop();
  }
});

Deno.test("proxy serve: every bad header, and none, closes that connection only", async () => {
  await withProxyServer(async ({ seen, logger, port }) => {
    await withRawConn(port, async (good) => {
      assert.equal(
        await exchange(
          good,
          concat([enc("PROXY TCP4 192.0.2.9 192.0.2.10 1000 25\r\n"), enc("a\n")]),
          "a",
        ),
        "echo a\n",
      );
      await seen.next();
      for (const [label, bytes, kind, message] of BAD) {
        const logged = logger.calls.length;
        await assertClosedAfter(port, bytes, kind === "truncated");
        const line = logger.calls.slice(logged).map((c) => c.join(" ")).join("\n");
        assert.match(line, /handshake failed: ProxyHeaderError/, label);
        assert.match(line, message, label);
      }
      // Connected, and nothing sent within handshakeTimeout: closed too.
      const logged = logger.calls.length;
      await assertClosedAfter(port, new Uint8Array(0));
      assert.match(logger.calls.slice(logged).join("\n"), /handshake timed out after 300 ms/);
      // Closed before sending anything.
      await assertClosedAfter(port, new Uint8Array(0), true);
      assert.match(logger.calls.at(-1)!.join(" "), /closed without sending a PROXY header/);

      // One debug line per bad peer, nothing louder; no handler ran for them.
      assert.deepEqual(new Set(logger.levels), new Set(["debug"]));
      assert.equal(logger.levels.length, BAD.length + 2);
      assert.equal(seen.size, 0);
      // The good connection goes on, and new ones are served.
      assert.equal(await exchange(good, enc("b\n"), "b"), "echo b\n");
      assert.deepEqual((await seen.next()).remote, tcp("192.0.2.9", 1000));
      await withRawConn(port, async (again) => {
        assert.equal(await exchange(again, enc("PROXY UNKNOWN\r\nc\n"), "c"), "echo c\n");
      });
    });
  }, 300);
});

Deno.test("proxy serve: stop() ends connections still waiting for their header", async () => {
  const { server, port } = await proxyServer();
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    await conn.write(enc("PROXY TCP4 1.2")); // never finished
    await within(WAIT_MS, server.stop(), "stop");
    const n = await within(WAIT_MS, conn.read(new Uint8Array(8)).catch(() => null));
    assert.equal(n, null);
  } finally {
    conn.close();
  }
});

Deno.test("proxy serve: with the option off, a PROXY header is ordinary data", async () => {
  const { server, seen } = await reportingServer({ hostname: HOST, port: 0 });
  const raw = await serve(async function* (): HandlerGenerator<Uint8Array> {
    let ev = yield;
    while (ev.type === "packet") ev = yield send(ev.data);
  }, { hostname: HOST, port: 0 });
  try {
    await withRawConn(portOf(server.addr), async (conn) => {
      const line = "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443";
      assert.equal(await exchange(conn, enc(`${line}\r\n`), line), `echo ${line}\n`);
      const got = await seen.next();
      assert.equal(got.line, line);
      assert.equal(got.proxy, undefined);
      assert.deepEqual(got.remote, conn.localAddr);
    });
    // A v2 header comes back byte for byte from a raw echo.
    const header = v2(0x21, 0x11, TCP4_BLOCK);
    await withRawConn(portOf(raw.addr), async (echo) => {
      await writeAll(echo, header);
      assert.deepEqual(await within(WAIT_MS, readExactly(echo, header.length)), header);
    });
  } finally {
    await server.stop();
    await raw.stop();
  }
});

Deno.test("proxy serve: the option must be a boolean", async () => {
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    () => serve(async function* () {}, { port: 0, proxyProtocol: "yes" as any }),
    (err: Error) => err instanceof TypeError && /proxyProtocol/.test(err.message),
  );
});

// ---- connect(…, { proxyHeader }) -------------------------------------------------------------------

Deno.test("proxy connect: proxyHeader round-trips through a proxyProtocol server", async () => {
  await withProxyServer(async ({ seen, port }) => {
    const headers: ProxyHeaderInit[] = [
      { version: 1, source: tcp("192.0.2.1", 5000), destination: tcp("192.0.2.2", 25) },
      {
        version: 2,
        source: tcp("2001:db8::7", 6000),
        destination: tcp("2001:db8::8", 443),
        tlvs: [{ type: 0x01, value: enc("smtp") }, { type: 0xe0, value: new Uint8Array([1, 2]) }],
        crc32c: true,
      },
      { version: 2, command: "LOCAL" },
    ];
    for (const proxyHeader of headers) {
      const got = Promise.withResolvers<string>();
      const client = await connect(async function* (): HandlerGenerator<string> {
        const ev = yield send("hi");
        if (ev.type === "packet") got.resolve(ev.data);
      }, { hostname: HOST, port, framing: lines(), proxyHeader });
      assert.equal(await within(WAIT_MS, got.promise), "echo hi");
      const seenBy = await seen.next();
      assert.deepEqual(
        { ...client.remoteAddr },
        tcp(HOST, port),
        "the client's own view is the socket's",
      );
      if (proxyHeader.source) {
        assert.deepEqual(seenBy.remote, proxyHeader.source);
        assert.deepEqual(seenBy.local, proxyHeader.destination);
      } else {
        assert.deepEqual(seenBy.remote, client.localAddr);
        assert.equal(seenBy.proxy?.command, "LOCAL");
      }
      assert.equal(seenBy.proxy?.version, proxyHeader.version);
      assert.deepEqual(
        seenBy.proxy?.tlvs.filter((t) => t.type !== 0x03),
        proxyHeader.tlvs ?? [],
      );
      await within(WAIT_MS, client.closed);
    }
    // A header that cannot be sent is refused before connecting.
    await assert.rejects(
      () =>
        connect(async function* () {}, {
          hostname: HOST,
          port,
          proxyHeader: { version: 1, command: "LOCAL" },
        }),
      RangeError,
    );
    assert.equal(seen.size, 0);
  });
});

Deno.test("proxy connect and serve over unix(): a v2 UNIX header", async () => {
  const dir = await Deno.makeTempDir({ prefix: "etcp-proxy-" });
  try {
    const transport = unix(`${dir}/p.sock`);
    const { server, seen } = await reportingServer({ transport, proxyProtocol: true });
    try {
      const source: Deno.UnixAddr = { transport: "unix", path: "/run/app/client.sock" };
      const destination: Deno.UnixAddr = { transport: "unix", path: "/run/app/server.sock" };
      const got = Promise.withResolvers<string>();
      const client = await connect(async function* (): HandlerGenerator<string> {
        const ev = yield send("u");
        if (ev.type === "packet") got.resolve(ev.data);
      }, { transport, framing: lines(), proxyHeader: { version: 2, source, destination } });
      assert.equal(await within(WAIT_MS, got.promise), "echo u");
      const seenBy = await seen.next();
      assert.deepEqual(seenBy.remote, source);
      assert.deepEqual(seenBy.local, destination);
      await within(WAIT_MS, client.closed);
    } finally {
      await server.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- Reading on a raw socket, and transports with a handshake (TLS) --------------------------------

Deno.test("proxy readProxyHeader: exact reads leave the bytes after the header in the socket", async () => {
  const transport = memory("proxy-test-exact");
  const listener = await transport.listen({});
  try {
    for (
      const header of [
        enc("PROXY UNKNOWN\r\n"), // the shortest header: 15 bytes
        enc("PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"),
        v2(0x21, 0x11, [...TCP4_BLOCK, ...tlv(0x02, ascii("example.com"))]),
        v2(0x20, 0x00, []),
      ]
    ) {
      const client = await transport.connect({});
      const socket = await listener.accept();
      try {
        await client.write(concat([header, enc("NEXT")]));
        const { header: parsed, rest } = await readProxyHeader(socket, { exact: true });
        assert.equal(rest.length, 0);
        assert.deepEqual(parsed, parseProxyHeader(header)!.header);
        assert.equal(dec(await readExactly(socket, 4)), "NEXT");
        // Without exact, the bytes read past the header come back as rest.
        await client.write(concat([header, enc("MORE")]));
        const loose = await readProxyHeader(socket);
        assert.equal(dec(loose.rest), "MORE");
      } finally {
        client.close();
        socket.close();
      }
    }
  } finally {
    listener.close();
  }
});

Deno.test("proxy readProxyHeader: a stream that ends early is truncated, or missing if empty", async () => {
  const transport = memory("proxy-test-ends");
  const listener = await transport.listen({});
  try {
    for (
      const [bytes, kind] of [[enc("PROXY TCP4 1.2"), "truncated"], [enc(""), "missing"]] as const
    ) {
      const client = await transport.connect({});
      const socket = await listener.accept();
      try {
        if (bytes.length) await client.write(bytes);
        await client.closeWrite();
        await assert.rejects(
          () => readProxyHeader(socket),
          (err: unknown) => err instanceof ProxyHeaderError && err.kind === kind,
        );
      } finally {
        client.close();
        socket.close();
      }
    }
  } finally {
    listener.close();
  }
});

/**
 * A transport whose connections have a handshake of their own, standing in for TLS: the proxy
 * sends the PROXY header in plain text before the (here: 4-byte "TLS!") handshake, so the
 * handshake reads the header from the raw socket first, exactly, then the handshake bytes, and
 * exposes the header as `proxy`. With `readsHeader: false` it does not, as Deno's TLS
 * connections would not.
 */
function handshaking(name: string, readsHeader: boolean): Transport<MemoryAddr> {
  const base = memory(name);
  const wrap = (raw: Conn): Conn => {
    let header: ProxyHeader | undefined;
    return {
      get localAddr() {
        return header?.destination ?? raw.localAddr;
      },
      get remoteAddr() {
        return header?.source ?? raw.remoteAddr;
      },
      get proxy() {
        return header;
      },
      async handshake() {
        if (readsHeader) header = (await readProxyHeader(raw, { exact: true })).header;
        const hello = dec(await readExactly(raw, 4));
        if (hello !== "TLS!") throw new Error(`bad handshake ${JSON.stringify(hello)}`);
      },
      read: (p) => raw.read(p),
      write: (p) => raw.write(p),
      closeWrite: () => raw.closeWrite(),
      close: () => raw.close(),
    };
  };
  return {
    name: "handshaking",
    async listen(options) {
      const listener = await base.listen(options);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        accept: async () => wrap(await listener.accept()),
      };
    },
    connect: (options) => base.connect(options),
  };
}

Deno.test("proxy serve: a transport with its own handshake must read the header before it", async () => {
  const header = encodeProxyHeader({
    version: 2,
    source: tcp("203.0.113.5", 7000),
    destination: tcp("10.1.1.1", 993),
  });
  // It reads the header from the raw socket before its handshake: the server takes that.
  const good = handshaking("proxy-test-handshake-good", true);
  const { server, seen } = await reportingServer({ transport: good, proxyProtocol: true });
  try {
    const client = await good.connect({});
    try {
      await client.write(concat([header, enc("TLS!"), enc("after\n")]));
      const got = await seen.next();
      assert.equal(got.line, "after");
      assert.deepEqual(got.remote, tcp("203.0.113.5", 7000));
      assert.equal(got.proxy?.version, 2);
    } finally {
      client.close();
    }
  } finally {
    await server.stop();
  }

  // It does not: the PROXY header cannot be read after its handshake; refused, clearly.
  const bad = handshaking("proxy-test-handshake-bad", false);
  const logger = capturingLogger();
  const refused = await serve(async function* (): HandlerGenerator<string> {}, {
    transport: bad,
    framing: lines(),
    proxyProtocol: true,
    logger,
  });
  try {
    const client = await bad.connect({});
    try {
      await client.write(enc("TLS!"));
      assert.equal(await within(WAIT_MS, client.read(new Uint8Array(8))), null);
      assert.match(logger.calls.at(-1)!.join(" "), /NotSupported: proxyProtocol: .*handshake/);
    } finally {
      client.close();
    }
  } finally {
    await refused.stop();
  }
});

Deno.test("proxy withProxyProtocol: a read runs the handshake; the rest comes out in any read size", async () => {
  const transport = memory("proxy-test-wrapper");
  const listener = await transport.listen({});
  try {
    const client = await transport.connect({});
    const conn = withProxyProtocol(await listener.accept());
    try {
      const before = conn.proxy; // (not asserted on conn.proxy itself, which would narrow it)
      assert.equal(before, undefined);
      await client.write(concat([enc("PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"), enc("abc")]));
      const one = new Uint8Array(1);
      const got: string[] = [];
      for (let i = 0; i < 3; i++) {
        const n = await within(WAIT_MS, conn.read(one)); // the first one reads the header
        got.push(dec(one.subarray(0, n!)));
      }
      assert.deepEqual(got, ["a", "b", "c"]);
      assert.deepEqual(conn.remoteAddr, tcp("192.0.2.1", 1));
      assert.deepEqual(conn.localAddr, tcp("192.0.2.2", 2));
      assert.equal(conn.proxy?.version, 1);
      assert.equal(await conn.handshake!(), conn.proxy, "the handshake ran once");
      // Then the socket itself.
      await client.write(enc("d"));
      assert.equal(dec(await readExactly(conn, 1)), "d");
      await client.closeWrite();
      assert.equal(await conn.read(one), null);
    } finally {
      client.close();
      conn.close();
    }
  } finally {
    listener.close();
  }
});
