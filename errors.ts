/**
 * The errors the library raises, each a class so callers can tell them apart with `instanceof`.
 *
 * @module
 */

/**
 * A frame was longer than the framing's `maxLength`. Ends the connection it came from. Its
 * message is one short line, as the connection's end is logged without a stack.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { FrameTooLarge } from "./mod.ts";
 * const err = new FrameTooLarge(70_000, 65_536);
 * assert.ok(err instanceof Error);
 * assert.equal(err.name, "FrameTooLarge");
 * assert.equal(err.length, 70_000);
 * assert.equal(err.maxLength, 65_536);
 * assert.equal(err.message, "frame of 70000 bytes exceeds maxLength 65536");
 * ```
 */
export class FrameTooLarge extends Error {
  /** The frame's length as announced or as read so far, in bytes. */
  readonly length: number;
  /** The limit it went over. */
  readonly maxLength: number;
  /** Make one; `length` is the offending size, `maxLength` the limit. */
  constructor(length: number, maxLength: number) {
    super(`frame of ${length} bytes exceeds maxLength ${maxLength}`);
    this.name = "FrameTooLarge";
    this.length = length;
    this.maxLength = maxLength;
  }
}

/**
 * Input that the framing cannot decode (bad UTF-8 in `lines()`, unless it was made with
 * `invalidUtf8: "replace"`; a user framing's own check). Ends the connection it came from.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, lines, MalformedFrame } from "./mod.ts";
 * const err = new MalformedFrame("netstring: missing ','");
 * assert.equal(err.name, "MalformedFrame");
 * assert.equal(err.message, "netstring: missing ','");
 * // lines() says where the bad UTF-8 is: the second byte of the second line here.
 * assert.throws(
 *   () => decodeFrames(lines(), new Uint8Array([0x6f, 0x6b, 0x0a, 0x61, 0xff, 0x0a])),
 *   { name: "MalformedFrame", message: "invalid UTF-8 at byte 2 of line 2" },
 * );
 * ```
 */
export class MalformedFrame extends Error {
  /**
   * Make one with a message that says what was wrong and where, in one short line (the
   * connection's end is logged with it, without a stack); `options.cause` may hold the error
   * underneath.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "MalformedFrame";
  }
}

/**
 * A `call` got no reply in time, or a connect took longer than `connectTimeout`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { TimeoutError } from "./mod.ts";
 * const err = new TimeoutError("call timed out after 5000 ms");
 * assert.equal(err.name, "TimeoutError");
 * assert.equal(err.message, "call timed out after 5000 ms");
 * ```
 */
export class TimeoutError extends Error {
  /** Make one with a message that says what timed out. */
  constructor(message: string) {
    super(message);
    this.name = "TimeoutError";
  }
}

/**
 * The connection closed (or was never open) before the operation could complete; `reason` is
 * why it closed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ConnectionClosed, FrameTooLarge } from "./mod.ts";
 * const err = new ConnectionClosed("c1", "normal");
 * assert.equal(err.name, "ConnectionClosed");
 * assert.equal(err.reason, "normal");
 * assert.equal(err.message, "connection c1 closed (normal)");
 * // An error reason is also the cause.
 * const tooLarge = new FrameTooLarge(10, 5);
 * const closed = new ConnectionClosed("c2", tooLarge);
 * assert.equal(closed.cause, tooLarge);
 * assert.equal(
 *   closed.message,
 *   "connection c2 closed (FrameTooLarge: frame of 10 bytes exceeds maxLength 5)",
 * );
 * ```
 */
export class ConnectionClosed extends Error {
  /** Why the connection closed. */
  readonly reason: unknown;
  /** Make one for connection `id`, closed for `reason`. */
  constructor(id: string, reason: unknown) {
    super(`connection ${id} closed (${describeReason(reason)})`, {
      cause: reason instanceof Error ? reason : undefined,
    });
    this.name = "ConnectionClosed";
    this.reason = reason;
  }
}

/**
 * A reconnecting client (`connect(…, { reconnect })`) has no socket: its connection dropped and it
 * has not reconnected yet. `call` and `sendSync` reject with it, `send`, `cast` and `info` throw
 * it; `conn.whenUp()` waits for the next socket. It is also the close reason of a client whose
 * reconnecting gave up (`maxAttempts`), with `gaveUpAfter` set. `reason` (and `cause`, if an
 * `Error`) is why the last connection ended or the last connect failed. A `ConnectionClosed`, so
 * code that handles that handles this too.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ConnectionClosed, ConnectionDown } from "./mod.ts";
 * const err = new ConnectionDown("c4", "normal");
 * assert.ok(err instanceof ConnectionClosed);
 * assert.equal(err.name, "ConnectionDown");
 * assert.equal(err.message, "connection c4 is down, reconnecting (last: normal)");
 * const gaveUp = new ConnectionDown("c4", new Error("refused"), 5);
 * assert.equal(gaveUp.gaveUpAfter, 5);
 * assert.equal(gaveUp.message, "connection c4 gave up reconnecting after 5 attempts (last: Error: refused)");
 * ```
 */
export class ConnectionDown extends ConnectionClosed {
  /** Attempts made in a row before reconnecting gave up; undefined while it goes on. */
  readonly gaveUpAfter: number | undefined;
  /** Make one for client `id`; `reason` is the last end or connect error. */
  constructor(id: string, reason: unknown, gaveUpAfter?: number) {
    super(id, reason);
    this.name = "ConnectionDown";
    this.gaveUpAfter = gaveUpAfter;
    this.message = gaveUpAfter === undefined
      ? `connection ${id} is down, reconnecting (last: ${describeReason(reason)})`
      : `connection ${id} gave up reconnecting after ${gaveUpAfter} attempts (last: ${
        describeReason(reason)
      })`;
  }
}

/**
 * A handler broke the protocol: yielded something that is not an action, or an action its
 * connection cannot perform (such as `recv` in active mode).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ProtocolError } from "./mod.ts";
 * const err = new ProtocolError("not an action: 42");
 * assert.equal(err.name, "ProtocolError");
 * assert.equal(err.message, "not an action: 42");
 * ```
 */
export class ProtocolError extends Error {
  /** Make one with a message that says what was yielded. */
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** Reasons that end a connection cleanly: not logged, and `conn.done` resolves. */
export function isNormalReason(reason: unknown): boolean {
  return reason === "normal" || reason === "shutdown" || reason === "idle";
}

/** `value` for an error message: `"4" (a string)`, `1.5`, `null`, `an object`. */
export function describeValue(value: unknown): string {
  switch (typeof value) {
    case "number":
      return String(value);
    case "string":
      return `${JSON.stringify(value)} (a string)`;
    case "bigint":
      return `${value}n (a bigint)`;
    case "boolean":
      return `${value} (a boolean)`;
    case "symbol":
      return `${String(value)} (a symbol)`;
    case "undefined":
      return "undefined";
    case "function":
      return "a function";
    default:
      return value === null ? "null" : Array.isArray(value) ? "an array" : "an object";
  }
}

/** A short text for a close reason, for messages and logs. */
export function describeReason(reason: unknown): string {
  if (reason instanceof Error) return `${reason.name}: ${reason.message}`;
  if (typeof reason === "string") return reason;
  try {
    return JSON.stringify(reason) ?? String(reason);
  } catch {
    return String(reason);
  }
}

/**
 * A connection's peer does not read what it is sent: more than the `maxBuffered` option's bytes
 * were pending when another send came from outside the handler. The connection ends with this
 * reason (or, with `onBufferFull: "throw"`, the send throws it and the connection goes on).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferFull } from "./mod.ts";
 * const err = new BufferFull("c7", 9_000_000, 8_388_608);
 * assert.equal(err.name, "BufferFull");
 * assert.equal(err.limit, 8_388_608);
 * ```
 */
export class BufferFull extends Error {
  /** Bytes pending when the send came. */
  readonly buffered: number;
  /** The limit they were over (`maxBuffered`). */
  readonly limit: number;
  /** Make one for connection `id`, with `buffered` bytes pending over `limit`. */
  constructor(id: string, buffered: number, limit: number) {
    super(
      `connection ${id}: ${buffered} bytes pending exceed maxBuffered ${limit} (the peer does not read)`,
    );
    this.name = "BufferFull";
    this.buffered = buffered;
    this.limit = limit;
  }
}

/**
 * A name asked for (`connect({ name })`, `conn.register`) is held by another connection.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NameTaken } from "./mod.ts";
 * const err = new NameTaken("alice");
 * assert.equal(err.name, "NameTaken");
 * assert.equal(err.takenName, "alice");
 * ```
 */
export class NameTaken extends Error {
  /** The name that was taken. */
  readonly takenName: string;
  /** Make one for `name`. */
  constructor(name: string) {
    super(`name "${name}" is already registered`);
    this.name = "NameTaken";
    this.takenName = name;
  }
}

/**
 * A connection lives on another node (process) of a shared registry (`KvRegistry`), and that
 * node cannot be reached: it stopped or died (its heartbeat is stale), its link refused this
 * node (a wrong cluster secret), or the link broke while a request was under way. A call to it
 * fails with this at once rather than waiting for its timeout.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NodeDown } from "./mod.ts";
 * const err = new NodeDown("web-2", "its heartbeat stopped");
 * assert.equal(err.name, "NodeDown");
 * assert.equal(err.node, "web-2");
 * assert.equal(err.message, "node web-2 is down: its heartbeat stopped");
 * ```
 */
export class NodeDown extends Error {
  /** The node that cannot be reached. */
  readonly node: string;
  /** Make one for `node`, saying `why`; `options.cause` may hold the error underneath. */
  constructor(node: string, why: string, options?: ErrorOptions) {
    super(`node ${node} is down: ${why}`, options);
    this.name = "NodeDown";
    this.node = node;
  }
}

/**
 * The Deno KV store behind a `KvRegistry` cannot be opened or used: a path that is not a
 * database, a missing `--unstable-kv` flag, a node name that a live node already holds.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { RegistryUnavailable } from "./mod.ts";
 * const err = new RegistryUnavailable("cannot open /nope/kv.db");
 * assert.equal(err.name, "RegistryUnavailable");
 * assert.equal(err.message, "cannot open /nope/kv.db");
 * ```
 */
export class RegistryUnavailable extends Error {
  /** Make one saying what failed; `options.cause` may hold the error underneath. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "RegistryUnavailable";
  }
}
