/**
 * How a byte stream is cut into frames and frames are turned back into bytes: `raw()`,
 * `lengthPrefixed()`, `lines()`, or any object with the {@linkcode Framing} interface.
 *
 * @module
 */

import { FrameTooLarge, MalformedFrame } from "./errors.ts";
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
  /** Bytes held for a frame not yet complete. */
  readonly buffered: number;
  /**
   * Optional: the rest of a large frame in progress, for the next read to fill in place (saving
   * a copy). The caller then passes the filled part of that same view to `decode`.
   */
  readInto?(): Uint8Array | undefined;
}

/**
 * A way to cut a byte stream into frames of type `T` and to write frames back.
 *
 * @example A framing of fixed 2-byte frames
 * ```ts
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
 * console.assert(decodeFrames(pairs, new Uint8Array([1, 2, 3, 4])).length === 2);
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

/** Bytes or text: what the byte framings accept to send (text is written as UTF-8). */
export type BytesLike = Uint8Array | string;

function writeBytesLike(frame: BytesLike, out: FrameWriter): void {
  if (frame instanceof Uint8Array) out.write(frame);
  else if (typeof frame === "string") out.writeString(frame);
  else throw new TypeError(`cannot send ${typeof frame}: expected Uint8Array or string`);
}

const textEncoder = new TextEncoder();

class RawDecoder implements Decoder<Uint8Array> {
  readonly buffered = 0;
  decode(chunk: Uint8Array, emit: (frame: Uint8Array) => void): void {
    if (chunk.length > 0) emit(chunk.slice());
  }
}

const RAW: Framing<Uint8Array> = {
  name: "raw",
  decoder: () => new RawDecoder(),
  encode: writeBytesLike as (frame: Uint8Array, out: FrameWriter) => void,
};

/**
 * No framing: each chunk is delivered as it was read, and sent data is written as is.
 *
 * @example
 * ```ts
 * import { raw, serve } from "./mod.ts";
 * const framing = raw();
 * console.assert(framing.name === "raw");
 * ```
 */
export function raw(): Framing<Uint8Array> {
  return RAW;
}

// A frame with at least this much still to come is read straight into its own buffer.
const DIRECT_READ = 16 * 1024;

class LengthPrefixedDecoder implements Decoder<Uint8Array> {
  readonly #size: 1 | 2 | 4;
  readonly #max: number;
  #header = 0; // header bytes gathered so far, when a header is split across reads
  #headerBytes = 0;
  #frame: Uint8Array | null = null; // a frame being filled across reads
  #filled = 0;

  constructor(size: 1 | 2 | 4, max: number) {
    this.#size = size;
    this.#max = max;
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

  decode(chunk: Uint8Array, emit: (frame: Uint8Array) => void): void {
    const frame = this.#frame;
    if (
      frame !== null && chunk.buffer === frame.buffer &&
      chunk.byteOffset === frame.byteOffset + this.#filled
    ) {
      // Read in place (see readInto): nothing to copy.
      this.#filled += chunk.length;
      if (this.#filled === frame.length) {
        this.#frame = null;
        this.#filled = 0;
        emit(frame);
      }
      return;
    }
    const n = this.#size;
    const end = chunk.length;
    let i = 0;
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
          emit(frame);
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
      if (end - i >= length) {
        if (copy === null) {
          copy = chunk.slice(i);
          copyAt = i;
        }
        emit(copy.subarray(i - copyAt, i - copyAt + length));
        i += length;
      } else {
        const partial = new Uint8Array(length);
        partial.set(chunk.subarray(i), 0);
        this.#frame = partial;
        this.#filled = end - i;
        i = end;
      }
    }
  }
}

/** Options of {@linkcode lengthPrefixed}. */
export interface LengthPrefixedOptions {
  /** The largest frame accepted or sent, in bytes (default: 8 MiB, or what the prefix can express). */
  maxLength?: number;
}

/**
 * Frames preceded by their length as a big-endian unsigned integer of 1, 2 or 4 bytes, as
 * Erlang's `{packet, N}`. Frames are `Uint8Array`s; strings are sent as UTF-8.
 *
 * @example
 * ```ts
 * import { decodeFrames, encodeFrames, lengthPrefixed } from "./mod.ts";
 * const len4 = lengthPrefixed(4, { maxLength: 1024 });
 * const bytes = encodeFrames(len4, [new Uint8Array([7, 8])]);
 * console.assert(bytes.length === 6 && decodeFrames(len4, bytes)[0][1] === 8);
 * ```
 */
export function lengthPrefixed(
  bytes: 1 | 2 | 4 = 4,
  options: LengthPrefixedOptions = {},
): Framing<Uint8Array> {
  if (bytes !== 1 && bytes !== 2 && bytes !== 4) {
    throw new RangeError(`lengthPrefixed takes 1, 2 or 4 bytes, not ${bytes}`);
  }
  const limit = bytes === 4 ? 0xffff_ffff : (1 << (8 * bytes)) - 1;
  const maxLength = Math.min(options.maxLength ?? 8 * 1024 * 1024, limit);
  if (!(maxLength >= 0)) throw new RangeError(`maxLength must be >= 0, not ${options.maxLength}`);
  return {
    name: `lengthPrefixed(${bytes})`,
    decoder: () => new LengthPrefixedDecoder(bytes, maxLength),
    encode(frame: BytesLike, out: FrameWriter) {
      const data = typeof frame === "string" ? textEncoder.encode(frame) : frame;
      if (!(data instanceof Uint8Array)) {
        throw new TypeError(`cannot send ${typeof frame}: expected Uint8Array or string`);
      }
      if (data.length > maxLength) throw new FrameTooLarge(data.length, maxLength);
      out.writeUint(data.length, bytes);
      out.write(data);
    },
  };
}

const NEWLINE = 10;
const CR = 13;

class LinesDecoder implements Decoder<string> {
  readonly #max: number;
  // ignoreBOM: a U+FEFF that starts a line is data, not a byte-order mark to strip.
  readonly #text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  #held = new WriteBuffer(); // the start of a line not yet ended

  constructor(max: number) {
    this.#max = max;
  }

  get buffered(): number {
    return this.#held.length;
  }

  decode(chunk: Uint8Array, emit: (frame: string) => void): void {
    let start = 0;
    let blockTried = false;
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
      }
      if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
      if (line.length > this.#max) throw new FrameTooLarge(line.length, this.#max);
      let text: string;
      try {
        text = this.#text.decode(line);
      } catch (cause) {
        throw new MalformedFrame("line is not valid UTF-8", { cause });
      }
      emit(text);
      start = nl + 1;
    }
  }

  // The fast path: every whole line from `start` on, decoded with one call. Returns where it
  // stopped; on a line too long or bad UTF-8 it does nothing, and the line-by-line path emits
  // the good lines before throwing for the bad one.
  #block(chunk: Uint8Array, start: number, emit: (frame: string) => void): number {
    const last = chunk.lastIndexOf(NEWLINE);
    if (last <= start) return start;
    for (let p = start; p <= last;) {
      const nl = chunk.indexOf(NEWLINE, p);
      const length = nl > p && chunk[nl - 1] === CR ? nl - p - 1 : nl - p;
      if (length > this.#max) return start;
      p = nl + 1;
    }
    let text: string;
    try {
      text = this.#text.decode(chunk.subarray(start, last));
    } catch {
      return start;
    }
    for (const line of text.split("\n")) emit(line.endsWith("\r") ? line.slice(0, -1) : line);
    return last + 1;
  }
}

/** Options of {@linkcode lines}. */
export interface LinesOptions {
  /** The longest line accepted or sent, in bytes, without its line ending (default 64 KiB). */
  maxLength?: number;
}

/**
 * UTF-8 text lines ended by `\n` or `\r\n`. Frames are strings without the line ending; a sent
 * string gets `\n` appended (`\r\n` if it ends with `\r`, which thus arrives intact). Sending a
 * string that contains `\n` throws a `TypeError`: one frame is one line.
 *
 * @example
 * ```ts
 * import { decodeFrames, lines } from "./mod.ts";
 * const text = new TextEncoder().encode("hello\r\nworld\n");
 * console.assert(decodeFrames(lines(), text).join(",") === "hello,world");
 * ```
 */
export function lines(options: LinesOptions = {}): Framing<string> {
  const maxLength = options.maxLength ?? 64 * 1024;
  if (!(maxLength >= 0)) throw new RangeError(`maxLength must be >= 0, not ${maxLength}`);
  return {
    name: "lines",
    decoder: () => new LinesDecoder(maxLength),
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
 * import { encodeFrames, lines } from "./mod.ts";
 * const bytes = encodeFrames(lines(), ["a", "b"]);
 * console.assert(new TextDecoder().decode(bytes) === "a\nb\n");
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
 * import { decodeFrames, lengthPrefixed } from "./mod.ts";
 * const frames = decodeFrames(lengthPrefixed(1), new Uint8Array([1, 42, 0]));
 * console.assert(frames.length === 2 && frames[0][0] === 42 && frames[1].length === 0);
 * ```
 */
export function decodeFrames<T>(framing: Framing<T>, bytes: Uint8Array): T[] {
  const frames: T[] = [];
  framing.decoder().decode(bytes, (frame) => frames.push(frame));
  return frames;
}
