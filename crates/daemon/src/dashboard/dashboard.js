// plugd's dashboard: plain JavaScript over the HTTP API (docs/http-api.md).
// Everything a plugin controls (names, log lines, exit reasons) is shown with
// textContent, never as HTML. The token lives in sessionStorage (this tab only) and goes
// in the Authorization header; nothing authenticates by cookie, so a cross-site form
// cannot act.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "plugd-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let selected = null;      // plugin shown in the detail panel
let logSeq = 0;           // last log line seen in the detail panel
let selectedJob = null;
const history = new Map(); // plugin -> [{t, calls, cpu, p99}] (about ten minutes)
const HISTORY = 600;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + token });
  let res;
  try {
    res = await fetch(path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new ApiError(0, "plugd does not answer (" + e.message + "); is it running?");
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (res.status === 401) {
    throw new ApiError(401, "The token was refused (401): " + messageOf(body, text));
  }
  if (!res.ok) {
    throw new ApiError(res.status, messageOf(body, text) + " (HTTP " + res.status + ")");
  }
  return body;
}

function messageOf(body, text) {
  if (body && body.error && body.error.message) return body.error.message;
  if (body && typeof body.error === "string") return body.error;
  return text || "no answer";
}

function showError(e) {
  const box = $("error");
  if (!e) { box.hidden = true; box.textContent = ""; return; }
  if (e.status === 401) { logout(e.message); return; }
  box.textContent = e.message || String(e);
  box.hidden = false;
}

function logout(why) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("error").hidden = true;
}

async function login(ev) {
  ev.preventDefault();
  token = $("token").value.trim();
  try {
    await api("/v1/plugins");
  } catch (e) {
    $("login-error").textContent = e.status === 401
      ? "Wrong token: plugd refused it. Check the file [http] token_file names."
      : e.message;
    token = "";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  start();
}

// ----- formatting -----

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function uptime(ms) {
  if (ms == null) return "-";
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

function bytes(n) {
  if (n == null) return "-";
  if (n < 1024 * 1024) return (n / 1024).toFixed(0) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function micros(us) {
  if (us == null) return "-";
  if (us < 1000) return us + " µs";
  if (us < 1e6) return (us / 1000).toFixed(1) + " ms";
  return (us / 1e6).toFixed(2) + " s";
}

// The 99th percentile's bucket bound, from a histogram's counts (the last bucket: "more").
function p99(bounds, counts) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= total * 0.99) return i < bounds.length ? bounds[i] : bounds[bounds.length - 1] * 2;
  }
  return null;
}

function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", "120");
  svg.setAttribute("height", "22");
  const vals = points.filter((v) => v != null);
  if (vals.length > 1) {
    const max = Math.max(...vals, 1);
    const step = 120 / (points.length - 1);
    const coords = points.map((v, i) => (i * step).toFixed(1) + "," + (21 - ((v || 0) / max) * 20).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#4a78c8");
    line.setAttribute("stroke-width", "1.5");
    svg.appendChild(line);
  }
  return svg;
}

// ----- plugins -----

function record(p, now) {
  const h = history.get(p.name) || [];
  const calls = (p.calls_ok || 0) + (p.calls_err || 0);
  const lat = p.latency || { bounds_us: [], counts: [] };
  const last = h[h.length - 1];
  // p99 of the calls since the previous sample (the whole history when none came since).
  let recent = lat.counts;
  if (last && last.counts && last.counts.length === lat.counts.length) {
    const d = lat.counts.map((c, i) => c - last.counts[i]);
    if (d.some((x) => x > 0)) recent = d;
  }
  h.push({ t: now, calls, cpu: p.cpu_seconds, counts: lat.counts.slice(), p99: p99(lat.bounds_us, recent), restarts: p.restarts });
  while (h.length > HISTORY) h.shift();
  history.set(p.name, h);
  return h;
}

function rate(h, field, seconds) {
  if (h.length < 2) return null;
  const a = h[Math.max(0, h.length - 1 - seconds)], b = h[h.length - 1];
  const dt = (b.t - a.t) / 1000;
  if (dt <= 0 || a[field] == null || b[field] == null) return null;
  return (b[field] - a[field]) / dt;
}

function actionButton(name, action, label) {
  const b = el("button", label || action);
  b.dataset.plugin = name;
  b.dataset.action = action;
  b.addEventListener("click", (ev) => { ev.stopPropagation(); act(name, action); });
  return b;
}

// One row per plugin, patched in place each second (a row replaced under the pointer
// would swallow a click): cells get their new text, the action buttons are rebuilt only
// when the state changes which ones there are.
function renderPlugins(list) {
  const body = document.querySelector("#plugins tbody");
  const now = Date.now();
  $("empty").hidden = list.length > 0;
  const rows = new Map([...body.children].map((tr) => [tr.dataset.plugin, tr]));
  const names = new Set(list.map((p) => p.name));
  for (const [name, tr] of rows) if (!names.has(name)) tr.remove();
  list.forEach((p, index) => {
    const h = record(p, now);
    const tr = el("tr");
    tr.dataset.plugin = p.name;
    tr.className = "state-" + p.state;
    // Crash-looping: restarts went up within the last minute.
    const before = h[Math.max(0, h.length - 60)];
    if (before && p.restarts > before.restarts) tr.classList.add("crashloop");
    const name = el("td");
    const link = el("a", p.display_name ? p.name + " (" + p.display_name + ")" : p.name, "name");
    link.addEventListener("click", () => openDetail(p.name));
    name.appendChild(link);
    tr.appendChild(name);
    tr.appendChild(el("td", p.kind));
    tr.appendChild(el("td", p.updating_to ? p.version + " → " + p.updating_to : p.version));
    tr.appendChild(el("td", p.state, "state"));
    const health = p.health ? p.health.state + (p.health.failures ? " (" + p.health.failures + ")" : "") : "-";
    const hc = el("td", health, p.health ? "health-" + p.health.state : "");
    if (p.health && p.health.last_error) hc.title = p.health.last_error;
    tr.appendChild(hc);
    tr.appendChild(el("td", p.pid == null ? "-" : p.pid, "pid"));
    tr.appendChild(el("td", uptime(p.uptime_ms)));
    tr.appendChild(el("td", p.restarts, "restarts"));
    const exit = el("td", p.last_exit || "-", "exit");
    exit.title = p.last_exit || "";
    tr.appendChild(exit);
    const cpu = rate(h, "cpu", 5);
    tr.appendChild(el("td", cpu == null ? "-" : (cpu * 100).toFixed(1)));
    tr.appendChild(el("td", bytes(p.rss_bytes)));
    const cps = rate(h, "calls", 5);
    tr.appendChild(el("td", cps == null ? "-" : cps.toFixed(1)));
    tr.appendChild(el("td", micros(h[h.length - 1].p99)));
    const spark = el("td");
    spark.appendChild(sparkline(h.slice(-120).map((x) => x.p99)));
    tr.appendChild(spark);
    const layers = el("td", (p.sandbox || []).length + " layers");
    layers.title = (p.sandbox || []).join("\n") + ((p.sandbox_unavailable || []).length ? "\nunavailable: " + p.sandbox_unavailable.join("; ") : "");
    tr.appendChild(layers);
    const actions = el("td", null, "actions");
    const running = ["ready", "starting", "backoff", "draining"].includes(p.state);
    if (p.state === "disabled") {
      actions.appendChild(actionButton(p.name, "enable"));
    } else {
      actions.appendChild(running ? actionButton(p.name, "stop") : actionButton(p.name, "start"));
      actions.appendChild(actionButton(p.name, "restart"));
      actions.appendChild(actionButton(p.name, "disable"));
    }
    actions.appendChild(actionButton(p.name, "update"));
    actions.appendChild(actionButton(p.name, "uninstall"));
    actions.dataset.key = [...actions.children].map((b) => b.dataset.action).join(",");
    tr.appendChild(actions);
    const old = rows.get(p.name);
    if (!old) {
      body.insertBefore(tr, body.children[index] || null);
      return;
    }
    patchRow(old, tr);
    if (body.children[index] !== old) body.insertBefore(old, body.children[index] || null);
  });
}

// Copies a freshly built row's content into the row on the page.
function patchRow(old, fresh) {
  old.className = fresh.className;
  [...fresh.children].forEach((cell, i) => {
    const was = old.children[i];
    if (cell.classList.contains("actions")) {
      if (was.dataset.key !== cell.dataset.key) old.replaceChild(cell, was);
    } else if (cell.querySelector("svg")) {
      was.replaceChildren(...cell.childNodes);
    } else if (cell.querySelector("a")) {
      was.querySelector("a").textContent = cell.querySelector("a").textContent;
    } else {
      if (was.textContent !== cell.textContent) was.textContent = cell.textContent;
      was.className = cell.className;
      was.title = cell.title;
    }
  });
}



async function refreshPlugins() {
  const list = await api("/v1/plugins");
  renderPlugins(Array.isArray(list) ? list : []);
  $("live").textContent = "live · " + new Date().toLocaleTimeString();
}

// ----- actions -----

function confirmDialog(title, text, option) {
  return new Promise((resolve) => {
    $("dialog-title").textContent = title;
    $("dialog-text").textContent = text;
    $("dialog-option").hidden = !option;
    $("dialog-check").checked = false;
    if (option) $("dialog-check-label").textContent = option;
    $("dialog").hidden = false;
    const done = (ok) => {
      $("dialog").hidden = true;
      $("dialog-ok").onclick = null;
      $("dialog-cancel").onclick = null;
      resolve(ok ? { checked: $("dialog-check").checked } : null);
    };
    $("dialog-ok").onclick = () => done(true);
    $("dialog-cancel").onclick = () => done(false);
  });
}

// An update's plan (what `update?dry_run=true` answers) in words: versions, the changed
// manifest sections and the dependency diff, problems.
function planText(plan) {
  if (!plan) return "";
  const lines = [(plan.name || "") + ": " + (plan.from || "not running") + " → " + (plan.to || "?")];
  if (plan.changes !== undefined) lines.push("changes: " + JSON.stringify(plan.changes, null, 2));
  for (const p of plan.problems || []) lines.push("problem: " + p);
  return lines.join("\n");
}

async function act(name, action) {
  showError(null);
  try {
    if (action === "update" || action === "rollback") {
      const body = action === "rollback" ? null : JSON.stringify({});
      const plan = await api("/v1/plugins/" + encodeURIComponent(name) + "/update?dry_run=true", { method: "POST", body });
      const ok = await confirmDialog("Update " + name + "?", planText(plan) || JSON.stringify(plan, null, 2));
      if (!ok) return;
      const job = await api("/v1/plugins/" + encodeURIComponent(name) + "/update", { method: "POST", body: "{}" });
      followJob(job);
      return;
    }
    if (action === "uninstall") {
      const ok = await confirmDialog("Uninstall " + name + "?", "Every installed version of " + name + " is removed.", "also delete its state (purge)");
      if (!ok) return;
      const job = await api("/v1/plugins/" + encodeURIComponent(name) + "/uninstall", { method: "POST", body: JSON.stringify({ purge: ok.checked }) });
      followJob(job);
      return;
    }
    await api("/v1/plugins/" + encodeURIComponent(name) + "/" + action, { method: "POST" });
    await refreshPlugins();
  } catch (e) {
    showError(e);
  }
}

async function switchVersion(name, version) {
  showError(null);
  try {
    const body = JSON.stringify({ version });
    const plan = await api("/v1/plugins/" + encodeURIComponent(name) + "/update?dry_run=true", { method: "POST", body });
    const ok = await confirmDialog("Switch " + name + " to " + version + "?", planText(plan) || JSON.stringify(plan, null, 2));
    if (!ok) return;
    followJob(await api("/v1/plugins/" + encodeURIComponent(name) + "/update", { method: "POST", body }));
  } catch (e) {
    showError(e);
  }
}

async function reload() {
  showError(null);
  try {
    const report = await api("/v1/reload", { method: "POST" });
    $("report").textContent = "Reload: " + JSON.stringify(report, null, 2);
    $("report").hidden = false;
    await refreshPlugins();
  } catch (e) {
    showError(e);
  }
}

async function install(ev) {
  ev.preventDefault();
  showError(null);
  const file = $("install-file").files[0];
  const source = $("install-source").value.trim();
  try {
    let job;
    if (file) {
      job = await api("/v1/install?force=" + $("install-force").checked, {
        method: "POST",
        headers: { "Content-Type": "application/octet-stream" },
        body: await file.arrayBuffer(),
      });
    } else if (source) {
      job = await api("/v1/install", { method: "POST", body: JSON.stringify({ source, force: $("install-force").checked }) });
    } else {
      throw new Error("Give a folder path, a URL or a git+ source, or choose an archive to upload.");
    }
    $("install-file").value = "";
    $("install-source").value = "";
    followJob(job);
  } catch (e) {
    showError(e);
  }
}

// ----- detail -----

function field(dl, key, value) {
  if (value === undefined || value === null || value === "") return;
  dl.appendChild(el("dt", key));
  let text = value;
  if (Array.isArray(value)) text = value.join("\n");
  else if (typeof value === "object") text = Object.entries(value).map(([k, v]) => k + ": " + (typeof v === "object" ? JSON.stringify(v) : v)).join("\n");
  dl.appendChild(el("dd", text));
}

async function openDetail(name) {
  selected = name;
  logSeq = 0;
  $("detail-logs").textContent = "";
  $("detail").hidden = false;
  $("detail-name").textContent = name;
  await refreshDetail();
}

async function refreshDetail() {
  if (!selected) return;
  const name = selected;
  const one = await api("/v1/plugins/" + encodeURIComponent(name));
  const p = Array.isArray(one) ? one[0] : one;
  const dl = $("detail-fields");
  dl.replaceChildren();
  for (const key of ["display_name", "version", "kind", "state", "manifest", "sdk", "transport", "ring_calls", "ring_host_calls", "last_exit", "health", "requirements", "exits", "manifest_extra", "sandbox", "sandbox_unavailable"]) {
    field(dl, key, p[key]);
  }
  // The histogram of every call so far.
  const hist = $("detail-histogram");
  hist.replaceChildren();
  const lat = p.latency || { bounds_us: [], counts: [] };
  const max = Math.max(1, ...lat.counts);
  lat.counts.forEach((c, i) => {
    const bar = el("div");
    bar.style.height = Math.round((c / max) * 88) + "px";
    bar.title = "≤ " + micros(lat.bounds_us[i] || null) + ": " + c + " calls";
    hist.appendChild(bar);
  });
  // Versions (installed plugins only) with a switch each: update to it, or roll back.
  const ul = $("detail-versions");
  try {
    const versions = await api("/v1/plugins/" + encodeURIComponent(name) + "/versions");
    ul.replaceChildren();
    for (const v of versions) {
      const li = el("li", v.version + (v.current ? " (current)" : " "));
      if (!v.current) {
        const b = el("button", "switch to " + v.version);
        b.addEventListener("click", () => switchVersion(name, v.version));
        li.appendChild(b);
      }
      ul.appendChild(li);
    }
  } catch (e) {
    ul.replaceChildren(el("li", e.status === 404 ? "from a plugin folder: no installed versions" : e.message, "muted"));
  }
  // New log lines since the last look.
  const logs = await api("/v1/plugins/" + encodeURIComponent(name) + "/logs?n=200" + (logSeq ? "&since_seq=" + logSeq : ""));
  const pre = $("detail-logs");
  for (const line of logs || []) {
    if (line.seq) logSeq = Math.max(logSeq, line.seq);
    const ts = line.ts_ms ? new Date(line.ts_ms).toLocaleTimeString() : "";
    pre.appendChild(document.createTextNode(ts + " " + (line.source || "") + " " + (line.text || line.message || "") + "\n"));
  }
  pre.scrollTop = pre.scrollHeight;
}

// ----- jobs -----

function followJob(job) {
  selectedJob = job && (job.job_id ?? job.id ?? null);
  location.hash = "#jobs";
}

async function refreshJobs() {
  const jobs = await api("/v1/jobs");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const j of (jobs || []).slice().reverse()) {
    const tr = el("tr");
    tr.dataset.job = j.id;
    tr.className = "job-" + j.state;
    tr.appendChild(el("td", j.id));
    const w = j.work || {};
    tr.appendChild(el("td", (w.kind || "") + " " + (w.source || w.name || "") + (w.version ? " " + w.version : "")));
    tr.appendChild(el("td", j.state, "state"));
    tr.appendChild(el("td", j.created_ms ? new Date(j.created_ms).toLocaleTimeString() : ""));
    const actions = el("td", null, "actions");
    const show = el("button", "output");
    show.addEventListener("click", () => { selectedJob = j.id; refreshJobs().catch(showError); });
    actions.appendChild(show);
    if (j.state === "queued" || j.state === "running") {
      const c = el("button", "cancel");
      c.addEventListener("click", () => api("/v1/jobs/" + j.id + "/cancel", { method: "POST" }).then(refreshJobs).catch(showError));
      actions.appendChild(c);
    }
    if (j.state === "failed" || j.state === "cancelled") {
      const r = el("button", "retry");
      r.addEventListener("click", () => api("/v1/jobs/" + j.id + "/retry", { method: "POST" }).then(followJob).catch(showError));
      actions.appendChild(r);
    }
    tr.appendChild(actions);
    body.appendChild(tr);
  }
  if (selectedJob != null) {
    const j = await api("/v1/jobs/" + selectedJob);
    $("job-title").textContent = "Job " + j.id + ": " + j.state;
    const out = (j.output || []).join("\n") + (j.error ? "\n" + j.error : "");
    $("job-output").textContent = out;
  }
}

// ----- pages and polling -----

function page() {
  const jobs = location.hash === "#jobs";
  $("plugins-page").hidden = jobs;
  $("jobs-page").hidden = !jobs;
  $("nav-plugins").classList.toggle("active", !jobs);
  $("nav-jobs").classList.toggle("active", jobs);
  tick();
}

let ticking = false;
async function tick() {
  if (!token || ticking) return;
  ticking = true;
  try {
    if (location.hash === "#jobs") {
      await refreshJobs();
    } else {
      await refreshPlugins();
      if (selected) await refreshDetail();
    }
    if ($("error").dataset.poll) showError(null);
  } catch (e) {
    showError(e);
    $("error").dataset.poll = "1";
  } finally {
    ticking = false;
  }
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("forget").hidden = false;
  page();
}

$("login-form").addEventListener("submit", login);
$("forget").addEventListener("click", () => logout(""));
$("reload").addEventListener("click", reload);
$("install-form").addEventListener("submit", install);
$("detail-close").addEventListener("click", () => { selected = null; $("detail").hidden = true; });
window.addEventListener("hashchange", page);
setInterval(tick, 1000);
if (token) start(); else logout("");
