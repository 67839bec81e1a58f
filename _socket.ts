// Small operations on a socket that the driver, the client, the server and the transports share.

import type { Addr } from "./transport/transport.ts";

/** Close a socket that may be closed already. */
export function closeQuietly(socket: { close(): void }): void {
  try {
    socket.close();
  } catch { /* already closed */ }
}

/** Write all of `bytes`, however many writes that takes. */
export async function writeAll(
  socket: { write(p: Uint8Array): Promise<number> },
  bytes: Uint8Array,
): Promise<void> {
  while (bytes.length > 0) bytes = bytes.subarray(await socket.write(bytes));
}

/** A short text for an address, for logs and messages. */
export function formatAddr(addr: Addr): string {
  switch (addr.transport) {
    case "tcp":
    case "udp":
      return addr.hostname.includes(":")
        ? `[${addr.hostname}]:${addr.port}`
        : `${addr.hostname}:${addr.port}`;
    case "unix":
    case "unixpacket":
      return addr.path;
    case "memory":
      return `memory:${addr.name}`;
    default:
      return JSON.stringify(addr);
  }
}
