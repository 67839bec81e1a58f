// What statistics share: time stamps that stay small integers, the label a close reason is
// counted under, and the totals of the connections a server or pool has seen close.

import type { ConnectionStats } from "./connection.ts";
import type { MetricsSample } from "./_metrics.ts";

const EPOCH = Date.now();

/**
 * Milliseconds since this module loaded: an integer small enough (for 24 days) to be a small
 * integer to V8, stored in a field without a heap number of its own (24 bytes per stamp per
 * connection otherwise). `Math.floor` makes it one: a plain subtraction of two doubles would
 * not, even with an integral result.
 */
function stamp(): number {
  return Math.floor(Date.now() - EPOCH);
}

// The stamp of the work under way: read once, and reused by everything that runs before the
// microtasks already queued have run (the reads one event-loop turn completes, say), so that a
// busy server reads the clock once a turn rather than once a read (~60 ns each).
let stampOfTurn = -1;
const forgetStampOfTurn = () => {
  stampOfTurn = -1;
};

/** {@linkcode stamp}, read at most once per batch of microtasks. */
export function turnStamp(): number {
  if (stampOfTurn < 0) {
    stampOfTurn = stamp();
    queueMicrotask(forgetStampOfTurn);
  }
  return stampOfTurn;
}

/** A {@linkcode stamp} as milliseconds since the Unix epoch. */
export function stampToEpoch(at: number): number {
  return EPOCH + at;
}

/** Milliseconds since the Unix epoch as a {@linkcode stamp} (whole milliseconds). */
export function epochToStamp(ms: number): number {
  return Math.floor(ms - EPOCH);
}

/**
 * What a close reason is counted under (in `server.stats().closed` and the metrics'
 * `etcp.close.reason`): the reason itself for a string (cut to 40 characters), an error's
 * `name` (`"FrameTooLarge"`, `"ConnectionReset"`…), else its type. Few distinct values, so that
 * the counts stay small.
 */
export function reasonLabel(reason: unknown): string {
  if (typeof reason === "string") return reason.length <= 40 ? reason : `${reason.slice(0, 39)}…`;
  if (reason instanceof Error) return reason.name;
  if (reason === null) return "null";
  return typeof reason === "object" ? "object" : String(reason);
}

/** The sums over the connections that have closed, and how many closed for each reason. */
export class ClosedTotals {
  closed = 0;
  bytesIn = 0;
  bytesOut = 0;
  framesIn = 0;
  framesOut = 0;
  readonly byReason = new Map<string, number>();

  /** Count a connection that closed with `reason` and these final statistics. */
  add(stats: ConnectionStats, reason: unknown): void {
    this.closed++;
    this.bytesIn += stats.bytesIn;
    this.bytesOut += stats.bytesOut;
    this.framesIn += stats.framesIn;
    this.framesOut += stats.framesOut;
    const label = reasonLabel(reason);
    this.byReason.set(label, (this.byReason.get(label) ?? 0) + 1);
  }

  /**
   * These totals with the live connections' `open` statistics added: what a server's or pool's
   * counts are now.
   */
  withOpen(open: Iterable<ConnectionStats>): MetricsSample {
    const sample = {
      open: 0,
      hibernated: 0,
      bytesIn: this.bytesIn,
      bytesOut: this.bytesOut,
      framesIn: this.framesIn,
      framesOut: this.framesOut,
    };
    for (const stats of open) {
      sample.open++;
      if (stats.state === "hibernated") sample.hibernated++;
      sample.bytesIn += stats.bytesIn;
      sample.bytesOut += stats.bytesOut;
      sample.framesIn += stats.framesIn;
      sample.framesOut += stats.framesOut;
    }
    return sample;
  }

  /** The counts by reason, as a plain object. */
  reasons(): Record<string, number> {
    return Object.fromEntries(this.byReason);
  }
}
