// Shared by the bench programs: a tiny flag parser, writeAll and /proc
// readers. Nothing here imports the library (the harness measures it from the
// outside) nor any node: module (that would cost raw_echo.ts, the baseline,
// ~7 MB of RSS). The frame format lives in _frames.ts.

// ---------------------------------------------------------------- arguments

type Flag = string | number | boolean;

/**
 * Parses `--name value`, `--name=value` and bare `--flag` (booleans) into a
 * copy of `defaults`; each value takes the type of its default. Unknown flags,
 * stray arguments and bad numbers exit with `usage`, so a typo never silently
 * runs a different benchmark.
 */
export function parseFlags<T extends Record<string, Flag>>(
  args: string[],
  defaults: T,
  usage: string,
): T {
  const out: Record<string, Flag> = { ...defaults };
  const fail = (msg: string): never => {
    console.error(`${msg}\n\n${usage}`);
    Deno.exit(2);
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "-h" || arg === "--help") {
      console.log(usage);
      Deno.exit(0);
    }
    if (!arg.startsWith("--")) fail(`unexpected argument: ${arg}`);
    const eq = arg.indexOf("=");
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    if (!(name in defaults)) fail(`unknown option: --${name}`);
    const kind = typeof defaults[name];
    let value: string | undefined = eq < 0 ? undefined : arg.slice(eq + 1);
    if (value === undefined && kind !== "boolean") {
      value = args[++i];
      if (value === undefined) fail(`--${name} needs a value`);
    }
    if (kind === "boolean") {
      out[name] = value === undefined || value === "true" || value === "1";
    } else if (kind === "number") {
      const n = Number(value);
      if (value === "" || !Number.isFinite(n)) {
        fail(`--${name} wants a number, got ${value}`);
      }
      out[name] = n;
    } else {
      out[name] = value!;
    }
  }
  return out as T;
}

/**
 * Whether an echo server's connection ended because its peer went: the load
 * client ends by closing (or resetting) its sockets mid-stream, the normal end of
 * a connection here; anything else is a bug to show.
 */
export function isPeerGone(e: unknown): boolean {
  return e instanceof Deno.errors.ConnectionReset ||
    e instanceof Deno.errors.BrokenPipe ||
    e instanceof Deno.errors.ConnectionAborted;
}

/**
 * The echo baselines' server: prints `listening on HOST:PORT` (what run.ts waits
 * for), runs `echo` on every connection, and exits 0 on SIGTERM or SIGINT. A
 * connection that ends otherwise than by its peer going (`isGone`) is printed,
 * prefixed by `name`: a bug to show.
 */
export async function serveEchoes<C extends Deno.Conn>(
  listener: Deno.Listener<C, Deno.NetAddr>,
  name: string,
  echo: (conn: C) => Promise<void>,
  isGone: (e: unknown) => boolean = isPeerGone,
): Promise<void> {
  for (const sig of ["SIGTERM", "SIGINT"] as const) {
    Deno.addSignalListener(sig, () => {
      listener.close();
      Deno.exit(0);
    });
  }
  console.log(`listening on ${listener.addr.hostname}:${listener.addr.port}`);
  for await (const conn of listener) {
    echo(conn)
      .catch((e) => isGone(e) || console.error(`${name}:`, e))
      .finally(() => {
        try {
          conn.close();
        } catch { /* already closed */ }
      });
  }
}

/** `conn.write` may write less than asked; loop until all of `data` is out. */
export async function writeAll(
  w: { write(p: Uint8Array): Promise<number> },
  data: Uint8Array,
): Promise<void> {
  for (let off = 0; off < data.length;) off += await w.write(data.subarray(off));
}

// --------------------------------------------------------------------- /proc

/** Resident set size of process `pid` in KiB (VmRSS). */
export function rssKB(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const m = status.match(/^VmRSS:\s+(\d+)\s+kB/m);
  if (!m) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(m[1]);
}

/** User + system CPU seconds used so far by process `pid`. */
export function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // Fields after the parenthesised command name; utime and stime are the 14th
  // and 15th fields overall, in clock ticks (100 per second on Linux).
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** CPU seconds spent by all processes of the machine (user + nice + system;
 * interrupt time left out, as no process is charged for it either). */
export function machineCpuSeconds(): number {
  const f = Deno.readTextFileSync("/proc/stat").split("\n")[0].split(/\s+/);
  return (Number(f[1]) + Number(f[2]) + Number(f[3])) / 100;
}

/** Number of open file descriptors of `pid`, or -1 if not readable. */
export function fdCount(pid: number): number {
  try {
    let n = 0;
    for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
    return n;
  } catch {
    return -1;
  }
}

/** `promise`'s value, or `fallback` if it has not settled within `ms`. */
export async function within<T, F>(
  promise: Promise<T>,
  ms: number,
  fallback: F,
): Promise<T | F> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<F>((r) => timer = setTimeout(() => r(fallback), ms));
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
