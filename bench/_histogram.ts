// Round-trip latencies of the Deno load clients (bench/load.ts,
// bench/pool_load.ts), summarised as quantiles in their JSON line.

/** Round-trip latencies: 1 µs buckets to 20 ms, then 1 ms buckets to 10 s. */
export class Histogram {
  static FINE = 20_000;
  static COARSE = 10_000;
  counts = new Uint32Array(Histogram.FINE + Histogram.COARSE);
  n = 0;

  /** Adds one latency of `ms` milliseconds. */
  record(ms: number): void {
    const us = ms * 1000;
    const i = us < Histogram.FINE ? us | 0 : Histogram.FINE +
      Math.min(Histogram.COARSE - 1, ((us - Histogram.FINE) / 1000) | 0);
    this.counts[i]++;
    this.n++;
  }

  /** Microseconds at quantile q (bucket midpoint), or null if empty. */
  quantile(q: number): number | null {
    if (this.n === 0) return null;
    const target = Math.max(1, Math.ceil(q * this.n));
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i];
      if (seen < target) continue;
      return i < Histogram.FINE ? i + 0.5 : Histogram.FINE + (i - Histogram.FINE) * 1000 + 500;
    }
    return null;
  }
}
