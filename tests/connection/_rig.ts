// A server on a memory transport of its own, a raw peer socket, and the server side of it: the
// rig of the driver's edge-case tests.

import {
  type Conn,
  type Connection,
  type Handler,
  lines,
  memory,
  serve,
  type ServeOptions,
  type Server,
  type Transport,
} from "../../mod.ts";
import { capturingLogger, Inbox, within } from "../_support.ts";

export { acceptingWith } from "../_support.ts";

let rigs = 0;

/** A memory transport on a name no other test uses. */
export function freshMemory(label: string, bufferSize?: number): Transport {
  return memory(`rig-${label}-${++rigs}`, bufferSize ? { bufferSize } : {});
}

/** A lines() server over its own memory transport; each connection lands in `conns` as it starts. */
export async function lineRig(
  label: string,
  handler: Handler<string>,
  options: Partial<ServeOptions<string>> & { bufferSize?: number } = {},
): Promise<{
  server: Server<string>;
  transport: Transport;
  conns: Inbox<Connection<string>>;
  logger: ReturnType<typeof capturingLogger>;
  /** A raw peer and the server side of it. */
  open(): Promise<{ peer: Conn; conn: Connection<string> }>;
  [Symbol.asyncDispose](): Promise<void>;
}> {
  const transport = freshMemory(label, options.bufferSize);
  const conns = new Inbox<Connection<string>>(3000);
  const logger = capturingLogger();
  const server = await serve(handler, {
    transport,
    framing: lines(),
    logger,
    shutdownTimeout: 1000,
    onConnection: (conn) => conns.push(conn),
    ...options,
  });
  return {
    server,
    transport,
    conns,
    logger,
    async open() {
      const peer = await transport.connect({});
      return { peer, conn: await conns.next(3000, "the server side starts") };
    },
    [Symbol.asyncDispose]: () => within(10_000, server.stop(), "server stop"),
  };
}

const utf8 = new TextEncoder();

/** Write `text` to a raw socket, whole. */
export async function writeText(peer: Conn, text: string): Promise<void> {
  let bytes = utf8.encode(text);
  while (bytes.length > 0) bytes = bytes.subarray(await peer.write(bytes));
}

/** Read from a raw socket until it has `want` (a string) or the stream ends; returns what came. */
export async function readUntil(peer: Conn, want: string, ms = 3000): Promise<string> {
  const decoder = new TextDecoder();
  let got = "";
  const buf = new Uint8Array(4096);
  const reading = (async () => {
    while (!got.includes(want)) {
      const n = await peer.read(buf);
      if (n === null) break;
      got += decoder.decode(buf.subarray(0, n), { stream: true });
    }
    return got;
  })();
  return await within(ms, reading, `reading ${JSON.stringify(want)}`);
}

/** Resolves once `condition()` holds (polled: for states that have no event), within `ms`. */
export async function until(condition: () => boolean, what: string, ms = 3000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
