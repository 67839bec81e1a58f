// The frame format the load clients send and verify: a 4-byte big-endian
// length, then a payload that starts with the frame's sequence number.
// Clients only (node:buffer's memcmp costs a server ~7 MB of RSS).
import { Buffer } from "node:buffer";
import { writeAll } from "./_common.ts";

/** Length prefix: 4 bytes, big-endian (the library's `lengthPrefixed(4)`). */
export const HEADER = 4;
/** Smallest payload: it starts with the frame's 32-bit sequence number. */
export const MIN_SIZE = 4;

/**
 * Payload bytes after the sequence number come from this 256-periodic table,
 * starting at an offset derived from the sequence number: a frame echoed to
 * the wrong place or shifted by a byte fails the check, and the check itself
 * is one memcmp against the table.
 */
export function makePattern(size: number): Uint8Array {
  const p = new Uint8Array(size + 256);
  for (let i = 0; i < p.length; i++) p[i] = (i * 31 + 7) & 255;
  return p;
}

/** Writes frame `seq` (header + `size`-byte payload) into `dst` at `at`. */
export function writeFrame(
  dst: Uint8Array,
  at: number,
  seq: number,
  size: number,
  pattern: Uint8Array,
): void {
  writeU32(dst, at, size);
  writeU32(dst, at + HEADER, seq);
  const from = (seq & 255) + MIN_SIZE;
  dst.set(pattern.subarray(from, from + size - MIN_SIZE), at + HEADER + MIN_SIZE);
}

/** True if the `size`-byte payload at `buf[at]` is exactly frame `seq`. */
export function checkPayload(
  buf: Uint8Array,
  at: number,
  seq: number,
  size: number,
  pattern: Uint8Array,
): boolean {
  if (readU32(buf, at) !== seq >>> 0) return false;
  const from = (seq & 255) + MIN_SIZE;
  const n = size - MIN_SIZE;
  // Native memcmp pays off only past a few dozen bytes.
  if (n > 64) {
    return Buffer.compare(
      buf.subarray(at + MIN_SIZE, at + size),
      pattern.subarray(from, from + n),
    ) === 0;
  }
  for (let i = 0; i < n; i++) {
    if (buf[at + MIN_SIZE + i] !== pattern[from + i]) return false;
  }
  return true;
}

function writeU32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}

function readU32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>>
    0;
}

/** The echo differs from what was sent: counted as corrupt, not as an error. */
export class CorruptFrame extends Error {
  override name = "CorruptFrame";
}

/** Checks that the frame at payload offset `at` (length `len`) is frame `seq`
 * of `size` bytes; throws CorruptFrame if not. */
export function expectFrame(
  r: FrameReader,
  at: number,
  seq: number,
  size: number,
  pattern: Uint8Array,
): void {
  if (r.len !== size || !checkPayload(r.buf, at, seq, size, pattern)) {
    throw new CorruptFrame(`frame ${seq}: wrong echo`);
  }
}

/**
 * Reassembles length-prefixed frames from arbitrary splits. The socket reads
 * straight into `space()` (no copy per read); `next()` returns the payload
 * offset of the next complete frame (its length in `len`) or -1.
 */
export class FrameReader {
  buf: Uint8Array;
  len = 0;
  #start = 0;
  #end = 0;

  /** `maxLength`: the longest frame expected; a longer header is corrupt. */
  constructor(capacity: number, readonly maxLength: number) {
    this.buf = new Uint8Array(capacity);
  }

  /** Free space to read into: compacts, or grows for a large frame. */
  space(): Uint8Array {
    if (this.#start === this.#end) this.#start = this.#end = 0;
    const free = this.buf.length - this.#end;
    if (free < 4096 || free < this.#need()) {
      const used = this.#end - this.#start;
      const want = Math.max(used + 4096, this.#need() + used);
      if (want > this.buf.length) {
        const bigger = new Uint8Array(Math.max(want, this.buf.length * 2));
        bigger.set(this.buf.subarray(this.#start, this.#end));
        this.buf = bigger;
      } else {
        this.buf.copyWithin(0, this.#start, this.#end);
      }
      this.#start = 0;
      this.#end = used;
    }
    return this.buf.subarray(this.#end);
  }

  commit(n: number): void {
    this.#end += n;
  }

  /** Payload offset of the next whole frame, -1 if none yet; throws
   * CorruptFrame on a length beyond `maxLength` (no waiting for it). */
  next(): number {
    const avail = this.#end - this.#start;
    if (avail < HEADER) return -1;
    const len = readU32(this.buf, this.#start);
    if (len > this.maxLength) throw new CorruptFrame(`frame length ${len}`);
    if (avail < HEADER + len) return -1;
    const at = this.#start + HEADER;
    this.#start = at + len;
    this.len = len;
    return at;
  }

  // Bytes still missing for the frame at the head (0 if its header is short).
  #need(): number {
    const avail = this.#end - this.#start;
    if (avail < HEADER) return 0;
    return Math.min(HEADER + readU32(this.buf, this.#start), this.maxLength) -
      avail;
  }
}

/** Sends frame `seq` alone and waits for its echo (accept rate, idle). */
export async function echoOne(
  conn: Deno.Conn,
  seq: number,
  size: number,
  pattern: Uint8Array,
): Promise<void> {
  const frame = new Uint8Array(HEADER + size);
  writeFrame(frame, 0, seq, size, pattern);
  await writeAll(conn, frame);
  const r = new FrameReader(frame.length, size);
  let at;
  while ((at = r.next()) < 0) {
    const n = await conn.read(r.space());
    if (n === null) throw new Error(`frame ${seq}: closed before its echo`);
    r.commit(n);
  }
  expectFrame(r, at, seq, size, pattern);
}
