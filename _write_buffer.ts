// A growable byte buffer that frames are encoded into, so that all the frames of one step go
// out in one write without a buffer allocation per frame.

import type { FrameWriter } from "./framing.ts";

const EMPTY = new Uint8Array(0);
const textEncoder = new TextEncoder();

// Large buffers given up by one connection serve the next that needs one, so that sending big
// frames does not allocate (and zero) a large buffer per write. Bounded: it holds at most this
// many.
const POOL_SIZE = 32;
const pool: Uint8Array[] = [];

function allocate(size: number): Uint8Array {
  for (let i = pool.length - 1; i >= 0; i--) {
    if (pool[i].length >= size) {
      const buf = pool[i];
      pool[i] = pool[pool.length - 1];
      pool.pop();
      return buf;
    }
  }
  return new Uint8Array(size);
}

export class WriteBuffer implements FrameWriter {
  #buf: Uint8Array = EMPTY;
  #len = 0;
  // The last bytes() and the #buf it was cut from (steady traffic writes the same length again;
  // compared by the buffer object: a typed array's .buffer costs ~20 ns to read).
  #view: Uint8Array = EMPTY;
  #viewOf: Uint8Array = EMPTY;

  get length(): number {
    return this.#len;
  }

  /** The bytes written so far (a view: valid until the next write or reset). */
  bytes(): Uint8Array {
    if (this.#viewOf === this.#buf && this.#view.length === this.#len) return this.#view;
    this.#viewOf = this.#buf;
    return this.#view = this.#buf.subarray(0, this.#len);
  }

  /** Forget what was written after the first `length` bytes (an encode that threw part-way). */
  truncate(length: number): void {
    if (length < this.#len) this.#len = length;
  }

  /** Forget the contents; keep the memory unless it grew past `keep` bytes (then it is pooled). */
  reset(keep = Infinity): void {
    this.#len = 0;
    if (this.#buf.length > keep) {
      if (this.#buf.length >= 16 * 1024 && pool.length < POOL_SIZE) pool.push(this.#buf);
      this.#buf = this.#view = this.#viewOf = EMPTY;
    }
  }

  #reserve(extra: number): void {
    const need = this.#len + extra;
    if (need <= this.#buf.length) return;
    const grown = allocate(Math.max(need, this.#buf.length * 2, 256));
    grown.set(this.#buf.subarray(0, this.#len));
    this.#buf = grown;
  }

  write(bytes: Uint8Array): void {
    this.#reserve(bytes.length);
    this.#buf.set(bytes, this.#len);
    this.#len += bytes.length;
  }

  writeString(text: string): void {
    // UTF-8 takes at most 3 bytes per UTF-16 code unit.
    this.#reserve(text.length * 3);
    this.#len += textEncoder.encodeInto(text, this.#buf.subarray(this.#len)).written;
  }

  writeUint(value: number, bytes: 1 | 2 | 4): void {
    this.#reserve(bytes);
    const buf = this.#buf;
    let at = this.#len;
    if (bytes === 4) {
      buf[at++] = value >>> 24;
      buf[at++] = value >>> 16;
    }
    if (bytes >= 2) buf[at++] = value >>> 8;
    buf[at++] = value;
    this.#len = at;
  }
}
