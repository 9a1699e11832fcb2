"""The dashboard page: plain HTML and JavaScript, no build step.

It lives in a Python module (not a data file) so it ships with any install of the package.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Snapwake</title>
<link rel="icon" href="data:,">
<style>
 body { font: 14px system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
 h1 { font-size: 20px; margin: .8em 0 .2em; } h2 { font-size: 16px; margin: 1.4em 0 .4em; }
 table { border-collapse: collapse; min-width: 40em; }
 th, td { text-align: left; padding: 3px 10px 3px 0; border-bottom: 1px solid #eee; vertical-align: top; }
 th { color: #666; font-weight: 600; }
 .banner { display: none; background: #b00020; color: #fff; padding: .6em 1em; margin: .5em 0; }
 .banner.show { display: block; }
 .state { display: inline-block; padding: 0 6px; margin: 0 4px 2px 0; border-radius: 3px; background: #eee; }
 .RUNNING, .READY { background: #c8f0c8; } .IDLE { background: #e0ecff; } .STANDBY { background: #f1f1d0; }
 .RESTORING, .BUILDING, .PENDING, .SNAPSHOTTING, .STARTING, .CREATING { background: #ffe6b3; }
 .FAILED, .CORRUPT { background: #ffc6c6; }
 .gpu { width: 26em; height: 16px; background: #f3f3f3; border: 1px solid #ccc; position: relative; display: flex; }
 .slice { height: 100%; border-right: 1px solid #fff; overflow: hidden; font-size: 10px; white-space: nowrap; }
 .muted { color: #888; } #updated { color: #888; font-size: 12px; }
</style>
</head>
<body>
<h1>Snapwake</h1>
<div id="updated">loading...</div>
<div id="banner" class="banner" role="alert"></div>
<h2>Functions</h2><table id="functions"></table>
<h2>Nodes and GPUs</h2><table id="nodes"></table>
<h2>Snapshots</h2><table id="snapshots"></table>
<h2>Recent cold starts (CS-TTFT)</h2><table id="coldstarts"></table>
<script>
"use strict";
const base = location.pathname.replace(/\\/?$/, "/");
// Byte counts in the largest unit that keeps them >= 1 (a demo snapshot is under a MiB).
function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
const sizeOrDash = (n) => n ? size(n) : "-";
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
const badge = (s, n) => `<span class="state ${esc(s)}">${esc(s)}${n === undefined ? "" : " " + n}</span>`;
const palette = ["#7fb3ff", "#ffb37f", "#9be39b", "#d49bff", "#ffd36b", "#7fe0e0"];
function color(key) { let h = 0; for (const c of key) h = (h * 31 + c.charCodeAt(0)) >>> 0; return palette[h % palette.length]; }
function rows(id, head, body) {
  document.getElementById(id).innerHTML = "<tr>" + head.map((h) => `<th>${h}</th>`).join("") + "</tr>" +
    (body.length ? body.map((r) => "<tr>" + r.map((c) => `<td>${c}</td>`).join("") + "</tr>").join("")
                 : `<tr><td class="muted" colspan="${head.length}">none</td></tr>`);
}
function gpuBar(g) {
  const parts = g.slices.map((s) => {
    const w = g.memory_total_bytes ? 100 * s.bytes / g.memory_total_bytes : 0;
    return `<div class="slice" title="${esc(s.instance_id)} ${esc(s.function_id)} ${esc(s.state)} ${sizeOrDash(s.bytes)}"
      style="width:${w}%;background:${color(s.function_id)}">${esc(s.function_id)}</div>`;
  }).join("");
  return `<div class="gpu">${parts}</div>`;
}
function render(st) {
  rows("functions", ["function", "rev", "state", "slice", "instances"], st.functions.map((f) => [
    esc(f.id), f.revision, badge(f.state) + (f.message ? ` <span class="muted">${esc(f.message)}</span>` : ""),
    sizeOrDash(f.gpu_memory_bytes),
    Object.entries(f.instances_by_state).map(([s, n]) => badge(s, n)).join("") || '<span class="muted">scaled to zero</span>']));
  const gpuRows = [];
  for (const n of st.nodes) {
    const hb = n.heartbeat_age_seconds === null ? "-" : n.heartbeat_age_seconds + "s ago";
    if (!n.gpus.length) gpuRows.push([esc(n.name), esc(n.address), hb, '<span class="muted">no GPU</span>', "", n.cached_snapshots.length]);
    for (const g of n.gpus) {
      const used = g.slices.reduce((a, s) => a + s.bytes, 0);
      gpuRows.push([esc(n.name), esc(n.address), hb, `${g.index}: ${esc(g.name)}`,
        gpuBar(g) + `<span class="muted">${sizeOrDash(used)} in use, ${size(g.memory_reserved_bytes)} reserved of ${sizeOrDash(g.memory_total_bytes)}</span>`,
        n.cached_snapshots.length]);
    }
  }
  rows("nodes", ["node", "address", "heartbeat", "GPU", "memory slices", "cached snapshots"], gpuRows);
  rows("snapshots", ["snapshot", "state", "progress", "tier", "cache nodes", "disk nodes"], st.snapshots.map((s) => [
    esc(s.id), badge(s.state) + (s.message ? ` <span class="muted">${esc(s.message)}</span>` : ""),
    s.total_bytes ? `${Math.floor(100 * s.bytes_written / s.total_bytes)}% of ${sizeOrDash(s.total_bytes)}` : "-",
    badge(s.tier), esc(s.cache_nodes.join(", ")) || "-", esc(s.disk_nodes.join(", ")) || "-"]));
  rows("coldstarts", ["when", "function", "instance", "node", "CS-TTFT"], st.cold_starts.map((c) => [
    c.at ? new Date(c.at * 1000).toLocaleTimeString() : "-", esc(c.function_id), esc(c.instance_id), esc(c.node),
    (c.seconds * 1000).toFixed(0) + " ms"]));
}
async function poll() {
  const banner = document.getElementById("banner");
  try {
    const resp = await fetch(base + "api/state", {cache: "no-store", signal: AbortSignal.timeout(5000)});
    const st = await resp.json();
    if (resp.status === 401) {
      throw Object.assign(new Error("this gateway needs an API key: open " + base + "?key=YOUR_KEY"), {fromServer: true});
    }
    if (!st.ok) {
      const why = typeof st.error === "string" ? st.error : (st.error && st.error.message) || ("HTTP " + resp.status);
      throw Object.assign(new Error(why), {fromServer: true});
    }
    render(st);
    banner.classList.remove("show");
    document.getElementById("updated").textContent = "updated " + new Date(st.time * 1000).toLocaleTimeString() +
      (st.tenant ? " \u00b7 tenant " + st.tenant : "");
  } catch (e) {
    const why = e.fromServer ? e.message : "cannot reach the gateway: " + (e.message || e);
    banner.textContent = why + " (retrying every second)";
    banner.classList.add("show");
  } finally {
    setTimeout(poll, 1000);
  }
}
poll();
</script>
</body>
</html>
"""
