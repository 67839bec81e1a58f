// Timers of any length: JavaScript's setTimeout takes at most 2^31 - 1 ms (longer delays fire at
// once, with a warning), so longer ones are chained; Infinity means never, as Erlang's
// `infinity`. Short timers, the common case, are plain timer ids: nothing is allocated for them.

/** The longest delay one `setTimeout` call takes. */
export const MAX_DELAY = 2 ** 31 - 1;

type TimerId = ReturnType<typeof setTimeout>;

/** A timer made by {@linkcode startTimer}. */
export type Timer = TimerId | LongTimer | undefined;

class LongTimer {
  id: TimerId | undefined = undefined;
}

/** Run `fn` after `ms` (>= 0, may be Infinity: never). */
export function startTimer(fn: () => void, ms: number): Timer {
  if (ms <= MAX_DELAY) return setTimeout(fn, ms);
  if (ms === Infinity) return undefined;
  const timer = new LongTimer();
  const due = performance.now() + ms;
  const hop = () => {
    const left = due - performance.now();
    if (left <= 0) {
      timer.id = undefined;
      fn();
    } else timer.id = setTimeout(hop, Math.min(left, MAX_DELAY));
  };
  timer.id = setTimeout(hop, MAX_DELAY);
  return timer;
}

/** Cancel a timer made by {@linkcode startTimer} (any value it returned; a fired one is fine). */
export function clearTimer(timer: Timer): void {
  if (timer instanceof LongTimer) clearTimeout(timer.id);
  else clearTimeout(timer);
}

/** Whether `value` is a delay a timer takes: a number >= 0, or Infinity. */
export function isDelay(value: unknown): value is number {
  return typeof value === "number" && value >= 0;
}
