// The tcp transport on its own: the default listening address (IPv6 and IPv4 on one socket,
// or 0.0.0.0), TCP keep-alive, and the optional Conn/Listener hooks (ref/unref and the
// socket controls). Real sockets on loopback, port 0; subprocesses where the process
// itself is under test (permissions, exiting).

import assert from "node:assert/strict";
import {
  type Conn,
  connect,
  type Connection,
  type Event,
  type Listener,
  send,
  serve,
  tcp,
  type Yielded,
} from "../mod.ts";
import { HOST, within } from "./_support.ts";

const WAIT_MS = 5000;

/** A handler's generator, over frames of bytes (the default framing). */
type Bytes = AsyncGenerator<Yielded, void, Event<Uint8Array>>;

const tcpUrl = new URL("../transport/tcp.ts", import.meta.url).href;

/** Whether this system has IPv6 loopback at all. */
function hasIpv6(): boolean {
  try {
    Deno.listen({ hostname: "::1", port: 0 }).close();
    return true;
  } catch {
    return false;
  }
}

/** Whether a socket bound to "::" takes IPv4 too here (Linux: net.ipv6.bindv6only is 0). */
function dualStackByDefault(): boolean {
  if (!hasIpv6()) return false;
  return Deno.readTextFileSync("/proc/sys/net/ipv6/bindv6only").trim() === "0";
}

const linux = Deno.build.os === "linux";

/** Runs `source` as a module in a new Deno with `flags`; its stdout, trimmed, and exit code. */
async function runDeno(source: string, flags: string[]): Promise<{ code: number; out: string }> {
  const file = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.writeTextFile(file, source);
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--no-config", "--no-lock", ...flags, file],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const output = child.output();
    try {
      const { code, stdout, stderr } = await within(WAIT_MS * 2, output, "subprocess");
      const err = new TextDecoder().decode(stderr).trim();
      return { code, out: new TextDecoder().decode(stdout).trim() + (err ? `\n${err}` : "") };
    } catch (err) {
      child.kill("SIGKILL");
      await output;
      throw err;
    }
  } finally {
    await Deno.remove(file);
  }
}

// ---- The default listening address ------------------------------------------------------

Deno.test({
  name: "tcp: without a hostname, one listener takes IPv4 and IPv6 clients where the system allows",
  ignore: !linux,
  async fn() {
    const dual = dualStackByDefault();
    const listener = await tcp().listen({ port: 0 });
    const addr = listener.addr as Deno.NetAddr;
    const conns: Conn[] = [];
    try {
      assert.equal(addr.hostname, dual ? "::" : "0.0.0.0");
      // IPv4 is served either way; seen through "::" it is an IPv4-mapped IPv6 address.
      const v4 = await within(WAIT_MS, tcp().connect({ hostname: HOST, port: addr.port }));
      const v4Served = await within(WAIT_MS, listener.accept());
      conns.push(v4, v4Served);
      const v4Remote = v4Served.remoteAddr as Deno.NetAddr;
      assert.equal(v4Remote.hostname, dual ? "::ffff:127.0.0.1" : "127.0.0.1");
      assert.equal(v4Remote.port, (v4.localAddr as Deno.NetAddr).port);
      if (dual) {
        const v6 = await within(WAIT_MS, tcp().connect({ hostname: "::1", port: addr.port }));
        const v6Served = await within(WAIT_MS, listener.accept());
        conns.push(v6, v6Served);
        assert.equal((v6Served.remoteAddr as Deno.NetAddr).hostname, "::1");
      }
    } finally {
      for (const c of conns) c.close();
      listener.close();
    }
  },
});

Deno.test({
  name: "tcp: serve() with no hostname answers clients on 127.0.0.1 and ::1",
  ignore: !linux || !dualStackByDefault(),
  async fn() {
    // The server tells each client where it sees it coming from.
    const server = await serve(async function* (conn: Connection<Uint8Array>): Bytes {
      yield send(new TextEncoder().encode((conn.remoteAddr as Deno.NetAddr).hostname));
    }, { port: 0 });
    const seen: string[] = [];
    try {
      const port = (server.addr as Deno.NetAddr).port;
      assert.equal((server.addr as Deno.NetAddr).hostname, "::");
      for (const hostname of [HOST, "::1"]) {
        const told = Promise.withResolvers<string>();
        const client = await within(
          WAIT_MS,
          connect(async function* (): Bytes {
            const ev = yield;
            if (ev.type === "packet") told.resolve(new TextDecoder().decode(ev.data));
            else told.reject(new Error(`got ${ev.type}`));
          }, { hostname, port }),
        );
        seen.push(await within(WAIT_MS, told.promise, `what the server saw of ${hostname}`));
        await within(WAIT_MS, client.stop());
      }
      assert.deepEqual(seen, ["::ffff:127.0.0.1", "::1"]);
    } finally {
      await within(WAIT_MS, server.stop());
    }
  },
});

Deno.test("tcp: where '::' may not be bound (here: not permitted), the default is 0.0.0.0", async () => {
  const source = `
    import { tcp } from ${JSON.stringify(tcpUrl)};
    const listener = await tcp().listen({ port: 0 });
    console.log(listener.addr.hostname);
    listener.close();
  `;
  const { code, out } = await runDeno(source, ["--allow-net=0.0.0.0"]);
  assert.equal(code, 0, out);
  assert.equal(out, "0.0.0.0");
});

Deno.test("tcp: an explicit hostname is bound as given", async () => {
  const listener = await tcp().listen({ hostname: HOST, port: 0 });
  try {
    assert.equal((listener.addr as Deno.NetAddr).hostname, HOST);
  } finally {
    listener.close();
  }
});

// ---- Keep-alive -------------------------------------------------------------------------

/**
 * The kernel timer armed on the TCP socket from `local` to `remote` port (IPv4 loopback), from
 * /proc/net/tcp: 0 none, 1 retransmit, 2 keep-alive, …
 */
function timerOf(localPort: number, remotePort: number): number {
  const hex = (port: number) => port.toString(16).toUpperCase().padStart(4, "0");
  const local = `0100007F:${hex(localPort)}`;
  const remote = `0100007F:${hex(remotePort)}`;
  for (const line of Deno.readTextFileSync("/proc/net/tcp").split("\n").slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields[1] === local && fields[2] === remote) return Number(fields[5].split(":")[0]);
  }
  throw new Error(`no socket ${local} -> ${remote} in /proc/net/tcp`);
}

Deno.test({
  name: "tcp: keepAlive turns on TCP keep-alive on accepted and connected sockets; off by default",
  ignore: !linux,
  async fn() {
    for (const keepAlive of [true, undefined]) {
      const transport = tcp(keepAlive === undefined ? {} : { keepAlive });
      const listener = await transport.listen({ hostname: HOST, port: 0 });
      const port = (listener.addr as Deno.NetAddr).port;
      const [client, served] = await within(
        WAIT_MS,
        Promise.all([transport.connect({ hostname: HOST, port }), listener.accept()]),
      );
      try {
        const clientPort = (client.localAddr as Deno.NetAddr).port;
        // An idle connection with keep-alive on has its keep-alive timer armed.
        const want = keepAlive ? 2 : 0;
        assert.equal(timerOf(clientPort, port), want, `client side, keepAlive ${keepAlive}`);
        assert.equal(timerOf(port, clientPort), want, `server side, keepAlive ${keepAlive}`);
      } finally {
        client.close();
        served.close();
        listener.close();
      }
    }
  },
});

// ---- Optional hooks: socket controls, ref/unref ------------------------------------------

Deno.test("tcp: its conns and listeners offer the optional hooks, typed on Conn and Listener", async () => {
  // Deno's own connections are Conns, hooks and all (TlsConn's handshake resolves to info).
  const asConn = (c: Deno.TcpConn | Deno.TlsConn | Deno.UnixConn): Conn => c;
  const asListener = (l: Deno.TcpListener | Deno.TlsListener): Listener => l;
  assert.equal(typeof asConn, "function");
  assert.equal(typeof asListener, "function");

  const transport = tcp();
  const listener: Listener = await transport.listen({ hostname: HOST, port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const [client, served] = await within(
    WAIT_MS,
    Promise.all([transport.connect({ hostname: HOST, port }), listener.accept()]),
  );
  try {
    for (const conn of [client, served]) {
      assert.equal(conn.handshake, undefined); // plain TCP: ready at once
      conn.setNoDelay?.(false);
      conn.setKeepAlive?.(true);
      conn.unref?.();
      conn.ref?.();
      assert.equal(typeof conn.setNoDelay, "function");
      assert.equal(typeof conn.setKeepAlive, "function");
      assert.equal(typeof conn.unref, "function");
    }
    assert.equal(typeof listener.unref, "function");
    assert.equal(typeof listener.ref, "function");
    listener.unref?.();
    listener.ref?.();
  } finally {
    client.close();
    served.close();
    listener.close();
  }
});

Deno.test("tcp: unref on a listener and its connections lets the process exit while they wait", async () => {
  const source = `
    import { tcp } from ${JSON.stringify(tcpUrl)};
    const transport = tcp();
    const listener = await transport.listen({ hostname: "127.0.0.1", port: 0 });
    const port = listener.addr.port;
    const [client, served] = await Promise.all([
      transport.connect({ hostname: "127.0.0.1", port }),
      listener.accept(),
    ]);
    listener.accept().catch(() => {}); // pending for ever: nobody else connects
    client.read(new Uint8Array(1)).catch(() => {}); // pending: nobody writes
    served.read(new Uint8Array(1)).catch(() => {});
    listener.unref();
    client.unref();
    served.unref();
    console.log("waiting");
  `;
  const { code, out } = await runDeno(source, ["--allow-net=127.0.0.1"]);
  assert.equal(code, 0, out);
  assert.equal(out, "waiting");
});
