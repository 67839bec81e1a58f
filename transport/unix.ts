/**
 * Unix domain stream sockets over `Deno.listen({ transport: "unix" })` and
 * `Deno.connect({ transport: "unix" })`. Stable in Deno 2.9: no `--unstable-*` flag. Needs
 * `--allow-read`, `--allow-write` and `--allow-net` to listen, `--allow-read` and
 * `--allow-net` to connect (`--allow-net` may be scoped to the socket:
 * `--allow-net=unix:/absolute/path`).
 *
 * @module
 */

import { describeReason } from "../errors.ts";
import { withTimeout } from "../_with_timeout.ts";
import type { Listener, Transport } from "./transport.ts";

/**
 * A Unix socket path longer than the operating system takes (`sun_path`: 108 bytes with the
 * terminating NUL on Linux, so 107 usable; 104 on macOS and the BSDs). Thrown by
 * {@linkcode unix} before anything is bound or connected. The length is in UTF-8 bytes, of the
 * path as given (a relative path counts as written, not resolved).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { unix, UnixPathTooLong } from "../mod.ts";
 * assert.throws(() => unix(`/tmp/${"x".repeat(200)}.sock`), (err: unknown) => {
 *   assert.ok(err instanceof UnixPathTooLong);
 *   assert.equal(err.byteLength, 210);
 *   return true;
 * });
 * ```
 */
export class UnixPathTooLong extends RangeError {
  /** The path refused. */
  readonly path: string;
  /** Its length in UTF-8 bytes. */
  readonly byteLength: number;
  /** The most bytes a path may have here (without the terminating NUL). */
  readonly maxLength: number;
  /** Make one for `path`, which has `byteLength` bytes against a limit of `maxLength`. */
  constructor(path: string, byteLength: number, maxLength: number) {
    super(
      `unix socket path is ${byteLength} bytes, over the ${maxLength}-byte limit of ` +
        `${Deno.build.os} (${maxLength + 1} with the terminating NUL): ${JSON.stringify(path)}`,
    );
    this.name = "UnixPathTooLong";
    this.path = path;
    this.byteLength = byteLength;
    this.maxLength = maxLength;
  }
}

/** The usable bytes of `sun_path` on this system (without its terminating NUL). */
function maxPathBytes(): number {
  switch (Deno.build.os) {
    case "darwin":
    case "freebsd":
    case "netbsd":
      return 103;
    default: // linux, android, illumos, solaris, aix, windows: char sun_path[108]
      return 107;
  }
}

/** How long a connect that probes a socket file for a live server may take (ms). */
const PROBE_MS = 2000;

/**
 * Unix domain stream sockets at `path` for servers and clients.
 *
 * - `listen` binds `path`. If a socket file is already there, it connects to it first: when a
 *   server answers, `listen` fails with `Deno.errors.AddrInUse` (so `serve()` rejects); when
 *   the connect is refused, the file is stale (left by a process that was killed) and is
 *   replaced. A file there that is not a socket is never removed (`AddrInUse` as well). The
 *   probe connect shows up, at a live server, as one connection that closes at once.
 * - Closing the listener (`server.stop()`) removes the socket file. (Deno 2.9 already unlinks
 *   the path when a Unix listener closes, whoever's file is there by then; this transport also
 *   removes it, but only if it is still the socket it bound.)
 * - Addresses are `{ transport: "unix", path }`. A client's own end is unnamed, and reads
 *   `path: ""` (Deno gives `null`, which its types do not allow).
 * - `hostname` and `port` are ignored; `reusePort` (a server with `acceptors > 1`) is
 *   refused with `Deno.errors.NotSupported`: one socket file has one listener.
 *
 * Throws {@linkcode UnixPathTooLong} for a path the system cannot bind, and a `TypeError` for
 * an empty path or one with a NUL byte, at once.
 *
 * @example An echo server on a Unix socket
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, send, serve, unix } from "../mod.ts";
 * const dir = await Deno.makeTempDir();
 * const transport = unix(`${dir}/echo.sock`);
 * const server = await serve(async function* () {
 *   const ev = yield;
 *   if (ev.type === "packet") yield send(ev.data);
 * }, { transport });
 * assert.deepEqual(server.addr, { transport: "unix", path: `${dir}/echo.sock` });
 * const got = Promise.withResolvers<string>();
 * const client = await connect(async function* () {
 *   const ev = yield send(new TextEncoder().encode("ping"));
 *   if (ev.type === "packet") got.resolve(new TextDecoder().decode(ev.data));
 * }, { transport });
 * assert.equal(await got.promise, "ping");
 * await client.closed;
 * await server.stop();
 * await assert.rejects(Deno.lstat(`${dir}/echo.sock`), Deno.errors.NotFound); // removed
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function unix(path: string): Transport<Deno.UnixAddr> {
  if (typeof path !== "string" || path === "") {
    throw new TypeError(`unix: path must be a non-empty string, not ${JSON.stringify(path)}`);
  }
  if (path.includes("\0")) throw new TypeError("unix: path must not contain a NUL byte");
  const byteLength = new TextEncoder().encode(path).length;
  const max = maxPathBytes();
  if (byteLength > max) throw new UnixPathTooLong(path, byteLength, max);

  return {
    name: "unix",
    listen({ reusePort }) {
      if (reusePort) {
        throw new Deno.errors.NotSupported(
          `unix: reusePort (and acceptors > 1) is not supported: ${path} has one listener`,
        );
      }
      return listenAt(path);
    },
    async connect() {
      try {
        return named(await Deno.connect({ transport: "unix", path }));
      } catch (err) {
        if (err instanceof Deno.errors.NotFound) {
          throw new Deno.errors.NotFound(`unix: no socket at ${path}`, { cause: err });
        }
        if (err instanceof Deno.errors.ConnectionRefused) {
          throw new Deno.errors.ConnectionRefused(
            `unix: nothing listens on ${path} (a stale socket file)`,
            { cause: err },
          );
        }
        throw err;
      }
    },
  };
}

async function listenAt(path: string): Promise<Listener<Deno.UnixAddr>> {
  let listener: Deno.UnixListener;
  try {
    listener = Deno.listen({ transport: "unix", path });
  } catch (err) {
    if (!(err instanceof Deno.errors.AddrInUse)) throw err;
    await removeIfStale(path, err);
    try {
      listener = Deno.listen({ transport: "unix", path });
    } catch (again) {
      if (!(again instanceof Deno.errors.AddrInUse)) throw again;
      throw new Deno.errors.AddrInUse(`unix: ${path} was taken again meanwhile`, { cause: again });
    }
  }
  const bound = identity(path);
  return {
    addr: listener.addr,
    accept: async () => named(await listener.accept()),
    close() {
      listener.close(); // throws if closed already, as any listener's close
      // Deno unlinks the path itself; make sure, without touching a socket that is not ours.
      if (bound !== null && identity(path) === bound) {
        try {
          Deno.removeSync(path);
        } catch { /* gone meanwhile */ }
      }
    },
    ref: () => listener.ref(),
    unref: () => listener.unref(),
  };
}

// Which file is at `path` (device and inode), or null if none or unknown (Windows).
function identity(path: string): string | null {
  try {
    const info = Deno.lstatSync(path);
    return info.ino === null || !info.isSocket ? null : `${info.dev}:${info.ino}`;
  } catch {
    return null;
  }
}

// `path` could not be bound (EADDRINUSE): remove it if it is a socket nobody listens on, or
// throw AddrInUse saying why not.
async function removeIfStale(path: string, cause: Error): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return; // gone meanwhile: bind again
    throw err;
  }
  if (!info.isSocket) {
    throw new Deno.errors.AddrInUse(`unix: ${path} exists and is not a socket; not replacing it`, {
      cause,
    });
  }
  try {
    const probe = await withTimeout(
      Deno.connect({ transport: "unix", path }),
      PROBE_MS,
      `unix: probe of ${path}`,
      (late) => late.close(),
    );
    probe.close();
  } catch (err) {
    if (err instanceof Deno.errors.ConnectionRefused) {
      // Stale: left by a process that ended without closing its listener (killed).
      try {
        Deno.removeSync(path);
      } catch (gone) {
        if (!(gone instanceof Deno.errors.NotFound)) throw gone;
      }
      return;
    }
    if (err instanceof Deno.errors.NotFound) return;
    // Anything else (a full backlog, no answer): something may hold it; do not take it away.
    throw new Deno.errors.AddrInUse(
      `unix: ${path} is a socket that could not be checked (${
        describeReason(err)
      }); not replacing it`,
      { cause: err },
    );
  }
  throw new Deno.errors.AddrInUse(`unix: ${path} is in use by a live server`, { cause });
}

// Deno reports an unnamed socket (a client's own end) with path null; the type says string.
function named(conn: Deno.UnixConn): Deno.UnixConn {
  if (conn.remoteAddr.path == null) {
    Object.defineProperty(conn, "remoteAddr", { value: { transport: "unix", path: "" } });
  }
  if (conn.localAddr.path == null) {
    Object.defineProperty(conn, "localAddr", { value: { transport: "unix", path: "" } });
  }
  return conn;
}
