// OpenTelemetry metrics: read back with an in-process metric reader (the SDK's MetricReader
// behind the global meter provider of npm:@opentelemetry/api) with their names, attributes and
// values, for a server over TCP and a pool; under OTEL_DENO=true, Deno's own exporter sends them
// (to a local OTLP endpoint); and the module loads @opentelemetry/api only when metrics are on.

import assert from "node:assert/strict";
// (The API as the module names it, so that both share one global meter provider.)
// deno-lint-ignore no-import-prefix
import { metrics } from "npm:@opentelemetry/api@^1.9.0";
// deno-lint-ignore no-import-prefix
import { MeterProvider, MetricReader } from "npm:@opentelemetry/sdk-metrics@2.12.1";
import {
  createPool,
  type HandlerGenerator,
  hibernate,
  lengthPrefixed,
  memory,
  reply,
  send,
  serve,
  stop,
} from "../mod.ts";
import { evalInChild, HOST, portOf, readExactly, within } from "./_support.ts";

const quiet = { error() {}, warn() {}, debug() {} };

class TestReader extends MetricReader {
  protected onForceFlush(): Promise<void> {
    return Promise.resolve();
  }
  protected onShutdown(): Promise<void> {
    return Promise.resolve();
  }
}

const reader = new TestReader();
const provider = new MeterProvider({ readers: [reader] });
assert.ok(metrics.setGlobalMeterProvider(provider), "the test's provider is the global one");

type Point = { attributes: Record<string, unknown>; value: unknown };

// The data points of every `etcp` instrument, by name, for one owner (server or pool name).
async function collect(owner: string): Promise<Map<string, Point[]>> {
  const { resourceMetrics, errors } = await reader.collect();
  assert.deepEqual(errors, []);
  const out = new Map<string, Point[]>();
  for (const scope of resourceMetrics.scopeMetrics) {
    if (scope.scope.name !== "etcp") continue;
    for (const metric of scope.metrics) {
      const points = (metric.dataPoints as Point[]).filter((p) =>
        p.attributes["etcp.owner"] === owner
      );
      if (points.length > 0) out.set(metric.descriptor.name, points);
    }
  }
  return out;
}

// The value of the one point of `name` whose attributes include `extra`.
function valueOf(got: Map<string, Point[]>, name: string, extra: Record<string, unknown> = {}) {
  const points = (got.get(name) ?? []).filter((p) =>
    Object.entries(extra).every(([k, v]) => p.attributes[k] === v)
  );
  assert.equal(points.length, 1, `${name} ${JSON.stringify(extra)}: ${JSON.stringify(points)}`);
  return points[0].value;
}

async function units(): Promise<Map<string, string>> {
  const { resourceMetrics } = await reader.collect();
  const out = new Map<string, string>();
  for (const scope of resourceMetrics.scopeMetrics) {
    for (const m of scope.metrics) out.set(m.descriptor.name, m.descriptor.unit);
  }
  return out;
}

Deno.test("metrics: a server's counters, gauges and call durations read back with their names, attributes and values", async () => {
  const name = "metrics-server";
  const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
    for (let ev = yield; ev.type !== "disconnect" && ev.type !== "shutdown";) {
      if (ev.type === "packet") ev = yield send(ev.data);
      else if (ev.type === "call" && ev.message === "q") ev = yield reply(ev.from, "a");
      else if (ev.type === "cast") ev = yield stop("kicked");
      else if (ev.type === "info") ev = yield hibernate();
      else ev = yield; // a call left unanswered: it times out
    }
  }, { hostname: HOST, port: 0, name, framing: lengthPrefixed(4), metrics: true, logger: quiet });
  const port = portOf(server.addr);
  const first = await Deno.connect({ hostname: HOST, port });
  const frame = new Uint8Array([0, 0, 0, 5, 104, 101, 108, 108, 111]);
  await first.write(frame);
  assert.deepEqual(await within(5000, readExactly(first, 9), "echo"), frame);
  const second = await Deno.connect({ hostname: HOST, port });
  await server.waitForConnections("==", 2, { timeout: 5000 });
  const [conn1, conn2] = server.connections(); // in the order accepted: first, second
  conn2.cast("kick");
  await conn2.closed;
  assert.equal(await conn1.call("q"), "a");
  await assert.rejects(conn1.call("never", { timeout: 1 }), { name: "TimeoutError" });
  conn1.info("sleep");
  for (let i = 0; i < 100 && !conn1.hibernating; i++) await Promise.resolve();

  let got = await collect(name);
  const server_ = { "etcp.owner": name, "etcp.kind": "server" };
  assert.deepEqual(got.get("etcp.connections.accepted")?.[0].attributes, server_);
  assert.equal(valueOf(got, "etcp.connections.accepted"), 2);
  assert.equal(valueOf(got, "etcp.connections.open"), 1);
  assert.equal(valueOf(got, "etcp.connections.hibernated"), 1);
  assert.equal(valueOf(got, "etcp.connections.closed", { "etcp.close.reason": "kicked" }), 1);
  assert.equal(valueOf(got, "etcp.bytes", { "network.io.direction": "receive" }), 9);
  assert.equal(valueOf(got, "etcp.bytes", { "network.io.direction": "transmit" }), 9);
  assert.equal(valueOf(got, "etcp.frames", { "network.io.direction": "receive" }), 1);
  assert.equal(valueOf(got, "etcp.frames", { "network.io.direction": "transmit" }), 1);
  const ok = valueOf(got, "etcp.call.duration", { "etcp.call.outcome": "ok" }) as {
    count: number;
    sum: number;
  };
  assert.equal(ok.count, 1);
  assert.ok(ok.sum >= 0 && ok.sum < 5, `${ok.sum} s`);
  const late = valueOf(got, "etcp.call.duration", { "etcp.call.outcome": "timeout" }) as {
    count: number;
  };
  assert.equal(late.count, 1);
  assert.equal(got.get("etcp.pool.reconnects"), undefined, "servers have none");

  const unitOf = await units();
  assert.equal(unitOf.get("etcp.bytes"), "By");
  assert.equal(unitOf.get("etcp.call.duration"), "s");
  assert.equal(unitOf.get("etcp.connections.open"), "{connection}");

  // The first leaves: its bytes stay counted (cumulative), the open count goes down.
  first.close();
  await server.waitForConnections("==", 0, { timeout: 5000 });
  got = await collect(name);
  assert.equal(valueOf(got, "etcp.connections.open"), 0);
  assert.equal(valueOf(got, "etcp.connections.closed", { "etcp.close.reason": "normal" }), 1);
  assert.equal(valueOf(got, "etcp.bytes", { "network.io.direction": "receive" }), 9);
  second.close();
  await server.stop();
  got = await collect(name);
  assert.equal(valueOf(got, "etcp.connections.open"), 0);
});

Deno.test("metrics: a pool's reconnects, closes and call durations", async () => {
  const name = "metrics-pool";
  const transport = memory("metrics-pool");
  const server = await serve(async function* () {
    yield;
  }, { transport, metrics: false });
  const pool = await createPool(async function* () {
    for (let ev = yield; ev.type === "call"; ev = yield reply(ev.from, "pong"));
  }, {
    addresses: [{ transport }],
    name,
    metrics: true,
    waitReady: true,
    reconnect: { initialDelay: 1 },
  });
  assert.equal(await pool.call("ping"), "pong");
  pool.connections()[0].cast("leave"); // its handler returns: the pool reconnects
  for (let i = 0; i < 5000 && pool.stats().reconnects < 1; i++) {
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  const got = await collect(name);
  const attributes = { "etcp.owner": name, "etcp.kind": "pool" };
  assert.deepEqual(got.get("etcp.pool.reconnects")?.[0].attributes, attributes);
  assert.equal(valueOf(got, "etcp.pool.reconnects"), 1);
  assert.equal(valueOf(got, "etcp.connections.open"), 1);
  assert.equal(valueOf(got, "etcp.connections.closed", { "etcp.close.reason": "normal" }), 1);
  const calls = valueOf(got, "etcp.call.duration", { "etcp.call.outcome": "ok" }) as {
    count: number;
  };
  assert.equal(calls.count, 1);
  assert.equal(got.get("etcp.connections.accepted"), undefined, "pools accept nothing");
  assert.equal((await collect(server.name)).size, 0, "metrics: false reports nothing");
  await pool.stop();
  await server.stop();
});

Deno.test("metrics: bad option values are refused", async () => {
  await assert.rejects(
    serve(async function* () {}, {
      transport: memory("metrics-bad"),
      metrics: "yes" as unknown as boolean,
    }),
    { name: "TypeError", message: /option metrics must be true or false/ },
  );
});

Deno.test("metrics: the module imports @opentelemetry/api only dynamically, from _metrics.ts", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", new URL("../mod.ts", import.meta.url).pathname],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  const info = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    modules: { specifier: string; dependencies?: { specifier: string; isDynamic?: boolean }[] }[];
  };
  const npm = info.modules.flatMap((m) =>
    (m.dependencies ?? []).filter((d) => d.specifier.startsWith("npm:")).map((d) => ({
      from: m.specifier.replace(/^.*\//, ""),
      specifier: d.specifier,
      isDynamic: d.isDynamic === true,
    }))
  );
  assert.deepEqual(npm, [
    { from: "_metrics.ts", specifier: "npm:@opentelemetry/api@^1.9.0", isDynamic: true },
  ]);
});

// Runs a child process that serves, takes one connection and stops, with `env`; returns what it
// printed (whether @opentelemetry/api registered anything) and the OTLP requests it made.
async function child(env: Record<string, string>): Promise<{ printed: string; otlp: string[] }> {
  const otlp: string[] = [];
  const sink = Deno.serve({ hostname: HOST, port: 0, onListen() {} }, async (req) => {
    const body = new Uint8Array(await req.arrayBuffer());
    // Protobuf keeps strings as they are: the names and attributes can be read in the bytes.
    otlp.push(`${new URL(req.url).pathname} ${new TextDecoder().decode(body)}`);
    return new Response(null, { status: 200 });
  });
  const script = `
    import { connect, serve } from ${JSON.stringify(new URL("../mod.ts", import.meta.url).href)};
    const server = await serve(async function* () {}, { hostname: "127.0.0.1", port: 0, name: "otel-child" });
    const client = await connect(async function* () { yield; }, { port: server.addr.port });
    await client.closed;
    await server.waitForConnections("==", 0);
    await server.stop();
    console.log(Symbol.for("opentelemetry.js.api.1") in globalThis ? "api loaded" : "api not loaded");
  `;
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=ts", script],
      env: { ...env, OTEL_EXPORTER_OTLP_ENDPOINT: `http://${HOST}:${sink.addr.port}` },
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    return { printed: new TextDecoder().decode(out.stdout).trim(), otlp };
  } finally {
    await sink.shutdown();
  }
}

Deno.test("metrics: under OTEL_DENO=true, Deno's own exporter sends them; without it, nothing is loaded", async () => {
  const off = await child({ OTEL_DENO: "" });
  assert.equal(off.printed, "api not loaded");
  assert.deepEqual(off.otlp, []);

  const on = await child({ OTEL_DENO: "true" });
  const sent = on.otlp.filter((r) => r.startsWith("/v1/metrics ")).join("\n");
  for (const text of ["etcp.connections.accepted", "etcp.connections.closed", "otel-child"]) {
    assert.ok(sent.includes(text), `${text} sent to the OTLP endpoint`);
  }
});

Deno.test("metrics: a meter provider registered after the first metrics server gets the servers made after it", async () => {
  // A fresh process: the provider must not be registered yet when the first server starts.
  const script = `
    import { metrics } from "npm:@opentelemetry/api@^1.9.0";
    import { MeterProvider, MetricReader } from "npm:@opentelemetry/sdk-metrics@2.12.1";
    import { serve } from "./mod.ts";
    class Reader extends MetricReader {
      onForceFlush() { return Promise.resolve(); }
      onShutdown() { return Promise.resolve(); }
    }
    const handler = async function* () { yield; };
    const early = await serve(handler, { hostname: "127.0.0.1", port: 0, metrics: true });
    const reader = new Reader();
    metrics.setGlobalMeterProvider(new MeterProvider({ readers: [reader] }));
    const late = await serve(handler, { hostname: "127.0.0.1", port: 0, metrics: true });
    const peer = await Deno.connect({ hostname: "127.0.0.1", port: late.addr.port });
    await late.waitForConnections("==", 1);
    const { resourceMetrics } = await reader.collect();
    const names = resourceMetrics.scopeMetrics.flatMap((s) => s.metrics.map((m) => m.descriptor.name));
    console.log(JSON.stringify(names.sort()));
    peer.close();
    await early.stop();
    await late.stop();
  `;
  const out = await evalInChild(script, 30_000);
  assert.equal(out.code, 0, out.stderr);
  const names: string[] = JSON.parse(out.stdout);
  assert.ok(names.includes("etcp.connections.accepted"), out.stdout);
  assert.ok(names.includes("etcp.connections.open"), out.stdout);
});
