// Fair turns for many busy sockets whose both ends live in this thread.
//
// Deno 2.9.6 completes a thread's socket ops from one task, under tokio's cooperative budget of
// 128 operations per poll. When both ends of more than 128 saturated connections live in one
// thread (a pool talking to a server in the same process, a test), each read finds its data
// already there, the same 128 connections use up the budget at every poll, and the others
// starve: their reads are never completed (bench/busy_sockets.ts shows it with plain Deno code).
// Peers in another process are served fairly, so only connections whose peer is a connection
// of this process are counted and held back.
//
// The gate: while more than BUSY such connection ends are busy, reads take turns. QUOTA reads pass
// per turn, the others wait in order for a later turn, and a turn is one timer macrotask
// (setTimeout 0, about 1-2 ms in Deno): in the quiet between turns the op driver reaches the
// sockets it skipped. Measured, and why nothing cheaper: more than about 64 reads per turn, or
// a turn on a microtask, setImmediate, a MessageChannel or any faster hop, and the same
// connections starve again. So while engaged, in-process traffic is capped at about QUOTA reads
// per timer tick. Connections whose peer is elsewhere pay one compare per read; the others a
// counter and a compare, until the gate engages.

/** A connection whose reads the gate may hold back. */
export interface FairShareMember {
  /**
   * The gate's mark: -1 while the connection's peer is not known to live in this process (its
   * reads are never held back), else the window in which its reads were last counted (0: not
   * yet).
   */
  fairWindow: number;
  /** Issue the read that waited for its turn. */
  takeTurn(): void;
}

/** The part of a socket the gate looks at. */
interface Ends {
  readonly localAddr: { transport: string; hostname?: string; port?: number };
  readonly remoteAddr: { transport: string; hostname?: string; port?: number };
}

// Reads per window in which busy connections are counted.
const WINDOW = 512;
// Busy connection ends (distinct in a window) above which the gate engages: 120 connections with
// both ends here. Starvation starts past 128, and starved connections are not seen reading, so
// the threshold must stay under 256; under 128 connections the gate would only cost.
const BUSY = 240;
// Reads let through per turn while engaged.
const QUOTA = 64;

let enabled = true;
let window = 1;
let readsInWindow = 0;
let distinct = 0; // members counted in this window
let engaged = false;
let letThrough = 0; // reads let through since the last turn
let waiting: Array<FairShareMember | undefined> = []; // in the order they came
let head = 0; // the next to take its turn
let stillWaiting = 0; // members in `waiting` that have not left
let turnTimer: ReturnType<typeof setTimeout> | undefined;

// Clients connected over loopback, by their two ports: a server connection whose ports are the
// same two, swapped, is the other end of one of them.
const loopbackClients = new Map<number, FairShareMember>();

function isLoopback(addr: Ends["localAddr"]): boolean {
  const host = addr.hostname;
  return addr.transport === "tcp" && host !== undefined &&
    (host.startsWith("127.") || host === "::1" || host.startsWith("::ffff:127."));
}

function portsKey(local: Ends["localAddr"], remote: Ends["remoteAddr"]): number {
  return local.port! * 65536 + remote.port!;
}

/** A client connection started: remember it if its server may be in this process. */
export function clientStarted(member: FairShareMember, socket: Ends): void {
  if (isLoopback(socket.remoteAddr)) {
    loopbackClients.set(portsKey(socket.localAddr, socket.remoteAddr), member);
  }
}

/** A client connection ended: forget it. */
export function clientEnded(member: FairShareMember, socket: Ends): void {
  const key = portsKey(socket.localAddr, socket.remoteAddr);
  if (loopbackClients.get(key) === member) loopbackClients.delete(key);
}

/**
 * A server connection read its first bytes: if its client is a connection of this process,
 * both ends take part in the gate.
 */
export function serverHeard(member: FairShareMember, socket: Ends): void {
  if (!isLoopback(socket.remoteAddr)) return;
  const client = loopbackClients.get(portsKey(socket.remoteAddr, socket.localAddr));
  if (client === undefined) return;
  if (client.fairWindow < 0) client.fairWindow = 0;
  if (member.fairWindow < 0) member.fairWindow = 0;
}

function turn(): void {
  turnTimer = undefined;
  letThrough = 0;
  while (head < waiting.length && letThrough < QUOTA) {
    const member = waiting[head];
    waiting[head++] = undefined;
    if (member === undefined) continue; // it left
    stillWaiting--;
    letThrough++;
    member.takeTurn();
  }
  if (head < waiting.length) turnTimer = setTimeout(turn, 0);
  else {
    waiting = [];
    head = 0;
  }
}

/**
 * Count a read that `member` (with `fairWindow >= 0`) is about to issue; true if it must wait
 * for its turn instead (its `takeTurn` is then called at a later turn, in order).
 */
export function mustWait(member: FairShareMember): boolean {
  if (member.fairWindow !== window) {
    member.fairWindow = window;
    distinct++;
  }
  if (++readsInWindow === WINDOW) {
    engaged = enabled && distinct > BUSY;
    window++;
    readsInWindow = 0;
    distinct = 0;
  }
  if (!engaged || (turnTimer === undefined && ++letThrough <= QUOTA)) return false;
  waiting.push(member);
  stillWaiting++;
  turnTimer ??= setTimeout(turn, 0);
  return true;
}

/**
 * A member closed: if it waits for a turn, it leaves the queue, and the last to leave takes the
 * turn timer with it (a stopped server leaves no timer behind).
 */
export function leaveFairShare(member: FairShareMember): void {
  const at = waiting.indexOf(member, head);
  if (at < 0) return;
  waiting[at] = undefined;
  if (--stillWaiting > 0) return;
  clearTimeout(turnTimer);
  turnTimer = undefined;
  waiting = [];
  head = 0;
}

/** Turn the gate off (`false`) or back on: for a comparison (bench/busy_sockets.ts). */
export function setFairShare(on: boolean): void {
  enabled = on;
  if (!on) engaged = false;
}
