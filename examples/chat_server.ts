/**
 * A line-based chat server that a person can use with `nc localhost 7000`.
 *
 *     PORT=7000 deno run --allow-net --allow-env examples/chat_server.ts
 *
 * Commands: `/nick NAME` (names are unique), `/msg NAME TEXT`, `/who`, `/quit`; any other
 * line goes to everyone. Idle users are warned, then disconnected.
 *
 * @module
 */

import {
  type Connection,
  defaultRegistry,
  type Event,
  type Framing,
  type Handler,
  lines,
  type Registry,
  send,
  serve,
  type Server,
  setTimeout,
  stop,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { stopOnSignals } from "./_stop_on_signals.ts";

/** Options of {@linkcode chatServer}. */
export interface ChatOptions {
  /** Port to listen on (default 7000; 0 for any). */
  port?: number;
  /** Address to bind (default: every address, IPv6 and IPv4). */
  hostname?: string;
  /** Silence after which a user is warned (default 5 minutes). */
  idleWarnMs?: number;
  /** Further silence after the warning before the user is disconnected (default 1 minute). */
  idleKickMs?: number;
  /** The server's name, the owner of its users in the registry (default `"chat"`). */
  name?: string;
  /** Where names are registered (default: the process's memory registry). */
  registry?: Registry;
  /** How to listen (default TCP). */
  transport?: Transport;
  /** Called with the address once listening. */
  onListen?: (addr: Deno.Addr | { transport: "memory"; name: string }) => void;
  /** Share the port with other processes (SO_REUSEPORT; needs `--unstable-net`). */
  reusePort?: boolean;
  /**
   * Also deliver a line meant for everyone elsewhere: to the users of the other processes of
   * a cluster (see `examples/cluster.ts`). Lines go to this server's users in any case.
   */
  relay?: (line: string) => void;
}

const NAME = /^[A-Za-z0-9_-]{1,20}$/;
const CONNECTION_ID = /^c\d+$/;

// Lines from users are limited to 4096 bytes; what the server sends may be longer (a relayed
// line carries its sender's name, /who lists everyone), so sending has a looser bound. Bytes
// that are not UTF-8 become U+FFFD rather than costing the user the connection.
const MAX_LINE = 4096;
/** The chat's framing: lines, read up to 4096 bytes (longer ones end the user), lenient UTF-8. */
export const CHAT_FRAMING: Framing<string> = {
  ...lines({ maxLength: 1024 * 1024 }),
  decoder: lines({ maxLength: MAX_LINE, invalidUtf8: "replace" }).decoder,
};

/** Options of {@linkcode chatHandler}. */
export interface ChatHandlerOptions {
  /** Where names are registered, and where `/who` and `/msg` look. */
  registry: Registry;
  /** The owner of the chat's connections in the registry (the server's name). */
  owner: string;
  /** Silence after which a user is warned (default 5 minutes). */
  idleWarnMs?: number;
  /** Further silence after the warning before the user is disconnected (default 1 minute). */
  idleKickMs?: number;
  /** Deliver `line` to everyone with a name but `except`. */
  broadcast(line: string, except: Connection<string>): void;
}

/**
 * The chat's handler on its own (to serve with {@linkcode CHAT_FRAMING}): what
 * {@linkcode chatServer} serves, and what examples/chat_workers.ts runs on Workers.
 */
export function chatHandler(options: ChatHandlerOptions): Handler<string> {
  const warnAfter = options.idleWarnMs ?? 5 * 60_000;
  const kickAfter = options.idleKickMs ?? 60_000;
  const { registry, broadcast } = options;

  async function* chatter(conn: Connection<string>): AsyncGenerator<Yielded, void, Event<string>> {
    let warned = false;
    let ev = yield [
      send("* welcome! choose a name with /nick NAME; /who lists people, /msg NAME TEXT whispers"),
      setTimeout(warnAfter, "idle"),
    ];
    try {
      for (;;) {
        if (ev.type === "timeout" && ev.name === "idle") {
          if (warned) {
            yield [send("* disconnected for inactivity"), stop()];
            return;
          }
          warned = true;
          ev = yield [
            send(`* you have been idle; you will be disconnected in ${kickAfter / 1000} s`),
            setTimeout(kickAfter, "idle"),
          ];
          continue;
        }
        if (ev.type === "disconnect") return;
        if (ev.type === "frameError") {
          // A line over the limit: say so before the connection ends.
          yield [send(`* line too long (the limit is ${MAX_LINE} bytes); goodbye`), stop()];
          return;
        }
        if (ev.type === "shutdown") {
          yield [send("* the server is shutting down"), stop()];
          return;
        }
        if (ev.type !== "packet") {
          ev = yield;
          continue;
        }
        warned = false;
        const line = ev.data.trim();
        const out: string[] = [];
        if (line === "") {
          // nothing to say
        } else if (line === "/nick" || line.startsWith("/nick ")) {
          const name = line.slice(5).trim();
          const old = conn.name;
          if (!NAME.test(name)) {
            out.push("* a name is 1 to 20 letters, digits, - or _");
          } else if (CONNECTION_ID.test(name)) {
            // The registry keeps names apart from connection ids (c1, c2, …), which it refuses.
            out.push(`* the name ${name} is reserved`);
          } else if (name === old) {
            out.push(`* you are already ${name}`);
          } else if (await conn.register(name)) {
            out.push(`* you are now ${name}`);
            broadcast(old ? `* ${old} is now known as ${name}` : `* ${name} joined`, conn);
          } else {
            out.push(`* the name ${name} is taken`);
          }
        } else if (line === "/who") {
          const entries = await registry.list({ owner: options.owner });
          const people = entries.flatMap((entry) => entry.name ? [entry.name] : []);
          out.push(`* online: ${people.sort().join(", ") || "nobody with a name yet"}`);
        } else if (line === "/quit") {
          yield [send("* bye"), stop()];
          return;
        } else if (conn.name === undefined) {
          out.push("* choose a name first: /nick NAME");
        } else if (line.startsWith("/msg ")) {
          // The text is the rest of the line after the name and the blanks that follow it,
          // exactly as typed (runs of spaces, tabs).
          const [, to, text = ""] = /^\/msg\s+(\S+)\s*(.*)$/s.exec(line)!;
          // By name only: `lookup` also finds connections by id, unnamed ones included.
          const found = await registry.lookup(to);
          const target = found?.name === to ? found : undefined;
          if (!target || text === "") {
            out.push(target ? "* usage: /msg NAME TEXT" : `* nobody is called ${to}`);
          } else {
            target.send(`*${conn.name}* ${text}`);
            out.push(`-> ${to}: ${text}`);
          }
        } else if (line.startsWith("/")) {
          out.push("* commands: /nick NAME, /msg NAME TEXT, /who, /quit");
        } else {
          broadcast(`<${conn.name}> ${line}`, conn);
        }
        ev = yield [...out.map((text) => send(text)), setTimeout(warnAfter, "idle")];
      }
    } finally {
      if (conn.name !== undefined) broadcast(`* ${conn.name} left`, conn);
    }
  }
  return chatter;
}

/** Start a chat server. */
export async function chatServer(options: ChatOptions = {}): Promise<Server<string>> {
  const room: { server?: Server<string> } = {};
  const registry = options.registry ?? defaultRegistry;
  const name = options.name ?? "chat";

  // Everyone with a name, but `except`.
  function broadcast(line: string, except?: Connection<string>): void {
    for (const other of room.server?.connections() ?? []) {
      if (other !== except && other.name !== undefined) other.send(line);
    }
    options.relay?.(line);
  }

  const chatter = chatHandler({
    registry,
    owner: name,
    idleWarnMs: options.idleWarnMs,
    idleKickMs: options.idleKickMs,
    broadcast,
  });
  const server = await serve(chatter, {
    port: options.port ?? 7000,
    hostname: options.hostname,
    framing: CHAT_FRAMING,
    registry,
    transport: options.transport,
    name,
    onListen: options.onListen,
    reusePort: options.reusePort,
  });
  room.server = server;
  return server;
}

if (import.meta.main) {
  const port = Number(Deno.env.get("PORT") ?? 7000);
  const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
  const server = await chatServer({
    port,
    onListen: (addr) => {
      if (addr.transport === "tcp") {
        const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
        console.log(`chat server listening on ${host}:${addr.port}`);
        console.log(`talk to it with: nc localhost ${addr.port}`);
      }
    },
  });
  await stop.until(server);
}
