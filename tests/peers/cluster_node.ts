// A node of a KvRegistry cluster, run as its own process by tests/cluster_test.ts.
//
//   deno run -A --unstable-kv tests/peers/cluster_node.ts '<config JSON>'
//
// Config: { kv, namespace, node, linkHostname, secret?, heartbeatMs, nodeTtlMs, conns }. It
// opens the registry, starts `conns` connections (a lines() server over a memory transport
// and as many clients of it), prints one line `{"ready":…}` and then answers commands, one
// JSON object a line on stdin, with one JSON line each on stdout: `{ seq, value }` or
// `{ seq, error: { name, message } }`. Commands (`op`):
//   register { index, name }   conns[index].register(name)
//   list { filter }            registry.list(filter)
//   lookup { target }          { id, name } of registry.lookup(target), or null
//   hold { target }            look up and keep a handle (for use after its node dies)
//   call { target, message, timeout?, held? }   (the server-side handlers answer a call
//                              with { by: their id, node, got: message }; "silent" not at all)
//   cast / info / send { target, message, held? }
//   events { index }           the next cast or info conns[index] got
//   received { index }         the next line clients[index] got
//   exit                       close the registry (its entries leave the store), exit 0

import {
  connect,
  type Connection,
  type ConnectionRef,
  type Event,
  type HandlerGenerator,
  KvRegistry,
  lines,
  memory,
  reply,
  serve,
} from "../../mod.ts";

interface Config {
  kv: string;
  namespace: string;
  node: string;
  linkHostname: string;
  secret?: string;
  heartbeatMs: number;
  nodeTtlMs: number;
  conns: number;
}

const config = JSON.parse(Deno.args[0]) as Config;
const quiet = { error() {}, warn() {}, debug() {} };
const registry = await KvRegistry.open(config.kv, {
  namespace: config.namespace,
  node: config.node,
  heartbeatMs: config.heartbeatMs,
  nodeTtlMs: config.nodeTtlMs,
  secret: config.secret,
  link: { hostname: config.linkHostname },
  logger: quiet,
});

/** A queue whose `next()` waits (bounded) for the next value. */
class Queue<V> {
  readonly #items: V[] = [];
  readonly #waiters: Array<(v: V) => void> = [];
  push(v: V): void {
    const waiter = this.#waiters.shift();
    if (waiter) waiter(v);
    else this.#items.push(v);
  }
  next(ms = 5000): Promise<V> {
    if (this.#items.length > 0) return Promise.resolve(this.#items.shift()!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nothing within ${ms} ms`)), ms);
      this.#waiters.push((v) => {
        clearTimeout(timer);
        resolve(v);
      });
    });
  }
}

const transport = memory("cluster-node");
const started: Connection<string>[] = [];
const events = new Map<string, Queue<unknown>>();
const server = await serve(async function* (conn): HandlerGenerator<string> {
  const mine = new Queue<unknown>();
  events.set(conn.id, mine);
  started.push(conn);
  for (let ev: Event<string> = yield;;) {
    if (ev.type === "call") {
      ev = ev.message === "silent"
        ? yield
        : yield reply(ev.from, { by: conn.id, node: registry.node, got: ev.message });
    } else if (ev.type === "cast" || ev.type === "info") {
      mine.push({ type: ev.type, message: ev.message });
      ev = yield;
    } else if (ev.type === "shutdown" || ev.type === "disconnect") return;
    else ev = yield;
  }
}, { transport, framing: lines(), registry, name: "peers", logger: quiet });

const received: Queue<string>[] = [];
const clients: Connection<string>[] = [];
for (let i = 0; i < config.conns; i++) {
  const lines_ = new Queue<string>();
  received.push(lines_);
  clients.push(
    await connect(async function* (): HandlerGenerator<string> {
      for (let ev = yield; ev.type === "packet"; ev = yield) lines_.push(ev.data);
    }, { transport, framing: lines(), logger: quiet }),
  );
}
while (started.length < config.conns) await new Promise((r) => setTimeout(r, 1));
await registry.flush();

const out = new TextEncoder();
function say(value: unknown): void {
  Deno.stdout.writeSync(out.encode(JSON.stringify(value) + "\n"));
}

say({
  ready: true,
  node: registry.node,
  ids: started.map((c) => c.id),
  link: registry.linkAddress,
});

const held = new Map<string, ConnectionRef>();

async function target(name: string, useHeld: boolean): Promise<ConnectionRef> {
  const found = useHeld ? held.get(name) : await registry.lookup(name);
  if (!found) throw new Error(`no connection ${name}`);
  return found;
}

// deno-lint-ignore no-explicit-any
async function perform(command: any): Promise<unknown> {
  switch (command.op) {
    case "register": {
      const ok = await started[command.index].register(command.name);
      await registry.flush();
      return ok;
    }
    case "list":
      return await registry.list(command.filter ?? {});
    case "lookup": {
      const found = await registry.lookup(command.target);
      return found ? { id: found.id, name: found.name } : null;
    }
    case "hold": {
      held.set(command.target, await target(command.target, false));
      return true;
    }
    case "call":
      return await (await target(command.target, command.held)).call(command.message, {
        timeout: command.timeout,
      });
    case "cast":
    case "info":
    case "send":
      (await target(command.target, command.held))[command.op as "cast"](command.message);
      return true;
    case "events":
      return await events.get(started[command.index].id)!.next();
    case "received":
      return await received[command.index].next();
    case "exit":
      await Promise.all(clients.map((c) => c.stop()));
      await server.stop();
      await registry.close();
      say({ seq: command.seq, value: "bye" });
      Deno.exit(0);
      break;
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

let buffered = "";
const decoder = new TextDecoder();
for await (const chunk of Deno.stdin.readable) {
  buffered += decoder.decode(chunk, { stream: true });
  let newline: number;
  while ((newline = buffered.indexOf("\n")) >= 0) {
    const command = JSON.parse(buffered.slice(0, newline));
    buffered = buffered.slice(newline + 1);
    perform(command).then(
      (value) => say({ seq: command.seq, value }),
      (err) => say({ seq: command.seq, error: { name: err?.name, message: err?.message } }),
    );
  }
}
