/**
 * The chat example driven by real clients: raw `Deno.connect` sockets that write and read text
 * lines, against `chatServer()` on a free port, plus one run of the example as a process.
 */

import assert from "node:assert/strict";
import { type ChatOptions, chatServer } from "../examples/chat_server.ts";
import { FrameTooLarge, MemoryRegistry, type Server } from "../mod.ts";
import { closeQuietly, HOST, pause, portOf, startProcess, tracked, writeAll } from "./_support.ts";

const WELCOME =
  "* welcome! choose a name with /nick NAME; /who lists people, /msg NAME TEXT whispers";
const SHUTTING_DOWN = "* the server is shutting down";
const LINE_WAIT_MS = 3000;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A client that speaks lines over a raw TCP socket, with a bounded wait for each line. */
class LineClient {
  readonly #conn: Deno.TcpConn;
  readonly #chunk = new Uint8Array(8192);
  #buffered = new Uint8Array(0);
  #reading: Promise<number | null> | null = null;
  #eof = false;
  #closed = false;

  constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
  }

  static async open(port: number): Promise<LineClient> {
    const conn = await Deno.connect({ hostname: HOST, port });
    conn.setNoDelay(true); // no Nagle wait between small lines
    return new LineClient(conn);
  }

  /** Write `text` and a newline, entirely. */
  async send(text: string): Promise<void> {
    await this.write(encoder.encode(text + "\n"));
  }

  write(bytes: Uint8Array): Promise<void> {
    return writeAll(this.#conn, bytes);
  }

  /**
   * The next line (without its `\n`), or `null` once the server has closed the connection.
   * Throws if nothing arrives within `ms`, so a missing line fails the test instead of hanging.
   */
  async readLine(ms = LINE_WAIT_MS): Promise<string | null> {
    const deadline = performance.now() + ms;
    for (;;) {
      const nl = this.#buffered.indexOf(10);
      if (nl >= 0) {
        const line = decoder.decode(this.#buffered.subarray(0, nl));
        this.#buffered = this.#buffered.slice(nl + 1);
        return line;
      }
      if (this.#eof) {
        assert.equal(this.#buffered.length, 0, "connection closed in the middle of a line");
        return null;
      }
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`no line within ${ms} ms`);
      // A read still in flight from an earlier timed-out wait is reused, never duplicated.
      this.#reading ??= this.#conn.read(this.#chunk);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const expired = new Promise<"expired">((resolve) => {
        timer = setTimeout(() => resolve("expired"), left);
      });
      let n: number | null | "expired";
      try {
        n = await Promise.race([this.#reading, expired]);
      } finally {
        clearTimeout(timer);
      }
      if (n === "expired") throw new Error(`no line within ${ms} ms`);
      this.#reading = null;
      if (n === null) {
        this.#eof = true;
      } else {
        const joined = new Uint8Array(this.#buffered.length + n);
        joined.set(this.#buffered);
        joined.set(this.#chunk.subarray(0, n), this.#buffered.length);
        this.#buffered = joined;
      }
    }
  }

  /** Read one line and check it. */
  async expect(line: string | null, message?: string): Promise<void> {
    const got = await this.readLine();
    if (message === undefined) assert.equal(got, line);
    else assert.equal(got, line, message);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeQuietly(this.#conn);
    // A read left pending by a failed wait ends with the close: nothing to report then.
    this.#reading?.catch(() => {});
  }
}

interface Room {
  server: Server<string>;
  port: number;
  /** A new client, past the welcome line; closed when the test ends. */
  guest(): Promise<LineClient>;
  /** New clients named `names`, in order; each earlier one has read each later one's join. */
  people(...names: string[]): Promise<LineClient[]>;
}

/** Run `body` against a fresh chat server on a free port; close every client and stop it after. */
async function withChat(
  options: Partial<ChatOptions>,
  body: (room: Room) => Promise<void>,
): Promise<void> {
  const server = await chatServer({
    port: 0,
    hostname: HOST,
    registry: new MemoryRegistry(),
    ...options,
  });
  const port = portOf(server.addr);
  const clients: LineClient[] = [];
  const guest = async () => {
    const client = await LineClient.open(port);
    clients.push(client);
    await client.expect(WELCOME);
    return client;
  };
  const people = async (...names: string[]) => {
    const joined: LineClient[] = [];
    for (const name of names) {
      const client = await guest();
      await client.send(`/nick ${name}`);
      await client.expect(`* you are now ${name}`);
      for (const earlier of joined) await earlier.expect(`* ${name} joined`);
      joined.push(client);
    }
    return joined;
  };
  try {
    await body({ server, port, guest, people });
  } finally {
    for (const client of clients) client.close();
    await server.stop();
  }
}

/** The server-side handle of the user called `name`. */
function userNamed(server: Server<string>, name: string) {
  const conn = server.connections().find((c) => c.name === name);
  assert.ok(conn, `no connection is called ${name}`);
  return conn;
}

Deno.test("chat: a new client is welcomed, and /who lists nobody before anyone has a name", async () => {
  await withChat({}, async ({ guest }) => {
    const client = await guest(); // the welcome line itself is checked by guest()
    await client.send("/who");
    await client.expect("* online: nobody with a name yet");
  });
});

Deno.test("chat: /nick sets a name; invalid, repeated and taken names are refused", async () => {
  await withChat({}, async ({ guest, server }) => {
    const alice = await guest();
    await alice.send("/nick alice");
    await alice.expect("* you are now alice");
    assert.equal(userNamed(server, "alice").name, "alice");

    await alice.send("/nick alice");
    await alice.expect("* you are already alice");
    for (const bad of ["/nick", "/nick two words", "/nick bad!", `/nick ${"x".repeat(21)}`]) {
      await alice.send(bad);
      await alice.expect("* a name is 1 to 20 letters, digits, - or _", bad);
    }

    const other = await guest();
    await other.send("/nick alice");
    await other.expect("* the name alice is taken");
    // The refused client still has no name: it may not talk yet.
    await other.send("hello?");
    await other.expect("* choose a name first: /nick NAME");
    // ... and alice, the only named user, heard nothing of it.
    await alice.send("/who");
    await alice.expect("* online: alice");
  });
});

Deno.test("chat: a name that looks like a connection id is reserved, not a crash", async () => {
  await withChat({}, async ({ guest }) => {
    const client = await guest();
    await client.send("/nick c1");
    await client.expect("* the name c1 is reserved");
    await client.send("/nick ann");
    await client.expect("* you are now ann");
  });
});

Deno.test("chat: /nick is a whole word; '/nickbob' does not set a name", async () => {
  await withChat({}, async ({ guest }) => {
    const client = await guest();
    await client.send("/nickbob");
    await client.expect("* choose a name first: /nick NAME");
    await client.send("/who");
    await client.expect("* online: nobody with a name yet");
  });
});

Deno.test("chat: renaming frees the old name for someone else and tells the others", async () => {
  await withChat({}, async ({ guest, people }) => {
    const [alice, bob] = await people("alice", "bob");
    await alice.send("/nick alicia");
    await alice.expect("* you are now alicia");
    await bob.expect("* alice is now known as alicia");

    const third = await guest();
    await third.send("/nick alice");
    await third.expect("* you are now alice");
    await alice.expect("* alice joined"); // alice, now alicia, hears of the new alice
    await bob.expect("* alice joined");

    await third.send("/who");
    await third.expect("* online: alice, alicia, bob");
    // The new name is really held: nobody else can take it.
    await bob.send("/nick alicia");
    await bob.expect("* the name alicia is taken");
  });
});

Deno.test("chat: a plain line reaches every other named client, not the sender nor the unnamed", async () => {
  await withChat({}, async ({ guest, people }) => {
    const [alice, bob, carol] = await people("alice", "bob", "carol");
    const anon = await guest();
    await alice.send("hi everyone");
    await bob.expect("<alice> hi everyone");
    await carol.expect("<alice> hi everyone");
    // The broadcast has been sent by now: had it gone to alice or anon, it would come before
    // the answer to their next command.
    await alice.send("/who");
    await alice.expect("* online: alice, bob, carol");
    await anon.send("/who");
    await anon.expect("* online: alice, bob, carol");
    // Surrounding spaces are trimmed; empty lines say nothing.
    await carol.send("");
    await carol.send("   spaced out   ");
    await alice.expect("<carol> spaced out");
    await bob.expect("<carol> spaced out");
  });
});

Deno.test("chat: /msg reaches only its target, its text exactly as typed after the name", async () => {
  await withChat({}, async ({ people }) => {
    const [alice, bob, carol] = await people("alice", "bob", "carol");
    await alice.send("/msg bob meet me   at noon");
    await alice.expect("-> bob: meet me   at noon");
    await bob.expect("*alice* meet me   at noon");
    // The blanks between the name and the text separate them; tabs in the text are kept.
    await alice.send("/msg  bob \t a\tb  c");
    await alice.expect("-> bob: a\tb  c");
    await bob.expect("*alice* a\tb  c");
    // Had carol been sent the whisper, it would come before this broadcast, sent after it.
    await bob.send("lunch, anyone?");
    await carol.expect("<bob> lunch, anyone?");
    await alice.expect("<bob> lunch, anyone?");
  });
});

Deno.test("chat: /msg to an unknown name, without text, or before /nick is refused", async () => {
  await withChat({}, async ({ guest, people, server }) => {
    const [alice, bob] = await people("alice", "bob");
    await alice.send("/msg ghost boo");
    await alice.expect("* nobody is called ghost");
    await alice.send("/msg bob");
    await alice.expect("* usage: /msg NAME TEXT");

    const anon = await guest();
    await anon.send("/msg alice hi");
    await anon.expect("* choose a name first: /nick NAME");
    // A connection id is not a name: an unnamed connection cannot be whispered to by its id.
    const anonId = server.connections().find((c) => c.name === undefined)!.id;
    await alice.send(`/msg ${anonId} psst`);
    await alice.expect(`* nobody is called ${anonId}`);
    await anon.send("/who");
    await anon.expect("* online: alice, bob");
    // Nothing of the above reached bob: his next line is this broadcast.
    await alice.send("done");
    await bob.expect("<alice> done");
  });
});

Deno.test("chat: unknown commands get the command list", async () => {
  await withChat({}, async ({ people }) => {
    const [alice] = await people("alice");
    await alice.send("/dance");
    await alice.expect("* commands: /nick NAME, /msg NAME TEXT, /who, /quit");
  });
});

Deno.test("chat: /quit says bye, closes the connection, frees the name, and others see 'left'", async () => {
  await withChat({}, async ({ guest, people, server }) => {
    const [alice, bob] = await people("alice", "bob");
    const bobConn = userNamed(server, "bob");
    await bob.send("/quit");
    await bob.expect("* bye");
    await bob.expect(null);
    await alice.expect("* bob left");
    assert.equal(await bobConn.closed, "normal");
    await alice.send("/who");
    await alice.expect("* online: alice");

    const newBob = await guest();
    await newBob.send("/nick bob");
    await newBob.expect("* you are now bob");
    await alice.expect("* bob joined");
  });
});

Deno.test("chat: a client that hangs up is announced as left", async () => {
  await withChat({}, async ({ people, server }) => {
    const [alice, bob] = await people("alice", "bob");
    const bobConn = userNamed(server, "bob");
    bob.close();
    await alice.expect("* bob left");
    await bobConn.closed;
    assert.equal(server.connections().length, 1);
  });
});

Deno.test("chat: an idle user is warned, then disconnected; an active user is not", async () => {
  const warnMs = 150;
  const kickMs = 150;
  await withChat({ idleWarnMs: warnMs, idleKickMs: kickMs }, async ({ people, server }) => {
    const [sleepy, busy] = await people("sleepy", "busy");
    const sleepyConn = userNamed(server, "sleepy");
    const quietSince = performance.now(); // sleepy's last line was its /nick
    const sleepyGone = tracked((async () => {
      await sleepy.expect("* you have been idle; you will be disconnected in 0.15 s");
      const warnedAt = performance.now();
      await sleepy.expect("* disconnected for inactivity");
      const kickedAt = performance.now();
      await sleepy.expect(null);
      return { warnedAfter: warnedAt - quietSince, kickedAfter: kickedAt - warnedAt };
    })());

    // busy says something every 40 ms (well inside idleWarnMs) for longer than warn + kick,
    // and until sleepy is gone; every answer must be the /who list or sleepy's departure.
    const start = performance.now();
    const heard: string[] = [];
    while (!sleepyGone.settled() || performance.now() - start < warnMs + kickMs + 100) {
      await pause(40); // pacing, not synchronisation
      await busy.send("/who");
      for (;;) {
        const line = await busy.readLine();
        assert.ok(line !== null, "busy was disconnected");
        heard.push(line);
        if (line.startsWith("* online: ")) break;
        assert.equal(line, "* sleepy left");
      }
    }
    const { warnedAfter, kickedAfter } = await sleepyGone.promise;
    // On time: not early, and not much late (the margin absorbs a loaded event loop).
    assert.ok(warnedAfter >= warnMs * 0.8, `warned after ${warnedAfter} ms`);
    assert.ok(warnedAfter < warnMs + 250, `warned after ${warnedAfter} ms`);
    assert.ok(kickedAfter >= kickMs * 0.8, `kicked ${kickedAfter} ms after the warning`);
    assert.ok(kickedAfter < kickMs + 250, `kicked ${kickedAfter} ms after the warning`);
    assert.equal(await sleepyConn.closed, "normal");
    assert.ok(heard.includes("* sleepy left"), "busy was told that sleepy left");
    assert.ok(!heard.some((line) => line.includes("idle")), `busy heard: ${heard}`);
    await busy.send("/who");
    await busy.expect("* online: busy");
  });
});

Deno.test("chat: a warned user who speaks again is not disconnected at the old deadline", async () => {
  await withChat({ idleWarnMs: 150, idleKickMs: 150 }, async ({ people }) => {
    const [nap] = await people("nap");
    await nap.expect("* you have been idle; you will be disconnected in 0.15 s");
    await nap.send("/who");
    await nap.expect("* online: nap");
    // Without the reset, the kick would be the next line; instead a fresh warning comes.
    await nap.expect("* you have been idle; you will be disconnected in 0.15 s");
    await nap.expect("* disconnected for inactivity");
    await nap.expect(null);
  });
});

Deno.test("chat: a line over 4096 bytes is answered, then ends only that client's connection", async () => {
  const logged: unknown[][] = [];
  const originalWarn = console.warn;
  console.warn = (...data: unknown[]) => logged.push(data);
  try {
    await withChat({}, async ({ people, server }) => {
      const [alice, bob, carol] = await people("alice", "bob", "carol");
      // A line of exactly the limit is fine.
      const longest = "y".repeat(4096);
      await bob.send(longest);
      await alice.expect(`<bob> ${longest}`);
      await carol.expect(`<bob> ${longest}`);
      // So is a whisper of the limit, although what is relayed is longer.
      const whisper = "w".repeat(4096 - "/msg alice ".length);
      await bob.send(`/msg alice ${whisper}`);
      await bob.expect(`-> alice: ${whisper}`);
      await alice.expect(`*bob* ${whisper}`);

      const bobConn = userNamed(server, "bob");
      await bob.send("z".repeat(5000));
      // bob is told why, then his connection ends: a clean close, or a reset if the server
      // closed with bytes unread.
      await bob.expect("* line too long (the limit is 4096 bytes); goodbye");
      try {
        await bob.expect(null);
      } catch (err) {
        if (!(err instanceof Deno.errors.ConnectionReset)) throw err;
      }
      await alice.expect("* bob left");
      await carol.expect("* bob left");
      const reason = await bobConn.closed;
      assert.ok(reason instanceof FrameTooLarge, `closed with ${reason}`);
      assert.equal(reason.maxLength, 4096);
      // Logged once, as one line at warn: a peer's fault, not the server's.
      assert.equal(logged.length, 1, `logged: ${logged.map((d) => d.join(" ")).join("; ")}`);
      assert.match(
        String(logged[0][0]),
        /FrameTooLarge: frame of \d+ bytes exceeds maxLength 4096/,
      );

      // Everyone else goes on.
      await alice.send("still here");
      await carol.expect("<alice> still here");
      await carol.send("/who");
      await carol.expect("* online: alice, carol");
      assert.equal(server.connections().length, 2);
    });
  } finally {
    console.warn = originalWarn;
  }
});

Deno.test("chat: bytes that are not UTF-8 are replaced, and the user stays", async () => {
  await withChat({}, async ({ people }) => {
    const [alice, bob] = await people("alice", "bob");
    await bob.write(Uint8Array.of(0x68, 0x69, 0xff, 0x21, 0x0a)); // "hi\xff!\n"
    await alice.expect("<bob> hi\uFFFD!");
    await bob.send("still here");
    await alice.expect("<bob> still here");
  });
});

Deno.test("chat: a member who never reads is dropped once 8 MiB is pending for him, and the server does not grow", async () => {
  await withChat({}, async ({ people, server }) => {
    const [alice, bob] = await people("alice", "bob");
    const mute = await people("mute").then(([m]) => m); // joins, then never reads again
    await alice.expect("* mute joined");
    await bob.expect("* mute joined");
    const muteConn = userNamed(server, "mute");
    const line = "x".repeat(4000);
    // alice talks; bob reads along; mute reads nothing. 16 MB would go to mute without a bound.
    let sent = 0;
    while (muteConn.closeReason === undefined && sent < 4000) {
      await alice.send(line);
      await bob.expect(`<alice> ${line}`);
      sent++;
    }
    const reason = await muteConn.closed;
    assert.equal((reason as Error).name, "BufferFull", `closed with ${reason}`);
    assert.ok(sent * line.length < 12 * 1024 * 1024, `dropped after ${sent} lines`);
    await bob.expect("* mute left");
    mute.close();
  });
});

Deno.test("chat: server.stop() tells everyone the server is shutting down and closes them", async () => {
  await withChat({}, async ({ guest, people, server, port }) => {
    const [alice, bob] = await people("alice", "bob");
    const anon = await guest();
    const conns = server.connections();
    assert.equal(conns.length, 3);
    const started = performance.now();
    await server.stop();
    // The handlers answered `shutdown` themselves: nothing had to be forced after a timeout.
    assert.ok(performance.now() - started < 2000, "stop waited for the shutdown timeout");
    for (const conn of conns) assert.equal(await conn.closed, "normal");
    assert.equal(server.status, "stopped");
    assert.equal(server.connections().length, 0);
    await server.finished;

    for (const [who, client] of [["alice", alice], ["bob", bob], ["anon", anon]] as const) {
      const lines: string[] = [];
      for (let line = await client.readLine(); line !== null; line = await client.readLine()) {
        lines.push(line);
      }
      assert.ok(lines.includes(SHUTTING_DOWN), `${who} heard ${JSON.stringify(lines)}`);
      // Named users may also hear that the others left as they were shut down; nothing else.
      const others = lines.filter((line) => line !== SHUTTING_DOWN);
      assert.ok(
        others.every((line) => /^\* (alice|bob) left$/.test(line) && !line.includes(who)),
        `${who} heard ${JSON.stringify(lines)}`,
      );
    }
    await assert.rejects(LineClient.open(port), Deno.errors.ConnectionRefused);
  });
});

Deno.test("chat: the example runs as a process with PORT=0, serves clients, and exits 0 on SIGTERM", async () => {
  const chat = await startProcess(
    ["run", "--allow-net", "--allow-env", "examples/chat_server.ts"],
    /^chat server listening on (\S+):(\d+)$/m,
    { cwd: new URL("..", import.meta.url), env: { PORT: "0", NO_COLOR: "1" }, timeoutMs: 15_000 },
  );
  const clients: LineClient[] = [];
  try {
    const port = Number(chat.match[2]);
    assert.ok(port > 0, `listening on port ${port}`);

    for (const name of ["ann", "ben"]) {
      const client = await LineClient.open(port);
      clients.push(client);
      await client.expect(WELCOME);
      await client.send(`/nick ${name}`);
      await client.expect(`* you are now ${name}`);
    }
    const [ann, ben] = clients;
    await ann.expect("* ben joined");
    await ben.send("hello from ben");
    await ann.expect("<ben> hello from ben");
    await ann.send("/msg ben hi back");
    await ann.expect("-> ben: hi back");
    await ben.expect("*ann* hi back");

    chat.child.kill("SIGTERM");
    for (const client of clients) {
      const lines: string[] = [];
      for (let line = await client.readLine(); line !== null; line = await client.readLine()) {
        lines.push(line);
      }
      assert.ok(lines.includes(SHUTTING_DOWN), JSON.stringify(lines));
    }
    const status = await chat.child.status;
    assert.equal(status.code, 0);
    assert.equal(status.signal, null);
    assert.match(await chat.readAll(), /^talk to it with: nc localhost \d+$/m);
    assert.equal(await chat.stderr, "");
  } finally {
    for (const client of clients) client.close();
    await chat.end();
  }
});
