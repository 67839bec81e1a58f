/**
 * TCP over `Deno.listen` and `Deno.connect`.
 *
 * @module
 */

import type { ConnectOptions, Listener, ListenOptions, Transport } from "./transport.ts";
import { checkBacklog, checkReusePort, type DualStack, listenEveryAddress } from "./_listen_any.ts";
import { OptionCheck } from "../_options.ts";

/** Options of {@linkcode tcp}. */
export interface TcpOptions {
  /** Disable Nagle's algorithm on every connection (default `true`: frames go out at once). */
  noDelay?: boolean;
  /**
   * Turn on TCP keep-alive probes on every connection (default off), so that a peer that
   * vanished without a FIN or RST is noticed while the connection is idle. Deno can only turn
   * them on: when and how often they are sent is the operating system's setting (on Linux
   * `net.ipv4.tcp_keepalive_time`, 7200 s by default, then `tcp_keepalive_intvl` and
   * `tcp_keepalive_probes`); there is no `keepAliveInitialDelay` as in Node.
   */
  keepAlive?: boolean;
  /** How many connections the system queues for accept (the listen backlog; default 511). */
  backlog?: number;
}

/**
 * Plain TCP: the default transport.
 *
 * Without a `hostname`, `listen` binds the IPv6 any-address `::` and, as Node does, so takes
 * IPv4 connections as well where the system lets one socket serve both (Linux and macOS by
 * default); their remote addresses then read `::ffff:a.b.c.d` (IPv4-mapped). Where `::`
 * would take IPv6 only (Windows, `net.ipv6.bindv6only=1`) or cannot be bound (IPv6 off, no
 * permission), it binds `0.0.0.0`, IPv4 only.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { serve, tcp } from "../mod.ts";
 * const server = await serve(async function* () {}, {
 *   hostname: "127.0.0.1",
 *   port: 0,
 *   transport: tcp({ keepAlive: true }),
 * });
 * assert.equal(server.addr.transport, "tcp");
 * assert.ok((server.addr as Deno.NetAddr).port > 0);
 * await server.stop();
 * ```
 */
export function tcp(options: TcpOptions = {}): Transport<Deno.NetAddr> {
  const check = new OptionCheck("tcp", options);
  check.boolean("noDelay");
  check.boolean("keepAlive");
  const noDelay = options.noDelay ?? true;
  const keepAlive = options.keepAlive ?? false;
  const tcpBacklog = options.backlog;
  checkBacklog("tcp", tcpBacklog);
  const dualStack: DualStack = {};

  const setUp = (conn: Deno.TcpConn): Deno.TcpConn => {
    try {
      conn.setNoDelay(noDelay);
      if (keepAlive) conn.setKeepAlive(true);
    } catch (err) {
      conn.close(); // the peer is already gone: do not leak its socket
      throw err;
    }
    return conn;
  };

  return {
    name: "tcp",
    listen({ hostname, port = 0, reusePort }: ListenOptions): Listener<Deno.NetAddr> {
      checkReusePort(reusePort);
      const bind = (host: string, at: number) =>
        Deno.listen({ transport: "tcp", hostname: host, port: at, reusePort, tcpBacklog });
      const listener = hostname === undefined
        ? listenEveryAddress(bind, port, dualStack)
        : bind(hostname, port);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        ref: () => listener.ref(),
        unref: () => listener.unref(),
        accept: async () => setUp(await listener.accept()),
      };
    },
    async connect({ hostname = "127.0.0.1", port }: ConnectOptions) {
      if (port === undefined) throw new TypeError("tcp connect needs a port");
      return setUp(await Deno.connect({ transport: "tcp", hostname, port }));
    },
  };
}
