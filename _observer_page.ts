// The observer's page (observer.ts): plain HTML, CSS and JavaScript, no build step. The script
// polls the JSON API and builds the tables with DOM calls (text, never HTML, from the data), so
// that the page runs under a Content-Security-Policy that allows only its own script and style.

/** The page, refreshing every `refresh` ms. */
export function observerHtml(refresh: number): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="etcp-refresh" content="${refresh}">
<title>etcp observer</title>
<link rel="stylesheet" href="/observer.css">
<script src="/observer.js" defer></script>
</head>
<body>
<header>
  <h1>etcp observer</h1>
  <span id="node"></span>
  <input id="filter" type="search" placeholder="filter connections" aria-label="filter connections">
  <input id="token" type="password" placeholder="token (to change things)" aria-label="token">
  <span id="status" role="status"></span>
</header>
<main>
  <section id="servers-section">
    <h2>Servers</h2>
    <table id="servers"><thead><tr>
      <th>name</th><th>status</th><th class="n">accepted</th><th class="n">open</th>
      <th class="n">hibernated</th><th class="n">closed</th><th class="n">in</th>
      <th class="n">out</th><th></th>
    </tr></thead><tbody></tbody></table>
  </section>
  <section id="pools-section">
    <h2>Pools</h2>
    <table id="pools"><thead><tr>
      <th>name</th><th class="n">up</th><th class="n">connecting</th>
      <th class="n">backing off</th><th class="n">down</th><th class="n">in flight</th>
      <th class="n">queued</th><th class="n">reconnects</th><th class="n">failures</th>
    </tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Connections <span id="count"></span></h2>
    <table id="connections"><thead><tr>
      <th data-key="id">id</th><th data-key="name">name</th><th data-key="owner">owner</th>
      <th data-key="state">state</th><th data-key="remoteAddr">peer</th>
      <th data-key="bytesIn" class="n">bytes in</th><th data-key="bytesOut" class="n">bytes out</th>
      <th data-key="framesIn" class="n">frames in</th><th data-key="framesOut" class="n">frames out</th>
      <th data-key="mailbox" class="n">mailbox</th><th data-key="callsPending" class="n">calls</th>
      <th data-key="lastEventAt" class="n">last event</th>
    </tr></thead><tbody></tbody></table>
  </section>
  <section id="detail" hidden>
    <h2>Connection <span id="detail-id"></span></h2>
    <div class="buttons">
      <button id="stop" type="button">Stop</button>
      <button id="trace" type="button">Trace on</button>
    </div>
    <dl id="detail-stats"></dl>
    <h3>Handler state</h3>
    <pre id="detail-state"></pre>
    <h3>Recent trace</h3>
    <table id="detail-trace"><thead><tr>
      <th class="n">ms</th><th>kind</th><th>type</th><th>detail</th>
    </tr></thead><tbody></tbody></table>
  </section>
</main>
</body>
</html>
`;
}

/** The page's style. */
export const OBSERVER_CSS = `
:root { color-scheme: light dark; --line: #8884; --accent: #2a6fdb; }
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; }
header { display: flex; gap: 12px; align-items: center; padding: 8px 16px;
  border-bottom: 1px solid var(--line); position: sticky; top: 0; background: Canvas; }
header h1 { font-size: 16px; margin: 0; }
#node { color: GrayText; }
#status { margin-left: auto; color: GrayText; }
#status.error { color: #d33; }
main { padding: 0 16px 16px; }
h2 { font-size: 14px; margin: 16px 0 6px; }
h3 { font-size: 13px; margin: 12px 0 4px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-weight: 600; user-select: none; }
th[data-key] { cursor: pointer; }
th.sorted::after { content: " \\25B4"; }
th.sorted.desc::after { content: " \\25BE"; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
#connections tbody tr { cursor: pointer; }
#connections tbody tr:hover { background: #8881; }
#connections tbody tr.selected { background: #2a6fdb22; }
td.state-hibernated { color: #8a5cd0; }
td.state-running { color: #1a8f3a; }
td.state-stopping, td.state-closed { color: #d33; }
#detail { border-top: 2px solid var(--accent); margin-top: 16px; }
#detail dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
#detail dt { color: GrayText; }
#detail dd { margin: 0; font-variant-numeric: tabular-nums; }
#detail-trace { width: auto; }
#detail-trace td:last-child { white-space: pre-wrap; word-break: break-all; }
pre { background: #8881; padding: 8px; white-space: pre-wrap; word-break: break-all; }
.buttons { display: flex; gap: 8px; }
button { font: inherit; padding: 2px 10px; }
input { font: inherit; padding: 2px 6px; }
`;

/** The page's script. */
export const OBSERVER_JS = `"use strict";
const refresh = Number(document.querySelector('meta[name="etcp-refresh"]').content) || 1000;
const tokenInput = document.getElementById("token");
const filterInput = document.getElementById("filter");
const statusLine = document.getElementById("status");
const view = { sortKey: "id", sortDir: 1, selected: null, overview: null };

const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  tokenInput.value = fromHash;
  history.replaceState(null, "", location.pathname); // out of the address bar and history
}

// Rows are kept by key and updated in place, so that a row or button under the pointer is the
// same element from one refresh to the next (a click is never lost to a refresh).
const kept = new WeakMap();

function sync(tbody, items, keyOf, fillRow) {
  let rows = kept.get(tbody);
  if (!rows) kept.set(tbody, rows = new Map());
  const next = new Map();
  const ordered = items.map((item) => {
    const key = keyOf(item);
    let tr = rows.get(key);
    if (!tr) tr = document.createElement("tr");
    next.set(key, tr);
    tr.cellsDone = 0;
    fillRow(tr, item);
    return tr;
  });
  kept.set(tbody, next);
  ordered.forEach((tr, i) => {
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  while (tbody.children.length > ordered.length) tbody.lastChild.remove();
}

// The next cell of \`tr\` (made on first use), set to \`text\`.
function cell(tr, text, className) {
  let td = tr.children[tr.cellsDone];
  if (!td) td = tr.appendChild(document.createElement("td"));
  tr.cellsDone++;
  const value = text === undefined || text === null ? "" : String(text);
  if (td.textContent !== value && !td.firstElementChild) td.textContent = value;
  td.className = className || "";
  return td;
}

function bytes(n) {
  if (n === undefined) return "";
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function age(at) {
  if (!at) return "";
  const s = Math.max(0, (Date.now() - at) / 1000);
  return s < 60 ? s.toFixed(1) + " s ago" : Math.round(s / 60) + " min ago";
}

function say(text, error) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(error));
}

async function act(path, body) {
  const res = await fetch(path, {
    method: "POST",
    headers: { "authorization": "Bearer " + tokenInput.value, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await res.json().catch(() => ({}));
  if (!res.ok) say(path + ": refused (" + res.status + "): " + (answer.error || ""), true);
  else say(path + ": done");
  await update();
  return res.status;
}

function serverRow(tr, s) {
  tr.dataset.server = s.name;
  cell(tr, s.name);
  cell(tr, s.status);
  cell(tr, s.accepted, "n");
  cell(tr, s.open, "n");
  cell(tr, s.hibernated, "n");
  const closed = cell(tr, s.closed, "n");
  closed.title = Object.entries(s.closedByReason).map(([k, v]) => k + ": " + v).join("\\n");
  cell(tr, bytes(s.bytesIn), "n");
  cell(tr, bytes(s.bytesOut), "n");
  const td = cell(tr, "");
  const button = td.firstElementChild || td.appendChild(document.createElement("button"));
  button.type = "button";
  const suspended = s.status === "suspended";
  button.textContent = suspended ? "Resume" : "Suspend";
  button.dataset.action = suspended ? "resume" : "suspend";
  button.disabled = s.status === "stopping" || s.status === "stopped";
  button.onclick = () => act("/api/servers/" + encodeURIComponent(s.name) + "/" + button.dataset.action);
}

function poolRow(tr, p) {
  const sum = (key) => p.addresses.reduce((n, a) => n + a[key], 0);
  cell(tr, p.name);
  for (const key of ["up", "connecting", "backingOff", "down"]) cell(tr, sum(key), "n");
  cell(tr, p.inFlight, "n");
  cell(tr, p.queued, "n");
  cell(tr, p.reconnects, "n");
  cell(tr, p.failures, "n");
}

function valueOf(c, key) {
  const stats = c.stats || {};
  return key in stats ? stats[key] : c[key];
}

function shownConnections(connections) {
  const filter = filterInput.value.trim().toLowerCase();
  const shown = connections.filter((c) => !filter ||
    [c.id, c.name, c.owner, c.kind, c.node, c.remoteAddr, c.stats && c.stats.state]
      .some((v) => v && String(v).toLowerCase().includes(filter)));
  const { sortKey, sortDir } = view;
  shown.sort((a, b) => {
    const x = valueOf(a, sortKey), y = valueOf(b, sortKey);
    if (x === y) return 0;
    if (x === undefined) return 1;
    if (y === undefined) return -1;
    return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true })) * sortDir;
  });
  document.getElementById("count").textContent = "(" + shown.length + " of " + connections.length + ")";
  return shown;
}

function connectionRow(tr, c) {
  tr.dataset.id = c.id;
  tr.classList.toggle("selected", c.id === view.selected);
  const s = c.stats || {};
  cell(tr, c.id);
  cell(tr, c.name);
  cell(tr, c.owner + (c.kind === "server" ? "" : " (" + c.kind + ")"));
  cell(tr, s.state || (c.node ? "on " + c.node : ""), "state-" + (s.state || "remote"));
  cell(tr, c.remoteAddr);
  cell(tr, bytes(s.bytesIn), "n");
  cell(tr, bytes(s.bytesOut), "n");
  cell(tr, s.framesIn, "n");
  cell(tr, s.framesOut, "n");
  cell(tr, s.mailbox, "n");
  cell(tr, s.callsPending, "n");
  cell(tr, age(s.lastEventAt), "n");
  tr.onclick = () => {
    view.selected = c.id;
    render();
    updateDetail();
  };
}

function render() {
  const o = view.overview;
  if (!o) return;
  document.getElementById("node").textContent = "node " + o.node;
  document.getElementById("servers-section").hidden = o.servers.length === 0;
  document.getElementById("pools-section").hidden = o.pools.length === 0;
  sync(document.querySelector("#servers tbody"), o.servers, (s) => s.name, serverRow);
  sync(document.querySelector("#pools tbody"), o.pools, (p) => p.name, poolRow);
  sync(document.querySelector("#connections tbody"), shownConnections(o.connections), (c) => c.id, connectionRow);
  for (const th of document.querySelectorAll("#connections th[data-key]")) {
    th.classList.toggle("sorted", th.dataset.key === view.sortKey);
    th.classList.toggle("desc", th.dataset.key === view.sortKey && view.sortDir < 0);
  }
}

async function updateDetail() {
  const section = document.getElementById("detail");
  if (!view.selected) {
    section.hidden = true;
    return;
  }
  const res = await fetch("/api/connections/" + encodeURIComponent(view.selected));
  if (res.status === 404) {
    await res.body?.cancel();
    document.getElementById("detail-id").textContent = view.selected + " (closed)";
    document.getElementById("stop").disabled = true;
    document.getElementById("trace").disabled = true;
    return;
  }
  const d = await res.json();
  section.hidden = false;
  document.getElementById("detail-id").textContent = d.id + (d.name ? " (" + d.name + ")" : "");
  const dl = document.getElementById("detail-stats");
  const pairs = [["owner", d.owner + " (" + d.kind + ")"], ["node", d.node], ["peer", d.remoteAddr],
    ["local", d.localAddr], ["started", new Date(d.startedAt).toLocaleString()]];
  if (d.stats) {
    for (const [k, v] of Object.entries(d.stats)) {
      pairs.push([k, k.endsWith("At") && v ? new Date(v).toLocaleTimeString() + " (" + age(v) + ")" : v]);
    }
  }
  dl.replaceChildren(...pairs.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v === undefined ? "" : String(v);
    dd.dataset.stat = k;
    return [dt, dd];
  }));
  document.getElementById("detail-state").textContent = d.handlerState === undefined ? "(in another process)" : d.handlerState;
  const traced = Boolean(d.stats && d.stats.traced);
  const traceButton = document.getElementById("trace");
  traceButton.textContent = traced ? "Trace off" : "Trace on";
  traceButton.disabled = !d.stats;
  document.getElementById("stop").disabled = false;
  const t0 = d.trace.length ? d.trace[0].time : 0;
  sync(document.querySelector("#detail-trace tbody"), d.trace.slice().reverse(), (e) => e.time + e.kind + e.type, (tr, e) => {
    cell(tr, (e.time - t0).toFixed(1), "n");
    cell(tr, e.kind);
    cell(tr, e.type === e.kind ? "" : e.type);
    cell(tr, e.detail);
  });
}

async function update() {
  try {
    const res = await fetch("/api/overview");
    if (!res.ok) throw new Error("overview: " + res.status);
    view.overview = await res.json();
    render();
    await updateDetail();
    if (!statusLine.classList.contains("error")) say("updated " + new Date().toLocaleTimeString());
  } catch (err) {
    say(String(err), true);
  }
}

for (const th of document.querySelectorAll("#connections th[data-key]")) {
  th.onclick = () => {
    view.sortDir = view.sortKey === th.dataset.key ? -view.sortDir : 1;
    view.sortKey = th.dataset.key;
    render();
  };
}
filterInput.oninput = render;
document.getElementById("stop").onclick = () =>
  view.selected && act("/api/connections/" + encodeURIComponent(view.selected) + "/stop");
document.getElementById("trace").onclick = (ev) =>
  view.selected && act("/api/connections/" + encodeURIComponent(view.selected) + "/trace",
    { on: ev.target.textContent === "Trace on" });

let busy = false;
async function tick() {
  if (busy) return;
  busy = true;
  try {
    await update();
  } finally {
    busy = false;
  }
}
tick();
setInterval(tick, refresh);
`;
