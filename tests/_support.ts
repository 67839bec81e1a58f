// Test helpers shared by every suite (tests/reliability/_support.ts re-exports them and adds its
// own): bounded waits, child processes that print when they are ready, raw-socket I/O, an
// independent length-prefix encoder, seeded randomness and checksummed frames for raw echo
// clients, a transport wrapping another's accepted sockets.

import assert from "node:assert/strict";
import type { Addr, Conn, Logger, Transport } from "../mod.ts";

/** The loopback address every TCP test listens and connects on. */
export const HOST = "127.0.0.1";

/** The port of a TCP address (fails on an address of any other transport). */
export function portOf(addr: Addr): number {
  assert.equal(addr.transport, "tcp");
  return (addr as Deno.NetAddr).port;
}

/** `promise`, or a rejection after `ms`: keeps every test bounded even when the library is wrong. */
export async function within<V>(ms: number, promise: Promise<V>, what = "operation"): Promise<V> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A child process started by {@linkcode startProcess}, up and ready. */
export interface StartedProcess {
  readonly child: Deno.ChildProcess;
  /** The match of the ready pattern in its output. */
  readonly match: RegExpMatchArray;
  /** Its whole stderr, once it has exited. */
  readonly stderr: Promise<string>;
  /** Read its stdout to the end (it ends when the process does); resolves with all of it. */
  readAll(): Promise<string>;
  /** For a `finally`: SIGKILL it if it still runs, wait for it and read its output to the end. */
  end(): Promise<void>;
}

/**
 * Start `deno ...args` (stdin closed, output piped) and read its stdout until `ready` matches
 * (a server's "listening on" line, say): at most `timeoutMs`, and it must not end first, else
 * it is killed and this fails with what it printed.
 */
export async function startProcess(
  args: string[],
  ready: RegExp,
  options: { cwd?: string | URL; env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<StartedProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: options.cwd,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let stdout = "";
  const readAll = async () => {
    for (let r = await reader.read(); !r.done; r = await reader.read()) stdout += r.value;
    return stdout;
  };
  let ended: Promise<void> | undefined;
  const end = () =>
    ended ??= (async () => {
      try {
        child.kill("SIGKILL");
      } catch { /* exited already */ }
      await child.status;
      await readAll();
      await stderr;
    })();
  try {
    const match = await within(
      options.timeoutMs ?? 20_000,
      (async () => {
        for (;;) {
          const match = stdout.match(ready);
          if (match) return match;
          const { value, done } = await reader.read();
          if (done) throw new Error(`it ended before printing ${ready}: ${stdout}${await stderr}`);
          stdout += value;
        }
      })(),
      `${args.join(" ")}: ${ready}`,
    );
    return { child, match, stderr, readAll, end };
  } catch (err) {
    await end();
    throw err;
  }
}

/** Remembers whether `promise` has settled, to check that something has not happened yet. */
export function tracked<V>(promise: Promise<V>): { promise: Promise<V>; settled(): boolean } {
  let settled = false;
  promise.then(() => settled = true, () => settled = true);
  return { promise, settled: () => settled };
}

/** Resolves after `ms`: paces a loop (load, polling), never bounds or replaces a wait itself. */
export function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A logger that keeps the arguments of every call, whatever its level, in `calls`, and the
 * level of each in `levels`.
 */
export function capturingLogger(): Logger & { calls: unknown[][]; levels: string[] } {
  const calls: unknown[][] = [];
  const levels: string[] = [];
  const at = (level: string) => (...data: unknown[]) => {
    calls.push(data);
    levels.push(level);
  };
  return { calls, levels, error: at("error"), warn: at("warn"), debug: at("debug") };
}

/**
 * Whether the log call `call` names `reason`: passes it along, or, for a peer's fault logged as
 * one line, says its name and message.
 */
export function logNames(call: unknown[], reason: unknown): boolean {
  return call.includes(reason) ||
    (reason instanceof Error &&
      call.some((x) => typeof x === "string" && x.includes(`${reason.name}: ${reason.message}`)));
}

/** An unbounded async queue: `push` now, `next()` later (or the other way round), bounded. */
export class Inbox<V> {
  readonly #items: V[] = [];
  readonly #waiters: Array<(v: V) => void> = [];
  /** How long `next()` waits by default (ms). */
  readonly waitMs: number;
  /** How many values were ever pushed, taken or not. */
  pushed = 0;
  constructor(waitMs = 5000) {
    this.waitMs = waitMs;
  }
  push(v: V): void {
    this.pushed++;
    const waiter = this.#waiters.shift();
    if (waiter) waiter(v);
    else this.#items.push(v);
  }
  next(ms = this.waitMs, what = "inbox.next"): Promise<V> {
    if (this.#items.length > 0) return Promise.resolve(this.#items.shift()!);
    return within(ms, new Promise<V>((resolve) => this.#waiters.push(resolve)), what);
  }
  /** Values pushed and not yet taken. */
  get size(): number {
    return this.#items.length;
  }
}

/** Closes `conn`, which may already be closed. */
export function closeQuietly(conn: { close(): void }): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}

/** Writes all of `bytes`, however many writes that takes. */
export async function writeAll(
  conn: { write(p: Uint8Array): Promise<number> },
  bytes: Uint8Array,
): Promise<void> {
  while (bytes.length > 0) bytes = bytes.subarray(await conn.write(bytes));
}

/** Reads exactly `n` bytes; fails if the stream ends first. */
export async function readExactly(
  conn: { read(p: Uint8Array): Promise<number | null> },
  n: number,
): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let at = 0;
  while (at < n) {
    const got = await conn.read(out.subarray(at));
    if (got === null) throw new Error(`end of stream after ${at} of ${n} bytes`);
    at += got;
  }
  return out;
}

/** Fails unless a TCP connect to `port` is refused (nothing listens there). */
export async function assertRefused(port: number): Promise<void> {
  await assert.rejects(
    () => Deno.connect({ hostname: HOST, port }),
    Deno.errors.ConnectionRefused,
  );
}

/** `parts` joined into one array. */
export function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Length-prefixed frames as Erlang's `{packet, N}` writes them (independent of the library). */
export function wireOf(payloads: Uint8Array[], prefix: 1 | 2 | 4 = 4): Uint8Array {
  const out = new Uint8Array(payloads.reduce((n, p) => n + prefix + p.length, 0));
  const view = new DataView(out.buffer);
  let at = 0;
  for (const p of payloads) {
    if (prefix === 1) view.setUint8(at, p.length);
    else if (prefix === 2) view.setUint16(at, p.length);
    else view.setUint32(at, p.length);
    out.set(p, at + prefix);
    at += prefix + p.length;
  }
  return out;
}

/** A small seeded PRNG (mulberry32) giving floats in [0, 1), so that failures reproduce. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** FNV-1a over `bytes`. */
export function fnv1a(bytes: Uint8Array): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], 0x01000193);
  return h >>> 0;
}

/** A raw echo client's frame payload: `id` u16, `seq` u32, `body` random bytes, FNV-1a u32. */
export function randomFrame(id: number, seq: number, body: number, rand: () => number): Uint8Array {
  const payload = new Uint8Array(6 + body + 4);
  const view = new DataView(payload.buffer);
  view.setUint16(0, id);
  view.setUint32(2, seq);
  for (let i = 0; i < body; i++) payload[6 + i] = (rand() * 256) | 0;
  view.setUint32(6 + body, fnv1a(payload.subarray(0, 6 + body)));
  return payload;
}

/** Checks that a {@linkcode randomFrame} echoed back is `id`'s frame `seq`, with a good checksum. */
export function assertFrameOf(got: Uint8Array, id: number, seq: number, tag: string): void {
  const view = new DataView(got.buffer, got.byteOffset, got.length);
  assert.equal(view.getUint16(0), id, `${tag}: a frame of another connection`);
  assert.equal(view.getUint32(2), seq, `${tag}: lost, duplicated or reordered`);
  assert.equal(
    view.getUint32(got.length - 4),
    fnv1a(got.subarray(0, got.length - 4)),
    `${tag}: corrupted (checksum)`,
  );
}

/**
 * `base`, with each accepted socket replaced by `wrap(socket)` and connecting as `base` does: a
 * transport written in a test, called `name`.
 */
export function acceptingWith<A extends Addr>(
  base: Transport<A>,
  wrap: (conn: Conn) => Conn,
  name = `wrapped-${base.name}`,
): Transport<A> {
  return {
    name,
    async listen(options) {
      const listener = await base.listen(options);
      return {
        addr: listener.addr,
        close: () => listener.close(),
        accept: async () => wrap(await listener.accept()),
      };
    },
    connect: (options) => base.connect(options),
  };
}

/** Runs `script` (TypeScript, imports relative to the repository root) in a child Deno, bounded. */
export async function evalInChild(
  script: string,
  ms = 20_000,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await within(
    ms,
    new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=ts", script],
      cwd: new URL("..", import.meta.url),
      stdout: "piped",
      stderr: "piped",
    }).output(),
    "the child exits by itself",
  );
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}
