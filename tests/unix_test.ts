// The unix() transport: echo over a Unix socket, the socket file's life (removed on stop, a
// stale one replaced, a live one or a non-socket left alone), addresses, path limits, and that
// no --unstable flag is needed.

import assert from "node:assert/strict";
import {
  connect,
  type Connection,
  type HandlerGenerator,
  lines,
  send,
  serve,
  unix,
  UnixPathTooLong,
} from "../mod.ts";
import { Inbox, readExactly, startProcess, within } from "./_support.ts";

const WAIT_MS = 5000;

/** Runs `body` with a fresh directory for its socket files, removed afterwards. */
async function inTempDir(body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "etcp-unix-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/** A line echo server handler that also reports each connection's addresses. */
function echoServer(seen?: Inbox<Connection<string>>) {
  return async function* (conn: Connection<string>): HandlerGenerator<string> {
    seen?.push(conn);
    let ev = yield;
    while (ev.type === "packet") ev = yield send(`echo ${ev.data}`);
  };
}

/** Connects with connect(), sends `line`, resolves with the answer. */
async function ask(transport: ReturnType<typeof unix>, line: string): Promise<string> {
  const got = Promise.withResolvers<string>();
  const client = await connect(async function* (): HandlerGenerator<string> {
    const ev = yield send(line);
    if (ev.type === "packet") got.resolve(ev.data);
    else got.reject(new Error(`no answer: ${ev.type}`));
  }, { transport, framing: lines() });
  try {
    return await within(WAIT_MS, got.promise, `answer to ${line}`);
  } finally {
    await within(WAIT_MS, client.closed, "client closes");
  }
}

/** Serves echoServer() over `transport`, checks that connect() gets `line` echoed, and stops. */
async function assertEchoes(transport: ReturnType<typeof unix>, line: string): Promise<void> {
  const server = await serve(echoServer(), { transport, framing: lines() });
  try {
    assert.equal(await ask(transport, line), `echo ${line}`);
  } finally {
    await server.stop();
  }
}

/** Sends `line` over a raw Deno unix connection, resolves with the answer line. */
async function askRaw(path: string, line: string): Promise<string> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await conn.write(new TextEncoder().encode(`${line}\n`));
    const want = `echo ${line}\n`;
    return new TextDecoder().decode(await within(WAIT_MS, readExactly(conn, want.length)));
  } finally {
    conn.close();
  }
}

Deno.test("unix: echo through serve and connect, with Unix addresses on both ends", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/echo.sock`;
    const transport = unix(path);
    const seen = new Inbox<Connection<string>>(WAIT_MS);
    const server = await serve(echoServer(seen), { transport, framing: lines() });
    try {
      assert.deepEqual(server.addr, { transport: "unix", path });
      assert.equal((await Deno.lstat(path)).isSocket, true);

      const got = Promise.withResolvers<string>();
      const client = await connect(async function* (): HandlerGenerator<string> {
        let ev = yield send("one");
        if (ev.type === "packet") ev = yield send(`${ev.data} two`);
        if (ev.type === "packet") got.resolve(ev.data);
      }, { transport, framing: lines() });
      assert.equal(await within(WAIT_MS, got.promise), "echo echo one two");
      // The client's own end is unnamed: "" (Deno says null, which its types do not allow).
      assert.deepEqual(client.remoteAddr, { transport: "unix", path });
      assert.deepEqual(client.localAddr, { transport: "unix", path: "" });
      const accepted = await seen.next();
      assert.deepEqual(accepted.localAddr, { transport: "unix", path });
      assert.deepEqual(accepted.remoteAddr, { transport: "unix", path: "" });
      await within(WAIT_MS, client.closed);

      // A plain Deno client talks to it too.
      assert.equal(await askRaw(path, "raw"), "echo raw\n");
    } finally {
      await server.stop();
    }
  });
});

Deno.test("unix: stop() removes the socket file, and the path can be served again", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/s.sock`;
    const transport = unix(path);
    const first = await serve(echoServer(), { transport, framing: lines() });
    assert.equal(await exists(path), true);
    await first.stop();
    assert.equal(await exists(path), false);
    await assert.rejects(() => Deno.connect({ transport: "unix", path }), Deno.errors.NotFound);
    // connect() names the path in its error.
    await assert.rejects(
      () => connect(async function* () {}, { transport }),
      (err: Error) => err instanceof Deno.errors.NotFound && err.message.includes(path),
    );

    await assertEchoes(transport, "again");
    assert.equal(await exists(path), false);
  });
});

Deno.test("unix: a stale socket file left by a killed process is replaced", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/stale.sock`;
    // A child process binds the path and is killed with SIGKILL: nothing removes the file.
    const child = await startProcess(
      [
        "eval",
        `Deno.listen({ transport: "unix", path: ${JSON.stringify(path)} });` +
        `console.log("listening"); setInterval(() => {}, 60_000);`,
      ],
      /listening/,
      { cwd: dir, timeoutMs: 10_000 },
    );
    try {
      child.child.kill("SIGKILL");
      await within(WAIT_MS, child.child.status, "the child exits");
    } finally {
      await child.end();
    }
    assert.equal((await Deno.lstat(path)).isSocket, true, "the stale file is left behind");
    await assert.rejects(
      () => Deno.connect({ transport: "unix", path }),
      Deno.errors.ConnectionRefused,
    );
    // connect() says so, naming the path.
    await assert.rejects(
      () => connect(async function* () {}, { transport: unix(path) }),
      (err: Error) =>
        err instanceof Deno.errors.ConnectionRefused && err.message.includes("stale socket"),
    );

    await assertEchoes(unix(path), "fresh");
  });
});

Deno.test("unix: a path a live server holds is refused with AddrInUse; that server goes on", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/live.sock`;
    const transport = unix(path);
    const server = await serve(echoServer(), { transport, framing: lines() });
    try {
      await assert.rejects(
        () => serve(echoServer(), { transport: unix(path), framing: lines() }),
        (err: Error) => {
          assert.ok(err instanceof Deno.errors.AddrInUse);
          assert.match(err.message, /live\.sock is in use by a live server/);
          return true;
        },
      );
      // Also a listener of Deno's own, not of this library.
      const other = `${dir}/deno.sock`;
      const raw = Deno.listen({ transport: "unix", path: other });
      try {
        await assert.rejects(
          () => serve(echoServer(), { transport: unix(other), framing: lines() }),
          /live server/,
        );
      } finally {
        raw.close();
      }
      assert.equal(await exists(path), true, "the live server's file is still there");
      assert.equal(await ask(transport, "still"), "echo still");
    } finally {
      await server.stop();
    }
  });
});

Deno.test("unix: a file that is not a socket is never replaced", async () => {
  await inTempDir(async (dir) => {
    const path = `${dir}/not-a-socket`;
    await Deno.writeTextFile(path, "keep me");
    await assert.rejects(
      () => serve(echoServer(), { transport: unix(path), framing: lines() }),
      (err: Error) =>
        err instanceof Deno.errors.AddrInUse &&
        /is not a socket; not replacing it/.test(err.message),
    );
    assert.equal(await Deno.readTextFile(path), "keep me");
  });
});

Deno.test("unix: a path too long for the system is refused before binding", async () => {
  await inTempDir(async (dir) => {
    // Linux: sun_path holds 108 bytes with the NUL, so 107 bind and 108 do not; 104 elsewhere.
    const max = Deno.build.os === "linux" ? 107 : Deno.build.os === "darwin" ? 103 : undefined;
    if (max !== undefined) {
      const fill = (n: number) => `${dir}/${"p".repeat(n - dir.length - 1)}`;
      const longest = fill(max);
      assert.equal(new TextEncoder().encode(longest).length, max);
      await assertEchoes(unix(longest), "edge");
      const tooLong = fill(max + 1);
      assert.throws(() => unix(tooLong), (err: unknown) => {
        assert.ok(err instanceof UnixPathTooLong);
        assert.ok(err instanceof RangeError);
        assert.equal(err.name, "UnixPathTooLong");
        assert.equal(err.byteLength, max + 1);
        assert.equal(err.maxLength, max);
        assert.match(err.message, new RegExp(`is ${max + 1} bytes, over the ${max}-byte limit`));
        return true;
      });
      assert.equal(await exists(tooLong), false, "nothing was bound");
    }
    // Bytes, not characters: 60 two-byte characters are 120 bytes.
    assert.throws(() => unix(`${"é".repeat(60)}`), UnixPathTooLong);
    assert.throws(() => unix(""), TypeError);
    assert.throws(() => unix("a\0b"), TypeError);
  });
});

Deno.test("unix: several acceptors are refused (one socket file has one listener)", async () => {
  await inTempDir(async (dir) => {
    await assert.rejects(
      () =>
        serve(echoServer(), { transport: unix(`${dir}/a.sock`), acceptors: 2, framing: lines() }),
      Deno.errors.NotSupported,
    );
    assert.equal(await exists(`${dir}/a.sock`), false);
  });
});

Deno.test("unix: works without any --unstable flag (and without deno.json)", async () => {
  await inTempDir(async (dir) => {
    const script = `${dir}/child.ts`;
    await Deno.writeTextFile(
      script,
      `import { connect, lines, send, serve, unix } from ${
        JSON.stringify(new URL("../mod.ts", import.meta.url).href)
      };
const transport = unix(${JSON.stringify(`${dir}/child.sock`)});
const server = await serve(async function* () {
  const ev = yield;
  if (ev.type === "packet") yield send("pong " + ev.data);
}, { transport, framing: lines() });
const got = Promise.withResolvers();
await connect(async function* () {
  const ev = yield send("ping");
  if (ev.type === "packet") got.resolve(ev.data);
}, { transport, framing: lines() });
console.log(await got.promise);
await server.stop();
`,
    );
    const out = await within(
      20_000,
      new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--no-config",
          "--no-lock",
          "--allow-read",
          "--allow-write",
          "--allow-net",
          script,
        ],
        cwd: dir,
        stdout: "piped",
        stderr: "piped",
      }).output(),
      "the child exits",
    );
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    assert.equal(new TextDecoder().decode(out.stdout).trim(), "pong ping");
  });
});
