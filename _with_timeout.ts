// Bound a promise in time with the library's TimeoutError (connects, handshakes), and give it up
// when an AbortSignal says so.

import { TimeoutError } from "./errors.ts";
import { clearTimer, startTimer } from "./_timer.ts";

/**
 * `promise`, or a `TimeoutError` saying "`what` timed out" after `ms`, or `signal`'s reason once
 * it aborts, whichever comes first; `onLate` gets a value that comes after either.
 */
export function withTimeout<V>(
  promise: Promise<V>,
  ms: number,
  what: string,
  onLate?: (value: V) => void,
  signal?: AbortSignal,
): Promise<V> {
  if (!Number.isFinite(ms) && signal === undefined) return promise;
  return new Promise((resolve, reject) => {
    let late = false;
    const done = () => {
      clearTimer(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    const giveUp = (err: unknown) => {
      if (late) return;
      late = true;
      done();
      reject(err);
    };
    const onAbort = () => giveUp(signal!.reason);
    const timer = Number.isFinite(ms)
      ? startTimer(() => giveUp(new TimeoutError(`${what} timed out after ${ms} ms`)), ms)
      : undefined;
    if (signal?.aborted) onAbort();
    else signal?.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        done();
        if (late) onLate?.(value);
        else resolve(value);
      },
      (err) => {
        done();
        if (!late) reject(err);
      },
    );
  });
}
