/**
 * A small Redis, built on this library with the `resp()` framing, that real Redis clients
 * (`redis-cli`, `redis-benchmark`, client libraries) talk to:
 *
 *     deno run -A examples/redis_server.ts [--port 6380] [--hostname 127.0.0.1]
 *     redis-cli -p 6380
 *
 * Commands: PING, ECHO, GET, SET (EX, PX, NX, XX, KEEPTTL, GET), DEL, EXISTS, INCR, DECR,
 * INCRBY, DECRBY, MGET, MSET, EXPIRE, PEXPIRE (NX, XX, GT, LT), TTL, PTTL, PERSIST, TYPE, KEYS
 * (Redis's glob patterns), DBSIZE, FLUSHDB, FLUSHALL, SELECT 0, HELLO (2 or 3, AUTH, SETNAME),
 * CLIENT (SETNAME, GETNAME, LIST, ID, INFO), INFO, CONFIG GET, COMMAND, QUIT, PUBLISH,
 * SUBSCRIBE, UNSUBSCRIBE. Replies and errors are Redis 7.0's, word for word; inline commands
 * work (`nc localhost 6380`, then `SET a 1`).
 *
 * How it maps onto the library: each client is a connection whose handler reads commands
 * (`packet` events) and yields replies (`send`); the keys live in one `Keyspace` shared by
 * every connection of the server. The handler is a plain `function*`, so a batch of pipelined
 * commands runs without a promise per command, and the framing lends its reads
 * (`resp({ inline: true, lend: true })`): a command copies what it keeps. `PUBLISH` hands the message to each subscriber's connection
 * with `conn.info()`, and the subscriber's own handler writes it, as an array (RESP2) or a push
 * (RESP3): a subscribed RESP2 connection takes only the Pub/Sub commands, PING and QUIT, as in
 * Redis. `CLIENT LIST` lists the server's connections from its registry, and `CLIENT SETNAME`
 * registers the name there.
 *
 * Where it differs from Redis: one database; strings are the only type; keys expire when read
 * (and when KEYS, DBSIZE or INFO count them), not in the background; client names are unique
 * (they are registry names, so `registry.lookup(name)` finds the connection), so a name another
 * client holds is refused, and a name cannot be cleared; a subscriber more than 32 MiB behind is
 * disconnected (Redis's default `client-output-buffer-limit pubsub` hard limit).
 *
 * Once listening it prints `listening on HOST:PORT`; SIGINT or SIGTERM stops it (exit 0).
 * `--help` prints the usage; a bad flag exits 2; failing to listen exits 1.
 *
 * @module
 */

import {
  type Action,
  type Connection,
  type Event,
  FrameTooLarge,
  type Logger,
  MemoryRegistry,
  type Registry,
  type RegistryEntry,
  resp,
  RespError,
  RespPush,
  RespSimpleString,
  type RespValue,
  send,
  serve,
  type Server,
  stop,
  type Transport,
  type Yielded,
} from "../mod.ts";
import { stopOnSignals } from "./_stop_on_signals.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags } from "./_command_line.ts";

// ---- Keys ----------------------------------------------------------------------------------------

/**
 * A key as a string that holds its bytes one per character (0–255): any bytes, binary keys
 * included, map to a distinct string, and back.
 */
export function keyOf(bytes: Uint8Array): string {
  if (bytes.length <= 4096) return String.fromCharCode.apply(null, bytes as unknown as number[]);
  let key = "";
  for (let i = 0; i < bytes.length; i += 4096) {
    key += String.fromCharCode.apply(null, bytes.subarray(i, i + 4096) as unknown as number[]);
  }
  return key;
}

/** The bytes of a key made by {@linkcode keyOf}. */
export function bytesOfKey(key: string): Uint8Array {
  const bytes = new Uint8Array(key.length);
  for (let i = 0; i < key.length; i++) bytes[i] = key.charCodeAt(i);
  return bytes;
}

// A value up to this size is copied into a shared slab rather than a buffer of its own: a new
// ArrayBuffer costs far more than its bytes (about 0.7 µs, most of a pipelined SET's time), a
// view of a slab a tenth of that. The price: a slab stays alive while any value in it does.
const SLAB_VALUE_MAX = 512;
const SLAB_SIZE = 16 * 1024;
let slab = new Uint8Array(SLAB_SIZE);
let slabUsed = 0;

/** A copy of `bytes` to keep (such as a value lent by the framing): small ones share slabs. */
function keep(bytes: Uint8Array): Uint8Array {
  const n = bytes.length;
  if (n > SLAB_VALUE_MAX) return bytes.slice();
  if (slabUsed + n > SLAB_SIZE) {
    slab = new Uint8Array(SLAB_SIZE);
    slabUsed = 0;
  }
  const copy = slab.subarray(slabUsed, slabUsed + n);
  copy.set(bytes);
  slabUsed += n;
  return copy;
}

/**
 * The string values of one database, with expiry times (ms since the epoch, by `now`). Values
 * are kept as given: pass a copy.
 */
export class Keyspace {
  readonly #values = new Map<string, Uint8Array>();
  readonly #expires = new Map<string, number>();
  readonly #now: () => number;

  /** `now`: the clock expiry times are read against (default `Date.now`). */
  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  /** The current time of this keyspace's clock. */
  now(): number {
    return this.#now();
  }

  /** The value of `key`, unless it is missing or expired (then it is removed). */
  get(key: string): Uint8Array | undefined {
    if (this.#expires.size > 0) this.#expireIfDue(key);
    return this.#values.get(key);
  }

  /** Whether `key` is there (and not expired). */
  has(key: string): boolean {
    return this.get(key) !== undefined;
  }

  /** Set `key`; its expiry time is dropped unless `keepTtl`, then set to `expireAt` if given. */
  set(key: string, value: Uint8Array, expireAt?: number, keepTtl = false): void {
    this.#values.set(key, value);
    if (expireAt !== undefined) this.#expires.set(key, expireAt);
    else if (!keepTtl && this.#expires.size > 0) this.#expires.delete(key);
  }

  /** Remove `key`; whether it was there. */
  delete(key: string): boolean {
    if (!this.has(key)) return false;
    this.#values.delete(key);
    this.#expires.delete(key);
    return true;
  }

  /** `key`'s expiry time, or undefined if it has none (or is missing). */
  expireAt(key: string): number | undefined {
    return this.has(key) ? this.#expires.get(key) : undefined;
  }

  /** Give the existing `key` an expiry time (`undefined`: none). */
  setExpireAt(key: string, at: number | undefined): void {
    if (at === undefined) this.#expires.delete(key);
    else this.#expires.set(key, at);
  }

  /** Every live key. */
  keys(): IterableIterator<string> {
    this.#expireDue();
    return this.#values.keys();
  }

  /** How many live keys there are. */
  get size(): number {
    this.#expireDue();
    return this.#values.size;
  }

  /** How many live keys have an expiry time. */
  get expiring(): number {
    this.#expireDue();
    return this.#expires.size;
  }

  /** Remove every key. */
  clear(): void {
    this.#values.clear();
    this.#expires.clear();
  }

  #expireIfDue(key: string): void {
    const at = this.#expires.get(key);
    if (at !== undefined && at <= this.#now()) {
      this.#values.delete(key);
      this.#expires.delete(key);
    }
  }

  #expireDue(): void {
    for (const key of this.#expires.keys()) this.#expireIfDue(key);
  }
}

/**
 * Whether `text` matches the glob `pattern` (`*`, `?`, `[abc]`, `[^a-z]`, `\` escapes), as
 * Redis's `stringmatchlen` decides, character codes compared as bytes.
 */
export function globMatch(pattern: string, text: string): boolean {
  return matchFrom(pattern, 0, text, 0, { skipLonger: false });
}

// A port of Redis 7.0's stringmatchlen_impl, with its early exit that keeps `a*a*a*…b` linear.
function matchFrom(
  p: string,
  pi: number,
  s: string,
  si: number,
  state: { skipLonger: boolean },
): boolean {
  while (pi < p.length && si < s.length) {
    switch (p[pi]) {
      case "*": {
        while (pi + 1 < p.length && p[pi + 1] === "*") pi++;
        if (pi + 1 === p.length) return true;
        while (si < s.length) {
          if (matchFrom(p, pi + 1, s, si, state)) return true;
          if (state.skipLonger) return false;
          si++;
        }
        state.skipLonger = true;
        return false;
      }
      case "?":
        si++;
        break;
      case "[": {
        pi++;
        const not = p[pi] === "^";
        if (not) pi++;
        let match = false;
        for (;;) {
          if (p[pi] === "\\" && p.length - pi >= 2) {
            pi++;
            if (p[pi] === s[si]) match = true;
          } else if (p[pi] === "]") {
            break;
          } else if (pi >= p.length) {
            pi--;
            break;
          } else if (p.length - pi >= 3 && p[pi + 1] === "-") {
            let start = p.charCodeAt(pi);
            let end = p.charCodeAt(pi + 2);
            const c = s.charCodeAt(si);
            if (start > end) [start, end] = [end, start];
            pi += 2;
            if (c >= start && c <= end) match = true;
          } else if (p[pi] === s[si]) {
            match = true;
          }
          pi++;
        }
        if (not) match = !match;
        if (!match) return false;
        si++;
        break;
      }
      case "\\":
        if (p.length - pi >= 2) pi++;
        // falls through
      default:
        if (p[pi] !== s[si]) return false;
        si++;
        break;
    }
    pi++;
    if (si === s.length) {
      while (pi < p.length && p[pi] === "*") pi++;
      break;
    }
  }
  return pi === p.length && si === s.length;
}

// ---- Replies -------------------------------------------------------------------------------------

const OK = new RespSimpleString("OK");
const PONG = new RespSimpleString("PONG");
const ZERO = 0;
const utf8 = new TextEncoder();
const SYNTAX_ERROR = new RespError("ERR syntax error");
const NOT_AN_INTEGER = new RespError("ERR value is not an integer or out of range");
const OVERFLOW = new RespError("ERR increment or decrement would overflow");
const MESSAGE = utf8.encode("message");
const SUBSCRIBE = utf8.encode("subscribe");
const UNSUBSCRIBE = utf8.encode("unsubscribe");
const PONG_LOWER = utf8.encode("pong");
const EMPTY = new Uint8Array(0);
// The commonest replies' actions, made once: an action is only read, never changed.
const SEND_OK = send(OK);
const SEND_PONG = send(PONG);
const SEND_NULL = send(null);

/** The version this server's replies follow (what `HELLO` and `INFO` say). */
export const REDIS_VERSION = "7.0.0";

/** Several replies to one command (SUBSCRIBE and UNSUBSCRIBE give one per channel). */
class Replies {
  constructor(readonly values: RespValue[]) {}
}

/** The reply of a command that had to wait, sent to its own connection's handler. */
class Resume {
  constructor(readonly client: Client, readonly reply: Reply) {}
}

/** What QUIT answers: OK, then the connection closes. */
const QUIT = Symbol("quit");

/** An error after which the connection closes (a command that breaks the protocol). */
class Closing {
  constructor(readonly error: RespError) {}
}

type Reply = RespValue | Replies | Closing | typeof QUIT;

/** The RESP type byte a decoded value came as, for Redis's "expected '$', got …" error. */
function typeByteOf(value: RespValue): string {
  if (typeof value === "string") return "+";
  if (typeof value === "number" || typeof value === "bigint") return ":";
  if (value instanceof RespError) return "-";
  if (Array.isArray(value)) return "*";
  if (value === null) return "_";
  if (typeof value === "boolean") return "#";
  if (value instanceof Map) return "%";
  if (value instanceof Set) return "~";
  return ">";
}

function wrongArity(fullName: string): RespError {
  return new RespError(`ERR wrong number of arguments for '${fullName}' command`);
}

function invalidExpireTime(command: string): RespError {
  return new RespError(`ERR invalid expire time in '${command}' command`);
}

/** Text for error messages: the bytes as Redis prints them (`%s`: up to a NUL). */
function printable(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return keyOf(nul < 0 ? bytes : bytes.subarray(0, nul));
}

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

/**
 * `bytes` as Redis's `string2ll` reads a 64-bit integer (no sign but `-`, no leading zeros or
 * spaces), or undefined. A `bigint` only past 2^53.
 */
export function parseInteger(bytes: Uint8Array): number | bigint | undefined {
  const n = bytes.length;
  if (n === 0 || n > 20) return undefined;
  let i = 0;
  const negative = bytes[0] === 0x2d;
  if (negative) i++;
  if (i === n) return undefined;
  if (bytes[i] === 0x30) return n === 1 ? 0 : undefined; // "0", but no "-0" or "01"
  let value = 0;
  for (; i < n; i++) {
    const digit = bytes[i] - 0x30;
    if (digit < 0 || digit > 9) return undefined;
    value = value * 10 + digit;
  }
  if (Number.isSafeInteger(value)) return negative ? -value : value;
  const big = BigInt(keyOf(bytes));
  return big < INT64_MIN || big > INT64_MAX ? undefined : big;
}

/**
 * The key a command name is looked up by, upper-cased: up to 6 bytes packed into a number
 * (no string to build for GET, SET, PING, INCR…), else the upper-cased text.
 */
function commandKey(bytes: Uint8Array): number | string {
  if (bytes.length > 6) return upper(bytes);
  let key = 0;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    key = key * 256 + (b >= 0x61 && b <= 0x7a ? b - 32 : b);
  }
  return key;
}

/** ASCII `bytes` upper-cased: how commands and options are compared. */
function upper(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    s += String.fromCharCode(b >= 0x61 && b <= 0x7a ? b - 32 : b);
  }
  return s;
}

// ---- Clients -------------------------------------------------------------------------------------

/** A Pub/Sub message on its way to a subscriber's connection (through `conn.info`). */
interface Published {
  readonly channel: Uint8Array;
  readonly message: Uint8Array;
}

/** One connected client, as the commands see it. */
class Client {
  readonly conn: Connection<RespValue>;
  /** 2 or 3: the protocol HELLO chose. */
  protocol = 2;
  /** The channels it is subscribed to. */
  readonly channels = new Set<string>();
  /** Bytes of messages handed to its connection and not yet written by it. */
  pendingBytes = 0;
  /** The last command it ran (lower case), for CLIENT LIST. */
  lastCommand = "NULL";
  /** Its numeric id, from the connection's (`c12` → 12). */
  readonly id: number;

  constructor(conn: Connection<RespValue>) {
    this.conn = conn;
    this.id = Number(/^c(\d+)/.exec(conn.id)?.[1] ?? 0);
  }
}

/** A command's entry: its arity as Redis counts it (negative: at least), and what it does. */
interface Command {
  readonly name: string;
  readonly arity: number;
  run(client: Client, args: Uint8Array[]): Reply | Promise<Reply>;
  readonly subcommands?: Map<string, Command>;
}

/** A subscriber more than this many bytes behind is disconnected. */
const PUBSUB_LIMIT = 32 * 1024 * 1024;

/** Options of {@linkcode redisServer}. */
export interface RedisServerOptions {
  /** Port to listen on (default 6380; 0 for any). */
  port?: number;
  /** Address to bind (default: every address). */
  hostname?: string;
  /** How to listen (default TCP). */
  transport?: Transport;
  /** Where clients are recorded (default: a registry of this server's own). */
  registry?: Registry;
  /** The server's name, the owner of its clients in the registry (default `redis1`, `redis2`, …). */
  name?: string;
  /** The keys (default: an empty keyspace on `Date.now`). */
  keyspace?: Keyspace;
  /** Where connection ends are logged (default `console`). */
  logger?: Logger;
  /** Called with the address once listening. */
  onListen?: (addr: Deno.Addr | { transport: "memory"; name: string }) => void;
}

let servers = 0;

/**
 * Start a Redis-protocol server (see the module documentation for what it supports).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connect, resp, type RespValue, send } from "../mod.ts";
 * import { redisServer } from "./redis_server.ts";
 * const server = await redisServer({ port: 0, hostname: "127.0.0.1" });
 * const replies: RespValue[] = [];
 * const client = await connect(async function* () {
 *   let ev = yield [["SET", "greeting", "hello"], ["GET", "greeting"]].map((c) => send(c));
 *   while (ev.type === "packet" && replies.push(ev.data) < 2) ev = yield;
 * }, { port: (server.addr as Deno.NetAddr).port, framing: resp() });
 * await client.closed;
 * assert.deepEqual(replies, ["OK", new TextEncoder().encode("hello")]);
 * await server.stop();
 * ```
 */
export async function redisServer(options: RedisServerOptions = {}): Promise<Server<RespValue>> {
  const keyspace = options.keyspace ?? new Keyspace();
  const registry = options.registry ?? new MemoryRegistry();
  const serverName = options.name ?? `redis${++servers}`;
  const startedAt = Date.now();
  const clients = new Map<string, Client>();
  const channels = new Map<string, Set<Client>>();
  const commands = new Map<number | string, Command>();
  let port = options.port ?? 6380;

  // ---- Commands --------------------------------------------------------------------------------

  function define(
    name: string,
    arity: number,
    run: Command["run"],
    subcommands?: Command[],
  ): Command {
    const command: Command = {
      name,
      arity,
      run,
      subcommands: subcommands &&
        new Map(subcommands.map((c) => [c.name.split("|")[1].toUpperCase(), c])),
    };
    if (!name.includes("|")) commands.set(commandKey(utf8.encode(name)), command);
    return command;
  }

  /** A positive integer of seconds or ms, for an expiry, or the error to reply. */
  function expiryArgument(bytes: Uint8Array, unitMs: number, command: string): number | RespError {
    const n = parseInteger(bytes);
    if (n === undefined) return NOT_AN_INTEGER;
    if (n <= 0 || (unitMs === 1000 && n > INT64_MAX / 1000n)) return invalidExpireTime(command);
    const at = keyspace.now() + Number(n) * unitMs;
    return at > Number.MAX_SAFE_INTEGER ? invalidExpireTime(command) : at;
  }

  define("ping", -1, (client, args) => {
    if (args.length > 2) return wrongArity("ping");
    if (client.protocol === 2 && client.channels.size > 0) {
      return [PONG_LOWER, args.length === 2 ? args[1] : EMPTY];
    }
    return args.length === 2 ? args[1] : PONG;
  });
  define("echo", 2, (_, args) => args[1]);
  define("get", 2, (_, args) => keyspace.get(keyOf(args[1])) ?? null);
  define("set", -3, (_, args) => {
    let nx = false, xx = false, get = false, keepTtl = false;
    let expireArg: Uint8Array | undefined;
    let unitMs = 0;
    for (let i = 3; i < args.length; i++) {
      const option = upper(args[i]);
      const hasNext = i + 1 < args.length;
      if (option === "NX" && !xx) nx = true;
      else if (option === "XX" && !nx) xx = true;
      else if (option === "GET") get = true;
      else if (option === "KEEPTTL" && unitMs === 0) keepTtl = true;
      else if ((option === "EX" || option === "PX") && !keepTtl && hasNext) {
        // As Redis: the same unit again is taken (the last one wins), the other is an error.
        const unit = option === "EX" ? 1000 : 1;
        if (unitMs !== 0 && unitMs !== unit) return SYNTAX_ERROR;
        unitMs = unit;
        expireArg = args[++i];
      } else return SYNTAX_ERROR;
    }
    let expireAt: number | undefined;
    if (expireArg !== undefined) {
      const at = expiryArgument(expireArg, unitMs, "set");
      if (at instanceof RespError) return at;
      expireAt = at;
    }
    const key = keyOf(args[1]);
    // The value is copied: the framing lends its bulk strings for this step only.
    if (!nx && !xx && !get) {
      keyspace.set(key, keep(args[2]), expireAt, keepTtl);
      return OK;
    }
    const old = keyspace.get(key);
    if ((nx && old !== undefined) || (xx && old === undefined)) return get ? old ?? null : null;
    keyspace.set(key, keep(args[2]), expireAt, keepTtl);
    return get ? old ?? null : OK;
  });
  define("del", -2, (_, args) => {
    let n = 0;
    for (let i = 1; i < args.length; i++) if (keyspace.delete(keyOf(args[i]))) n++;
    return n;
  });
  define("exists", -2, (_, args) => {
    let n = 0;
    for (let i = 1; i < args.length; i++) if (keyspace.has(keyOf(args[i]))) n++;
    return n;
  });
  function incrBy(key: Uint8Array, by: number | bigint): Reply {
    const name = keyOf(key);
    const current = keyspace.get(name);
    const value = current === undefined ? 0 : parseInteger(current);
    if (value === undefined) return NOT_AN_INTEGER;
    const sum = BigInt(value) + BigInt(by);
    if (sum < INT64_MIN || sum > INT64_MAX) return OVERFLOW;
    keyspace.set(name, utf8.encode(String(sum)), undefined, true);
    return Number.isSafeInteger(Number(sum)) ? Number(sum) : sum;
  }
  function incrByArgument(bytes: Uint8Array, negate: boolean): number | bigint | RespError {
    const n = parseInteger(bytes);
    if (n === undefined) return NOT_AN_INTEGER;
    if (!negate) return n;
    if (BigInt(n) === INT64_MIN) return new RespError("ERR decrement would overflow");
    return -BigInt(n);
  }
  define("incr", 2, (_, args) => incrBy(args[1], 1));
  define("decr", 2, (_, args) => incrBy(args[1], -1));
  define("incrby", 3, (_, args) => {
    const by = incrByArgument(args[2], false);
    return by instanceof RespError ? by : incrBy(args[1], by);
  });
  define("decrby", 3, (_, args) => {
    const by = incrByArgument(args[2], true);
    return by instanceof RespError ? by : incrBy(args[1], by);
  });
  define("mget", -2, (_, args) => {
    const values: RespValue[] = [];
    for (let i = 1; i < args.length; i++) values.push(keyspace.get(keyOf(args[i])) ?? null);
    return values;
  });
  define("mset", -3, (_, args) => {
    if (args.length % 2 === 0) return wrongArity("mset");
    for (let i = 1; i < args.length; i += 2) keyspace.set(keyOf(args[i]), keep(args[i + 1]));
    return OK;
  });
  function expireCommand(command: string, unitMs: number): Command["run"] {
    return (_, args) => {
      let nx = false, xx = false, gt = false, lt = false;
      for (let i = 3; i < args.length; i++) {
        const option = upper(args[i]);
        if (option === "NX") nx = true;
        else if (option === "XX") xx = true;
        else if (option === "GT") gt = true;
        else if (option === "LT") lt = true;
        else return new RespError(`ERR Unsupported option ${printable(args[i])}`);
      }
      if (nx && (xx || gt || lt)) {
        return new RespError(
          "ERR NX and XX, GT or LT options at the same time are not compatible",
        );
      }
      if (gt && lt) {
        return new RespError("ERR GT and LT options at the same time are not compatible");
      }
      const n = parseInteger(args[2]);
      if (n === undefined) return NOT_AN_INTEGER;
      const ms = BigInt(n) * BigInt(unitMs);
      if (unitMs === 1000 && (ms > INT64_MAX || ms < INT64_MIN)) return invalidExpireTime(command);
      const at = BigInt(keyspace.now()) + ms;
      if (at > INT64_MAX) return invalidExpireTime(command);
      const key = keyOf(args[1]);
      if (!keyspace.has(key)) return ZERO;
      const when = Number(at);
      const current = keyspace.expireAt(key);
      if (nx && current !== undefined) return 0;
      if (xx && current === undefined) return 0;
      if (gt && (current === undefined || when <= current)) return 0;
      if (lt && current !== undefined && when >= current) return 0;
      if (when <= keyspace.now()) keyspace.delete(key);
      else keyspace.setExpireAt(key, when);
      return 1;
    };
  }
  define("expire", -3, expireCommand("expire", 1000));
  define("pexpire", -3, expireCommand("pexpire", 1));
  function ttlCommand(unitMs: number): Command["run"] {
    return (_, args) => {
      const key = keyOf(args[1]);
      if (!keyspace.has(key)) return -2;
      const at = keyspace.expireAt(key);
      if (at === undefined) return -1;
      const left = Math.max(0, at - keyspace.now());
      return unitMs === 1 ? left : Math.floor((left + 500) / 1000);
    };
  }
  define("ttl", 2, ttlCommand(1000));
  define("pttl", 2, ttlCommand(1));
  define("persist", 2, (_, args) => {
    const key = keyOf(args[1]);
    if (keyspace.expireAt(key) === undefined) return 0;
    keyspace.setExpireAt(key, undefined);
    return 1;
  });
  define(
    "type",
    2,
    (_, args) => new RespSimpleString(keyspace.has(keyOf(args[1])) ? "string" : "none"),
  );
  define("keys", 2, (_, args) => {
    const pattern = keyOf(args[1]);
    const found: RespValue[] = [];
    for (const key of keyspace.keys()) {
      if (pattern === "*" || globMatch(pattern, key)) found.push(bytesOfKey(key));
    }
    return found;
  });
  define("dbsize", 1, () => keyspace.size);
  function flush(_: Client, args: Uint8Array[]): Reply {
    if (args.length > 2) return SYNTAX_ERROR;
    if (args.length === 2 && upper(args[1]) !== "ASYNC" && upper(args[1]) !== "SYNC") {
      return SYNTAX_ERROR;
    }
    keyspace.clear();
    return OK;
  }
  define("flushdb", -1, flush);
  define("flushall", -1, flush);
  define("select", 2, (_, args) => {
    const n = parseInteger(args[1]);
    if (n === undefined) return NOT_AN_INTEGER;
    return n === 0 ? OK : new RespError("ERR DB index is out of range");
  });
  define("quit", -1, () => QUIT);

  // HELLO, CLIENT: who the client is.

  function setName(client: Client, bytes: Uint8Array): Promise<Reply> | RespError {
    if (bytes.length === 0) {
      return new RespError("ERR a client name cannot be cleared here (names are registry names)");
    }
    if (bytes.some((b) => b < 0x21 || b > 0x7e)) {
      return new RespError(
        "ERR Client names cannot contain spaces, newlines or special characters.",
      );
    }
    const wanted = keyOf(bytes);
    if (/^c\d/.test(wanted)) {
      return new RespError("ERR a client name cannot look like a connection id (c and digits)");
    }
    return client.conn.register(wanted).then((ok) =>
      ok ? OK : new RespError("ERR Client name is already taken by another connection")
    );
  }
  define("hello", -1, (client, args) => {
    let protocol = 0;
    let i = 1;
    if (args.length >= 2) {
      const n = parseInteger(args[i++]);
      if (n === undefined) {
        return new RespError("ERR Protocol version is not an integer or out of range");
      }
      if (n < 2 || n > 3) return new RespError("NOPROTO unsupported protocol version");
      protocol = Number(n);
    }
    let user: Uint8Array | undefined;
    let clientName: Uint8Array | undefined;
    for (; i < args.length; i++) {
      const more = args.length - 1 - i;
      const option = upper(args[i]);
      if (option === "AUTH" && more >= 2) {
        user = args[i + 1];
        i += 2;
      } else if (option === "SETNAME" && more >= 1) {
        clientName = args[++i];
      } else {
        return new RespError(`ERR Syntax error in HELLO option '${printable(args[i])}'`);
      }
    }
    if (user !== undefined && keyOf(user) !== "default") {
      return new RespError(
        "WRONGPASS invalid username-password pair or user is disabled.",
      );
    }
    const reply = () => {
      if (protocol !== 0) client.protocol = protocol;
      const fields: [string, RespValue][] = [
        ["server", "redis"],
        ["version", REDIS_VERSION],
        ["proto", client.protocol],
        ["id", client.id],
        ["mode", "standalone"],
        ["role", "master"],
        ["modules", []],
      ];
      return client.protocol === 3 ? new Map(fields) : fields.flat();
    };
    if (clientName === undefined) return reply();
    const named = setName(client, clientName);
    return named instanceof RespError
      ? named
      : named.then((r) => r instanceof RespError ? r : reply());
  });

  function clientLine(entry: RegistryEntry, current: Client): string {
    const client = clients.get(entry.id);
    const addr = (a: RegistryEntry["remoteAddr"]) =>
      "hostname" in a ? `${a.hostname}:${a.port}` : "path" in a ? `${a.path}:0` : "memory:0";
    const now = Date.now();
    const fields = [
      `id=${client?.id ?? 0}`,
      `addr=${addr(entry.remoteAddr)}`,
      `laddr=${addr(entry.localAddr)}`,
      `fd=-1`,
      `name=${entry.name ?? ""}`,
      `age=${Math.floor((now - entry.startedAt) / 1000)}`,
      // Idle since the last read (or message): as Redis's, which counts replies written too.
      // The connection stamps each read already; a clock read per command costs ~50 ns.
      `idle=${client ? Math.floor((now - (client.conn.stats().lastEventAt ?? now)) / 1000) : 0}`,
      `flags=${client && client.channels.size > 0 ? "P" : "N"}`,
      `db=0`,
      `sub=${client?.channels.size ?? 0}`,
      `psub=0`,
      `multi=-1`,
      `cmd=${client === current ? "client|list" : client?.lastCommand ?? "NULL"}`,
      `user=default`,
      `resp=${client?.protocol ?? 2}`,
    ];
    return fields.join(" ");
  }
  define("client", -2, () => null, [
    define("client|setname", 3, (client, args) => setName(client, args[2])),
    define("client|getname", 2, (client) => client.conn.name ?? null),
    define("client|id", 2, (client) => client.id),
    define("client|list", -2, async (client, args) => {
      if (args.length > 2) return SYNTAX_ERROR;
      const entries = await registry.list({ owner: serverName });
      return entries.map((e) => clientLine(e, client) + "\n").join("");
    }),
    define("client|info", 2, async (client) => {
      const entries = await registry.list({ owner: serverName });
      const entry = entries.find((e) => e.id === client.conn.id);
      return entry ? clientLine(entry, client) + "\n" : null;
    }),
  ]);

  define("info", -1, () => {
    const lines = [
      "# Server",
      `redis_version:${REDIS_VERSION}`,
      "redis_mode:standalone",
      `process_id:${Deno.pid}`,
      `tcp_port:${port}`,
      `uptime_in_seconds:${Math.floor((Date.now() - startedAt) / 1000)}`,
      "",
      "# Clients",
      `connected_clients:${clients.size}`,
      "",
      "# Keyspace",
    ];
    const keys = keyspace.size;
    if (keys > 0) lines.push(`db0:keys=${keys},expires=${keyspace.expiring},avg_ttl=0`);
    return lines.join("\r\n") + "\r\n";
  });
  // Known settings, as CONFIG GET reports them (redis-benchmark asks for save and appendonly).
  const settings: [string, string][] = [["save", ""], ["appendonly", "no"], ["databases", "1"]];
  define("config", -2, () => null, [
    define("config|get", -3, (_, args) => {
      const found: RespValue[] = [];
      for (const [key, value] of settings) {
        if (args.slice(2).some((p) => globMatch(keyOf(p).toLowerCase(), key))) {
          found.push(key, value);
        }
      }
      return found;
    }),
  ]);
  define("command", -1, (_, args) => {
    if (args.length === 1) return [];
    const sub = upper(args[1]);
    if (sub === "COUNT") return commands.size;
    if (sub === "DOCS" || sub === "INFO") return [];
    return new RespError(`ERR unknown subcommand '${printable(args[1])}'. Try COMMAND HELP.`);
  });

  // Pub/Sub.

  function subscriptionReply(client: Client, kind: Uint8Array, channel: RespValue): RespValue {
    const reply = [kind, channel, client.channels.size];
    return client.protocol === 3 ? new RespPush(reply) : reply;
  }
  define("subscribe", -2, (client, args) => {
    const replies: RespValue[] = [];
    for (let i = 1; i < args.length; i++) {
      const channel = keyOf(args[i]);
      if (!client.channels.has(channel)) {
        client.channels.add(channel);
        let subscribers = channels.get(channel);
        if (subscribers === undefined) channels.set(channel, subscribers = new Set());
        subscribers.add(client);
      }
      replies.push(subscriptionReply(client, SUBSCRIBE, args[i]));
    }
    return new Replies(replies);
  });
  function unsubscribe(client: Client, channel: string): void {
    client.channels.delete(channel);
    const subscribers = channels.get(channel);
    subscribers?.delete(client);
    if (subscribers?.size === 0) channels.delete(channel);
  }
  define("unsubscribe", -1, (client, args) => {
    const names = args.length > 1 ? args.slice(1).map(keyOf) : [...client.channels];
    if (names.length === 0) return new Replies([subscriptionReply(client, UNSUBSCRIBE, null)]);
    return new Replies(names.map((channel) => {
      unsubscribe(client, channel);
      return subscriptionReply(client, UNSUBSCRIBE, bytesOfKey(channel));
    }));
  });
  define("publish", 3, (_, args) => {
    const subscribers = channels.get(keyOf(args[1]));
    if (subscribers === undefined) return 0;
    const published: Published = { channel: keep(args[1]), message: keep(args[2]) };
    const size = published.channel.length + published.message.length;
    for (const subscriber of subscribers) {
      if (subscriber.pendingBytes + subscriber.conn.bufferedAmount > PUBSUB_LIMIT) {
        subscriber.conn.stop(new Error("subscriber over the pubsub output limit"));
        continue;
      }
      subscriber.pendingBytes += size;
      subscriber.conn.info(published);
    }
    return subscribers.size;
  });

  // What a subscribed RESP2 connection may run (Redis: the Pub/Sub commands, PING, QUIT, RESET).
  const inPubSub = new Set([
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
    "ping",
    "quit",
    "reset",
    "ssubscribe",
    "sunsubscribe",
  ]);

  /** Run one command, as Redis's processCommand checks and dispatches it. */
  function execute(client: Client, frame: RespValue): Reply | Promise<Reply> | undefined {
    // A null or empty array is ignored, as Redis does; resp({ inline: true }) gives nothing
    // else at the top but arrays.
    if (!Array.isArray(frame) || frame.length === 0) return undefined;
    for (let i = 0; i < frame.length; i++) {
      if (!(frame[i] instanceof Uint8Array)) {
        return new Closing(
          new RespError(`ERR Protocol error: expected '$', got '${typeByteOf(frame[i])}'`),
        );
      }
    }
    const args = frame as Uint8Array[];
    let command = commands.get(commandKey(args[0]));
    if (command?.subcommands && args.length >= 2) {
      const sub = command.subcommands.get(upper(args[1]));
      if (sub === undefined) {
        return new RespError(
          `ERR unknown subcommand '${printable(args[1]).slice(0, 128)}'. Try ${
            upper(args[0])
          } HELP.`.replace(/[\r\n]/g, " "),
        );
      }
      command = sub;
    }
    if (command === undefined) {
      let list = "";
      for (let i = 1; i < args.length && list.length < 128; i++) {
        list += `'${printable(args[i]).slice(0, 128 - list.length)}' `;
      }
      return new RespError(
        `ERR unknown command '${
          printable(args[0]).slice(0, 128)
        }', with args beginning with: ${list}`
          .replace(/[\r\n]/g, " "),
      );
    }
    if (
      (command.arity > 0 && args.length !== command.arity) || args.length < -command.arity
    ) return wrongArity(command.name);
    if (client.protocol === 2 && client.channels.size > 0 && !inPubSub.has(command.name)) {
      return new RespError(
        `ERR Can't execute '${command.name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context`,
      );
    }
    client.lastCommand = command.name;
    return command.run(client, args);
  }

  // ---- Connections -----------------------------------------------------------------------------

  // A plain generator: a batch of pipelined commands runs without a promise per command. The
  // few commands that must wait (for the registry: CLIENT SETNAME, LIST, INFO, HELLO SETNAME)
  // park the session: their reply comes back as an info event (Resume), and the events that
  // arrive meanwhile wait in `held`, so replies keep the order of the commands.
  function* session(conn: Connection<RespValue>): Generator<Yielded, void, Event<RespValue>> {
    const client = new Client(conn);
    clients.set(conn.id, client);
    const held: Event<RespValue>[] = [];
    let parked = false;
    let out: Action | Action[] | undefined; // what to do at the next yield
    try {
      for (;;) {
        let ev: Event<RespValue>;
        if (!parked && held.length > 0) ev = held.shift()!;
        else {
          ev = yield out;
          out = undefined;
        }
        if (ev.type === "disconnect" || ev.type === "shutdown") return;
        let reply: Reply | Promise<Reply> | undefined;
        if (parked) {
          if (
            !(ev.type === "info" && ev.message instanceof Resume && ev.message.client === client)
          ) {
            // A command's arguments are lent for this step only: a held one keeps copies.
            held.push(
              ev.type === "packet" && Array.isArray(ev.data)
                ? {
                  type: "packet",
                  data: ev.data.map((a) => a instanceof Uint8Array ? keep(a) : a),
                }
                : ev,
            );
            continue;
          }
          parked = false;
          reply = ev.message.reply;
        } else if (ev.type === "packet") {
          reply = execute(client, ev.data);
          if (reply instanceof Promise) {
            parked = true;
            reply.then((r) => conn.info(new Resume(client, r)));
            continue;
          }
        } else if (ev.type === "info" && !(ev.message instanceof Resume)) {
          // A message published to a channel this client is subscribed to.
          const { channel, message } = ev.message as Published;
          client.pendingBytes -= channel.length + message.length;
          if (!client.channels.has(keyOf(channel))) continue; // unsubscribed since
          const data = [MESSAGE, channel, message];
          reply = client.protocol === 3 ? new RespPush(data) : data;
        } else if (ev.type === "frameError") {
          // Bad bytes: answer as Redis does; the connection then ends.
          const why = ev.error instanceof FrameTooLarge ? "too big request" : ev.error.message;
          reply = new RespError(`ERR Protocol error: ${why}`);
        } else continue;
        if (reply === undefined) continue;
        if (reply === QUIT || reply instanceof Closing) {
          yield [send(reply === QUIT ? OK : reply.error), stop()];
          return;
        }
        const actions = reply === OK
          ? SEND_OK
          : reply === null
          ? SEND_NULL
          : reply === PONG
          ? SEND_PONG
          : reply instanceof Replies
          ? reply.values.map(send)
          : send(reply);
        // Replies to held commands gather, to go out with the next yield.
        out = out === undefined ? actions : [out, actions].flat();
      }
    } finally {
      for (const channel of [...client.channels]) unsubscribe(client, channel);
      clients.delete(conn.id);
    }
  }

  return await serve(session, {
    port,
    hostname: options.hostname,
    transport: options.transport,
    // Arguments lent (no copy of each read): what a command keeps, it copies.
    framing: resp({ inline: true, lend: true }),
    registry,
    name: serverName,
    maxConnections: 10_000,
    logger: options.logger,
    onListen(addr) {
      if (addr.transport === "tcp") port = (addr as Deno.NetAddr).port;
      options.onListen?.(addr as Deno.Addr);
    },
  });
}

// ---- Command line --------------------------------------------------------------------------------

/** The port the example listens on by default: one above Redis's own. */
export const DEFAULT_PORT = 6380;

/** What `--help` prints. */
export const USAGE = `usage: deno run -A examples/redis_server.ts [options]

A small Redis (strings with expiry, Pub/Sub, CLIENT, HELLO 2 and 3) that redis-cli,
redis-benchmark and client libraries talk to. Prints "listening on HOST:PORT" once listening;
SIGINT or SIGTERM stops it.

  --port N          port to listen on, 0 for any free one (default ${DEFAULT_PORT})
  --hostname HOST   address to bind (default 127.0.0.1)
  -h, --help        print this help and exit`;

/** The settings given on the command line. */
export interface RedisServerArgs {
  port: number;
  hostname: string;
}

/** Parse the server's command line; never throws. */
export function parseRedisServerArgs(argv: string[]): Parsed<RedisServerArgs> {
  const flags = parseFlags(argv, {
    port: { type: "string", default: String(DEFAULT_PORT) },
    hostname: { type: "string", default: "127.0.0.1" },
  });
  if (flags.kind !== "flags") return flags;
  const port = integer(flags.values.port, 0, 65535);
  if (port === undefined) {
    return {
      kind: "usage",
      error: `--port must be an integer from 0 to 65535, not "${flags.values.port}"`,
    };
  }
  if (flags.values.hostname === "") return { kind: "usage", error: "--hostname must not be empty" };
  return { kind: "run", args: { port, hostname: flags.values.hostname } };
}

async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("redis_server", parseRedisServerArgs(argv), USAGE);
  if (typeof args === "number") return args;
  const stop = stopOnSignals(); // before listening: a SIGTERM right after the line is a clean stop
  let server;
  try {
    server = await redisServer({
      port: args.port,
      hostname: args.hostname,
      onListen(addr) {
        if (addr.transport === "tcp") console.log(`listening on ${addr.hostname}:${addr.port}`);
      },
    });
  } catch (err) {
    console.error(`redis_server: cannot listen on ${args.hostname}:${args.port}: ${oneLine(err)}`);
    stop.remove();
    return 1;
  }
  await stop.until(server);
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
