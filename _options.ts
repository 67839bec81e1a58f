// The options of serve() and connect(), checked once, up front, with an error that names the
// option and the value; and the per-connection settings both pass to their drivers.

import type { DriverOptions } from "./_driver.ts";
import type { Logger, Mode } from "./connection.ts";
import { raw } from "./framing.ts";
import type { Framing } from "./framing.ts";
import { describeValue } from "./errors.ts";
import { isDelay, MAX_DELAY } from "./_timer.ts";
import { loggerOf } from "./_logger.ts";
import type { TraceOption } from "./_trace.ts";

/** The per-connection settings a server or client takes from its options. */
export interface ConnectionSettings<T> {
  framing?: Framing<T>;
  mode?: Mode;
  highWaterMark?: number;
  maxBuffered?: number;
  onBufferFull?: "stop" | "throw";
  shutdownTimeout?: number;
  idleTimeout?: number;
  logger?: Logger;
  trace?: TraceOption;
}

/** Pending output a connection may hold before a send from outside ends it (8 MiB). */
export const DEFAULT_MAX_BUFFERED = 8 * 1024 * 1024;

/** Throws a TypeError or RangeError naming `where`'s option `name`. */
export class OptionCheck {
  readonly #where: string;
  readonly #options: Record<string, unknown>;

  constructor(where: string, options: unknown) {
    if (options === null || typeof options !== "object") {
      throw new TypeError(`${where}: options must be an object, not ${describeValue(options)}`);
    }
    this.#where = where;
    this.#options = options as Record<string, unknown>;
  }

  #fail(name: string, expected: string, range = false): never {
    const message = `${this.#where}: option ${name} must be ${expected}, not ${
      describeValue(this.#options[name])
    }`;
    throw range ? new RangeError(message) : new TypeError(message);
  }

  /**
   * A number >= min and <= max (Infinity allowed if `infinite`), an integer if `integer`. A
   * period that a timer keeps takes `max: MAX_DELAY` (_timer.ts): a longer one would fire at once.
   */
  number(
    name: string,
    min: number,
    { integer = false, infinite = false, max = Infinity } = {},
  ): void {
    const value = this.#options[name];
    if (value === undefined) return;
    const what = `${integer ? "an integer" : "a number"} >= ${min}${
      max !== Infinity ? ` and <= ${max}` : ""
    }${infinite ? " (or Infinity)" : ""}`;
    if (typeof value !== "number") this.#fail(name, what);
    if (
      Number.isNaN(value) || value < min || (value === Infinity && !infinite) ||
      (value > max && value !== Infinity) ||
      (integer && value !== Infinity && !Number.isInteger(value))
    ) this.#fail(name, what, true);
  }

  /** A port: an integer from 0 to 65535. */
  port(name: string): void {
    const value = this.#options[name];
    if (value === undefined) return;
    const what = "an integer from 0 to 65535";
    if (typeof value !== "number") this.#fail(name, what);
    if (!(Number.isInteger(value) && value >= 0 && value <= 65535)) this.#fail(name, what, true);
  }

  /** A delay in ms: >= 0, Infinity allowed (never). */
  delay(name: string): void {
    const value = this.#options[name];
    if (value === undefined) return;
    if (typeof value !== "number") this.#fail(name, "a number of ms >= 0");
    if (!isDelay(value)) this.#fail(name, "a number of ms >= 0", true);
  }

  string(name: string): void {
    const value = this.#options[name];
    if (value !== undefined && typeof value !== "string") this.#fail(name, "a string");
  }

  boolean(name: string): void {
    const value = this.#options[name];
    if (value !== undefined && typeof value !== "boolean") this.#fail(name, "true or false");
  }

  oneOf(name: string, values: readonly string[]): void {
    const value = this.#options[name];
    if (value !== undefined && !values.includes(value as string)) {
      this.#fail(name, values.map((v) => JSON.stringify(v)).join(" or "));
    }
  }

  function(name: string): void {
    const value = this.#options[name];
    if (value !== undefined && typeof value !== "function") this.#fail(name, "a function");
  }

  /** An object with these methods. */
  methods(name: string, methods: readonly string[], hint = ""): void {
    const value = this.#options[name] as Record<string, unknown> | undefined;
    if (value === undefined) return;
    if (
      value === null || typeof value !== "object" ||
      !methods.every((m) => typeof value[m] === "function")
    ) {
      this.#fail(name, `an object with ${methods.join(", ")}${hint}`);
    }
  }

  /** A framing: `{ name, decoder(), encode() }`, as `raw()`, `lines()`… return. */
  framing(name: string): void {
    const value = this.#options[name] as Record<string, unknown> | undefined;
    if (value === undefined) return;
    if (
      value === null || typeof value !== "object" || typeof value.decoder !== "function" ||
      typeof value.encode !== "function"
    ) {
      const hint = typeof value === "string" ? ` (did you mean ${value}()?)` : "";
      this.#fail(name, `a framing such as lines() or lengthPrefixed(4)${hint}`);
    }
  }

  /** A trace option: true, false or a function (see `TraceOption`). */
  trace(name: string): void {
    const value = this.#options[name];
    if (value !== undefined && typeof value !== "boolean" && typeof value !== "function") {
      this.#fail(name, "true, false or a function (entry) => void");
    }
  }

  signal(name: string): void {
    const value = this.#options[name];
    if (value !== undefined && !(value instanceof AbortSignal)) this.#fail(name, "an AbortSignal");
  }
}

/**
 * The `timeout` option of a method that returns a promise: `fallback` if unset (undefined or
 * null, as a configuration read from JSON may say), the value if it is a delay (ms >= 0, or
 * Infinity), else the TypeError or RangeError naming it, for the method to reject with (a bad
 * argument rejects: it never throws, and never waits for ever on NaN).
 */
export function timeoutOption<F extends number | undefined>(
  where: string,
  options: unknown,
  fallback: F,
): number | F | Error {
  try {
    const check = new OptionCheck(where, options);
    const timeout = (options as { timeout?: number | null }).timeout;
    if (timeout === undefined || timeout === null) return fallback;
    check.delay("timeout");
    return timeout;
  } catch (err) {
    return err as Error;
  }
}

/** Checks a handler: a generator function (`function*` or `async function*`). */
export function checkHandler(where: string, handler: unknown): void {
  if (typeof handler !== "function") {
    throw new TypeError(
      `${where}: the handler must be a generator function (async function*), not ${
        describeValue(handler)
      }`,
    );
  }
}

/**
 * Checks a KvRegistry's periods (`KvRegistry.open`, `serveWorkers`' registry option): each is kept
 * by a timer, so at most MAX_DELAY.
 */
export function checkRegistryPeriods(check: OptionCheck): void {
  check.number("heartbeatMs", 1, { max: MAX_DELAY });
  check.number("batchMs", 0, { max: MAX_DELAY });
  check.number("nodeTtlMs", 1, { max: MAX_DELAY });
}

/** Checks `upgrade(handler, options)`'s arguments: a handler, and a function as `codeChange`. */
export function checkUpgrade(where: string, handler: unknown, options: unknown): void {
  checkHandler(where, handler);
  new OptionCheck(where, options).function("codeChange");
}

/** Checks the settings serve() and connect() share. */
export function checkConnectionSettings(check: OptionCheck): void {
  check.framing("framing");
  check.oneOf("mode", ["active", "passive"]);
  check.number("highWaterMark", 1, { integer: true, infinite: true });
  check.number("maxBuffered", 0, { infinite: true });
  check.oneOf("onBufferFull", ["stop", "throw"]);
  check.delay("shutdownTimeout");
  check.delay("idleTimeout");
  check.methods("logger", ["error", "warn", "debug"], " (console fits)");
  check.methods("registry", ["add", "remove", "claim", "list", "lookup"]);
  check.string("name");
  check.trace("trace");
}

/** Driver options from a server's or client's settings, with the defaults both share. */
export function driverOptions<T>(
  settings: ConnectionSettings<T>,
  owned: Pick<
    DriverOptions<T>,
    "registry" | "owner" | "kind" | "onClose" | "handshakeTimeout" | "metrics"
  >,
): DriverOptions<T> {
  return {
    framing: settings.framing ?? (raw() as unknown as Framing<T>),
    mode: settings.mode ?? "active",
    highWaterMark: settings.highWaterMark ?? 1,
    maxBuffered: settings.maxBuffered ?? DEFAULT_MAX_BUFFERED,
    onBufferFull: settings.onBufferFull ?? "stop",
    logger: loggerOf(settings.logger),
    shutdownTimeout: settings.shutdownTimeout ?? 5000,
    idleTimeout: settings.idleTimeout === Infinity ? undefined : settings.idleTimeout,
    trace: settings.trace || undefined,
    ...owned,
  };
}
