// tailor studio: what shows a run (live curves, results, compare) and what uses one (chat, export). Loaded
// before studio.js, which holds the API helpers and the forms; both are plain scripts sharing one scope.
"use strict";

// ---------------------------------------------------------------- charts
const charts = {};
function chart(target, title, series) {
  const names = Object.keys(series);
  const node = $(target);
  if (!node || !names.length) return;
  const steps = [...new Set(names.flatMap((n) => series[n].map((p) => p[0])))].sort((a, b) => a - b);
  const data = [steps, ...names.map((n) => { const m = new Map(series[n]); return steps.map((s) => (m.has(s) ? m.get(s) : null)); })];
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];
  const key = target + names.join();
  if (charts[target] && charts[target].key === key) { charts[target].plot.setData(data); return; }
  charts[target]?.plot.destroy();
  const opts = { title, width: 380, height: 220, scales: { x: { time: false } },
    series: [{ label: "step" }, ...names.map((n, i) => ({ label: n, stroke: colors[i % colors.length], spanGaps: true, points: { show: true, size: 4 } }))] };
  charts[target] = { key, plot: new uPlot(opts, data, node) };
}

function showCurves(series) {
  const loss = {}, metrics = {}, retention = {};
  for (const [k, v] of Object.entries(series)) {
    if (!/^(train|val)\//.test(k) || k.endsWith("/lr") || k.endsWith("grad_norm") || /seconds|tokens|valid/.test(k)) continue;
    if (k.includes("retention_ppl")) retention[k] = v;
    else if (k.includes("loss")) loss[k] = v;
    else if (!k.includes("retention")) metrics[k] = v;
  }
  chart("#chart-loss", "train and validation loss", loss);
  chart("#chart-metrics", "task metric on validation answers", metrics);
  chart("#chart-retention", "retention: perplexity of general text (forgetting)", retention);
}

// ---------------------------------------------------------------- 5. results
async function runsPage() {
  const { runs } = await api("/api/runs");
  fillTable($("#runs"), ["", "run", "status", "method", "fine-tuned vs best prompting", ""], runs.slice().reverse().map((r) =>
    [el("input", { type: "checkbox", value: r.name }), el("a", { href: `/runs/${r.name}`, text: r.name }),
     el("span", { class: `status ${r.status}`, text: r.status }), r.method, r.headline,
     el("span", {}, el("a", { href: `/chat?run=${r.name}`, text: "chat" }), " · ", el("a", { href: `/export?run=${r.name}`, text: "export" }))]));
  $("#compare-selected").addEventListener("click", () => {
    const picked = [...document.querySelectorAll("#runs input:checked")].map((i) => `run=${encodeURIComponent(i.value)}`);
    location.href = `/compare?${picked.join("&")}`;
  });
}

let predictions = [];
async function runResults(name) {
  const r = await api(`/api/runs/${name}/results`);
  $("#run-config").textContent = r.config;
  $("#tables").replaceChildren(...r.tables.map((t) => {
    const table = el("table", { class: "grid" });
    fillTable(table, ["variant", "kind", "k", ...t.columns], t.rows.map((row) =>
      [row.variant === "fine_tuned" ? el("strong", { text: "fine-tuned" }) : row.variant, row.kind, row.k, ...t.columns.map((c) => fmt(row[c]))]));
    const best = t.best_prompting ? `best prompting: ${t.best_prompting.variant} ${fmt(t.best_prompting.value)}` : "";
    return el("div", {}, el("p", { class: "hint", text: `${t.task ? t.task + ": " : ""}headline ${t.headline}. ${best}` }), table);
  }));
  if (r.retention) $("#retention").textContent = `Retention (${r.retention.source}): perplexity ${fmt(r.retention.base_ppl)} → ${fmt(r.retention.final_ppl)} (${(100 * r.retention.change).toFixed(1)}%). Best step ${r.best_step}.`;
  const t = r.tables[0];
  if (t && t.confusion) {
    const predicted = [...new Set(Object.values(t.confusion).flatMap((row) => Object.keys(row)))];
    fillTable($("#confusion"), ["expected \\ predicted", ...predicted], Object.entries(t.confusion).map(([label, row]) => [label, ...predicted.map((p) => row[p] ?? 0)]));
  }
  predictions = r.predictions;
  const labels = [...new Set(predictions.map((p) => p.expected).filter((x) => typeof x === "string"))].sort();
  $("#label-filter").replaceChildren(el("option", { value: "", text: "any" }), ...labels.map((l) => el("option", { text: l })));
  showPredictions();
  fillTable($("#losses"), ["loss", "where", "example"], r.losses.map((x) => [fmt(x.loss), shortWhere(x.where), JSON.stringify(x.example)]));
}

const shortWhere = (where) => (where || "").replace(/^.*\//, "");  // the file's name and line: the folder is the run's data
const plain = (v) => (typeof v === "string" ? v : JSON.stringify(v));

function showPredictions() {
  const wrong = $("#wrong-only").checked, label = $("#label-filter").value;
  const shown = predictions.filter((p) => (!wrong || p.correct === false) && (!label || p.expected === label));
  $("#prediction-count").textContent = `${shown.length} of ${predictions.length}`;
  fillTable($("#predictions"), ["input", "expected", "predicted", "generated", ""], shown.map((p) =>
    [plain(p.input), plain(p.expected), p.predicted === null ? "(no valid answer)" : plain(p.predicted), p.generated,
     p.correct === null ? "" : el("span", { class: p.correct ? "ok" : "wrong", text: p.correct ? "right" : "wrong" })]));
}

async function runPage() {
  const name = document.body.dataset.run;
  $("#resume").addEventListener("click", async () => {
    try { showError(null); await api(`/api/runs/${name}/resume`, { json: {} }); watch.reloaded = false; watch(name); } catch (e) { showError(e); }
  });
  $("#wrong-only").addEventListener("change", showPredictions);
  $("#label-filter").addEventListener("change", showPredictions);
  $("#stop").addEventListener("click", () => api(`/api/runs/${name}/stop`, { json: {} }));
  await runResults(name).catch(() => {});
  watch(name);
}

// ---------------------------------------------------------------- 6. compare
async function comparePage() {
  const { runs } = await api("/api/runs");
  const picked = new URLSearchParams(location.search).getAll("run");
  $("#pick").replaceChildren(...runs.map((r) => el("label", { class: "pick" },
    Object.assign(el("input", { type: "checkbox", value: r.name }), { checked: picked.includes(r.name) }), ` ${r.name}`)));
  $("#compare-button").addEventListener("click", () => {
    const names = [...document.querySelectorAll("#pick input:checked")].map((i) => `run=${encodeURIComponent(i.value)}`);
    location.href = `/compare?${names.join("&")}`;
  });
  if (picked.length < 2) return;
  try {
    const c = await api(`/api/compare?${picked.map((n) => `run=${encodeURIComponent(n)}`).join("&")}`);
    fillTable($("#diff"), ["setting", ...c.labels], Object.entries(c.config_diff).map(([k, vs]) => [k, ...vs.map((v) => JSON.stringify(v))]));
    const shown = c.metrics.filter((m) => !["k", "n", "prompt_tokens", "seconds_per_100", "dropped_demos", "valid"].includes(m.metric));
    fillTable($("#metrics"), ["variant", "metric", ...c.labels], shown.map((m) => [m.variant, m.metric, ...m.values.map(fmt)]));
    $("#curves").replaceChildren();
    for (const [curve, byRun] of Object.entries(c.curves)) {
      if (/lr|grad_norm|seconds|tokens|valid|evaluations\/val_loss/.test(curve)) continue;  // val_loss is its own curve
      const id = `curve-${Object.keys(charts).length}`;
      $("#curves").append(el("div", { id }));
      chart(`#${id}`, curve, byRun);
    }
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- 7-8. chat and export: a run to pick
async function pickRun() {
  const { runs } = await api("/api/runs");
  const done = runs.filter((r) => r.status === "complete").reverse();
  const select = $("#run-select");
  select.replaceChildren(...done.map((r) => el("option", { text: r.name })));
  const wanted = new URLSearchParams(location.search).get("run");
  if (wanted) select.value = wanted;
  if (!done.length) showError("no finished run yet: train one first");
  return select;
}

let messages = [];
async function chatPage() {
  const select = await pickRun();
  const clear = () => { messages = []; $("#chat-fine_tuned").replaceChildren(); $("#chat-base").replaceChildren(); };
  select.addEventListener("change", clear);
  $("#clear").addEventListener("click", clear);
  $("#send").addEventListener("click", async () => {
    const text = $("#message").value.trim();
    if (!text) return;
    $("#message").value = "";
    messages.push({ role: "user", content: text });
    for (const side of ["fine_tuned", "base"]) $(`#chat-${side}`).append(el("p", { class: "user", text }));
    $("#busy").textContent = "answering…";
    try {
      showError(null);
      const answers = await api("/api/chat", { json: { run: select.value, messages } });
      for (const side of ["fine_tuned", "base"]) $(`#chat-${side}`).append(el("p", { class: "assistant", text: answers[side].trim() || "(an empty answer)" }));
      messages.push({ role: "assistant", content: answers.fine_tuned });
    } catch (e) { showError(e); } finally { $("#busy").textContent = ""; }
  });
}

async function exportPage() {
  const select = await pickRun();
  const poll = async () => {
    const s = await api(`/api/export/${select.value}`);
    $("#export-state").textContent = s.state;
    $("#export-state").className = `status ${s.state}`;
    $("#export-folder").textContent = s.folder || "";
    $("#export-error").textContent = s.error || "";
    $("#export-error").hidden = !s.error;
    fillTable($("#checks"), ["check", "result", "limit", ""], (s.checks || []).map((c) =>
      [c.name, c.result, c.limit, el("span", { class: c.ok ? "ok" : "wrong", text: c.ok ? "ok" : "FAIL" })]));
    if (s.state === "running") setTimeout(poll, 1000);
  };
  select.addEventListener("change", poll);
  $("#export-button").addEventListener("click", async () => {
    try {
      showError(null);
      await api("/api/export", { json: { run: select.value, format: $("#format").value, quant: $("#quant").value || null } });
      poll();
    } catch (e) { showError(e); }
  });
  if (select.value) poll();
}

