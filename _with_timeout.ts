// Bound a promise in time with the library's TimeoutError (connects, handshakes).

import { TimeoutError } from "./errors.ts";
import { clearTimer, startTimer } from "./_timer.ts";

/** `promise`, or a `TimeoutError` saying "`what` timed out" after `ms`; `onLate` gets a late value. */
export function withTimeout<V>(
  promise: Promise<V>,
  ms: number,
  what: string,
  onLate?: (value: V) => void,
): Promise<V> {
  if (!Number.isFinite(ms)) return promise;
  return new Promise((resolve, reject) => {
    let late = false;
    const timer = startTimer(() => {
      late = true;
      reject(new TimeoutError(`${what} timed out after ${ms} ms`));
    }, ms);
    promise.then(
      (value) => {
        clearTimer(timer);
        if (late) onLate?.(value);
        else resolve(value);
      },
      (err) => {
        clearTimer(timer);
        if (!late) reject(err);
      },
    );
  });
}
