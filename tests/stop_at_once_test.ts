// Every server command line stops cleanly on a SIGTERM sent the moment it says where it listens.
//
// A supervisor, a test or a benchmark harness may stop a server as soon as it is up. If the
// process listens for the signal only after printing "listening on", a signal in between meets
// no listener and ends it at once (exit 143: no shutdown to the connections, no clean exit): the
// echo, redis and chat examples and `workers.ts` did so in 4 to 7 tries of 10. Each server of the
// examples, `workers.ts` and the Deno servers of the benchmarks (bench/node_echo.mjs listens for
// its signals before it listens at all) is started and stopped three times here, the SIGTERM sent
// as soon as its line is read.
import assert from "node:assert/strict";
import { startProcess, within } from "./_support.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const TRIES = 3;

interface CommandLine {
  name: string;
  args: string[];
  env?: Record<string, string>;
  /** The line that says it is listening. */
  ready: RegExp;
}

// A script that takes --port and --hostname and prints `listening on HOST:PORT`.
const listening = (script: string): CommandLine => ({
  name: script,
  args: [script, "--port", "0", "--hostname", "127.0.0.1"],
  ready: /^listening on /m,
});

const COMMAND_LINES: CommandLine[] = [
  listening("examples/echo_server.ts"),
  listening("examples/tls_echo_server.ts"),
  listening("examples/redis_server.ts"),
  {
    name: "chat_server",
    args: ["examples/chat_server.ts"],
    env: { PORT: "0" },
    ready: /^chat server listening on /m,
  },
  {
    name: "workers.ts",
    args: [
      ...["--unstable-kv", "--unstable-net", "workers.ts", "tests/peers/worker_handler.ts"],
      ...["--workers", "1", "--port", "0", "--hostname", "127.0.0.1"],
    ],
    ready: /^listening on /m,
  },
  listening("bench/raw_echo.ts"),
  listening("bench/step_echo.ts"),
  listening("bench/trace_echo.ts"),
  listening("bench/_workers_echo.ts"),
];

/** Start it, SIGTERM it as soon as its ready line is read; its exit code and stderr. */
async function stopAtOnce(line: CommandLine): Promise<{ code: number; stderr: string }> {
  const server = await startProcess(["run", "-A", ...line.args], line.ready, {
    cwd: ROOT,
    env: line.env,
  });
  try {
    server.child.kill("SIGTERM");
    const { code } = await within(10_000, server.child.status, `${line.name}'s exit`);
    return { code, stderr: await server.stderr };
  } finally {
    await server.end();
  }
}

Deno.test("every server command line exits 0 on a SIGTERM sent the moment it prints where it listens", async () => {
  const data = await Deno.makeTempDir({ prefix: "etcp-stop-at-once-" });
  const cluster: CommandLine = {
    name: "cluster",
    args: ["examples/cluster.ts", "--workers", "1", "--port", "0", "--data", data],
    ready: /^chat cluster of 1 workers on port /m,
  };
  try {
    // The command lines in parallel, each one's tries in turn.
    await Promise.all([...COMMAND_LINES, cluster].map(async (line) => {
      for (let i = 1; i <= TRIES; i++) {
        const { code, stderr } = await stopAtOnce(line);
        assert.equal(code, 0, `${line.name}, try ${i}: exit code ${code} (stderr: ${stderr})`);
      }
    }));
  } finally {
    await Deno.remove(data, { recursive: true });
  }
});
