// The Redis examples against real peers: examples/redis_server.ts driven by redis-cli (a session
// typed line by line, compared with the same session against a real redis-server, word for
// word), by `redis-cli --pipe` and by redis-cli subscribers; examples/redis_client.ts against a
// real redis-server started here on a free port (commands, pipelines of many commands in flight,
// RESP3, subscriptions, and reconnection after the server is killed and restarted). The parts
// that need no program of Redis's (the server over raw sockets, expiry on a fake clock, Redis's
// glob patterns, Pub/Sub between connections, CLIENT and the registry, the client against the
// example server, the examples' command lines) always run; the others are skipped, saying
// which program is missing, only where it is not installed (.ci/run installs them).

import assert from "node:assert/strict";
import {
  encodeFrames,
  MemoryRegistry,
  PoolUnavailable,
  resp,
  RespError,
  RespPush,
  type RespValue,
  type Server,
} from "../mod.ts";
import {
  globMatch,
  Keyspace,
  parseInteger,
  parseRedisServerArgs,
  redisServer,
} from "../examples/redis_server.ts";
import { RedisClient } from "../examples/redis_client.ts";
import { closeQuietly, HOST, portOf, startProcess, within } from "./_support.ts";
import {
  missing,
  type RedisServerProcess,
  runTool,
  startRedisServer,
  tools,
} from "./_redis_tools.ts";

const utf8 = new TextEncoder();
const QUIET = { error() {}, warn() {}, debug() {} };
const SERVER_SCRIPT = new URL("../examples/redis_server.ts", import.meta.url).pathname;
const CLIENT_SCRIPT = new URL("../examples/redis_client.ts", import.meta.url).pathname;

// ---- Helpers ----------------------------------------------------------------------------------

/** A reply as plain data: bytes as latin1 text, errors as `{ error }`, pushes and maps tagged. */
function show(value: RespValue): unknown {
  if (value instanceof Uint8Array) return String.fromCharCode(...value);
  if (value instanceof RespError) return { error: value.message };
  if (value instanceof RespPush) return { push: value.values.map(show) };
  if (value instanceof Map) return { map: [...value].map(([k, v]) => [show(k), show(v)]) };
  if (value instanceof Set) return { set: [...value].map(show) };
  if (Array.isArray(value)) return value.map(show);
  return value;
}

/** A client speaking RESP over a raw TCP socket, one reply at a time. */
class RawRedis {
  readonly #conn: Deno.Conn;
  readonly #decoder = resp({ maxLength: Infinity }).decoder();
  readonly #replies: RespValue[] = [];
  readonly #buf = new Uint8Array(65536);
  #ended = false;

  private constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  static async open(port: number): Promise<RawRedis> {
    return new RawRedis(await Deno.connect({ hostname: HOST, port }));
  }

  async write(data: string | Uint8Array): Promise<void> {
    let bytes = typeof data === "string" ? utf8.encode(data) : data;
    while (bytes.length > 0) bytes = bytes.subarray(await this.#conn.write(bytes));
  }

  /** The next reply (5 s at most); throws if the server closed the connection first. */
  reply(): Promise<RespValue> {
    return within(5000, this.#next(), "a reply");
  }

  async #next(): Promise<RespValue> {
    while (this.#replies.length === 0) {
      const n = this.#ended ? null : await this.#conn.read(this.#buf);
      if (n === null) {
        this.#ended = true;
        throw new Error("the server closed the connection");
      }
      this.#decoder.decode(this.#buf.subarray(0, n), (r) => this.#replies.push(r));
    }
    return this.#replies.shift()!;
  }

  /** Send one command (an array of bulk strings) and return its reply as plain data. */
  async command(...args: (string | Uint8Array)[]): Promise<unknown> {
    await this.write(encodeFrames(resp(), [args]));
    return show(await this.reply());
  }

  /** Resolves once the server has closed the connection (after any replies still to read). */
  async closedByServer(): Promise<void> {
    await within(
      5000,
      (async () => {
        for (;;) {
          try {
            await this.#next();
          } catch {
            return;
          }
        }
      })(),
      "the server closes the connection",
    );
  }

  close(): void {
    closeQuietly(this.#conn);
  }
}

/** Run `body` with a fresh example server on a free port, stopped afterwards. */
async function withServer(
  body: (port: number, server: Server<RespValue>) => Promise<void>,
  options: Parameters<typeof redisServer>[0] = {},
): Promise<void> {
  const server = await redisServer({ port: 0, hostname: HOST, logger: QUIET, ...options });
  try {
    await body(portOf(server.addr), server);
  } finally {
    await within(10_000, server.stop(), "server stop");
  }
}

/** Run `body` with a real redis-server on a free port, stopped afterwards. */
async function withRedis(body: (redis: RedisServerProcess) => Promise<void>): Promise<void> {
  const redis = await startRedisServer();
  try {
    await body(redis);
  } finally {
    await redis.stop();
  }
}

/** A test that needs Redis's programs: skipped, saying why, if one is missing. */
function testWith(
  needed: Parameters<typeof missing>,
  name: string,
  fn: () => Promise<void>,
): void {
  const why = missing(...needed);
  Deno.test({ name: why ? `${name} (skipped: ${why})` : name, ignore: why !== undefined, fn });
}

// ---- The server, over raw sockets ---------------------------------------------------------------

Deno.test("redis server: strings, counters, keys, and Redis's own errors", async () => {
  await withServer(async (port) => {
    const c = await RawRedis.open(port);
    try {
      assert.equal(await c.command("PING"), "PONG");
      assert.equal(await c.command("ping", "hello"), "hello");
      assert.equal(await c.command("ECHO", "a b"), "a b");
      assert.equal(await c.command("SET", "a", "1"), "OK");
      assert.equal(await c.command("GET", "a"), "1");
      assert.equal(await c.command("INCR", "a"), 2);
      assert.equal(await c.command("INCRBY", "a", "40"), 42);
      assert.equal(await c.command("DECR", "a"), 41);
      assert.equal(await c.command("DECRBY", "a", "-1"), 42);
      assert.equal(await c.command("GET", "nope"), null);
      assert.equal(await c.command("SET", "a", "x", "NX"), null);
      assert.equal(await c.command("SET", "b", "x", "XX"), null);
      assert.equal(await c.command("SET", "a", "43", "XX", "GET"), "42");
      assert.equal(await c.command("MSET", "b", "2", "c", "3"), "OK");
      assert.deepEqual(await c.command("MGET", "a", "b", "nope", "c"), ["43", "2", null, "3"]);
      assert.equal(await c.command("EXISTS", "a", "a", "nope"), 2);
      assert.equal(await c.command("TYPE", "a"), "string");
      assert.equal(await c.command("TYPE", "nope"), "none");
      assert.deepEqual(((await c.command("KEYS", "*")) as string[]).sort(), ["a", "b", "c"]);
      assert.deepEqual(((await c.command("KEYS", "[ab]")) as string[]).sort(), ["a", "b"]);
      assert.equal(await c.command("DBSIZE"), 3);
      assert.equal(await c.command("DEL", "a", "b", "nope"), 2);
      assert.equal(await c.command("FLUSHDB"), "OK");
      assert.equal(await c.command("DBSIZE"), 0);
      // Redis's error texts, word for word.
      assert.deepEqual(await c.command("SET", "s", "text"), "OK");
      assert.deepEqual(await c.command("INCR", "s"), {
        error: "ERR value is not an integer or out of range",
      });
      assert.deepEqual(await c.command("SET", "n", "9223372036854775807"), "OK");
      assert.deepEqual(await c.command("INCR", "n"), {
        error: "ERR increment or decrement would overflow",
      });
      assert.deepEqual(await c.command("FOO", "bar", "baz"), {
        error: "ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' ",
      });
      assert.deepEqual(await c.command("GET"), {
        error: "ERR wrong number of arguments for 'get' command",
      });
      assert.deepEqual(await c.command("MSET", "a"), {
        error: "ERR wrong number of arguments for 'mset' command",
      });
      assert.deepEqual(await c.command("MSET", "a", "1", "b"), {
        error: "ERR wrong number of arguments for 'mset' command",
      });
      assert.deepEqual(await c.command("SET", "a", "b", "NX", "XX"), { error: "ERR syntax error" });
      assert.deepEqual(await c.command("SET", "a", "b", "EX", "0"), {
        error: "ERR invalid expire time in 'set' command",
      });
      assert.deepEqual(await c.command("SET", "a", "b", "EX", "x"), {
        error: "ERR value is not an integer or out of range",
      });
      assert.deepEqual(await c.command("CLIENT", "FOO"), {
        error: "ERR unknown subcommand 'FOO'. Try CLIENT HELP.",
      });
      assert.deepEqual(await c.command("CLIENT"), {
        error: "ERR wrong number of arguments for 'client' command",
      });
      assert.deepEqual(await c.command("CLIENT", "GETNAME", "x"), {
        error: "ERR wrong number of arguments for 'client|getname' command",
      });
    } finally {
      c.close();
    }
  });
});

Deno.test("redis server: keys and values are bytes; inline commands and pipelines work", async () => {
  await withServer(async (port) => {
    const c = await RawRedis.open(port);
    try {
      const all = Uint8Array.from({ length: 256 }, (_, i) => i);
      assert.equal(await c.command("SET", all, all.slice().reverse()), "OK");
      assert.deepEqual(await c.command("GET", all), String.fromCharCode(...all.slice().reverse()));
      assert.deepEqual(await c.command("KEYS", "\x00*"), [String.fromCharCode(...all)]);
      // Inline, as typed into nc or telnet, with Redis's quoting; empty lines are nothing.
      await c.write(
        'SET greeting "hello world"\r\nGET greeting\n\r\nECHO \'it\\\'s\'\r\nECHO "\\x41\\n"\r\n',
      );
      assert.equal(show(await c.reply()), "OK");
      assert.equal(show(await c.reply()), "hello world");
      assert.equal(show(await c.reply()), "it's");
      assert.equal(show(await c.reply()), "A\n");
      // A thousand commands in one write: a thousand replies, in order.
      const commands = Array.from({ length: 1000 }, () => ["INCR", "counter"]);
      await c.write(encodeFrames(resp(), commands));
      for (let i = 1; i <= 1000; i++) assert.equal(show(await c.reply()), i);
    } finally {
      c.close();
    }
  });
});

Deno.test("redis server: QUIT, and bad input, end only their own connection", async () => {
  await withServer(async (port) => {
    const [a, b, c, d] = await Promise.all([1, 2, 3, 4].map(() => RawRedis.open(port)));
    try {
      assert.equal(await a.command("QUIT"), "OK");
      await a.closedByServer();
      await b.write("*1\r\n$x\r\n");
      assert.deepEqual(show(await b.reply()), { error: "ERR Protocol error: invalid bulk length" });
      await b.closedByServer();
      await c.write('SET a "b\r\n');
      assert.deepEqual(show(await c.reply()), {
        error: "ERR Protocol error: unbalanced quotes in request",
      });
      await c.closedByServer();
      // An array that holds something other than bulk strings, as Redis words it.
      await d.write("*2\r\n$3\r\nGET\r\n:1\r\n");
      assert.deepEqual(show(await d.reply()), {
        error: "ERR Protocol error: expected '$', got ':'",
      });
      await d.closedByServer();
      // The server goes on.
      const e = await RawRedis.open(port);
      assert.equal(await e.command("PING"), "PONG");
      e.close();
    } finally {
      for (const x of [a, b, c, d]) x.close();
    }
  });
});

Deno.test("redis server: expiry (EX, PX, EXPIRE NX/XX/GT/LT, TTL, PERSIST) on a fake clock", async () => {
  let now = 1_000_000;
  await withServer(async (port) => {
    const c = await RawRedis.open(port);
    try {
      assert.equal(await c.command("SET", "k", "v", "EX", "10"), "OK");
      assert.equal(await c.command("TTL", "k"), 10);
      assert.equal(await c.command("PTTL", "k"), 10_000);
      now += 4_400;
      assert.equal(await c.command("TTL", "k"), 6); // 5.6 s rounds to 6, as Redis does
      assert.equal(await c.command("PTTL", "k"), 5_600);
      assert.equal(await c.command("EXPIRE", "k", "100", "NX"), 0);
      assert.equal(await c.command("EXPIRE", "k", "100", "XX"), 1);
      assert.equal(await c.command("EXPIRE", "k", "50", "GT"), 0);
      assert.equal(await c.command("EXPIRE", "k", "50", "LT"), 1);
      assert.equal(await c.command("TTL", "k"), 50);
      assert.equal(await c.command("PERSIST", "k"), 1);
      assert.equal(await c.command("TTL", "k"), -1);
      assert.equal(await c.command("TTL", "nope"), -2);
      assert.equal(await c.command("EXPIRE", "nope", "10"), 0);
      assert.equal(await c.command("SET", "p", "v", "PX", "1500"), "OK");
      assert.equal(await c.command("SET", "keep", "v", "EX", "1"), "OK");
      assert.equal(await c.command("SET", "keep", "w", "KEEPTTL"), "OK");
      assert.equal(await c.command("SET", "plain", "v", "EX", "1"), "OK");
      assert.equal(await c.command("SET", "plain", "w"), "OK"); // a SET drops the TTL
      assert.equal(await c.command("INCR", "counter"), 1);
      assert.equal(await c.command("EXPIRE", "counter", "1"), 1);
      assert.equal(await c.command("INCR", "counter"), 2); // INCR keeps it
      assert.equal(await c.command("DBSIZE"), 5);
      now += 1_500;
      assert.equal(await c.command("GET", "p"), null);
      assert.equal(await c.command("GET", "keep"), null);
      assert.equal(await c.command("GET", "plain"), "w");
      assert.deepEqual(((await c.command("KEYS", "*")) as string[]).sort(), ["k", "plain"]);
      assert.equal(await c.command("DBSIZE"), 2);
      // A past or zero time deletes at once.
      assert.equal(await c.command("EXPIRE", "k", "-1"), 1);
      assert.equal(await c.command("EXISTS", "k"), 0);
      assert.deepEqual(await c.command("EXPIRE", "plain", "1", "FOO"), {
        error: "ERR Unsupported option FOO",
      });
      assert.deepEqual(await c.command("EXPIRE", "plain", "1", "GT", "LT"), {
        error: "ERR GT and LT options at the same time are not compatible",
      });
    } finally {
      c.close();
    }
  }, { keyspace: new Keyspace(() => now) });
});

Deno.test("redis server: KEYS patterns match as Redis's stringmatchlen does", () => {
  const cases: [string, string, boolean][] = [
    ["*", "", false], // as in Redis (KEYS * takes every key, the empty one too, before matching)
    ["*", "anything", true],
    ["h?llo", "hello", true],
    ["h?llo", "hllo", false],
    ["h*llo", "heeeello", true],
    ["h[ae]llo", "hallo", true],
    ["h[ae]llo", "hillo", false],
    ["h[^e]llo", "hallo", true],
    ["h[^e]llo", "hello", false],
    ["h[a-b]llo", "hbllo", true],
    ["h[b-a]llo", "hallo", true], // a reversed range is swapped
    ["h[a-b]llo", "hcllo", false],
    ["h\\*llo", "h*llo", true],
    ["h\\*llo", "hello", false],
    ["[\\]]", "]", true],
    ["[abc", "a", true], // an unclosed class ends with the pattern
    ["a*b*c", "a--b--c", true],
    ["a*b*c", "a--b--", false],
    ["*a*a*a*a*a*a*a*a*a*a*b", "a".repeat(60), false], // stays fast
    ["user:*", "user:1", true],
    ["", "", true],
    ["", "a", false],
    ["a**", "a", true],
  ];
  for (const [pattern, text, expected] of cases) {
    assert.equal(globMatch(pattern, text), expected, `${pattern} against ${text}`);
  }
  assert.equal(parseInteger(utf8.encode("-9223372036854775808")), -(2n ** 63n));
  for (const bad of ["", "-", "01", "-0", "+1", " 1", "1 ", "9223372036854775808", "1e3"]) {
    assert.equal(parseInteger(utf8.encode(bad)), undefined, JSON.stringify(bad));
  }
});

Deno.test("redis server: PUBLISH reaches subscribers through info; RESP2 subscribers are restricted, RESP3 get pushes", async () => {
  await withServer(async (port) => {
    const [sub2, sub3, pub] = await Promise.all([1, 2, 3].map(() => RawRedis.open(port)));
    try {
      assert.deepEqual(await sub2.command("SUBSCRIBE", "news", "sport"), ["subscribe", "news", 1]);
      assert.deepEqual(show(await sub2.reply()), ["subscribe", "sport", 2]);
      assert.deepEqual(await sub2.command("GET", "a"), {
        error:
          "ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
      });
      assert.deepEqual(await sub2.command("PING"), ["pong", ""]);
      assert.equal(((await sub3.command("HELLO", "3")) as { map: unknown[][] }).map[2][1], 3);
      assert.deepEqual(await sub3.command("SUBSCRIBE", "news"), { push: ["subscribe", "news", 1] });
      assert.equal(await sub3.command("SET", "a", "1"), "OK"); // RESP3: any command
      assert.equal(await pub.command("PUBLISH", "news", "hello"), 2);
      assert.equal(await pub.command("PUBLISH", "nobody", "x"), 0);
      assert.deepEqual(show(await sub2.reply()), ["message", "news", "hello"]);
      assert.deepEqual(show(await sub3.reply()), { push: ["message", "news", "hello"] });
      assert.deepEqual(await sub2.command("UNSUBSCRIBE", "news"), ["unsubscribe", "news", 1]);
      assert.equal(await pub.command("PUBLISH", "news", "again"), 1);
      assert.equal(await pub.command("PUBLISH", "sport", "goal"), 1);
      assert.deepEqual(show(await sub2.reply()), ["message", "sport", "goal"]);
      assert.deepEqual(show(await sub3.reply()), { push: ["message", "news", "again"] });
      assert.deepEqual(await sub2.command("UNSUBSCRIBE"), ["unsubscribe", "sport", 0]);
      assert.deepEqual(await sub2.command("UNSUBSCRIBE"), ["unsubscribe", null, 0]);
      assert.equal(await sub2.command("GET", "a"), "1"); // out of Pub/Sub
      // A subscriber that leaves is forgotten.
      sub3.close();
      for (let i = 0; i < 100 && await pub.command("PUBLISH", "news", "x") !== 0; i++) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.equal(await pub.command("PUBLISH", "news", "x"), 0);
    } finally {
      for (const x of [sub2, sub3, pub]) x.close();
    }
  });
});

Deno.test("redis server: HELLO, CLIENT SETNAME/GETNAME/LIST/ID from the registry", async () => {
  const registry = new MemoryRegistry();
  await withServer(async (port) => {
    const [a, b] = await Promise.all([1, 2].map(() => RawRedis.open(port)));
    try {
      const hello = await a.command("HELLO", "2", "SETNAME", "alice") as unknown[];
      assert.deepEqual(hello.filter((_, i) => i % 2 === 0), [
        "server",
        "version",
        "proto",
        "id",
        "mode",
        "role",
        "modules",
      ]);
      assert.equal(hello[5], 2);
      assert.equal(await a.command("CLIENT", "GETNAME"), "alice");
      assert.equal(await b.command("CLIENT", "GETNAME"), null);
      assert.deepEqual(await b.command("CLIENT", "SETNAME", "alice"), {
        error: "ERR Client name is already taken by another connection",
      });
      assert.deepEqual(await b.command("CLIENT", "SETNAME", "a b"), {
        error: "ERR Client names cannot contain spaces, newlines or special characters.",
      });
      assert.equal(await b.command("CLIENT", "SETNAME", "bob"), "OK");
      // The names are registry names: lookup finds the connections.
      assert.ok(await registry.lookup("alice"));
      assert.ok(await registry.lookup("bob"));
      const list = (await a.command("CLIENT", "LIST") as string).trim().split("\n");
      assert.equal(list.length, 2);
      const names = list.map((line) => /name=(\S*)/.exec(line)?.[1]).sort();
      assert.deepEqual(names, ["alice", "bob"]);
      const aliceLine = list.find((l) => l.includes("name=alice"))!;
      assert.match(aliceLine, /^id=\d+ addr=127\.0\.0\.1:\d+ laddr=127\.0\.0\.1:\d+ /);
      assert.match(aliceLine, / cmd=client\|list /);
      const id = await a.command("CLIENT", "ID");
      assert.ok(aliceLine.startsWith(`id=${id} `));
      assert.deepEqual(await a.command("HELLO", "4"), {
        error: "NOPROTO unsupported protocol version",
      });
      assert.deepEqual(await a.command("HELLO", "x"), {
        error: "ERR Protocol version is not an integer or out of range",
      });
      // Commands that wait for the registry keep their place among pipelined ones, and a
      // message published meanwhile comes whole, between two replies (RESP3: a subscriber may
      // run any command).
      const c = await RawRedis.open(port);
      try {
        await c.command("HELLO", "3");
        assert.deepEqual(await c.command("SUBSCRIBE", "ch"), { push: ["subscribe", "ch", 1] });
        const pub = await RawRedis.open(port);
        await Promise.all([
          c.write(encodeFrames(resp(), [
            ["CLIENT", "SETNAME", "carol"],
            ["PING", "1"],
            ["CLIENT", "LIST"],
            ["PING", "2"],
          ])),
          pub.write(encodeFrames(resp(), [["PUBLISH", "ch", "hi"]])),
        ]);
        assert.equal(show(await pub.reply()), 1);
        pub.close();
        const replies = [];
        for (let i = 0; i < 5; i++) replies.push(show(await c.reply()));
        const pushes = replies.filter((r) => (r as { push?: unknown }).push !== undefined);
        assert.deepEqual(pushes, [{ push: ["message", "ch", "hi"] }]);
        const rest = replies.filter((r) => (r as { push?: unknown }).push === undefined);
        assert.equal(rest[0], "OK");
        assert.equal(rest[1], "1");
        assert.match(rest[2] as string, /name=carol .*sub=1 .*resp=3/);
        assert.equal(rest[3], "2");
      } finally {
        c.close();
      }
      await b.write(
        encodeFrames(resp(), [
          ["CLIENT", "SETNAME", "dave"],
          ["PING", "1"],
          ["CLIENT", "GETNAME"],
          ["CLIENT", "LIST"],
          ["PING", "2"],
        ]),
      );
      assert.equal(show(await b.reply()), "OK");
      assert.equal(show(await b.reply()), "1");
      assert.equal(show(await b.reply()), "dave");
      assert.match(show(await b.reply()) as string, /name=dave/);
      assert.equal(show(await b.reply()), "2");
      assert.ok(await registry.lookup("dave"));
      assert.equal(await registry.lookup("bob"), undefined, "bob's old name is freed");
      assert.equal(await b.command("CLIENT", "SETNAME", "bob"), "OK");
      const hello3 = await a.command("HELLO", "3") as { map: [string, unknown][] };
      assert.deepEqual(hello3.map.find(([k]) => k === "proto"), ["proto", 3]);
      assert.equal(await a.command("GET", "missing"), null);
      b.close();
      for (let i = 0; i < 100 && (await registry.lookup("bob")); i++) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.equal(await registry.lookup("bob"), undefined, "bob's entry goes with his connection");
    } finally {
      a.close();
      b.close();
    }
  }, { registry });
});

// ---- The client example -------------------------------------------------------------------------

/** The client's commands, against whichever server listens on `port`. */
async function exerciseClient(port: number, protocol: 2 | 3): Promise<void> {
  await using client = await RedisClient.connect({ port, protocol, connectTimeout: 5000 });
  assert.equal(await client.command("FLUSHDB"), "OK");
  assert.equal(await client.set("greeting", "hello ✓"), true);
  assert.equal(await client.get("greeting"), "hello ✓");
  assert.equal(await client.set("greeting", "x", { nx: true }), false);
  assert.equal(await client.set("fresh", "x", { xx: true }), false);
  assert.equal(await client.set("short", "x", { px: 60_000 }), true);
  assert.equal(await client.set("short2", "x", { ex: 60 }), true);
  assert.equal(await client.command("TTL", "short2"), 60);
  assert.equal(await client.incr("n"), 1);
  assert.equal(await client.incr("n"), 2);
  assert.equal(await client.del("greeting", "n", "nope"), 2);
  assert.equal(await client.get("greeting"), null);
  assert.deepEqual(await client.getBytes("short"), utf8.encode("x"));
  await assert.rejects(() => client.command("NOSUCHCOMMAND"), (err: unknown) => {
    assert.ok(err instanceof RespError);
    assert.match(err.message, /^ERR unknown command 'NOSUCHCOMMAND'/);
    return true;
  });
  // A pipeline: one write, replies in order, errors as values.
  const replies = await client.pipeline([["SET", "p", 1], ["INCR", "p"], ["GET", "p"], [
    "INCR",
    "short",
  ]]);
  assert.deepEqual(replies.map(show), [
    "OK",
    2,
    "2",
    { error: "ERR value is not an integer or out of range" },
  ]);
  // A thousand commands in flight at once on one connection, each given its own reply.
  const values = await Promise.all(
    Array.from({ length: 1000 }, (_, i) => client.command("ECHO", `m${i}`)),
  );
  assert.deepEqual(values.map(show), Array.from({ length: 1000 }, (_, i) => `m${i}`));
  const counts = await Promise.all(Array.from({ length: 200 }, () => client.incr("c")));
  assert.deepEqual(counts, Array.from({ length: 200 }, (_, i) => i + 1));
  // Pub/Sub on a connection of its own.
  const subscription = await client.subscribe("news", "weather");
  assert.equal(await client.publish("news", "hello"), 1);
  assert.equal(await client.publish("weather", "sunny"), 1);
  const got = [];
  for await (const message of subscription) {
    got.push(message);
    if (got.length === 2) break;
  }
  assert.deepEqual(got, [
    { channel: "news", message: "hello" },
    { channel: "weather", message: "sunny" },
  ]);
  await subscription.close();
  assert.equal(client.stats().failures, 0);
}

Deno.test("redis client: commands, pipelines, subscriptions against the example server (RESP2, RESP3)", async () => {
  await withServer(async (port) => {
    await exerciseClient(port, 2);
    await exerciseClient(port, 3);
  });
});

Deno.test("redis client: fails at once with PoolUnavailable when no connection is up", async () => {
  await withServer(async (port, server) => {
    const client = await RedisClient.connect({
      port,
      reconnect: { initialDelay: 60_000 }, // stays down for this test
    });
    try {
      await server.stop();
      // The commands in flight when the connection ends fail with ConnectionClosed; after
      // the pool has seen it, at once with PoolUnavailable.
      await within(
        5000,
        (async () => {
          for (;;) {
            try {
              await client.get("x");
            } catch (err) {
              if (err instanceof PoolUnavailable) return;
            }
            await new Promise((resolve) => setTimeout(resolve, 10));
          }
        })(),
        "PoolUnavailable once the server is gone",
      );
    } finally {
      await client.close();
    }
  });
});

testWith(
  ["redisServer"],
  "redis client: against a real redis-server (RESP2 and RESP3)",
  async () => {
    await withRedis(async (redis) => {
      await exerciseClient(redis.port, 2);
      await exerciseClient(redis.port, 3);
    });
  },
);

testWith(
  ["redisServer"],
  "redis client: the pool reconnects, and subscriptions subscribe again, after redis-server restarts",
  async () => {
    let redis = await startRedisServer();
    const port = redis.port;
    const client = await RedisClient.connect({
      port,
      reconnect: { initialDelay: 50, multiplier: 1.5, maxDelay: 200 },
    });
    try {
      assert.equal(await client.set("k", "before"), true);
      const subscription = await client.subscribe("events");
      assert.equal(await client.publish("events", "one"), 1);
      const messages = subscription[Symbol.asyncIterator]();
      assert.deepEqual((await messages.next()).value, { channel: "events", message: "one" });

      await redis.stop();
      await assert.rejects(() => client.get("k")); // ConnectionClosed or PoolUnavailable
      redis = await startRedisServer(port);
      // Commands work again once the pool is back (the data is gone: no persistence).
      const value = await within(
        10_000,
        (async () => {
          for (;;) {
            try {
              return await client.get("k");
            } catch {
              await new Promise((resolve) => setTimeout(resolve, 20));
            }
          }
        })(),
        "a command succeeds after the restart",
      );
      assert.equal(value, null);
      assert.ok(client.stats().reconnects >= 1, JSON.stringify(client.stats()));
      // The subscription's own connection came back and subscribed again.
      await within(
        10_000,
        (async () => {
          while (await client.publish("events", "two") === 0) {
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
        })(),
        "the subscription is back",
      );
      assert.deepEqual((await within(5000, messages.next(), "message")).value, {
        channel: "events",
        message: "two",
      });
      await subscription.close();
    } finally {
      await client.close();
      await redis.stop();
    }
  },
);

// ---- redis-cli and redis-benchmark against the example server ----------------------------------

// A session as a person would type it (redis-cli reads it line by line), covering the commands
// and their errors; run against both servers, the output must be the same, but for what differs
// by nature (the version, client ids).
const SESSION = `PING
PING hello
ECHO "hi there"
SET a 1
GET a
INCR a
INCRBY a 10
DECR a
DECRBY a 5
DECRBY a -9223372036854775808
INCRBY a 9223372036854775807
SET s hello
INCR s
SET a b NX
SET a b XX GET
SET a b NX XX
SET a b EX
SET a b EX 0
SET a b EX -5
SET a b EX x
SET a b PX 100000 EX 10
SET a b KEEPTTL EX 10
SET a b EX 10 EX 20
TTL a
SET a b PX 100000 PX 200000
TTL a
SET a b NX NX
SET n 1 NX
SET n 1 NX
GET nope
MGET a s nope
MSET x 1 y
MSET x 1 y 2
DEL x y nope
EXISTS a a s nope
EXPIRE a 100
TTL a
PTTL nope
TTL s
EXPIRE a 10 NX
EXPIRE a 10 FOO
EXPIRE a 10 GT LT
EXPIRE a abc
EXPIRE nope 10
PERSIST a
TTL a
TYPE a
TYPE nope
KEYS [a]
KEYS [s]
KEYS *nomatch*
DBSIZE
FOO bar baz
foo
GET
CLIENT
CLIENT FOO
CLIENT SETNAME "a b"
CLIENT GETNAME
CLIENT SETNAME bob
CLIENT GETNAME
CONFIG GET appendonly
HELLO 4
HELLO x
HELLO 2 FOO
HELLO 2 AUTH default anything
SELECT 0
SELECT x
FLUSHDB x
FLUSHDB
DBSIZE
`;

function normalize(output: string): string {
  return output
    .replace(/"7\.\d+\.\d+"/g, '"VERSION"')
    .replace(/^( ?8\) \(integer\) )\d+$/gm, "$1ID");
}

testWith(
  ["redisServer", "redisCli"],
  "redis-cli: a session typed line by line gets the same output from the example as from redis-server",
  async () => {
    const cli = tools.redisCli!;
    await withRedis(async (redis) => {
      await withServer(async (port) => {
        const real = await runTool([cli, "-p", String(redis.port), "--no-raw"], SESSION);
        const ours = await runTool([cli, "-p", String(port), "--no-raw"], SESSION);
        assert.equal(real.code, 0, real.stderr);
        assert.equal(ours.code, 0, ours.stderr);
        assert.ok(real.stdout.includes("ERR unknown command 'FOO'"), real.stdout);
        assert.equal(normalize(ours.stdout), normalize(real.stdout));
        // One-shot commands, as scripts use it (no terminal: raw output).
        const oneShot = async (...args: string[]) =>
          (await runTool([cli, "-p", String(port), ...args])).stdout;
        assert.equal(await oneShot("SET", "k", "v w"), "OK\n");
        assert.equal(await oneShot("GET", "k"), "v w\n");
        assert.equal(await oneShot("-3", "GET", "nothing"), "\n");
        // RESP3 (a map: one key and its value a line).
        assert.match(
          await oneShot("-3", "HELLO", "3"),
          /^server redis\nversion 7\.0\.0\nproto 3\n/,
        );
      });
    });
  },
);

testWith(
  ["redisCli"],
  "redis-cli --pipe: 20000 commands in, 20000 replies out, no errors",
  async () => {
    await withServer(async (port) => {
      const commands = Array.from({ length: 20_000 }, (_, i) => ["SET", `key:${i}`, `value ${i}`]);
      const input = new TextDecoder().decode(encodeFrames(resp(), commands));
      const ran = await runTool([tools.redisCli!, "-p", String(port), "--pipe"], input);
      assert.equal(ran.code, 0, ran.stderr);
      assert.match(ran.stdout, /errors: 0, replies: 20000/);
      const c = await RawRedis.open(port);
      try {
        assert.equal(await c.command("DBSIZE"), 20_000);
        // Values that arrived split across reads were kept whole (the framing lends its reads).
        const sample = Array.from({ length: 40 }, (_, i) => i * 499);
        assert.deepEqual(
          await c.command("MGET", ...sample.map((i) => `key:${i}`)),
          sample.map((i) => `value ${i}`),
        );
      } finally {
        c.close();
      }
    });
  },
);

testWith(
  ["redisCli"],
  "redis-cli: SUBSCRIBE (RESP2 and -3) receives what another redis-cli PUBLISHes",
  async () => {
    const cli = tools.redisCli!;
    await withServer(async (port) => {
      for (const protocol of [[], ["-3"]]) {
        const subscriber = new Deno.Command(cli, {
          args: ["-p", String(port), ...protocol, "SUBSCRIBE", "news"],
          stdin: "null",
          stdout: "piped",
          stderr: "null",
        }).spawn();
        const reader = subscriber.stdout.pipeThrough(new TextDecoderStream()).getReader();
        let seen = "";
        const until = async (text: string) => {
          await within(
            5000,
            (async () => {
              while (!seen.includes(text)) {
                const { value, done } = await reader.read();
                if (done) throw new Error(`redis-cli ended before "${text}": ${seen}`);
                seen += value;
              }
            })(),
            `redis-cli prints ${JSON.stringify(text)}`,
          );
        };
        try {
          await until("subscribe\nnews\n1\n");
          const published = await runTool([
            cli,
            "-p",
            String(port),
            "PUBLISH",
            "news",
            "hello there",
          ]);
          assert.equal(published.stdout, "1\n");
          await until("message\nnews\nhello there\n");
        } finally {
          subscriber.kill("SIGTERM");
          await reader.cancel();
          await subscriber.status;
        }
      }
    });
  },
);

// ---- The examples' command lines ----------------------------------------------------------------

Deno.test("redis examples: command lines; the server prints where it listens and stops on SIGTERM; the client prints replies", async () => {
  assert.deepEqual(parseRedisServerArgs(["--port", "0"]), {
    kind: "run",
    args: { port: 0, hostname: "127.0.0.1" },
  });
  assert.equal(parseRedisServerArgs(["--port", "x"]).kind, "usage");
  const help = await runTool([Deno.execPath(), "run", "-A", SERVER_SCRIPT, "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /usage: deno run -A examples\/redis_server\.ts/);
  const bad = await runTool([Deno.execPath(), "run", "-A", SERVER_SCRIPT, "--port", "99999"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /^redis_server: --port must be an integer/);

  const server = await startProcess(
    ["run", "-A", SERVER_SCRIPT, "--port", "0"],
    /^(.*)\n/, // its first line
    { timeoutMs: 10_000 },
  );
  try {
    const first = server.match[1];
    const port = Number(/^listening on 127\.0\.0\.1:(\d+)$/.exec(first)?.[1]);
    assert.ok(port > 0, `first line: ${first}`);
    const client = (...args: string[]) =>
      runTool([Deno.execPath(), "run", "-A", CLIENT_SCRIPT, "--port", String(port), ...args]);
    const set = await client("SET", "k", "hello");
    assert.equal(set.stdout, "OK\n", set.stderr);
    const get = await client("GET", "k");
    assert.equal(get.stdout, "hello\n");
    const typed = await runTool(
      [Deno.execPath(), "run", "-A", CLIENT_SCRIPT, "--port", String(port)],
      "INCR n\nINCR n\nMGET k n nope\nBAD\n",
    );
    assert.equal(
      typed.stdout,
      "1\n2\nhello\n2\n\n(error) ERR unknown command 'BAD', with args beginning with: \n",
    );
    assert.equal(typed.code, 1, "a failed command: exit 1");
  } finally {
    server.child.kill("SIGTERM");
    const status = await within(10_000, server.child.status, "the server exits on SIGTERM");
    assert.equal(status.code, 0);
    await server.end();
  }
  const refused = await runTool([
    Deno.execPath(),
    "run",
    "-A",
    CLIENT_SCRIPT,
    "--port",
    "1",
    "PING",
  ]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /^redis_client: /);
});
