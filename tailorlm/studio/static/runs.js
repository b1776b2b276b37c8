// tailor studio: what shows a run (live curves, progress, results, compare). Loaded before use.js (chat and
// export) and studio.js, which holds the API helpers and the forms; all are plain scripts sharing one scope.
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
  // The steps drawn, padded when there is one: uPlot draws a lone x value on an empty 0-100 axis.
  const span = steps.length > 1 && steps[0] !== steps[steps.length - 1] ? { min: steps[0], max: steps[steps.length - 1] }
    : { min: (steps[0] ?? 0) - 1, max: (steps[0] ?? 0) + 1 };
  if (charts[target] && charts[target].key === key) { charts[target].span = span; charts[target].plot.setData(data); return; }
  charts[target]?.plot.destroy();
  // Ranges from the data, so a first point does not sit on uPlot's empty 0-100 axis; a share (accuracy, F1)
  // keeps the 0-1 scale. The legend names the series instead of reading "--" until the cursor hovers.
  const share = names.every((n) => series[n].every((p) => p[1] >= 0 && p[1] <= 1)) && !/loss|ppl/.test(names.join());
  const whole = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000];  // steps: no 0.5
  const opts = { title, width: 380, height: 220, legend: { live: false }, axes: [{ incrs: whole }, {}],
    scales: { x: { time: false, range: () => [charts[target].span.min, charts[target].span.max] }, y: share ? { range: [0, 1] } : { range: (u, min, max) => (min === max ? [min * 0.9, max * 1.1 || 1] : uPlot.rangeNum(min, max, 0.1, true)) } },
    series: [{ label: "step" }, ...names.map((n, i) => ({ label: n, stroke: colors[i % colors.length], spanGaps: true, points: { show: true, size: 4 } }))] };
  charts[target] = { key, span };
  charts[target].plot = new uPlot(opts, data, node);
}

// ---------------------------------------------------------------- what the run is doing now
const clock = (s) => { if (s == null) return "-"; s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(r).padStart(2, "0")}`; };

function showProgress(progress, status) {
  const box = $("#progress");
  if (!box) return;
  box.hidden = !progress;
  if (!progress) return;
  const bars = progress.bars || [];
  const step = progress.step, current = bars[bars.length - 1];
  $("#stage").textContent = progress.stage || "starting";
  $("#step-counter").textContent = step ? `step ${step.done} of ${step.total}` : status === "running" ? "before training" : "";
  $("#elapsed").textContent = clock(progress.elapsed);
  const main = bars.find((b) => b.description === "train") || current;
  $("#eta").textContent = status === "running" && main && main.eta != null ? clock(main.eta) : "-";
  $("#meter-fill").style.width = main && main.total ? `${(100 * main.done) / main.total}%` : "0%";
  $("#bars").replaceChildren(...bars.map((b) => el("div", { text: `${b.description}: ${b.done}/${b.total}` +
    (b.eta != null && status === "running" ? `, ${clock(b.eta)} left` : "") + (b.info ? ` (${b.info})` : "") })));
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
  if (r.kind === "auto") { showAuto(r); return; }
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
