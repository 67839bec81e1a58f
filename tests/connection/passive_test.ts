// Passive mode reads only on recv (with its recvTimeout); an active connection may not recv.

import assert from "node:assert/strict";
import {
  type Event,
  type HandlerGenerator,
  ProtocolError,
  recv,
  send,
  setTimeout as arm,
} from "../../mod.ts";
import {
  capturingLogger,
  counting,
  echo,
  encoder,
  idle,
  Inbox,
  label,
  lineClient,
  lineServer,
  logNames,
  NEXT_MS,
  transportFor,
  within,
} from "./_support.ts";

// ---- Passive mode -------------------------------------------------------------------------

Deno.test("passive: frames are read only on recv, one packet per recv, in order", async () => {
  const counted = counting(transportFor("passive"));
  const got = new Inbox<string>(NEXT_MS);
  await using s = await lineServer(counted.transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield;
    for (;;) {
      if (ev.type === "shutdown" || ev.type === "disconnect") return;
      got.push(label(ev));
      // Events other than packets come without recv; reading starts with the cast "go".
      const reading = ev.type === "packet" || (ev.type === "cast" && ev.message === "go");
      ev = reading ? yield recv() : yield; // recv without a timeout: waits as long as it takes
    }
  }, { mode: "passive" });
  await using client = await lineClient(counted.transport, idle);
  await Promise.all([client.sendSync("a"), client.sendSync("b"), client.sendSync("c")]);
  const conn = await s.conns.next();
  conn.info("probe");
  assert.equal(await got.next(), "info probe");
  assert.equal(counted.accepted[0].bytesRead, 0, "read before any recv");
  conn.cast("go");
  assert.equal(await got.next(), "cast go");
  assert.equal(await got.next(), "packet a");
  assert.equal(await got.next(), "packet b");
  assert.equal(await got.next(), "packet c");
  // The fourth recv finds nothing buffered and waits for the next frame.
  await client.sendSync("d");
  assert.equal(await got.next(), "packet d");
  assert.equal(got.size, 0);
});

Deno.test("passive: recv(timeoutMs) yields recvTimeout when nothing comes; a frame in time cancels it", async () => {
  const transport = transportFor("passive-timeout");
  const got: string[] = [];
  const done = Promise.withResolvers<void>();
  await using _s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    let ev: Event<string> = yield recv(30); // the client sends nothing yet
    got.push(label(ev));
    // Ask the client for a frame and wait for it with a timeout it beats; a later marker shows
    // that no recvTimeout follows.
    ev = yield [send("please"), recv(100), arm(160, "marker")];
    got.push(label(ev));
    ev = yield;
    got.push(label(ev));
    done.resolve();
    for (;;) if ((yield).type === "shutdown") return;
  }, { mode: "passive" });
  await using _client = await lineClient(transport, echo);
  await within(2000, done.promise);
  assert.deepEqual(got, ["recvTimeout", "packet please", "timeout marker"]);
});

Deno.test("passive: recv after the peer closed yields the buffered frames, then disconnect", async () => {
  const transport = transportFor("passive-eof");
  const got: string[] = [];
  await using s = await lineServer(transport, async function* (): HandlerGenerator<string> {
    for (;;) {
      const ev: Event<string> = yield recv(1000);
      got.push(label(ev));
      if (ev.type !== "packet") return;
    }
  }, { mode: "passive" });
  const peer = await transport.connect({});
  await peer.write(encoder.encode("last\nwords\n"));
  peer.close();
  const conn = await s.conns.next();
  assert.equal(await within(2000, conn.closed), "normal");
  assert.deepEqual(got, ["packet last", "packet words", "disconnect"]);
});

Deno.test("active: yielding recv ends the connection with ProtocolError (logged, finally run)", async () => {
  const transport = transportFor("active-recv");
  await using _s = await lineServer(transport, idle);
  const logger = capturingLogger();
  let finallyRan = false;
  // At the first yield: connect() rejects with the error once the connection has closed.
  const reason = await within(
    1000,
    lineClient(transport, async function* (): HandlerGenerator<string> {
      try {
        yield recv();
      } finally {
        finallyRan = true;
      }
    }, { logger }).then(() => "connected", (err: unknown) => err),
  );
  assert.ok(reason instanceof ProtocolError, `expected ProtocolError, got ${reason}`);
  assert.match(reason.message, /passive/);
  assert.ok(finallyRan);
  assert.equal(logger.calls.length, 1);
  assert.ok(logNames(logger.calls[0], reason));
});
