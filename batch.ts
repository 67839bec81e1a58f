/**
 * `batch(framing)`: the frames of one read, delivered to the handler together, as one array.
 *
 * @module
 */

import type { Decoder, FrameWriter, Framing } from "./framing.ts";

class BatchDecoder<T> implements Decoder<T[]> {
  readonly #inner: Decoder<T>;
  #frames: T[] = [];
  readonly #add = (frame: T) => this.#frames.push(frame);
  #heldFrameEnd: number | undefined = -1;
  readonly lends: boolean | undefined;
  readonly take?: () => Uint8Array;

  constructor(inner: Decoder<T>) {
    this.#inner = inner;
    this.lends = inner.lends;
    // What a framing switch needs (setFraming) is passed through where the inner decoder has it.
    if (inner.take !== undefined) this.take = () => inner.take!();
  }

  get buffered(): number {
    return this.#inner.buffered;
  }

  // For setFraming: the batch is the frame. If the last decode finished a frame begun in an
  // earlier chunk, its batch ends where the bytes still held (the last `buffered` ones) begin.
  get heldFrameEnd(): number | undefined {
    return this.#heldFrameEnd;
  }

  readInto(): Uint8Array | undefined {
    return this.#inner.readInto?.();
  }

  decode(chunk: Uint8Array, emit: (frames: T[]) => void): void {
    const inner = this.#inner;
    const frames: T[] = this.#frames = [];
    try {
      inner.decode(chunk, this.#add);
    } finally {
      const held = inner.heldFrameEnd;
      this.#heldFrameEnd = held === undefined || held < 0 ? held : chunk.length - inner.buffered;
      // Bad input after good frames: the good ones first, then the error, as without batch().
      if (frames.length > 0) emit(frames);
    }
  }
}

/**
 * The frames of each read handed to the handler together: one `packet` event whose `data` is
 * the array of the frames `framing` decoded from that read (never empty), instead of one event
 * per frame. Sending takes an array too, written as `framing` writes each frame (`send([])`
 * writes nothing). Pipelined traffic then costs one step per read rather than one per frame;
 * the handler's type is `HandlerGenerator<F[]>`. Bad input is reported as without it: a
 * `frameError` event after a last batch of the frames before it. `maxLength` and the like are the
 * inner framing's; lent frames (`lend: true`) are lent for the step that gets their batch.
 *
 * @example Frames of one read in one event
 * ```ts
 * import assert from "node:assert/strict";
 * import { batch, decodeFrames, encodeFrames, lines } from "./mod.ts";
 * const framing = batch(lines());
 * const bytes = new TextEncoder().encode("a\nb\nc");
 * assert.deepEqual(decodeFrames(framing, bytes), [["a", "b"]]); // "c" is not a whole line yet
 * assert.equal(new TextDecoder().decode(encodeFrames(framing, [["x", "y"]])), "x\ny\n");
 * assert.throws(() => encodeFrames(framing, ["x" as unknown as string[]]), TypeError);
 * ```
 *
 * @example An echo that answers each read in one step
 * ```ts
 * import { batch, type HandlerGenerator, lengthPrefixed, send, serve } from "./mod.ts";
 * const server = await serve(async function* (): HandlerGenerator<Uint8Array[]> {
 *   for (let ev = yield; ev.type === "packet";) ev = yield send(ev.data);
 * }, { port: 0, framing: batch(lengthPrefixed(4)) });
 * await server.stop();
 * ```
 */
export function batch<T>(framing: Framing<T>): Framing<T[]> {
  return {
    name: `batch(${framing.name})`,
    decoder: () => new BatchDecoder(framing.decoder()),
    encode(frames: T[], out: FrameWriter) {
      if (!Array.isArray(frames)) {
        throw new TypeError(
          `cannot send ${typeof frames} over ${framing.name} in batch(): send an array of frames`,
        );
      }
      for (let i = 0; i < frames.length; i++) framing.encode(frames[i], out);
    },
  };
}
