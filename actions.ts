/**
 * The vocabulary of a connection: the actions a handler yields and the events it receives.
 *
 * Actions are plain data, so a handler can be tested by stepping it by hand, without sockets.
 *
 * @module
 */

import type { Connection } from "./connection.ts";

/** Where a `call` came from; pass it to {@linkcode reply} to answer, now or from a later event. */
export interface From {
  /** A number unique to this call within the process, handy for logging. */
  readonly ref: number;
}

/** Write `data`, encoded with the connection's framing. Writes of one step go out together, in order. */
export interface SendAction {
  /** Discriminant. */
  readonly type: "send";
  /** The frame to encode and write. */
  readonly data: unknown;
}

/** Answer a `call`. */
export interface ReplyAction {
  /** Discriminant. */
  readonly type: "reply";
  /** The `from` of the call being answered. */
  readonly from: From;
  /** The value the caller's promise resolves with. */
  readonly value: unknown;
}

/** Arm (or, with `ms: null`, disarm) the event timeout or a named timer. */
export interface SetTimeoutAction {
  /** Discriminant. */
  readonly type: "setTimeout";
  /** Milliseconds from now, or `null` to cancel. */
  readonly ms: number | null;
  /** Without a name: the event timeout, cancelled by any event. With one: a timer only its own cancel stops. */
  readonly name?: string;
}

/** Drop the generator and park the socket until the next event; the handler is called again with `state`. */
export interface HibernateAction {
  /** Discriminant. */
  readonly type: "hibernate";
  /** Passed as the second argument when the handler is called again. */
  readonly state: unknown;
}

/** Flush, close, run the handler's `finally`. */
export interface StopAction {
  /** Discriminant. */
  readonly type: "stop";
  /** Why; anything other than `"normal"` is logged. */
  readonly reason: unknown;
}

/** Passive mode: deliver the next frame as a `packet`, or `recvTimeout` after `timeoutMs`. */
export interface RecvAction {
  /** Discriminant. */
  readonly type: "recv";
  /** Milliseconds to wait for a frame; unset waits for ever. */
  readonly timeoutMs?: number;
}

/** Any action a handler can yield. */
export type Action =
  | SendAction
  | ReplyAction
  | SetTimeoutAction
  | HibernateAction
  | StopAction
  | RecvAction;

/** What a handler may yield: one action, several in order, or nothing (just wait). */
export type Yielded = Action | readonly Action[] | undefined | void;

/** A frame arrived. */
export interface PacketEvent<T = unknown> {
  /** Discriminant. */
  readonly type: "packet";
  /** The decoded frame (bytes for `raw()` and `lengthPrefixed()`, a string for `lines()`). */
  readonly data: T;
}

/** `conn.call(message)`: answer with `reply(ev.from, value)`. */
export interface CallEvent {
  /** Discriminant. */
  readonly type: "call";
  /** What the caller sent. */
  readonly message: unknown;
  /** Pass to {@linkcode reply}. */
  readonly from: From;
}

/** `conn.cast(message)`. */
export interface CastEvent {
  /** Discriminant. */
  readonly type: "cast";
  /** What the caster sent. */
  readonly message: unknown;
}

/** `conn.info(message)`: any other message. */
export interface InfoEvent {
  /** Discriminant. */
  readonly type: "info";
  /** What the sender sent. */
  readonly message: unknown;
}

/** The event timeout fired (no `name`), or the named timer `name` fired. */
export interface TimeoutEvent {
  /** Discriminant. */
  readonly type: "timeout";
  /** The timer's name; absent for the event timeout. */
  readonly name?: string;
}

/** A passive `recv(timeoutMs)` got no frame in time. */
export interface RecvTimeoutEvent {
  /** Discriminant. */
  readonly type: "recvTimeout";
}

/** The peer closed (or reset) its side. Writing may still work after a half-close. */
export interface DisconnectEvent {
  /** Discriminant. */
  readonly type: "disconnect";
  /** The socket error, if it was not a clean close. */
  readonly error?: Error;
}

/** The owner is stopping: finish promptly; after the shutdown timeout the connection is forced. */
export interface ShutdownEvent {
  /** Discriminant. */
  readonly type: "shutdown";
  /** Why the owner is stopping. */
  readonly reason: unknown;
}

/** `server.upgrade(handler)` asks this live connection to switch code: hibernate to switch. */
export interface UpgradeEvent {
  /** Discriminant. */
  readonly type: "upgrade";
  /** The handler that takes over at the next wake from hibernation. */
  // deno-lint-ignore no-explicit-any
  readonly handler: Handler<any, any>;
}

/** Any event a handler can receive. */
export type Event<T = unknown> =
  | PacketEvent<T>
  | CallEvent
  | CastEvent
  | InfoEvent
  | TimeoutEvent
  | RecvTimeoutEvent
  | DisconnectEvent
  | ShutdownEvent
  | UpgradeEvent;

/**
 * A connection's code: called once per connection (and again after each hibernation, with the
 * state it hibernated with). It yields actions and receives events.
 *
 * `T` is the frame type of the connection's framing.
 */
// deno-lint-ignore no-explicit-any
export type Handler<T = any, S = any> = (
  conn: Connection<T>,
  state?: S,
) =>
  | AsyncGenerator<Yielded, void, Event<T>>
  | Generator<Yielded, void, Event<T>>;

/**
 * Write `data` with the connection's framing.
 *
 * @example
 * ```ts
 * import { send } from "./mod.ts";
 * const action = send(new Uint8Array([1, 2, 3]));
 * console.assert(action.type === "send");
 * ```
 */
export function send(data: unknown): SendAction {
  return { type: "send", data };
}

/**
 * Answer a `call` event, now or later.
 *
 * @example
 * ```ts
 * import { reply, type Event, type Yielded } from "./mod.ts";
 * function* counter(): Generator<Yielded, void, Event> {
 *   let n = 0;
 *   let ev = yield;
 *   for (;;) {
 *     ev = ev.type === "call" ? yield reply(ev.from, ++n) : yield;
 *   }
 * }
 * counter();
 * ```
 */
export function reply(from: From, value: unknown): ReplyAction {
  return { type: "reply", from, value };
}

/**
 * Arm the event timeout (no name; any event cancels it) or a named timer (only
 * `setTimeout(null, name)` cancels it). `ms: null` disarms.
 *
 * @example
 * ```ts
 * import { setTimeout } from "./mod.ts";
 * const idle = setTimeout(30_000);            // event timeout
 * const tick = setTimeout(1_000, "tick");     // named timer
 * const off = setTimeout(null, "tick");       // cancel it
 * console.assert(idle.ms === 30_000 && tick.name === "tick" && off.ms === null);
 * ```
 */
export function setTimeout(ms: number | null, name?: string): SetTimeoutAction {
  return name === undefined ? { type: "setTimeout", ms } : { type: "setTimeout", ms, name };
}

/**
 * Drop the generator, release buffers, and wait for the next event, which calls the handler
 * again as `handler(conn, state)`. The generator's `finally` does not run.
 *
 * @example
 * ```ts
 * import { hibernate } from "./mod.ts";
 * const action = hibernate({ count: 1 });
 * console.assert(action.type === "hibernate");
 * ```
 */
export function hibernate(state?: unknown): HibernateAction {
  return { type: "hibernate", state };
}

/**
 * Stop the connection: flush pending writes, close the socket, run the handler's `finally`.
 *
 * @example
 * ```ts
 * import { stop } from "./mod.ts";
 * console.assert(stop().reason === "normal");
 * ```
 */
export function stop(reason: unknown = "normal"): StopAction {
  return { type: "stop", reason };
}

/**
 * Passive mode: ask for the next frame, delivered as a `packet` event, or a `recvTimeout` event
 * after `timeoutMs`.
 *
 * @example
 * ```ts
 * import { recv } from "./mod.ts";
 * console.assert(recv(1_000).timeoutMs === 1_000);
 * ```
 */
export function recv(timeoutMs?: number): RecvAction {
  return timeoutMs === undefined ? { type: "recv" } : { type: "recv", timeoutMs };
}
