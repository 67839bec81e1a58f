/**
 * The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy's specification
 * (doc/proxy-protocol.txt) defines them: a header a proxy (HAProxy, AWS NLB, a Kubernetes
 * ingress) sends first on each connection it relays, saying who the original client was and
 * where it connected to.
 *
 * - {@linkcode parseProxyHeader} decodes a header from bytes, incrementally (it says when it
 *   needs more), and {@linkcode readProxyHeader} reads one from a {@linkcode Conn}.
 * - {@linkcode withProxyProtocol} wraps an accepted socket so that its `handshake()` reads the
 *   header; `serve(…, { proxyProtocol: true })` does this for every connection.
 * - {@linkcode encodeProxyHeader} writes one; `connect(…, { proxyHeader })` sends it first.
 *
 * Every refusal is a {@linkcode ProxyHeaderError}.
 *
 * @module
 */

import type { Addr, Conn, ProxyHeader } from "./transport.ts";

/** Why a connection's PROXY header was refused: see {@linkcode ProxyHeaderError}. */
export type ProxyHeaderErrorKind = "missing" | "truncated" | "malformed";

/**
 * A connection did not start with a valid PROXY protocol header. `kind` says how:
 * `"missing"` (the first bytes are not a PROXY header, or the peer closed before sending any),
 * `"truncated"` (the peer closed in the middle of one), `"malformed"` (it does not follow the
 * specification: a bad address, an address family the header does not carry, an unknown
 * command, a bad checksum, …). A server with `proxyProtocol: true` closes that connection.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseProxyHeader, ProxyHeaderError } from "../mod.ts";
 * const bytes = new TextEncoder().encode("PROXY TCP4 ::1 127.0.0.1 5000 80\r\n");
 * assert.throws(() => parseProxyHeader(bytes), (err: unknown) => {
 *   assert.ok(err instanceof ProxyHeaderError);
 *   assert.equal(err.kind, "malformed");
 *   assert.match(err.message, /TCP4 header carries the IPv6 address "::1"/);
 *   return true;
 * });
 * ```
 */
export class ProxyHeaderError extends Error {
  /** `"missing"`, `"truncated"` or `"malformed"`. */
  readonly kind: ProxyHeaderErrorKind;
  /** Make one; the message says what was wrong, in one short line. */
  constructor(kind: ProxyHeaderErrorKind, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ProxyHeaderError";
    this.kind = kind;
  }
}

/**
 * A PROXY header to send (the `proxyHeader` option of `connect`, or
 * {@linkcode encodeProxyHeader}). A parsed {@linkcode ProxyHeader} is one too, so a proxy
 * can pass on the header it was given.
 */
export interface ProxyHeaderInit {
  /** 1: the text form (TCP over IPv4 or IPv6 only); 2: the binary form. */
  readonly version: 1 | 2;
  /**
   * `"PROXY"` (default): relayed on behalf of `source`. `"LOCAL"` (version 2 only): the
   * proxy's own connection (a health check), without addresses.
   */
  readonly command?: "PROXY" | "LOCAL";
  /**
   * The original client. Both `source` and `destination`, or neither (version 1 then sends
   * `PROXY UNKNOWN`, version 2 the unspecified family). Both of one kind: IPv4 or IPv6
   * literals (`transport: "tcp"`, or `"udp"` in version 2), or Unix paths of at most 108
   * bytes (`"unix"` for a stream socket, `"unixpacket"` for a datagram one; version 2 only).
   */
  readonly source?: Deno.NetAddr | Deno.UnixAddr;
  /** The address the client connected to; see `source`. */
  readonly destination?: Deno.NetAddr | Deno.UnixAddr;
  /** Version 2 type-length-value extensions, in order (type 0–255, at most 65535 bytes each). */
  readonly tlvs?: ReadonlyArray<{ readonly type: number; readonly value: Uint8Array }>;
  /** Version 2: append a CRC32C checksum TLV (type 0x03) over the whole header. */
  readonly crc32c?: boolean;
}

/** A header {@linkcode parseProxyHeader} found: what it says, and how many bytes it took. */
export interface ParsedProxyHeader {
  /** The header. */
  readonly header: ProxyHeader;
  /** Its length in bytes: the protocol's own bytes start here. */
  readonly length: number;
}

/** Options of {@linkcode readProxyHeader}. */
export interface ReadProxyHeaderOptions {
  /**
   * Read not one byte past the header (default `false`). Reads are then small: at most what
   * is still surely part of the header (down to one or two bytes at a time near the end of a
   * version 1 line), so `rest` is always empty. For a transport that must hand the socket, just
   * after the header, to something that reads it itself (a TLS handshake).
   */
  exact?: boolean;
}

// ---- Constants from the specification --------------------------------------------------------

/** The 12-byte signature that starts a version 2 header. */
const V2_SIGNATURE = new Uint8Array([
  0x0d,
  0x0a,
  0x0d,
  0x0a,
  0x00,
  0x0d,
  0x0a,
  0x51,
  0x55,
  0x49,
  0x54,
  0x0a,
]);
const V1_PREFIX = new Uint8Array([0x50, 0x52, 0x4f, 0x58, 0x59]); // "PROXY"
/** A version 1 line, CRLF included, is at most this long. */
const V1_MAX_LINE = 107;
/** The shortest version 1 header ("PROXY UNKNOWN\r\n"); a version 2 one has 16 bytes at least. */
const V1_MIN_LINE = 15;
const V2_FIXED = 16;
const UNIX_ADDR_LEN = 108;

const TLV_CRC32C = 0x03;
const TLV_UNIQUE_ID = 0x05;
const UNIQUE_ID_MAX = 128;

/** Version 2's address family and transport byte: the combinations the specification lists. */
interface Family {
  readonly name: string;
  readonly blockLength: number; // bytes of addresses (and ports) that follow the fixed part
  readonly kind: "none" | "ip4" | "ip6" | "unix";
  readonly transport?: "tcp" | "udp" | "unix" | "unixpacket";
}

const FAMILIES = new Map<number, Family>([
  [0x00, { name: "UNSPEC", blockLength: 0, kind: "none" }],
  [0x11, { name: "TCP over IPv4", blockLength: 12, kind: "ip4", transport: "tcp" }],
  [0x12, { name: "UDP over IPv4", blockLength: 12, kind: "ip4", transport: "udp" }],
  [0x21, { name: "TCP over IPv6", blockLength: 36, kind: "ip6", transport: "tcp" }],
  [0x22, { name: "UDP over IPv6", blockLength: 36, kind: "ip6", transport: "udp" }],
  [0x31, { name: "UNIX stream", blockLength: 216, kind: "unix", transport: "unix" }],
  [0x32, { name: "UNIX datagram", blockLength: 216, kind: "unix", transport: "unixpacket" }],
]);

// ---- Parsing ------------------------------------------------------------------------------------

/**
 * Decode the PROXY header at the start of `bytes`: `null` while the bytes so far are a valid
 * beginning of one (read more and call again with all of them), the header and its length once
 * complete. Throws a {@linkcode ProxyHeaderError} as soon as the bytes cannot be one (kind
 * `"missing"` when they are not a PROXY header at all, `"malformed"` otherwise).
 *
 * Both versions are accepted, told apart by their first bytes, as the specification says a
 * receiver of both should. Version 1: `TCP4` and `TCP6` lines (addresses checked against the
 * family; IPv6 in any form `inet_pton` takes), `UNKNOWN` (no addresses). Version 2: the
 * `PROXY` and `LOCAL` commands; TCP and UDP over IPv4 and IPv6, and Unix stream (`"unix"`) and
 * datagram (`"unixpacket"`) addresses; the unspecified family (no addresses); TLVs kept raw, a
 * CRC32C TLV checked. A `LOCAL` header carries no addresses (the connection's own hold).
 *
 * IPv6 addresses come out as Deno writes them (`::1`, `::ffff:192.0.2.1`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeProxyHeader, parseProxyHeader } from "../mod.ts";
 * const line = new TextEncoder().encode("PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET /");
 * assert.equal(parseProxyHeader(line.subarray(0, 20)), null); // not complete yet
 * const { header, length } = parseProxyHeader(line)!;
 * assert.equal(length, 45);
 * assert.deepEqual(header.source, { transport: "tcp", hostname: "192.0.2.1", port: 56324 });
 * assert.deepEqual(header.destination, { transport: "tcp", hostname: "198.51.100.7", port: 443 });
 *
 * const v2 = encodeProxyHeader({
 *   version: 2,
 *   source: { transport: "tcp", hostname: "2001:db8::1", port: 4000 },
 *   destination: { transport: "tcp", hostname: "2001:db8::2", port: 443 },
 *   tlvs: [{ type: 0x02, value: new TextEncoder().encode("example.com") }],
 * });
 * const parsed = parseProxyHeader(v2)!;
 * assert.equal(parsed.length, v2.length);
 * assert.equal(parsed.header.version, 2);
 * assert.equal((parsed.header.source as Deno.NetAddr).hostname, "2001:db8::1");
 * assert.equal(new TextDecoder().decode(parsed.header.tlvs[0].value), "example.com");
 * ```
 */
export function parseProxyHeader(bytes: Uint8Array): ParsedProxyHeader | null {
  if (bytes.length === 0) return null;
  if (bytes[0] === V2_SIGNATURE[0]) return parseV2(bytes);
  if (bytes[0] === V1_PREFIX[0]) return parseV1(bytes);
  throw notAHeader(bytes);
}

function notAHeader(bytes: Uint8Array): ProxyHeaderError {
  const head = bytes.subarray(0, 8);
  const hex = Array.from(head, (b) => b.toString(16).padStart(2, "0")).join(" ");
  return new ProxyHeaderError(
    "missing",
    `no PROXY protocol header: the connection starts with ${hex}${
      bytes.length > head.length ? " …" : ""
    } (${quote(latin1(head))})`,
  );
}

/** Throw "missing" unless the bytes so far agree with `prefix` (as far as they go). */
function checkPrefix(bytes: Uint8Array, prefix: Uint8Array): void {
  for (let i = 0; i < Math.min(bytes.length, prefix.length); i++) {
    if (bytes[i] !== prefix[i]) throw notAHeader(bytes);
  }
}

function malformed(version: 1 | 2, what: string): ProxyHeaderError {
  return new ProxyHeaderError("malformed", `malformed PROXY v${version} header: ${what}`);
}

// ---- Version 2 -----------------------------------------------------------------------------------

function parseV2(bytes: Uint8Array): ParsedProxyHeader | null {
  checkPrefix(bytes, V2_SIGNATURE);
  const n = bytes.length;
  if (n < 13) return null;
  const verCmd = bytes[12];
  if (verCmd >> 4 !== 2) {
    throw malformed(2, `version ${verCmd >> 4} in byte 13 (${hex2(verCmd)}); only 2 exists`);
  }
  const command = verCmd & 0x0f;
  if (command > 1) {
    throw malformed(2, `unknown command ${command} in byte 13 (${hex2(verCmd)}): 0 LOCAL, 1 PROXY`);
  }
  if (n < 14) return null;
  // A LOCAL header's family is ignored and its block discarded (the spec: a health check must
  // be accepted whatever it says there); TLVs are read only after addresses of a family known to fit.
  const local = command === 0;
  const famByte = bytes[13];
  const family = FAMILIES.get(famByte);
  if (family === undefined && !local) {
    throw malformed(2, `unknown address family and protocol ${hex2(famByte)} in byte 14`);
  }
  if (n < V2_FIXED) return null;
  const length = (bytes[14] << 8) | bytes[15];
  if (family !== undefined && length < family.blockLength && !local) {
    throw malformed(
      2,
      `family ${hex2(famByte)} (${family.name}) needs ${family.blockLength} address bytes, ` +
        `the header carries ${length}`,
    );
  }
  const total = V2_FIXED + length;
  if (n < total) return null;
  if (family === undefined || length < family.blockLength) {
    return { header: { version: 2, command: "LOCAL", tlvs: [] }, length: total };
  }
  const tlvs = parseTlvs(bytes, V2_FIXED + family.blockLength, total);
  const header: ProxyHeader = command === 1 && family.kind !== "none"
    ? { version: 2, command: "PROXY", ...v2Addresses(bytes, family), tlvs }
    : { version: 2, command: command === 1 ? "PROXY" : "LOCAL", tlvs };
  return { header, length: total };
}

function v2Addresses(
  bytes: Uint8Array,
  family: Family,
): { source: Deno.NetAddr | Deno.UnixAddr; destination: Deno.NetAddr | Deno.UnixAddr } {
  const at = V2_FIXED;
  if (family.kind === "unix") {
    const transport = family.transport as "unix" | "unixpacket";
    return {
      source: { transport, path: unixPath(bytes.subarray(at, at + UNIX_ADDR_LEN)) },
      destination: {
        transport,
        path: unixPath(bytes.subarray(at + UNIX_ADDR_LEN, at + 2 * UNIX_ADDR_LEN)),
      },
    };
  }
  const size = family.kind === "ip4" ? 4 : 16;
  const format = size === 4 ? formatIpv4 : formatIpv6;
  const ports = at + 2 * size;
  const transport = family.transport as "tcp" | "udp";
  return {
    source: {
      transport,
      hostname: format(bytes.subarray(at, at + size)),
      port: (bytes[ports] << 8) | bytes[ports + 1],
    },
    destination: {
      transport,
      hostname: format(bytes.subarray(at + size, at + 2 * size)),
      port: (bytes[ports + 2] << 8) | bytes[ports + 3],
    },
  };
}

function unixPath(field: Uint8Array): string {
  const end = field.indexOf(0);
  return new TextDecoder().decode(end < 0 ? field : field.subarray(0, end));
}

function parseTlvs(
  bytes: Uint8Array,
  start: number,
  end: number,
): Array<{ readonly type: number; readonly value: Uint8Array }> {
  const tlvs: Array<{ type: number; value: Uint8Array }> = [];
  let at = start;
  while (at < end) {
    if (at + 3 > end) {
      throw malformed(2, `${end - at} stray bytes after the last TLV (a TLV takes 3 at least)`);
    }
    const type = bytes[at];
    const length = (bytes[at + 1] << 8) | bytes[at + 2];
    const from = at + 3;
    at = from + length;
    if (at > end) {
      throw malformed(
        2,
        `TLV ${hex2(type)} of ${length} bytes runs ${at - end} bytes past the header's end`,
      );
    }
    if (type === TLV_CRC32C) {
      if (length !== 4) throw malformed(2, `CRC32C TLV of ${length} bytes (it has 4)`);
      const sent = ((bytes[from] << 24) | (bytes[from + 1] << 16) | (bytes[from + 2] << 8) |
        bytes[from + 3]) >>> 0;
      const copy = bytes.slice(0, end);
      copy.fill(0, from, from + 4);
      const computed = crc32c(copy);
      if (computed !== sent) {
        throw malformed(
          2,
          `CRC32C checksum ${hex8(sent)} does not match the header's (${hex8(computed)})`,
        );
      }
    } else if (type === TLV_UNIQUE_ID && length > UNIQUE_ID_MAX) {
      throw malformed(2, `UNIQUE_ID TLV of ${length} bytes (at most ${UNIQUE_ID_MAX})`);
    }
    tlvs.push({ type, value: bytes.slice(from, at) });
  }
  return tlvs;
}

// ---- Version 1 -----------------------------------------------------------------------------------

function parseV1(bytes: Uint8Array): ParsedProxyHeader | null {
  checkPrefix(bytes, V1_PREFIX);
  const n = bytes.length;
  if (n > V1_PREFIX.length && bytes[V1_PREFIX.length] !== 0x20) {
    throw malformed(1, `"PROXY" must be followed by one space`);
  }
  // The line ends at the first CR, which must be followed by LF, within 107 bytes.
  let end = -1;
  const scan = Math.min(n, V1_MAX_LINE);
  for (let i = 0; i < scan; i++) {
    const b = bytes[i];
    if (b === 0x0a) throw malformed(1, `LF without CR at byte ${i + 1}; the line ends with CRLF`);
    if (b !== 0x0d) continue;
    if (i + 1 >= V1_MAX_LINE) break; // its LF would be past the limit
    if (i + 1 === n) return null; // the LF is still to come
    if (bytes[i + 1] !== 0x0a) throw malformed(1, `CR without LF at byte ${i + 1}`);
    end = i;
    break;
  }
  if (end < 0) {
    if (n >= V1_MAX_LINE || scan < n) {
      throw malformed(1, `no CRLF within the first ${V1_MAX_LINE} bytes`);
    }
    return null;
  }
  const line = latin1(bytes.subarray(0, end));
  const rest = line.slice(V1_PREFIX.length + 1);
  const length = end + 2;
  // UNKNOWN: the receiver ignores whatever follows, up to the CRLF.
  if (rest === "UNKNOWN" || rest.startsWith("UNKNOWN ")) {
    return { header: { version: 1, command: "PROXY", tlvs: [] }, length };
  }
  const fields = rest.split(" ");
  const proto = fields[0];
  if (proto !== "TCP4" && proto !== "TCP6") {
    throw malformed(1, `unknown protocol ${quote(proto)} (TCP4, TCP6 or UNKNOWN)`);
  }
  if (fields.length !== 5 || fields.some((f) => f === "")) {
    throw malformed(
      1,
      `a ${proto} line is "PROXY ${proto} <source> <destination> <source port> ` +
        `<destination port>", one space apart, not ${quote(line)}`,
    );
  }
  const [, src, dst, sport, dport] = fields;
  return {
    header: {
      version: 1,
      command: "PROXY",
      source: { transport: "tcp", hostname: v1Address(proto, src, "source"), port: v1Port(sport) },
      destination: {
        transport: "tcp",
        hostname: v1Address(proto, dst, "destination"),
        port: v1Port(dport),
      },
      tlvs: [],
    },
    length,
  };
}

function v1Address(proto: "TCP4" | "TCP6", text: string, which: string): string {
  const v4 = parseIpv4(text);
  const v6 = v4 ? null : parseIpv6(text);
  if (proto === "TCP4") {
    if (v4) return formatIpv4(v4);
    if (v6) throw malformed(1, `TCP4 header carries the IPv6 address ${quote(text)} (${which})`);
    throw malformed(1, `${which} ${quote(text)} is not an IPv4 address`);
  }
  if (v6) return formatIpv6(v6);
  if (v4) throw malformed(1, `TCP6 header carries the IPv4 address ${quote(text)} (${which})`);
  throw malformed(1, `${which} ${quote(text)} is not an IPv6 address`);
}

function v1Port(text: string): number {
  if (!/^(0|[1-9][0-9]{0,4})$/.test(text) || Number(text) > 65535) {
    throw malformed(1, `port ${quote(text)} is not a number from 0 to 65535 without leading zeros`);
  }
  return Number(text);
}

// ---- Reading from a connection -------------------------------------------------------------------

/**
 * Read a PROXY header from the start of `conn`: resolves with it and with `rest`, the bytes
 * read past it (the protocol's first bytes; empty with `exact`). Rejects with a
 * {@linkcode ProxyHeaderError} if the bytes are not a valid header or the stream ends first,
 * and with the read's error if a read fails. It does not time out by itself: bound it (a server
 * bounds it with `handshakeTimeout`), and close `conn` to end a read under way.
 *
 * A transport whose connections have a handshake of their own (TLS) must call this on the raw
 * socket, with `exact: true`, before that handshake: a proxy sends the PROXY header in plain
 * text, before the TLS ClientHello.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeProxyHeader, memory, readProxyHeader } from "../mod.ts";
 * const transport = memory("read-proxy-header-doc");
 * const listener = await transport.listen({});
 * const client = await transport.connect({});
 * const server = await listener.accept();
 * await client.write(encodeProxyHeader({
 *   version: 1,
 *   source: { transport: "tcp", hostname: "192.0.2.1", port: 5000 },
 *   destination: { transport: "tcp", hostname: "192.0.2.2", port: 25 },
 * }));
 * await client.write(new TextEncoder().encode("EHLO"));
 * const { header, rest } = await readProxyHeader(server);
 * assert.equal((header.source as Deno.NetAddr).port, 5000);
 * assert.equal(new TextDecoder().decode(rest), "EHLO");
 * client.close();
 * server.close();
 * listener.close();
 * ```
 */
export async function readProxyHeader(
  conn: Conn,
  options: ReadProxyHeaderOptions = {},
): Promise<{ header: ProxyHeader; rest: Uint8Array }> {
  const exact = options.exact ?? false;
  let buf = new Uint8Array(exact ? 256 : 4096);
  let have = 0;
  for (;;) {
    const parsed = parseProxyHeader(buf.subarray(0, have));
    if (parsed) return { header: parsed.header, rest: buf.slice(parsed.length, have) };
    const need = stillNeeded(buf, have); // bytes that surely still belong to the header
    if (have + need > buf.length) {
      const grown = new Uint8Array(Math.max(have + need, buf.length * 2));
      grown.set(buf.subarray(0, have));
      buf = grown;
    }
    const n = await conn.read(buf.subarray(have, exact ? have + need : buf.length));
    if (n === null) {
      throw have === 0
        ? new ProxyHeaderError("missing", "the peer closed without sending a PROXY header")
        : new ProxyHeaderError(
          "truncated",
          `truncated PROXY header: the peer closed after ${have} bytes of it`,
        );
    }
    have += n;
  }
}

// How many more bytes the incomplete header at the start of buf surely has (at least 1).
function stillNeeded(buf: Uint8Array, have: number): number {
  if (have === 0) return V1_MIN_LINE;
  if (buf[0] === V2_SIGNATURE[0]) {
    if (have < V2_FIXED) return V2_FIXED - have;
    return V2_FIXED + ((buf[14] << 8) | buf[15]) - have;
  }
  if (have < V1_MIN_LINE) return V1_MIN_LINE - have;
  return buf[have - 1] === 0x0d ? 1 : 2; // a CR's LF, or at least a CR and an LF
}

// ---- The wrapper for accepted connections -------------------------------------------------------

/**
 * An accepted connection, wrapped so that its `handshake()` reads the PROXY header first
 * (what `serve(…, { proxyProtocol: true })` does to each connection). After it:
 * `remoteAddr` and `localAddr` are the original client's and destination's from the header
 * (the socket's own for `LOCAL`, `UNKNOWN` and the unspecified family); `proxy` is the header;
 * reads return the bytes that came after the header first (none is lost), then read the
 * socket. A read before the handshake runs it first. The handshake rejects with a
 * {@linkcode ProxyHeaderError} for a missing, truncated or malformed header.
 *
 * The header is read from the socket's plain bytes, so `socket` must have no handshake of its
 * own (TLS), unless that handshake reads the header itself (from the raw socket, before TLS,
 * with {@linkcode readProxyHeader}) and sets `proxy`: the wrapper then runs it and takes what
 * it found. Otherwise the handshake rejects with `Deno.errors.NotSupported`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeProxyHeader, memory, withProxyProtocol } from "../mod.ts";
 * const transport = memory("with-proxy-protocol-doc");
 * const listener = await transport.listen({});
 * const client = await transport.connect({});
 * const header = encodeProxyHeader({
 *   version: 2,
 *   source: { transport: "tcp", hostname: "203.0.113.9", port: 40000 },
 *   destination: { transport: "tcp", hostname: "10.0.0.1", port: 443 },
 * });
 * await client.write(new Uint8Array([...header, ...new TextEncoder().encode("hi")]));
 * const conn = withProxyProtocol(await listener.accept());
 * await conn.handshake!();
 * assert.deepEqual(conn.remoteAddr, { transport: "tcp", hostname: "203.0.113.9", port: 40000 });
 * assert.equal(conn.proxy?.version, 2);
 * const buf = new Uint8Array(16);
 * const n = await conn.read(buf);
 * assert.equal(new TextDecoder().decode(buf.subarray(0, n!)), "hi");
 * client.close();
 * conn.close();
 * listener.close();
 * ```
 */
export function withProxyProtocol(socket: Conn): Conn {
  return new ProxyProtocolConn(socket);
}

class ProxyProtocolConn implements Conn {
  readonly #socket: Conn;
  #header: ProxyHeader | undefined; // set once the handshake has read it
  #rest: Uint8Array | null = null; // read past the header, not yet returned
  #handshake: Promise<ProxyHeader> | null = null;
  // Present only if the socket has them, so that their presence still tells what it is.
  readonly setNoDelay?: (on: boolean) => void;
  readonly setKeepAlive?: (on: boolean) => void;
  readonly ref?: () => void;
  readonly unref?: () => void;

  constructor(socket: Conn) {
    this.#socket = socket;
    if (socket.setNoDelay) this.setNoDelay = (on) => socket.setNoDelay!(on);
    if (socket.setKeepAlive) this.setKeepAlive = (on) => socket.setKeepAlive!(on);
    if (socket.ref) this.ref = () => socket.ref!();
    if (socket.unref) this.unref = () => socket.unref!();
  }

  get localAddr(): Addr {
    return this.#header?.destination ?? this.#socket.localAddr;
  }

  get remoteAddr(): Addr {
    return this.#header?.source ?? this.#socket.remoteAddr;
  }

  get proxy(): ProxyHeader | undefined {
    return this.#header;
  }

  get alpnProtocol(): string | null | undefined {
    return this.#socket.alpnProtocol;
  }

  handshake(): Promise<ProxyHeader> {
    return this.#handshake ??= this.#readHeader();
  }

  async #readHeader(): Promise<ProxyHeader> {
    const socket = this.#socket;
    if (socket.handshake) {
      await socket.handshake();
      if (socket.proxy === undefined) {
        throw new Deno.errors.NotSupported(
          "proxyProtocol: this transport's connections have a handshake of their own (TLS), " +
            "which a proxy's plain-text PROXY header must come before; the transport has to " +
            "read the header from the raw socket (readProxyHeader) before its handshake",
        );
      }
      this.#header = socket.proxy;
    } else {
      const { header, rest } = await readProxyHeader(socket);
      this.#header = header;
      if (rest.length > 0) this.#rest = rest;
    }
    return this.#header;
  }

  read(p: Uint8Array): Promise<number | null> {
    const rest = this.#rest;
    if (rest !== null) {
      const n = Math.min(p.length, rest.length);
      p.set(rest.subarray(0, n));
      this.#rest = n === rest.length ? null : rest.subarray(n);
      return Promise.resolve(n);
    }
    if (this.#header === undefined) return this.handshake().then(() => this.read(p));
    return this.#socket.read(p);
  }

  write(p: Uint8Array): Promise<number> {
    return this.#socket.write(p);
  }

  closeWrite(): Promise<void> {
    return this.#socket.closeWrite();
  }

  close(): void {
    this.#rest = null;
    this.#socket.close();
  }
}

// ---- Encoding ------------------------------------------------------------------------------------

/**
 * The bytes of a PROXY header (what `connect(…, { proxyHeader })` sends first). Throws a
 * `TypeError` or `RangeError` that names what is wrong: addresses that are not IP literals,
 * of two families, a Unix path over 108 bytes, what version 1 cannot say (`LOCAL`, Unix or UDP
 * addresses, TLVs), a header over 65535 + 16 bytes.
 *
 * Version 1 writes IPv6 addresses in hexadecimal, with `::` for the longest run of zeros.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeProxyHeader } from "../mod.ts";
 * const v1 = encodeProxyHeader({
 *   version: 1,
 *   source: { transport: "tcp", hostname: "192.0.2.1", port: 56324 },
 *   destination: { transport: "tcp", hostname: "192.0.2.11", port: 443 },
 * });
 * assert.equal(new TextDecoder().decode(v1), "PROXY TCP4 192.0.2.1 192.0.2.11 56324 443\r\n");
 * assert.equal(new TextDecoder().decode(encodeProxyHeader({ version: 1 })), "PROXY UNKNOWN\r\n");
 * const local = encodeProxyHeader({ version: 2, command: "LOCAL" });
 * assert.equal(local.length, 16);
 * assert.equal(local[12], 0x20); // version 2, LOCAL
 * ```
 */
export function encodeProxyHeader(header: ProxyHeaderInit): Uint8Array {
  if (header === null || typeof header !== "object") {
    throw new TypeError(`proxy header must be an object, not ${header}`);
  }
  const { version, command = "PROXY", source, destination } = header;
  if (version !== 1 && version !== 2) {
    throw new RangeError(`proxy header version must be 1 or 2, not ${show(version)}`);
  }
  if (command !== "PROXY" && command !== "LOCAL") {
    throw new RangeError(`proxy header command must be "PROXY" or "LOCAL", not ${show(command)}`);
  }
  if ((source === undefined) !== (destination === undefined)) {
    throw new TypeError("proxy header: give both source and destination, or neither");
  }
  if (command === "LOCAL" && source !== undefined) {
    throw new TypeError("proxy header: a LOCAL header carries no addresses");
  }
  const tlvs = header.tlvs ?? [];
  if (!Array.isArray(tlvs)) throw new TypeError("proxy header: tlvs must be an array");
  return version === 1
    ? encodeV1(command, source, destination, tlvs.length, header.crc32c)
    : encodeV2(command, source, destination, tlvs, header.crc32c ?? false);
}

type AnyAddr = Deno.NetAddr | Deno.UnixAddr;

function encodeV1(
  command: "PROXY" | "LOCAL",
  source: AnyAddr | undefined,
  destination: AnyAddr | undefined,
  tlvCount: number,
  crc: boolean | undefined,
): Uint8Array {
  if (command === "LOCAL") {
    throw new RangeError("proxy header: version 1 has no LOCAL command (use version 2)");
  }
  if (tlvCount > 0 || crc) throw new RangeError("proxy header: version 1 carries no TLVs");
  if (source === undefined || destination === undefined) {
    return new TextEncoder().encode("PROXY UNKNOWN\r\n");
  }
  const [src, dst] = ipPair(source, destination, 1);
  const four = src.bytes.length === 4;
  const text = (b: Uint8Array) => four ? formatIpv4(b) : formatIpv6(b, false);
  return new TextEncoder().encode(
    `PROXY ${four ? "TCP4" : "TCP6"} ${text(src.bytes)} ${
      text(dst.bytes)
    } ${src.port} ${dst.port}\r\n`,
  );
}

function encodeV2(
  command: "PROXY" | "LOCAL",
  source: AnyAddr | undefined,
  destination: AnyAddr | undefined,
  tlvs: ReadonlyArray<{ readonly type: number; readonly value: Uint8Array }>,
  crc: boolean,
): Uint8Array {
  let fam = 0x00;
  let block = new Uint8Array(0);
  if (source !== undefined && destination !== undefined) {
    if (source.transport !== destination.transport) {
      throw new RangeError(
        `proxy header: source is ${source.transport} and destination ${destination.transport}`,
      );
    }
    if (source.transport === "unix" || source.transport === "unixpacket") {
      fam = source.transport === "unix" ? 0x31 : 0x32;
      block = new Uint8Array(2 * UNIX_ADDR_LEN);
      block.set(unixField(source as Deno.UnixAddr, "source"), 0);
      block.set(unixField(destination as Deno.UnixAddr, "destination"), UNIX_ADDR_LEN);
    } else {
      const [src, dst] = ipPair(source, destination, 2);
      const size = src.bytes.length;
      fam = (size === 4 ? 0x10 : 0x20) | (source.transport === "udp" ? 0x02 : 0x01);
      block = new Uint8Array(2 * size + 4);
      block.set(src.bytes, 0);
      block.set(dst.bytes, size);
      block[2 * size] = src.port >> 8;
      block[2 * size + 1] = src.port & 0xff;
      block[2 * size + 2] = dst.port >> 8;
      block[2 * size + 3] = dst.port & 0xff;
    }
  }
  let length = block.length + (crc ? 7 : 0);
  tlvs.forEach((tlv, i) => {
    if (tlv === null || typeof tlv !== "object") {
      throw new TypeError(`proxy header: tlvs[${i}] must be { type, value }`);
    }
    if (!(Number.isInteger(tlv.type) && tlv.type >= 0 && tlv.type <= 255)) {
      throw new RangeError(`proxy header: tlvs[${i}].type must be 0 to 255, not ${show(tlv.type)}`);
    }
    if (!(tlv.value instanceof Uint8Array)) {
      throw new TypeError(`proxy header: tlvs[${i}].value must be a Uint8Array`);
    }
    if (tlv.value.length > 0xffff) {
      throw new RangeError(
        `proxy header: tlvs[${i}].value has ${tlv.value.length} bytes (max 65535)`,
      );
    }
    length += 3 + tlv.value.length;
  });
  if (length > 0xffff) {
    throw new RangeError(`proxy header: ${length} bytes after the fixed part (max 65535)`);
  }
  const out = new Uint8Array(V2_FIXED + length);
  out.set(V2_SIGNATURE, 0);
  out[12] = 0x20 | (command === "PROXY" ? 0x01 : 0x00);
  out[13] = fam;
  out[14] = length >> 8;
  out[15] = length & 0xff;
  out.set(block, V2_FIXED);
  let at = V2_FIXED + block.length;
  for (const { type, value } of tlvs) {
    out[at] = type;
    out[at + 1] = value.length >> 8;
    out[at + 2] = value.length & 0xff;
    out.set(value, at + 3);
    at += 3 + value.length;
  }
  if (crc) {
    out[at] = TLV_CRC32C;
    out[at + 2] = 4;
    const sum = crc32c(out);
    out[at + 3] = sum >>> 24;
    out[at + 4] = (sum >>> 16) & 0xff;
    out[at + 5] = (sum >>> 8) & 0xff;
    out[at + 6] = sum & 0xff;
  }
  return out;
}

type IpAndPort = { bytes: Uint8Array; port: number };

/** `ipOf` of both addresses, which must be of one family (both IPv4 or both IPv6). */
function ipPair(source: AnyAddr, destination: AnyAddr, version: 1 | 2): [IpAndPort, IpAndPort] {
  const src = ipOf(source, "source", version);
  const dst = ipOf(destination, "destination", version);
  if (src.bytes.length !== dst.bytes.length) {
    throw new RangeError("proxy header: source and destination are of two address families");
  }
  return [src, dst];
}

function ipOf(addr: AnyAddr, which: string, version: 1 | 2): IpAndPort {
  if (addr === null || typeof addr !== "object") {
    throw new TypeError(`proxy header: ${which} must be an address object`);
  }
  if (addr.transport !== "tcp" && !(version === 2 && addr.transport === "udp")) {
    throw new RangeError(
      `proxy header: version ${version} carries ${
        version === 1 ? "TCP addresses only" : "TCP, UDP and Unix addresses"
      }, not ${show(addr.transport)} (${which})`,
    );
  }
  const { hostname, port } = addr as Deno.NetAddr;
  const bytes = typeof hostname === "string" ? parseIpv4(hostname) ?? parseIpv6(hostname) : null;
  if (bytes === null) {
    throw new RangeError(
      `proxy header: ${which} hostname ${show(hostname)} is not an IPv4 or IPv6 address`,
    );
  }
  if (!(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    throw new RangeError(`proxy header: ${which} port must be 0 to 65535, not ${show(port)}`);
  }
  return { bytes, port };
}

function unixField(addr: Deno.UnixAddr, which: string): Uint8Array {
  if (typeof addr.path !== "string") {
    throw new TypeError(`proxy header: ${which} path must be a string`);
  }
  const bytes = new TextEncoder().encode(addr.path);
  if (bytes.includes(0)) throw new RangeError(`proxy header: ${which} path contains a NUL byte`);
  if (bytes.length > UNIX_ADDR_LEN) {
    throw new RangeError(
      `proxy header: ${which} path has ${bytes.length} bytes (a Unix address holds ${UNIX_ADDR_LEN})`,
    );
  }
  return bytes;
}

// ---- Addresses -----------------------------------------------------------------------------------

// Dotted decimal, four numbers 0-255 without leading zeros (as the specification and inet_pton).
function parseIpv4(text: string): Uint8Array | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  const out = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    if (!/^(0|[1-9][0-9]{0,2})$/.test(parts[i])) return null;
    const v = Number(parts[i]);
    if (v > 255) return null;
    out[i] = v;
  }
  return out;
}

// What inet_pton(AF_INET6) takes: groups of 1-4 hex digits, one "::" at most, an optional
// dotted IPv4 tail; 128 bits exactly.
function parseIpv6(text: string): Uint8Array | null {
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const side = (s: string, tail: boolean): number[] | null => {
    if (s === "") return [];
    const parts = s.split(":");
    const groups: number[] = [];
    for (let i = 0; i < parts.length; i++) {
      const p = parts[i];
      if (tail && i === parts.length - 1 && p.includes(".")) {
        const v4 = parseIpv4(p);
        if (v4 === null) return null;
        groups.push((v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]);
      } else if (/^[0-9a-fA-F]{1,4}$/.test(p)) {
        groups.push(parseInt(p, 16));
      } else {
        return null;
      }
    }
    return groups;
  };
  let groups: number[];
  if (halves.length === 1) {
    const all = side(text, true);
    if (all === null || all.length !== 8) return null;
    groups = all;
  } else {
    const head = side(halves[0], false);
    const tail = side(halves[1], true);
    if (head === null || tail === null || head.length + tail.length > 7) return null;
    groups = [...head, ...new Array(8 - head.length - tail.length).fill(0), ...tail];
  }
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    out[2 * i] = g >> 8;
    out[2 * i + 1] = g & 0xff;
  });
  return out;
}

function formatIpv4(b: Uint8Array): string {
  return `${b[0]}.${b[1]}.${b[2]}.${b[3]}`;
}

// As Deno (Rust) writes IPv6 addresses: lower-case hex, the longest run of two or more zero
// groups as "::" (the first of equal runs), IPv4-mapped ones as ::ffff:a.b.c.d (unless `dotted`
// is false: the version 1 line has hex groups only).
function formatIpv6(b: Uint8Array, dotted = true): string {
  const groups = Array.from({ length: 8 }, (_, i) => (b[2 * i] << 8) | b[2 * i + 1]);
  if (
    dotted && groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff
  ) {
    return `::ffff:${formatIpv4(b.subarray(12))}`;
  }
  let bestAt = -1;
  let bestLen = 1;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestAt = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (gs: number[]) => gs.map((g) => g.toString(16)).join(":");
  if (bestAt < 0) return hex(groups);
  return `${hex(groups.slice(0, bestAt))}::${hex(groups.slice(bestAt + bestLen))}`;
}

// ---- Small helpers -------------------------------------------------------------------------------

let crcTable: Uint32Array | undefined;

/** CRC32C (Castagnoli), as RFC 4960 appendix B computes it. */
function crc32c(bytes: Uint8Array): number {
  if (crcTable === undefined) {
    crcTable = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let c = i;
      for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
      crcTable[i] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

function latin1(bytes: Uint8Array): string {
  return String.fromCharCode(...bytes);
}

function quote(text: string): string {
  return JSON.stringify(text.length > 48 ? `${text.slice(0, 48)}…` : text);
}

function hex2(b: number): string {
  return `0x${b.toString(16).padStart(2, "0")}`;
}

function hex8(n: number): string {
  return `0x${n.toString(16).padStart(8, "0")}`;
}

function show(value: unknown): string {
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}
