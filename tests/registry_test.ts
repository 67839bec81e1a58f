// MemoryRegistry and connection ids: ids and registered names share lookup(), so a name may
// never look like an id; the ids themselves come from registry.ts.

import assert from "node:assert/strict";
import { type ConnectionRef, MemoryRegistry, type RegistryEntry } from "../mod.ts";
import { isConnectionId, newConnectionId } from "../registry.ts";
import { evalInChild } from "./_support.ts";

/** A registry entry and a stand-in connection for `id`. */
function fake(id: string): { entry: RegistryEntry; conn: ConnectionRef } {
  const addr = { transport: "memory" as const, name: "registry-test" };
  const entry: RegistryEntry = {
    id,
    owner: "registry-test",
    node: "test",
    kind: "server",
    remoteAddr: addr,
    localAddr: addr,
    startedAt: Date.now(),
  };
  const conn = { id, name: undefined } as unknown as ConnectionRef;
  return { entry, conn };
}

function registryOf(ids: string[]): { registry: MemoryRegistry; conns: ConnectionRef[] } {
  const registry = new MemoryRegistry();
  const conns = ids.map((id) => {
    const { entry, conn } = fake(id);
    registry.add(entry, conn);
    return conn;
  });
  return { registry, conns };
}

Deno.test("registry: newConnectionId gives c<N>.<process part> ids, unique and increasing", () => {
  const ids = Array.from({ length: 100 }, () => newConnectionId());
  assert.equal(new Set(ids).size, ids.length);
  const suffixes = new Set<string>();
  const numbers = ids.map((id) => {
    const [, n, suffix] = id.match(/^c([1-9][0-9]*)\.([0-9a-z]{8})$/) ?? assert.fail(id);
    suffixes.add(suffix);
    return Number(n);
  });
  assert.equal(suffixes.size, 1); // one process part per process
  for (let i = 1; i < numbers.length; i++) assert.ok(numbers[i] > numbers[i - 1]);
  for (const id of ids) assert.ok(isConnectionId(id), id);
});

Deno.test("registry: ids of different processes differ in their process part", async () => {
  const { code, stdout } = await evalInChild(
    'import { newConnectionId } from "./registry.ts"; console.log(newConnectionId());',
  );
  assert.equal(code, 0);
  const theirs = stdout.trim();
  const ours = newConnectionId();
  assert.ok(isConnectionId(theirs), theirs);
  assert.notEqual(theirs.split(".")[1], ours.split(".")[1]);
});

Deno.test("registry: isConnectionId is true for c, digits and an optional .part only", () => {
  for (const text of ["c1", "c42", "c1000000", "c0", "c1.k3x9a0qz", "c7.a", "c12.0"]) {
    assert.equal(isConnectionId(text), true, text);
  }
  for (
    const text of [
      "",
      "c",
      "C1",
      "1",
      "c1a",
      "ac1",
      " c1",
      "c1 ",
      "c-1",
      "c1.",
      "c1.A",
      "c1.a-b",
      "c1.a.b",
      "c.a",
      "c1.k3x9a0qz ",
      "alice",
    ]
  ) {
    assert.equal(isConnectionId(text), false, JSON.stringify(text));
  }
});

Deno.test("registry: list filters by name", async () => {
  const [a, b] = [newConnectionId(), newConnectionId()];
  const { registry } = registryOf([a, b]);
  assert.equal(registry.claim(b, "bob"), true);
  assert.deepEqual((await registry.list({ name: "bob" })).map((e) => e.id), [b]);
  assert.deepEqual(await registry.list({ name: "nobody" }), []);
});

Deno.test("registry: a name that looks like a connection id is refused, so lookup of an id finds that connection", async () => {
  const ids = [newConnectionId(), newConnectionId(), newConnectionId()];
  const { registry, conns } = registryOf(ids);
  const [claimant, , target] = ids;
  assert.throws(
    () => registry.claim(claimant, target),
    (err: unknown) =>
      err instanceof TypeError &&
      err.message === `name "${target}" looks like a connection id; ids and names share lookup()`,
  );
  assert.throws(() => registry.claim(claimant, "c999999999"), TypeError); // no such id yet
  assert.equal(await registry.lookup(target), conns[2]);
  const [entry] = (await registry.list()).filter((e) => e.id === claimant);
  assert.equal(entry.name, undefined);
});

Deno.test("registry: an empty name or one that is not a string is refused with a TypeError", () => {
  const id = newConnectionId();
  const { registry } = registryOf([id]);
  assert.throws(() => registry.claim(id, ""), TypeError);
  for (const bad of [undefined, null, 42, {}, Symbol("x")]) {
    assert.throws(() => registry.claim(id, bad as unknown as string), TypeError, String(bad));
  }
});

Deno.test("registry: names are claimed, kept unique, moved and freed", async () => {
  const [a, b] = [newConnectionId(), newConnectionId()];
  const { registry, conns } = registryOf([a, b]);
  assert.equal(registry.claim(a, "alice"), true);
  assert.equal(registry.claim(a, "alice"), true); // already its own
  assert.equal(registry.claim(b, "alice"), false); // taken
  assert.equal(await registry.lookup("alice"), conns[0]);
  assert.equal(registry.claim(a, "c-alice"), true); // not id-shaped: fine; "alice" is freed
  assert.equal(await registry.lookup("alice"), undefined);
  assert.equal(registry.claim(b, "alice"), true);
  assert.equal(await registry.lookup("alice"), conns[1]);
  assert.equal(registry.claim("c0", "nobody"), false); // no such connection
  registry.remove(b);
  assert.equal(await registry.lookup("alice"), undefined);
  assert.equal(await registry.lookup(a), conns[0]);
  assert.equal(await registry.lookup("c-alice"), conns[0]);
});
