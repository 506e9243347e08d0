// captiond dashboard: plain JavaScript, no dependencies. It talks only to captiond's
// JSON API and follows one Server-Sent Events stream (/v1/events) for live updates.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const TOKEN_KEY = "captiond.token";
const GRID_MAX = 120;

const nf0 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1, minimumFractionDigits: 1 });
const nf2 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2, minimumFractionDigits: 2 });
const fmtInt = (n) => (n == null ? "—" : nf0.format(n));
const fmtRate = (r) => (r == null ? "—" : r >= 10 ? nf1.format(r) : nf2.format(r));
const fmtMiB = (m) => (m == null ? "—" : m >= 1024 ? `${nf1.format(m / 1024)} GiB` : `${nf0.format(m)} MiB`);
function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "—";
  if (s < 1) return "done";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h > 0) return `${h} h ${m} min`;
  if (m > 0) return `${m} min ${sec} s`;
  return `${sec} s`;
}
const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const fmtTime = (iso) => (iso ? timeFmt.format(new Date(iso)) : "—");
const fmtDate = (iso) => (iso ? dateFmt.format(new Date(iso)) : "—");
const shortId = (id) => (id ? id.slice(-8) : "");

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
const svg = (tag, attrs = {}) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};

// ---- API access (token from session storage, never in a URL) ----------------------
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  tick: null,
  history: [],
  results: new Map(), // id → job (succeeded, shown in the grid)
  failures: new Map(), // id → job (failed)
  uploads: new Map(), // id → job (enqueued from this page)
  olderBefore: null,
  thumbs: new Map(), // key → object URL
  connected: false,
};

class AuthError extends Error {}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    askToken("The token was refused: enter the server's API token.");
    throw new AuthError("unauthorized");
  }
  return r;
}
async function apiJson(path, opts) {
  const r = await api(path, opts);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = body && body.error;
    throw new Error(e ? `${e.code}: ${e.message}` : `HTTP ${r.status}`);
  }
  return body;
}

function askToken(message) {
  const d = $("#token-dialog");
  $("#token-error").textContent = message || "";
  if (!d.open) d.showModal();
  $("#token-input").focus();
}
$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("#token-input").value.trim();
  if (!t) return;
  state.token = t;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("#token-dialog").close();
  $("#token-input").value = "";
  start();
});

// ---- Tabs (hash routing; arrow keys move between tabs) -----------------------------
const VIEWS = ["overview", "memory", "results", "failures", "enqueue"];
function showView() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  for (const v of VIEWS) {
    $(`#view-${v}`).hidden = v !== name;
    const tab = $(`#tab-${v}`);
    tab.setAttribute("aria-selected", String(v === name));
    tab.tabIndex = v === name ? 0 : -1;
  }
  document.body.dataset.view = name;
  if (name === "memory") drawCharts();
}
window.addEventListener("hashchange", showView);
$(".tabs").addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
  const tabs = $$(".tabs a");
  const i = tabs.indexOf(document.activeElement);
  if (i < 0) return;
  const next = tabs[(i + (ev.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
  next.focus();
  next.click();
});

// ---- Live feed --------------------------------------------------------------------
let feedAbort = null;
async function follow() {
  let delay = 500;
  for (;;) {
    feedAbort = new AbortController();
    try {
      const r = await api("/v1/events", { signal: feedAbort.signal, headers: { Accept: "text/event-stream" } });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      setConn(true);
      delay = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let name = "message", data = "";
          for (const line of frame.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
          }
          if (data) onEvent(name, JSON.parse(data));
        }
      }
    } catch (e) {
      if (e instanceof AuthError) { setConn(false); return; }
    }
    setConn(false);
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, 10000);
  }
}
function setConn(ok) {
  state.connected = ok;
  const c = $("#conn");
  c.textContent = ok ? "live" : "reconnecting…";
  c.className = `pill ${ok ? "pill-ok" : "pill-wait"}`;
}

function onEvent(name, data) {
  if (name === "hello") {
    state.history = data.history || [];
    if (data.tick) onTick(data.tick);
  } else if (name === "tick") {
    state.history.push(data.sample);
    if (state.history.length > 600) state.history.shift();
    onTick(data);
  } else if (name === "jobs") {
    for (const job of data.jobs) onJob(job);
  } else if (name === "resync") {
    loadLists();
  }
}

function onTick(t) {
  state.tick = t;
  const s = t.stats, j = s.jobs;
  const set = (sel, text) => { const e = $(sel); if (e.textContent !== text) e.textContent = text; };
  set('[data-count="waiting"]', fmtInt(j.queued + j.scheduled));
  set('[data-count="running"]', fmtInt(j.running));
  set('[data-count="succeeded"]', fmtInt(j.succeeded));
  set('[data-count="failed"]', fmtInt(j.failed));
  set('[data-count="cancelled"]', fmtInt(j.cancelled));
  set("#rate-minute", fmtRate(s.images_per_second));
  set("#rate-start", fmtRate(t.images_per_second_since_start));
  set("#eta", j.queued + j.scheduled + j.running === 0 ? "nothing waiting" : fmtDuration(t.eta_seconds));
  set("#workers", s.workers ? `${s.workers.busy} / ${s.workers.target}` : "—");
  const badge = $("#failed-badge");
  badge.hidden = j.failed === 0;
  badge.textContent = fmtInt(j.failed);
  const ms = $("#model-state");
  ms.textContent = s.ready ? "model ready" : "model loading";
  ms.className = `pill ${s.ready ? "pill-ok" : "pill-wait"}`;
  const qs = $("#queue-state");
  qs.textContent = s.paused ? "paused" : "claiming";
  qs.className = `pill ${s.paused ? "pill-bad" : "pill-ok"}`;
  const pb = $("#pause");
  pb.disabled = false;
  pb.textContent = s.paused ? "Resume queue" : "Pause queue";
  pb.dataset.paused = String(s.paused);
  set("#model-line", `Model ${s.model.name}${s.model.revision ? " @ " + s.model.revision.slice(0, 12) : ""} · up ${fmtDuration(s.uptime_seconds)}`);
  renderBatches(t.batches || []);
  renderDecisions(s.concurrency);
  if (document.body.dataset.view === "memory") drawCharts();
}

function renderBatches(batches) {
  const body = $("#batches tbody");
  if (!batches.length) return;
  const rows = batches.map((b) => {
    const c = b.counts, total = Math.max(b.total, 1);
    const done = c.succeeded + c.failed + c.cancelled;
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": b.total, "aria-valuenow": done, "aria-label": `batch ${shortId(b.id)} progress` });
    for (const [cls, n] of [["b-ok", c.succeeded], ["b-bad", c.failed + c.cancelled], ["b-run", c.running]]) {
      const s = el("span", { class: cls });
      s.style.width = `${(100 * n) / total}%`;
      bar.append(s);
    }
    const retry = c.failed > 0
      ? el("button", { type: "button", class: "btn small", "data-retry-batch": b.id, onclick: () => retryBatch(b.id) }, `Retry ${fmtInt(c.failed)} failed`)
      : null;
    return el("tr", { "data-batch": b.id },
      el("td", {}, el("code", { title: b.id, text: shortId(b.id) })),
      el("td", { text: fmtTime(b.created_at) }),
      el("td", {}, bar),
      el("td", { class: "n", text: `${fmtInt(done)} / ${fmtInt(b.total)}` }),
      el("td", { class: "n", text: fmtInt(c.failed) }),
      el("td", { class: "n", text: fmtRate(b.images_per_second) }),
      el("td", { class: "n", text: fmtDuration(b.eta_seconds) }),
      el("td", {}, retry));
  });
  body.replaceChildren(...rows);
}

function renderDecisions(conc) {
  $("#controller-off").hidden = !!conc;
  const body = $("#decisions tbody");
  if (!conc || !conc.decisions.length) return;
  const rows = conc.decisions.slice().reverse().slice(0, 50).map((d) =>
    el("tr", {},
      el("td", { class: "n", text: `${fmtDuration(Math.max(d.at_seconds, 1))} after start` }),
      el("td", { class: "n", text: `${d.from} → ${d.to}` }),
      el("td", { text: d.reason })));
  body.replaceChildren(...rows);
}

// ---- Charts (SVG, drawn from the feed's samples) ----------------------------------
function polyline(points, cls, w, h, maxY, t0, t1) {
  const span = Math.max(t1 - t0, 1);
  const pts = points.filter((p) => p.y != null)
    .map((p) => `${((p.t - t0) / span) * w},${h - (p.y / maxY) * (h - 6) - 3}`).join(" ");
  return svg("polyline", { points: pts, class: cls });
}
function drawCharts() {
  const hist = state.history;
  const mem = $("#mem-chart"), conc = $("#conc-chart");
  const t1 = hist.length ? hist[hist.length - 1].t : Date.now();
  const t0 = hist.length ? Math.min(hist[0].t, t1 - 60000) : t1 - 60000;
  const grid = (chart, h) => [1, 2, 3].map((i) => svg("line", { x1: 0, x2: 600, y1: (h * i) / 4, y2: (h * i) / 4, class: "grid-line" }));
  const total = Math.max(1, ...hist.map((s) => s.total_mib || 0));
  mem.replaceChildren(mem.firstElementChild, ...grid(mem, 180),
    polyline(hist.map((s) => ({ t: s.t, y: s.total_mib })), "l-total", 600, 180, total * 1.05, t0, t1),
    polyline(hist.map((s) => ({ t: s.t, y: s.used_mib })), "l-used", 600, 180, total * 1.05, t0, t1));
  const maxC = Math.max(2, ...hist.map((s) => Math.max(s.target, s.busy))) + 1;
  conc.replaceChildren(conc.firstElementChild, ...grid(conc, 140),
    polyline(hist.map((s) => ({ t: s.t, y: s.target })), "l-target", 600, 140, maxC, t0, t1),
    polyline(hist.map((s) => ({ t: s.t, y: s.busy })), "l-busy", 600, 140, maxC, t0, t1));
  const ago = `${fmtDuration((t1 - t0) / 1000)} ago`;
  const axes = $$(".axis");
  axes[0].querySelector(".t0").textContent = ago;
  axes[0].querySelector(".ymax").textContent = `top ${fmtMiB(total * 1.05)}`;
  axes[1].querySelector(".t0").textContent = ago;
  axes[1].querySelector(".ymax").textContent = `top ${maxC}`;
  const last = hist[hist.length - 1];
  const kind = state.tick && state.tick.memory_kind === "gpu" ? "GPU memory (VRAM)" : "Host memory";
  $("#mem-title").textContent = kind;
  $("#mem-now").textContent = last ? `now ${fmtMiB(last.used_mib)} of ${fmtMiB(last.total_mib)}` : "";
  $("#conc-now").textContent = last ? `now target ${last.target}, busy ${last.busy}` : "";
}

// ---- Jobs: results grid, failures, uploads ----------------------------------------
function resultText(job) {
  const r = job.result;
  if (job.state === "failed" || job.state === "cancelled") return job.error ? `${job.error.code}: ${job.error.message}` : job.state;
  if (!r) return job.state;
  if (r.caption != null) return r.caption;
  if (r.answer != null) return r.answer;
  if (r.objects) return `${r.objects.length} object${r.objects.length === 1 ? "" : "s"} found`;
  if (r.points) return `${r.points.length} point${r.points.length === 1 ? "" : "s"} found`;
  return JSON.stringify(r);
}
function imageName(job) {
  if (job.image && job.image.path) return job.image.path.split("/").pop();
  return "upload";
}

const thumbQueue = [];
let thumbsLoading = 0;
function loadThumb(img, id, size) {
  const key = `${id}:${size}`;
  if (state.thumbs.has(key)) { img.src = state.thumbs.get(key); img.dataset.loaded = "1"; return; }
  thumbQueue.push({ img, id, size, key });
  pumpThumbs();
}
function pumpThumbs() {
  while (thumbsLoading < 4 && thumbQueue.length) {
    const { img, id, size, key } = thumbQueue.shift();
    thumbsLoading++;
    api(`/v1/jobs/${id}/thumbnail?size=${size}`)
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then((b) => {
        const url = URL.createObjectURL(b);
        state.thumbs.set(key, url);
        img.src = url;
        img.dataset.loaded = "1";
      })
      .catch(() => { img.dataset.loaded = "error"; img.alt = "image unavailable"; })
      .finally(() => { thumbsLoading--; pumpThumbs(); });
  }
}

function tile(job) {
  const img = el("img", { class: "thumb", alt: `${imageName(job)}`, width: 256, height: 256, loading: "lazy", decoding: "async" });
  loadThumb(img, job.id, 256);
  const li = el("li", { class: `tile ${job.state}`, "data-job": job.id },
    el("button", { type: "button", class: "open", "aria-label": `${imageName(job)}: ${resultText(job)}`, onclick: () => openDetail(job.id) },
      img,
      el("span", { class: "cap", text: resultText(job) }),
      el("span", { class: "meta" }, el("span", { class: "state", text: job.state }), ` · ${job.task} · ${imageName(job)} · ${fmtTime(job.finished_at)}`)));
  return li;
}

function addResult(job, atEnd = false) {
  const grid = $("#grid");
  const old = grid.querySelector(`[data-job="${job.id}"]`);
  if (old) old.remove();
  state.results.set(job.id, job);
  if (atEnd) grid.append(tile(job)); else grid.prepend(tile(job));
  while (grid.children.length > GRID_MAX) {
    const last = grid.lastElementChild;
    state.results.delete(last.dataset.job);
    last.remove();
    $("#more").hidden = false;
  }
  $("#grid-empty").hidden = grid.children.length > 0;
}

function onJob(job) {
  if (job.state === "succeeded") {
    addResult(job);
    if (state.failures.delete(job.id)) renderFailures();
  } else if (job.state === "failed") {
    state.failures.set(job.id, job);
    renderFailures();
  }
  if (state.uploads.has(job.id)) {
    job.name = state.uploads.get(job.id).name;
    state.uploads.set(job.id, job);
    renderUpload(job);
  }
  const d = $("#detail");
  if (d.open && d.dataset.job === job.id) openDetail(job.id);
}

function renderFailures() {
  const code = $("#fail-code").value, q = $("#fail-search").value.trim().toLowerCase();
  const all = Array.from(state.failures.values()).sort((a, b) => (b.finished_ms || 0) - (a.finished_ms || 0));
  const codes = [...new Set(all.map((j) => (j.error ? j.error.code : "unknown")))].sort();
  const sel = $("#fail-code");
  const have = $$("option", sel).map((o) => o.value).filter(Boolean);
  if (codes.join() !== have.join()) {
    sel.replaceChildren(el("option", { value: "" }, "all"), ...codes.map((c) => el("option", { value: c }, c)));
    sel.value = codes.includes(code) ? code : "";
  }
  const shown = all.filter((j) => {
    const c = j.error ? j.error.code : "unknown";
    if (sel.value && c !== sel.value) return false;
    if (!q) return true;
    return [j.id, c, j.error && j.error.message, j.image && j.image.path].some((s) => s && s.toLowerCase().includes(q));
  });
  $("#fail-count").textContent = `${fmtInt(shown.length)} of ${fmtInt(all.length)} shown`;
  const body = $("#failures tbody");
  if (!shown.length) {
    body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 5, text: all.length ? "No failures match." : "No failed jobs." })));
  } else {
    body.replaceChildren(...shown.slice(0, 500).map((j) =>
      el("tr", { "data-job": j.id },
        el("td", { class: "n", text: fmtTime(j.finished_at) }),
        el("td", {}, el("a", { href: "#failures", onclick: (ev) => { ev.preventDefault(); openDetail(j.id); }, text: imageName(j) }), el("br"), el("code", { class: "muted", text: shortId(j.id) })),
        el("td", {}, el("code", { text: j.error ? j.error.code : "unknown" }), " ", j.error ? j.error.message : ""),
        el("td", { class: "n", text: `${j.attempt} / ${j.max_attempts}` }),
        el("td", {}, el("button", { type: "button", class: "btn small", "data-retry": j.id, onclick: () => retryJob(j.id) }, "Retry")))));
  }
  const batches = new Map();
  for (const j of all) if (j.batch_id) batches.set(j.batch_id, (batches.get(j.batch_id) || 0) + 1);
  $("#batch-retries").replaceChildren(...[...batches].map(([b, n]) =>
    el("button", { type: "button", class: "btn small", "data-retry-batch": b, onclick: () => retryBatch(b) }, `Retry all failed in batch ${shortId(b)} (${fmtInt(n)})`)));
}
$("#fail-code").addEventListener("change", renderFailures);
$("#fail-search").addEventListener("input", renderFailures);

async function retryJob(id) {
  try {
    await apiJson(`/v1/jobs/${id}/retry`, { method: "POST" });
    state.failures.delete(id);
    renderFailures();
    toast(`Job ${shortId(id)} queued again.`);
  } catch (e) { toast(`Retry failed: ${e.message}`); }
}
async function retryBatch(id) {
  try {
    const r = await apiJson(`/v1/batches/${id}/retry`, { method: "POST" });
    for (const [jid, j] of state.failures) if (j.batch_id === id) state.failures.delete(jid);
    renderFailures();
    toast(`${fmtInt(r.retried)} job${r.retried === 1 ? "" : "s"} of batch ${shortId(id)} queued again.`);
  } catch (e) { toast(`Retry failed: ${e.message}`); }
}
function toast(msg) { $("#enqueue-msg").textContent = msg; document.title = "captiond"; $("#queue-state").title = msg; announce(msg); }
function announce(msg) {
  let live = $("#announce");
  if (!live) { live = el("div", { id: "announce", class: "sr-only", role: "status", "aria-live": "polite" }); document.body.append(live); }
  live.textContent = msg;
}

async function loadLists() {
  try {
    const [ok, bad] = await Promise.all([
      apiJson("/v1/jobs/recent?state=succeeded&limit=48"),
      apiJson("/v1/jobs/recent?state=failed&limit=500"),
    ]);
    $("#grid").replaceChildren();
    state.results.clear();
    for (const j of ok.jobs) addResult(j, true);
    state.olderBefore = ok.next_before;
    $("#more").hidden = !ok.next_before;
    $("#grid-empty").hidden = ok.jobs.length > 0;
    state.failures.clear();
    for (const j of bad.jobs) state.failures.set(j.id, j);
    renderFailures();
  } catch (e) { if (!(e instanceof AuthError)) toast(`Cannot load jobs: ${e.message}`); }
}
$("#more").addEventListener("click", async () => {
  if (!state.olderBefore) return;
  const page = await apiJson(`/v1/jobs/recent?state=succeeded&limit=48&before=${state.olderBefore}`);
  for (const j of page.jobs) if (!state.results.has(j.id)) addResult(j, true);
  state.olderBefore = page.next_before;
  $("#more").hidden = !page.next_before;
});

// ---- Detail dialog ------------------------------------------------------------------
async function openDetail(id) {
  const d = $("#detail");
  d.dataset.job = id;
  let job;
  try { job = await apiJson(`/v1/jobs/${id}`); } catch (e) { toast(e.message); return; }
  $("#detail-title").textContent = `${imageName(job)} · ${job.task} · ${job.state}`;
  $("#detail-text").textContent = resultText(job);
  const img = $("#detail-img");
  img.alt = imageName(job);
  img.removeAttribute("src");
  loadThumb(img, id, 512);
  drawOverlay($("#detail-overlay"), job.result);
  const h = [[job.created_at, "enqueued"]];
  if (job.started_at) h.push([job.started_at, `started (attempt ${job.attempt} of ${job.max_attempts})`]);
  if (job.oom_count) h.push([null, `${job.oom_count} out-of-memory requeue${job.oom_count === 1 ? "" : "s"} (not counted as attempts)`]);
  if (job.error) h.push([null, `last error ${job.error.code}: ${job.error.message}`]);
  if (job.state === "scheduled") h.push([job.run_at, "next retry"]);
  if (job.finished_at) h.push([job.finished_at, job.state]);
  $("#detail-history").replaceChildren(...h.map(([t, what]) => el("li", {}, t ? `${fmtDate(t)} — ` : "", what)));
  $("#detail-json").textContent = JSON.stringify(job, null, 2);
  const retry = $("#detail-retry");
  retry.hidden = !(job.state === "failed" || job.state === "cancelled");
  retry.onclick = async () => { await retryJob(id); d.close(); };
  if (!d.open) d.showModal();
}
function drawOverlay(svgEl, result) {
  const shapes = [];
  if (result && result.objects) for (const o of result.objects)
    shapes.push(svg("rect", { x: o.x_min, y: o.y_min, width: Math.max(o.x_max - o.x_min, 0), height: Math.max(o.y_max - o.y_min, 0) }));
  if (result && result.points) for (const p of result.points) shapes.push(svg("circle", { cx: p.x, cy: p.y, r: 0.015 }));
  svgEl.replaceChildren(...shapes);
}

// ---- Enqueue --------------------------------------------------------------------------
const form = $("#enqueue-form");
function syncTaskFields() {
  const task = form.task.value;
  for (const l of $$("[data-for]", form)) l.hidden = !l.dataset.for.split(" ").includes(task);
}
form.addEventListener("change", syncTaskFields);
form.addEventListener("submit", (ev) => ev.preventDefault());
$("#file-input").addEventListener("change", (ev) => { enqueueFiles(Array.from(ev.target.files)); ev.target.value = ""; });
const drop = $("#drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); enqueueFiles(Array.from(ev.dataTransfer.files)); });
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("#file-input").click(); } });

async function enqueueFiles(files) {
  const task = form.task.value;
  const fields = { task };
  if (task === "caption") fields.length = form.length.value;
  if (task === "query") fields.question = form.question.value.trim() || "What is in the picture?";
  if (task === "detect" || task === "point") {
    fields.object = form.object.value.trim();
    if (!fields.object) { $("#enqueue-msg").textContent = "Name the object to look for first."; form.object.focus(); return; }
  }
  let ok = 0, bad = 0;
  for (const f of files) {
    const fd = new FormData();
    fd.append("job", JSON.stringify(fields));
    fd.append("image", f, f.name);
    try {
      const job = await apiJson("/v1/jobs", { method: "POST", body: fd });
      job.name = f.name;
      state.uploads.set(job.id, job);
      renderUpload(job);
      ok++;
    } catch (e) {
      bad++;
      $("#enqueue-msg").textContent = `${f.name}: ${e.message}`;
    }
  }
  if (!bad) $("#enqueue-msg").textContent = `${fmtInt(ok)} image${ok === 1 ? "" : "s"} enqueued; results appear below as they finish.`;
}

function renderUpload(job) {
  const list = $("#uploads");
  const prev = state.uploads.get(job.id);
  const name = (prev && prev.name) || job.name || imageName(job);
  job.name = name;
  const img = el("img", { class: "thumb", alt: name, width: 256, height: 256 });
  loadThumb(img, job.id, 256);
  const wrap = el("div", { class: "overlay-wrap" }, img);
  if (job.result && (job.result.objects || job.result.points)) {
    const o = svg("svg", { viewBox: "0 0 1 1", preserveAspectRatio: "none", "aria-hidden": "true" });
    drawOverlay(o, job.result);
    wrap.append(o);
  }
  const li = el("li", { class: `tile ${job.state}`, "data-upload": job.id, "data-state": job.state },
    el("button", { type: "button", class: "open", "aria-label": `${name}: ${resultText(job)}`, onclick: () => openDetail(job.id) },
      wrap,
      el("span", { class: "cap", text: job.state === "succeeded" || job.state === "failed" ? resultText(job) : `${job.state}…` }),
      el("span", { class: "meta" }, el("span", { class: "state", text: job.state }), ` · ${name}`)));
  const old = list.querySelector(`[data-upload="${job.id}"]`);
  if (old) old.replaceWith(li); else list.prepend(li);
}

// ---- Pause / resume ---------------------------------------------------------------------
$("#pause").addEventListener("click", async () => {
  const pb = $("#pause");
  const paused = pb.dataset.paused === "true";
  pb.disabled = true;
  try {
    const r = await apiJson(`/v1/queue/${paused ? "resume" : "pause"}`, { method: "POST" });
    pb.dataset.paused = String(r.paused);
    pb.textContent = r.paused ? "Resume queue" : "Pause queue";
    const qs = $("#queue-state");
    qs.textContent = r.paused ? "paused" : "claiming";
    qs.className = `pill ${r.paused ? "pill-bad" : "pill-ok"}`;
    announce(r.paused ? "Queue paused." : "Queue resumed.");
  } catch (e) { toast(e.message); } finally { pb.disabled = false; }
});

// ---- Start ----------------------------------------------------------------------------------
let started = false;
async function start() {
  if (started) return;
  try {
    await apiJson("/v1/stats");
  } catch (e) {
    if (!(e instanceof AuthError)) setTimeout(start, 2000);
    return;
  }
  started = true;
  loadLists();
  follow();
}
showView();
syncTaskFields();
if (!state.token) {
  // Ask only if the server wants one: /v1/stats answers 401 then.
  fetch("/v1/stats").then((r) => (r.status === 401 ? askToken() : start())).catch(() => setTimeout(start, 2000));
} else {
  start();
}
