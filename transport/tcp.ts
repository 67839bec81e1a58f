/**
 * TCP over `Deno.listen` and `Deno.connect`.
 *
 * @module
 */

import type { ConnectOptions, Listener, ListenOptions, Transport } from "./transport.ts";

/** Options of {@linkcode tcp}. */
export interface TcpOptions {
  /** Disable Nagle's algorithm on every connection (default `true`: frames go out at once). */
  noDelay?: boolean;
}

/**
 * Plain TCP: the default transport.
 *
 * @example
 * ```ts
 * import { serve, tcp } from "../mod.ts";
 * const server = await serve(async function* () {}, { port: 0, transport: tcp() });
 * await server.stop();
 * ```
 */
export function tcp(options: TcpOptions = {}): Transport {
  const noDelay = options.noDelay ?? true;
  return {
    name: "tcp",
    listen({ hostname = "0.0.0.0", port = 0, reusePort }: ListenOptions): Listener {
      // Without --unstable-net, Deno.listen({ reusePort: true }) exits the whole process (code
      // 70) instead of throwing; Deno.listenDatagram is gated by the same flag, so check it.
      if (reusePort && !("listenDatagram" in Deno)) {
        throw new Deno.errors.NotSupported(
          'reusePort (and acceptors > 1) needs --unstable-net, or "unstable": ["net"] in deno.json',
        );
      }
      const listener = Deno.listen({ transport: "tcp", hostname, port, reusePort });
      return {
        addr: listener.addr,
        close: () => listener.close(),
        async accept() {
          const conn = await listener.accept();
          try {
            conn.setNoDelay(noDelay);
          } catch (err) {
            conn.close(); // the peer is already gone: do not leak its socket
            throw err;
          }
          return conn;
        },
      };
    },
    async connect({ hostname = "127.0.0.1", port }: ConnectOptions) {
      if (port === undefined) throw new TypeError("tcp connect needs a port");
      const conn = await Deno.connect({ transport: "tcp", hostname, port });
      conn.setNoDelay(noDelay);
      return conn;
    },
  };
}
