// serveWorkers (workers.ts): a handler module on 2 Workers sharing one port, each a node of one
// KvRegistry. The chat (examples/chat_workers.ts) with users on different Workers; a Worker
// that crashes, exits or hangs (tests/peers/worker_handler.ts) leaves the registry at once and
// comes back as a new node; a module that cannot serve; the command line. A test process's own KvRegistry node
// on the group's store (the "observer") sees which Worker a user landed on. Every wait is
// bounded; stop() leaves nothing running (the sanitizers check it).

import assert from "node:assert/strict";
import { KvRegistry, type RegistryEntry, serveWorkers } from "../mod.ts";
import { capturingLogger, HOST, pause, startProcess, within } from "./_support.ts";

const CHAT = new URL("../examples/chat_workers.ts", import.meta.url);
const PROBE = new URL("./peers/worker_handler.ts", import.meta.url);
const QUIET = { error() {}, warn() {}, debug() {} };
/** How long a Worker's (re)start may take: a first run type-checks the modules it loads. */
const RESTART_MS = 20_000;

/** A user over a raw TCP socket: lines out, and a bounded wait for a line that matches. */
class LineUser {
  readonly #conn: Deno.TcpConn;
  readonly #reader: ReadableStreamDefaultReader<string>;
  #buffered = "";

  private constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
    this.#reader = conn.readable.pipeThrough(new TextDecoderStream()).getReader();
  }

  static async open(port: number): Promise<LineUser> {
    return new LineUser(await Deno.connect({ hostname: HOST, port }));
  }

  async send(line: string): Promise<void> {
    const bytes = new TextEncoder().encode(line + "\n");
    for (let at = 0; at < bytes.length;) at += await this.#conn.write(bytes.subarray(at));
  }

  /** The first line (skipping others) that `match` accepts, within 5 s; null at the end. */
  waitFor(match: (line: string) => boolean, what: string): Promise<string | null> {
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
          const { value, done } = await this.#reader.read();
          if (done) return null;
          this.#buffered += value;
        }
      })(),
      what,
    );
  }

  async close(): Promise<void> {
    await this.#reader.cancel().catch(() => {});
  }
}

/** Poll `probe` (every 20 ms, within `ms`) until it returns true. */
async function eventually(probe: () => Promise<boolean>, what: string, ms = 5000): Promise<void> {
  await within(
    ms,
    (async () => {
      while (!(await probe())) await pause(20);
    })(),
    what,
  );
}

Deno.test("workers: the chat on 2 Workers sharing a port: users on different Workers /msg each other, /who lists everyone, a line for everyone crosses", async () => {
  const users: LineUser[] = [];
  await using group = await serveWorkers(CHAT, {
    workers: 2,
    hostname: HOST,
    port: 0,
    namespace: "chat-test",
    logger: QUIET,
  });
  assert.deepEqual(group.workers().map((w) => w.state), ["running", "running"]);
  await using observer = await KvRegistry.open(group.kv, {
    namespace: group.namespace,
    node: "observer",
    logger: QUIET,
  });
  try {
    // Users join until both Workers have one; the registry says who landed where.
    const on = new Map<string, { user: LineUser; name: string }>();
    for (let i = 0; on.size < 2 && i < 40; i++) {
      const user = await LineUser.open(group.addr.port);
      users.push(user);
      await user.waitFor((l) => l.startsWith("* welcome"), "the welcome");
      await user.send(`/nick u${i}`);
      await user.waitFor((l) => l === `* you are now u${i}`, `u${i}'s name`);
      const [entry] = await observer.list({ name: `u${i}` });
      if (entry && !on.has(entry.node)) on.set(entry.node, { user, name: `u${i}` });
    }
    assert.equal(on.size, 2, "40 users all landed on one Worker");
    const [a, b] = group.workers().map((w) => on.get(w.node)!);
    await a.user.send(`/msg ${b.name} hello from the other Worker`);
    await a.user.waitFor((l) => l === `-> ${b.name}: hello from the other Worker`, "the echo");
    assert.equal(
      await b.user.waitFor((l) => l.startsWith(`*${a.name}*`), "the /msg"),
      `*${a.name}* hello from the other Worker`,
    );
    await b.user.send("/who");
    const who = await b.user.waitFor((l) => l.startsWith("* online: "), "/who");
    assert.deepEqual(
      who!.slice("* online: ".length).split(", "),
      users.map((_, i) => `u${i}`).sort(),
    );
    await b.user.send("a line for everyone");
    await a.user.waitFor((l) => l === `<${b.name}> a line for everyone`, "the line");
  } finally {
    await Promise.all(users.map((u) => u.close()));
  }
  await group.stop();
  assert.deepEqual(group.workers().map((w) => w.state), ["stopped", "stopped"]);
  // Both nodes left cleanly: nothing of theirs is left in the store.
  assert.deepEqual(await observer.list({ owner: "chat" }), []);
});

Deno.test("workers: a Worker that crashes or exits leaves the registry at once and comes back as a new node", async () => {
  const users: LineUser[] = [];
  const logger = capturingLogger();
  await using group = await serveWorkers(PROBE, {
    workers: 2,
    hostname: HOST,
    namespace: "crash-test",
    restart: { initialDelay: 100 },
    // A TTL far longer than the test: the dead node's entries must go by eviction.
    registry: { nodeTtlMs: 60_000 },
    logger,
  });
  await using observer = await KvRegistry.open(group.kv, {
    namespace: group.namespace,
    node: "observer",
    logger: QUIET,
  });
  const [w0, w1] = group.workers().map((w) => w.node);
  const nodeOf = new Map<LineUser, string>();
  try {
    const connectUntil = async (node: string) => {
      for (let i = 0; i < 40; i++) {
        const user = await LineUser.open(group.addr.port);
        users.push(user);
        await user.send("node");
        const answer = (await user.waitFor(() => true, "the node"))!;
        nodeOf.set(user, answer);
        if (answer === node) return user;
      }
      throw new Error(`40 connections, none on ${node}`);
    };
    const victim = await connectUntil(w0);
    await connectUntil(w1);
    const nodesListed = async () =>
      new Set((await observer.list({ owner: "probe" })).map((e: RegistryEntry) => e.node));
    await eventually(async () => (await nodesListed()).size === 2, "both nodes listed");

    await victim.send("crash");
    assert.equal(await victim.waitFor(() => true, "the end of the connection"), null);
    await eventually(async () => !(await nodesListed()).has(w0), "w0 leaves the list");
    // The error is the group's to log (Deno does not print it).
    assert.ok(
      logger.calls.some((call) =>
        call.some((x) => x instanceof Error && /uncaught: crash on purpose/.test(x.message))
      ),
    );
    assert.ok((await nodesListed()).has(w1));
    // A user of the other Worker is untouched.
    const survivor = users.find((u) => nodeOf.get(u) === w1)!;
    await survivor.send("still here?");
    assert.equal(await survivor.waitFor(() => true, "the echo"), "still here?");

    await eventually(
      () => Promise.resolve(group.workers()[0].state === "running"),
      "the restart",
      RESTART_MS,
    );
    assert.deepEqual(group.workers()[0], {
      index: 0,
      node: `${w0}.1`,
      state: "running",
      restarts: 1,
    });
    await connectUntil(`${w0}.1`);

    // Deno.exit() in a Worker ends that Worker only: the same again, for w1.
    const leaver = users.find((u) => nodeOf.get(u) === w1)!;
    await leaver.send("exit");
    assert.equal(await leaver.waitFor(() => true, "the end of the connection"), null);
    await eventually(async () => !(await nodesListed()).has(w1), "w1 leaves the list");
    await eventually(
      () => Promise.resolve(group.workers()[1].state === "running"),
      "the restart of w1",
      RESTART_MS,
    );
    assert.equal(group.workers()[1].node, `${w1}.1`);
  } finally {
    await Promise.all(users.map((u) => u.close()));
  }
});

Deno.test("workers: a Worker that stops answering pings for nodeTtlMs is taken for dead and replaced", async () => {
  await using group = await serveWorkers(PROBE, {
    workers: 1,
    hostname: HOST,
    namespace: "hang-test",
    restart: { initialDelay: 100 },
    registry: { heartbeatMs: 50, nodeTtlMs: 800 },
    logger: QUIET,
  });
  await using observer = await KvRegistry.open(group.kv, {
    namespace: group.namespace,
    node: "observer",
    logger: QUIET,
  });
  const [w0] = group.workers().map((w) => w.node);
  const user = await LineUser.open(group.addr.port);
  try {
    await user.send("node");
    assert.equal(await user.waitFor(() => true, "the node"), w0);
    await user.send("hang"); // its thread is busy for 2 s
    await eventually(
      () => Promise.resolve(group.workers()[0].node === `${w0}.1`),
      "the replacement",
      RESTART_MS,
    );
    assert.deepEqual(await observer.list({ node: w0 }), []);
    // Deno cannot stop the stuck thread (denoland/deno#35657): its connection ends once its
    // loop does, as the Worker then closes.
    assert.equal(await user.waitFor(() => true, "the end of the connection"), null);
    await eventually(
      () => Promise.resolve(group.workers()[0].state === "running"),
      "the replacement listens",
      RESTART_MS,
    );
  } finally {
    await user.close();
  }
});

Deno.test("workers: a module that cannot serve rejects serveWorkers, with nothing left running", async () => {
  const notAHandler = "data:text/javascript,export default 42;";
  await assert.rejects(serveWorkers(notAHandler, { workers: 2, hostname: HOST }), {
    name: "TypeError",
    message: /must export the handler as its default export/,
  });
  await assert.rejects(serveWorkers(new URL("./peers/no_such_module.ts", import.meta.url)), {
    message: /no_such_module/,
  });
  // memory() would listen in each Worker's isolate alone: refused, naming why.
  const inMemory = `data:text/javascript,import { memory } from "${
    new URL("../mod.ts", import.meta.url).href
  }"; export const options = { transport: memory("w") }; export default async function* () {}`;
  await assert.rejects(serveWorkers(inMemory, { workers: 1, hostname: HOST }), {
    name: "TypeError",
    message: /shares a port between Workers \(tcp\(\) or tls\(\)\), not memory/,
  });
  await assert.rejects(serveWorkers(PROBE, { kv: ":memory:" }), TypeError);
  await assert.rejects(serveWorkers(PROBE, { workers: 0 }), RangeError);
  await assert.rejects(serveWorkers(PROBE, { restart: { jitter: 2 } }), {
    name: "RangeError",
    message: "serveWorkers: restart: option jitter must be a number from 0 to 1, not 2",
  });
  // A port in use: the first Worker cannot listen.
  using taken = Deno.listen({ hostname: HOST, port: 0 });
  await assert.rejects(
    serveWorkers(PROBE, { workers: 1, hostname: HOST, port: taken.addr.port }),
    Deno.errors.AddrInUse,
  );
});

Deno.test("workers: a Worker that dies after it listens, while another still starts, rejects serveWorkers", async () => {
  // (Before, the group started on the Workers left, the dead one never restarted nor logged.)
  await assert.rejects(
    serveWorkers(new URL("./peers/worker_dies_starting.ts", import.meta.url), {
      workers: 2,
      hostname: HOST,
      logger: QUIET,
    }),
    { message: /worker 0 .* died while the group started/ },
  );
});

Deno.test("workers: the command line serves a module on N Workers until SIGTERM", async () => {
  const server = await startProcess(
    [
      ...["run", "-A", "--unstable-kv", "--unstable-net"],
      new URL("../workers.ts", import.meta.url).pathname,
      PROBE.pathname,
      ...["--workers", "2", "--port", "0", "--hostname", HOST],
    ],
    /^listening on \S+:(\d+)\n2 workers /m,
  );
  let user: LineUser | undefined;
  try {
    const port = Number(server.match[1]);
    user = await LineUser.open(port);
    await user.send("node");
    assert.match((await user.waitFor(() => true, "the node"))!, /-w[01]$/);
    server.child.kill("SIGTERM");
    assert.equal(await user.waitFor(() => false, "the end"), null);
    const status = await within(15_000, server.child.status, "the exit");
    assert.equal(status.code, 0, await server.stderr);
  } finally {
    await user?.close();
    await server.end();
  }
});
