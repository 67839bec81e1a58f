// Switching a live plain TCP connection to TLS, client side (STARTTLS), with Deno.startTls.

import type { StartTlsOptions } from "./actions.ts";
import { ProtocolError } from "./errors.ts";
import type { Conn } from "./transport/transport.ts";

/** The TLS connection that `socket` (a plain TCP client connection) becomes; `socket` is spent. */
export async function startTlsOn(socket: Conn, options: StartTlsOptions): Promise<Conn> {
  // Deno.startTls takes Deno's own TCP connection (not a wrapper, not one already TLS).
  if (
    socket.remoteAddr.transport !== "tcp" || socket.alpnProtocol !== undefined ||
    typeof socket.setNoDelay !== "function"
  ) {
    throw new ProtocolError("startTls: only a plain TCP connection (the tcp() transport) can switch");
  }
  const tls = await Deno.startTls(socket as Deno.TcpConn, {
    hostname: options.hostname ?? socket.remoteAddr.hostname,
    caCerts: options.caCerts,
    alpnProtocols: options.alpnProtocols,
  });
  try {
    const { alpnProtocol } = await tls.handshake();
    return Object.defineProperty(tls, "alpnProtocol", { value: alpnProtocol }) as Conn;
  } catch (err) {
    try {
      tls.close();
    } catch { /* already closed */ }
    throw err;
  }
}
