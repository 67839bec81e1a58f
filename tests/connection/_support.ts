// Helpers of the connection driver's suites (tests/connection/*_test.ts), which run over the
// in-process memory transport: lines() servers and clients, handlers that idle, echo or collect,
// a transport that counts reads and writes. Tests synchronise on events and promises; timers
// appear only as the thing under test (or as a named "marker" timer whose firing orders the
// other events). The general helpers (../_support.ts) are re-exported from here.

import {
  type Conn,
  connect,
  type Connection,
  type ConnectOptions,
  type Event,
  type Handler,
  type HandlerGenerator,
  lines,
  memory,
  send,
  serve,
  type ServeOptions,
  type Server,
  type Transport,
} from "../../mod.ts";
import { acceptingWith, Inbox } from "../_support.ts";

export * from "../_support.ts";

/** How long a test waits for an inbox's next value (ms). */
export const NEXT_MS = 2000;

let names = 0;
/** A memory transport on a name no other test uses. */
export function transportFor(label: string, bufferSize?: number): Transport {
  return memory(`connection-test-${label}-${++names}`, bufferSize ? { bufferSize } : {});
}

/** A lines() server whose connections (their handles, in accept order) land in `conns`. */
export async function lineServer(
  transport: Transport,
  handler: Handler<string>,
  options: Partial<ServeOptions<string>> = {},
): Promise<
  {
    server: Server<string>;
    conns: Inbox<Connection<string>>;
    [Symbol.asyncDispose](): Promise<void>;
  }
> {
  const conns = new Inbox<Connection<string>>(NEXT_MS);
  const seen = new WeakSet<Connection<string>>();
  const server = await serve((conn: Connection<string>, state?: unknown) => {
    if (!seen.has(conn)) {
      seen.add(conn);
      conns.push(conn);
    }
    return handler(conn, state);
  }, { transport, framing: lines(), shutdownTimeout: 200, ...options });
  return { server, conns, [Symbol.asyncDispose]: () => server.stop() };
}

export function lineClient(
  transport: Transport,
  handler: Handler<string>,
  options: Partial<ConnectOptions<string>> = {},
): Promise<Connection<string>> {
  return connect(handler, {
    transport,
    framing: lines(),
    shutdownTimeout: 200,
    ...options,
  });
}

/** Waits for events; ends on shutdown or disconnect. */
export async function* idle(): HandlerGenerator<string> {
  for (;;) {
    const ev: Event<string> = yield;
    if (ev.type === "shutdown" || ev.type === "disconnect") return;
  }
}

/** Echoes every line; ends on shutdown or disconnect. */
export async function* echo(): HandlerGenerator<string> {
  let ev: Event<string> = yield;
  for (;;) {
    if (ev.type === "packet") ev = yield send(ev.data);
    else if (ev.type === "shutdown" || ev.type === "disconnect") return;
    else ev = yield;
  }
}

/** A client that queues every line it receives in `lines`. */
export function collector(): { lines: Inbox<string>; handler: Handler<string> } {
  const got = new Inbox<string>(NEXT_MS);
  return {
    lines: got,
    handler: async function* (): HandlerGenerator<string> {
      for (;;) {
        const ev: Event<string> = yield;
        if (ev.type === "packet") got.push(ev.data);
        else if (ev.type === "shutdown" || ev.type === "disconnect") return;
      }
    },
  };
}

/** A client that queues every event in `events`, and ends on shutdown. */
export function eventCollector(): { events: Inbox<Event<string>>; handler: Handler<string> } {
  const events = new Inbox<Event<string>>(NEXT_MS);
  return {
    events,
    handler: async function* (): HandlerGenerator<string> {
      for (;;) {
        const ev: Event<string> = yield;
        if (ev.type === "shutdown") return;
        events.push(ev);
      }
    },
  };
}

/** Reads a raw socket to end of stream. */
export async function readToEnd(sock: Conn): Promise<string> {
  const text = new TextDecoder();
  const buf = new Uint8Array(4096);
  let out = "";
  for (;;) {
    const n = await sock.read(buf);
    if (n === null) return out + text.decode();
    out += text.decode(buf.subarray(0, n), { stream: true });
  }
}

export interface Counts {
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
}

/** Wraps a Conn to count its reads and writes. */
class CountingConn implements Conn {
  readonly counts: Counts = { reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0 };
  constructor(readonly inner: Conn) {}
  get localAddr() {
    return this.inner.localAddr;
  }
  get remoteAddr() {
    return this.inner.remoteAddr;
  }
  async read(p: Uint8Array): Promise<number | null> {
    const n = await this.inner.read(p);
    if (n !== null) {
      this.counts.reads++;
      this.counts.bytesRead += n;
    }
    return n;
  }
  async write(p: Uint8Array): Promise<number> {
    this.counts.writes++;
    const n = await this.inner.write(p);
    this.counts.bytesWritten += n;
    return n;
  }
  closeWrite(): Promise<void> {
    return this.inner.closeWrite();
  }
  close(): void {
    this.inner.close();
  }
}

/** A transport whose accepted and connected sockets count their reads and writes. */
export function counting(
  base: Transport,
): { transport: Transport; accepted: Counts[]; connected: Counts[] } {
  const accepted: Counts[] = [];
  const connected: Counts[] = [];
  const countAccepted = (inner: Conn) => {
    const conn = new CountingConn(inner);
    accepted.push(conn.counts);
    return conn;
  };
  const transport: Transport = {
    ...acceptingWith(base, countAccepted, `counting-${base.name}`),
    async connect(options) {
      const conn = new CountingConn(await base.connect(options));
      connected.push(conn.counts);
      return conn;
    },
  };
  return { transport, accepted, connected };
}

export const encoder = new TextEncoder();

/** A short text for an event, to compare sequences of events. */
export function label(ev: Event<string>): string {
  switch (ev.type) {
    case "packet":
      return `packet ${ev.data}`;
    case "cast":
    case "info":
      return `${ev.type} ${ev.message}`;
    case "call":
      return `call ${ev.message}`;
    case "timeout":
      return ev.name === undefined ? "timeout" : `timeout ${ev.name}`;
    case "shutdown":
      return `shutdown ${ev.reason}`;
    case "disconnect":
      return ev.error ? `disconnect ${ev.error.name}` : "disconnect";
    default:
      return ev.type;
  }
}
