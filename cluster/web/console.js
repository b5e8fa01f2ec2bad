// The lbnode console: polls /api/v1/status every second and renders it. Read-only.
//
// Rates are computed here: each poll's counters (packets, bytes per service and backend, the
// data plane's stats) minus the previous poll's, over the time between them, kept for the last
// HISTORY polls per series (bounded however long the page stays open). A counter that went
// down (the node restarted) starts its series afresh instead of showing a negative rate.
"use strict";

const POLL_MS = 1000;
const HISTORY = 60;
const SVG = "http://www.w3.org/2000/svg";

const series = new Map();  // key -> {last: value, at: ms, rates: []}
let lastOk = 0;
let polls = 0;

function rate(key, value, at) {
  let s = series.get(key);
  if (!s) { s = {last: value, at: at, rates: []}; series.set(key, s); return s.rates; }
  const dt = (at - s.at) / 1000;
  if (dt > 0) {
    if (value >= s.last) { s.rates.push((value - s.last) / dt); } else { s.rates.length = 0; }
    if (s.rates.length > HISTORY) s.rates.splice(0, s.rates.length - HISTORY);
    s.last = value; s.at = at;
  }
  return s.rates;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function badge(text, cls) { return el("span", {class: "badge " + (cls || text).replace(/\s+/g, ""), text: text}); }

function si(n, unit) {
  if (n === null || n === undefined || isNaN(n)) return "–";
  const abs = Math.abs(n);
  const [d, p] = abs >= 1e9 ? [1e9, "G"] : abs >= 1e6 ? [1e6, "M"] : abs >= 1e3 ? [1e3, "k"] : [1, ""];
  return (n / d).toFixed(d === 1 && Number.isInteger(n) ? 0 : 1) + " " + p + unit;
}

function spark(rates, cls) {
  const w = 120, h = 24;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark " + (cls || ""));
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const max = Math.max(1, ...rates);
  const pts = rates.map((r, i) => `${(w * (i + HISTORY - rates.length) / (HISTORY - 1)).toFixed(1)},` +
                                  `${(h - 1 - (h - 2) * r / max).toFixed(1)}`);
  const base = document.createElementNS(SVG, "line");  // the whole minute; data fills it from the right
  base.setAttribute("x1", 0); base.setAttribute("x2", w); base.setAttribute("y1", h - 0.5); base.setAttribute("y2", h - 0.5);
  svg.append(base);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.append(line);
  return svg;
}

function sparkCell(rates, unit, cls) {
  const now = rates.length ? rates[rates.length - 1] : null;
  return el("td", {}, el("div", {class: "spark-cell"}, spark(rates, cls), el("span", {text: si(now, unit)})));
}

function weightOf(w) {
  // A number (configured), or {configured, observed, effective, ...} with load-aware weights.
  if (w !== null && typeof w === "object") return w;
  return {configured: w};
}

// The runtime controls (`lbnode drain`, `lbnode disable`): who and when, for a tooltip.
function adminNote(what, o) { return `${what} by ${o.admin_by || "?"} at ${o.admin_at || "?"}`; }

const PHASES = {withdrawn: "route withdrawn; new flows still taken until the grace ends",
                stopped: "no new flows; pinned flows go on"};

function backendState(b) {
  if (b.admin === "drained") return ["drained", "drained"];  // at run time; `disabled` is true then too
  if (b.disabled) return ["disabled", "disabled"];  // in the config
  if (!b.usable) return ["down", "down"];
  if (!b.in_hash) return [b.mac ? "out of hash" : "no MAC", "nomac"];
  return ["up", "up"];
}

function fact(dl, name, value) { dl.append(el("div", {}, el("dt", {text: name}), el("dd", {text: value}))); }

function renderHeader(doc) {
  const n = doc.node;
  document.getElementById("node-ip").textContent = `${n.ip} on ${n.interface}`;
  const state = document.getElementById("node-state");
  state.replaceWith(Object.assign(badge(n.state), {id: "node-state"}));
  const facts = document.getElementById("node-facts");
  facts.replaceChildren();
  fact(facts, "xdp", n.xdp);
  fact(facts, "flows", `${doc.flows.entries} / ${doc.flows.table_size}`);
  fact(facts, "loop stall (max)", `${doc.loop.max_stall_ms} ms`);
  fact(facts, "reloads", `${n.reloads.ok} ok, ${n.reloads.refused} refused`);
  if (n.forwarding_problem) fact(facts, "cannot forward", n.forwarding_problem);
  if (n.last_reload_error) fact(facts, "last reload error", n.last_reload_error);
}

function renderVips(doc) {
  const list = document.getElementById("vip-list");
  list.replaceChildren();
  const disabled = new Map(((doc.node.admin || {}).disabled || []).map(d => [d.vip, d]));
  for (const p of doc.node.announced) list.append(el("li", {"data-vip": p, "data-announced": "true"}, p + " ",
                                                      badge("announced")));
  for (const [p, why] of Object.entries(doc.node.withheld)) {
    const d = disabled.get(p.split("/")[0]);
    const state = d ? Object.assign(badge(`disabled · ${d.phase}`, "disabled"), {title: PHASES[d.phase] || ""})
                    : badge("withheld");
    list.append(el("li", {"data-vip": p, "data-announced": "false", "data-admin": d ? "disabled" : "",
                          "data-admin-phase": d ? d.phase : ""}, p + " ", state,
                   el("span", {class: "reason", text: why})));
  }
}

function renderServices(doc, at) {
  const out = [];
  for (const s of doc.services) {
    const admin = s.admin === "disabled"
      ? Object.assign(badge(`disabled · ${s.admin_phase}`, "disabled"),
                      {title: `${adminNote("VIP disabled", s)}: ${PHASES[s.admin_phase] || s.admin_phase}`})
      : null;
    const head = el("div", {class: "service-head"},
      el("span", {class: "name", text: s.name}), badge(s.up ? "up" : "down"), admin,
      el("span", {class: "muted", text: `${s.usable} of ${s.backends.length} usable, need ${s.need} · ` +
                                        `${s.new_flows} new flows · ${s.drops} drops`}));
    const pps = rate(`s/${s.name}/p`, s.packets, at), bps = rate(`s/${s.name}/b`, s.bytes * 8, at);
    head.append(el("div", {class: "spark-cell"}, spark(pps), el("span", {text: si(pps.at(-1), "pps")}),
                   spark(bps, "bytes"), el("span", {text: si(bps.at(-1), "bps")})));
    const body = el("tbody");
    for (const b of s.backends) {
      const [label, cls] = backendState(b);
      const state = badge(label, cls);
      if (b.admin === "drained") state.title = adminNote("drained", b) + "; pinned flows go on";
      const w = weightOf(b.weight);
      const bp = rate(`b/${s.name}/${b.backend}/p`, b.packets, at);
      const bb = rate(`b/${s.name}/${b.backend}/b`, (b.bytes || 0) * 8, at);
      body.append(el("tr", {"data-service": s.name, "data-backend": b.backend, "data-state": cls},
        el("td", {text: b.backend}), el("td", {}, state),
        el("td", {class: "num", text: String(w.configured ?? "–")}),
        el("td", {class: "num", text: w.effective === undefined ? "–" : String(w.effective)}),
        el("td", {class: "num", text: String(b.new_flows)}),
        sparkCell(bp, "pps"), sparkCell(bb, "bps", "bytes"),
        el("td", {class: "error-text", text: b.last_error || ""})));
    }
    const table = el("table", {class: "backends"},
      el("thead", {}, el("tr", {}, ...["backend", "state", "weight", "effective", "new flows", "packets/s",
                                       "bits/s", "last error"].map(t => el("th", {text: t})))), body);
    out.push(el("div", {class: "service", "data-service": s.name, "data-admin": s.admin || "",
                        "data-admin-phase": s.admin_phase || ""}, head, table));
  }
  document.getElementById("service-list").replaceChildren(...out);
}

// ---- loads and weights (load-aware weights) ------------------------------------------------------
// Shown only for services whose weights are computed (load-aware: backends[].weight carries a
// `multiplier` besides {configured, observed, effective}; static ones carry only the three).
// Each is drawn as a share of its service's total, so they compare.
function renderWeights(doc) {
  const section = document.getElementById("weights-chart");
  const rows = [];
  for (const s of doc.services) {
    const ws = s.backends.map(b => weightOf(b.weight));
    if (!ws.some(w => w.multiplier !== undefined)) continue;
    const total = k => ws.reduce((a, w) => a + (Number(w[k]) || 0), 0) || 1;
    const totals = {observed: total("observed"), configured: total("configured"), effective: total("effective")};
    s.backends.forEach((b, i) => {
      const bars = el("div", {class: "bar-group"});
      for (const k of ["observed", "configured", "effective"]) {
        const share = (Number(ws[i][k]) || 0) / totals[k];
        const svg = document.createElementNS(SVG, "svg");
        svg.setAttribute("width", "100%"); svg.setAttribute("height", "8");
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("class", "bar-rect"); r.setAttribute("height", "8");
        r.setAttribute("width", `${(100 * share).toFixed(1)}%`);
        r.setAttribute("fill", {observed: "#7a4fd0", configured: "#9aa5b1", effective: "#2f6fd0"}[k]);
        svg.append(r);
        bars.append(el("div", {title: `${k}: ${(100 * share).toFixed(1)}%`}, svg));
      }
      rows.push(el("div", {text: `${s.name} ${b.backend}`}), bars);
    });
  }
  section.hidden = rows.length === 0;
  if (rows.length) {
    const legend = el("div", {class: "legend"}, ...["observed", "configured", "effective"].map(
      k => el("span", {}, el("i", {class: k}), k)));
    document.getElementById("weights-chart-body").replaceChildren(legend, el("div", {class: "bars"}, ...rows));
  }
}

function renderBgp(doc) {
  const body = document.querySelector("#bgp-table tbody");
  const peers = doc.bgp ? doc.bgp.peers : [];
  document.getElementById("bgp-none").hidden = !!doc.bgp;
  document.getElementById("bgp-table").hidden = !doc.bgp;
  body.replaceChildren(...peers.map(p => {
    const bfd = p.bfd || null;
    return el("tr", {"data-peer": p.address},
      el("td", {text: p.address}), el("td", {}, badge(p.state)),
      el("td", {class: "num", text: String(p.established_count)}),
      el("td", {class: "num", text: String(p.received_updates)}),
      el("td", {}, bfd ? badge(bfd.state) : el("span", {class: "muted", text: "off"})),
      el("td", {class: "num", text: bfd && bfd.detection_time_ms != null ? `${bfd.detection_time_ms} ms` : "–"}),
      el("td", {class: "error-text", text: p.last_error || ""}));
  }));
}

function renderSync(doc, at) {
  const sync = doc.sync;
  document.getElementById("sync-none").hidden = !!sync;
  document.getElementById("sync-table").hidden = !sync;
  const facts = document.getElementById("sync-facts");
  facts.replaceChildren();
  const body = document.querySelector("#sync-table tbody");
  if (!sync) { body.replaceChildren(); return; }
  fact(facts, "node id", String(sync.node_id));
  fact(facts, "ready", String(sync.ready));
  fact(facts, "gaps open", String(sync.gaps_open));
  const c = sync.counters || {};
  const sent = rate("sync/sent", c.sent_flows || 0, at), got = rate("sync/recv", c.received_flows || 0, at);
  fact(facts, "flows sent/s", si(sent.at(-1), ""));
  fact(facts, "flows received/s", si(got.at(-1), ""));
  fact(facts, "lost", String(c.lost || 0));
  fact(facts, "forged", String(c.forged || 0));
  body.replaceChildren(...sync.peers.map(p => el("tr", {"data-sync-peer": String(p.node_id)},
    el("td", {text: p.address || "?"}), el("td", {text: String(p.node_id)}),
    el("td", {}, badge(p.alive ? "up" : "down")), el("td", {class: "num", text: String(p.lag)}),
    el("td", {class: "num", text: `${p.last_seen_s} s ago`}), el("td", {class: "num", text: String(p.flows ?? "–")}),
    el("td", {text: p.digest_match === null ? "?" : p.digest_match ? "match" : "differs"}),
    el("td", {text: p.resyncing ? "resyncing" : p.resync_wanted ? "wanted" : ""}))));
}

function renderCounters(doc, at) {
  const body = document.querySelector("#counter-table tbody");
  body.replaceChildren(...Object.entries(doc.counters).map(([k, v]) => {
    const r = rate(`c/${k}`, v, at);
    return el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: String(v)}),
              el("td", {class: "num", text: si(r.at(-1), "")}));
  }));
}

function render(doc) {
  const at = performance.now();
  renderHeader(doc);
  renderVips(doc);
  renderServices(doc, at);
  renderWeights(doc);
  renderBgp(doc);
  renderSync(doc, at);
  renderCounters(doc, at);
}

async function poll() {
  const banner = document.getElementById("error");
  try {
    const response = await fetch("api/v1/status", {cache: "no-store"});
    if (!response.ok) throw new Error(`${response.status} ${(await response.text()).trim()}`);
    const doc = await response.json();
    render(doc);
    lastOk = Date.now();
    banner.hidden = true;
    document.body.dataset.polls = String(++polls);  // tests wait for this
  } catch (err) {
    banner.textContent = `cannot read the node's status: ${err.message}` +
                         (lastOk ? ` (last update ${Math.round((Date.now() - lastOk) / 1000)} s ago)` : "");
    banner.hidden = false;
  }
  document.getElementById("poll").textContent = lastOk ? `updated ${new Date(lastOk).toLocaleTimeString()}` : "";
  setTimeout(poll, POLL_MS);
}

poll();
