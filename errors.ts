/**
 * The errors the library raises, each a class so callers can tell them apart with `instanceof`.
 *
 * @module
 */

/**
 * A frame was longer than the framing's `maxLength`. Ends the connection it came from.
 *
 * @example
 * ```ts
 * import { FrameTooLarge } from "./mod.ts";
 * const err = new FrameTooLarge(70_000, 65_536);
 * console.assert(err.name === "FrameTooLarge" && err.length === 70_000);
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
 * Input that the framing cannot decode (bad UTF-8 in `lines()`, a user framing's own check).
 * Ends the connection it came from.
 *
 * @example
 * ```ts
 * import { MalformedFrame } from "./mod.ts";
 * console.assert(new MalformedFrame("bad utf-8").name === "MalformedFrame");
 * ```
 */
export class MalformedFrame extends Error {
  /** Make one with a message that says what was wrong. */
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
 * import { TimeoutError } from "./mod.ts";
 * console.assert(new TimeoutError("call timed out after 5000 ms").name === "TimeoutError");
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
 * import { ConnectionClosed } from "./mod.ts";
 * const err = new ConnectionClosed("c1", "normal");
 * console.assert(err.name === "ConnectionClosed" && err.reason === "normal");
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
 * A handler broke the protocol: yielded something that is not an action, or an action its
 * connection cannot perform (such as `recv` in active mode).
 *
 * @example
 * ```ts
 * import { ProtocolError } from "./mod.ts";
 * console.assert(new ProtocolError("not an action: 42").name === "ProtocolError");
 * ```
 */
export class ProtocolError extends Error {
  /** Make one with a message that says what was yielded. */
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
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
