// norouter debug view: renders the relay's websocket feed. No dependencies, no build step.
// Everything coming from agents (names, stderr, warnings) is untrusted: only textContent is used.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const SVGNS = "http://www.w3.org/2000/svg";
const MAX_PACKETS = 1000;
const SHOWN_PACKETS = 200;
const RENDER_EVERY_MS = 500;  // the packet log is redrawn at most this often

const st = {
  hosts: [], prev: new Map(), rates: new Map(), prevT: 0,
  flows: [], packets: [], held: [], events: [], routes: [],
  paused: false, lost: 0, sort: { key: "idle", asc: true },
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function human(n) {
  if (n === null || n === undefined) return "–";
  const units = ["", "k", "M", "G", "T"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : Math.round(n)) + units[i];
}

function secs(s) {
  if (s < 60) return s.toFixed(1) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0");
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0");
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

// ---- hosts ------------------------------------------------------------------------------

function updateHosts(hosts, t) {
  const dt = st.prevT ? Math.max(0.001, t - st.prevT) : 0;
  for (const h of hosts) {
    const c = h.counters || {};
    const p = st.prev.get(h.name);
    if (p && dt) {
      st.rates.set(h.name, {
        fin: (c.frames_in - p.frames_in) / dt, fout: (c.frames_out - p.frames_out) / dt,
        bin: (c.bytes_in - p.bytes_in) / dt, bout: (c.bytes_out - p.bytes_out) / dt,
      });
    }
    st.prev.set(h.name, { ...c });
  }
  st.prevT = t;
  st.hosts = hosts;
  renderHosts();
  const sel = $("#pcaphost");
  const have = new Set([...sel.options].map((o) => o.value));
  for (const h of hosts) if (!have.has(h.name)) sel.append(el("option", { value: h.name }, h.name));
}

function renderHosts() {
  const box = $("#diagram");
  const n = st.hosts.length;
  const W = Math.max(480, box.clientWidth || 640);
  const bw = 170, bh = 74;
  // Up to 8 hosts around the manager; more in a grid (the hub would only get in the way).
  const ring = n <= 8;
  const cols = Math.max(1, Math.floor(W / (bw + 12)));
  const H = ring ? 270 : Math.max(270, Math.ceil(n / cols) * (bh + 12) + 12);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, id: "hostsvg", style: `height:${H}px` });
  const cx = W / 2, cy = H / 2;
  const rx = Math.max(120, W / 2 - 95), ry = H / 2 - 42;
  const pos = st.hosts.map((_, i) => {
    if (!ring) return [12 + bw / 2 + (i % cols) * (bw + 12), 12 + bh / 2 + Math.floor(i / cols) * (bh + 12)];
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, n);
    return [cx + rx * Math.cos(a), cy + ry * Math.sin(a)];
  });
  if (ring) {
    pos.forEach(([x, y], i) => {
      const r = st.rates.get(st.hosts[i].name);
      const busy = r ? Math.min(6, 1 + Math.log10(1 + r.bin + r.bout) / 2) : 1;
      root.append(svg("line", { x1: cx, y1: cy, x2: x, y2: y, class: "link", "stroke-width": busy }));
    });
    root.append(svg("circle", { cx, cy, r: 30, class: "hub" }));
    root.append(svg("text", { x: cx, y: cy + 4, "text-anchor": "middle", class: "hubtext" }, "manager"));
  }
  st.hosts.forEach((h, i) => {
    const [x, y] = pos[i];
    const c = h.counters || {};
    const drops = Object.values(c.drops || {}).reduce((a, b) => a + b, 0);
    const dropText = Object.entries(c.drops || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    const g = svg("g", { transform: `translate(${x - bw / 2},${y - bh / 2})`, "data-host": h.name, class: "host" });
    const tip = [`${h.name} (${h.vip || "?"}), ${h.state || "?"}`, (h.argv || []).join(" "),
      `features: ${(h.features || []).join(", ") || "–"}`, `version: ${h.version || "?"}`];
    if (dropText) tip.push(`drops: ${dropText}`);
    if (h.exit_reason) tip.push(`exit: ${h.exit_reason}`);
    if (h.stderr && h.stderr.length) tip.push("stderr:", ...h.stderr.slice(-5));
    g.append(svg("title", {}, tip.join("\n") + "\n(click: show only this host's flows and packets)"));
    g.addEventListener("click", () => focusHost(h.name));
    g.append(svg("rect", { width: bw, height: bh, rx: 6, class: "hostbox " + (h.state || "unknown") }));
    g.append(svg("text", { x: 8, y: 16, class: "name" }, h.name));
    g.append(svg("text", { x: bw - 8, y: 16, "text-anchor": "end", class: "sub" }, h.vip || ""));
    const r = st.rates.get(h.name) || { fin: 0, fout: 0, bin: 0, bout: 0 };
    g.append(svg("text", { x: 8, y: 32, class: "rate" }, `in ${human(r.fin)}f/s ${human(r.bin)}B/s`));
    g.append(svg("text", { x: 8, y: 46, class: "rate" }, `out ${human(r.fout)}f/s ${human(r.bout)}B/s`));
    const q = c.queue_depth === null || c.queue_depth === undefined ? "–" : c.queue_depth;
    const line = `${h.state || "?"} · q ${q} · drops ${drops}` +
      (h.exit_code !== null && h.exit_code !== undefined ? ` · exit ${h.exit_code}` : "");
    g.append(svg("text", { x: 8, y: 62, class: drops || h.state === "exited" ? "bad" : "sub" }, line));
    root.append(g);
  });
  box.replaceChildren(root);
}

function focusHost(name) {
  // Clicking the same host again clears the filters.
  const same = $("#flowfilter").value === name;
  $("#flowfilter").value = same ? "" : name;
  $("#pktfilter").value = same ? "" : name;
  $("#pcaphost").value = same ? "" : name;
  renderFlows();
  renderPackets();
}

// ---- events and routes -------------------------------------------------------------------

function addEvent(ev) {
  let text;
  let extra = null;
  if (ev.type === "routeSuggestion") {
    text = `route suggestion: ${ev.ip.join(", ")} via ${ev.route}`;
  } else if (ev.event === "starting") {
    text = `${ev.host}: starting: ${ev.argv.join(" ")}`;
  } else if (ev.event === "configured") {
    text = `${ev.host}: ready, version ${ev.version}, features ${ev.features.join(", ")}`;
  } else if (ev.event === "warning") {
    text = `${ev.host}: warning: ${ev.message}`;
  } else if (ev.event === "exited") {
    text = `${ev.host}: exited with code ${ev.code}`;
    if (ev.stderr && ev.stderr.length) extra = el("pre", {}, ev.stderr.join("\n"));
  } else {
    text = JSON.stringify(ev);
  }
  const li = el("li", { class: ev.event || "route" }, el("span", { class: "dim" }, clock(ev.t) + " "), text);
  if (extra) li.append(extra);
  const list = $("#events");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function renderRoutes(routes) {
  const body = $("#routes tbody");
  body.replaceChildren(...routes.map((r) => el("tr", {}, el("td", { class: "mono" }, r.to),
    el("td", { class: "mono" }, r.via), el("td", {}, r.kind))));
}

// ---- flows ---------------------------------------------------------------------------------

function flowMatches(f, q) {
  if (!q) return true;
  const hay = `${f.src_host} ${f.dst_host} ${f.src}:${f.sport} ${f.dst}:${f.dport} ${f.state}`.toLowerCase();
  return q.toLowerCase().split(/\s+/).filter(Boolean).every((w) => hay.includes(w));
}

function flowValue(f, key) {
  if (key === "client") return `${f.src_host} ${f.src}:${String(f.sport).padStart(5, "0")}`;
  if (key === "server") return `${f.dst_host} ${f.dst}:${String(f.dport).padStart(5, "0")}`;
  return f[key];
}

function renderFlows() {
  const q = $("#flowfilter").value.trim();
  const { key, asc } = st.sort;
  const rows = st.flows.filter((f) => flowMatches(f, q));
  rows.sort((a, b) => {
    const x = flowValue(a, key), y = flowValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  });
  $("#flowcount").textContent = `${rows.length} of ${st.flows.length}`;
  $("#flows tbody").replaceChildren(...rows.map((f) => el("tr",
    { "data-flow": `${f.src}:${f.sport}-${f.dst}:${f.dport}` },
    el("td", { class: "mono" }, `${f.src_host} ${f.src}:${f.sport}`),
    el("td", { class: "mono" }, `${f.dst_host} ${f.dst}:${f.dport}`),
    el("td", { class: "state-" + f.state }, f.state),
    el("td", { class: "num bytes-out", "data-bytes": f.bytes_out }, human(f.bytes_out)),
    el("td", { class: "num bytes-in", "data-bytes": f.bytes_in }, human(f.bytes_in)),
    el("td", { class: "num" }, f.packets),
    el("td", { class: "num" }, secs(f.age)),
    el("td", { class: "num" }, secs(f.idle)))));
  for (const th of document.querySelectorAll("#flows th")) {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && asc);
  }
}

// ---- packet log ------------------------------------------------------------------------------

function packetMatches(p, q) {
  if (!q) return true;
  const hay = `${p.src_host} ${p.dst_host} ${p.src}:${p.sport} ${p.dst}:${p.dport} ${p.flags || ""} ${p.proto} ${p.drop || ""}`.toLowerCase();
  return q.toLowerCase().split(/\s+/).filter(Boolean).every((w) => hay.includes(w));
}

function addPackets(list) {
  if (st.paused) {
    st.held.push(...list);
    if (st.held.length > MAX_PACKETS) st.held.splice(0, st.held.length - MAX_PACKETS);
  } else {
    st.packets.push(...list);
    if (st.packets.length > MAX_PACKETS) st.packets.splice(0, st.packets.length - MAX_PACKETS);
    schedulePackets();
  }
  updatePacketInfo();
}

// Redraw the packet log at most every RENDER_EVERY_MS, and only when the tab is visible:
// the feed can be faster than a laptop wants to rebuild a table.
let packetTimer = null;
let lastPacketRender = 0;
function schedulePackets() {
  if (packetTimer !== null) return;
  const wait = Math.max(0, lastPacketRender + RENDER_EVERY_MS - performance.now());
  packetTimer = setTimeout(() => {
    packetTimer = null;
    lastPacketRender = performance.now();
    requestAnimationFrame(renderPackets);
  }, wait);
}

function endpoint(p, which) {
  const ip = p[which] || "?";
  const port = p[which === "src" ? "sport" : "dport"];
  return port === undefined ? ip : `${ip}:${port}`;
}

function renderPackets() {
  const q = $("#pktfilter").value.trim();
  const rows = [];
  for (let i = st.packets.length - 1; i >= 0 && rows.length < SHOWN_PACKETS; i--) {
    const p = st.packets[i];
    if (!packetMatches(p, q)) continue;
    rows.push(el("tr", { class: p.drop ? "drop" : "" },
      el("td", { class: "mono" }, clock(p.t)),
      el("td", {}, `${p.src_host} → ${p.dst_host || "?"}`),
      el("td", { class: "mono" }, endpoint(p, "src")),
      el("td", { class: "mono" }, endpoint(p, "dst")),
      el("td", { class: "mono" }, p.flags || p.proto),
      el("td", { class: "num" }, p.len),
      el("td", { class: "num" }, p.payload === undefined ? "" : p.payload),
      el("td", {}, p.drop ? "dropped: " + p.drop : "")));
  }
  $("#packets tbody").replaceChildren(...rows);
}

function updatePacketInfo() {
  const held = st.paused ? ` · paused, ${st.held.length} waiting` : "";
  $("#pktinfo").textContent = `${st.packets.length} kept, sampled (${human(st.notLogged || 0)} not logged)${held}`;
}

// ---- feed --------------------------------------------------------------------------------------

function onMessage(msg) {
  switch (msg.type) {
    case "snapshot":
      st.prev.clear(); st.rates.clear(); st.prevT = 0;
      st.packets = []; st.held = [];
      $("#events").replaceChildren();
      for (const ev of msg.events) addEvent(ev);
      updateHosts(msg.hosts, msg.t);
      st.flows = msg.flows; renderFlows();
      renderRoutes(msg.routes);
      relayStats(msg.relay);
      addPackets(msg.packets);
      break;
    case "tick":
      updateHosts(msg.hosts, msg.t);
      st.flows = msg.flows; renderFlows();
      if (msg.routes) renderRoutes(msg.routes);
      relayStats(msg.relay);
      break;
    case "packets":
      addPackets(msg.packets);
      break;
    case "agent":
    case "routeSuggestion":
      addEvent(msg);
      break;
    case "lost":
      st.lost = msg.count;
      $("#lost").hidden = false;
      $("#lost").textContent = `this view lost ${msg.count} events (too slow)`;
      break;
  }
}

function relayStats(r) {
  st.notLogged = r.not_logged;
  $("#relaystats").textContent = `${r.clients} viewer(s), ${r.clients_dropped} dropped`;
  updatePacketInfo();
}

function connect() {
  const conn = $("#conn");
  if (!token) {
    conn.className = "badge closed";
    conn.textContent = "no token in the URL: open the URL printed in the manager's log";
    return;
  }
  const ws = new WebSocket(`ws://${location.host}/ws?token=${encodeURIComponent(token)}`);
  ws.onopen = () => { conn.className = "badge live"; conn.textContent = "live"; };
  ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  ws.onclose = () => {
    conn.className = "badge closed"; conn.textContent = "disconnected, retrying…";
    setTimeout(connect, 2000);
  };
}

// ---- controls ------------------------------------------------------------------------------------

for (const th of document.querySelectorAll("#flows th")) {
  th.addEventListener("click", () => {
    const key = th.dataset.key;
    st.sort = { key, asc: st.sort.key === key ? !st.sort.asc : key === "client" || key === "server" || key === "state" || key === "idle" };
    renderFlows();
  });
}
$("#flowfilter").addEventListener("input", renderFlows);
$("#pktfilter").addEventListener("input", renderPackets);
$("#pause").addEventListener("click", () => {
  st.paused = !st.paused;
  $("#pause").textContent = st.paused ? "Resume" : "Pause";
  if (!st.paused) { const held = st.held; st.held = []; addPackets(held); }
  updatePacketInfo();
});
$("#pcapform").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = new URLSearchParams({ token, host: $("#pcaphost").value, payload: $("#pcappayload").checked ? "1" : "0" });
  const a = el("a", { href: "/pcap?" + q.toString(), download: "" });
  document.body.append(a); a.click(); a.remove();
});
window.addEventListener("resize", renderHosts);
connect();
