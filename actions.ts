/**
 * The vocabulary of a connection: the actions a handler yields and the events it receives.
 *
 * Actions are plain data, so a handler can be tested by stepping it by hand, without sockets.
 *
 * @module
 */

import type { Connection } from "./connection.ts";
import type { Framing } from "./framing.ts";
import type { TlsOptions } from "./transport/tls.ts";
import { socketOptionsProblem } from "./_socket_options.ts";

/**
 * Where a `call` came from; pass it to {@linkcode reply} to answer, now or from a later event,
 * from this connection's handler or any other handler of the process (as Erlang's
 * `gen_server:reply`). The call still fails with `ConnectionClosed` if the called connection
 * ends before the reply.
 */
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

/**
 * The TLS settings of a {@linkcode startTls} switch: those of the `tls()` transport. A client
 * checks the server with `caCerts` and `serverName` (and may present `cert`/`key`); a server
 * needs `cert`/`key` (or `certFile`/`keyFile`).
 */
export type StartTlsOptions = TlsOptions;

/** Switch this live plain connection to TLS, in place (STARTTLS). */
export interface StartTlsAction {
  /** Discriminant. */
  readonly type: "startTls";
  /** How to check the server. */
  readonly options: StartTlsOptions;
}

/** Change the connection's framing at the current frame boundary, both ways. */
export interface SetFramingAction {
  /** Discriminant. */
  readonly type: "setFraming";
  /** The framing from now on. */
  // deno-lint-ignore no-explicit-any
  readonly framing: Framing<any>;
}

/** Half-close: end the writing side (FIN) once pending output is written; reading goes on. */
export interface CloseWriteAction {
  /** Discriminant. */
  readonly type: "closeWrite";
}

/** Socket options a handler may change while its connection runs ({@linkcode setOptions}). */
export interface SocketOptions {
  /** `true` disables Nagle's algorithm (`TCP_NODELAY`): small writes go out at once. */
  readonly noDelay?: boolean;
  /** `true` turns TCP keep-alive probes on (`SO_KEEPALIVE`); their timing is the system's. */
  readonly keepAlive?: boolean;
}

/** Change socket options of this connection now, where its socket allows them. */
export interface SetOptionsAction {
  /** Discriminant. */
  readonly type: "setOptions";
  /** The options to set; those left out stay as they are. */
  readonly options: SocketOptions;
}

/** Any action a handler can yield. */
export type Action =
  | SendAction
  | ReplyAction
  | SetTimeoutAction
  | HibernateAction
  | StopAction
  | RecvAction
  | StartTlsAction
  | SetFramingAction
  | CloseWriteAction
  | SetOptionsAction;

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

/**
 * One direction of the socket ended. `side: "read"`: the peer closed (or reset) its side, so no
 * more packets come; writing may still work after a half-close. `side: "write"`: a write failed,
 * so sends from now on are dropped; packets may still arrive, and the end of reading is
 * reported by a second `disconnect` with `side: "read"`. Each side is reported at most once.
 */
export interface DisconnectEvent {
  /** Discriminant. */
  readonly type: "disconnect";
  /** Which direction ended. */
  readonly side: "read" | "write";
  /** The socket error, if it was not a clean close. */
  readonly error?: Error;
}

/**
 * The framing could not decode the input (`FrameTooLarge`, `MalformedFrame`): every frame before
 * the bad one was delivered, nothing more will be read, and the connection ends (with `error` as
 * its reason) when the handler next waits. A handler may still answer, e.g.
 * `yield send("line too long")`, which is written before the socket closes.
 */
export interface FrameErrorEvent {
  /** Discriminant. */
  readonly type: "frameError";
  /** What the framing threw. */
  readonly error: Error;
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
  | FrameErrorEvent
  | ShutdownEvent
  | UpgradeEvent;

/**
 * What a handler returns: a generator that yields actions and receives events of frame type
 * `T`. Annotate a handler declared on its own with it, so that `yield` is typed:
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { type HandlerGenerator, send } from "./mod.ts";
 * async function* echo(): HandlerGenerator<Uint8Array> {
 *   for (let ev = yield; ev.type === "packet"; ev = yield send(ev.data));
 * }
 * const gen = echo();
 * await gen.next();
 * const step = await gen.next({ type: "packet", data: new Uint8Array([7]) });
 * assert.deepEqual(step.value, send(new Uint8Array([7])));
 * ```
 */
export type HandlerGenerator<T = Uint8Array> =
  | AsyncGenerator<Yielded, void, Event<T>>
  | Generator<Yielded, void, Event<T>>;

/**
 * A connection's code: called once per connection (and again after each hibernation, with the
 * state it hibernated with). It yields actions and receives events.
 *
 * `T` is the frame type of the connection's framing. A handler written inline gets events of
 * type `any`; annotate it (`Handler<string>`, or `HandlerGenerator<string>` on the generator)
 * to have its events typed and checked against the framing by `serve` and `connect`.
 */
// deno-lint-ignore no-explicit-any
export type Handler<T = any, S = any> = (
  conn: Connection<T>,
  state?: S,
) => HandlerGenerator<T>;

/**
 * The frame type a handler is written for: `T` of a `Handler<T>` or of a generator annotated
 * `HandlerGenerator<T>`; `any` for a handler written inline without annotations.
 *
 * @example
 * ```ts
 * import type { FrameOf, HandlerGenerator } from "./mod.ts";
 * async function* echo(): HandlerGenerator<string> {}
 * const frame: FrameOf<typeof echo> = "a line";
 * void frame;
 * ```
 */
// deno-lint-ignore no-explicit-any
export type FrameOf<H> = H extends (...args: any[]) => infer R
  // deno-lint-ignore no-explicit-any
  ? R extends AsyncGenerator<any, any, Event<infer T>> | Generator<any, any, Event<infer T>>
    // deno-lint-ignore no-explicit-any
    ? unknown extends T ? any : T
  : never
  : never;

/**
 * Write `data` with the connection's framing.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { send } from "./mod.ts";
 * const action = send(new Uint8Array([1, 2, 3]));
 * assert.equal(action.type, "send");
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
 * import assert from "node:assert/strict";
 * import { type Event, reply, type Yielded } from "./mod.ts";
 * function* counter(): Generator<Yielded, void, Event> {
 *   let n = 0;
 *   let ev = yield;
 *   for (;;) {
 *     ev = ev.type === "call" ? yield reply(ev.from, ++n) : yield;
 *   }
 * }
 * const gen = counter();
 * gen.next();
 * const from = { ref: 1 };
 * assert.deepEqual(gen.next({ type: "call", message: "add", from }).value, reply(from, 1));
 * ```
 */
export function reply(from: From, value: unknown): ReplyAction {
  return { type: "reply", from, value };
}

/**
 * Arm the event timeout (no name; any event cancels it) or a named timer (only
 * `setTimeout(null, name)` cancels it). `ms: null` disarms; `Infinity` arms a timer that never
 * fires (as Erlang's `infinity`); delays past 2^31 - 1 ms work (they are chained). A negative
 * or NaN `ms` is a `RangeError`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { setTimeout } from "./mod.ts";
 * const idle = setTimeout(30_000); // event timeout
 * const tick = setTimeout(1_000, "tick"); // named timer
 * const off = setTimeout(null, "tick"); // cancel it
 * assert.equal(idle.ms, 30_000);
 * assert.equal(tick.name, "tick");
 * assert.equal(off.ms, null);
 * assert.throws(() => setTimeout(-1), RangeError);
 * ```
 */
export function setTimeout(ms: number | null, name?: string): SetTimeoutAction {
  if (ms !== null && !(typeof ms === "number" && ms >= 0)) {
    throw new RangeError(`setTimeout: ms must be a number >= 0, Infinity or null, not ${ms}`);
  }
  if (name !== undefined && typeof name !== "string") {
    throw new TypeError(`setTimeout: name must be a string, not ${typeof name}`);
  }
  return name === undefined ? { type: "setTimeout", ms } : { type: "setTimeout", ms, name };
}

/**
 * Drop the generator, release buffers, and wait for the next event, which calls the handler
 * again as `handler(conn, state)`. The generator's `finally` does not run.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { hibernate } from "./mod.ts";
 * assert.deepEqual(hibernate({ count: 1 }), { type: "hibernate", state: { count: 1 } });
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
 * import assert from "node:assert/strict";
 * import { stop } from "./mod.ts";
 * assert.equal(stop().reason, "normal");
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
 * import assert from "node:assert/strict";
 * import { recv } from "./mod.ts";
 * assert.equal(recv(1_000).timeoutMs, 1_000);
 * ```
 */
export function recv(timeoutMs?: number): RecvAction {
  if (timeoutMs !== undefined && !(typeof timeoutMs === "number" && timeoutMs >= 0)) {
    throw new RangeError(`recv: timeoutMs must be a number >= 0, not ${timeoutMs}`);
  }
  return timeoutMs === undefined ? { type: "recv" } : { type: "recv", timeoutMs };
}

/**
 * Switch this live plain connection to TLS in place, the way SMTP, IMAP, XMPP and PostgreSQL
 * do (STARTTLS), on either side: a client starts the handshake, a server (with `cert`/`key`)
 * answers it. What the step sends before it goes out in plain text, then the handshake runs,
 * and what is sent after (even in the same yield, or from outside meanwhile) is encrypted.
 * Nothing is lost or reordered across the switch. Yield it when the peer has agreed (in answer
 * to its packet, so that no read is under way); bytes already read past the switch point are a
 * `ProtocolError`. A failed handshake ends the connection with its error. The chosen ALPN
 * protocol is `conn.alpnProtocol` afterwards.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { startTls } from "./mod.ts";
 * const action = startTls({ serverName: "mail.example.com" });
 * assert.equal(action.type, "startTls");
 * ```
 */
export function startTls(options: StartTlsOptions = {}): StartTlsAction {
  return { type: "startTls", options };
}

/**
 * Change the connection's framing at the current frame boundary, in both directions, as
 * Erlang's `inet:setopts(Socket, [{packet, …}])`: for a protocol that starts with lines and
 * goes on in length-prefixed frames after a handshake, or in raw bytes for a file transfer.
 *
 * - **Output:** what the step sent before it is encoded with the old framing, what is sent
 *   after it (later in the same yield, in later yields, `conn.send` from outside) with the new
 *   one.
 * - **Input:** the switch point is right after the last frame the handler has received. Every
 *   byte after it is decoded with the new framing: bytes already read, and frames already cut
 *   from them but not yet delivered (queued, or held for `recv`), are cut again; nothing is lost
 *   or reordered, however the peer's bytes were split into reads. A `frameError` not yet
 *   delivered for bytes past the switch point is taken back too.
 * - Yield it in answer to the packet after which the peer changes framing. The connection ends
 *   with a `ProtocolError` when the bytes past the switch point can no longer be had: frames
 *   were decoded from a read whose buffer is reused (`highWaterMark` above 1 lets reading run
 *   ahead of the handler), or the frame after the switch point began in an earlier read that
 *   the handler has not answered yet, or a custom decoder lacks `take()` / `heldFrameEnd`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { lengthPrefixed, setFraming } from "./mod.ts";
 * const action = setFraming(lengthPrefixed(2));
 * assert.equal(action.type, "setFraming");
 * assert.equal(action.framing.name, "lengthPrefixed(2)");
 * assert.throws(() => setFraming("lines" as never), TypeError);
 * ```
 */
export function setFraming<T>(framing: Framing<T>): SetFramingAction {
  if (
    typeof framing !== "object" || framing === null || typeof framing.decoder !== "function" ||
    typeof framing.encode !== "function"
  ) {
    throw new TypeError(
      "setFraming: framing must be a Framing (such as lines() or lengthPrefixed(4)), with " +
        "decoder() and encode()",
    );
  }
  return { type: "setFraming", framing };
}

/**
 * Half-close (TCP's `shutdown(SHUT_WR)`, `Deno.Conn.closeWrite()`): once everything sent before
 * it has been written, end the writing side, so that the peer reads the end of the stream.
 * Reading goes on. Frames sent after it (by the handler or from outside) are dropped and counted
 * in `conn.framesDropped`; `conn.sendSync` rejects. The connection then ends, normally, once
 * the peer has closed its side too (the handler gets `disconnect` with `side: "read"`, and the
 * connection ends when it next waits), or when the handler returns or stops. A socket that
 * cannot half-close (its `closeWrite()` fails) reports it as `disconnect` with
 * `side: "write"` and the error.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { closeWrite } from "./mod.ts";
 * assert.deepEqual(closeWrite(), { type: "closeWrite" });
 * ```
 */
export function closeWrite(): CloseWriteAction {
  return { type: "closeWrite" };
}

/**
 * Change socket options of this connection now (Erlang's `inet:setopts`): `noDelay`
 * (`TCP_NODELAY`) and `keepAlive` (`SO_KEEPALIVE`), the ones Deno can change on a live socket.
 * Applied where the socket has them: TCP (`tcp()`, and `tls()` on `engine: "node"` or a client
 * switched with `startTls`); ignored where it has not (`Deno.TlsConn`, Unix sockets, `memory()`).
 * A value that is not a boolean, or an unknown option, is a `TypeError`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { setOptions } from "./mod.ts";
 * const action = setOptions({ noDelay: false, keepAlive: true });
 * assert.deepEqual(action.options, { noDelay: false, keepAlive: true });
 * assert.throws(() => setOptions({ noDelay: "yes" as never }), TypeError);
 * assert.throws(() => setOptions({ linger: 0 } as never), TypeError);
 * ```
 */
export function setOptions(options: SocketOptions): SetOptionsAction {
  const problem = socketOptionsProblem(options);
  if (problem !== undefined) throw new TypeError(`setOptions: ${problem}`);
  return { type: "setOptions", options };
}
