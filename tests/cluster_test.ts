// KvRegistry across real processes: nodes spawned with Deno.Command (tests/peers/cluster_node.ts)
// share one KV file in a temporary directory, their node links bound to different loopback
// addresses (127.0.0.2, 127.0.0.3) as stand-ins for machines. Registration and listing across
// them, a name race among 8 processes, call/cast/info/send into another process's connection and
// back, a wrong cluster secret, and a SIGKILLed node: its entries leave list() and calls to its
// connections fail fast with NodeDown. Heartbeats are short (50 ms, dead after 1 s) to keep the
// suite fast; tests that are not about deaths take a long TTL, so that a heartbeat stalled on a
// busy machine is not taken for a death. Every wait is bounded.

import assert from "node:assert/strict";
import type { RegistryEntry } from "../mod.ts";
import { type StartedProcess, startProcess, within } from "./_support.ts";

const NODE_SCRIPT = new URL("./peers/cluster_node.ts", import.meta.url).pathname;
const HEARTBEAT_MS = 50;
const NODE_TTL_MS = 1000;
/** How long a dead node may take to leave every list, with room for a loaded machine. */
const DEATH_BOUND_MS = NODE_TTL_MS + 10 * HEARTBEAT_MS + 3000;

interface Ready {
  node: string;
  ids: string[];
  link: { hostname: string; port: number };
}

interface Answer {
  seq: number;
  value?: unknown;
  error?: { name: string; message: string };
}

/** One node process, driven by JSON commands on its stdin. */
class Peer {
  readonly child: Deno.ChildProcess;
  readonly ready: Promise<Ready>;
  readonly #answers = new Map<number, (answer: Answer) => void>();
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #reading: Promise<void>;
  readonly #stderr: Promise<string>;
  #seq = 0;

  constructor(config: Record<string, unknown>) {
    const child = this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", NODE_SCRIPT, JSON.stringify(config)],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#writer = child.stdin.getWriter();
    const stderr = this.#stderr = new Response(child.stderr).text();
    let onReady!: (ready: Ready) => void;
    let onFail!: (err: Error) => void;
    this.ready = new Promise((resolve, reject) => {
      onReady = resolve;
      onFail = reject;
    });
    this.#reading = (async () => {
      let buffered = "";
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        buffered += chunk;
        let newline: number;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const message = JSON.parse(buffered.slice(0, newline));
          buffered = buffered.slice(newline + 1);
          if (message.ready) onReady(message);
          else this.#answers.get(message.seq)?.(message);
        }
      }
      onFail(new Error(`node exited before it was ready: ${await stderr}`));
    })();
  }

  /** Send a command; resolves with its answer (`value` or `error`), bounded. */
  async ask(op: string, args: Record<string, unknown> = {}, ms = 5000): Promise<Answer> {
    const seq = ++this.#seq;
    const answered = new Promise<Answer>((resolve) => this.#answers.set(seq, resolve));
    await this.#writer.write(new TextEncoder().encode(JSON.stringify({ seq, op, ...args }) + "\n"));
    try {
      return await within(ms, answered, `${op} ${JSON.stringify(args)}`);
    } finally {
      this.#answers.delete(seq);
    }
  }

  /** The value of a command that must succeed. */
  async value<V = unknown>(op: string, args: Record<string, unknown> = {}): Promise<V> {
    const answer = await this.ask(op, args);
    if (answer.error) {
      throw new Error(`${op}: ${answer.error.name}: ${answer.error.message}`);
    }
    return answer.value as V;
  }

  /** Leave cleanly (or be killed), and wait for the process and its pipes to end. */
  async end(signal?: Deno.Signal): Promise<Deno.CommandStatus> {
    if (signal) this.child.kill(signal);
    else await this.ask("exit").catch(() => this.child.kill("SIGKILL"));
    await this.#writer.close().catch(() => {});
    const status = await within(10_000, this.child.status, "the node exits");
    await this.#reading;
    await this.#stderr;
    return status;
  }
}

/** A temporary directory with a KV file for one cluster, and a way to start its nodes. */
async function cluster(namespace: string) {
  const dir = await Deno.makeTempDir({ prefix: "etcp-cluster-" });
  const peers: Peer[] = [];
  return {
    start(node: string, options: Record<string, unknown> = {}): Peer {
      const peer = new Peer({
        kv: `${dir}/kv.sqlite`,
        namespace,
        node,
        linkHostname: "127.0.0.1",
        secret: "test-cluster-secret",
        heartbeatMs: HEARTBEAT_MS,
        nodeTtlMs: NODE_TTL_MS,
        conns: 1,
        ...options,
      });
      peers.push(peer);
      return peer;
    },
    async [Symbol.asyncDispose]() {
      await Promise.all(peers.map((p) => p.end().catch(() => {})));
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("cluster: processes list each other's connections and call, cast, send into them", async () => {
  await using nodes = await cluster("talk");
  const a = nodes.start("a", { linkHostname: "127.0.0.2", conns: 2, nodeTtlMs: 10_000 });
  const b = nodes.start("b", { linkHostname: "127.0.0.3", nodeTtlMs: 10_000 });
  const [readyA, readyB] = await within(20_000, Promise.all([a.ready, b.ready]), "nodes ready");
  assert.equal(readyA.link.hostname, "127.0.0.2");
  assert.equal(readyB.link.hostname, "127.0.0.3");
  assert.equal(await a.value("register", { index: 0, name: "alice" }), true);
  assert.equal(await b.value("register", { index: 0, name: "bob" }), true);
  assert.equal(await b.value("register", { index: 0, name: "alice" }), false); // a's

  // Both see all three connections, with their nodes and names.
  for (const peer of [a, b]) {
    const entries = await peer.value<RegistryEntry[]>("list");
    const seen = entries.map((e) => `${e.node}:${e.id}:${e.name ?? ""}`).sort();
    assert.deepEqual(seen, [
      `a:${readyA.ids[0]}:alice`,
      `a:${readyA.ids[1]}:`,
      `b:${readyB.ids[0]}:bob`,
    ]);
    assert.deepEqual(
      (await peer.value<RegistryEntry[]>("list", { filter: { node: "b" } })).length,
      1,
    );
  }
  assert.deepEqual(await a.value("lookup", { target: "bob" }), { id: readyB.ids[0], name: "bob" });

  // a → b and b → a: calls answered by the other process's connection.
  assert.deepEqual(await a.value("call", { target: "bob", message: "hi bob" }), {
    by: readyB.ids[0],
    node: "b",
    got: "hi bob",
  });
  assert.deepEqual(await b.value("call", { target: readyA.ids[1], message: [1, "two"] }), {
    by: readyA.ids[1],
    node: "a",
    got: [1, "two"],
  });
  const timedOut = await a.ask("call", { target: "bob", message: "silent", timeout: 100 });
  assert.equal(timedOut.error?.name, "TimeoutError");
  // Casts and infos arrive as events of that connection; a send is written to its socket.
  await a.value("cast", { target: "bob", message: { n: 1 } });
  await a.value("info", { target: "bob", message: "psst" });
  assert.deepEqual(await b.value("events", { index: 0 }), { type: "cast", message: { n: 1 } });
  assert.deepEqual(await b.value("events", { index: 0 }), { type: "info", message: "psst" });
  await b.value("send", { target: "alice", message: "a line from b" });
  assert.equal(await a.value("received", { index: 0 }), "a line from b");

  // A node with another secret is refused by a's link: its calls fail with NodeDown.
  const intruder = nodes.start("intruder", {
    secret: "not-the-secret",
    conns: 0,
    nodeTtlMs: 10_000,
  });
  await within(20_000, intruder.ready, "intruder ready");
  const refused = await intruder.ask("call", { target: "alice", message: "let me in" });
  assert.equal(refused.error?.name, "NodeDown", JSON.stringify(refused));
  assert.match(refused.error!.message, /secret/);

  // b leaves cleanly: its entries are gone at once, for a.
  await b.end();
  assert.deepEqual(await a.value("list", { filter: { node: "b" } }), []);
  assert.equal(await a.value("lookup", { target: "bob" }), null);
});

Deno.test("cluster: a SIGKILLed node leaves list() within its TTL, and calls to it fail fast with NodeDown", async () => {
  await using nodes = await cluster("kill");
  const a = nodes.start("a", { linkHostname: "127.0.0.2" });
  const b = nodes.start("b", { linkHostname: "127.0.0.3", conns: 2 });
  const [, readyB] = await within(20_000, Promise.all([a.ready, b.ready]), "nodes ready");
  assert.equal(await b.value("register", { index: 0, name: "victim" }), true);
  await a.value("hold", { target: "victim" });
  await a.value("hold", { target: readyB.ids[1] });
  assert.equal((await a.value<RegistryEntry[]>("list", { filter: { node: "b" } })).length, 2);
  // A call under way when b dies: it fails with NodeDown, not after its minute-long timeout.
  const underWay = a.ask("call", {
    target: "victim",
    held: true,
    message: "silent",
    timeout: 60_000,
  });
  assert.deepEqual(await a.value("call", { target: "victim", held: true, message: "ping" }), {
    by: readyB.ids[0],
    node: "b",
    got: "ping",
  });
  const status = await b.end("SIGKILL");
  assert.equal(status.signal, "SIGKILL");
  assert.equal((await underWay).error?.name, "NodeDown");
  // Calls to its connections, through handles taken before, fail fast with NodeDown.
  const later = await a.ask("call", { target: readyB.ids[1], held: true, message: "hello?" }, 3000);
  assert.equal(later.error?.name, "NodeDown", JSON.stringify(later));
  // Its entries leave a's list, and its name is free again, within the bound.
  await within(
    DEATH_BOUND_MS,
    (async () => {
      while ((await a.value<RegistryEntry[]>("list")).some((e) => e.node === "b")) {
        await new Promise((r) => setTimeout(r, HEARTBEAT_MS));
      }
    })(),
    "b's entries leave the list",
  );
  assert.equal(await a.value("lookup", { target: "victim" }), null);
  assert.equal(await a.value("register", { index: 0, name: "victim" }), true);
});

Deno.test("cluster: of 8 processes racing for one name, exactly one wins", async () => {
  await using nodes = await cluster("race");
  // A long TTL: 8 processes starting on a busy machine may stall a heartbeat for a while, and
  // a node taken for dead loses its names (this test is about the race, not about deaths).
  const peers = Array.from({ length: 8 }, (_, i) =>
    nodes.start(`n${i}`, {
      linkHostname: i % 2 === 0 ? "127.0.0.2" : "127.0.0.3",
      heartbeatMs: 250,
      nodeTtlMs: 10_000,
    }));
  await within(30_000, Promise.all(peers.map((p) => p.ready)), "8 nodes ready");
  const answers = await Promise.all(
    peers.map((p) => p.value("register", { index: 0, name: "leader" })),
  );
  assert.equal(answers.filter((won) => won === true).length, 1, String(answers));
  const winner = `n${answers.indexOf(true)}`;
  for (const peer of [peers[0], peers[7]]) {
    const held = await peer.value<RegistryEntry[]>("list", { filter: { name: "leader" } });
    assert.deepEqual(held.map((e) => e.node), [winner]);
  }
});

/** A chat user over a raw TCP socket: lines out, and a bounded wait for a line that matches. */
class ChatUser {
  readonly #conn: Deno.TcpConn;
  readonly #lines: ReadableStreamDefaultReader<string>;
  #buffered = "";

  private constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
    this.#lines = conn.readable.pipeThrough(new TextDecoderStream()).getReader();
  }

  static async open(port: number): Promise<ChatUser> {
    return new ChatUser(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  async send(line: string): Promise<void> {
    const bytes = new TextEncoder().encode(line + "\n");
    for (let at = 0; at < bytes.length;) at += await this.#conn.write(bytes.subarray(at));
  }

  /** The first line (skipping others) that `match` accepts, within 5 s. */
  waitFor(match: (line: string) => boolean, what: string): Promise<string> {
    return within(
      5000,
      (async () => {
        for (;;) {
          const newline = this.#buffered.indexOf("\n");
          if (newline >= 0) {
            const line = this.#buffered.slice(0, newline);
            this.#buffered = this.#buffered.slice(newline + 1);
            if (match(line)) return line;
            continue;
          }
          const { value, done } = await this.#lines.read();
          if (done) throw new Error(`closed while waiting for ${what}`);
          this.#buffered += value;
        }
      })(),
      what,
    );
  }

  async close(): Promise<void> {
    await this.#lines.cancel().catch(() => {});
  }
}

Deno.test("cluster: the chat example on 2 worker processes sharing a port: /msg, /who and lines for everyone cross workers", async () => {
  const dir = await Deno.makeTempDir({ prefix: "etcp-chat-cluster-" });
  const users: ChatUser[] = [];
  let kv: Deno.Kv | undefined;
  let cluster: StartedProcess | undefined;
  try {
    cluster = await startProcess(
      [
        ...["run", "-A", "--unstable-kv", "--unstable-net"],
        new URL("../examples/cluster.ts", import.meta.url).pathname,
        ...["--workers", "2", "--port", "0", "--data", dir],
      ],
      /^chat cluster of 2 workers on port (\d+)$/m,
    );
    const port = Number(cluster.match[1]);
    // Users join until both workers have one; the registry's KV file says who landed where.
    kv = await Deno.openKv(`${dir}/cluster.sqlite`);
    const on = new Map<string, { user: ChatUser; name: string }>();
    for (let i = 0; on.size < 2 && i < 40; i++) {
      const user = await ChatUser.open(port);
      users.push(user);
      await user.waitFor((l) => l.startsWith("* welcome"), "the welcome");
      await user.send(`/nick u${i}`);
      await user.waitFor((l) => l === `* you are now u${i}`, `u${i}'s name`);
      const held = (await kv.get<{ node: string }>(["etcp", "chat", "name", `u${i}`])).value;
      if (held && !on.has(held.node)) on.set(held.node, { user, name: `u${i}` });
    }
    assert.equal(on.size, 2, "40 users all landed on one worker");
    const a = on.get("worker-0")!;
    const b = on.get("worker-1")!;
    await a.user.send(`/msg ${b.name} hello from worker 0`);
    await a.user.waitFor((l) => l === `-> ${b.name}: hello from worker 0`, "the /msg echo");
    await b.user.waitFor((l) => l === `*${a.name}* hello from worker 0`, "the /msg");
    await b.user.send("/who");
    const who = await b.user.waitFor((l) => l.startsWith("* online: "), "/who");
    const names = who.slice("* online: ".length).split(", ");
    assert.deepEqual(names, Array.from({ length: users.length }, (_, i) => `u${i}`).sort());
    await b.user.send("a line for everyone");
    await a.user.waitFor((l) => l === `<${b.name}> a line for everyone`, "the relayed line");
    cluster.child.kill("SIGTERM");
    const status = await within(15_000, cluster.child.status, "the cluster stops");
    assert.equal(status.code, 0, await cluster.stderr);
  } finally {
    kv?.close();
    await Promise.all(users.map((u) => u.close()));
    await cluster?.end();
    await Deno.remove(dir, { recursive: true });
  }
});
