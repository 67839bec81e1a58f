/**
 * `connect()`: open a connection and drive it with a handler generator, as a server does.
 *
 * @module
 */

import type { Handler } from "./actions.ts";
import {
  closeQuietly,
  type Connection,
  createConnection,
  driverOptions,
  type Logger,
  type Mode,
} from "./connection.ts";
import type { Framing } from "./framing.ts";
import { defaultRegistry, type Registry } from "./registry.ts";
import { tcp } from "./transport/tcp.ts";
import type { Transport } from "./transport/transport.ts";
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
  /** Register the connection under this name; the connect fails if the name is taken. */
  name?: string;
  /** Where the connection is recorded (default: the process's memory registry). */
  registry?: Registry;
  /** Milliseconds the handler has to finish after `shutdown` before it is forced (default 5000). */
  shutdownTimeout?: number;
  /** Where an abnormal end is reported (default `console`). */
  logger?: Logger;
}

/**
 * Connect to a server and run `handler` for the connection; resolves with the connection's
 * handle once connected. Fails with `TimeoutError` after `connectTimeout`.
 *
 * @example
 * ```ts
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
 * console.assert(await got.promise === "you said hello");
 * await client.closed;
 * await server.stop();
 * ```
 */
export async function connect<T = Uint8Array>(
  handler: Handler,
  options: ConnectOptions<T> = {},
): Promise<Connection<T>> {
  const transport = options.transport ?? tcp();
  const timeout = options.connectTimeout ?? 10_000;
  const target = `connect to ${options.hostname ?? "127.0.0.1"}:${options.port ?? ""}`;
  const socket = await withTimeout(
    transport.connect({ hostname: options.hostname, port: options.port }),
    timeout,
    target,
    (late) => late.close(),
  );
  const handshake = (socket as { handshake?: () => Promise<unknown> }).handshake;
  if (typeof handshake === "function") {
    try {
      await withTimeout(handshake.call(socket), timeout, `${target}: handshake`);
    } catch (err) {
      closeQuietly(socket);
      throw err;
    }
  }
  const registry = options.registry ?? defaultRegistry;
  const driver = createConnection(
    socket,
    handler,
    driverOptions(options, { registry, owner: "client", kind: "client" }),
  );
  driver.start();
  if (options.name !== undefined && !(await driver.handle.register(options.name))) {
    await driver.shutdown("name taken", 0);
    throw new Error(`name "${options.name}" is already registered`);
  }
  return driver.handle;
}
