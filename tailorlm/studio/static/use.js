// tailor studio: what uses a finished run: chat with it beside its base model, and export it. Plain script,
// sharing one scope with runs.js and studio.js (the API helpers).
"use strict";

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

// ---------------------------------------------------------------- 7. chat
// The answers come as one JSON object a line while they are generated; each is handed to onEvent.
async function streamLines(path, body, onEvent) {
  const response = await fetch(path, { method: "POST", headers: { "X-Studio": "1", "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  if (!response.ok) {
    const text = await response.text();
    let error; try { error = JSON.parse(text).error; } catch { error = text; }
    throw new Error(error || response.statusText);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffered += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, cut).trim();
      buffered = buffered.slice(cut + 1);
      if (line) onEvent(JSON.parse(line));
    }
    if (done) return;
  }
}

let messages = [], setup = null, answering = false;
async function chatPage() {
  const select = await pickRun();
  const clear = () => { messages = []; for (const side of ["fine_tuned", "base"]) $(`#chat-${side}`).replaceChildren(); };
  const choose = async () => {
    clear();
    if (!select.value) return;
    setup = await api(`/api/chat/setup?run=${encodeURIComponent(select.value)}`);
    const task = setup.mode === "task";
    for (const node of document.querySelectorAll(".task-only")) node.hidden = !(task && setup.closed);
    for (const node of document.querySelectorAll(".chat-only")) node.hidden = task;
    $("#constrained").checked = Boolean(setup.closed);
    // A single-input task is asked through the message box; a task with several inputs (a QA pair) gets one box each.
    const many = task && setup.fields.length > 1;
    $("#task-fields").replaceChildren(...(many ? setup.fields.map((f) => el("label", { class: "block" }, `${f} `,
      el("textarea", { rows: "2", "data-field": f }))) : []));
    $("#message").hidden = many;
    $("#chat-how").textContent = task
      ? `Type the ${setup.fields.join(" and ")} only: it is laid out with the run's template, as in training` +
        (setup.labels.length ? `, and the answer is read as one of: ${setup.labels.join(", ")}.` : ".")
      : "A conversation, laid out with the run's chat format; the fine-tuned model and its base answer the same messages.";
    $("#busy").textContent = setup.loaded ? "" : "The run's two models load with the first message (once per run).";
  };
  select.addEventListener("change", choose);
  $("#clear").addEventListener("click", clear);
  $("#send").addEventListener("click", send);
  $("#message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  await choose();
}

function number(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }

async function send() {
  if (answering || !setup) return;
  const task = setup.mode === "task";
  const boxes = [...document.querySelectorAll("#task-fields textarea")];
  const fields = boxes.length ? Object.fromEntries(boxes.map((b) => [b.dataset.field, b.value.trim()]))
    : task ? { [setup.fields[0]]: $("#message").value.trim() } : null;
  const text = task ? Object.entries(fields).map(([k, v]) => (boxes.length ? `${k}: ${v}` : v)).join("\n") : $("#message").value.trim();
  if (!text.trim() || (fields && Object.values(fields).some((v) => !v))) return;
  const body = { run: $("#run-select").value, max_new_tokens: number("#max-new-tokens") };
  if (task) Object.assign(body, { fields, constrained: $("#constrained").checked });
  else Object.assign(body, { messages: [...messages, { role: "user", content: text }], temperature: number("#temperature"), top_p: number("#top-p") });
  answering = true;
  $("#send").disabled = true;
  showError(null);
  const answers = {};
  for (const side of ["fine_tuned", "base"]) {
    $(`#chat-${side}`).append(el("p", { class: "user", text }));
    answers[side] = el("p", { class: "assistant pending", text: "…" });
    $(`#chat-${side}`).append(answers[side]);
  }
  const started = performance.now();
  const texts = { fine_tuned: "", base: "" };
  try {
    await streamLines("/api/chat", body, (e) => {
      if (e.event === "loading") $("#busy").textContent = "loading the run's two models (once per run)…";
      else if (e.event === "answering") $("#busy").textContent = "answering…";
      else if (e.event === "error") throw new Error(e.error);
      else if (e.side) {
        const node = answers[e.side];
        if (e.piece !== undefined) { texts[e.side] += e.piece; node.textContent = texts[e.side]; }
        if (e.done) {
          node.classList.remove("pending");
          if (e.error) node.textContent = `(failed: ${e.error})`;
          else if (task) node.replaceChildren(el("strong", { text: e.label ?? "(no valid answer)" }),
            ...(e.text.trim() !== String(e.label ?? "").trim() ? [el("span", { class: "hint", text: `  generated: ${e.text}` })] : []));
          else node.textContent = e.text.trim() || "(an empty answer)";
          texts[e.side] = e.text ?? texts[e.side];
        }
      }
    });
    if (!task) messages.push({ role: "user", content: text }, { role: "assistant", content: texts.fine_tuned });
    $("#message").value = "";
    for (const b of boxes) b.value = "";
    $("#busy").textContent = `answered in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (e) {
    showError(e);
    $("#busy").textContent = "";
    for (const node of Object.values(answers)) if (node.classList.contains("pending")) node.remove();
  } finally { answering = false; $("#send").disabled = false; }
}

// ---------------------------------------------------------------- 8. export
const size = (n) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

async function exportPage() {
  const select = await pickRun();
  const poll = async () => {
    const s = await api(`/api/export/${select.value}`);
    $("#export-state").textContent = s.state;
    $("#export-state").className = `status ${s.state}`;
    $("#export-folder").textContent = s.folder ? `on the server: ${s.folder}` : "";
    $("#export-error").textContent = s.error || "";
    $("#export-error").hidden = !s.error;
    fillTable($("#checks"), ["check", "result", "limit", ""], (s.checks || []).map((c) =>
      [c.name, c.result, c.limit, el("span", { class: c.ok ? "ok" : "wrong", text: c.ok ? "ok" : "FAIL" })]));
    const files = ["verified", "differs"].includes(s.state) ? s.files || [] : [];
    $("#downloads").hidden = !files.length;
    const link = (query, text) => el("a", { href: `/api/export/${encodeURIComponent(select.value)}/download${query}`, download: "", text });
    $("#files").replaceChildren(...files.map((f) => el("li", {}, link(`?file=${encodeURIComponent(f.name)}`, f.name), ` (${size(f.bytes)})`)),
      el("li", {}, link("", "everything, as one .zip")));
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
