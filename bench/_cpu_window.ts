// The measured window of the Deno load clients (bench/load.ts,
// bench/pool_load.ts): CPU counters sampled at its start and end, and the
// fields of their JSON line that come from them (bench/load.c computes the
// same ones).
import process from "node:process";
import { cpuSeconds, machineCpuSeconds } from "./_common.ts";

/** CPU counters at one instant (seconds): this process's, the server's, the machine's. */
export interface CpuSample {
  t: number;
  self: number;
  server: number;
  machine: number;
}

/** Samples the counters now; `serverPid` 0 leaves the server out. */
export function sampleCpu(serverPid: number): CpuSample {
  const u = process.cpuUsage();
  return {
    t: performance.now() / 1000,
    self: (u.user + u.system) / 1e6,
    server: serverPid ? cpuSeconds(serverPid) : 0,
    machine: machineCpuSeconds(),
  };
}

/** Rounds `x` to `d` decimals. */
export const round = (x: number, d = 1): number => Math.round(x * 10 ** d) / 10 ** d;

/**
 * The window's CPU fields for `count` things done in it (frames, calls):
 * `cpuSeconds` (this process, whole life so far), `cpuPct` (this process in
 * the window, % of one core), and with a server pid `serverCpuPct`,
 * `serverUsPerFrame` and `otherCpuPct` (every other process of the machine).
 */
export function cpuFields(
  a: CpuSample,
  b: CpuSample,
  count: number,
  serverPid: number,
): Record<string, number | null> {
  const seconds = b.t - a.t;
  const pct = (cpu: number) => round(cpu / seconds * 100);
  const server = b.server - a.server, self = b.self - a.self;
  return {
    cpuSeconds: round(sampleCpu(0).self, 3),
    cpuPct: pct(self),
    ...(serverPid
      ? {
        serverCpuPct: pct(server),
        serverUsPerFrame: count ? round(server * 1e6 / count, 2) : null,
        otherCpuPct: pct(Math.max(0, b.machine - a.machine - server - self)),
      }
      : {}),
  };
}
