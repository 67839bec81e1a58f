// The Redis programs the interoperability tests and bench/redis.ts run: found on PATH (or where
// Debian puts them), and a real redis-server started on a free port. Why a tool is missing is
// said in words, for the name of a skipped test.

/** The full path of `name` if an executable of that name is on PATH (or in /usr/sbin, /sbin). */
export function findTool(name: string): string | undefined {
  const dirs = [
    ...(Deno.env.get("PATH") ?? "").split(":"),
    "/usr/sbin",
    "/sbin",
    "/usr/local/sbin",
  ];
  for (const dir of dirs) {
    if (dir === "") continue;
    const path = `${dir}/${name}`;
    try {
      const info = Deno.statSync(path);
      if (info.isFile && (info.mode ?? 0o111) & 0o111) return path;
    } catch { /* not here */ }
  }
  return undefined;
}

/** Where each Redis tool is, if installed. */
export const tools = {
  redisServer: findTool("redis-server"),
  redisCli: findTool("redis-cli"),
  redisBenchmark: findTool("redis-benchmark"),
};

/**
 * Why a test needing `needed` cannot run, or undefined if it can: "redis-cli not found on PATH
 * (Debian: apt-get install redis-tools)".
 */
export function missing(...needed: (keyof typeof tools)[]): string | undefined {
  const packages = {
    redisServer: "redis-server",
    redisCli: "redis-tools",
    redisBenchmark: "redis-tools",
  };
  const names = {
    redisServer: "redis-server",
    redisCli: "redis-cli",
    redisBenchmark: "redis-benchmark",
  };
  const absent = needed.filter((tool) => tools[tool] === undefined);
  if (absent.length === 0) return undefined;
  const install = [...new Set(absent.map((tool) => packages[tool]))].join(" ");
  return `${
    absent.map((tool) => names[tool]).join(", ")
  } not found on PATH (Debian: apt-get install ${install})`;
}

/** A port nothing listens on just now: one the system gave a listener, which is then closed. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/** A redis-server of our own: its port, and how to stop it. */
export interface RedisServerProcess {
  readonly port: number;
  /** Its process id (the benchmark reads its CPU time). */
  readonly pid: number;
  /** SIGTERM, then SIGKILL after 3 s; resolves once it has exited. */
  stop(): Promise<void>;
}

/**
 * Start `redis-server` on a free port (redis-server cannot take port 0: a port is picked by
 * listening on port 0 and closing, and picked again if someone took it meanwhile), with no
 * persistence, and resolve once it accepts connections. `port` reuses a given port (a restart).
 */
export async function startRedisServer(port?: number): Promise<RedisServerProcess> {
  const binary = tools.redisServer;
  if (binary === undefined) throw new Error(missing("redisServer"));
  let lastOutput = "";
  for (let attempt = 0; attempt < (port === undefined ? 5 : 20); attempt++) {
    const chosen = port ?? freePort();
    const child = new Deno.Command(binary, {
      args: [
        "--port",
        String(chosen),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--loglevel",
        "notice",
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const ready = await readyOrExit(child);
    if (ready.ok) {
      return {
        port: chosen,
        pid: child.pid,
        async stop() {
          try {
            child.kill("SIGTERM");
          } catch { /* gone */ }
          const timer = setTimeout(() => {
            try {
              child.kill("SIGKILL");
            } catch { /* gone */ }
          }, 3000);
          await child.status;
          clearTimeout(timer);
          await ready.drained;
        },
      };
    }
    lastOutput = ready.output;
    // The port was taken between the pick and the bind (or, on a restart, not yet released).
    if (!/Address already in use/.test(ready.output)) break;
    if (port !== undefined) await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(
    `redis-server did not start: ${lastOutput.trim().split("\n").slice(-3).join(" | ")}`,
  );
}

/** Wait until `child` prints that it is ready (10 s at most), or exits; drain its output. */
async function readyOrExit(
  child: Deno.ChildProcess,
): Promise<{ ok: true; drained: Promise<void> } | { ok: false; output: string }> {
  let output = "";
  const { promise: readyLine, resolve: sawReady } = Promise.withResolvers<boolean>();
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      if (output.length < 16_384) output += chunk;
      if (output.includes("Ready to accept connections")) sawReady(true);
    }
  };
  const drained = Promise.all([drain(child.stdout), drain(child.stderr)]).then(() => {});
  child.status.then(() => sawReady(false));
  let timer: ReturnType<typeof setTimeout> | undefined;
  const ok = await Promise.race([
    readyLine,
    new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), 10_000)),
  ]);
  clearTimeout(timer);
  if (ok) return { ok, drained };
  try {
    child.kill("SIGKILL");
  } catch { /* exited */ }
  await child.status;
  await drained;
  return { ok: false, output };
}

/** Run `cmd` with `input` on stdin to its end (killed after `ms`): its status and output. */
export async function runTool(
  cmd: string[],
  input = "",
  ms = 20_000,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(input));
  await writer.close();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  }, ms);
  try {
    const out = await child.output();
    const text = new TextDecoder();
    return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
  } finally {
    clearTimeout(timer);
  }
}
