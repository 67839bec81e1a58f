/**
 * A Redis client built on a pool of connections (`createPool`) and the `resp()` framing: `get`,
 * `set`, `del`, `incr`, `publish`, any other command with `command`, pipelines, and Pub/Sub
 * subscriptions on a dedicated connection. Connections that drop come back through the pool's
 * reconnection (with backoff), and subscriptions subscribe again when they do.
 *
 *     deno run -A examples/redis_client.ts [--port 6379] [--hostname 127.0.0.1] [COMMAND ARG…]
 *
 * With a command it prints the reply (`redis_client.ts SET greeting hello`); without one, it
 * reads commands from stdin, one a line, and prints each reply. It talks to `redis-server` and to
 * `examples/redis_server.ts` alike.
 *
 * How it works: a command is written on a connection the pool picks, from the caller, with
 * `conn.send`; the sends of one tick go out in one write, so commands issued together are
 * pipelined. Each connection's handler reads the replies and settles the oldest command still
 * waiting on that connection: Redis answers in order. When a connection ends, the commands still
 * waiting on it fail with `ConnectionClosed`; when no connection is up, a command fails at once
 * with `PoolUnavailable` (the pool keeps reconnecting meanwhile).
 *
 * @module
 */

import {
  type Connection,
  ConnectionClosed,
  createPool,
  type Event,
  type Pool,
  type PoolOptions,
  type PoolStats,
  resp,
  RespError,
  RespPush,
  type RespValue,
  send,
  TimeoutError,
  type Yielded,
} from "../mod.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags, QUIET } from "./_command_line.ts";

/** An argument of a command: text (sent as UTF-8), bytes, or a number (sent as its text). */
export type Arg = string | Uint8Array | number;

/** Options of {@linkcode RedisClient.connect}. */
export interface RedisClientOptions {
  /** The server's address (default `"127.0.0.1"`). */
  hostname?: string;
  /** The server's port (default 6379). */
  port?: number;
  /** Connections in the pool (default 1: one connection pipelines everything). */
  size?: number;
  /** 2 (the default) or 3: with 3, each connection starts with `HELLO 3`. */
  protocol?: 2 | 3;
  /** Milliseconds `connect` waits for a first connection (default 10000). */
  connectTimeout?: number;
  /** Milliseconds a command waits for its reply (default: no limit, as ioredis). */
  commandTimeout?: number;
  /** Reconnection after a drop: the pool's option (default: 100 ms, doubling, up to 5 s). */
  reconnect?: PoolOptions["reconnect"];
  /** Where the ends of connections are logged (default: nowhere; they show in `stats()`). */
  logger?: PoolOptions["logger"];
}

/** What `set` accepts besides the key and value. */
export interface SetOptions {
  /** Expire after this many seconds. */
  ex?: number;
  /** Expire after this many milliseconds. */
  px?: number;
  /** Only if the key does not exist. */
  nx?: boolean;
  /** Only if the key exists. */
  xx?: boolean;
}

/** A message received by a {@linkcode Subscription}. */
export interface Message {
  /** The channel it was published to. */
  channel: string;
  /** The message, as UTF-8 text. */
  message: string;
}

const text = new TextDecoder();

/** A command as the framing sends it: an array of bulk strings. */
function commandOf(args: readonly Arg[]): RespValue[] {
  return args.map((a) => typeof a === "number" ? String(a) : a);
}

/** A command's reply, unless it is an error: that is thrown. */
function unlessError(reply: RespValue | RespValue[]): RespValue {
  if (reply instanceof RespError) throw reply;
  return reply as RespValue;
}

/** Someone waiting for a reply: a command, or a pipeline of `count` commands. */
interface Waiter {
  resolve(value: RespValue | RespValue[]): void;
  reject(error: unknown): void;
  count: number; // replies it takes (1 for a command)
  replies?: RespValue[]; // a pipeline's, so far
  timer?: ReturnType<typeof setTimeout>;
}

/**
 * The waiters of one connection, oldest first: a queue that takes replies in order. Once the
 * connection has ended, `push` rejects at once.
 */
class ReplyQueue {
  #items: (Waiter | undefined)[] = [];
  #head = 0;
  #closed: unknown = undefined; // the error waiters get once the connection has ended
  readonly #id: string;

  constructor(id: string) {
    this.#id = id;
  }

  get size(): number {
    return this.#items.length - this.#head;
  }

  push(waiter: Waiter): boolean {
    if (this.#closed !== undefined) {
      waiter.reject(this.#closed);
      return false;
    }
    this.#items.push(waiter);
    return true;
  }

  /** A reply came: settle the oldest waiter (or count it towards its pipeline). */
  settle(value: RespValue): void {
    const waiter = this.#items[this.#head];
    if (waiter === undefined) return; // nobody asked (a reply to a command that timed out)
    if (waiter.count === 1) {
      this.#take();
      if (waiter.timer !== undefined) clearTimeout(waiter.timer);
      waiter.resolve(value);
      return;
    }
    (waiter.replies ??= []).push(value);
    if (waiter.replies.length === waiter.count) {
      this.#take();
      if (waiter.timer !== undefined) clearTimeout(waiter.timer);
      waiter.resolve(waiter.replies);
    }
  }

  #take(): void {
    this.#items[this.#head++] = undefined;
    if (this.#head === this.#items.length) {
      this.#items = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
  }

  /** The connection has ended (`reason`): every waiter, now and later, gets ConnectionClosed. */
  close(reason: unknown): void {
    this.#closed ??= new ConnectionClosed(this.#id, reason ?? "normal");
    for (let i = this.#head; i < this.#items.length; i++) {
      const waiter = this.#items[i]!;
      if (waiter.timer !== undefined) clearTimeout(waiter.timer);
      waiter.reject(this.#closed);
    }
    this.#items = [];
    this.#head = 0;
  }
}

const HELLO_3 = commandOf(["HELLO", 3]);

/**
 * The handler of each pool connection: starts with `HELLO 3` if asked, then settles the
 * connection's waiters with the replies as they come. A plain generator: no promise per reply.
 */
function connectionHandler(queues: WeakMap<Connection<RespValue>, ReplyQueue>, protocol: 2 | 3) {
  return function* (conn: Connection<RespValue>): Generator<Yielded, void, Event<RespValue>> {
    const queue = new ReplyQueue(conn.id);
    queues.set(conn, queue);
    try {
      let first: Yielded;
      if (protocol === 3) {
        // HELLO's own reply: a map, or an error if the server cannot speak RESP3.
        queue.push({
          count: 1,
          resolve(reply) {
            if (reply instanceof RespError) conn.stop(reply);
          },
          reject() {},
        });
        first = send(HELLO_3);
      }
      for (let ev = yield first;;) {
        if (ev.type === "packet") {
          // RESP3 pushes (invalidations, messages) are not replies.
          if (!(ev.data instanceof RespPush)) queue.settle(ev.data);
        } else if (ev.type === "disconnect" || ev.type === "shutdown") return;
        ev = yield;
      }
    } finally {
      queue.close(conn.closeReason);
    }
  };
}

/**
 * A Redis client: a pool of connections, the commands that return their reply, and
 * subscriptions.
 */
export class RedisClient {
  readonly #pool: Pool<RespValue>;
  readonly #queues: WeakMap<Connection<RespValue>, ReplyQueue>;
  readonly #options: RedisClientOptions;
  readonly #subscriptions = new Set<Subscription>();

  private constructor(
    pool: Pool<RespValue>,
    queues: WeakMap<Connection<RespValue>, ReplyQueue>,
    options: RedisClientOptions,
  ) {
    this.#pool = pool;
    this.#queues = queues;
    this.#options = options;
  }

  /**
   * Connect to a Redis server; resolves once a first connection is up (rejects with
   * `PoolUnavailable` if none comes within `connectTimeout`).
   */
  static async connect(options: RedisClientOptions = {}): Promise<RedisClient> {
    const queues = new WeakMap<Connection<RespValue>, ReplyQueue>();
    const pool = await createPool(connectionHandler(queues, options.protocol ?? 2), {
      addresses: [{ hostname: options.hostname ?? "127.0.0.1", port: options.port ?? 6379 }],
      size: options.size ?? 1,
      framing: resp({ maxLength: Infinity, maxDepth: 64 }), // the server is trusted
      connectTimeout: options.connectTimeout ?? 10_000,
      waitReady: true,
      reconnect: options.reconnect ?? { initialDelay: 100, multiplier: 2, maxDelay: 5000 },
      logger: options.logger ?? QUIET,
    });
    return new RedisClient(pool, queues, options);
  }

  /**
   * Send `commands` on one connection, in one write, and resolve with their replies in order
   * (`count` > 1: as an array). Rejects with `PoolUnavailable` if no connection is up,
   * `ConnectionClosed` if the connection ends first, or `TimeoutError` past `commandTimeout`.
   */
  #send(commands: RespValue[][], count: number): Promise<RespValue | RespValue[]> {
    return new Promise((resolve, reject) => {
      const conn = this.#pool.pick(); // throws PoolUnavailable: the promise rejects
      const waiter: Waiter = { resolve, reject, count };
      if (!this.#queues.get(conn)!.push(waiter)) return;
      const timeout = this.#options.commandTimeout;
      if (timeout !== undefined) {
        waiter.timer = setTimeout(() => {
          // The reply may still come: it then settles nothing (the waiter stays in line).
          waiter.resolve = () => {};
          reject(new TimeoutError(`redis command timed out after ${timeout} ms`));
        }, timeout);
      }
      for (const command of commands) conn.send(command);
    });
  }

  /** Any command; resolves with its reply, rejects with the server's `RespError`. */
  async command(...args: Arg[]): Promise<RespValue> {
    return unlessError(await this.#send([commandOf(args)], 1));
  }

  /**
   * Several commands, sent together on one connection; resolves with their replies in order,
   * errors (`RespError`) among them as values.
   */
  async pipeline(commands: readonly (readonly Arg[])[]): Promise<RespValue[]> {
    if (commands.length === 0) return [];
    return await this.#send(commands.map(commandOf), commands.length) as RespValue[];
  }

  /** `GET key`: the value as UTF-8 text, or null if there is none. */
  async get(key: Arg): Promise<string | null> {
    // Each method awaits #send itself, not command(): an async layer less per command.
    const value = unlessError(await this.#send([commandOf(["GET", key])], 1));
    return value instanceof Uint8Array ? text.decode(value) : null;
  }

  /** `GET key`: the value's bytes, or null. */
  async getBytes(key: Arg): Promise<Uint8Array | null> {
    const value = unlessError(await this.#send([commandOf(["GET", key])], 1));
    return value instanceof Uint8Array ? value.slice() : null;
  }

  /** `SET key value [EX s | PX ms] [NX | XX]`: whether it was set (false: NX or XX said no). */
  async set(key: Arg, value: Arg, options: SetOptions = {}): Promise<boolean> {
    const args: Arg[] = ["SET", key, value];
    if (options.ex !== undefined) args.push("EX", options.ex);
    if (options.px !== undefined) args.push("PX", options.px);
    if (options.nx) args.push("NX");
    if (options.xx) args.push("XX");
    return unlessError(await this.#send([commandOf(args)], 1)) !== null;
  }

  /** `DEL key…`: how many were removed. */
  async del(...keys: Arg[]): Promise<number> {
    return unlessError(await this.#send([commandOf(["DEL", ...keys])], 1)) as number;
  }

  /** `INCR key`: the new value. */
  async incr(key: Arg): Promise<number> {
    return Number(unlessError(await this.#send([commandOf(["INCR", key])], 1)));
  }

  /** `PUBLISH channel message`: how many subscribers got it. */
  async publish(channel: Arg, message: Arg): Promise<number> {
    return unlessError(await this.#send([commandOf(["PUBLISH", channel, message])], 1)) as number;
  }

  /**
   * Subscribe to `channels` on a connection of its own (a pool of one, so it reconnects, and
   * subscribes again, when it drops); resolves once the server has confirmed every channel.
   * Iterate the subscription for the messages.
   */
  async subscribe(...channels: string[]): Promise<Subscription> {
    const subscription = await Subscription.open(this.#options, channels);
    this.#subscriptions.add(subscription);
    subscription.closed.then(() => this.#subscriptions.delete(subscription));
    return subscription;
  }

  /** The pool's statistics (connections up, reconnects, failures). */
  stats(): PoolStats {
    return this.#pool.stats();
  }

  /** Close every connection (subscriptions included); commands still waiting fail. */
  async close(): Promise<void> {
    await Promise.all([...this.#subscriptions].map((s) => s.close()));
    await this.#pool.stop("shutdown", { timeout: 1000 });
  }

  /** Closes it (`await using client = await RedisClient.connect()`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * The messages of a subscription, as an async iterator; `close()` ends it (and the iteration).
 * Messages published while its connection is down are lost, as with Redis.
 */
export class Subscription implements AsyncIterable<Message> {
  readonly #messages: Message[] = [];
  #wake: (() => void) | undefined;
  #pool!: Pool<RespValue>;
  #done = false;
  readonly #closed = Promise.withResolvers<void>();

  /** Resolves once closed. */
  readonly closed: Promise<void> = this.#closed.promise;

  private constructor() {}

  static async open(options: RedisClientOptions, channels: string[]): Promise<Subscription> {
    if (channels.length === 0) throw new TypeError("subscribe: give at least one channel");
    const subscription = new Subscription();
    const confirmed = Promise.withResolvers<void>();
    const want = new Set(channels);
    const got = new Set<string>();
    subscription.#pool = await createPool(function* (): Generator<
      Yielded,
      void,
      Event<RespValue>
    > {
      // Subscribe first thing, on this connection and on every one after a reconnect.
      for (let ev = yield send(commandOf(["SUBSCRIBE", ...channels]));;) {
        if (ev.type === "disconnect" || ev.type === "shutdown") return;
        if (ev.type === "packet") {
          const data = ev.data instanceof RespPush ? ev.data.values : ev.data;
          if (Array.isArray(data) && data[0] instanceof Uint8Array) {
            const kind = text.decode(data[0]);
            const channel = data[1] instanceof Uint8Array ? text.decode(data[1]) : "";
            if (kind === "message" && data[2] instanceof Uint8Array) {
              subscription.#deliver({ channel, message: text.decode(data[2]) });
            } else if (kind === "subscribe" && want.has(channel)) {
              got.add(channel);
              if (got.size === want.size) confirmed.resolve();
            }
          }
        }
        ev = yield;
      }
    }, {
      addresses: [{ hostname: options.hostname ?? "127.0.0.1", port: options.port ?? 6379 }],
      framing: resp({ maxLength: Infinity, maxDepth: 64 }),
      connectTimeout: options.connectTimeout ?? 10_000,
      waitReady: true,
      reconnect: options.reconnect ?? { initialDelay: 100, multiplier: 2, maxDelay: 5000 },
      logger: options.logger ?? QUIET,
    });
    try {
      await withTimeoutOf(confirmed.promise, options.connectTimeout ?? 10_000, "subscribe");
    } catch (err) {
      await subscription.close();
      throw err;
    }
    return subscription;
  }

  #deliver(message: Message): void {
    this.#messages.push(message);
    this.#wake?.();
  }

  /** The messages, in order, until `close()`. */
  async *[Symbol.asyncIterator](): AsyncIterator<Message> {
    for (;;) {
      const message = this.#messages.shift();
      if (message !== undefined) {
        yield message;
        continue;
      }
      if (this.#done) return;
      await new Promise<void>((resolve) => this.#wake = resolve);
      this.#wake = undefined;
    }
  }

  /** The pool's statistics of this subscription's connection. */
  stats(): PoolStats {
    return this.#pool.stats();
  }

  /** Unsubscribe (by closing the connection) and end the iteration. */
  async close(): Promise<void> {
    if (!this.#done) {
      this.#done = true;
      this.#wake?.();
      await this.#pool.stop("shutdown", { timeout: 1000 });
      this.#closed.resolve();
    }
    await this.closed;
  }
}

/** `promise`, or a TimeoutError after `ms`. */
async function withTimeoutOf<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new TimeoutError(`${what}: no reply in ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// ---- Command line --------------------------------------------------------------------------------

/** A reply as redis-cli prints it without a terminal (`--raw`): values one a line. */
export function formatReply(reply: RespValue): string {
  if (reply instanceof Uint8Array) return text.decode(reply);
  if (reply === null) return "";
  if (reply instanceof RespError) return `(error) ${reply.message}`;
  if (reply instanceof RespPush) return formatReply(reply.values);
  if (Array.isArray(reply)) return reply.map(formatReply).join("\n");
  if (reply instanceof Map) {
    return [...reply].map(([k, v]) => `${formatReply(k)}\n${formatReply(v)}`).join("\n");
  }
  if (reply instanceof Set) return [...reply].map(formatReply).join("\n");
  return String(typeof reply === "object" ? reply.value : reply);
}

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/redis_client.ts [options] [COMMAND ARG...]

Send COMMAND to a Redis server and print the reply; without a command, read commands from
stdin, one a line (arguments split by spaces), and print each reply.

  --port N          the server's port (default 6379)
  --hostname HOST   the server's address (default 127.0.0.1)
  --resp3           speak RESP3 (HELLO 3)
  -h, --help        print this help and exit

Exit status: 0 if every command succeeded, 1 if one failed or the server is unreachable,
2 for a bad command line.`;

/** The settings given on the command line. */
export interface RedisClientArgs {
  port: number;
  hostname: string;
  protocol: 2 | 3;
  command: string[];
}

/** Parse the client's command line; never throws. */
export function parseRedisClientArgs(argv: string[]): Parsed<RedisClientArgs> {
  // The command starts at the first argument that is neither a flag nor a flag's value.
  let at = 0;
  while (at < argv.length && argv[at].startsWith("-")) {
    at += /^--(port|hostname)$/.test(argv[at]) ? 2 : 1;
  }
  const flags = parseFlags(argv.slice(0, at), {
    port: { type: "string", default: "6379" },
    hostname: { type: "string", default: "127.0.0.1" },
    resp3: { type: "boolean", default: false },
  });
  if (flags.kind !== "flags") return flags;
  const port = integer(flags.values.port, 1, 65535);
  if (port === undefined) {
    return {
      kind: "usage",
      error: `--port must be an integer from 1 to 65535, not "${flags.values.port}"`,
    };
  }
  return {
    kind: "run",
    args: {
      port,
      hostname: flags.values.hostname,
      protocol: flags.values.resp3 ? 3 : 2,
      command: argv.slice(at),
    },
  };
}

async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("redis_client", parseRedisClientArgs(argv), USAGE);
  if (typeof args === "number") return args;
  let client;
  try {
    client = await RedisClient.connect({
      hostname: args.hostname,
      port: args.port,
      protocol: args.protocol,
      connectTimeout: 5000,
    });
  } catch (err) {
    console.error(`redis_client: ${oneLine(err)}`);
    return 1;
  }
  let status = 0;
  const run = async (command: string[]) => {
    try {
      console.log(formatReply(await client.command(...command)));
    } catch (err) {
      status = 1;
      console.log(
        err instanceof RespError ? `(error) ${err.message}` : `redis_client: ${oneLine(err)}`,
      );
    }
  };
  try {
    if (args.command.length > 0) await run(args.command);
    else {
      const input = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
      let rest = "";
      for await (const chunk of input) {
        rest += chunk;
        let nl;
        while ((nl = rest.indexOf("\n")) >= 0) {
          const words = rest.slice(0, nl).trim().split(/\s+/).filter((w) => w !== "");
          rest = rest.slice(nl + 1);
          if (words.length > 0) await run(words);
        }
      }
      const words = rest.trim().split(/\s+/).filter((w) => w !== "");
      if (words.length > 0) await run(words);
    }
  } finally {
    await client.close();
  }
  return status;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
