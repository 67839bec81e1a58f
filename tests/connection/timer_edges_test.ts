// Timers at their edges: a timer's event that fired during a busy step is taken back when the
// timer is cancelled or re-armed, Infinity means never, delays past 2^31 - 1 ms are chained
// (not fired at once), and bad delays are refused up front.

import assert from "node:assert/strict";
import {
  type Connection,
  type HandlerGenerator,
  recv,
  setTimeout as arm,
  type SetTimeoutAction,
} from "../../mod.ts";
import { evalInChild, Inbox } from "../_support.ts";
import { lineRig, writeText } from "./_rig.ts";

// The handler's step on "busy" waits (an await) until the test lets it go: a timer set to fire
// meanwhile lands in the mailbox before the step's actions are performed.
function busyHandler(
  release: Inbox<void>,
  events: Inbox<string>,
  actions: (ev: string) => ReturnType<typeof arm>[],
) {
  return async function* (_conn: Connection<string>): HandlerGenerator<string> {
    let ev = yield;
    for (;;) {
      const seen = ev.type === "timeout"
        ? `timeout ${ev.name ?? ""}`.trim()
        : ev.type === "packet"
        ? ev.data
        : ev.type;
      events.push(seen);
      if (ev.type === "shutdown") return;
      if (seen.startsWith("busy")) {
        await release.next(3000, "release");
        ev = yield actions(seen);
      } else if (seen.startsWith("arm")) {
        ev = yield actions(seen);
      } else {
        ev = yield;
      }
    }
  };
}

/**
 * A handler that arms `armIt` on "arm", then on "busy" waits in its step until `release`, and
 * ends that step with `settle`; the test lets the armed timer (5 ms) fire meanwhile.
 */
async function timerFiredWhileBusy(
  label: string,
  armIt: SetTimeoutAction,
  settle: SetTimeoutAction,
) {
  const release = new Inbox<void>();
  const events = new Inbox<string>(3000);
  const rig = await lineRig(
    label,
    busyHandler(release, events, (ev) => ev === "arm" ? [armIt] : ev === "busy" ? [settle] : []),
  );
  const { peer } = await rig.open();
  await writeText(peer, "arm\n");
  assert.equal(await events.next(), "arm");
  await writeText(peer, "busy\n");
  assert.equal(await events.next(), "busy");
  // The timer fires while the step is busy (there is no event for that: wait it out), then the
  // step ends with the cancel or re-arm.
  await new Promise((r) => globalThis.setTimeout(r, 30));
  release.push();
  return { rig, peer, events };
}

for (
  const [label, armIt, settle] of [
    ["cancelled", arm(5, "t"), arm(null, "t")],
    ["replaced", arm(5, "t"), arm(60_000, "t")],
  ] as const
) {
  Deno.test(`timer ${label} in a busy step after it fired: its stale event is not delivered`, async () => {
    const { rig, peer, events } = await timerFiredWhileBusy(`stale-${label}`, armIt, settle);
    await using _rig = rig;
    // A marker that must be the next event: nothing stale in between.
    await writeText(peer, "marker\n");
    assert.equal(await events.next(), "marker", "no stale timeout event");
  });
}

Deno.test("named timer re-armed in a busy step after it fired: fires once, for the new arming", async () => {
  const { rig, peer, events } = await timerFiredWhileBusy(
    "rearmed-once",
    arm(5, "t"),
    arm(40, "t"),
  );
  await using _rig = rig;
  assert.equal(await events.next(), "timeout t");
  await writeText(peer, "marker\n");
  assert.equal(await events.next(), "marker", "it fired once");
});

Deno.test("passive: a recvTimeout that fired during a busy step is taken back by the next recv", async () => {
  const release = new Inbox<void>();
  const events = new Inbox<string>(3000);
  await using rig = await lineRig("stale-recv", async function* () {
    let ev = yield recv(5);
    for (;;) {
      events.push(ev.type === "packet" ? ev.data : ev.type);
      if (ev.type === "cast") {
        await release.next(3000, "release"); // busy while the recv times out
        ev = yield recv(60_000);
      } else if (ev.type === "shutdown") return;
      else ev = yield recv(60_000);
    }
  }, { mode: "passive" });
  const { peer, conn } = await rig.open();
  conn.cast("busy");
  assert.equal(await events.next(), "cast");
  await new Promise((r) => globalThis.setTimeout(r, 30)); // recv(5) times out meanwhile
  release.push();
  await writeText(peer, "frame\n");
  assert.equal(await events.next(), "frame", "no stale recvTimeout before the frame");
});

Deno.test("timers: Infinity never fires, 3e9 ms does not fire at once, and neither warns", async () => {
  // In a child process, so that any runtime warning on stderr is seen.
  const script = `
    import { connect, lines, memory, serve, setTimeout as arm, reply } from "./mod.ts";
    const transport = memory("long-timers");
    const fired = [];
    const server = await serve(async function* () {
      let ev = yield [arm(Infinity, "inf"), arm(3e9, "long"), arm(3e9)];
      for (;;) {
        if (ev.type === "timeout") fired.push(ev.name ?? "event");
        if (ev.type === "call") {
          const from = ev.from;
          await new Promise((r) => setTimeout(r, 60));
          ev = yield reply(from, fired.slice());
        } else if (ev.type === "shutdown") return;
        else ev = yield;
      }
    }, { transport, framing: lines() });
    const client = await connect(async function* () { yield; }, { transport, framing: lines() });
    await new Promise((r) => setTimeout(r, 100));
    const [conn] = server.connections();
    const seen = await conn.call("fired?", { timeout: Infinity });
    console.log(JSON.stringify(seen));
    await client.stop();
    await server.stop();
  `;
  const out = await evalInChild(script);
  assert.equal(out.code, 0, out.stderr);
  assert.equal(out.stdout.trim(), "[]", "no timer fired");
  assert.equal(out.stderr, "", "nothing printed: no TimeoutOverflowWarning");
});

Deno.test("timers: negative, NaN and non-number delays are refused up front", async () => {
  for (const bad of [-1, NaN, "5" as unknown as number]) {
    assert.throws(() => arm(bad), RangeError);
    assert.throws(() => arm(bad, "n"), RangeError);
    assert.throws(() => recv(bad), RangeError);
  }
  await using rig = await lineRig("bad-call-timeout", async function* () {
    for (let ev = yield; ev.type !== "shutdown"; ev = yield);
  });
  const { conn } = await rig.open();
  await assert.rejects(conn.call("x", { timeout: -5 }), RangeError);
  await assert.rejects(conn.stop("x", { timeout: NaN }), RangeError);
  assert.equal(conn.closeReason, undefined, "refusals leave the connection alone");
});
