/**
 * How a byte stream is cut into frames and frames are turned back into bytes: `raw()`,
 * `lengthPrefixed()`, `lines()`, or any object with the {@linkcode Framing} interface.
 *
 * @module
 */

import { describeValue, FrameTooLarge, MalformedFrame } from "./errors.ts";
import { WriteBuffer } from "./_write_buffer.ts";

/** Where a framing writes an encoded frame: the connection's pending output. */
export interface FrameWriter {
  /** Append bytes (copied). */
  write(bytes: Uint8Array): void;
  /** Append a string as UTF-8. */
  writeString(text: string): void;
  /** Append an unsigned integer, big-endian, in `bytes` bytes. */
  writeUint(value: number, bytes: 1 | 2 | 4): void;
}

/**
 * The per-connection decoding state of a framing. `decode` is called with each chunk read
 * (the caller reuses the chunk's memory afterwards: copy what you keep) and calls `emit` once
 * per complete frame, in order. It throws {@linkcode FrameTooLarge} or
 * {@linkcode MalformedFrame} on bad input.
 */
export interface Decoder<T> {
  /** Decode one chunk, emitting every complete frame it finishes. */
  decode(chunk: Uint8Array, emit: (frame: T) => void): void;
  /** Bytes held for a frame not yet complete: the last `buffered` bytes decoded. */
  readonly buffered: number;
  /**
   * Optional: the rest of a large frame in progress, for the next read to fill in place (saving
   * a copy). The caller then passes the filled part of that same view to `decode`.
   */
  readInto?(): Uint8Array | undefined;
  /**
   * Optional, for a connection that switches framing (`setFraming`): hand over the bytes held
   * for a frame not yet complete, and forget them. Without it, a switch while bytes are held
   * is a `ProtocolError`.
   */
  take?(): Uint8Array;
  /**
   * Optional, for `setFraming` when frames past the switch point were already decoded: where
   * the frame held before the last `decode` call (begun in an earlier chunk) ended in that
   * call's chunk, the offset just past its last byte; -1 if that call finished none. Without
   * it, such a switch after a read that finished a frame begun in an earlier read is a
   * `ProtocolError`.
   */
  readonly heldFrameEnd?: number;
  /**
   * Optional: `true` if the frames this decoder emits are lent, views of memory it (or the
   * caller's chunk) reuses at the next `decode`. A connection then reads again only once every
   * frame of the last read has been handed to the handler and the handler has asked for its next
   * event (whatever `highWaterMark` says), so a frame stays valid for the handler's step.
   */
  readonly lends?: boolean;
}

/**
 * A way to cut a byte stream into frames of type `T` and to write frames back.
 *
 * @example A framing of fixed 2-byte frames
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, type Framing } from "./mod.ts";
 * const pairs: Framing<Uint8Array> = {
 *   name: "pairs",
 *   decoder() {
 *     let held: number | undefined;
 *     return {
 *       get buffered() { return held === undefined ? 0 : 1; },
 *       decode(chunk, emit) {
 *         for (const b of chunk) {
 *           if (held === undefined) held = b;
 *           else { emit(new Uint8Array([held, b])); held = undefined; }
 *         }
 *       },
 *     };
 *   },
 *   encode(frame, out) { out.write(frame); },
 * };
 * assert.deepEqual(decodeFrames(pairs, new Uint8Array([1, 2, 3, 4])), [
 *   new Uint8Array([1, 2]),
 *   new Uint8Array([3, 4]),
 * ]);
 * ```
 */
export interface Framing<T = unknown> {
  /** A short name for logs. */
  readonly name: string;
  /** A fresh decoder for one connection. */
  decoder: () => Decoder<T>;
  /** Write `frame` to `out`; throw a `TypeError` for data this framing cannot encode. */
  encode: (frame: T, out: FrameWriter) => void;
}

/**
 * The `framing` option a handler for frames of type `T` needs, so that `serve` and `connect`
 * refuse a handler written for other frames: optional for bytes (the default is `raw()`),
 * required for any other frame type, free for a handler written inline without annotations
 * (its events are then `any`).
 */
export type FramingFor<T> =
  // deno-lint-ignore no-explicit-any
  unknown extends T ? { framing?: Framing<any> }
    : [T] extends [Uint8Array] ? { framing?: Framing<T> }
    : { framing: Framing<T> };

/** Bytes or text: what the byte framings accept to send (text is written as UTF-8). */
export type BytesLike = Uint8Array | string;

function writeBytesLike(frame: BytesLike, out: FrameWriter): void {
  if (frame instanceof Uint8Array) out.write(frame);
  else if (typeof frame === "string") out.writeString(frame);
  else throw new TypeError(`cannot send ${typeof frame}: expected Uint8Array or string`);
}

const textEncoder = new TextEncoder();

// ---- Argument checks: a framing is made once, at setup, so it says clearly what is wrong.

/** The options argument of `fn`: undefined (no options) or a plain object. */
function checkOptions<O extends object>(fn: string, options: O | undefined): Partial<O> {
  if (options === undefined) return {};
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw new TypeError(`${fn}: options must be an object, not ${describeValue(options)}`);
  }
  return options;
}

/** `maxLength` of `fn`: a non-negative integer or Infinity; `fallback` when undefined. */
function checkMaxLength(fn: string, maxLength: unknown, fallback: number): number {
  if (maxLength === undefined) return fallback;
  if (typeof maxLength !== "number") {
    throw new TypeError(`${fn}: maxLength must be a number, not ${describeValue(maxLength)}`);
  }
  if (!(maxLength >= 0 && (Number.isInteger(maxLength) || maxLength === Infinity))) {
    throw new RangeError(
      `${fn}: maxLength must be a non-negative integer or Infinity, not ${maxLength}`,
    );
  }
  return maxLength;
}

class RawDecoder implements Decoder<Uint8Array> {
  readonly buffered = 0;
  readonly lends: boolean;
  #lastChunk: Uint8Array | null = null; // lending: the frames lent last (its .buffer is their memory)
  constructor(lends: boolean) {
    this.lends = lends;
  }
  decode(chunk: Uint8Array, emit: (frame: Uint8Array) => void): void {
    if (chunk.length === 0) return;
    if (this.lends) this.#lastChunk = chunk;
    emit(this.lends ? chunk : chunk.slice());
  }
  // As LengthPrefixedDecoder.lentView: a raw frame is its own encoding.
  lentView(frame: Uint8Array, encode: unknown): Uint8Array | undefined {
    return encode === writeBytesLike && frame.buffer === this.#lastChunk?.buffer
      ? frame
      : undefined;
  }
  // As LengthPrefixedDecoder.release.
  release(): boolean {
    this.#lastChunk = null;
    return true;
  }
}

const RAW: Framing<Uint8Array> = {
  name: "raw",
  decoder: () => new RawDecoder(false),
  encode: writeBytesLike as (frame: Uint8Array, out: FrameWriter) => void,
};

const RAW_LENT: Framing<Uint8Array> = {
  ...RAW,
  decoder: () => new RawDecoder(true),
};

/** Whether received frames are lent (the option of {@linkcode raw} and {@linkcode lengthPrefixed}). */
export interface LendOptions {
  /**
   * Lend each received frame to the handler for one step instead of giving it (default
   * `false`). A lent frame is a view of the connection's read memory, valid until the handler's
   * next `yield`: the library then reads into that memory again. Whatever the step does with it
   * is fine (`send(ev.data)` copies it into the output); what must outlive the step, kept in a
   * variable or passed to another connection's `call`, `cast` or `info`, must be a
   * `ev.data.slice()`. A frame kept without `slice()` is overwritten by later input (a later
   * frame read into the same place may even be lent as the very same view). Reading
   * waits for the handler as if `highWaterMark` were 1 (passive mode is unaffected). This saves
   * an allocation and a copy per read, and for frames of 16 KiB and more an allocation per frame
   * (the frame's memory is reused for the next). Anything but a boolean throws a `TypeError`.
   *
   * @example Frames lent are views of the bytes read
   * ```ts
   * import assert from "node:assert/strict";
   * import { decodeFrames, lengthPrefixed } from "./mod.ts";
   * const bytes = new Uint8Array([0, 2, 7, 8, 0, 1, 9]);
   * const [a, b] = decodeFrames(lengthPrefixed(2, { lend: true }), bytes);
   * assert.deepEqual(a, new Uint8Array([7, 8]));
   * assert.equal(a.buffer, bytes.buffer); // not a copy
   * assert.deepEqual(b, new Uint8Array([9]));
   * assert.throws(() => lengthPrefixed(2, { lend: "yes" as unknown as boolean }), TypeError);
   * ```
   */
  lend?: boolean;
}

/** `lend` of `fn`: a boolean, false when undefined. */
function checkLend(fn: string, lend: unknown): boolean {
  if (lend === undefined) return false;
  if (typeof lend !== "boolean") {
    throw new TypeError(`${fn}: lend must be a boolean, not ${describeValue(lend)}`);
  }
  return lend;
}

/**
 * No framing: each chunk is delivered as it was read, and sent data is written as is. With
 * `{ lend: true }` each chunk is lent for one step (see {@linkcode LendOptions}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, raw } from "./mod.ts";
 * const framing = raw();
 * assert.equal(framing.name, "raw");
 * assert.deepEqual(decodeFrames(framing, new Uint8Array([1, 2, 3])), [new Uint8Array([1, 2, 3])]);
 * ```
 */
export function raw(options?: LendOptions): Framing<Uint8Array> {
  return checkLend("raw", checkOptions("raw", options).lend) ? RAW_LENT : RAW;
}

// A frame with at least this much still to come is read straight into its own buffer.
const DIRECT_READ = 16 * 1024;
// Lending: the memory of a frame that spans reads is kept for the next such frame up to this size.
const KEEP_SPARE = 256 * 1024;

class LengthPrefixedDecoder implements Decoder<Uint8Array> {
  readonly #size: 1 | 2 | 4;
  readonly #max: number;
  #header = 0; // header bytes gathered so far, when a header is split across reads
  #headerBytes = 0;
  #frame: Uint8Array | null = null; // a frame being filled across reads
  #filled = 0;
  #heldFrameEnd = -1;
  readonly lends: boolean;
  readonly #encode: unknown; // the encode of the framing this decoder belongs to
  // Lending: the memory of the last large frame, reused for the next one once that is no
  // longer lent (at the next decode call), so that large frames cost no allocation each. A frame
  // in it is preceded by its header, as in a chunk (see lentView).
  #spare: Uint8Array | null = null;
  #spareLent = false; // a frame in #spare was emitted in this decode call
  // Lending: the last chunk decoded (its memory is read only when a lent frame is sent back: a
  // typed array's .buffer costs ~20 ns, too much to read per chunk).
  #lastChunk: Uint8Array | null = null;
  // Lending: the view last lent, made again only when a read puts a frame elsewhere (in
  // ping-pong every read is one frame at the same place: a view allocation per frame saved).
  #lentFrame: Uint8Array | null = null;
  #lentFrameIn: Uint8Array | null = null; // the chunk it is a view of
  #lentFrameAt = 0;

  constructor(size: 1 | 2 | 4, max: number, lends: boolean, encode: unknown) {
    this.#size = size;
    this.#max = max;
    this.lends = lends;
    this.#encode = encode;
  }

  // Memory for a frame of `length` bytes that spans reads. Lending, it is preceded by its header.
  #newFrame(length: number): Uint8Array {
    if (!this.lends) return new Uint8Array(length);
    const n = this.#size;
    let memory = this.#spare;
    if (memory === null || this.#spareLent || memory.length < n + length) {
      memory = new Uint8Array(n + length);
      if (n + length <= KEEP_SPARE) this.#spare = memory;
    }
    for (let k = n - 1, v = length; k >= 0; k--, v = Math.floor(v / 256)) memory[k] = v;
    return memory.subarray(n, n + length);
  }

  /**
   * A frame this decoder lent in its last `decode`, encoded by the framing whose `encode` is
   * `encode`: its header and bytes as they lie in memory, one view, if that is exactly its
   * encoding (the header just before it, intact); else undefined. Lets a connection send a lent
   * frame back without copying it.
   */
  lentView(frame: Uint8Array, encode: unknown): Uint8Array | undefined {
    const buffer = frame.buffer;
    if (
      encode !== this.#encode || frame.length > this.#max ||
      (buffer !== this.#lastChunk?.buffer && buffer !== this.#spare?.buffer)
    ) return undefined;
    const n = this.#size;
    const at = frame.byteOffset - n;
    if (at < 0) return undefined;
    const view = new Uint8Array(buffer, at, n + frame.length);
    for (let k = n - 1, v = frame.length; k >= 0; k--, v = Math.floor(v / 256)) {
      if (view[k] !== (v & 0xff)) return undefined;
    }
    return view;
  }

  /**
   * Forget the memory kept from one read to the next (the last chunk, and the spare unless a
   * frame is being filled in it): its connection hibernates, and an idle connection should hold
   * no read memory. Nothing lent is in use then (a frame is lent for one step). True if the
   * decoder now holds nothing a fresh one would not: the driver may drop it and make a new one
   * when bytes come (an idle connection is then smaller by a decoder).
   */
  release(): boolean {
    this.#lastChunk = this.#lentFrame = this.#lentFrameIn = null;
    if (this.#frame === null) this.#spare = null;
    return this.#frame === null && this.#headerBytes === 0;
  }

  // Hand over a finished frame; a lent one in #spare keeps #spare busy for this call.
  #emitFrame(frame: Uint8Array, emit: (frame: Uint8Array) => void): void {
    if (frame.buffer === this.#spare?.buffer) this.#spareLent = true;
    emit(frame);
  }

  get buffered(): number {
    // A frame in progress holds its header too, so 0 means "at a frame boundary".
    return this.#frame !== null ? this.#size + this.#filled : this.#headerBytes;
  }

  readInto(): Uint8Array | undefined {
    const frame = this.#frame;
    if (frame === null || frame.length - this.#filled < DIRECT_READ) return undefined;
    return frame.subarray(this.#filled);
  }

  get heldFrameEnd(): number {
    return this.#heldFrameEnd;
  }

  take(): Uint8Array {
    const n = this.#size;
    const frame = this.#frame;
    let held: Uint8Array;
    if (frame !== null) {
      held = new Uint8Array(n + this.#filled);
      for (let k = n - 1, v = frame.length; k >= 0; k--, v = Math.floor(v / 256)) held[k] = v;
      held.set(frame.subarray(0, this.#filled), n);
    } else {
      held = new Uint8Array(this.#headerBytes);
      for (let k = held.length - 1, v = this.#header; k >= 0; k--, v = Math.floor(v / 256)) {
        held[k] = v;
      }
    }
    this.#frame = null;
    this.#filled = this.#header = this.#headerBytes = 0;
    return held;
  }

  decode(chunk: Uint8Array, emit: (frame: Uint8Array) => void): void {
    const frame = this.#frame;
    this.#heldFrameEnd = -1;
    this.#spareLent = false; // what was lent before this call is no longer
    if (this.lends) this.#lastChunk = chunk;
    if (
      frame !== null && chunk.buffer === frame.buffer &&
      chunk.byteOffset === frame.byteOffset + this.#filled
    ) {
      // Read in place (see readInto): nothing to copy.
      this.#filled += chunk.length;
      if (this.#filled === frame.length) {
        this.#frame = null;
        this.#filled = 0;
        this.#heldFrameEnd = chunk.length;
        this.#emitFrame(frame, emit);
      }
      return;
    }
    const n = this.#size;
    const end = chunk.length;
    let i = 0;
    let held = frame !== null || this.#headerBytes > 0; // a frame begun in an earlier chunk
    // Whole frames of this chunk are views of one copy of it, made at the first: a buffer
    // allocation per read rather than per frame.
    let copy: Uint8Array | null = null;
    let copyAt = 0;
    while (i < end) {
      const frame = this.#frame;
      if (frame !== null) {
        const take = Math.min(frame.length - this.#filled, end - i);
        frame.set(chunk.subarray(i, i + take), this.#filled);
        this.#filled += take;
        i += take;
        if (this.#filled === frame.length) {
          this.#frame = null;
          this.#filled = 0;
          if (held) {
            held = false;
            this.#heldFrameEnd = i;
          }
          this.#emitFrame(frame, emit);
        }
        continue;
      }
      let length: number;
      if (this.#headerBytes === 0 && end - i >= n) {
        // The common case: a whole header in this chunk.
        length = n === 4
          ? ((chunk[i] << 24) | (chunk[i + 1] << 16) | (chunk[i + 2] << 8) | chunk[i + 3]) >>> 0
          : n === 2
          ? (chunk[i] << 8) | chunk[i + 1]
          : chunk[i];
        i += n;
      } else {
        this.#header = this.#header * 256 + chunk[i++];
        if (++this.#headerBytes < n) continue;
        length = this.#header;
        this.#header = 0;
        this.#headerBytes = 0;
      }
      if (length > this.#max) throw new FrameTooLarge(length, this.#max);
      if (end - i >= length && this.lends) {
        // Lent: a view of the chunk itself, no copy.
        if (held) {
          held = false;
          this.#heldFrameEnd = i + length;
        }
        let lent = this.#lentFrame;
        if (
          lent === null || this.#lentFrameIn !== chunk || this.#lentFrameAt !== i ||
          lent.length !== length
        ) {
          this.#lentFrame = lent = chunk.subarray(i, i + length);
          this.#lentFrameIn = chunk;
          this.#lentFrameAt = i;
        }
        emit(lent);
        i += length;
      } else if (end - i >= length) {
        if (copy === null) {
          copy = chunk.slice(i);
          copyAt = i;
        }
        if (held) {
          held = false;
          this.#heldFrameEnd = i + length;
        }
        emit(copy.subarray(i - copyAt, i - copyAt + length));
        i += length;
      } else {
        const partial = this.#newFrame(length);
        partial.set(chunk.subarray(i), 0);
        this.#frame = partial;
        this.#filled = end - i;
        i = end;
      }
    }
  }
}

/** Options of {@linkcode lengthPrefixed}. */
export interface LengthPrefixedOptions extends LendOptions {
  /**
   * The largest frame accepted or sent, in bytes: a non-negative integer, or `Infinity`. It is
   * capped at what the prefix can express (255 for 1 byte, 65535 for 2, 2³² − 1 for 4), so
   * `Infinity` means "as large as the prefix allows". Default: 8 MiB, or that cap if smaller.
   * Anything else throws at once: a `TypeError` if it is not a number, else a `RangeError`.
   */
  maxLength?: number;
}

/**
 * Frames preceded by their length as a big-endian unsigned integer of 1, 2 or 4 bytes, as
 * Erlang's `{packet, N}`. Frames are `Uint8Array`s; strings are sent as UTF-8.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, encodeFrames, lengthPrefixed } from "./mod.ts";
 * const len4 = lengthPrefixed(4, { maxLength: 1024 });
 * const bytes = encodeFrames(len4, [new Uint8Array([7, 8])]);
 * assert.deepEqual(bytes, new Uint8Array([0, 0, 0, 2, 7, 8]));
 * assert.deepEqual(decodeFrames(len4, bytes), [new Uint8Array([7, 8])]);
 * // Arguments are checked at once.
 * assert.throws(() => lengthPrefixed(3 as 4), RangeError);
 * assert.throws(() => lengthPrefixed(4, { maxLength: -1 }), RangeError);
 * ```
 */
export function lengthPrefixed(
  bytes: 1 | 2 | 4 = 4,
  options?: LengthPrefixedOptions,
): Framing<Uint8Array> {
  if (typeof bytes !== "number") {
    throw new TypeError(
      `lengthPrefixed: bytes must be the number 1, 2 or 4, not ${describeValue(bytes)}`,
    );
  }
  if (bytes !== 1 && bytes !== 2 && bytes !== 4) {
    throw new RangeError(`lengthPrefixed: bytes must be 1, 2 or 4, not ${bytes}`);
  }
  const opts = checkOptions("lengthPrefixed", options);
  const limit = bytes === 4 ? 0xffff_ffff : (1 << (8 * bytes)) - 1;
  const maxLength = Math.min(
    checkMaxLength("lengthPrefixed", opts.maxLength, 8 * 1024 * 1024),
    limit,
  );
  const lend = checkLend("lengthPrefixed", opts.lend);
  const encode = (frame: BytesLike, out: FrameWriter) => {
    const data = typeof frame === "string" ? textEncoder.encode(frame) : frame;
    if (!(data instanceof Uint8Array)) {
      throw new TypeError(`cannot send ${typeof frame}: expected Uint8Array or string`);
    }
    if (data.length > maxLength) throw new FrameTooLarge(data.length, maxLength);
    out.writeUint(data.length, bytes);
    out.write(data);
  };
  return {
    name: `lengthPrefixed(${bytes})`,
    // (The decoder knows its framing's encode: a lent frame sent back with it needs no copy.)
    decoder: () => new LengthPrefixedDecoder(bytes, maxLength, lend, encode),
    encode,
  };
}

const NEWLINE = 10;
const CR = 13;

/**
 * Where the first ill-formed UTF-8 sequence of `bytes` starts, or -1 if there is none. Used
 * only to word the error, once a line has failed to decode.
 */
function firstInvalidUtf8(bytes: Uint8Array): number {
  for (let i = 0; i < bytes.length;) {
    const lead = bytes[i];
    if (lead < 0x80) {
      i++;
      continue;
    }
    // The byte ranges of Unicode's table 3-7 (well-formed UTF-8 byte sequences).
    let need: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (lead >= 0xc2 && lead <= 0xdf) need = 1;
    else if (lead >= 0xe0 && lead <= 0xef) {
      need = 2;
      if (lead === 0xe0) lo = 0xa0; // no overlong forms
      else if (lead === 0xed) hi = 0x9f; // no surrogates
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      need = 3;
      if (lead === 0xf0) lo = 0x90; // no overlong forms
      else if (lead === 0xf4) hi = 0x8f; // nothing above U+10FFFF
    } else return i;
    for (let k = 1; k <= need; k++) {
      const next = bytes[i + k]; // undefined past the end: truncated
      if (!(next >= lo && next <= hi)) return i;
      lo = 0x80;
      hi = 0xbf;
    }
    i += need + 1;
  }
  return -1;
}

// Shared by all connections: without `stream`, a decode call keeps no state. ignoreBOM: a U+FEFF
// that starts a line is data, not a byte-order mark to strip. Every line is decoded by the
// lenient one, which is much faster (about 10× on ASCII) and turns each ill-formed sequence into
// U+FFFD; with invalidUtf8: "error", text that holds a U+FFFD is then checked by the fatal one
// (valid input never decodes to U+FFFD unless it holds one itself).
const lenientUtf8 = new TextDecoder("utf-8", { ignoreBOM: true });
const fatalUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const REPLACEMENT = "\uFFFD";

class LinesDecoder implements Decoder<string> {
  readonly #max: number;
  readonly #fatal: boolean; // invalidUtf8: "error"
  #held = new WriteBuffer(); // the start of a line not yet ended
  #lines = 0; // lines decoded so far, to say which one is bad
  #heldFrameEnd = -1;

  constructor(max: number, fatal: boolean) {
    this.#max = max;
    this.#fatal = fatal;
  }

  get buffered(): number {
    return this.#held.length;
  }

  get heldFrameEnd(): number {
    return this.#heldFrameEnd;
  }

  take(): Uint8Array {
    const held = this.#held.bytes();
    this.#held = new WriteBuffer();
    return held;
  }

  decode(chunk: Uint8Array, emit: (frame: string) => void): void {
    let start = 0;
    let blockTried = false;
    this.#heldFrameEnd = -1;
    for (;;) {
      if (!blockTried && this.#held.length === 0) {
        blockTried = true;
        start = this.#block(chunk, start, emit);
      }
      const nl = chunk.indexOf(NEWLINE, start);
      if (nl < 0) {
        if (start < chunk.length) {
          this.#held.write(chunk.subarray(start));
          const held = this.#held.length;
          // A line of exactly maxLength may be held with the `\r` of its `\r\n` ending.
          if (held > this.#max && !(held === this.#max + 1 && chunk[chunk.length - 1] === CR)) {
            throw new FrameTooLarge(held, this.#max);
          }
        }
        return;
      }
      let line = chunk.subarray(start, nl);
      if (this.#held.length > 0) {
        this.#held.write(line);
        line = this.#held.bytes();
        this.#held = new WriteBuffer();
        this.#heldFrameEnd = nl + 1;
      }
      if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
      if (line.length > this.#max) throw new FrameTooLarge(line.length, this.#max);
      const number = ++this.#lines;
      const text = lenientUtf8.decode(line);
      if (this.#fatal && text.includes(REPLACEMENT)) {
        try {
          fatalUtf8.decode(line);
        } catch (cause) {
          const at = firstInvalidUtf8(line);
          const where = at < 0 ? `line ${number}` : `byte ${at + 1} of line ${number}`;
          throw new MalformedFrame(`invalid UTF-8 at ${where}`, { cause });
        }
      }
      emit(text);
      start = nl + 1;
    }
  }

  // The fast path: every whole line from `start` on, decoded with one call. Returns where it
  // stopped; on a line too long or bad UTF-8 (invalidUtf8: "error") it does nothing, and the
  // line-by-line path emits the good lines before throwing for the bad one. Bad bytes or not,
  // decoding all lines at once gives what decoding each does: "\n" and "\r" are ASCII, never
  // part of a multi-byte sequence, so one cuts short a sequence before it in both cases.
  #block(chunk: Uint8Array, start: number, emit: (frame: string) => void): number {
    const last = chunk.lastIndexOf(NEWLINE);
    if (last <= start) return start;
    for (let p = start; p <= last;) {
      const nl = chunk.indexOf(NEWLINE, p);
      const length = nl > p && chunk[nl - 1] === CR ? nl - p - 1 : nl - p;
      if (length > this.#max) return start;
      p = nl + 1;
    }
    const block = chunk.subarray(start, last);
    const text = lenientUtf8.decode(block);
    if (this.#fatal && text.includes(REPLACEMENT)) {
      try {
        fatalUtf8.decode(block);
      } catch {
        return start;
      }
    }
    const lines = text.split("\n");
    this.#lines += lines.length;
    for (const line of lines) emit(line.endsWith("\r") ? line.slice(0, -1) : line);
    return last + 1;
  }
}

/** Options of {@linkcode lines}. */
export interface LinesOptions {
  /**
   * The longest line accepted or sent, in bytes, without its line ending: a non-negative
   * integer, or `Infinity` for no limit (then a peer that never sends a newline makes its
   * connection hold everything it sends: only for trusted peers). Default: 64 KiB. Anything else
   * throws at once: a `TypeError` if it is not a number, else a `RangeError`.
   */
  maxLength?: number;
  /**
   * What a received line that is not valid UTF-8 does:
   *
   * - `"error"` (the default): ends the connection with {@linkcode MalformedFrame}
   *   (`invalid UTF-8 at byte 3 of line 7`), after every line before it was delivered.
   * - `"replace"`: the line is delivered with each ill-formed sequence replaced by U+FFFD
   *   (`"\uFFFD"`), as `new TextDecoder()` does; the connection goes on.
   *
   * Sent lines are unaffected: a string is always written as UTF-8 (a lone surrogate as U+FFFD).
   * Any other value throws at once: a `TypeError` if it is not a string, else a `RangeError`.
   *
   * @example Replacing bad bytes instead of ending the connection
   * ```ts
   * import assert from "node:assert/strict";
   * import { decodeFrames, lines, MalformedFrame } from "./mod.ts";
   * const bytes = new Uint8Array([0x6f, 0x6b, 0x0a, 0x61, 0xff, 0x62, 0x0a]); // "ok\na\xffb\n"
   * assert.deepEqual(decodeFrames(lines({ invalidUtf8: "replace" }), bytes), ["ok", "a\uFFFDb"]);
   * assert.throws(() => decodeFrames(lines(), bytes), MalformedFrame);
   * ```
   */
  invalidUtf8?: "error" | "replace";
}

/**
 * UTF-8 text lines ended by `\n` or `\r\n`. Frames are strings without the line ending; a sent
 * string gets `\n` appended (`\r\n` if it ends with `\r`, which thus arrives intact). Sending a
 * string that contains `\n` throws a `TypeError`: one frame is one line. Received bytes that
 * are not UTF-8 end the connection with {@linkcode MalformedFrame}, or become U+FFFD with
 * `invalidUtf8: "replace"` (see {@linkcode LinesOptions}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, lines } from "./mod.ts";
 * const text = new TextEncoder().encode("hello\r\nworld\n");
 * assert.deepEqual(decodeFrames(lines(), text), ["hello", "world"]);
 * // Options are checked at once.
 * assert.throws(() => lines({ maxLength: 1.5 }), RangeError);
 * ```
 */
export function lines(options?: LinesOptions): Framing<string> {
  const opts = checkOptions("lines", options);
  const maxLength = checkMaxLength("lines", opts.maxLength, 64 * 1024);
  const invalidUtf8 = opts.invalidUtf8 ?? "error";
  if (invalidUtf8 !== "error" && invalidUtf8 !== "replace") {
    const message = `lines: invalidUtf8 must be "error" or "replace", not ${
      describeValue(invalidUtf8)
    }`;
    throw typeof invalidUtf8 === "string" ? new RangeError(message) : new TypeError(message);
  }
  const fatal = invalidUtf8 === "error";
  return {
    name: "lines",
    decoder: () => new LinesDecoder(maxLength, fatal),
    encode(frame: string, out: FrameWriter) {
      if (typeof frame !== "string") {
        throw new TypeError(`cannot send ${typeof frame} as a line: expected a string`);
      }
      // One frame is one line: a "\n" inside would reach the peer as several.
      if (frame.includes("\n")) throw new TypeError("cannot send a line that contains \\n");
      // Up to 3 UTF-8 bytes per UTF-16 unit: only a long string needs measuring.
      if (frame.length * 3 > maxLength) {
        const bytes = textEncoder.encode(frame);
        if (bytes.length > maxLength) throw new FrameTooLarge(bytes.length, maxLength);
        out.write(bytes);
      } else {
        out.writeString(frame);
      }
      // A line that ends with "\r" gets "\r\n", of which the peer strips only the "\r\n".
      if (frame.charCodeAt(frame.length - 1) === CR) out.writeUint(CR, 1);
      out.writeUint(NEWLINE, 1);
    },
  };
}

/**
 * Encode `frames` with `framing` into one byte array: what a peer would read.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeFrames, lines } from "./mod.ts";
 * const bytes = encodeFrames(lines(), ["a", "b"]);
 * assert.equal(new TextDecoder().decode(bytes), "a\nb\n");
 * ```
 */
export function encodeFrames<T>(framing: Framing<T>, frames: Iterable<T>): Uint8Array {
  const out = new WriteBuffer();
  for (const frame of frames) framing.encode(frame, out);
  return out.bytes();
}

/**
 * Decode `bytes` with a fresh decoder of `framing`, returning the complete frames (an
 * incomplete tail is ignored). Throws the framing's errors on bad input.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, lengthPrefixed } from "./mod.ts";
 * const frames = decodeFrames(lengthPrefixed(1), new Uint8Array([1, 42, 0]));
 * assert.deepEqual(frames, [new Uint8Array([42]), new Uint8Array(0)]);
 * ```
 */
export function decodeFrames<T>(framing: Framing<T>, bytes: Uint8Array): T[] {
  const frames: T[] = [];
  framing.decoder().decode(bytes, (frame) => frames.push(frame));
  return frames;
}
