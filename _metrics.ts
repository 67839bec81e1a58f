// OpenTelemetry metrics of servers and pools, through `npm:@opentelemetry/api`, the way Deno
// does it: with `OTEL_DENO=true` Deno registers its own meter provider (and exporter) with that
// package. The package is imported (dynamically) only once metrics are asked for, so a program
// that does not ask never loads it. The instruments read what the servers and pools count
// anyway (observable instruments, sampled at each export): nothing is added per frame.
//
// The names and attributes are listed in the README ("Metrics").

import { loggerOf } from "./_logger.ts";
import type { Logger } from "./connection.ts";
import { ConnectionClosed, describeReason, TimeoutError } from "./errors.ts";
import { reasonLabel } from "./_stats.ts";

// The few shapes of @opentelemetry/api used here, so that nothing imports it statically.
type Attributes = Record<string, string | number | boolean>;
interface Counter {
  add(value: number, attributes?: Attributes): void;
}
interface Histogram {
  record(value: number, attributes?: Attributes): void;
}
interface ObservableResult {
  observe(value: number, attributes?: Attributes): void;
}
interface Observable {
  addCallback(callback: (result: ObservableResult) => void): void;
}
interface InstrumentOptions {
  description?: string;
  unit?: string;
  advice?: { explicitBucketBoundaries?: number[] };
}
interface Meter {
  createCounter(name: string, options?: InstrumentOptions): Counter;
  createHistogram(name: string, options?: InstrumentOptions): Histogram;
  createObservableCounter(name: string, options?: InstrumentOptions): Observable;
  createObservableUpDownCounter(name: string, options?: InstrumentOptions): Observable;
}

/** Times calls to a connection (the driver hands it to `conn.call`). */
export interface CallMetrics {
  /** `calling`, recorded in the call duration histogram once it settles. */
  timeCall<R>(calling: Promise<R>): Promise<R>;
}

/** What a server's or pool's counts are at the moment the instruments are read. */
export interface MetricsSample {
  open: number;
  hibernated: number;
  bytesIn: number;
  bytesOut: number;
  framesIn: number;
  framesOut: number;
  reconnects?: number; // pools only
}

/** A server or a pool, as the metrics see it. */
export interface MetricsSource {
  readonly name: string;
  readonly kind: "server" | "pool";
  sample(): MetricsSample;
}

interface Instruments {
  accepted: Counter;
  closed: Counter;
  callDuration: Histogram;
  // The global meter provider they were made from, and how to read the current one: the API has
  // no proxy provider, so instruments made before the application registers its own go nowhere.
  provider: unknown;
  currentProvider(): unknown;
}

// The sources being observed, read by the observable instruments' callbacks.
const sources = new Set<MetricsSource>();
let loading: Promise<Instruments> | null = null;
let instruments: Instruments | null = null;

/** The version the meter is named with. */
const VERSION = "0.1.0";

/**
 * Whether metrics are on for a server or pool given `option`: the option if set, else whether
 * `OTEL_DENO=true` is in the environment (read only if the permission to is granted already).
 */
export function metricsWanted(option: boolean | undefined): boolean {
  if (option !== undefined) return option;
  try {
    const query = { name: "env", variable: "OTEL_DENO" } as const;
    if (Deno.permissions.querySync?.(query).state !== "granted") return false;
    return Deno.env.get("OTEL_DENO") === "true";
  } catch {
    return false;
  }
}

/**
 * Load `npm:@opentelemetry/api` (once per process) and make the instruments (once), with the
 * global meter provider: Deno's under `OTEL_DENO=true`, or the one registered with
 * `metrics.setGlobalMeterProvider`. Rejects if the package cannot be loaded.
 */
export async function loadMetrics(): Promise<void> {
  // A provider registered since the instruments were made: make them again, from it (servers
  // and pools made from now on count there; the observable ones report every source there).
  if (instruments !== null && instruments.currentProvider() !== instruments.provider) {
    loading = null;
  }
  loading ??= makeInstruments();
  try {
    instruments = await loading;
  } catch (err) {
    loading = null; // tried again by the next server or pool that asks
    throw err;
  }
}

/**
 * Whether a server or pool reports metrics, given its `metrics` option and `logger`: if so,
 * they are loaded. Rejects if `metrics: true` and they cannot be loaded; if they were asked for
 * by `OTEL_DENO=true` only, that is logged and metrics stay off.
 */
export async function metricsOn(option: boolean | undefined, logger?: Logger): Promise<boolean> {
  if (!metricsWanted(option)) return false;
  try {
    await loadMetrics();
    return true;
  } catch (err) {
    if (option) throw err;
    loggerOf(logger).warn(`etcp: OTEL_DENO=true, but no metrics: ${describeReason(err)}`);
    return false;
  }
}

/** Start observing `source`, once {@linkcode loadMetrics} has resolved. */
export function observeMetrics(source: MetricsSource): OwnerMetrics {
  if (instruments === null) throw new Error("observeMetrics before loadMetrics");
  sources.add(source);
  return new OwnerMetrics(source, instruments);
}

async function makeInstruments(): Promise<Instruments> {
  // A range, not a pin: the application's own copy of the API (1.x) is the one used if it has one.
  // deno-lint-ignore no-import-prefix
  const api = await import("npm:@opentelemetry/api@^1.9.0");
  const meter: Meter = api.metrics.getMeter("etcp", VERSION);
  const connection = { unit: "{connection}" };
  const open = meter.createObservableUpDownCounter("etcp.connections.open", {
    ...connection,
    description: "Connections open",
  });
  const hibernated = meter.createObservableUpDownCounter("etcp.connections.hibernated", {
    ...connection,
    description: "Connections whose handler is hibernating",
  });
  const bytes = meter.createObservableCounter("etcp.bytes", {
    unit: "By",
    description: "Bytes read from and written to the sockets of connections",
  });
  const frames = meter.createObservableCounter("etcp.frames", {
    unit: "{frame}",
    description: "Frames decoded from connections, and frames sent on them",
  });
  const reconnects = meter.createObservableCounter("etcp.pool.reconnects", {
    unit: "{connection}",
    description: "Pool connections brought back up by a reconnect",
  });
  // One callback per instrument, each reading every source: sampled once per callback.
  const each =
    (read: (result: ObservableResult, sample: MetricsSample, at: Attributes) => void) =>
    (result: ObservableResult) => {
      for (const source of sources) read(result, source.sample(), attributesOf(source));
    };
  open.addCallback(each((r, s, at) => r.observe(s.open, at)));
  hibernated.addCallback(each((r, s, at) => r.observe(s.hibernated, at)));
  bytes.addCallback(each((r, s, at) => {
    r.observe(s.bytesIn, { ...at, "network.io.direction": "receive" });
    r.observe(s.bytesOut, { ...at, "network.io.direction": "transmit" });
  }));
  frames.addCallback(each((r, s, at) => {
    r.observe(s.framesIn, { ...at, "network.io.direction": "receive" });
    r.observe(s.framesOut, { ...at, "network.io.direction": "transmit" });
  }));
  reconnects.addCallback(each((r, s, at) => {
    if (s.reconnects !== undefined) r.observe(s.reconnects, at);
  }));
  return {
    provider: api.metrics.getMeterProvider(),
    currentProvider: () => api.metrics.getMeterProvider(),
    accepted: meter.createCounter("etcp.connections.accepted", {
      ...connection,
      description: "Connections a server accepted",
    }),
    closed: meter.createCounter("etcp.connections.closed", {
      ...connection,
      description: "Connections that closed, by reason",
    }),
    callDuration: meter.createHistogram("etcp.call.duration", {
      unit: "s",
      description: "Time from conn.call (or pool.call) to its reply, timeout or failure",
      advice: {
        explicitBucketBoundaries: [
          0.0001,
          0.00025,
          0.0005,
          0.001,
          0.0025,
          0.005,
          0.01,
          0.025,
          0.05,
          0.1,
          0.25,
          0.5,
          1,
          2.5,
          5,
          10,
        ],
      },
    }),
  };
}

function attributesOf(source: MetricsSource): Attributes {
  return { "etcp.owner": source.name, "etcp.kind": source.kind };
}

/** One server's or pool's instruments: what it reports as it happens. */
export class OwnerMetrics implements CallMetrics {
  readonly #source: MetricsSource;
  readonly #instruments: Instruments;
  readonly #attributes: Attributes;

  constructor(source: MetricsSource, made: Instruments) {
    this.#source = source;
    this.#instruments = made;
    this.#attributes = attributesOf(source);
  }

  /** A connection was accepted. */
  accepted(): void {
    this.#instruments.accepted.add(1, this.#attributes);
  }

  /** A connection closed with `reason`. */
  closed(reason: unknown): void {
    this.#instruments.closed.add(1, {
      ...this.#attributes,
      "etcp.close.reason": reasonLabel(reason),
    });
  }

  timeCall<R>(calling: Promise<R>): Promise<R> {
    const start = performance.now();
    const record = (outcome: string) =>
      this.#instruments.callDuration.record((performance.now() - start) / 1000, {
        ...this.#attributes,
        "etcp.call.outcome": outcome,
      });
    return calling.then(
      (value) => {
        record("ok");
        return value;
      },
      (err) => {
        record(
          err instanceof TimeoutError
            ? "timeout"
            : err instanceof ConnectionClosed
            ? "closed"
            : "error",
        );
        throw err;
      },
    );
  }

  /** Stop observing (the server or pool has stopped): its series are no longer reported. */
  stop(): void {
    sources.delete(this.#source);
  }
}
