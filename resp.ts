/**
 * `resp()`: RESP, the protocol of Redis (RESP2, and the RESP3 types a client asks for with
 * `HELLO 3`), as a framing, for servers that speak Redis and for Redis clients.
 *
 * @module
 */

import { FrameTooLarge, MalformedFrame } from "./errors.ts";
import type { Decoder, FrameWriter, Framing, LendOptions } from "./framing.ts";
import { OptionCheck } from "./_options.ts";

/**
 * A RESP value: what {@linkcode resp} decodes a frame into, and what it sends. How each RESP type
 * maps, read and written:
 *
 * | RESP                               | decoded as                   | sent from                                        |
 * | ---------------------------------- | ---------------------------- | ------------------------------------------------ |
 * | bulk string `$`                    | `Uint8Array`                 | `Uint8Array`, or a `string` (as UTF-8)           |
 * | simple string `+`                  | `string`                     | {@linkcode RespSimpleString}                     |
 * | error `-`, blob error `!` (RESP3)  | {@linkcode RespError}        | {@linkcode RespError} (always as `-`)            |
 * | integer `:`                        | `number` (`bigint` past 2⁵³) | an integral `number` (safe), a `bigint` in int64 |
 * | array `*`                          | an array                     | an array                                         |
 * | null (`$-1`, `*-1`, RESP3 `_`)     | `null`                       | `null` (as `$-1`, which RESP3 clients read too)  |
 * | RESP3 double `,`                   | `number`                     | a `number` that is not a safe integer            |
 * | RESP3 boolean `#`                  | `boolean`                    | `boolean`                                        |
 * | RESP3 big number `(`               | `bigint`                     | a `bigint` outside int64                         |
 * | RESP3 verbatim string `=`          | `string` (the text)          | —                                                |
 * | RESP3 map `%`, set `~`             | `Map`, `Set`                 | `Map`, `Set`                                     |
 * | RESP3 push `>`                     | {@linkcode RespPush}         | {@linkcode RespPush}                             |
 * | RESP3 attribute `\|`               | skipped (the value after it) | —                                                |
 *
 * The RESP3 types are for a peer that asked for them (`HELLO 3`): a RESP2 client cannot read them.
 */
export type RespValue =
  | Uint8Array
  | string
  | number
  | bigint
  | boolean
  | null
  | RespSimpleString
  | RespError
  | RespPush
  | RespValue[]
  | Map<RespValue, RespValue>
  | Set<RespValue>;

const textEncoder = new TextEncoder();
const utf8 = new TextDecoder("utf-8", { ignoreBOM: true });

/**
 * A RESP simple string (`+OK`): a status reply, text without `\r` or `\n`. Its bytes are
 * encoded once and kept, so a constant reply costs one copy per send.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeFrames, resp, RespSimpleString } from "./mod.ts";
 * const OK = new RespSimpleString("OK");
 * assert.equal(new TextDecoder().decode(encodeFrames(resp(), [OK])), "+OK\r\n");
 * assert.throws(() => new RespSimpleString("two\nlines"), TypeError);
 * ```
 */
export class RespSimpleString {
  /** The text. */
  readonly value: string;
  #wire: Uint8Array | undefined;
  /** Make one; throws a `TypeError` if `value` is not a string or holds `\r` or `\n`. */
  constructor(value: string) {
    if (typeof value !== "string") {
      throw new TypeError(`a RESP simple string must be a string, not ${typeof value}`);
    }
    if (/[\r\n]/.test(value)) {
      throw new TypeError("a RESP simple string cannot hold \\r or \\n");
    }
    this.value = value;
  }
  /** The encoded frame, `+value\r\n`. */
  get wire(): Uint8Array {
    return this.#wire ??= textEncoder.encode(`+${this.value}\r\n`);
  }
}

/**
 * A RESP error reply (`-ERR unknown command`), received or to send. `message` is the whole
 * text, code included; {@linkcode RespError.code} is its first word. Decoded errors are values,
 * not thrown: a reply can be an error.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, resp, RespError } from "./mod.ts";
 * const [err] = decodeFrames(resp(), new TextEncoder().encode("-WRONGTYPE not a string\r\n"));
 * assert.ok(err instanceof RespError);
 * assert.equal(err.code, "WRONGTYPE");
 * assert.equal(err.message, "WRONGTYPE not a string");
 * ```
 */
export class RespError extends Error {
  #wire: Uint8Array | undefined;
  /** Make one with the error's text, such as `"ERR syntax error"`. */
  constructor(message: string) {
    super(message);
    this.name = "RespError";
  }
  /** The error's code: the first word of the message (`ERR`, `WRONGTYPE`, `NOPROTO`, …). */
  get code(): string {
    const space = this.message.indexOf(" ");
    return space < 0 ? this.message : this.message.slice(0, space);
  }
  /** The encoded frame, `-message\r\n` (a `\r` or `\n` in the message sent as a space). */
  get wire(): Uint8Array {
    return this.#wire ??= textEncoder.encode(`-${this.message.replace(/[\r\n]/g, " ")}\r\n`);
  }
}

/**
 * A RESP3 push (`>`): data the server sends of its own accord, such as a Pub/Sub message to a
 * client that asked for RESP3. Only for such a client: RESP2 clients get Pub/Sub messages as
 * arrays.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeFrames, resp, RespPush } from "./mod.ts";
 * const push = new RespPush(["message", "news", "hello"]);
 * const wire = new TextDecoder().decode(encodeFrames(resp(), [push]));
 * assert.equal(wire, ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n");
 * ```
 */
export class RespPush {
  /** The pushed values (for Pub/Sub: the kind, the channel, the message). */
  readonly values: RespValue[];
  /** Make one from its values. */
  constructor(values: RespValue[]) {
    this.values = values;
  }
}

/**
 * Options of {@linkcode resp}. With `lend: true` (see {@linkcode LendOptions}), a bulk string
 * whole in one read, and an inline command's arguments, are views of the read itself, valid for
 * the handler's step: `slice()` what you keep.
 */
export interface RespOptions extends LendOptions {
  /**
   * The largest frame accepted, in bytes, counting everything in it (so it bounds each bulk
   * string too): a non-negative integer, or `Infinity`. A frame is refused with
   * {@linkcode FrameTooLarge} as soon as it is known to be larger: when a bulk string's
   * announced length, or an aggregate's announced count at 3 bytes an element, says so, or once
   * its bytes so far pass it. Sending is not limited. Default: 8 MiB.
   */
  maxLength?: number;
  /** How deeply aggregates (arrays, maps, sets, pushes) may nest, at least 1. Default: 16. */
  maxDepth?: number;
  /**
   * Accept inline commands, as a Redis server does (so `nc` and telnet work): a frame that does
   * not start with `*` is a line of space-separated arguments, with Redis's quoting (`"a b"`,
   * `"\x41\n"`, `'it\'s'`), decoded as an array of `Uint8Array`s; an empty line is skipped. For servers; a client reading replies leaves it off (the default), so that a
   * byte that starts no RESP type is a {@linkcode MalformedFrame}.
   */
  inline?: boolean;
}

// ---- Bytes -----------------------------------------------------------------------------------

const CR = 13;
const LF = 10;
const STAR = 42; // *
const DOLLAR = 36; // $
const PLUS = 43; // +
const MINUS = 45; // -
const COLON = 58; // :
const UNDERSCORE = 95; // _
const HASH = 35; // #
const COMMA = 44; // ,
const PAREN = 40; // (
const BANG = 33; // !
const EQUALS = 61; // =
const PERCENT = 37; // %
const TILDE = 126; // ~
const GREATER = 62; // >
const PIPE = 124; // |
const INLINE = 0; // not a type byte: the line is an inline command

/** How an aggregate's or a bulk string's length is named in errors (Redis's words for `*` and `$`). */
function lengthName(type: number): string {
  switch (type) {
    case STAR:
      return "multibulk";
    case DOLLAR:
      return "bulk";
    case PERCENT:
      return "map";
    case TILDE:
      return "set";
    case GREATER:
      return "push";
    case PIPE:
      return "attribute";
    case BANG:
      return "blob error";
    default:
      return "verbatim string";
  }
}

/** What a `$`, `!` or `=` value is called in errors. */
function bulkName(type: number): string {
  return type === DOLLAR ? "bulk string" : type === BANG ? "blob error" : "verbatim string";
}

function showByte(byte: number): string {
  return byte >= 0x20 && byte < 0x7f
    ? `'${String.fromCharCode(byte)}'`
    : `'\\x${byte.toString(16).padStart(2, "0")}'`;
}

// ---- Decoding --------------------------------------------------------------------------------

/** What the decoder is reading. */
const enum Reading {
  /** The type byte of a value (or, for inline commands, the first byte of a line). */
  Type,
  /** The rest of a line, after its type byte. */
  Line,
  /** The body of a bulk string. */
  Bulk,
  /** The `\r\n` after a bulk string's body. */
  BulkEnd,
}

/** An aggregate being filled: one per level of nesting, kept and reused. */
interface Level {
  type: number;
  remaining: number; // elements still to come (a map or attribute: keys and values)
  items: RespValue[] | null; // array, push
  map: Map<RespValue, RespValue> | null;
  set: Set<RespValue> | null;
  key: RespValue; // a map's key, waiting for its value
  hasKey: boolean;
}

// Not values: `#line` started an aggregate or a bulk string (PENDING), or read an empty inline
// line (SKIPPED).
const PENDING = Symbol("pending");
const SKIPPED = Symbol("skipped");
type Step = RespValue | typeof PENDING | typeof SKIPPED;

// A bulk string with at least this much still to come is read straight into its own buffer.
const DIRECT_READ = 16 * 1024;

class RespDecoder implements Decoder<RespValue> {
  readonly lends: boolean;
  readonly #max: number;
  readonly #maxDepth: number;
  readonly #inline: boolean;
  #reading = Reading.Type;
  #frameBytes = 0; // bytes of the frame in progress from earlier chunks
  #lineType = 0; // the type of the line being read
  #held: Uint8Array = EMPTY; // the start of a line split across reads
  #heldLength = 0;
  #bulkType = 0; // $, ! or =
  #bulkLength = 0;
  #bulk: Uint8Array | null = null; // a bulk string filled across reads
  #bulkFilled = 0;
  #crlfSeen = 0; // of the \r\n after a bulk string (0 outside BulkEnd)
  readonly #levels: Level[] = [];
  #depth = 0;
  // With lends: pairs (array, index) of the views of the current chunk put in arrays of the
  // frame in progress.
  readonly #lent: unknown[] = [];

  constructor(max: number, maxDepth: number, inline: boolean, lends: boolean) {
    this.lends = lends;
    this.#max = max;
    this.#maxDepth = maxDepth;
    this.#inline = inline;
  }

  get buffered(): number {
    return this.#frameBytes;
  }

  readInto(): Uint8Array | undefined {
    const bulk = this.#bulk;
    if (
      this.#reading !== Reading.Bulk || bulk === null ||
      bulk.length - this.#bulkFilled < DIRECT_READ
    ) return undefined;
    return bulk.subarray(this.#bulkFilled);
  }

  decode(chunk: Uint8Array, emit: (frame: RespValue) => void): void {
    const bulk = this.#bulk;
    if (
      bulk !== null && this.#reading === Reading.Bulk && chunk.buffer === bulk.buffer &&
      chunk.byteOffset === bulk.byteOffset + this.#bulkFilled
    ) {
      // Read in place (see readInto): nothing to copy.
      this.#bulkFilled += chunk.length;
      this.#frameBytes += chunk.length;
      if (this.#bulkFilled === bulk.length) this.#reading = Reading.BulkEnd;
      return;
    }
    const end = chunk.length;
    let i = 0;
    let start = 0; // where this chunk's part of the frame in progress starts
    // Bulk strings whole in this chunk are views of one copy of it, made at the first: a buffer
    // allocation per read rather than per string.
    let copy: Uint8Array | null = null;
    let copyAt = 0;
    while (i < end) {
      let value: RespValue | typeof PENDING | typeof SKIPPED;
      switch (this.#reading) {
        case Reading.Type: {
          const type = chunk[i];
          if (this.#inline && this.#depth === 0 && type !== STAR) {
            this.#lineType = INLINE; // the byte is the line's first
          } else {
            if (!isType(type)) {
              throw new MalformedFrame(`expected a RESP type, got ${showByte(type)}`);
            }
            if (type === DOLLAR || type === STAR) {
              // The common headers, "$3\r\n" and "*3\r\n", read on the spot when whole here.
              let k = i + 1;
              let n = 0;
              for (; k < end && k - i <= 15; k++) {
                const digit = chunk[k] - 0x30;
                if (digit < 0 || digit > 9) break;
                n = n * 10 + digit;
              }
              if (k > i + 1 && k + 1 < end && chunk[k] === CR && chunk[k + 1] === LF) {
                const size = this.#frameBytes + k + 2 - start;
                if (size > this.#max) throw new FrameTooLarge(size, this.#max);
                this.#lineType = type;
                i = k + 2;
                value = type === DOLLAR
                  ? this.#startBulk(type, n, size)
                  : this.#startAggregate(type, n, size);
                if (value === PENDING) continue;
                break;
              }
            }
            this.#lineType = type;
            i++;
          }
          this.#reading = Reading.Line;
          continue;
        }
        case Reading.Line: {
          const nl = chunk.indexOf(LF, i);
          if (nl < 0) {
            this.#hold(chunk, i, end);
            const size = this.#frameBytes + end - start;
            if (size > this.#max) throw new FrameTooLarge(size, this.#max);
            i = end;
            continue;
          }
          const size = this.#frameBytes + nl + 1 - start;
          if (size > this.#max) throw new FrameTooLarge(size, this.#max);
          if (this.#heldLength === 0) {
            value = this.#line(chunk, i, nl, size);
          } else {
            this.#hold(chunk, i, nl);
            const held = this.#held;
            const length = this.#heldLength;
            this.#held = EMPTY;
            this.#heldLength = 0;
            value = this.#line(held, 0, length, size);
          }
          i = nl + 1;
          if (value === PENDING) continue;
          if (value === SKIPPED) {
            this.#frameBytes = 0; // an empty inline line: no frame
            start = i;
            continue;
          }
          break;
        }
        case Reading.Bulk: {
          const need = this.#bulkLength - this.#bulkFilled;
          if (this.#bulk === null && end - i >= need + 2) {
            // The whole body and its \r\n are here.
            if (chunk[i + need] !== CR || chunk[i + need + 1] !== LF) {
              throw new MalformedFrame(`${bulkName(this.#bulkType)} not ended by \\r\\n`);
            }
            if (this.lends && this.#bulkType === DOLLAR && this.#mayLend()) {
              value = chunk.subarray(i, i + need);
              // Remember where it goes, to copy it if its frame is not done by the end of
              // this chunk (the chunk is the caller's to reuse then).
              if (this.#depth > 0) {
                const items = this.#levels[this.#depth - 1].items;
                if (items !== null) this.#lent.push(items, items.length);
              }
            } else {
              if (copy === null) {
                copy = chunk.slice(i);
                copyAt = i;
              }
              value = this.#bulkValue(copy.subarray(i - copyAt, i - copyAt + need));
            }
            i += need + 2;
            this.#reading = Reading.Type;
            break;
          }
          const body = this.#bulk ??= new Uint8Array(this.#bulkLength);
          const take = Math.min(need, end - i);
          body.set(chunk.subarray(i, i + take), this.#bulkFilled);
          this.#bulkFilled += take;
          i += take;
          if (this.#bulkFilled === body.length) this.#reading = Reading.BulkEnd;
          continue;
        }
        default: { // Reading.BulkEnd
          if (chunk[i++] !== (this.#crlfSeen === 0 ? CR : LF)) {
            throw new MalformedFrame(`${bulkName(this.#bulkType)} not ended by \\r\\n`);
          }
          if (++this.#crlfSeen < 2) continue;
          // Reset on the way out: BulkEnd is entered from here and from a read in place.
          this.#crlfSeen = 0;
          value = this.#bulkValue(this.#bulk!);
          this.#bulk = null;
          this.#bulkFilled = 0;
          this.#reading = Reading.Type;
          break;
        }
      }
      const frame = this.#complete(value);
      if (frame !== PENDING) {
        if (this.#lent.length > 0) this.#lent.length = 0;
        emit(frame);
        this.#frameBytes = 0;
        start = i;
      }
    }
    this.#frameBytes += end - start;
    if (this.#lent.length > 0) {
      // A frame still in progress holds views of this chunk: they become copies.
      const lent = this.#lent;
      for (let k = 0; k < lent.length; k += 2) {
        const items = lent[k] as RespValue[];
        const at = lent[k + 1] as number;
        items[at] = (items[at] as Uint8Array).slice();
      }
      lent.length = 0;
    }
  }

  /**
   * Whether a bulk string read now may be lent: it is the frame, or goes into an array (or a
   * push, or an attribute, which is dropped). A map's or set's member is copied, as a JS Map or
   * Set member cannot be replaced by its copy in place, should its frame outlast the chunk.
   */
  #mayLend(): boolean {
    if (this.#depth === 0) return true;
    const type = this.#levels[this.#depth - 1].type;
    return type === STAR || type === GREATER || type === PIPE;
  }

  /** Keep `bytes[from, to)`: the start of a line the next read finishes. */
  #hold(bytes: Uint8Array, from: number, to: number): void {
    const n = to - from;
    if (this.#heldLength + n > this.#held.length) {
      const grown = new Uint8Array(Math.max(64, 2 * (this.#heldLength + n)));
      grown.set(this.#held.subarray(0, this.#heldLength));
      this.#held = grown;
    }
    this.#held.set(bytes.subarray(from, to), this.#heldLength);
    this.#heldLength += n;
  }

  /**
   * A whole line, `bytes[from, nl)` (`nl` is where its `\n` is, or its end), of the type
   * `#lineType`; `size` is the frame's size up to its end. Returns the value it is, PENDING when
   * it starts an aggregate or a bulk string, or SKIPPED for an empty inline line.
   */
  #line(bytes: Uint8Array, from: number, nl: number, size: number): Step {
    const type = this.#lineType;
    this.#reading = Reading.Type;
    let to = nl;
    if (to > from && bytes[to - 1] === CR) to--;
    else if (type !== INLINE) throw new MalformedFrame("line not ended by \\r\\n");
    switch (type) {
      case INLINE: {
        const args = splitArgs(bytes, from, to, this.lends);
        return args.length === 0 ? SKIPPED : args;
      }
      case PLUS:
        return text(bytes, from, to);
      case MINUS:
        return new RespError(utf8.decode(bytes.subarray(from, to)));
      case COLON:
        return integer(bytes, from, to);
      case DOLLAR:
      case BANG:
      case EQUALS: {
        const length = count(bytes, from, to);
        if (length === -1 && type === DOLLAR) return null;
        if (length < 0) throw new MalformedFrame(`invalid ${lengthName(type)} length`);
        return this.#startBulk(type, length, size);
      }
      case UNDERSCORE:
        if (to !== from) throw new MalformedFrame("null with a value");
        return null;
      case HASH:
        if (to - from === 1 && bytes[from] === 0x74) return true; // t
        if (to - from === 1 && bytes[from] === 0x66) return false; // f
        throw new MalformedFrame("invalid boolean");
      case COMMA:
        return double(bytes, from, to);
      case PAREN:
        return bigNumber(bytes, from, to);
      default: { // an aggregate: * % ~ > |
        const n = count(bytes, from, to);
        if (n === -1 && type === STAR) return null;
        if (n < 0) throw new MalformedFrame(`invalid ${lengthName(type)} length`);
        return this.#startAggregate(type, n, size);
      }
    }
  }

  /** After a `$`, `!` or `=` header announcing `length` bytes: read the body next. */
  #startBulk(type: number, length: number, size: number): typeof PENDING {
    if (size + length + 2 > this.#max) throw new FrameTooLarge(size + length + 2, this.#max);
    if (length === Infinity) throw new MalformedFrame(`invalid ${lengthName(type)} length`);
    this.#bulkType = type;
    this.#bulkLength = length;
    this.#bulkFilled = 0;
    this.#reading = Reading.Bulk;
    return PENDING;
  }

  /** After an aggregate's header announcing `n` elements (pairs for a map or attribute). */
  #startAggregate(type: number, n: number, size: number): RespValue | typeof PENDING {
    const elements = type === PERCENT || type === PIPE ? 2 * n : n;
    if (size + 3 * elements > this.#max) {
      throw new FrameTooLarge(size + 3 * elements, this.#max);
    }
    if (elements === Infinity) throw new MalformedFrame(`invalid ${lengthName(type)} length`);
    // (An empty aggregate holds no level open, so it does not count towards maxDepth; nor does
    // it when sent: what is decoded can be sent back.)
    if (elements === 0) return type === PIPE ? PENDING : emptyAggregate(type);
    if (this.#depth === this.#maxDepth) {
      throw new MalformedFrame(`aggregates nested deeper than maxDepth ${this.#maxDepth}`);
    }
    let level = this.#levels[this.#depth];
    if (level === undefined) {
      level = this.#levels[this.#depth] = {
        type,
        remaining: 0,
        items: null,
        map: null,
        set: null,
        key: null,
        hasKey: false,
      };
    }
    level.type = type;
    level.remaining = elements;
    level.items = type === STAR || type === GREATER ? [] : null;
    level.map = type === PERCENT ? new Map() : null;
    level.set = type === TILDE ? new Set() : null;
    level.hasKey = false;
    this.#depth++;
    return PENDING;
  }

  #bulkValue(body: Uint8Array): RespValue {
    switch (this.#bulkType) {
      case DOLLAR:
        return body;
      case BANG:
        return new RespError(utf8.decode(body));
      default: { // = verbatim: "txt:" then the text
        if (body.length < 4 || body[3] !== COLON) {
          throw new MalformedFrame("verbatim string without its format");
        }
        return utf8.decode(body.subarray(4));
      }
    }
  }

  /**
   * Put `value` in the aggregate being filled, closing every aggregate it completes. Returns
   * the frame if that completes it (the value, or the outermost aggregate), else PENDING.
   */
  #complete(value: RespValue): RespValue | typeof PENDING {
    for (;;) {
      if (this.#depth === 0) return value;
      const level = this.#levels[this.#depth - 1];
      switch (level.type) {
        case STAR:
        case GREATER:
          level.items!.push(value);
          break;
        case PERCENT:
          if (level.hasKey) {
            level.map!.set(level.key, value);
            level.key = null;
          } else level.key = value;
          level.hasKey = !level.hasKey;
          break;
        case TILDE:
          level.set!.add(value);
          break;
        default: // | an attribute: dropped
          break;
      }
      if (--level.remaining > 0) return PENDING;
      this.#depth--;
      switch (level.type) {
        case STAR:
          value = level.items!;
          break;
        case GREATER:
          value = new RespPush(level.items!);
          break;
        case PERCENT:
          value = level.map!;
          break;
        case TILDE:
          value = level.set!;
          break;
        default: // an attribute is not a value: the next one is
          level.key = null;
          return PENDING;
      }
      level.items = null;
      level.map = null;
      level.set = null;
      level.key = null;
    }
  }
}

const EMPTY = new Uint8Array(0);

function isType(byte: number): boolean {
  switch (byte) {
    case STAR:
    case DOLLAR:
    case PLUS:
    case MINUS:
    case COLON:
    case UNDERSCORE:
    case HASH:
    case COMMA:
    case PAREN:
    case BANG:
    case EQUALS:
    case PERCENT:
    case TILDE:
    case GREATER:
    case PIPE:
      return true;
    default:
      return false;
  }
}

function emptyAggregate(type: number): RespValue {
  switch (type) {
    case STAR:
      return [];
    case GREATER:
      return new RespPush([]);
    case PERCENT:
      return new Map();
    default:
      return new Set();
  }
}

/**
 * A length or count: digits, or `-1`; -2 if it is neither. Past 15 digits it is too large to
 * hold: Infinity (then the frame is too large, or, with no limit, the length invalid).
 */
function count(bytes: Uint8Array, from: number, to: number): number {
  if (to - from === 2 && bytes[from] === MINUS && bytes[from + 1] === 0x31) return -1;
  if (to === from) return -2;
  let n = 0;
  for (let i = from; i < to; i++) {
    const digit = bytes[i] - 0x30;
    if (digit < 0 || digit > 9) return -2;
    n = n * 10 + digit;
  }
  if (to - from > 15) return n === Infinity ? -2 : Infinity;
  return n;
}

// The common simple strings, without a decode each.
function text(bytes: Uint8Array, from: number, to: number): string {
  const n = to - from;
  if (n === 2 && bytes[from] === 0x4f && bytes[from + 1] === 0x4b) return "OK";
  if (
    n === 4 && bytes[from] === 0x50 && bytes[from + 1] === 0x4f && bytes[from + 2] === 0x4e &&
    bytes[from + 3] === 0x47
  ) return "PONG";
  return utf8.decode(bytes.subarray(from, to));
}

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** An integer line: a signed 64-bit integer, a number if it is safe, else a bigint. */
function integer(bytes: Uint8Array, from: number, to: number): number | bigint {
  let i = from;
  const negative = bytes[i] === MINUS;
  if (negative || bytes[i] === PLUS) i++;
  if (i === to || to - i > 20) throw new MalformedFrame("invalid integer");
  let n = 0;
  for (let k = i; k < to; k++) {
    const digit = bytes[k] - 0x30;
    if (digit < 0 || digit > 9) throw new MalformedFrame("invalid integer");
    n = n * 10 + digit;
  }
  if (to - i <= 15) return negative && n !== 0 ? -n : n; // ":-0" is 0
  const big = BigInt(utf8.decode(bytes.subarray(from, to)));
  if (big < INT64_MIN || big > INT64_MAX) throw new MalformedFrame("integer out of range");
  return big >= -MAX_SAFE && big <= MAX_SAFE ? Number(big) : big;
}

const DOUBLE = /^[+-]?(\d+(\.\d+)?([eE][+-]?\d+)?|inf|nan)$/;

function double(bytes: Uint8Array, from: number, to: number): number {
  if (to - from > 512) throw new MalformedFrame("invalid double");
  const s = utf8.decode(bytes.subarray(from, to));
  if (!DOUBLE.test(s)) throw new MalformedFrame("invalid double");
  if (s.endsWith("inf")) return s[0] === "-" ? -Infinity : Infinity;
  if (s.endsWith("nan")) return NaN;
  return Number(s);
}

// Parsing a big number takes time that grows faster than its length: bound it.
const MAX_BIG_NUMBER_DIGITS = 4096;

function bigNumber(bytes: Uint8Array, from: number, to: number): bigint {
  if (to - from > MAX_BIG_NUMBER_DIGITS + 1) throw new MalformedFrame("big number too long");
  const s = utf8.decode(bytes.subarray(from, to));
  if (!/^[+-]?\d+$/.test(s)) throw new MalformedFrame("invalid big number");
  return BigInt(s);
}

// ---- Inline commands -------------------------------------------------------------------------

const SPACE = 0x20;
const TAB = 9;
const QUOTE = 0x22; // "
const APOSTROPHE = 0x27; // '
const BACKSLASH = 0x5c;

/** C's isspace. */
function isSpace(byte: number): boolean {
  return byte === SPACE || (byte >= TAB && byte <= CR);
}

function hexValue(byte: number): number {
  if (byte >= 0x30 && byte <= 0x39) return byte - 0x30;
  const lower = byte | 0x20;
  return lower >= 0x61 && lower <= 0x66 ? lower - 0x61 + 10 : -1;
}

/**
 * The arguments of an inline command, split as Redis's `sdssplitargs` does: by spaces, with
 * `"…"` (escapes `\n \r \t \b \a \\ \" \xHH`) and `'…'` (escape `\'`) quoting, where a closing
 * quote must be followed by a space or the end, and the line cut at a NUL byte (a C string).
 */
function splitArgs(bytes: Uint8Array, from: number, to: number, lend: boolean): Uint8Array[] {
  for (let i = from; i < to; i++) {
    if (bytes[i] === 0) {
      to = i;
      break;
    }
  }
  const args: Uint8Array[] = [];
  let i = from;
  for (;;) {
    while (i < to && isSpace(bytes[i])) i++;
    if (i === to) return args;
    // The common case: no quotes, a copy of the bytes up to the next space.
    const first = i;
    while (i < to && !endsArg(bytes[i])) i++;
    if (i === to || bytes[i] !== QUOTE && bytes[i] !== APOSTROPHE) {
      args.push(lend ? bytes.subarray(first, i) : bytes.slice(first, i));
      continue;
    }
    const arg = Array.from(bytes.subarray(first, i));
    i = quoted(bytes, i, to, arg);
    args.push(new Uint8Array(arg));
  }
}

/** Whether `byte` ends an unquoted run: a space, or a quote that starts quoting. */
function endsArg(byte: number): boolean {
  return byte === SPACE || byte === LF || byte === CR || byte === TAB || byte === QUOTE ||
    byte === APOSTROPHE;
}

/**
 * The rest of an argument that has quotes, from the quote at `i`, appended to `arg`; returns
 * where the argument ends.
 */
function quoted(bytes: Uint8Array, i: number, to: number, arg: number[]): number {
  let quote = 0; // the quote we are in, if any
  for (;;) {
    if (quote === 0) {
      if (i === to) return i;
      const b = bytes[i];
      if (b === SPACE || b === LF || b === CR || b === TAB) return i;
      if (b === QUOTE || b === APOSTROPHE) quote = b;
      else arg.push(b);
      i++;
      continue;
    }
    if (i === to) throw new MalformedFrame("unbalanced quotes in request");
    const b = bytes[i];
    if (b === quote) {
      if (i + 1 < to && !isSpace(bytes[i + 1])) {
        throw new MalformedFrame("unbalanced quotes in request");
      }
      return i + 1;
    }
    if (quote === QUOTE && b === BACKSLASH && i + 3 < to && bytes[i + 1] === 0x78) {
      const hi = hexValue(bytes[i + 2]);
      const lo = hexValue(bytes[i + 3]);
      if (hi >= 0 && lo >= 0) {
        arg.push(hi * 16 + lo);
        i += 4;
        continue;
      }
    }
    if (quote === QUOTE && b === BACKSLASH && i + 1 < to) {
      const c = bytes[++i];
      arg.push(
        c === 0x6e ? LF : c === 0x72 ? CR : c === 0x74 ? TAB : c === 0x62 ? 8 : c === 0x61 ? 7 : c,
      );
    } else if (quote === APOSTROPHE && b === BACKSLASH && i + 1 < to && bytes[i + 1] === quote) {
      arg.push(APOSTROPHE);
      i++;
    } else arg.push(b);
    i++;
  }
}

// ---- Encoding --------------------------------------------------------------------------------

const CRLF = 0x0d0a;
const NULL_BULK = textEncoder.encode("$-1\r\n");
const TRUE = textEncoder.encode("#t\r\n");
const FALSE = textEncoder.encode("#f\r\n");
// Headers for small lengths and counts ("$3\r\n", "*2\r\n", ":1\r\n"), encoded once.
const CACHED = 1024;
const bulkHeaders: Uint8Array[] = [];
const arrayHeaders: Uint8Array[] = [];
const integers: Uint8Array[] = [];

function writeHeader(out: FrameWriter, type: string, n: number, cache?: Uint8Array[]): void {
  if (cache !== undefined && n < CACHED) {
    out.write(cache[n] ??= textEncoder.encode(`${type}${n}\r\n`));
  } else {
    out.writeString(`${type}${n}\r\n`);
  }
}

/** The UTF-8 length of `s` as `writeString` writes it (a lone surrogate as U+FFFD). */
function utf8Length(s: string): number {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const next = s.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) {
        n += 2; // four bytes for two units
        i++;
      } else n += 2;
    } else n += 2;
  }
  return n;
}

function writeBulk(out: FrameWriter, bytes: Uint8Array): void {
  writeHeader(out, "$", bytes.length, bulkHeaders);
  out.write(bytes);
  out.writeUint(CRLF, 2);
}

function writeString(out: FrameWriter, s: string): void {
  if (s.length > 256) return writeBulk(out, textEncoder.encode(s));
  writeHeader(out, "$", utf8Length(s), bulkHeaders);
  out.writeString(s);
  out.writeUint(CRLF, 2);
}

/** Write `value`, whose aggregates have been checked (`checkAggregate`). */
function write(out: FrameWriter, value: unknown): void {
  if (value instanceof Uint8Array) return writeBulk(out, value);
  switch (typeof value) {
    case "string":
      return writeString(out, value);
    case "number":
      if (Number.isSafeInteger(value)) {
        if (value >= 0) writeHeader(out, ":", value, integers);
        else out.writeString(`:${value}\r\n`);
      } else {
        const text = value === Infinity
          ? "inf"
          : value === -Infinity
          ? "-inf"
          : Number.isNaN(value)
          ? "nan"
          : String(value);
        out.writeString(`,${text}\r\n`);
      }
      return;
    case "bigint":
      out.writeString(`${value >= INT64_MIN && value <= INT64_MAX ? ":" : "("}${value}\r\n`);
      return;
    case "boolean":
      return out.write(value ? TRUE : FALSE);
    case "object":
      if (value === null) return out.write(NULL_BULK);
      if (Array.isArray(value)) {
        writeHeader(out, "*", value.length, arrayHeaders);
        for (let i = 0; i < value.length; i++) write(out, value[i]);
        return;
      }
      if (value instanceof RespSimpleString || value instanceof RespError) {
        return out.write(value.wire);
      }
      if (value instanceof RespPush) {
        writeHeader(out, ">", value.values.length);
        for (const item of value.values) write(out, item);
        return;
      }
      if (value instanceof Map) {
        writeHeader(out, "%", value.size);
        for (const [k, v] of value) {
          write(out, k);
          write(out, v);
        }
        return;
      }
      if (value instanceof Set) {
        writeHeader(out, "~", value.size);
        for (const item of value) write(out, item);
        return;
      }
  }
  throw notEncodable(value);
}

function notEncodable(value: unknown): TypeError {
  const what = value === undefined
    ? "undefined"
    : typeof value === "object"
    ? `an object (${Object.prototype.toString.call(value).slice(8, -1)})`
    : typeof value;
  return new TypeError(`cannot send ${what} as RESP`);
}

/** Whether `value` is something `write` writes without recursing. */
function isLeaf(value: unknown): boolean {
  switch (typeof value) {
    case "string":
    case "number":
    case "bigint":
    case "boolean":
      return true;
    case "object":
      return value === null || value instanceof Uint8Array ||
        value instanceof RespSimpleString || value instanceof RespError;
    default:
      return false;
  }
}

/**
 * Throws a `TypeError` unless every value inside the aggregate `value` can be written and it
 * nests at most `maxDepth` deep: checked before anything is written, so that a bad value deep
 * inside leaves no half-written frame behind.
 */
function checkAggregate(value: unknown, depth: number, maxDepth: number): void {
  if (isLeaf(value)) return;
  const items = Array.isArray(value)
    ? value
    : value instanceof RespPush
    ? value.values
    : value instanceof Set
    ? value
    : value instanceof Map
    ? [...value.keys(), ...value.values()]
    : undefined;
  if (items === undefined) throw notEncodable(value);
  // (An empty one is no level deeper, as the decoder counts: see #startAggregate.)
  if (
    depth > maxDepth && (Array.isArray(items) ? items.length > 0 : (items as Set<unknown>).size > 0)
  ) {
    throw new TypeError(`cannot send RESP aggregates nested deeper than maxDepth ${maxDepth}`);
  }
  for (const item of items) {
    if (!isLeaf(item)) checkAggregate(item, depth + 1, maxDepth);
  }
}

/**
 * RESP, the protocol of Redis, as a framing: frames are {@linkcode RespValue}s (see its table
 * for how each RESP type is read and written). Decoding is incremental (a frame may arrive in
 * any number of reads, byte by byte), a bulk string whole in one read is a view of one copy of
 * that read (`slice()` one you keep for long), and a large one is read in place. A frame larger
 * than `maxLength` is a {@linkcode FrameTooLarge}; bytes that are not RESP, aggregates nested
 * past `maxDepth` and unbalanced quotes in an inline command are a {@linkcode MalformedFrame}
 * saying what was wrong (`invalid bulk length`, `expected a RESP type, got 'x'`): either ends
 * only the connection it came from. Sending a value that is not a `RespValue` throws a
 * `TypeError`, and writes nothing.
 *
 * A server passes `inline: true` to take inline commands (`PING` typed into `nc`); a client
 * leaves it off. `lend: true` saves the copy of each read: bulk strings are then views of it,
 * valid for the handler's step (see {@linkcode RespOptions}). Options are checked at once: a
 * `TypeError` or `RangeError` names the option.
 *
 * @example A command in, replies out
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, encodeFrames, resp, RespError, RespSimpleString } from "./mod.ts";
 * const bytes = (text: string) => new TextEncoder().encode(text);
 * const server = resp({ inline: true });
 * // A command from a client library, then one typed into nc:
 * const [set, ping] = decodeFrames(server, bytes("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nPING\r\n"));
 * assert.deepEqual(set, [bytes("SET"), bytes("k"), bytes("v")]);
 * assert.deepEqual(ping, [bytes("PING")]);
 * const replies = encodeFrames(server, [new RespSimpleString("OK"), null, 42, new RespError("ERR no")]);
 * assert.equal(new TextDecoder().decode(replies), "+OK\r\n$-1\r\n:42\r\n-ERR no\r\n");
 * // What a client reads back:
 * assert.deepEqual(decodeFrames(resp(), replies), ["OK", null, 42, new RespError("ERR no")]);
 * ```
 *
 * @example Limits
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeFrames, FrameTooLarge, MalformedFrame, resp } from "./mod.ts";
 * const bytes = (text: string) => new TextEncoder().encode(text);
 * // A bulk string announced past maxLength is refused before its body comes.
 * assert.throws(() => decodeFrames(resp({ maxLength: 1024 }), bytes("$5000\r\n")), FrameTooLarge);
 * assert.throws(() => decodeFrames(resp({ maxDepth: 2 }), bytes("*1\r\n*1\r\n*1\r\n")), MalformedFrame);
 * assert.throws(() => decodeFrames(resp(), bytes("$x\r\n")), { message: "invalid bulk length" });
 * assert.throws(() => resp({ maxLength: -1 }), RangeError);
 * ```
 */
export function resp(options?: RespOptions): Framing<RespValue> {
  const check = new OptionCheck("resp", options ?? {});
  check.number("maxLength", 0, { integer: true, infinite: true });
  check.number("maxDepth", 1, { integer: true });
  check.boolean("inline");
  check.boolean("lend");
  const maxLength = options?.maxLength ?? 8 * 1024 * 1024;
  const maxDepth = options?.maxDepth ?? 16;
  const inline = options?.inline ?? false;
  const lend = options?.lend ?? false;
  return {
    name: inline ? "resp(inline)" : "resp",
    decoder: () => new RespDecoder(maxLength, maxDepth, inline, lend),
    encode(frame: RespValue, out: FrameWriter) {
      if (!isLeaf(frame)) checkAggregate(frame, 1, maxDepth);
      write(out, frame);
    },
  };
}
