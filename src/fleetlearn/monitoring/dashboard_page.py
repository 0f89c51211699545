"""The dashboard's single page: HTML, CSS and JavaScript inline (no network but
its own server's /api/rounds).  Charts are inline SVG; after each successful
draw the page sets ``<body data-ready="1" data-rounds="N">`` so tests and
scripts know it has rendered."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>fleetlearn dashboard</title>
<style>
  :root { --fg: #1d2330; --muted: #6b7280; --grid: #e5e7eb; --bg: #f7f8fa; --card: #fff; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
  header { padding: 10px 18px; background: #1d2330; color: #fff; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  header .kv { color: #cbd5e1; } header .kv b { color: #fff; font-weight: 600; }
  main { padding: 12px 18px; display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
  .card { background: var(--card); border: 1px solid var(--grid); border-radius: 6px; padding: 8px 10px; }
  .card h2 { font-size: 14px; margin: 2px 0 6px; }
  svg.chart { width: 100%; height: auto; display: block; }
  svg.chart text { font-size: 11px; fill: var(--muted); }
  svg.chart .title { fill: var(--fg); }
  table { border-collapse: collapse; width: 100%; font-size: 12px; }
  th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid var(--grid); vertical-align: top; }
  .sev-critical { color: #b91c1c; font-weight: 600; } .sev-warning { color: #c2410c; } .sev-info { color: var(--muted); }
  .tag { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11px; background: #e5e7eb; }
  .tag.rolled_back { background: #fee2e2; color: #991b1b; } .tag.ok { background: #dcfce7; color: #166534; }
  .scroll { max-height: 260px; overflow: auto; }
  #status.error { color: #fca5a5; }
</style>
</head>
<body data-ready="0">
<header>
  <h1>fleetlearn</h1>
  <span class="kv">run <b id="run-id">-</b></span>
  <span class="kv">status <b id="run-status">-</b></span>
  <span class="kv">round <b id="run-round">-</b></span>
  <span class="kv">version <b id="run-version">-</b></span>
  <span class="kv">accuracy <b id="run-acc">-</b></span>
  <span class="kv">alerts <b id="run-alerts">0</b></span>
  <span class="kv">rollbacks <b id="run-rollbacks">0</b></span>
  <span class="kv" id="status">loading...</span>
</header>
<main>
  <section class="card"><h2>Accuracy</h2><div id="chart-accuracy"></div></section>
  <section class="card"><h2>Loss</h2><div id="chart-loss"></div></section>
  <section class="card"><h2>Bytes per round</h2><div id="chart-bytes"></div></section>
  <section class="card"><h2>Participation</h2><div id="chart-participation"></div></section>
  <section class="card"><h2>Completion-time percentiles (s)</h2><div id="chart-latency"></div></section>
  <section class="card"><h2>Update norms</h2><div id="chart-updates"></div></section>
  <section class="card"><h2>Alerts</h2><div class="scroll" id="alerts"></div></section>
  <section class="card"><h2>Rollbacks and versions</h2><div class="scroll" id="versions"></div></section>
</main>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const COLOURS = ["#2563eb", "#16a34a", "#db2777", "#ea580c", "#7c3aed", "#0891b2", "#4b5563"];
const SEV = { critical: "#dc2626", warning: "#f97316", info: "#9ca3af" };

function svgEl(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function finite(v) { return v !== null && v !== undefined && Number.isFinite(v); }
function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { const d = Math.abs(lo) || 1; lo -= d * 0.5; hi += d * 0.5; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(s => s * mag).find(s => s >= raw) || raw;
  const t0 = Math.floor(lo / step) * step, ticks = [];
  for (let t = t0; t <= hi + step * 0.5; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}
function fmtTick(t, step) {
  if (Math.abs(t) >= 1000) return fmt(t);
  const dec = Math.max(0, Math.ceil(-Math.log10(step) + 1e-9) + (String(step).includes("25") ? 1 : 0));
  return t.toFixed(Math.min(dec, 6));
}
function fmt(v) {
  if (!finite(v)) return "-";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (a >= 10 || a === 0) return v.toFixed(0);
  return v.toPrecision(3);
}

// A line chart: x = rounds, series = [{name, values}], with rollback bands and alert lines.
// opts.zero: the y axis starts at 0; opts.log: log10 scale when positive values span > 2 decades.
function lineChart(target, id, xs, series, ev, opts) {
  opts = opts || {};
  const W = 560, H = 230, m = { l: 48, r: 12, t: 22, b: 28 };
  const box = document.getElementById(target);
  box.textContent = "";
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-chart": id, role: "img" }, box);
  let vals = [];
  series.forEach(s => s.values.forEach(v => { if (finite(v)) vals.push(v); }));
  const log = opts.log && vals.length && vals.every(v => v > 0) && Math.max(...vals) / Math.min(...vals) > 100;
  const tf = log ? (v => Math.log10(v)) : (v => v);
  if (log) vals = vals.map(tf);
  if (opts.zero && !log) vals.push(0);
  const xlo = xs.length ? Math.min(...xs) : 0, xhi = xs.length ? Math.max(...xs) : 1;
  const xspan = xhi > xlo ? xhi - xlo : 1;
  const sx = x => m.l + (x - xlo + (xhi > xlo ? 0 : 0.5)) / xspan * (W - m.l - m.r);
  if (!vals.length) {
    svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no data yet";
    return svg;
  }
  const yt = log ? niceTicks(Math.floor(Math.min(...vals)), Math.ceil(Math.max(...vals)), 4).filter(Number.isInteger) : niceTicks(Math.min(...vals), Math.max(...vals), 4);
  const ylo = yt[0], yhi = yt[yt.length - 1], ystep = yt.length > 1 ? yt[1] - yt[0] : 1;
  const sy0 = y => H - m.b - (y - ylo) / ((yhi - ylo) || 1) * (H - m.t - m.b);
  const sy = v => sy0(tf(v));
  // rollback bands and failed rounds behind everything
  const bw = (W - m.l - m.r) / Math.max(xs.length, 1);
  ev.rollbacks.forEach(r => svgEl("rect", { x: sx(r.round) - bw / 2, y: m.t, width: bw, height: H - m.t - m.b, fill: "#fecaca", class: "rollback", "data-round": r.round }, svg));
  ev.failed.forEach(r => svgEl("rect", { x: sx(r.round) - bw / 2, y: m.t, width: bw, height: H - m.t - m.b, fill: "#e5e7eb", class: "failed" }, svg));
  yt.forEach(t => {
    svgEl("line", { x1: m.l, x2: W - m.r, y1: sy0(t), y2: sy0(t), stroke: "#e5e7eb" }, svg);
    svgEl("text", { x: m.l - 4, y: sy0(t) + 4, "text-anchor": "end" }, svg).textContent = log ? "1e" + t : fmtTick(t, ystep);
  });
  niceTicks(xlo, xhi, 6).filter(t => t >= xlo && t <= xhi && Number.isInteger(t)).forEach(t => {
    svgEl("text", { x: sx(t), y: H - m.b + 14, "text-anchor": "middle" }, svg).textContent = t;
  });
  svgEl("text", { x: W - m.r, y: H - 2, "text-anchor": "end" }, svg).textContent = "round";
  ev.alerts.forEach(a => svgEl("line", { x1: sx(a.round), x2: sx(a.round), y1: m.t, y2: H - m.b, stroke: SEV[a.severity] || SEV.warning, "stroke-dasharray": "4 3", class: "alert", "data-detector": a.detector }, svg));
  let lx = m.l;
  series.forEach((s, i) => {
    const c = s.colour || COLOURS[i % COLOURS.length];
    const pts = [];
    xs.forEach((x, j) => { const v = s.values[j]; if (finite(v)) pts.push(sx(x).toFixed(1) + "," + sy(v).toFixed(1)); });
    if (pts.length) {
      svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: c, "stroke-width": 2, "data-series": s.name }, svg);
      if (pts.length < 40) pts.forEach(p => { const [px, py] = p.split(","); svgEl("circle", { cx: px, cy: py, r: 2.2, fill: c }, svg); });
    }
    svgEl("rect", { x: lx, y: 6, width: 10, height: 10, fill: c }, svg);
    const t = svgEl("text", { x: lx + 13, y: 15, class: "title" }, svg);
    t.textContent = s.name;
    lx += 24 + 6.4 * s.name.length;
  });
  return svg;
}

function table(rows, cols, fmtCell) {
  if (!rows.length) return "<p style='color:#6b7280'>none</p>";
  const esc = s => String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  let h = "<table><thead><tr>" + cols.map(c => `<th>${esc(c)}</th>`).join("") + "</tr></thead><tbody>";
  rows.forEach(r => { h += "<tr>" + cols.map(c => `<td>${fmtCell(c, r, esc)}</td>`).join("") + "</tr>"; });
  return h + "</tbody></table>";
}

function draw(data) {
  const c = data.columns, ev = data.events, xs = c.round, n = xs.length;
  const last = i => { for (let j = n - 1; j >= 0; j--) if (finite(c[i][j])) return c[i][j]; return null; };
  document.getElementById("run-id").textContent = data.run.id || "-";
  document.getElementById("run-status").textContent = data.run.status || "-";
  document.getElementById("run-round").textContent = n ? xs[n - 1] : "-";
  document.getElementById("run-version").textContent = n ? c.version[n - 1] : "-";
  const acc = last("accuracy");
  document.getElementById("run-acc").textContent = finite(acc) ? acc.toFixed(4) : "-";
  document.getElementById("run-alerts").textContent = ev.alerts.length;
  document.getElementById("run-rollbacks").textContent = ev.rollbacks.length;
  lineChart("chart-accuracy", "accuracy", xs, [
    { name: "central", values: c.accuracy }, { name: "clients' test (mean)", values: c.fed_accuracy },
    { name: "local models", values: c.local_accuracy }], ev);
  lineChart("chart-loss", "loss", xs, [
    { name: "central", values: c.loss }, { name: "train before", values: c.train_loss_before },
    { name: "train after", values: c.train_loss_after }], ev);
  lineChart("chart-bytes", "bytes", xs, [{ name: "uplink", values: c.uplink_bytes }, { name: "downlink", values: c.downlink_bytes }], ev, { zero: true });
  lineChart("chart-participation", "participation", xs, [
    { name: "selected", values: c.selected }, { name: "accepted", values: c.accepted }, { name: "dropped", values: c.dropped },
    { name: "rejected", values: c.rejected }, { name: "late", values: c.late }], ev, { zero: true });
  lineChart("chart-latency", "latency", xs, [
    { name: "p50", values: c.completion_p50_s }, { name: "p90", values: c.completion_p90_s }, { name: "p99", values: c.completion_p99_s }], ev);
  lineChart("chart-updates", "updates", xs, [
    { name: "p50", values: c.debug_update_norm_p50 }, { name: "p90", values: c.debug_update_norm_p90 },
    { name: "max", values: c.debug_update_norm_max.map((v, i) => finite(v) ? v : c.update_norm_max[i]) },
    { name: "step", values: c.debug_step_norm }], ev, { log: true });
  document.getElementById("alerts").innerHTML = table(ev.alerts.slice().reverse(), ["round", "detector", "severity", "message"], (k, r, esc) =>
    k === "severity" ? `<span class="sev-${esc(r.severity)}">${esc(r.severity)}</span>` : esc(r[k] === null ? "-" : r[k]));
  const rb = ev.rollbacks.map(r => ({ round: r.round, version: r.version, status: "rolled_back", accuracy: null, tags: "", reason: r.reason }));
  const vs = data.versions.filter(v => v.status === "ok").map(v => ({ round: v.round, version: v.version, status: "ok", accuracy: v.accuracy, tags: v.tags || "", reason: "" }));
  const rows = rb.concat(vs).sort((a, b) => b.round - a.round);
  document.getElementById("versions").innerHTML = table(rows, ["round", "version", "status", "accuracy", "tags", "reason"], (k, r, esc) =>
    k === "status" ? `<span class="tag ${esc(r.status)}">${esc(r.status)}</span>` : k === "accuracy" ? esc(finite(r.accuracy) ? r.accuracy.toFixed(4) : "-") : esc(r[k]));
  document.body.dataset.rounds = String(n);
  document.body.dataset.ready = "1";
}

let lastKey = null, timer = null;
async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("api/rounds", { cache: "no-store" });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    const key = JSON.stringify([data.columns.round.length, data.run.status, data.events.alerts.length, data.columns.status]);
    if (key !== lastKey) { draw(data); lastKey = key; }
    status.className = "kv";
    status.textContent = "updated " + new Date().toLocaleTimeString();
    const done = data.run.status !== "running" && data.run.status !== "live";
    if (!done) timer = setTimeout(poll, data.run.poll_ms || 2000);
  } catch (err) {
    status.className = "kv error";
    status.textContent = "cannot read /api/rounds: " + err.message + " (retrying)";
    timer = setTimeout(poll, 3000);
  }
}
poll();
</script>
</body>
</html>
"""
