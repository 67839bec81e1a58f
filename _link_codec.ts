// The frames of a node link (see _node_link.ts), inside lengthPrefixed(4) framing:
//
//   kind u8 | ref u32 | id length u16 | id UTF-8 | timeout f64 (Call and Stop only) | value
//   value: tag u8, then an empty body (undefined), UTF-8 (string), raw bytes (Uint8Array) or
//   node:v8 structured serialization (anything else structured clone takes).
//
// Strings and bytes, the common messages, cost one copy each way; other values go through V8's
// serializer, which keeps Uint8Array, Map, Date, bigint… as structured clone does. node:v8 is
// loaded on first use (loadLinkCodec), so a program that never opens a KvRegistry never loads it.

import { ConnectionClosed, describeReason, MalformedFrame, TimeoutError } from "./errors.ts";

/** What a link frame carries. */
export const enum Kind {
  /** Server → client, first: ref the protocol version, id its node, value its nonce (bytes). */
  Hello = 1,
  /** Client → server: id its node, value its nonce and MAC (bytes). */
  Auth = 2,
  /** Server → client, once the client proved the secret: value its MAC (bytes). */
  Welcome = 3,
  /** Call connection `id` with `value`, answer `ref`, within `timeout` ms. */
  Call = 4,
  /** Cast `value` to connection `id`. */
  Cast = 5,
  /** Send `value` as an info message to connection `id`. */
  Info = 6,
  /** Write `value` to connection `id`'s socket. */
  Send = 7,
  /** Stop connection `id` with reason `value`, answer `ref` once closed. */
  Stop = 8,
  /** The answer to request `ref`: `value`. */
  Ok = 9,
  /** Request `ref` failed: `value` is a {@linkcode WireError}. */
  Err = 10,
}

const enum Tag {
  Undefined = 0,
  String = 1,
  Bytes = 2,
  Structured = 3,
}

/** One decoded link frame. */
export interface LinkFrame {
  kind: Kind;
  ref: number;
  id: string;
  /** Call and Stop: ms (NaN: none given). */
  timeout: number;
  value: unknown;
}

/** An error as it crosses a link. */
export interface WireError {
  name: string;
  message: string;
  /** ConnectionClosed: why the connection closed. */
  reason?: unknown;
}

interface V8 {
  serialize(value: unknown): Uint8Array;
  deserialize(bytes: Uint8Array): unknown;
}

let v8: V8 | undefined;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** Load the serializer for structured values (once; later calls resolve at once). */
export async function loadLinkCodec(): Promise<void> {
  v8 ??= (await import("node:v8")).default as unknown as V8;
}

function hasTimeout(kind: Kind): boolean {
  return kind === Kind.Call || kind === Kind.Stop;
}

/** The frame for `kind`; throws (a `DataCloneError`) if `value` cannot be serialized. */
export function encodeFrame(
  kind: Kind,
  ref: number,
  id: string,
  value: unknown,
  timeout = NaN,
): Uint8Array {
  const idBytes = encoder.encode(id);
  if (idBytes.length > 0xffff) throw new RangeError(`link: id of ${idBytes.length} bytes`);
  let tag: Tag;
  let body: Uint8Array;
  if (value === undefined) {
    tag = Tag.Undefined;
    body = new Uint8Array(0);
  } else if (typeof value === "string") {
    tag = Tag.String;
    body = encoder.encode(value);
  } else if (value instanceof Uint8Array && value.constructor === Uint8Array) {
    tag = Tag.Bytes;
    body = value;
  } else {
    tag = Tag.Structured;
    try {
      body = v8!.serialize(value);
    } catch (err) {
      // (node:v8 throws a plain Error; structuredClone, and what the docs promise, DataCloneError.)
      throw new DOMException((err as Error).message, "DataCloneError");
    }
  }
  const head = 1 + 4 + 2 + idBytes.length + (hasTimeout(kind) ? 8 : 0) + 1;
  const out = new Uint8Array(head + body.length);
  const view = new DataView(out.buffer);
  view.setUint8(0, kind);
  view.setUint32(1, ref);
  view.setUint16(5, idBytes.length);
  out.set(idBytes, 7);
  let at = 7 + idBytes.length;
  if (hasTimeout(kind)) {
    view.setFloat64(at, timeout);
    at += 8;
  }
  out[at] = tag;
  out.set(body, at + 1);
  return out;
}

/**
 * Decode one link frame; throws `MalformedFrame` for anything that is not one, or that holds a
 * structured value when `structured` is false (before a peer is authenticated, nothing goes
 * through V8's deserializer).
 */
export function decodeFrame(frame: Uint8Array, structured = true): LinkFrame {
  const view = new DataView(frame.buffer, frame.byteOffset, frame.length);
  if (frame.length < 8) throw new MalformedFrame(`link: frame of ${frame.length} bytes`);
  const kind = view.getUint8(0) as Kind;
  if (kind < Kind.Hello || kind > Kind.Err) throw new MalformedFrame(`link: frame kind ${kind}`);
  const ref = view.getUint32(1);
  const idLength = view.getUint16(5);
  let at = 7 + idLength;
  const head = at + (hasTimeout(kind) ? 8 : 0) + 1;
  if (frame.length < head) throw new MalformedFrame("link: frame shorter than its header");
  let id: string;
  try {
    id = decoder.decode(frame.subarray(7, at));
  } catch {
    throw new MalformedFrame("link: id is not UTF-8");
  }
  let timeout = NaN;
  if (hasTimeout(kind)) {
    timeout = view.getFloat64(at);
    at += 8;
  }
  const tag = frame[at] as Tag;
  // A copy: frames decoded from one read share its buffer, and a message may be kept.
  const body = frame.slice(at + 1);
  let value: unknown;
  switch (tag) {
    case Tag.Undefined:
      value = undefined;
      break;
    case Tag.String:
      try {
        value = decoder.decode(body);
      } catch {
        throw new MalformedFrame("link: string value is not UTF-8");
      }
      break;
    case Tag.Bytes:
      value = body;
      break;
    case Tag.Structured:
      if (!structured) throw new MalformedFrame("link: a structured value before authentication");
      try {
        value = v8!.deserialize(body);
      } catch (err) {
        throw new MalformedFrame(`link: bad structured value (${describeReason(err)})`);
      }
      break;
    default:
      throw new MalformedFrame(`link: value tag ${tag}`);
  }
  return { kind, ref, id, timeout, value };
}

/** `err` as it crosses a link: its name and message, and for `ConnectionClosed` its reason. */
export function toWireError(err: unknown): WireError {
  if (!(err instanceof Error)) return { name: "Error", message: describeReason(err) };
  const wire: WireError = { name: err.name, message: err.message };
  if (err instanceof ConnectionClosed) wire.reason = wireReason(err.reason);
  return wire;
}

// A close reason that crosses a link: strings and numbers as they are, errors as their name and
// message, anything else as text.
function wireReason(reason: unknown): unknown {
  if (reason instanceof Error) return { name: reason.name, message: reason.message };
  if (typeof reason === "string" || typeof reason === "number" || reason === undefined) {
    return reason;
  }
  return describeReason(reason);
}

/**
 * The error a {@linkcode WireError} about connection `id` stands for, with the library's class
 * where it has one.
 */
export function fromWireError(wire: unknown, id: string): Error {
  const w = (wire ?? {}) as Partial<WireError>;
  const message = typeof w.message === "string" ? w.message : "remote error";
  switch (w.name) {
    case "TimeoutError":
      return new TimeoutError(message);
    case "ConnectionClosed":
      return new ConnectionClosed(id, reasonFromWire(w.reason));
    case "RangeError":
      return new RangeError(message);
    case "TypeError":
      return new TypeError(message);
    default:
      return named(typeof w.name === "string" ? w.name : "Error", message);
  }
}

function reasonFromWire(reason: unknown): unknown {
  if (reason !== null && typeof reason === "object") {
    const r = reason as { name?: unknown; message?: unknown };
    return named(String(r.name), String(r.message));
  }
  return reason;
}

function named(name: string, message: string): Error {
  const err = new Error(message);
  err.name = name;
  return err;
}
