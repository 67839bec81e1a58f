// `deno task observe URL`: the observer's JSON API (serveObserver) as a live table in the
// terminal, redrawn in place every second: servers, pools, and the busiest connections.
//
//   deno run --allow-net examples/observe.ts http://127.0.0.1:PORT [--interval 1000] [--once]
//     [--rows 20]
//
// Exits 0 (--once: after one table), 1 if the observer cannot be read, 2 for a bad command line.

import type { ObservedConnection, ObserverOverview } from "../mod.ts";
import { argsOrStatus, integer, oneLine, type Parsed, parseFlags } from "./_command_line.ts";

const USAGE = `usage: deno task observe URL [--interval MS] [--rows N] [--once]
  URL            the observer's address (serveObserver's observer.url)
  --interval MS  between refreshes (default 1000)
  --rows N       connections shown, the busiest first (default 20)
  --once         print one table and exit`;

interface Args {
  url: URL;
  interval: number;
  rows: number;
  once: boolean;
}

/** The command line, parsed. */
export function parseArgs(argv: string[]): Parsed<Args> {
  const at = argv.findIndex((a) => /^https?:\/\//.test(a)); // the URL, anywhere
  const parsed = parseFlags(argv.filter((_, i) => i !== at), {
    interval: { type: "string", default: "1000" },
    rows: { type: "string", default: "20" },
    once: { type: "boolean", default: false },
  });
  if (parsed.kind !== "flags") return parsed;
  if (at < 0) return { kind: "usage", error: "give the observer's URL (http://…)" };
  let url: URL;
  try {
    url = new URL(argv[at]);
  } catch {
    return { kind: "usage", error: `not a URL: ${argv[at]}` };
  }
  const { values } = parsed;
  const interval = integer(values.interval, 50);
  if (interval === undefined) return { kind: "usage", error: "--interval must be >= 50" };
  const rows = integer(values.rows, 1);
  if (rows === undefined) return { kind: "usage", error: "--rows must be >= 1" };
  return { kind: "run", args: { url, interval, rows, once: values.once } };
}

function bytes(n: number | undefined): string {
  if (n === undefined) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

// Busiest first: bytes moved, then id.
function busiest(a: ObservedConnection, b: ObservedConnection): number {
  const moved = (c: ObservedConnection) => (c.stats?.bytesIn ?? 0) + (c.stats?.bytesOut ?? 0);
  return moved(b) - moved(a) || a.id.localeCompare(b.id);
}

/** The overview as text: a line per server, per pool, and per connection (the first `rows`). */
export function formatOverview(o: ObserverOverview, rows: number): string {
  const parts = [`etcp observer: node ${o.node}, ${new Date(o.time).toLocaleTimeString()}`];
  if (o.servers.length > 0) {
    parts.push(table(
      ["server", "status", "accepted", "open", "hibernated", "closed", "in", "out"],
      o.servers.map((s) => [
        s.name,
        s.status,
        String(s.accepted),
        String(s.open),
        String(s.hibernated),
        String(s.closed),
        bytes(s.bytesIn),
        bytes(s.bytesOut),
      ]),
    ));
  }
  if (o.pools.length > 0) {
    parts.push(table(
      ["pool", "up", "in flight", "queued", "reconnects", "failures"],
      o.pools.map((p) => [
        p.name,
        String(p.addresses.reduce((n, a) => n + a.up, 0)),
        String(p.inFlight),
        String(p.queued),
        String(p.reconnects),
        String(p.failures),
      ]),
    ));
  }
  const shown = [...o.connections].sort(busiest).slice(0, rows);
  parts.push(table(
    ["connection", "name", "owner", "state", "peer", "in", "out", "frames", "mailbox"],
    shown.map((c) => [
      c.id,
      c.name ?? "",
      c.owner,
      c.stats?.state ?? `on ${c.node}`,
      c.remoteAddr,
      bytes(c.stats?.bytesIn),
      bytes(c.stats?.bytesOut),
      c.stats ? `${c.stats.framesIn}/${c.stats.framesOut}` : "",
      c.stats ? String(c.stats.mailbox) : "",
    ]),
  ));
  if (o.connections.length > rows) parts.push(`(${o.connections.length - rows} more)`);
  return parts.join("\n\n");
}

async function main(argv: string[]): Promise<number> {
  const args = argsOrStatus("observe", parseArgs(argv), USAGE);
  if (typeof args === "number") return args;
  const overview = new URL("/api/overview", args.url);
  for (;;) {
    let text: string;
    try {
      const res = await fetch(overview);
      if (!res.ok) throw new Error(`${overview}: HTTP ${res.status}`);
      text = formatOverview(await res.json(), args.rows);
    } catch (err) {
      console.error(`observe: ${oneLine(err)}`);
      return 1;
    }
    if (args.once) {
      console.log(text);
      return 0;
    }
    // Home, draw, clear what is left of the last table.
    await Deno.stdout.write(new TextEncoder().encode(`\x1b[H${text}\x1b[J\n`));
    await new Promise((resolve) => setTimeout(resolve, args.interval));
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
