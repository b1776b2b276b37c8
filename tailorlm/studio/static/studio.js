// tailor studio: the pages' behaviour. Plain JavaScript over the studio's JSON API (app.py); the server holds
// all state, so a refresh or a second tab shows the same draft and the same live run.
"use strict";

const $ = (sel) => document.querySelector(sel);
const page = document.body.dataset.page;

async function api(path, options = {}) {
  const init = { ...options, headers: { "X-Studio": "1", ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch { body = { error: text }; }
  if (!response.ok) throw new Error(body.error || body.detail || response.statusText);
  return body;
}

function showError(error) {
  const box = $("#error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fillTable(table, header, rows) {
  table.replaceChildren(el("tr", {}, ...header.map((h) => el("th", { text: h }))),
    ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "" }))))));
}

const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : v ?? "-");

// ---------------------------------------------------------------- the draft: inputs with data-key
function getKey(obj, dotted) {
  return dotted.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}

function showState(state) {
  if ($("#yaml")) {
    $("#yaml").textContent = state.yaml;
    $("#yaml-error").textContent = state.error || "";
    $("#yaml-error").hidden = !state.error;
  }
  for (const input of document.querySelectorAll("[data-key]")) {
    if (input === document.activeElement) continue;
    const value = getKey(state.draft, input.dataset.key);
    input.value = Array.isArray(value) ? value.join(",") : value ?? (input.tagName === "SELECT" ? input.options[0]?.value ?? "" : "");
  }
  return state;
}

function readInput(input) {
  const raw = input.value.trim();
  if (raw === "") return input.dataset.type === "list" && input.tagName === "SELECT" ? [] : null;
  if (input.dataset.type === "int") return parseInt(raw, 10);
  if (input.dataset.type === "float") return Number(raw);
  if (input.dataset.type === "list") return raw.split(",").map((s) => s.trim()).filter(Boolean);
  return raw;
}

let sent = 0, shown = 0;  // a slower, older answer must not overwrite a newer one on the page
async function setDraft(changes, unset = []) {
  const mine = ++sent;
  try {
    showError(null);
    const state = await api("/api/draft", { json: { set: changes, unset } });
    if (mine < shown) return state;
    shown = mine;
    return showState(state);
  } catch (e) { showError(e); return null; }
}

function bindInputs() {
  for (const input of document.querySelectorAll("[data-key]")) {
    input.addEventListener("change", () => setDraft({ [input.dataset.key]: readInput(input) }));
  }
  // Each setting's help is its description in the run spec (GET /api/help), shown on hover over the field or its "?".
  api("/api/help").then((help) => {
    for (const input of document.querySelectorAll("[data-key]")) {
      const text = help[input.dataset.key], label = input.closest("label");
      if (!text || !label) continue;
      label.title = `${input.dataset.key}: ${text}`;
      if (!label.querySelector(".info")) label.append(el("span", { class: "info", text: "?" }));
    }
  }).catch(() => {});
  const copy = $("#copy-yaml");
  if (copy) copy.addEventListener("click", () => navigator.clipboard?.writeText($("#yaml").textContent));
}

// ---------------------------------------------------------------- 1. data
async function dataPage(state) {
  const presets = $("#preset");
  presets.replaceChildren(...state.presets.map((p) => el("option", { text: p })));
  showState(state);
  $("#upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    try {
      showError(null);
      showState(await api(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file }));
      await showRows(true);
    } catch (e) { showError(e); }
  });
  $("#use-path").addEventListener("click", async () => {
    if (await setDraft({ "data.train": $("#path").value.trim() }, ["data.format"])) await showRows(true);
  });
  presets.addEventListener("change", () => showRows());
  await showRows();
}

let columns = [], checked = 0;
async function showRows(newFile = false) {
  const state = await api("/api/state");
  $("#current-file").textContent = getKey(state.draft, "data.train") || "none yet";
  if (!getKey(state.draft, "data.train")) return;
  try {
    let table = await api("/api/rows");
    columns = table.columns;
    // A new table keeps only the mappings to columns it has; the others are dropped, and the page says which.
    const mapped = getKey(state.draft, "data.columns") || {};
    const stale = Object.entries(mapped).filter(([, column]) => !columns.includes(column));
    if (newFile && stale.length) {
      await setDraft({}, stale.map(([field]) => `data.columns.${field}`));
      table = await api("/api/rows");
      $("#data-check").textContent = `Mappings dropped, the new table has no such column: ${stale.map(([f, c]) => `${f} → ${c}`).join(", ")}.`;
    }
    $("#row-count").textContent = `(${table.count} rows; ${table.rows.length} shown)`;
    fillTable($("#rows"), table.columns, table.rows);
    await showMapping();
    showTableChecks(table, newFile && stale.length);
  } catch (e) { showError(e); }
}

function showTableChecks(table, keepNote) {
  $("#problems").textContent = table.problems.join("\n");
  $("#problems").hidden = !table.problems.length;
  $("#label-counts").replaceChildren();
  if (table.label_counts) {
    const counts = Object.entries(table.label_counts), top = Math.max(...counts.map(([, n]) => n), 1);
    $("#label-counts").append(el("h3", { text: `Labels in '${table.label_column}': ${table.labels}` + (table.labels > counts.length ? ` (${counts.length} most common shown)` : "") }),
      el("table", { class: "grid labels" }, ...counts.map(([label, n]) => el("tr", {}, el("td", { text: label || "(empty)" }),
        el("td", { text: String(n) }), el("td", {}, el("div", { class: "count-bar", style: `width:${(120 * n) / top}px` }))))));
  }
  if (table.problems.length) return;
  // Every field has its column: read the rows as training will, so a bad row shows here and not a page later.
  const mine = ++checked;
  if (!keepNote) $("#data-check").textContent = "checking the rows as training reads them…";
  api("/api/preview").then((r) => {
    if (mine !== checked) return;
    $("#data-check").textContent = `✓ The rows read as training reads them: ${r.examples.train} train, ${r.examples.validation} validation, ${r.examples.test} test.`;
  }).catch((e) => { if (mine === checked) { $("#data-check").textContent = ""; showError(e); } });
}

async function showMapping() {
  const state = await api("/api/state");
  const preset = getKey(state.draft, "template.preset") || "classification";
  const { fields } = await api(`/api/fields/${preset}`);
  const mapped = getKey(state.draft, "data.columns") || {};
  const rows = fields.map((field) => {
    const select = el("select", { "data-field": field },
      el("option", { value: "", text: "same name" }), ...columns.map((c) => el("option", { value: c, text: c })));
    select.value = mapped[field] && mapped[field] !== field ? mapped[field] : "";
    select.addEventListener("change", async () => { await setDraft({ [`data.columns.${field}`]: select.value || null }); showTableChecks(await api("/api/rows")); });
    return [field, select];
  });
  fillTable($("#mapping"), ["template field", "column of the table"], rows);
}

// ---------------------------------------------------------------- 2-3. template and preflight
async function runPreview() {
  $("#busy").textContent = "tokenizing every row…";
  try {
    showError(null);
    return await api("/api/preview");
  } catch (e) {
    // What is on screen no longer matches the settings: it goes, rather than pass for their preview.
    for (const id of ["#samples", "#histogram", "#length-facts", "#findings", "#estimate"]) if ($(id)) $(id).replaceChildren();
    showError(e);
    return null;
  } finally { $("#busy").textContent = ""; }
}

function showSamples(result) {
  $("#samples").replaceChildren(...result.samples.map((pieces) => el("pre", { class: "sample" },
    ...pieces.map(([text, trained]) => el("span", { class: trained ? "loss" : "context", text })))));
  const { counts, width, start } = result.histogram, top = Math.max(...counts, 1);
  $("#histogram").replaceChildren(...counts.map((c, i) => el("div", { class: "bar", title: `${start + i * width}–${start + (i + 1) * width - 1} tokens: ${c} samples` },
    el("div", { class: "fill", style: `height:${(100 * c) / top}%` }), el("span", { text: String(start + i * width) }))));
  const l = result.lengths || {};
  $("#length-facts").textContent = `median ${l.p50}, 90th percentile ${l.p90}, longest ${l.max} tokens; max_length ${result.max_length}. ` +
    `Examples: ${result.examples.train} train, ${result.examples.validation} validation, ${result.examples.test} test.`;
}

function estimateText(result) {
  const s = result.estimated_train_seconds;
  const time = s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${Math.round(s / 60)} min` : `${s} s`;
  return `Estimated training time: ${time} (${(result.tokens_per_epoch || 0).toLocaleString()} tokens per epoch × ${result.epochs} epochs), before the prompting baselines and evaluation.`;
}

function showFindings(result) {
  fillTable($("#findings"), ["level", "check", "finding"], result.findings.map((f) =>
    [el("span", { class: `level ${f.level}`, text: f.level }), f.check, [f.message, ...f.examples].join("\n")]));
  $("#estimate").textContent = estimateText(result);
}

// ---------------------------------------------------------------- 4. train, and a run's live state
let watched = null;
async function watch(name) {
  watched = name;
  const live = await api(`/api/runs/${name}/live`).catch(() => null);
  if (!live || watched !== name) return;
  if ($("#live")) { $("#live").hidden = false; $("#live-name").textContent = name; $("#live-results").href = `/runs/${name}`; }
  $("#live-status").textContent = live.status;
  $("#live-status").className = `status ${live.status}`;
  showProgress(live.progress, live.status);
  if ($("#use-links")) $("#use-links").hidden = live.status !== "complete";
  if ($("#not-started")) {
    $("#not-started").hidden = !["queued", "stopped"].includes(live.status) || Boolean(live.progress);
    $("#not-started").textContent = live.status === "queued" ? "Waiting for the run before it to finish." : "This run was stopped before it started: it has no results.";
  }
  if ($("#resume")) $("#resume").hidden = live.status !== "interrupted";
  if ($("#stop")) $("#stop").hidden = !["queued", "running"].includes(live.status);
  if ($("#log")) { $("#log").textContent = live.log; $("#log").scrollTop = $("#log").scrollHeight; }
  showCurves(live.series);
  if (live.kind === "auto") showAuto(live);
  if (["queued", "running"].includes(live.status)) setTimeout(() => watch(name), 1000);
  else if (page === "run" && !watch.reloaded && live.status !== "stopped") { watch.reloaded = true; runResults(name).catch(showError); }
}

// An auto search: its leaderboard once written, and its winner, a run of the search opened like any other
function showAuto(auto) {
  if ($("#leaderboard")) { $("#leaderboard").hidden = !auto.leaderboard; $("#leaderboard").textContent = auto.leaderboard || ""; }
  if ($("#auto-card")) $("#auto-card").hidden = false;
  if ($("#auto-winner")) {
    $("#auto-winner").replaceChildren(...(auto.winner ? ["The winner, ", el("a", { href: `/runs/${auto.winner}`, text: auto.winner_key || auto.winner }),
      `, is a finished run (${auto.winner}): open it for its results, chat and export.`] : ["No winner yet: the leaderboard appears when the search ends."]));
  }
  if ($("#live-results") && auto.winner) $("#live-results").href = `/runs/${auto.winner}`;
  if ($("#use-links") && auto.winner) {
    $("#use-links").replaceChildren(el("a", { href: `/chat?run=${auto.winner}`, text: "Chat with the winner" }), " · ",
      el("a", { href: `/export?run=${auto.winner}`, text: "Export it" }), " · ");
  }
}

async function showQueue() {
  const { queue } = await api("/api/runs");
  fillTable($("#queue"), ["run", "state", ""], queue.slice().reverse().map((j) =>
    [j.name, el("span", { class: `status ${j.state}`, text: j.state }), el("a", { href: `/runs/${j.name}`, text: "open" })]));
  const active = queue.filter((j) => ["queued", "running"].includes(j.state));
  const current = active.find((j) => j.state === "running") || active[0] || queue[queue.length - 1];
  if (current && watched !== current.name) watch(current.name);
  setTimeout(showQueue, 2000);
}

// The baselines a run measures, as the choices a user makes: each sets eval.baselines and the curve together,
// so "zero-shot only" does not quietly run the k-shot curve as well.
const BASELINES = { curve: { "eval.baselines": null, "eval.few_shot_k": null },
  both: { "eval.baselines": ["zero_shot", "few_shot"], "eval.few_shot_k": [0, 6] },
  zero_shot: { "eval.baselines": ["zero_shot"], "eval.few_shot_k": [0] },
  none: { "eval.baselines": [], "eval.few_shot_k": [0] } };

function showBaselines(draft) {
  const chosen = getKey(draft, "eval.baselines"), k = getKey(draft, "eval.few_shot_k");
  $("#baselines").value = chosen === undefined && k === undefined ? "curve" : Array.isArray(chosen) && !chosen.length ? "none"
    : JSON.stringify(chosen) === '["zero_shot"]' ? "zero_shot" : "both";
  $("#classic").checked = getKey(draft, "eval.classic") !== false;
}

let estimating = 0;
async function refreshEstimate() {  // each edit changes the cost: the estimate follows it
  const mine = ++estimating;
  $("#estimate").textContent = "estimating…";
  try {
    const r = await api("/api/preview");
    if (mine === estimating) $("#estimate").textContent = estimateText(r);
  } catch (e) { if (mine === estimating) $("#estimate").textContent = `No estimate: ${e.message}`; }
}

async function trainPage(state) {
  showState(state);
  showBaselines(state.draft);
  for (const input of document.querySelectorAll("[data-key]")) input.addEventListener("change", () => setTimeout(refreshEstimate, 300));
  $("#baselines").addEventListener("change", async () => { const s = await setDraft(BASELINES[$("#baselines").value]); if (s) showBaselines(s.draft); });
  $("#classic").addEventListener("change", () => setDraft({ "eval.classic": $("#classic").checked ? null : false }));
  $("#start").addEventListener("click", async () => {
    const button = $("#start");
    if (button.disabled) return;
    button.disabled = true;  // one press, one run: a second press while this one is answered does nothing
    const body = $("#mode").value === "auto" ? { budget: $("#budget").value.trim() } : {};
    try { showError(null); const job = await api("/api/runs", { json: body }); watch(job.name); } catch (e) { showError(e); }
    finally { setTimeout(() => { button.disabled = false; }, 1000); }
  });
  $("#stop").addEventListener("click", () => watched && api(`/api/runs/${watched}/stop`, { json: {} }));
  $("#mode").addEventListener("change", () => {
    const auto = $("#mode").value === "auto";
    $("#budget-box").hidden = !auto; $("#auto-hint").hidden = !auto;
    $("#start").textContent = auto ? "Start the auto search" : "Start training";
  });
  showQueue();
  refreshEstimate();
  api("/api/models").then(({ models }) => $("#models").replaceChildren(...models.map((m) => el("option", { value: m.path, text: m.name })))).catch(() => {});
  api("/api/machine").then((m) => {
    const gpu = m.gpus.length ? m.gpus.map((g) => `${g.name} (${g.memory_gib} GiB)`).join(", ") : "no GPU: training runs on the CPU";
    $("#machine").textContent = `This machine: ${m.processor}, ${m.cores} cores, ${m.memory_gib ?? "?"} GiB memory; ${gpu}; PyTorch ${m.torch}.`;
  }).catch(() => {});
}

// ---------------------------------------------------------------- start
(async () => {
  try {
    bindInputs();
    const state = await api("/api/state");
    showState(state);
    if (page === "data") await dataPage(state);
    else if (page === "template") {
      const { defaults } = await api(`/api/fields/${getKey(state.draft, "template.preset") || "classification"}`);
      for (const part of ["instruction", "prompt", "completion"]) $(`[data-key="template.${part}"]`).placeholder = defaults[part]; const r = await runPreview(); if (r) showSamples(r); $("#preview-button").addEventListener("click", async () => { const x = await runPreview(); if (x) showSamples(x); }); }
    else if (page === "preflight") { const r = await runPreview(); if (r) showFindings(r); $("#preview-button").addEventListener("click", async () => { const x = await runPreview(); if (x) showFindings(x); }); }
    else if (page === "train") await trainPage(state);
    else if (page === "runs") await runsPage();
    else if (page === "run") await runPage();
    else if (page === "compare") await comparePage();
    else if (page === "chat") await chatPage();
    else if (page === "export") await exportPage();
    document.body.dataset.ready = "1";
  } catch (e) { showError(e); document.body.dataset.ready = "1"; }
})();
