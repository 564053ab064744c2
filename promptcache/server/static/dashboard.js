// The promptcache dashboard: reads /dashboard/api/events (server-sent events over fetch, so a key
// can go in the Authorization header) and redraws. Every value is set with textContent: prompts are
// user text and never become markup.
"use strict";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("promptcache-key") || "";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const pct = (x) => (100 * x).toFixed(1) + "%";
const usd = (x) => "$" + (x >= 0.01 ? x.toFixed(2) : x.toPrecision(2));
const int = (x) => Number(x).toLocaleString("en-US");
const ago = (t, now) => { const s = Math.max(0, now - t); return s < 60 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago"; };

function headers() {
  return key ? { Authorization: "Bearer " + key } : {};
}

function status(text, live) {
  $("status").textContent = text;
  $("status").classList.toggle("live", !!live);
}

function bar(parts, total, big) {
  const b = el("div", { class: big ? "bar big" : "bar" });
  for (const [cls, n, title] of parts) {
    if (n > 0) b.append(el("div", { class: "seg " + cls, style: `width:${(100 * n) / total}%`, title: title + ": " + int(n) }));
  }
  return b;
}

function drawChart(series, bucket, now) {
  const svg = $("chart");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const W = 600, H = 140;
  // from the oldest bucket kept (at most ten minutes) to now, and at least two minutes
  const span = Math.max(120, series.length ? now - series[0].t : 0);
  for (const y of [0.25, 0.5, 0.75]) {
    const line = document.createElementNS(ns, "line");
    Object.entries({ x1: 0, x2: W, y1: H * (1 - y), y2: H * (1 - y), stroke: "#e3e6eb" }).forEach(([k, v]) => line.setAttribute(k, v));
    svg.append(line);
  }
  const pts = series.map((s) => [W * (1 - (now - s.t - bucket / 2) / span), 4 + (H - 8) * (1 - s.cached_tokens / s.prompt_tokens)]);
  const visible = pts.filter(([x]) => x >= 0);
  if (!visible.length) return;
  const poly = document.createElementNS(ns, "polyline");
  poly.setAttribute("points", visible.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  poly.setAttribute("fill", "none");
  poly.setAttribute("stroke", "#2e9d5b");
  poly.setAttribute("stroke-width", "2");
  svg.append(poly);
  for (const [x, y] of visible) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 3); c.setAttribute("fill", "#2e9d5b");
    svg.append(c);
  }
}

function drawMemory(engine) {
  const sec = $("memory-section");
  sec.hidden = !engine;
  if (!engine) return;
  const b = engine.blocks;
  const inUse = Math.max(0, b.in_use - b.pinned);
  $("memory-bar").replaceChildren(...bar([["inuse", inUse, "in use"], ["pinned", b.pinned, "pinned"],
    ["cachedblk", b.cached, "cached"], ["free", b.free, "free"]], b.total, true).childNodes);
  $("m-inuse").textContent = int(inUse);
  $("m-cached").textContent = int(b.cached);
  $("m-pinned").textContent = int(b.pinned);
  $("m-free").textContent = int(b.free) + ` of ${int(b.total)} blocks (${engine.block_size} tokens each)`;
  const ev = $("evictions");
  ev.replaceChildren(`${int(engine.evictions)} blocks evicted, ${int(engine.preemptions)} preemptions. `);
  if (engine.early_evictions > 0) {
    ev.append(el("span", { class: "bad", id: "early" }, `${int(engine.early_evictions)} early evictions: blocks ` +
      "evicted inside their retention — memory is too small for this traffic (raise --kv-cache-memory, or add a disk tier)."));
  }
  const tiers = Object.entries(engine.tiers || {});
  $("tiers").hidden = !tiers.length;
  $("tiers").tBodies[0].replaceChildren(...tiers.map(([name, t]) => el("tr", {}, el("td", {}, name),
    el("td", {}, int(t.hit_blocks || 0)), el("td", {}, int(t.miss_blocks || 0)),
    el("td", {}, int((engine.cached_tokens_by_tier || {})[name] || 0)), el("td", {}, t.objects === undefined ? "–" : int(t.objects)),
    el("td", {}, t.bytes_stored === undefined ? "–" : (t.bytes_stored / 1048576).toFixed(1) + " MiB"),
    el("td", {}, int(t.errors || 0)), el("td", {}, int(t.corrupt || 0)))));
}

function drawRequests(reqs, now) {
  const widest = Math.max(1, ...reqs.map((r) => r.prompt + r.generated));
  $("requests-list").replaceChildren(...reqs.slice(0, 40).map((r) => {
    const tiers = Object.entries(r.by_tier || {}).filter(([, n]) => n).map(([t, n]) => `${int(n)} from ${t}`).join(", ");
    const row = el("div", { class: "req", "data-id": r.id },
      el("div", { class: "who", title: r.id }, `${r.tenant} · ${r.endpoint.replace("/v1/", "")} · ${ago(r.t, now)}`),
      el("div", { style: `width:${(100 * (r.prompt + r.generated)) / widest}%` },
        bar([["cached", r.cached, "reused"], ["computed", r.computed, "computed"], ["generated", r.generated, "generated"]],
          r.prompt + r.generated)),
      el("div", { class: "nums" }, `${int(r.cached)}/${int(r.prompt)} reused · ${r.ttft_ms.toFixed(0)} ms`));
    row.title = `${r.id}: prompt ${r.prompt}, reused ${r.cached}${tiers ? " (" + tiers + ")" : ""}, computed ${r.computed}, ` +
      `generated ${r.generated}, first token after ${r.ttft_ms} ms, reuse ended: ${r.reason}`;
    return row;
  }));
}

function drawTenants(tenants) {
  $("tenants").tBodies[0].replaceChildren(...Object.entries(tenants).map(([name, t]) => el("tr", { "data-tenant": name },
    el("td", {}, name), el("td", {}, int(t.requests)), el("td", {}, int(t.prompt_tokens)), el("td", {}, int(t.cached_tokens)),
    el("td", {}, pct(t.hit_rate)), el("td", {}, usd(t.cost_usd)), el("td", {}, usd(t.saved_usd)))));
}

function diverging(text, offset) {
  // the window is centred on the first differing character (diagnosis.WINDOW on each side)
  const pre = el("pre");
  pre.append(text.slice(0, offset), el("mark", {}, text.slice(offset, offset + 1) || "∅"), text.slice(offset + 1));
  return pre;
}

function drawMisses(misses, now) {
  const box = $("misses");
  if (!misses.length) { box.replaceChildren(el("p", { class: "muted" }, "None yet.")); return; }
  box.replaceChildren(...misses.map((m) => {
    const d = el("div", { class: "miss", "data-reason": m.reason },
      el("div", {}, el("b", {}, m.reason), ` · ${m.tenant} · ${int(m.missed_tokens)} tokens lost of ${int(m.reusable_tokens || m.missed_tokens)} ` +
        `reusable · reused ${int(m.cached_tokens)}/${int(m.prompt_tokens)} · vs ${m.compared_with} · ${ago(m.t, now)}`));
    const dv = m.divergence;
    if (dv) {
      const at = Math.min(dv.char_offset, 40);  // the window starts up to WINDOW characters before
      d.append(el("div", { class: "muted" }, `first differs at ${dv.path} (${dv.kind}), character ${dv.char_offset}` +
        (dv.looks_like ? ` — looks like ${dv.looks_like}` : "") + (dv.note ? ` — ${dv.note}` : "")),
        el("div", {}, "before:"), diverging(dv.before, at), el("div", {}, "after:"), diverging(dv.after, at));
    }
    if (m.lost) d.append(el("div", { class: "hint" }, `blocks were idle ${m.lost.idle_s} s and lost ${m.lost.ago_s} s ago`));
    if (m.lint) d.append(el("div", { class: "hint" }, m.lint));
    return d;
  }));
}

function render(v) {
  $("login").hidden = true;
  $("main").hidden = false;
  $("main").dataset.version = v.version;
  $("model").textContent = v.model;
  $("scope").textContent = v.scope === "all" ? "all tenants" : `tenant ${v.tenant}`;
  const t = v.totals;
  $("hit-rate").textContent = pct(t.hit_rate);
  $("hit-detail").textContent = `${int(t.cached_tokens)} of ${int(t.prompt_tokens)} prompt tokens reused`;
  $("requests").textContent = int(t.requests);
  $("running").textContent = v.engine ? `${v.engine.requests_running} running, ${v.engine.requests_waiting} waiting` : "";
  $("cost").textContent = usd(t.cost_usd);
  $("saved").textContent = `${usd(t.saved_usd)} saved by the cache`;
  $("replicas").textContent = v.replicas.length;
  $("replica-detail").textContent = v.replicas.map((r) => r.hit_rate === undefined ? `${r.name} (${r.role})`
    : `${r.name}: ${pct(r.hit_rate)} hit, ${int(Object.values(r.routed).reduce((a, b) => a + b, 0))} routed`).join("; ");
  $("bucket").textContent = v.bucket_s;
  drawChart(v.series, v.bucket_s, v.now);
  drawMemory(v.engine);
  drawRequests(v.requests, v.now);
  drawTenants(v.tenants);
  drawMisses(v.misses, v.now);
}

function askForKey(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  status("needs a key");
}

async function follow() {
  let res;
  try {
    res = await fetch("/dashboard/api/events", { headers: headers() });
  } catch (e) {
    status("disconnected; retrying");
    return setTimeout(follow, 2000);
  }
  if (res.status === 401) return askForKey(key ? "That key was not accepted." : "");
  if (!res.ok) { status(`error ${res.status}; retrying`); return setTimeout(follow, 5000); }
  status("live", true);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) render(JSON.parse(data));
      }
    }
  } catch (e) { /* the stream broke: reconnect below */ }
  status("disconnected; retrying");
  setTimeout(follow, 2000);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("promptcache-key", key);
  follow();
});

follow();
