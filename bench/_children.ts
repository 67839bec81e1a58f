// Child processes of bench/run.ts: spawned with drained pipes, stopped with
// SIGTERM then SIGKILL, and all killed on any exit so nothing keeps running.
import { within } from "./_common.ts";

const children = new Set<Deno.ChildProcess>();

/** SIGKILLs every child still running (exit paths, signals). */
export function killAll(): void {
  for (const child of children) kill(child, "SIGKILL");
  children.clear();
}

function kill(child: Deno.ChildProcess, sig: Deno.Signal) {
  try {
    child.kill(sig);
  } catch { /* already exited */ }
}

export interface Output {
  firstLine: Promise<string | null>;
  /** Resolves once the pipe is closed and read to the end. */
  done: Promise<void>;
  tail(): string;
}

/** Drains a pipe (a full pipe would block the child), remembering its first
 * line and its last few KB for results and error messages. */
function collect(stream: ReadableStream<Uint8Array>): Output {
  let text = "";
  let lineFound = false;
  let resolveLine!: (line: string | null) => void;
  const firstLine = new Promise<string | null>((r) => resolveLine = r);
  const done = (async () => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      const nl = text.indexOf("\n");
      if (!lineFound && nl >= 0) {
        lineFound = true;
        resolveLine(text.slice(0, nl));
      }
      if (lineFound && text.length > 16_384) text = text.slice(-8192);
    }
  })().catch(() => {}).finally(() => resolveLine(null));
  return { firstLine, done, tail: () => text.slice(-8192) };
}

export interface Child {
  process: Deno.ChildProcess;
  stdout: Output;
  stderr: Output;
  /** SIGTERM, then SIGKILL if it is still there after 3 s. */
  stop(): Promise<void>;
}

export function spawn(cmd: string[], cwd?: string): Child {
  const process = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  children.add(process);
  process.status.finally(() => children.delete(process));
  return {
    process,
    stdout: collect(process.stdout),
    stderr: collect(process.stderr),
    async stop() {
      kill(process, "SIGTERM");
      if (await within(process.status, 3000, "late") === "late") {
        kill(process, "SIGKILL");
        await process.status;
      }
    },
  };
}

/** A server started by {@linkcode spawnListening}: where it listens, and how to stop it. */
export interface Listening {
  pid: number;
  host: string;
  port: number;
  stop(): Promise<void>;
}

/**
 * Spawns the server `cmd` and waits up to `timeoutMs` for the `listening on HOST:PORT` line
 * every bench server prints first; without it (the server died, or printed something else) it
 * is stopped, and the error says what `name` printed instead, with the tail of its stderr.
 */
export async function spawnListening(
  cmd: string[],
  name: string,
  timeoutMs: number,
  cwd?: string,
): Promise<Listening> {
  const child = spawn(cmd, cwd);
  // null if stdout closed first: the server died.
  const line = await within(child.stdout.firstLine, timeoutMs, null);
  const m = line?.match(/^listening on (.+):(\d+)\s*$/);
  if (!m) {
    await child.stop();
    await child.stderr.done;
    throw new Error(
      `${name}: no "listening on HOST:PORT" line (got ${
        JSON.stringify(line)
      })\n${child.stderr.tail()}`,
    );
  }
  return {
    pid: child.process.pid,
    host: m[1].replace(/^\[(.*)\]$/, "$1"),
    port: Number(m[2]),
    stop: child.stop,
  };
}

/** The soft and hard limits on open files of this process (what children inherit). */
function openFilesLimits(): { soft: number; hard: number } {
  const limits = Deno.readTextFileSync("/proc/self/limits");
  const m = limits.match(/^Max open files\s+(\S+)\s+(\S+)/m);
  const value = (s: string | undefined) =>
    s === undefined || s === "unlimited" ? Infinity : Number(s);
  return { soft: value(m?.[1]), hard: value(m?.[2]) };
}

/**
 * `cmd`, run so that it may open `files` files: as it is if the soft limit this process passes
 * on allows that many, else through `sh -c 'ulimit -n N; exec …'` (same pid: exec), N =
 * `files` (at most the hard limit, which only root can raise: beyond it, an error saying so).
 * Without /proc (not Linux), `cmd` as it is.
 */
export function withOpenFiles(cmd: string[], files: number): string[] {
  let limits;
  try {
    limits = openFilesLimits();
  } catch {
    return cmd;
  }
  if (files <= limits.soft) return cmd;
  if (files > limits.hard) {
    throw new Error(
      `${files} open files are needed, the hard limit is ${limits.hard} ("ulimit -Hn"): ` +
        "raise it (as root) or ask for fewer idle connections",
    );
  }
  return ["sh", "-c", `ulimit -n ${files} && exec "$@"`, "sh", ...cmd];
}

/** Runs `cmd` to completion (SIGKILL after `timeoutMs`) and parses the last
 * line of its stdout as JSON. */
export async function runJson(
  cmd: string[],
  timeoutMs: number,
  cwd?: string,
): Promise<Record<string, number>> {
  const child = spawn(cmd, cwd);
  // "deno run -A bench/x.ts …" is shown from the script on.
  const what = (cmd[0] === Deno.execPath() ? cmd.slice(3) : cmd).join(" ");
  const status = await within(child.process.status, timeoutMs, null);
  if (!status) {
    kill(child.process, "SIGKILL");
    await child.process.status;
    throw new Error(`${what}: killed after ${timeoutMs} ms`);
  }
  await Promise.all([child.stdout.done, child.stderr.done]);
  if (!status.success) {
    throw new Error(`${what}: exit code ${status.code}\n${child.stderr.tail()}`);
  }
  const lines = child.stdout.tail().trim().split("\n");
  return JSON.parse(lines[lines.length - 1]);
}

// Whatever way this process ends, its children end with it.
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(sig, () => {
    killAll();
    Deno.exit(130);
  });
}
globalThis.addEventListener("unload", killAll);
