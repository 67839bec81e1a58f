/**
 * `connect()`: open a connection and drive it with a handler generator, as a server does.
 *
 * @module
 */

import type { FrameOf, Handler } from "./actions.ts";
import type { Connection, Logger, Mode } from "./connection.ts";
import { NameTaken } from "./errors.ts";
import type { Framing, FramingFor } from "./framing.ts";
import { defaultRegistry, isConnectionId, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import type { Transport } from "./transport/transport.ts";
import { encodeProxyHeader, type ProxyHeaderInit } from "./transport/proxy.ts";
import { Driver } from "./_driver.ts";
import { closeQuietly, formatAddr, writeAll } from "./_socket.ts";
import { checkConnectionSettings, checkHandler, driverOptions, OptionCheck } from "./_options.ts";
import { withTimeout } from "./_with_timeout.ts";

/** Options of {@linkcode connect}. */
export interface ConnectOptions<T = Uint8Array> {
  /** Server host (default `"127.0.0.1"`). */
  hostname?: string;
  /** Server port. */
  port?: number;
  /** How to connect (default `tcp()`). */
  transport?: Transport;
  /** How bytes become frames (default `raw()`). */
  framing?: Framing<T>;
  /** `"active"` (default) or `"passive"`. */
  mode?: Mode;
  /** Active mode: frames the mailbox may hold before reading pauses (default 1: read on once the handler has acted on every frame read). */
  highWaterMark?: number;
  /** Milliseconds the connect (and any handshake) may take (default 10000). */
  connectTimeout?: number;
  /**
   * Register the connection under this name before its handler runs; the connect rejects with
   * `NameTaken` if the name is taken (and the handler never runs).
   */
  name?: string;
  /** Where the connection is recorded (default: the process's memory registry). */
  registry?: Registry;
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  shutdownTimeout?: number;
  /**
   * The default event timeout (off unless set): after this many ms without an event, while the
   * handler has armed no event timeout of its own, the connection gets `shutdown` with reason
   * `"idle"`.
   */
  idleTimeout?: number;
  /** Bytes that may be pending when a send comes from outside the handler (default 8 MiB); see `ServeOptions.maxBuffered`. */
  maxBuffered?: number;
  /** `"stop"` (default): end the connection when `maxBuffered` is passed; `"throw"`: the send throws `BufferFull`. */
  onBufferFull?: "stop" | "throw";
  /** Where an abnormal end is reported (default `console`). */
  logger?: Logger;
  /**
   * Send this PROXY protocol header (v1 or v2) first, right after connecting and before the
   * handler runs, as a proxy does, for a server with `proxyProtocol: true`. Checked before
   * connecting (`encodeProxyHeader`'s errors); the write is bounded by `connectTimeout`. Not
   * over a transport with a handshake of its own (TLS: the header would have to go out in plain
   * text before it), which rejects with `Deno.errors.NotSupported`.
   */
  proxyHeader?: ProxyHeaderInit;
}

/**
 * Connect to a server and run `handler` for the connection; resolves with the connection's
 * handle once connected. Fails with `TimeoutError` after `connectTimeout`, `NameTaken` if
 * `name` is held. The handle's `closed` resolves with the close reason; its `done` rejects if
 * the connection ends abnormally (a frame too large, a crash of the handler). Frame types are
 * checked as with {@linkcode serve}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, lines, memory, send, serve } from "./mod.ts";
 * const transport = memory("client-doc");
 * const server = await serve(async function* () {
 *   const ev = yield;
 *   if (ev.type === "packet") yield send(`you said ${ev.data}`);
 * }, { transport, framing: lines() });
 * const got = Promise.withResolvers<string>();
 * const client = await connect(async function* () {
 *   const ev = yield send("hello");
 *   if (ev.type === "packet") got.resolve(ev.data);
 * }, { transport, framing: lines() });
 * assert.equal(await got.promise, "you said hello");
 * await client.closed;
 * await server.stop();
 * ```
 */
// deno-lint-ignore no-explicit-any
export async function connect<H extends Handler<any>>(
  handler: H,
  options?: ConnectOptions<FrameOf<H>> & FramingFor<FrameOf<H>>,
): Promise<Connection<FrameOf<H>>> {
  type T = FrameOf<H>;
  options ??= {} as ConnectOptions<T> & FramingFor<T>;
  checkConnectOptions(handler, options);
  const transport = options.transport ?? tcp();
  const timeout = options.connectTimeout ?? 10_000;
  const target = `connect to ${describeTarget(transport, options)}`;
  const proxyHeader = options.proxyHeader === undefined
    ? undefined
    : encodeProxyHeader(options.proxyHeader);
  const socket = await withTimeout(
    transport.connect({ hostname: options.hostname, port: options.port }),
    timeout,
    target,
    (late) => late.close(),
  );
  const registry = options.registry ?? defaultRegistry;
  let driver: Driver<T>;
  try {
    if (proxyHeader) {
      if (socket.handshake !== undefined) {
        throw new Deno.errors.NotSupported(
          "connect: proxyHeader over a transport with a handshake (TLS) is not supported",
        );
      }
      await withTimeout(writeAll(socket, proxyHeader), timeout, `${target}: PROXY header`);
    }
    if (socket.handshake !== undefined) {
      await withTimeout(socket.handshake(), timeout, `${target}: handshake`);
    }
    driver = new Driver(
      socket,
      handler,
      driverOptions(options, {
        registry,
        owner: "client",
        kind: "client",
        handshakeTimeout: timeout,
      }),
    );
  } catch (err) {
    closeQuietly(socket); // whatever failed before the handler could run costs this socket only
    throw err;
  }
  await driver.enroll();
  // The name is claimed before the handler runs: a connect that fails sends nothing.
  if (options.name !== undefined) {
    let claimed: boolean;
    try {
      claimed = await driver.register(options.name);
    } catch (err) {
      await driver.discard(err);
      throw err;
    }
    if (!claimed) {
      const err = new NameTaken(options.name);
      await driver.discard(err);
      throw err;
    }
  }
  driver.start();
  return driver.handle;
}

// What a connect is to, for messages: the transport's own words, not a TCP default.
function describeTarget(
  transport: Transport,
  options: { hostname?: string; port?: number },
): string {
  if (transport.name === "tcp" || options.port !== undefined) {
    return formatAddr({
      transport: "tcp",
      hostname: options.hostname ?? "127.0.0.1",
      port: options.port ?? 0,
    });
  }
  return options.hostname !== undefined ? `${transport.name}:${options.hostname}` : transport.name;
}

function checkConnectOptions(handler: unknown, options: unknown): void {
  checkHandler("connect", handler);
  const check = new OptionCheck("connect", options);
  check.port("port");
  check.string("hostname");
  check.methods("transport", ["listen", "connect"], " (such as tcp() or memory(name))");
  check.delay("connectTimeout");
  const name = (options as ConnectOptions).name;
  if (typeof name === "string" && isConnectionId(name)) {
    throw new TypeError(
      `connect: option name ${
        JSON.stringify(name)
      } looks like a connection id; ids and names share lookup()`,
    );
  }
  checkConnectionSettings(check);
}
