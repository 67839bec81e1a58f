// Tracing one connection (Erlang's sys:trace): every event its handler receives and every action
// it yields, and its hibernations, wakes, code changes and end, as short entries. A connection
// holds a Tracer only while it is traced; untraced, the driver checks one null field per step.

import type { Action, Event, Yielded } from "./actions.ts";
import type { Logger } from "./connection.ts";
import { describeReason } from "./errors.ts";

/**
 * What a trace entry records: `"start"` (the handler starts), `"in"` (an event it receives),
 * `"out"` (an action it yields), `"hibernate"`, `"wake"`, `"upgrade"` (a code change applied on
 * waking) and `"close"` (the connection closed, with its reason).
 */
export type TraceKind = "start" | "in" | "out" | "hibernate" | "wake" | "upgrade" | "close";

/** One step of a traced connection (see {@linkcode TraceOption}). */
export interface TraceEntry {
  /** The connection's id. */
  connection: string;
  /** When, as `performance.now()` (monotonic milliseconds). */
  time: number;
  /** What happened. */
  kind: TraceKind;
  /** The event's or action's type (`"packet"`, `"send"`…), or the kind again for the others. */
  type: string;
  /**
   * A short rendering of what it carries (a frame, a message, a reason, a state): at most
   * {@linkcode TRACE_DETAIL_MAX} characters, never a whole payload.
   */
  detail: string;
}

/**
 * Tracing of a connection: `true` writes each {@linkcode TraceEntry} as one line to the
 * logger's `debug`; a function gets each entry; `false` (the default) traces nothing. A
 * function that throws is reported once (the logger's `warn`) and tracing stops for that
 * connection; the connection goes on.
 */
export type TraceOption = boolean | ((entry: TraceEntry) => void);

/** The longest {@linkcode TraceEntry.detail}, in characters. */
export const TRACE_DETAIL_MAX = 120;

// Entries a traced connection keeps for `conn.recentTrace()` (the observer's trace view).
const RECENT = 50;

/** The entries of one traced connection: sent to its sink and kept, the last few, for reading. */
export class Tracer {
  readonly #id: string;
  readonly #logger: Logger;
  readonly #off: () => void;
  #sink: (entry: TraceEntry) => void;
  #on = true; // false once the sink threw: the rest of the step's entries go nowhere either
  readonly #recent: TraceEntry[] = [];
  #next = 0; // where the next entry goes in #recent once it is full

  /** Trace connection `id` to `sink`; `off` is called if the sink throws. */
  constructor(id: string, option: TraceOption, logger: Logger, off: () => void) {
    this.#id = id;
    this.#logger = logger;
    this.#off = off;
    this.#sink = sinkOf(option, logger);
  }

  /** Send entries to another sink from now on (the recent ones are kept). */
  redirect(option: TraceOption): void {
    this.#sink = sinkOf(option, this.#logger);
  }

  /** The last entries, oldest first. */
  recent(): TraceEntry[] {
    return [...this.#recent.slice(this.#next), ...this.#recent.slice(0, this.#next)];
  }

  /** An event the handler receives. */
  event(ev: Event<unknown>): void {
    this.note("in", ev.type, describeEvent(ev));
  }

  /** What one step yielded: an entry per action. */
  actions(yielded: Yielded): void {
    if (yielded === undefined) return;
    if (!Array.isArray(yielded)) return this.#action(yielded as Action);
    for (const action of yielded) this.#action(action);
  }

  #action(action: Action): void {
    this.note("out", typeof action?.type === "string" ? action.type : "?", describeAction(action));
  }

  /** A step that carries a value (a hibernate's state, a close reason), rendered. */
  noteValue(kind: TraceKind, value: unknown): void {
    this.note(kind, kind, render(value));
  }

  /** Any other step, with a short text. */
  note(kind: TraceKind, type: string, detail = ""): void {
    if (!this.#on) return;
    const entry: TraceEntry = {
      connection: this.#id,
      time: performance.now(),
      kind,
      type,
      detail: cut(detail),
    };
    if (this.#recent.length < RECENT) this.#recent.push(entry);
    else {
      this.#recent[this.#next] = entry;
      this.#next = (this.#next + 1) % RECENT;
    }
    try {
      this.#sink(entry);
    } catch (err) {
      this.#on = false;
      this.#logger.warn(
        `etcp: connection ${this.#id}: the trace callback threw, tracing is off for this ` +
          `connection: ${describeReason(err)}`,
      );
      this.#off();
    }
  }
}

function sinkOf(option: TraceOption, logger: Logger): (entry: TraceEntry) => void {
  return typeof option === "function" ? option : (entry) => logger.debug(formatTraceEntry(entry));
}

/**
 * One line for a trace entry, as `trace: true` writes it:
 * `etcp trace c4.k3x9a0qz 1234.567 in packet Uint8Array(5) "hello"`.
 */
export function formatTraceEntry(entry: TraceEntry): string {
  const detail = entry.detail === "" ? "" : ` ${entry.detail}`;
  const type = entry.type === entry.kind ? "" : ` ${entry.type}`;
  return `etcp trace ${entry.connection} ${entry.time.toFixed(3)} ${entry.kind}${type}${detail}`;
}

function describeEvent(ev: Event<unknown>): string {
  switch (ev.type) {
    case "packet":
      return render(ev.data);
    case "call":
      return `${render(ev.message)} (from ${ev.from?.ref})`;
    case "cast":
    case "info":
      return render(ev.message);
    case "timeout":
      return ev.name === undefined ? "" : JSON.stringify(cut(ev.name));
    case "disconnect":
      return ev.error === undefined ? ev.side : `${ev.side}: ${cut(describeReason(ev.error))}`;
    case "frameError":
      return cut(describeReason(ev.error));
    case "shutdown":
      return render(ev.reason);
    case "upgrade":
      return ev.handler?.name || "(anonymous handler)";
    default:
      return "";
  }
}

function describeAction(action: Action): string {
  switch (action?.type) {
    case "send":
      return render(action.data);
    case "reply":
      return `${render(action.value)} (to ${action.from?.ref})`;
    case "setTimeout":
      return (action.ms === null ? "cancel" : `${action.ms} ms`) +
        (action.name === undefined ? "" : ` ${JSON.stringify(cut(String(action.name)))}`);
    case "hibernate":
      return render(action.state);
    case "stop":
      return render(action.reason);
    case "recv":
      return action.timeoutMs === undefined ? "" : `${action.timeoutMs} ms`;
    case "setFraming":
      return String(action.framing?.name ?? "?");
    case "setOptions":
      return render(action.options);
    case "startTls":
    case "closeWrite":
      return "";
    default:
      return render(action);
  }
}

function cut(text: string, max = TRACE_DETAIL_MAX): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}

/**
 * A short, bounded rendering of any value, for traces and the observer: bytes as text when they
 * are printable (else hex), strings quoted, objects and arrays a few levels and entries deep.
 * Never longer than `max` characters; it stops walking a value where the text is cut.
 */
export function render(value: unknown, max = TRACE_DETAIL_MAX): string {
  const out = { text: "", room: max };
  try {
    write(out, value, 2);
  } catch {
    // A getter or a Proxy trap that throws (a revoked Proxy): tracing must not break delivery.
    return "[unrenderable]";
  }
  return out.room >= 0 ? out.text : `${out.text.slice(0, max - 1)}…`;
}

interface Out {
  text: string;
  room: number; // characters left; below 0: cut
}

function put(out: Out, text: string): boolean {
  if (out.room < 0) return false;
  out.text += text.length <= out.room + 1 ? text : text.slice(0, out.room + 1);
  out.room -= text.length;
  return out.room >= 0;
}

function write(out: Out, value: unknown, depth: number): void {
  if (value instanceof Uint8Array) return writeBytes(out, value);
  switch (typeof value) {
    case "string":
      put(out, JSON.stringify(value.length > out.room ? value.slice(0, out.room + 1) : value));
      return;
    case "bigint":
      put(out, `${value}n`);
      return;
    case "function":
      put(out, `[function ${value.name || "anonymous"}]`);
      return;
    case "symbol":
    case "number":
    case "boolean":
    case "undefined":
      put(out, String(value));
      return;
  }
  if (value === null) return void put(out, "null");
  if (value instanceof Error) return void put(out, describeReason(value));
  if (depth === 0) return void put(out, Array.isArray(value) ? "[…]" : "{…}");
  if (Array.isArray(value)) {
    put(out, "[");
    for (let i = 0; i < value.length; i++) {
      if ((i > 0 && !put(out, ", ")) || out.room < 0) return;
      write(out, value[i], depth - 1);
    }
    put(out, "]");
    return;
  }
  if (ArrayBuffer.isView(value)) {
    return void put(out, `${value.constructor.name}(${value.byteLength} bytes)`);
  }
  const name = (value as object).constructor?.name;
  put(out, name && name !== "Object" ? `${name} {` : "{");
  let first = true;
  for (const key in value as Record<string, unknown>) {
    if ((!first && !put(out, ", ")) || !put(out, `${key}: `)) return;
    first = false;
    write(out, (value as Record<string, unknown>)[key], depth - 1);
    if (out.room < 0) return;
  }
  put(out, "}");
}

// Bytes: their length, then as text if the first ones are printable ASCII, else hex.
function writeBytes(out: Out, bytes: Uint8Array): void {
  const shown = bytes.subarray(0, Math.min(bytes.length, Math.max(0, out.room)));
  let printable = true;
  for (const b of shown) {
    if ((b < 0x20 || b > 0x7e) && b !== 0x0a && b !== 0x0d && b !== 0x09) {
      printable = false;
      break;
    }
  }
  if (!put(out, `Uint8Array(${bytes.length}) `)) return;
  if (printable) {
    put(out, JSON.stringify(String.fromCharCode(...shown.subarray(0, out.room + 1))));
    return;
  }
  let hex = "";
  for (let i = 0; i < shown.length && hex.length <= out.room; i++) {
    hex += (i > 0 ? " " : "") + shown[i].toString(16).padStart(2, "0");
  }
  put(out, hex);
}
