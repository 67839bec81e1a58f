// Listening on every address, as Node does: "::" when that socket also takes IPv4 (Linux and
// macOS by default), else "0.0.0.0". Deno cannot set IPV6_V6ONLY, so the system is asked once:
// a "::" socket that takes IPv4 holds 0.0.0.0 on its port too.

/** What was learned of this system, kept by each transport. */
export interface DualStack {
  /** Whether "::" takes IPv4 too; unknown until the first listen without a hostname. */
  takesIpv4?: boolean;
}

/**
 * `listen(hostname, port)` on every address. `fatal(err)` says which errors of the "::" listen
 * are not about IPv6 (a bad certificate, say) and must be thrown rather than answered by
 * falling back to "0.0.0.0".
 */
export function listenEveryAddress<L extends { readonly addr: Deno.NetAddr; close(): void }>(
  listen: (hostname: string, port: number) => L,
  port: number,
  dualStack: DualStack,
  fatal: (err: unknown) => boolean = () => false,
): L {
  if (dualStack.takesIpv4 === false) return listen("0.0.0.0", port);
  let v6: L;
  try {
    v6 = listen("::", port);
  } catch (err) {
    if (fatal(err)) throw err;
    return listen("0.0.0.0", port); // no IPv6 here (disabled, or not permitted)
  }
  if (dualStack.takesIpv4) return v6;
  const bound = v6.addr.port;
  let v4: Deno.Listener;
  try {
    v4 = Deno.listen({ hostname: "0.0.0.0", port: bound });
  } catch (err) {
    if (err instanceof Deno.errors.AddrInUse) dualStack.takesIpv4 = true;
    return v6; // dual-stack, or IPv4 not permitted: "::" is what can be had
  }
  dualStack.takesIpv4 = false; // "::" takes IPv6 only: serve IPv4, as 0.0.0.0 always did
  v4.close();
  v6.close();
  return listen("0.0.0.0", bound);
}

/**
 * Throw `Deno.errors.NotSupported` for `reusePort` without `--unstable-net`: without it,
 * `Deno.listen({ reusePort: true })` exits the whole process (code 70) instead of throwing;
 * `Deno.listenDatagram` is gated by the same flag, so it tells.
 */
export function checkReusePort(reusePort: boolean | undefined): void {
  if (reusePort && !("listenDatagram" in Deno)) {
    throw new Deno.errors.NotSupported(
      'reusePort (and acceptors > 1) needs --unstable-net, or "unstable": ["net"] in deno.json',
    );
  }
}

/** Throw a `RangeError` unless `backlog` is undefined or an integer > 0; `where` names the transport. */
export function checkBacklog(where: string, backlog: number | undefined): void {
  if (backlog !== undefined && !(Number.isInteger(backlog) && backlog > 0)) {
    throw new RangeError(`${where}: backlog must be an integer > 0, not ${backlog}`);
  }
}
