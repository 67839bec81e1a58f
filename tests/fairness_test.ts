// More than 128 busy connections with both ends in this process all make progress. In Deno
// 2.9.6, past 128 saturated connections whose peers live in the same thread, the same 128 get
// every turn and the rest starve (bench/busy_sockets.ts shows it with plain Deno code); the
// library's fair-share gate (_fair_share.ts) holds reads back in turns while that many are busy.
// 256 pool connections echo frames as fast as they can through a server of this process, and
// every one of them must complete its round trips: a count, not a timing (the wait is only a
// bound).

import assert from "node:assert/strict";
import {
  createPool,
  type Event,
  type HandlerGenerator,
  lengthPrefixed,
  send,
  serve,
} from "../mod.ts";
import { HOST, pause, portOf, within } from "./_support.ts";

const CONNECTIONS = 256;
const ROUND_TRIPS = 20; // each connection must complete at least this many
const BOUND_MS = 60_000; // a bound for a loaded machine, not a speed expected

Deno.test("256 busy pool connections to a server in this process all make progress", async () => {
  const framing = lengthPrefixed(4);
  const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
    let ev: Event<Uint8Array> = yield;
    while (ev.type === "packet") ev = yield send(ev.data);
  }, { hostname: HOST, port: 0, framing, maxConnections: Infinity });

  const roundTrips = new Map<string, number>();
  let running = true;
  const payload = new Uint8Array(64).fill(7);
  const pool = await createPool(async function* (conn): HandlerGenerator<Uint8Array> {
    roundTrips.set(conn.id, 0);
    let ev: Event<Uint8Array> = yield; // "go", once every connection is up
    if (ev.type !== "info") return;
    ev = yield send(payload);
    while (ev.type === "packet") {
      assert.deepEqual(ev.data, payload);
      roundTrips.set(conn.id, roundTrips.get(conn.id)! + 1);
      ev = yield running ? send(payload) : undefined;
    }
  }, {
    addresses: [{ hostname: HOST, port: portOf(server.addr) }],
    size: CONNECTIONS,
    framing,
    reconnect: false,
  });
  try {
    await within(
      BOUND_MS,
      (async () => {
        while (pool.stats().addresses[0].up < CONNECTIONS) await pause(10);
      })(),
      `${CONNECTIONS} connections up`,
    );
    const conns = pool.connections();
    assert.equal(conns.length, CONNECTIONS);
    for (const conn of conns) conn.info("go");

    const slowest = () => Math.min(...conns.map((c) => roundTrips.get(c.id) ?? 0));
    await within(
      BOUND_MS,
      (async () => {
        while (slowest() < ROUND_TRIPS) await pause(20);
      })(),
      `every connection completing ${ROUND_TRIPS} round trips`,
    ).catch((err) => {
      const counts = conns.map((c) => roundTrips.get(c.id) ?? 0).sort((a, b) => a - b);
      const starved = counts.filter((n) => n < ROUND_TRIPS).length;
      throw new Error(
        `${err.message}: ${starved} of ${CONNECTIONS} behind (fewest ${counts[0]}, most ${
          counts[counts.length - 1]
        })`,
      );
    });
    assert.ok(slowest() >= ROUND_TRIPS);
  } finally {
    running = false;
    await pool.stop("normal", { timeout: 5000 });
    await server.stop("normal", { timeout: 5000 });
  }
});
