/**
 * TLS: {@linkcode tls}, a transport over Deno's own TLS (`Deno.listenTls`, `Deno.connect` +
 * `Deno.startTls`, `Deno.connectTls`) or, with `engine: "node"`, over `node:tls` on Deno's TCP
 * connections; and {@linkcode upgradeTls}, which switches a live plain connection to TLS
 * (STARTTLS), client or server side.
 *
 * What Deno 2.9.6 allows, read in its source (`ext/net/02_tls.js`, `ext/net/ops_tls.rs`,
 * `ext/tls/tls_key.rs`) and checked by `tests/tls_test.ts`:
 *
 * - **Server certificate, ALPN, client certificate (client side)**: `Deno.listenTls({ cert, key,
 *   alpnProtocols })`, `Deno.connectTls({ caCerts, alpnProtocols, cert, key })`: documented.
 * - **Verifying client certificates (server side)**: not with `Deno.listenTls`. It builds its
 *   rustls configuration with `with_no_client_auth()` (its SNI resolver too), and
 *   `ListenTlsOptions` has no `requestCert` or client CA: such a server never asks for a client
 *   certificate, so a client's is not even sent. `node:tls` in Deno 2.9.6 can ask for one and
 *   record whether it verified: {@linkcode TlsOptions.clientCaCerts} runs the server on
 *   `engine: "node"`, which refuses clients whose certificate does not verify (or, unless
 *   `requireClientCert: false`, who give none), and exposes the client's certificate as
 *   `peerCertificate` on the transport's connection.
 * - **Several certificates chosen by server name (SNI)**: `Deno.listenTls` documents no option
 *   for it, but has an undocumented one: a function keyed `Symbol.for("unstableSniResolver")`
 *   from the name the client asked for (`""` without SNI) to `{ cert, key }` (its results
 *   cached per name). {@linkcode TlsOptions.sni} uses it (`SNICallback` on `engine: "node"`),
 *   after checking that this Deno still has it (`Deno.errors.NotSupported` if not).
 * - **A server name other than the address connected to**: `Deno.startTls`'s `hostname` is only
 *   the name checked and sent (the TCP connection is made already), so a client without a
 *   certificate connects with `Deno.connect` and then `Deno.startTls`. `Deno.startTls` takes no
 *   client certificate, so with one it is `Deno.connectTls`, with the name in its undocumented
 *   option `Symbol.for("unstableServerName")` (checked for as the SNI one).
 * - **Nagle's algorithm**: `Deno.TlsConn` has neither `setNoDelay` nor `setKeepAlive`, and Deno
 *   sets `TCP_NODELAY` on no TLS socket (seen with strace). So `noDelay` and `keepAlive` apply
 *   only to clients without a certificate (set on the TCP connection before `Deno.startTls`)
 *   and to `engine: "node"`. With Nagle on at either end, a request/response exchange whose
 *   message spans more than one TCP segment (64 KiB on loopback, about 1.4 KB on Ethernet)
 *   waits for the peer's delayed ACK, up to 40 ms on Linux, at each turn: `engine: "node"` on
 *   both sides avoids it (measured: 64 KiB ping-pong about 1000 round trips/s against 22).
 *   Likewise a `Deno.listenTls` server's first response after a TLS 1.3 handshake waits about
 *   40 ms (it follows the session ticket, unacknowledged). Small messages after the first, and
 *   streams, do not suffer it.
 * - **Closing before the handshake completes**: `Deno.TlsConn.close()` on a connection whose
 *   handshake is still under way does not close its socket: Deno's TLS stream
 *   (rustls-tokio-stream) hands the socket to a background handshake task that keeps it until
 *   the peer completes the handshake, fails it or leaves. So with `engine: "deno"`, a server's
 *   `handshakeTimeout` stops waiting for a stalled peer (no handler runs, one debug line) but
 *   the peer's socket stays open until the peer goes; a peer that stalls forever holds a file
 *   descriptor. `engine: "node"` closes it.
 * - **Addresses after `Deno.startTls`**: its connections' `localAddr` and `remoteAddr` lack
 *   `transport: "tcp"`; the connections made here have it put back.
 * - **STARTTLS**: `Deno.startTls` is client side only. A server switches an accepted plain
 *   connection with `node:tls` (`new TLSSocket(stream, { isServer: true })` over a stream that
 *   reads and writes the connection), which works in Deno 2.9.6: {@linkcode upgradeTls} with
 *   `role: "server"`. `role: "client"` uses `Deno.startTls` on a `Deno.TcpConn`, and
 *   `node:tls` for other connections or to present a client certificate.
 * - **TLS 1.3 and client certificates**: a server refuses the client's certificate after the
 *   client's side of the handshake has finished, so the client learns it from its first read
 *   (`Deno.errors.InvalidData` "received fatal alert: CertificateRequired", or the connection
 *   closed), not from `connect`.
 * - **The peer's certificate**: Deno has no public way to read it from a `Deno.TlsConn`; only
 *   `engine: "node"` and {@linkcode upgradeTls} connections have `peerCertificate`.
 *
 * Errors: options that cannot work throw {@linkcode TlsConfigError} (from `tls()`, which reads
 * the files and checks every certificate against its key, or from `listen`/`connect` for what
 * only they can tell, such as a server without a certificate). A handshake refused for a TLS
 * reason rejects with {@linkcode TlsHandshakeError}, a subclass of `Deno.errors.InvalidData` (the
 * class Deno gives) with the original as `cause` and the kind of refusal as `failure`. Other
 * failures are Deno's own errors (`ConnectionRefused`, `UnexpectedEof` for a peer gone
 * mid-handshake, `AddrInUse`, ...).
 *
 * @module
 */

import type { Duplex } from "node:stream";
import type { PeerCertificate, SecureContext, TLSSocket } from "node:tls";
import { tcp } from "./tcp.ts";
import { checkBacklog, checkReusePort, type DualStack, listenEveryAddress } from "./_listen_any.ts";
import { closeQuietly, formatAddr, writeAll } from "../_socket.ts";
import { describeReason } from "../errors.ts";
import type {
  Addr,
  Conn,
  ConnectOptions,
  Listener,
  ListenOptions,
  Transport,
} from "./transport.ts";

// ---- Errors --------------------------------------------------------------------------------------

/**
 * TLS options that cannot work: a certificate or key that is missing, unreadable, not PEM, or
 * a key that does not match its certificate; a CA that is not a PEM certificate; a bad ALPN
 * protocol name. Thrown by {@linkcode tls} (files are read and keys checked there), and by
 * `listen` or `connect` for what only they can tell (a server without a certificate).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { tls, TlsConfigError } from "../mod.ts";
 * assert.throws(() => tls({ certFile: "/no/such/file.crt", keyFile: "/no/such/file.key" }), TlsConfigError);
 * ```
 */
export class TlsConfigError extends Error {
  /** Make one with a message that says what is wrong; `cause` is Deno's error, if any. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TlsConfigError";
  }
}

/** Why a TLS handshake failed, as far as it can be told (`"other"` for the rest). */
export type TlsHandshakeFailure =
  | "unknown-issuer" // the peer's certificate is not signed by a CA this end trusts
  | "expired" // the peer's certificate has expired
  | "not-yet-valid" // the peer's certificate is not valid yet
  | "name-mismatch" // the server's certificate is not for the name connected to
  | "bad-certificate" // the peer's certificate is unusable otherwise
  | "peer-refused-certificate" // the peer refused this end's certificate
  | "certificate-required" // a client certificate was required and none was given
  | "no-application-protocol" // no ALPN protocol in common
  | "not-tls" // the peer sent something that is not TLS
  | "other";

/**
 * A TLS handshake refused: the peer's certificate did not verify (wrong CA, expired, wrong
 * name), the peer refused ours, no ALPN protocol in common, or the peer does not speak TLS.
 * A subclass of `Deno.errors.InvalidData`, the class Deno gives for all of these, so either
 * can be caught; `cause` is Deno's (or `node:tls`'s) error, `failure` says which it was.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { TlsHandshakeError } from "../mod.ts";
 * const err = new TlsHandshakeError("expired", "TLS handshake failed: expired");
 * assert.ok(err instanceof Deno.errors.InvalidData);
 * ```
 */
export class TlsHandshakeError extends Deno.errors.InvalidData {
  /** Which refusal it was. */
  readonly failure: TlsHandshakeFailure;
  /** Make one; `cause` is the underlying error. */
  constructor(failure: TlsHandshakeFailure, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TlsHandshakeError";
    this.failure = failure;
  }
}

// ---- Options -------------------------------------------------------------------------------------

/** A certificate chain and its private key, in PEM, given as text or as files. */
export interface TlsKeyPair {
  /** The certificate chain, PEM (`-----BEGIN CERTIFICATE-----`), leaf first. */
  cert?: string;
  /** The private key, PEM (PKCS#8, RSA or EC). */
  key?: string;
  /** Read `cert` from this file (when {@linkcode tls} is called). */
  certFile?: string;
  /** Read `key` from this file (when {@linkcode tls} is called). */
  keyFile?: string;
}

/** Options of {@linkcode tls}. Server-only and client-only options are ignored on the other side. */
export interface TlsOptions extends TlsKeyPair {
  /**
   * Server: the certificate for names not in {@linkcode sni} (required to listen). Client: a
   * certificate to present for mutual TLS (optional).
   */
  cert?: string;
  /**
   * Server: more certificates, chosen by the name the client asks for (SNI). Keys are host
   * names, exact (`"api.example.com"`) or one-label wildcards (`"*.example.com"`); a client
   * that asks for another name, or none (an IP address), gets `cert`.
   */
  sni?: Record<string, TlsKeyPair>;
  /**
   * Server: verify client certificates against these CAs (PEM), mutual TLS. The server then
   * asks every client for a certificate and runs its TLS through `node:tls` (see the module
   * notes).
   */
  clientCaCerts?: string[];
  /**
   * Server with {@linkcode clientCaCerts}: refuse a client that gives no certificate (default
   * `true`). With `false` such a client gets in (its `peerCertificate` is `null`); a
   * certificate that is given must still verify.
   */
  requireClientCert?: boolean;
  /** Client: CA certificates (PEM) trusted besides Deno's default root store. */
  caCerts?: string[];
  /**
   * Client: the name to check the server's certificate against and to send as SNI, when it is
   * not the host connected to (default: that host, name or IP address).
   */
  serverName?: string;
  /**
   * Both sides: protocols for ALPN, most preferred first. The server picks the first of its
   * own that the client offers; with none in common the handshake fails
   * (`no-application-protocol`). If either side has no `alpnProtocols`, no protocol is chosen
   * and `alpnProtocol` is `null`.
   */
  alpnProtocols?: string[];
  /**
   * Whose TLS runs the connections. `"deno"` (the default): Deno's own (`Deno.listenTls`,
   * `Deno.startTls`, `Deno.connectTls`), the fastest for small messages, but servers and
   * clients with a client certificate cannot turn Nagle's algorithm off (see the module
   * notes). `"node"`: `node:tls` over Deno's TCP connections, so that `noDelay` and
   * `keepAlive` apply on both sides and the peer's certificate is readable; about 0.7x the
   * round trips per second of `"deno"` for small messages. `clientCaCerts` needs `"node"` on
   * the server (it is then the default).
   */
  engine?: "deno" | "node";
  /**
   * Disable Nagle's algorithm (default `true`). Only where it can be set: clients without a
   * client certificate, and everything with `engine: "node"` (see the module notes).
   */
  noDelay?: boolean;
  /** Turn on TCP keep-alive probes (default off), where `noDelay` can be set. */
  keepAlive?: boolean;
  /** How many connections the system queues for accept (the listen backlog; default 511). */
  backlog?: number;
}

/** The subject and issuer of a peer certificate, as `node:tls` gives them. */
export interface TlsPeerCertificate {
  /** Subject fields, e.g. `{ CN: "client" }`. */
  readonly subject: Readonly<Record<string, string | string[]>>;
  /** Issuer fields, e.g. `{ CN: "my CA" }`. */
  readonly issuer: Readonly<Record<string, string | string[]>>;
  /** Start of validity, as in the certificate (e.g. `"Jan  1 00:00:00 2020 GMT"`). */
  readonly validFrom: string;
  /** End of validity. */
  readonly validTo: string;
  /** Serial number, hex. */
  readonly serialNumber: string;
  /** SHA-256 fingerprint, colon-separated hex. */
  readonly fingerprint256: string;
  /** The certificate, DER. */
  readonly raw: Uint8Array;
}

/** A TLS connection as this module makes them. */
export interface TlsConn extends Conn {
  /** The protocol ALPN chose: `null` before the handshake and when none was. */
  readonly alpnProtocol: string | null;
  /**
   * The peer's certificate, after the handshake, on connections that run over `node:tls`
   * (`engine: "node"`, and {@linkcode upgradeTls} except a client's over `Deno.startTls`);
   * `null` if it gave none; absent where Deno cannot tell.
   */
  readonly peerCertificate?: TlsPeerCertificate | null;
  /** Complete the handshake (at most once; later calls get the same result). */
  handshake(): Promise<unknown>;
}

/** Options of {@linkcode upgradeTls}: {@linkcode TlsOptions} and which side this end is. */
export interface TlsUpgradeOptions extends TlsOptions {
  /** `"client"` starts the handshake; `"server"` answers it. */
  role: "client" | "server";
}

// ---- Deno's undocumented hooks ----------------------------------------------------------------------

const SNI_RESOLVER = Symbol.for("unstableSniResolver");
const SERVER_NAME = Symbol.for("unstableServerName");

/** Whether Deno's TLS module still has the hook `name` under the symbol `key` (2.9.6 does). */
function hasHook(name: string, key: symbol): boolean {
  try {
    const d = Deno as unknown as Record<string | symbol, unknown>;
    const internals = d[d.internal as symbol] as Record<string, unknown> | undefined;
    return internals?.[name] === key;
  } catch {
    return false;
  }
}

// ---- Checking options ----------------------------------------------------------------------------

const CERT_PEM = /-----BEGIN (?:TRUSTED )?CERTIFICATE-----/;
const KEY_PEM = /-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----/;

interface Pem {
  cert: string;
  key: string;
}

function readPem(path: string, what: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch (err) {
    const why = describeReason(err);
    throw new TlsConfigError(`tls: ${what} "${path}": cannot read it: ${why}`, { cause: err });
  }
}

/** The PEM of `pair`, read and checked (a certificate, a key, and that they match); `null` if none. */
function loadPair(pair: TlsKeyPair, what: string): Pem | null {
  if (pair.cert !== undefined && pair.certFile !== undefined) {
    throw new TlsConfigError(`tls: ${what}: give cert or certFile, not both`);
  }
  if (pair.key !== undefined && pair.keyFile !== undefined) {
    throw new TlsConfigError(`tls: ${what}: give key or keyFile, not both`);
  }
  const certFrom = pair.certFile !== undefined ? `certFile "${pair.certFile}"` : "cert";
  const keyFrom = pair.keyFile !== undefined ? `keyFile "${pair.keyFile}"` : "key";
  const cert = pair.certFile !== undefined
    ? readPem(pair.certFile, `${what}: certFile`)
    : pair.cert;
  const key = pair.keyFile !== undefined ? readPem(pair.keyFile, `${what}: keyFile`) : pair.key;
  if (cert === undefined && key === undefined) return null;
  if (cert === undefined) throw new TlsConfigError(`tls: ${what}: a key without a certificate`);
  if (key === undefined) throw new TlsConfigError(`tls: ${what}: a certificate without its key`);
  if (typeof cert !== "string" || !CERT_PEM.test(cert)) {
    throw new TlsConfigError(
      `tls: ${what}: ${certFrom} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`,
    );
  }
  if (typeof key !== "string" || !KEY_PEM.test(key)) {
    throw new TlsConfigError(
      `tls: ${what}: ${keyFrom} holds no PEM private key ("-----BEGIN PRIVATE KEY-----")`,
    );
  }
  // Deno parses the pair and checks that the key is the certificate's, with no I/O and no
  // permission, when it makes an HTTP client that presents them (about 0.3 ms).
  try {
    Deno.createHttpClient({ cert, key }).close();
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    const why = /KeyMismatch/.test(message)
      ? `the key (${keyFrom}) does not match the certificate (${certFrom})`
      : `Deno cannot use ${certFrom} with ${keyFrom}: ${message}`;
    throw new TlsConfigError(`tls: ${what}: ${why}`, { cause: err });
  }
  return { cert, key };
}

function checkCas(cas: unknown, what: string): string[] | undefined {
  if (cas === undefined) return undefined;
  if (!Array.isArray(cas)) throw new TlsConfigError(`tls: ${what} must be an array of PEM strings`);
  cas.forEach((ca, i) => {
    if (typeof ca !== "string" || !CERT_PEM.test(ca)) {
      throw new TlsConfigError(
        `tls: ${what}[${i}] is not a PEM certificate ("-----BEGIN CERTIFICATE-----")`,
      );
    }
  });
  return cas;
}

function checkAlpn(protocols: unknown): string[] | undefined {
  if (protocols === undefined) return undefined;
  if (!Array.isArray(protocols)) throw new TlsConfigError("tls: alpnProtocols must be an array");
  for (const p of protocols) {
    const bytes = typeof p === "string" ? new TextEncoder().encode(p).length : 0;
    if (bytes < 1 || bytes > 255) {
      throw new TlsConfigError(
        `tls: alpnProtocols: ${JSON.stringify(p)} is not a protocol name (1 to 255 bytes)`,
      );
    }
  }
  return protocols.length === 0 ? undefined : protocols;
}

/**
 * `err`, from Deno setting up TLS, as a {@linkcode TlsConfigError} (`what`, then its message) if
 * it is about the configuration (Deno's `InvalidData`, or a plain `Error`); others as they are.
 */
function configError(err: unknown, what: string): unknown {
  const e = err as Error | null | undefined;
  if (err instanceof Deno.errors.InvalidData || e?.constructor === Error) {
    return new TlsConfigError(`${what}: ${e!.message}`, { cause: err });
  }
  return err;
}

/** `name` as an SNI key: lower case, without a trailing dot; throws if it is not a host name. */
function sniKey(name: string): string {
  const n = name.toLowerCase().replace(/\.$/, "");
  if (!/^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$/.test(n)) {
    throw new TlsConfigError(`tls: sni: ${JSON.stringify(name)} is not a host name`);
  }
  return n;
}

/**
 * The certificates of `sni` (the option), each loaded and checked, and its name checked, in
 * order: `[name, pem]` as given.
 */
function loadSni(sni: Record<string, TlsKeyPair>): [string, Pem][] {
  return Object.entries(sni).map(([name, pair]) => {
    const loaded = loadPair(pair, `sni["${name}"]`);
    if (loaded === null) throw new TlsConfigError(`tls: sni["${name}"]: no certificate`);
    sniKey(name);
    return [name, loaded];
  });
}

/** Server names to certificates: exact names, then `*.` wildcards for one label. */
class SniTable<V> {
  readonly #names = new Map<string, V>();
  constructor(entries: Iterable<readonly [string, V]> = []) {
    for (const [name, value] of entries) this.#names.set(sniKey(name), value);
  }
  get(name: string): V | undefined {
    const n = name.toLowerCase().replace(/\.$/, "");
    const exact = this.#names.get(n);
    if (exact !== undefined || n === "") return exact;
    const dot = n.indexOf(".");
    return dot < 0 ? undefined : this.#names.get(`*${n.slice(dot)}`);
  }
}

// ---- Handshake errors ----------------------------------------------------------------------------

/**
 * `err` from a handshake as a {@linkcode TlsHandshakeError} saying what went wrong, if it was a
 * TLS refusal (Deno's `InvalidData`, or a `node:tls` error); other errors as they are.
 */
function handshakeError(
  err: unknown,
  role: "client" | "server",
  peer: Addr,
  alpn: string[] | undefined,
): unknown {
  if (err instanceof TlsHandshakeError || !(err instanceof Error)) return err;
  const code = (err as { code?: unknown }).code;
  const nodeTls = typeof code === "string" &&
    /^(ERR_SSL_|ERR_TLS_|UNABLE_|CERT_|DEPTH_|SELF_SIGNED|HOSTNAME_)/.test(code);
  if (!(err instanceof Deno.errors.InvalidData) && !nodeTls) return err;
  const m = `${err.message} ${typeof code === "string" ? code : ""}`;
  const them = role === "client" ? "the server" : "the client";
  const ours = role === "client" ? "this client's" : "this server's";
  let failure: TlsHandshakeFailure;
  let what: string;
  if (/NoApplicationProtocol|known protocol|NO_APPLICATION_PROTOCOL/i.test(m)) {
    failure = "no-application-protocol";
    what = `no ALPN protocol in common with ${them} (${
      alpn ? `this end offers ${alpn.join(", ")}` : "this end offers none"
    })`;
  } else if (
    /received fatal alert: CertificateRequired|PEER_DID_NOT_RETURN|no certificates/i.test(m)
  ) {
    failure = "certificate-required";
    what = role === "client"
      ? "the server requires a client certificate"
      : "the client gave no certificate, and one is required";
  } else if (
    /received fatal alert: (UnknownCA|BadCertificate|CertificateExpired|CertificateUnknown|UnsupportedCertificate|DecryptError)/
      .test(m)
  ) {
    failure = "peer-refused-certificate";
    what = `${them} refused ${ours} certificate`;
  } else if (
    /UnknownIssuer|UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY|SELF_SIGNED|DEPTH_ZERO/i.test(m)
  ) {
    failure = "unknown-issuer";
    what = `${them}'s certificate is not signed by a CA this end trusts` +
      (role === "client" ? " (pass its CA in caCerts)" : " (clientCaCerts)");
  } else if (/expired|CERT_HAS_EXPIRED/i.test(m)) {
    failure = "expired";
    const after = /not valid after (\d+)/.exec(m);
    what = `${them}'s certificate has expired` +
      (after ? ` (not valid after ${new Date(Number(after[1]) * 1000).toISOString()})` : "");
  } else if (/NotValidYet|not valid yet|CERT_NOT_YET_VALID/i.test(m)) {
    failure = "not-yet-valid";
    what = `${them}'s certificate is not valid yet`;
  } else if (/not valid for name|NotValidForName|ALTNAME|HOSTNAME_MISMATCH/i.test(m)) {
    failure = "name-mismatch";
    what = `${them}'s certificate is not for the name connected to (serverName sets another)`;
  } else if (/invalid peer certificate|BadCertificate|INVALID_PURPOSE/i.test(m)) {
    failure = "bad-certificate";
    what = `${them}'s certificate cannot be used`;
  } else if (
    /corrupt message|InvalidContentType|PayloadTooLarge|WRONG_VERSION|InvalidMessage/i.test(m)
  ) {
    failure = "not-tls";
    what = `${them} does not speak TLS (it sent bytes that are not a TLS handshake)`;
  } else {
    failure = "other";
    what = "refused";
  }
  return new TlsHandshakeError(
    failure,
    `TLS handshake with ${formatAddr(peer)} failed: ${what} [${err.message}]`,
    { cause: err },
  );
}

// ---- Deno's TLS connections, decorated -------------------------------------------------------------

type Decorated = Deno.TlsConn & { alpnProtocol: string | null };

/**
 * `conn` itself (no wrapper on the read and write path) with `alpnProtocol` and a `handshake`
 * that fills it in and explains refusals.
 */
function decorate(
  conn: Deno.TlsConn,
  role: "client" | "server",
  alpn: string[] | undefined,
): TlsConn {
  const c = conn as Decorated;
  const handshake = Object.getPrototypeOf(conn).handshake as (
    this: Deno.TlsConn,
  ) => Promise<Deno.TlsHandshakeInfo>;
  let done: Promise<Deno.TlsHandshakeInfo> | undefined;
  // Deno.startTls's connections have addresses without `transport` (Deno 2.9.6): add it.
  for (const addr of [conn.localAddr, conn.remoteAddr]) {
    if (addr.transport === undefined) (addr as { transport: string }).transport = "tcp";
  }
  c.alpnProtocol = null;
  c.handshake = () =>
    done ??= handshake.call(conn).then(
      (info) => {
        c.alpnProtocol = info.alpnProtocol;
        return info;
      },
      (err) => {
        throw handshakeError(err, role, conn.remoteAddr, alpn);
      },
    );
  return c;
}

// ---- TLS over node:tls ---------------------------------------------------------------------------

type NodeModules = {
  tls: typeof import("node:tls");
  Duplex: typeof import("node:stream").Duplex;
};
let nodeModules: Promise<NodeModules> | undefined;

/** `node:tls` and `node:stream`, loaded on first use only (the common paths never need them). */
function loadNode(): Promise<NodeModules> {
  return nodeModules ??= Promise.all([import("node:tls"), import("node:stream")]).then((
    [tls, stream],
  ) => ({ tls: tls.default ?? tls, Duplex: stream.Duplex }));
}

const PUMP_SIZE = 16 * 1024;

/** A `node:stream` Duplex that reads and writes `conn`: the wire under a `node:tls` socket. */
function duplexOver(conn: Conn, { Duplex }: NodeModules): Duplex {
  let reading = false;
  let spare: Uint8Array | null = null; // the read buffer, until one is handed over whole
  const stream: Duplex = new Duplex({
    read() {
      if (reading) return;
      reading = true;
      const buf = spare ??= new Uint8Array(PUMP_SIZE);
      conn.read(buf).then(
        (n) => {
          reading = false;
          if (n === null) stream.push(null);
          else if (n < 1024) stream.push(buf.slice(0, n)); // copied out: keep the buffer
          else {
            spare = null; // handed over: the next read gets a fresh one
            stream.push(buf.subarray(0, n));
          }
        },
        (err) => {
          reading = false;
          stream.destroy(err);
        },
      );
    },
    write(chunk: Uint8Array, _encoding, callback) {
      writeAll(conn, chunk).then(() => callback(), callback);
    },
    final(callback) {
      conn.closeWrite().then(() => callback(), () => callback());
    },
    destroy(err, callback) {
      closeQuietly(conn);
      callback(err);
    },
  });
  return stream;
}

/** A node error from the socket under TLS as Deno's class, so that the library classifies it. */
function ioError(err: Error): Error {
  if (Object.values(Deno.errors).some((E) => err instanceof E)) return err;
  switch ((err as { code?: unknown }).code) {
    case "ECONNRESET":
      return new Deno.errors.ConnectionReset(err.message, { cause: err });
    case "EPIPE":
      return new Deno.errors.BrokenPipe(err.message, { cause: err });
    case "ECONNABORTED":
      return new Deno.errors.ConnectionAborted(err.message, { cause: err });
  }
  return new Deno.errors.InvalidData(err.message, { cause: err });
}

function peerCertificateOf(socket: TLSSocket): TlsPeerCertificate | null {
  const c: PeerCertificate | undefined | null = socket.getPeerCertificate();
  if (!c || !c.raw) return null;
  return {
    subject: { ...c.subject } as Record<string, string | string[]>,
    issuer: { ...c.issuer } as Record<string, string | string[]>,
    validFrom: c.valid_from,
    validTo: c.valid_to,
    serialNumber: c.serialNumber,
    fingerprint256: c.fingerprint256,
    raw: new Uint8Array(c.raw),
  };
}

/**
 * What is wrong with the client's certificate (an OpenSSL-style code such as
 * `UNABLE_TO_VERIFY_LEAF_SIGNATURE`), or `null` if it verified. Node's `tls.Server` does this
 * check itself on `secure`; a bare server `TLSSocket` only records the result, in
 * `socket.ssl.verifyError()`. Without that method, nothing verifies: every client is refused.
 */
function clientCertProblem(socket: TLSSocket): string | null {
  const ssl = (socket as unknown as { ssl?: { verifyError?(): unknown } }).ssl;
  if (typeof ssl?.verifyError !== "function") return "ERR_TLS_CANNOT_VERIFY (no verifyError)";
  const err = ssl.verifyError();
  if (!err) return null;
  if (typeof err === "string") return err;
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" ? code : String(err);
}

const HIGH_WATER = 256 * 1024;

/** A {@linkcode TlsConn} over a `node:tls` socket that runs over another connection. */
class NodeTlsConn implements TlsConn {
  alpnProtocol: string | null = null;
  peerCertificate: TlsPeerCertificate | null = null;
  readonly localAddr: Addr;
  readonly remoteAddr: Addr;
  readonly #inner: Conn;
  readonly #socket: TLSSocket;
  readonly #secure: Promise<void>;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #paused = false;
  #ended = false;
  #closed = false;
  #error: Error | null = null;
  #reader: {
    p: Uint8Array;
    resolve(n: number | null): void;
    reject(err: Error): void;
  } | null = null;

  /**
   * `verify`: a server that asked for client certificates checks them (as node's own
   * `tls.Server` does, which a bare `TLSSocket` does not): `"require"` a valid one, or
   * `"optional"` (none, or a valid one).
   */
  constructor(
    inner: Conn,
    wire: Duplex,
    socket: TLSSocket,
    role: "client" | "server",
    alpn: string[] | undefined,
    verify: "require" | "optional" | "none",
  ) {
    this.#inner = inner;
    this.#socket = socket;
    this.localAddr = inner.localAddr;
    this.remoteAddr = inner.remoteAddr;
    let secure = false;
    this.#secure = new Promise<void>((resolve, reject) => {
      const fail = (err: unknown) => {
        if (secure) return;
        secure = true; // settled
        reject(handshakeError(err, role, inner.remoteAddr, alpn));
        socket.destroy();
      };
      socket.once(role === "server" ? "secure" : "secureConnect", () => {
        if (secure) return;
        if (verify !== "none") {
          const given = peerCertificateOf(socket) !== null;
          const problem = given
            ? clientCertProblem(socket)
            : verify === "require"
            ? "ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE"
            : null;
          if (problem !== null) {
            return fail(
              Object.assign(new Error(`client certificate: ${problem}`), { code: problem }),
            );
          }
        }
        secure = true;
        this.alpnProtocol = socket.alpnProtocol || null;
        this.peerCertificate = peerCertificateOf(socket);
        resolve();
      });
      socket.on("error", (err: Error) => {
        if (!secure) return fail(err);
        this.#error ??= ioError(err);
        this.#wake();
      });
      socket.on("close", () => {
        fail(new Deno.errors.UnexpectedEof("the connection closed during the TLS handshake"));
        this.#ended = true;
        this.#wake();
      });
      // A peer that leaves mid-handshake: node:tls would wait on; the wire says it ended.
      wire.on("end", () => fail(new Deno.errors.UnexpectedEof("unexpected end of file")));
      wire.on("error", fail);
    });
    this.#secure.catch(() => {}); // handshake() reports it
    socket.on("data", (chunk: Uint8Array) => this.#onData(chunk));
    socket.on("end", () => {
      this.#ended = true;
      this.#wake();
    });
  }

  handshake(): Promise<void> {
    return this.#secure;
  }

  #onData(chunk: Uint8Array): void {
    const reader = this.#reader;
    if (reader !== null && this.#buffered === 0) {
      this.#reader = null;
      const n = Math.min(chunk.length, reader.p.length);
      reader.p.set(n === chunk.length ? chunk : chunk.subarray(0, n));
      if (n < chunk.length) this.#queue(chunk.subarray(n));
      reader.resolve(n);
      return;
    }
    this.#queue(chunk);
  }

  #queue(chunk: Uint8Array): void {
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    if (this.#buffered >= HIGH_WATER && !this.#paused) {
      this.#paused = true;
      this.#socket.pause();
    }
  }

  #take(p: Uint8Array): number {
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const head = this.#chunks[0];
      const k = Math.min(head.length, p.length - n);
      p.set(k === head.length ? head : head.subarray(0, k), n);
      n += k;
      if (k === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(k);
    }
    this.#buffered -= n;
    if (this.#paused && this.#buffered < HIGH_WATER / 4) {
      this.#paused = false;
      this.#socket.resume();
    }
    return n;
  }

  #wake(): void {
    const reader = this.#reader;
    if (reader === null) return;
    if (this.#buffered > 0) {
      this.#reader = null;
      reader.resolve(this.#take(reader.p));
    } else if (this.#error !== null) {
      this.#reader = null;
      reader.reject(this.#error);
    } else if (this.#ended) {
      this.#reader = null;
      reader.resolve(null);
    }
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) {
      return Promise.reject(new Deno.errors.BadResource("the connection is closed"));
    }
    if (this.#buffered > 0) return Promise.resolve(this.#take(p));
    if (this.#error !== null) return Promise.reject(this.#error);
    if (this.#ended) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this.#reader = { p, resolve, reject };
    });
  }

  write(p: Uint8Array): Promise<number> {
    if (this.#closed) {
      return Promise.reject(new Deno.errors.BadResource("the connection is closed"));
    }
    if (this.#error !== null) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      // The callback comes once the bytes are consumed: the caller may reuse `p` then.
      this.#socket.write(p, (err) => err ? reject(ioError(err)) : resolve(p.length));
    });
  }

  closeWrite(): Promise<void> {
    if (this.#closed) {
      return Promise.reject(new Deno.errors.BadResource("the connection is closed"));
    }
    return new Promise((resolve) => this.#socket.end(() => resolve()));
  }

  close(): void {
    if (this.#closed) throw new Deno.errors.BadResource("the connection is closed");
    this.#closed = true;
    this.#socket.destroy();
    closeQuietly(this.#inner); // (closed with the socket, perhaps)
    const reader = this.#reader;
    this.#reader = null;
    reader?.reject(new Deno.errors.Interrupted("the connection was closed"));
  }

  setNoDelay(on: boolean): void {
    this.#inner.setNoDelay?.(on);
  }

  setKeepAlive(on: boolean): void {
    this.#inner.setKeepAlive?.(on);
  }

  ref(): void {
    this.#inner.ref?.();
  }

  unref(): void {
    this.#inner.unref?.();
  }
}

interface ServerSetup {
  node: NodeModules;
  context: SecureContext;
  sni: SniTable<SecureContext> | null;
  clientCa: boolean;
  requireClientCert: boolean;
  alpn: string[] | undefined;
}

/** What {@linkcode serverOver} needs; `sni` (from {@linkcode loadSni}) `null` for no `SNICallback`. */
async function serverSetup(
  pem: Pem,
  sni: [string, Pem][] | null,
  clientCaCerts: string[] | undefined,
  requireClientCert: boolean,
  alpn: string[] | undefined,
): Promise<ServerSetup> {
  const node = await loadNode();
  const ca = clientCaCerts;
  const context = node.tls.createSecureContext({ ...pem, ca });
  const contexts = sni && new SniTable(
    sni.map(([name, pair]) => [name, node.tls.createSecureContext({ ...pair, ca })] as const),
  );
  return { node, context, sni: contexts, clientCa: ca !== undefined, requireClientCert, alpn };
}

function serverOver(conn: Conn, s: ServerSetup): NodeTlsConn {
  const { node, sni } = s;
  const wire = duplexOver(conn, node);
  const socket = new node.tls.TLSSocket(wire, {
    isServer: true,
    secureContext: s.context,
    requestCert: s.clientCa,
    // Refuses a client without a certificate in the handshake; whether a given one verifies,
    // a bare TLSSocket does not check: NodeTlsConn does.
    rejectUnauthorized: s.clientCa && s.requireClientCert,
    ALPNProtocols: s.alpn,
    SNICallback: sni === null
      ? undefined
      : (name: string, cb: (err: Error | null, ctx?: SecureContext) => void) =>
        cb(null, sni.get(name) ?? s.context),
  });
  const verify = !s.clientCa ? "none" : s.requireClientCert ? "require" : "optional";
  return new NodeTlsConn(conn, wire, socket, "server", s.alpn, verify);
}

/** Client TLS through `node:tls` over `conn`, checking the server's certificate against `name`. */
function nodeClientOver(
  conn: Conn,
  node: NodeModules,
  name: string,
  caCerts: string[] | undefined,
  pem: Pem | null,
  alpn: string[] | undefined,
): NodeTlsConn {
  const isIp = /^[\d.]+$|:/.test(name);
  const wire = duplexOver(conn, node);
  const socket = node.tls.connect({
    socket: wire,
    servername: isIp ? undefined : name, // SNI carries names only
    host: name, // what the certificate is checked against
    ca: caCerts && [...node.tls.rootCertificates, ...caCerts], // besides the roots, as Deno
    cert: pem?.cert,
    key: pem?.key,
    ALPNProtocols: alpn,
    rejectUnauthorized: true,
  });
  return new NodeTlsConn(conn, wire, socket, "client", alpn, "none");
}

// ---- The transport -------------------------------------------------------------------------------

/**
 * TLS: a server needs `cert` and `key` (or `certFile` and `keyFile`); a client trusts Deno's
 * root store plus `caCerts`, checks the server's certificate against the host it connects to
 * (or `serverName`), and may present `cert` and `key` for mutual TLS. Connections expose
 * `handshake()` (run by `serve` off the acceptor, bounded by its `handshakeTimeout`, and by
 * `connect` within its `connectTimeout`) and, after it, `alpnProtocol` (read by
 * `conn.alpnProtocol` on the handler's connection). Certificate files are read, and every
 * certificate checked against its key, when `tls()` is called: a problem throws
 * {@linkcode TlsConfigError} there. What Deno cannot do is in the module notes above.
 *
 * @example An echo over TLS, ALPN negotiated
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, lines, send, serve, tls } from "../mod.ts";
 * const fixtures = new URL("../tests/fixtures/", import.meta.url).pathname;
 * const server = await serve(async function* (conn) {
 *   const ev = yield;
 *   if (ev.type === "packet") yield send(`${conn.alpnProtocol}: ${ev.data}`);
 * }, {
 *   hostname: "127.0.0.1",
 *   port: 0,
 *   framing: lines(),
 *   transport: tls({
 *     certFile: fixtures + "server.crt",
 *     keyFile: fixtures + "server.key",
 *     alpnProtocols: ["etcp/1"],
 *   }),
 * });
 * const got = Promise.withResolvers<string>();
 * const client = await connect(async function* () {
 *   const ev = yield send("hello");
 *   if (ev.type === "packet") got.resolve(ev.data);
 * }, {
 *   hostname: "localhost", // checked against the certificate
 *   port: (server.addr as Deno.NetAddr).port,
 *   framing: lines(),
 *   transport: tls({
 *     caCerts: [Deno.readTextFileSync(fixtures + "ca.crt")],
 *     alpnProtocols: ["etcp/1"],
 *   }),
 * });
 * assert.equal(await got.promise, "etcp/1: hello");
 * await client.closed;
 * await server.stop();
 * ```
 */
export function tls(options: TlsOptions = {}): Transport<Deno.NetAddr> {
  const pem = loadPair(options, "certificate");
  const alpn = checkAlpn(options.alpnProtocols);
  const caCerts = checkCas(options.caCerts, "caCerts");
  const clientCaCerts = checkCas(options.clientCaCerts, "clientCaCerts");
  const requireClientCert = options.requireClientCert ?? true;
  const engine = options.engine ?? (clientCaCerts !== undefined ? "node" : "deno");
  if (engine !== "deno" && engine !== "node") {
    throw new TlsConfigError(`tls: engine must be "deno" or "node", not ${JSON.stringify(engine)}`);
  }
  if (engine === "deno" && clientCaCerts !== undefined) {
    throw new TlsConfigError(
      'tls: clientCaCerts needs engine "node": Deno.listenTls cannot verify client certificates',
    );
  }
  const noDelay = options.noDelay ?? true;
  const keepAlive = options.keepAlive ?? false;
  const backlog = options.backlog;
  checkBacklog("tls", backlog);
  const serverName = options.serverName;
  if (serverName !== undefined && (typeof serverName !== "string" || serverName === "")) {
    throw new TlsConfigError("tls: serverName must be a non-empty string");
  }
  if (
    serverName !== undefined && pem !== null && engine === "deno" &&
    !hasHook("serverNameSymbol", SERVER_NAME)
  ) {
    throw new Deno.errors.NotSupported(
      "tls: serverName with a client certificate needs Deno.connectTls's server-name option, " +
        "which this Deno does not have",
    );
  }
  if (
    options.sni !== undefined && engine === "deno" && !hasHook("resolverSymbol", SNI_RESOLVER)
  ) {
    throw new Deno.errors.NotSupported(
      "tls: sni needs Deno.listenTls's certificate resolver, which this Deno does not have",
    );
  }
  const sniPems = options.sni === undefined ? null : loadSni(options.sni);
  // Deno.listenTls's resolver looks names up here; engine "node" makes its own, of contexts.
  const sni = engine === "deno" && sniPems !== null ? new SniTable(sniPems) : null;
  const plain = tcp({ noDelay, keepAlive, backlog });
  const dualStack: DualStack = {};
  // engine "node": the secure contexts, made on the first listen and shared by all.
  let setup: Promise<ServerSetup> | undefined;

  const listenTls = (hostname: string, port: number, reusePort?: boolean): Deno.TlsListener => {
    const listenOptions: Deno.ListenTlsOptions & Deno.TlsCertifiedKeyPem & {
      [SNI_RESOLVER]?: (name: string) => Pem;
    } = {
      transport: "tcp",
      hostname,
      port,
      reusePort,
      tcpBacklog: backlog,
      alpnProtocols: alpn,
      cert: pem!.cert,
      key: pem!.key,
    };
    if (sni !== null) listenOptions[SNI_RESOLVER] = (name) => sni.get(name) ?? pem!;
    try {
      return Deno.listenTls(listenOptions);
    } catch (err) {
      // Only the certificate can be wrong here (checked by tls() already): say so.
      throw configError(err, "tls: Deno.listenTls refused the certificate");
    }
  };

  return {
    name: "tls",
    async listen(
      { hostname, port = 0, reusePort }: ListenOptions,
    ): Promise<Listener<Deno.NetAddr>> {
      if (pem === null) {
        throw new TlsConfigError(
          "tls: a server needs a certificate and its key (cert and key, or certFile and keyFile)",
        );
      }
      checkReusePort(reusePort);
      if (engine === "node") {
        // TLS through node:tls over plain TCP connections.
        const s = await (setup ??= serverSetup(
          pem,
          sniPems,
          clientCaCerts,
          requireClientCert,
          alpn,
        ));
        const listener = await plain.listen({ hostname, port, reusePort });
        return {
          addr: listener.addr,
          close: () => listener.close(),
          ref: () => listener.ref?.(),
          unref: () => listener.unref?.(),
          accept: async () => serverOver(await listener.accept(), s),
        };
      }
      const bind = (host: string, at: number) => listenTls(host, at, reusePort);
      const listener = hostname === undefined
        ? listenEveryAddress(bind, port, dualStack, (err) => err instanceof TlsConfigError)
        : bind(hostname, port);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        ref: () => listener.ref(),
        unref: () => listener.unref(),
        accept: async () => decorate(await listener.accept(), "server", alpn),
      };
    },
    async connect({ hostname = "127.0.0.1", port }: ConnectOptions): Promise<TlsConn> {
      if (port === undefined) throw new TypeError("tls connect needs a port");
      if (engine === "node") {
        const node = await loadNode();
        const conn = await plain.connect({ hostname, port });
        return nodeClientOver(conn, node, serverName ?? hostname, caCerts, pem, alpn);
      }
      if (pem !== null) {
        // A client certificate: only Deno.connectTls takes one.
        const connectOptions: Deno.ConnectTlsOptions & Deno.TlsCertifiedKeyPem & {
          [SERVER_NAME]?: string;
        } = { hostname, port, caCerts, alpnProtocols: alpn, cert: pem.cert, key: pem.key };
        if (serverName !== undefined) connectOptions[SERVER_NAME] = serverName;
        return decorate(await Deno.connectTls(connectOptions), "client", alpn);
      }
      // Deno.connect, then Deno.startTls: the TCP options apply, and the server name is free.
      const conn = await plain.connect({ hostname, port }) as Deno.TcpConn;
      try {
        const secure = await Deno.startTls(conn, {
          hostname: serverName ?? hostname,
          caCerts,
          alpnProtocols: alpn,
        });
        return decorate(secure, "client", alpn);
      } catch (err) {
        closeQuietly(conn); // (consumed by startTls, perhaps)
        throw configError(err, `tls: cannot start TLS with ${hostname}:${port}`);
      }
    },
  };
}

/**
 * Switch a live plain connection to TLS in place (STARTTLS), as the client (`role: "client"`,
 * which sends the ClientHello) or the server. Resolves with the TLS connection before its
 * handshake: call its `handshake()` (bound it in time, and `close()` it on timeout; a failure
 * closes it). The plain connection is spent: use only the result from then on, and have no
 * read pending on the plain connection when calling this. Bytes the peer sent after its
 * switch point that were already read from the plain connection are lost to TLS: the caller
 * must check there are none.
 *
 * A server, or a client presenting a certificate or switching a connection that is not a
 * `Deno.TcpConn` (a wrapper, another transport), runs TLS through `node:tls` over the plain
 * connection (Deno's own TLS has no server side for an existing connection); a client
 * switching a `Deno.TcpConn` without a certificate uses `Deno.startTls`. The options are
 * those of {@linkcode tls}; a client checks the server's certificate against `serverName`,
 * else the address it is connected to.
 *
 * @example A server switches after "STARTTLS"
 * ```ts
 * import assert from "node:assert/strict";
 * import { upgradeTls } from "../mod.ts";
 * const fixtures = new URL("../tests/fixtures/", import.meta.url).pathname;
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const accepted = listener.accept();
 * const plainClient = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
 * const plainServer = await accepted;
 * // (here the two would agree in plain text to switch)
 * const [client, server] = await Promise.all([
 *   upgradeTls(plainClient, { role: "client", serverName: "localhost", caCerts: [Deno.readTextFileSync(fixtures + "ca.crt")] }),
 *   upgradeTls(plainServer, { role: "server", certFile: fixtures + "server.crt", keyFile: fixtures + "server.key" }),
 * ]);
 * await Promise.all([client.handshake(), server.handshake()]);
 * await client.write(new TextEncoder().encode("secret"));
 * const buf = new Uint8Array(6);
 * assert.equal(await server.read(buf), 6);
 * client.close();
 * server.close();
 * listener.close();
 * ```
 */
export async function upgradeTls(conn: Conn, options: TlsUpgradeOptions): Promise<TlsConn> {
  const { role } = options;
  if (role !== "client" && role !== "server") {
    throw new TypeError(`upgradeTls: role must be "client" or "server", not ${role}`);
  }
  const pem = loadPair(options, "certificate");
  const alpn = checkAlpn(options.alpnProtocols);
  const peer = conn.remoteAddr;
  if (role === "server") {
    if (pem === null) {
      throw new TlsConfigError(
        "upgradeTls: a server needs a certificate and its key (cert and key, or certFile and keyFile)",
      );
    }
    const clientCaCerts = checkCas(options.clientCaCerts, "clientCaCerts");
    const sni = loadSni(options.sni ?? {});
    const setup = await serverSetup(
      pem,
      sni.length > 0 ? sni : null,
      clientCaCerts,
      options.requireClientCert ?? true,
      alpn,
    );
    return serverOver(conn, setup);
  }
  const caCerts = checkCas(options.caCerts, "caCerts");
  const name = options.serverName ??
    (peer.transport === "tcp" ? peer.hostname : "localhost");
  const isDenoTcp = peer.transport === "tcp" && typeof conn.setNoDelay === "function" &&
    !("alpnProtocol" in conn) && Object.getPrototypeOf(conn)?.constructor?.name === "TcpConn";
  if (pem === null && isDenoTcp) {
    const secure = await Deno.startTls(conn as Deno.TcpConn, {
      hostname: name,
      caCerts,
      alpnProtocols: alpn,
    });
    return decorate(secure, "client", alpn);
  }
  return nodeClientOver(conn, await loadNode(), name, caCerts, pem, alpn);
}
