// The operator view: one EventSource for live parts and the station panel, plain DOM updates.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const HISTORY_S = 300;      // chart span
const RECENT_PARTS = 40;    // verdict marks kept per camera
const history = [];         // [{t, results, fail, error}] one per station event

function text(el, value) { if (el) el.textContent = value == null || value === "" ? "–" : String(value); }
function fmt(x, digits = 1) { return x == null ? "–" : Number(x).toFixed(digits); }
function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement(tag); td.textContent = c; tr.appendChild(td); }
  return tr;
}
function dl(el, pairs) {
  el.replaceChildren();
  for (const [k, v, cls] of pairs) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; if (cls) dd.className = cls;
    el.append(dt, dd);
  }
}

function cameraCard(camera) {
  let card = document.querySelector(`article.camera[data-camera="${CSS.escape(camera)}"]`);
  if (card) return card;
  card = $("#camera-card").content.firstElementChild.cloneNode(true);
  card.dataset.camera = camera;
  text($(".name", card), camera);
  const cards = $("#cameras");
  const after = [...cards.children].find((c) => c.dataset.camera > camera);
  cards.insertBefore(card, after || null);
  return card;
}

function showFrame(f) {
  const card = cameraCard(f.camera);
  card.dataset.resultId = f.result_id;
  card.dataset.version = f.version;
  const badge = $(".verdict", card);
  badge.textContent = f.verdict;
  badge.className = `verdict badge ${f.verdict}`;
  text($(".part-id", card), f.part_id);
  text($(".seq", card), f.seq);
  text($(".latency", card), f.latency_ms == null ? null : `${fmt(f.latency_ms)} ms`);
  text($(".defect-count", card), f.verdict === "error" ? (f.reason || f.rule) : f.defects.length);
  const body = $("table.defects tbody", card);
  body.replaceChildren(...f.defects.slice(0, 8).map((d, i) =>
    row([i + 1, d.area_px, d.area_mm2 == null ? "–" : fmt(d.area_mm2, 2), fmt(d.score, 2)])));
  if (f.image) {
    const img = $("img.live", card);
    img.dataset.version = f.version;
    img.src = f.image;
  }
  const recent = $("ol.recent", card);
  const li = document.createElement("li");
  li.className = f.verdict;
  li.dataset.resultId = f.result_id;
  li.dataset.verdict = f.verdict;
  li.dataset.partId = f.part_id ?? "";
  li.title = `${f.verdict} · part ${f.part_id ?? "–"} · #${f.seq}`;
  recent.prepend(li);
  while (recent.children.length > RECENT_PARTS) recent.lastElementChild.remove();
}

function drawChart(canvas, series, colours) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1e-9, ...series.flat());
  series.forEach((values, k) => {
    ctx.strokeStyle = colours[k];
    ctx.beginPath();
    values.forEach((v, i) => {
      // newest at the right edge, one pixel column per second of HISTORY_S
      const x = w - ((values.length - 1 - i) / Math.max(1, HISTORY_S - 1)) * w;
      const y = h - 2 - (v / max) * (h - 4);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#8b94a3";
  ctx.font = "10px sans-serif";
  ctx.fillText(max.toFixed(1) + "/s", 4, 11);
}

function rates() {
  const out = { rate: [], fail: [], error: [] };
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i], dt = Math.max(1e-3, b.t - a.t);
    out.rate.push((b.results - a.results) / dt);
    out.fail.push((b.fail - a.fail) / dt);
    out.error.push((b.error - a.error) / dt);
  }
  return out;
}

function showStation(s) {
  text($("#station"), s.station);
  text($("#version"), `defectd ${s.version}`);
  const state = $("#state");
  state.textContent = s.ready ? "ready" : s.live ? "not ready" : "stalled";
  state.className = `badge ${s.ready ? "ready" : s.live ? "notready" : "down"}`;
  text($("#rate"), `${fmt(s.fps)} parts/s`);
  text($("#clock"), new Date(s.time * 1000).toLocaleTimeString());
  const alarms = $("#alarms");
  alarms.hidden = !s.alarms.length;
  alarms.replaceChildren(...s.alarms.map((a) => Object.assign(document.createElement("li"), { textContent: a })));
  for (const v of ["pass", "fail", "error"]) text($(`#n-${v}`), s.verdicts[v] ?? 0);
  text($("#broker"), s.broker.connected ? `connected ${s.broker.address}` : `disconnected ${s.broker.address}${s.broker.last_error ? " – " + s.broker.last_error : ""}`);
  $("#broker").className = s.broker.connected ? "" : "alarm";
  const o = s.outbox;
  text($("#outbox"), o.depth == null ? null : `${o.depth} waiting${o.oldest_age_s ? `, oldest ${fmt(o.oldest_age_s)} s` : ""}${o.near_bound ? " (near bound)" : ""}`);
  dl($("#camera-states"), Object.entries(s.cameras).map(([cam, c]) =>
    [cam, `${c.state}, ${fmt(c.fps)} fps, lost ${c.lost}, reconnects ${c.reconnects}`]));
  const e = s.engine || {};
  text($("#model-name"), e.model);
  text($("#model-sha"), e.sha256 ? e.sha256.slice(0, 16) : null);
  text($("#model-engine"), e.engine ? `${e.engine} ${e.version}` : null);
  text($("#model-precision"), e.precision);
  dl($("#calibration"), Object.entries(s.calibration).map(([cam, c]) => [cam,
    c.file ? `${c.file}: ${c.mm_per_px ? fmt(c.mm_per_px, 4) + " mm/px" : "no scale"}, ` +
      `${c.threshold != null ? "threshold " + fmt(c.threshold, 2) + (c.applies ? "" : " (other model)") : "model threshold"}`
      : "not calibrated"]));
  $("#events").replaceChildren(...s.events.slice().reverse().map((ev) => {
    const li = document.createElement("li");
    li.className = ev.severity || "";
    const when = new Date(ev.time * 1000).toLocaleTimeString();
    li.textContent = `${when} ${ev.kind}${ev.camera ? " " + ev.camera : ""}${ev.detail ? " – " + ev.detail : ""}`;
    return li;
  }));
  const last = history[history.length - 1];
  if (!last || s.time - last.t >= 0.5) {  // a reconnect can bring two snapshots close together
    history.push({ t: s.time, results: s.results, fail: s.verdicts.fail ?? 0, error: s.verdicts.error ?? 0 });
  }
  while (history.length > HISTORY_S) history.shift();
  const r = rates();
  drawChart($("#chart-rate"), [r.rate], ["#3cb44b"]);
  drawChart($("#chart-reject"), [r.fail, r.error], ["#e64646", "#ffa500"]);
  const rejects = (s.verdicts.fail ?? 0) + (s.verdicts.error ?? 0);
  if (rejects !== lastRejects) { lastRejects = rejects; loadGallery(); }
}

let lastRejects = -1;
let galleryBusy = false;
async function loadGallery() {
  if (galleryBusy) return;
  galleryBusy = true;
  try {
    const res = await fetch("/api/rejects", { cache: "no-store" });
    if (!res.ok) return;
    const data = await res.json();
    text($("#gallery-note"), data.archive ? `newest ${data.rejects.length}` : "archive off");
    const gallery = $("#gallery");
    const known = new Map([...gallery.children].map((el) => [el.dataset.stem, el]));
    const items = data.rejects.map((r) => known.get(r.stem) || rejectTile(r));
    gallery.replaceChildren(...items);
  } finally {
    galleryBusy = false;
  }
}

function rejectTile(r) {
  const b = document.createElement("button");
  b.className = `reject ${r.verdict}`;
  b.dataset.stem = r.stem;
  b.dataset.resultId = r.result_id;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = `${r.verdict} ${r.camera} #${r.seq}`;
  img.src = `/api/rejects/${encodeURIComponent(r.stem)}/overlay.jpg?w=240`;
  const label = document.createElement("span");
  const when = r.t_grab_wall ? new Date(r.t_grab_wall * 1000).toLocaleTimeString() : "";
  label.textContent = `${r.verdict} · ${r.camera} · part ${r.part_id ?? "#" + r.seq} · ${when}`;
  b.append(img, label);
  b.addEventListener("click", () => openPart(r.stem));
  return b;
}

async function openPart(stem) {
  const res = await fetch(`/api/rejects/${encodeURIComponent(stem)}`, { cache: "no-store" });
  if (!res.ok) return;
  const p = await res.json();
  const dlg = $("#part");
  dlg.dataset.stem = stem;
  dlg.dataset.resultId = p.result_id;
  const v = $(".verdict", dlg);
  v.textContent = p.verdict;
  v.className = `verdict badge ${p.verdict}`;
  text($(".title", dlg), `${p.camera} · part ${p.part_id ?? "–"} · #${p.seq}`);
  $("img.overlay", dlg).src = `/api/rejects/${encodeURIComponent(stem)}/overlay.jpg?w=1024`;
  dl($(".details", dlg), [
    ["time", p.t_grab_wall ? new Date(p.t_grab_wall * 1000).toLocaleString() : "–"],
    ["rule", p.rule ?? "–"],
    ["reason", p.reason ?? "–"],
    ["latency", p.latencies_ms && p.latencies_ms.total != null ? `${fmt(p.latencies_ms.total)} ms` : "–"],
    ["model", `${p.model_name} ${(p.model_sha256 || "").slice(0, 12)}`],
    ["result id", p.result_id, "mono"],
  ]);
  $("table.defects tbody", dlg).replaceChildren(...(p.defects || []).map((d, i) =>
    row([i + 1, d.area_px, d.area_mm2 == null ? "–" : fmt(d.area_mm2, 2), fmt(d.score_max, 2), d.bbox.join(",")])));
  if (!dlg.open) dlg.showModal();
}

function connect() {
  const source = new EventSource("/api/live");
  source.addEventListener("frame", (ev) => showFrame(JSON.parse(ev.data)));
  source.addEventListener("station", (ev) => showStation(JSON.parse(ev.data)));
  source.onerror = () => { const s = $("#state"); s.textContent = "reconnecting"; s.className = "badge down"; };
}

connect();
loadGallery();
