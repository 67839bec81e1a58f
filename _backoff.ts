// Reconnection with exponential backoff, one way for both the pool's slots and a single
// reconnecting client: the option's shape and check, its defaults, the wait after each failure,
// and the count of failures in a row that a connection staying up resets.

import { describeValue } from "./errors.ts";
import { OptionCheck } from "./_options.ts";
import { MAX_DELAY } from "./_timer.ts";

/**
 * How to reconnect (the `reconnect` option of `connect` and `createPool`). The wait after the
 * n-th failure in a row (n = 0, 1, 2, …) is gRPC's connection backoff with the jitter spread over
 * its full range: let `d = min(initialDelay × multiplier^n, maxDelay)`; the wait is drawn
 * uniformly from `[d × (1 − jitter), d × (1 + jitter)]` (so `jitter: 0.2` is d ± 20 %, mean d;
 * `jitter: 1` is uniform over `[0, 2d]`, AWS's "full jitter" scaled to mean d; `jitter: 0` is
 * exactly d). It is measured from the failure or the end of the connection. A failure is a
 * connect that fails (the handler's start included) or a connection that ends less than
 * `initialDelay` ms after it came up; one that stayed up at least that long resets n to 0 (its end
 * is still followed by a wait of about `initialDelay`). So a handler that throws on every connect
 * backs off to `maxDelay` like a dead server, never faster.
 */
export interface ReconnectOptions {
  /** Milliseconds before the first reconnect (default 1000). */
  initialDelay?: number;
  /** Factor by which each failure in a row multiplies the delay (default 1.6, at least 1). */
  multiplier?: number;
  /** Cap of the delay before jitter (default 30000). */
  maxDelay?: number;
  /** Fraction of the delay drawn at random, from 0 to 1 (default 0.2). */
  jitter?: number;
  /**
   * Reconnects tried in a row without one staying up `initialDelay` ms, after which reconnecting
   * gives up (default `Infinity`: never).
   */
  maxAttempts?: number;
}

/** {@linkcode ReconnectOptions} with the defaults filled in. */
export interface BackoffSettings {
  initialDelay: number;
  multiplier: number;
  maxDelay: number;
  jitter: number;
  maxAttempts: number;
}

/**
 * The settings of a `reconnect` option (checked), or undefined if reconnection is off;
 * `undefined` means `byDefault`.
 */
export function backoffSettings(
  reconnect: boolean | ReconnectOptions | undefined,
  byDefault: boolean,
): BackoffSettings | undefined {
  const r = reconnect ?? byDefault;
  if (r === false) return undefined;
  const o: ReconnectOptions = r === true ? {} : r;
  return {
    initialDelay: o.initialDelay ?? 1000,
    multiplier: o.multiplier ?? 1.6,
    maxDelay: o.maxDelay ?? 30_000,
    jitter: o.jitter ?? 0.2,
    maxAttempts: o.maxAttempts ?? Infinity,
  };
}

/**
 * Throws a TypeError or RangeError naming the bad part of a `reconnect` option of `where` (an
 * option of this shape named otherwise, such as serveWorkers' `restart`: `option`).
 */
export function checkReconnect(where: string, reconnect: unknown, option = "reconnect"): void {
  if (reconnect === undefined || typeof reconnect === "boolean") return;
  if (reconnect === null || typeof reconnect !== "object") {
    throw new TypeError(
      `${where}: option ${option} must be false, true or { initialDelay, multiplier, maxDelay, jitter, maxAttempts }, not ${
        describeValue(reconnect)
      }`,
    );
  }
  where = `${where}: ${option}`;
  const check = new OptionCheck(where, reconnect);
  check.number("initialDelay", 0);
  check.number("multiplier", 1);
  check.number("maxDelay", 0);
  check.number("jitter", 0);
  check.number("maxAttempts", 0, { integer: true, infinite: true });
  const r = reconnect as Record<string, number | undefined>;
  for (const name of ["initialDelay", "maxDelay"]) {
    if ((r[name] ?? 0) > MAX_DELAY) {
      throw new RangeError(
        `${where}: option ${name} must be at most ${MAX_DELAY} ms, not ${r[name]}`,
      );
    }
  }
  if ((r.jitter ?? 0) > 1) {
    throw new RangeError(
      `${where}: option jitter must be a number from 0 to 1, not ${r.jitter}`,
    );
  }
}

/** The wait after `n` failures in a row (see {@linkcode ReconnectOptions}). */
export function backoffDelay(b: BackoffSettings, n: number, random = Math.random): number {
  const d = Math.min(b.initialDelay * b.multiplier ** n, b.maxDelay);
  return d * (1 - b.jitter + 2 * b.jitter * random());
}

/**
 * The backoff of one reconnecting connection: counts its failures in a row, and gives the wait
 * before each next attempt.
 */
export class Backoff {
  readonly settings: BackoffSettings;
  #failures = 0; // attempts since the connection last stayed up: the next delay's exponent
  #upSince = -Infinity; // performance.now() when the connection last came up

  constructor(settings: BackoffSettings) {
    this.settings = settings;
  }

  /** Attempts made since the connection last stayed up. */
  get failures(): number {
    return this.#failures;
  }

  /** The connection came up. */
  up(): void {
    this.#upSince = performance.now();
  }

  /**
   * The connection ended: true if it was brief (up less than `initialDelay` ms, a failure);
   * one that stayed up longer resets the count of failures.
   */
  ended(): boolean {
    const brief = performance.now() - this.#upSince < this.settings.initialDelay;
    if (!brief) this.#failures = 0;
    return brief;
  }

  /**
   * The wait before the next attempt, which it counts; undefined once `maxAttempts` attempts in
   * a row have failed (give up).
   */
  next(): number | undefined {
    if (this.#failures >= this.settings.maxAttempts) return undefined;
    return backoffDelay(this.settings, this.#failures++);
  }
}
