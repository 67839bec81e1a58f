// `deno task bench:redis`: the Redis examples against the real thing, same machine, same run.
//
//   deno run -A bench/redis.ts [--requests 200000] [--clients 50] [--pipeline 16]
//     [--ops 200000] [--concurrency 1,50] [--rounds 2] [--only servers|clients] [--json]
//
// Servers: redis-benchmark -t ping,set,get -c CLIENTS -n REQUESTS, without and with
// -P PIPELINE, against redis-server and against examples/redis_server.ts, each started fresh on a
// free port for each round; the table gives requests/s, the example's ratio to redis-server, and
// each server's CPU time per request (from /proc), which says where the time goes.
// Clients: examples/redis_client.ts (a pool of one connection) and npm:ioredis (one
// connection, its default) each run the same loop against one redis-server: CONCURRENCY callers,
// each doing `await set(key, value); await get(key)` until OPS commands are done; ops/s and the
// ratio to ioredis. Each client runs in a process of its own (this file, with --client-mode).
//
// Rounds alternate the two sides and the best round counts (the noise of a shared machine only
// ever slows a run down). Prints a markdown table on stdout (progress on stderr) and, with
// --json, one JSON line after it.
import { cpuSeconds, parseFlags } from "./_common.ts";
import { killAll, runJson, spawn, spawnListening } from "./_children.ts";
import { missing, startRedisServer, tools } from "../tests/_redis_tools.ts";

const USAGE = `usage: deno run -A bench/redis.ts [options]
  --requests 200000    redis-benchmark -n: requests per test
  --clients 50         redis-benchmark -c: connections
  --pipeline 16        redis-benchmark -P of the pipelined run
  --ops 200000         commands per client run (half SET, half GET)
  --concurrency 1,50   callers of the client runs (one run each)
  --rounds 2           runs per server and client; the best counts
  --only servers|clients
  --json               also print the results as one JSON line
  --client-mode etcp|ioredis --port N   (internal: one client run, prints JSON)`;
const opts = parseFlags(Deno.args, {
  requests: 200_000,
  clients: 50,
  pipeline: 16,
  ops: 200_000,
  concurrency: "1,50",
  rounds: 2,
  only: "",
  json: false,
  "client-mode": "",
  port: 0,
}, USAGE);

const DENO = Deno.execPath();
const SELF = new URL(import.meta.url).pathname;
const ROOT = new URL("..", import.meta.url).pathname;
const EXAMPLE = `${ROOT}examples/redis_server.ts`;

// ---- One client run (a child process) ---------------------------------------------------------

interface LoopClient {
  set(key: string, value: string): Promise<unknown>;
  get(key: string): Promise<unknown>;
  close(): Promise<unknown> | void;
}

async function clientRun(kind: string, port: number): Promise<void> {
  let client: LoopClient;
  if (kind === "etcp") {
    const { RedisClient } = await import("../examples/redis_client.ts");
    client = await RedisClient.connect({ port });
  } else {
    // deno-lint-ignore no-import-prefix
    const { Redis } = await import("npm:ioredis@5.11.1");
    const redis = new Redis({ port, host: "127.0.0.1", lazyConnect: true });
    await redis.connect();
    client = {
      set: (k, v) => redis.set(k, v),
      get: (k) => redis.get(k),
      close: () => redis.quit(),
    };
  }
  const concurrency = Number(opts.concurrency);
  const perCaller = Math.ceil(opts.ops / 2 / concurrency);
  const value = "x".repeat(16);
  const loop = async (id: number, rounds: number) => {
    const key = `bench:${id}`;
    for (let i = 0; i < rounds; i++) {
      await client.set(key, value);
      if (await client.get(key) !== value) throw new Error("wrong value");
    }
  };
  // Warm up (JIT, connection), then measure.
  await Promise.all(Array.from({ length: concurrency }, (_, id) => loop(id, 200)));
  const cpu0 = cpuSeconds(Deno.pid);
  const t0 = performance.now();
  await Promise.all(Array.from({ length: concurrency }, (_, id) => loop(id, perCaller)));
  const seconds = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds(Deno.pid) - cpu0;
  const ops = perCaller * concurrency * 2;
  await client.close();
  console.log(
    JSON.stringify({ ops, seconds, opsPerSecond: ops / seconds, cpuUsPerOp: cpu / ops * 1e6 }),
  );
}

if (opts["client-mode"] !== "") {
  await clientRun(opts["client-mode"], opts.port);
  Deno.exit(0);
}

// ---- Servers ------------------------------------------------------------------------------------

const why = missing("redisServer", "redisBenchmark");
if (why !== undefined) {
  console.error(`bench/redis.ts: ${why}`);
  Deno.exit(1);
}

interface Started {
  port: number;
  pid: number;
  stop(): Promise<void>;
}

// The redis-server the tests use too (a free port, no persistence, ready once it says so).
const startRedis = (): Promise<Started> => startRedisServer();

// (20 s: a first run may compile the example.)
const startExample = (): Promise<Started> =>
  spawnListening([DENO, "run", "-A", EXAMPLE, "--port", "0"], "examples/redis_server.ts", 20_000);

interface BenchResult {
  rps: Record<string, number>;
  cpuUsPerRequest: number;
}

/** redis-benchmark against `server`: requests/s per test, and the server's CPU per request. */
async function redisBenchmark(server: Started, pipeline: number): Promise<BenchResult> {
  const cpu0 = cpuSeconds(server.pid);
  const child = spawn([
    tools.redisBenchmark!,
    "-h",
    "127.0.0.1",
    "-p",
    String(server.port),
    "-t",
    "ping,set,get",
    "-c",
    String(opts.clients),
    "-n",
    String(opts.requests),
    "-P",
    String(pipeline),
    "--csv",
  ]);
  const status = await child.process.status;
  await Promise.all([child.stdout.done, child.stderr.done]);
  const cpu = cpuSeconds(server.pid) - cpu0;
  if (!status.success) {
    throw new Error(`redis-benchmark: exit ${status.code}: ${child.stderr.tail()}`);
  }
  const rps: Record<string, number> = {};
  for (const line of child.stdout.tail().split("\n")) {
    const m = /^"([A-Z_]+)","([\d.]+)"/.exec(line);
    if (m) rps[m[1]] = Number(m[2]);
  }
  const tests = Object.keys(rps).length;
  if (tests === 0) throw new Error(`redis-benchmark printed no results: ${child.stdout.tail()}`);
  return { rps, cpuUsPerRequest: cpu / (tests * opts.requests) * 1e6 };
}

const best = (results: BenchResult[]): BenchResult => ({
  rps: Object.fromEntries(
    Object.keys(results[0].rps).map((t) => [t, Math.max(...results.map((r) => r.rps[t] ?? 0))]),
  ),
  cpuUsPerRequest: Math.min(...results.map((r) => r.cpuUsPerRequest)),
});

const fmt = (n: number) =>
  n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : n.toFixed(0);

const json: Record<string, unknown> = {};
const lines: string[] = [];

try {
  if (opts.only === "" || opts.only === "servers") {
    lines.push(
      `redis-benchmark -t ping,set,get -c ${opts.clients} -n ${opts.requests} (requests/s, best of ${opts.rounds})`,
      "",
      "| test | redis-server | examples/redis_server.ts | ratio | target |",
      "| ---- | ------------ | ------------------------ | ----- | ------ |",
    );
    const cpuLines: string[] = [];
    for (const pipeline of [1, opts.pipeline]) {
      const runs: Record<"redis" | "etcp", BenchResult[]> = { redis: [], etcp: [] };
      for (let round = 0; round < opts.rounds; round++) {
        for (const side of ["redis", "etcp"] as const) {
          console.error(`servers: ${side}, -P ${pipeline}, round ${round + 1}/${opts.rounds}`);
          const server = side === "redis" ? await startRedis() : await startExample();
          try {
            runs[side].push(await redisBenchmark(server, pipeline));
          } finally {
            await server.stop();
          }
        }
      }
      const redis = best(runs.redis);
      const etcp = best(runs.etcp);
      const target = pipeline === 1 ? 0.6 : 0.4;
      for (const test of Object.keys(redis.rps)) {
        const ratio = (etcp.rps[test] ?? 0) / redis.rps[test];
        lines.push(
          `| ${test}${pipeline > 1 ? `, -P ${pipeline}` : ""} | ${fmt(redis.rps[test])} | ${
            fmt(etcp.rps[test] ?? 0)
          } | ${ratio.toFixed(2)}× | ≥ ${target}× |`,
        );
      }
      cpuLines.push(
        `-P ${pipeline}: redis-server ${redis.cpuUsPerRequest.toFixed(2)} µs, example ${
          etcp.cpuUsPerRequest.toFixed(2)
        } µs`,
      );
      json[`servers-P${pipeline}`] = { redis, etcp };
    }
    lines.push("", `Server CPU per request: ${cpuLines.join("; ")}.`, "");
  }

  if (opts.only === "" || opts.only === "clients") {
    lines.push(
      `Clients against redis-server: SET then GET of a 16-byte value per caller, ${opts.ops} commands (ops/s, best of ${opts.rounds})`,
      "",
      "| callers | npm:ioredis | examples/redis_client.ts | ratio | target | client CPU µs/op (ioredis / etcp) |",
      "| ------- | ----------- | ------------------------ | ----- | ------ | --------------------------------- |",
    );
    const redis = await startRedis();
    try {
      for (const concurrency of opts.concurrency.split(",").map(Number)) {
        const runs: Record<"ioredis" | "etcp", Record<string, number>[]> = {
          ioredis: [],
          etcp: [],
        };
        for (let round = 0; round < opts.rounds; round++) {
          for (const side of ["ioredis", "etcp"] as const) {
            console.error(
              `clients: ${side}, ${concurrency} callers, round ${round + 1}/${opts.rounds}`,
            );
            runs[side].push(
              await runJson([
                DENO,
                "run",
                "-A",
                SELF,
                "--client-mode",
                side,
                "--port",
                String(redis.port),
                "--ops",
                String(opts.ops),
                "--concurrency",
                String(concurrency),
              ], 300_000),
            );
          }
        }
        const top = (side: "ioredis" | "etcp") =>
          runs[side].reduce((a, b) => (b.opsPerSecond > a.opsPerSecond ? b : a));
        const [io, ours] = [top("ioredis"), top("etcp")];
        lines.push(
          `| ${concurrency} | ${fmt(io.opsPerSecond)} | ${fmt(ours.opsPerSecond)} | ${
            (ours.opsPerSecond / io.opsPerSecond).toFixed(2)
          }× | ≥ 1.0× | ${io.cpuUsPerOp.toFixed(1)} / ${ours.cpuUsPerOp.toFixed(1)} |`,
        );
        json[`clients-${concurrency}`] = { ioredis: io, etcp: ours };
      }
    } finally {
      await redis.stop();
    }
  }
} finally {
  killAll();
}

console.log(lines.join("\n"));
if (opts.json) console.log(JSON.stringify(json));
