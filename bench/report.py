"""Tables for bench/train_speed.py, and the BENCHMARKS.md section each suite owns (between markers)."""
from __future__ import annotations

import re
from datetime import date
from pathlib import Path

TARGETS = {("llama-3.2-1b", "lora"): 12, ("llama-3.2-1b", "full"): 4, ("smollm2-135m", "lora"): 35,
           ("smollm2-135m", "full"): 10, ("default-job", "lora"): 1.5}
TITLES = {"gpu": "Training speed on one GPU: transformers + PEFT vs tailorlm",
          "cpu-default": "Training speed on this CPU: the default job, transformers + PEFT vs tailorlm",
          "cpu-smoke": "Training speed smoke test (tiny shapes, CPU; checks the script runs, not speed)",
          "gpu-families": "Training speed on one GPU, other families (LoRA): transformers + PEFT vs tailorlm",
          "gpu-accum": "Training speed at 32 samples per step: 4 x 8 accumulation vs fuller packed micro-batches"}


COMPILE_LABELS = {"on": ", compile on", "off": ", compile off", "auto": " (default)"}


def _fmt(x, spec: str = ",.0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _label(r: dict) -> str:
    accum = f" ({r['accum']} x 8 accumulation)" if r.get("accum", 1) > 1 else ""
    if r["impl"] == "baseline":
        return "transformers + PEFT" + accum
    name = "tailorlm" + {"off": " (padded, shared prefix: the CPU default)", "on": " (packed)"}.get(r.get("packing"), "")
    if r.get("device") == "cuda":
        name += COMPILE_LABELS[r.get("compile", "auto")]
    if r.get("budget"):
        name += f", packed micro-batches of up to {r['budget']:,} tokens"
    elif accum:
        name += accum
    return name


def table(suite: str, results: list[dict]) -> str:
    rows = [r for r in results if "max_context" not in r]
    head = "| shape | method | implementation | real tokens/s | speed-up | target | MFU | peak GiB | memory vs baseline | warm-up s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = next((b for b in rows if b["shape"] == r["shape"] and b["method"] == r["method"]
                     and b["impl"] == "baseline"), None)
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {_label(r)} | error: {' '.join(r['error'])[:80]} |||||||")
            continue
        ok_base = base is not None and "error" not in base
        speedup = r["tokens_per_s"] / base["tokens_per_s"] if ok_base and r is not base else None
        mem = (r["peak_gib"] / base["peak_gib"]) if ok_base and r is not base and r.get("peak_gib") else None
        target = TARGETS.get((r["shape"], r["method"])) if r["impl"] != "baseline" else None
        lines.append(f"| {r['shape']} | {r['method']} | {_label(r)} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(speedup, '.2f')}{'x' if speedup else ''} | {_fmt(target, 'g')}{'x' if target else ''} | "
                     f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | "
                     f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(mem, '.2f')}{'x' if mem else ''} | "
                     f"{_fmt(r['warmup_s'], '.1f')} |")
    ctx = [r for r in results if "max_context" in r]
    if ctx:
        lines += ["", "| max context, LoRA, Llama-3.2-1B shape, batch 1 | tokens |", "|---|---|"]
        lines += [f"| {_label(r)}{' + activation checkpointing' if r.get('checkpointing') else ''} | "
                  f"{_fmt(r.get('max_context'))}{'' if 'error' not in r else ' (error: ' + ' '.join(r['error'])[:80] + ')'} |"
                  for r in ctx]
    return "\n".join(lines)


def update_markdown(path: Path, suite: str, results: list[dict]) -> None:
    """Replace this suite's section of BENCHMARKS.md (or append it), leaving every other section alone."""
    gpu = next((r["gpu"] for r in results if r.get("gpu")), None)
    where = gpu or "2-core CPU (this workplace's CI-like machine), fp32"
    body = (f"<!-- bench:{suite} -->\n### {TITLES[suite]}\n\nMeasured {date.today().isoformat()} on {where} "
            f"by `python bench/train_speed.py --suite {suite}`.\n\n{table(suite, results)}\n<!-- /bench:{suite} -->")
    replace_section(path, suite, body)


def replace_section(path: Path, name: str, body: str) -> None:
    """Put body (which carries its own markers) in place of the section `name`, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)
