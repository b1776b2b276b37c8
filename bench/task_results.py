"""Prompting vs fine-tuning on the shared datasets, and the training methods compared on one of them.

Runs real `tailor run` pipelines (tailorlm.pipeline.run) on the example configs and writes what each run
measured (test metrics of every variant, retention change, training time) to a JSON file; --render turns
that file into BENCHMARKS.md sections.

    python bench/task_results.py --suite datasets --out runs/bench-datasets      # multi30k, gsm8k, alpaca, wnut17
    python bench/task_results.py --suite methods --out runs/bench-methods        # full, freeze, unfreeze, LoRA, DoRA on SST-2
    python bench/task_results.py --render runs/bench-methods/results.json        # into BENCHMARKS.md
    python bench/task_results.py --suite datasets --only alpaca --set data.limit.train=400 ...   # CPU-sized

Results measured on a CPU go to their own BENCHMARKS.md section, beside the GPU one.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import replace_section  # noqa: E402

DATASETS = {  # example config -> overrides that fit a benchmark budget
    "multi30k": ["data.limit.train=3000", "data.limit.test=300"],
    "gsm8k": ["data.limit.train=2000", "data.limit.test=200"],
    "alpaca": ["data.limit.train=2000", "data.limit.test=150"],
    "wnut17": ["data.limit.train=3394", "train.epochs=3"],  # every sentence the config's empty_share keeps, 3 epochs
}
SST2_METHODS = ["data.limit.train=2000", "data.limit.test=500", "train.eval_every=25"]
METHODS = {  # name -> overrides (each its own small learning rate)
    "full": ["method.name=full", "train.lr=2e-5"],
    "freeze": ["method.name=freeze", "method.freeze.first_blocks=20", "train.lr=2e-5"],
    "gradual_unfreeze": ["method.name=gradual_unfreeze", "method.unfreeze.groups=4", "method.unfreeze.lr_decay=0.5",
                         "train.lr=2e-5"],
    "lora": ["method.name=lora", "train.lr=5e-4"],
    "dora": ["method.name=lora", "method.lora.use_dora=true", "train.lr=5e-4"],
}


def run_one(name: str, config: Path, overrides: list[str], out: Path, data_root: str) -> dict:
    from tailorlm.config import load_config
    from tailorlm.pipeline import run

    text = config.read_text().replace("../shared/data", data_root)
    resolved = out / f"{name}.yaml"
    resolved.write_text(text)
    cfg = load_config(resolved, overrides + ["output.overwrite=true"])
    started = time.perf_counter()
    metrics = run(cfg, out / name)
    task = next(iter(metrics["tasks"].values()))  # each benchmark config trains one task
    log = json.loads((out / name / "train_log.json").read_text())
    return {"name": name, "config": str(config.relative_to(ROOT)), "overrides": overrides,
            "task": task["task"], "headline": task["headline"], "columns": task["columns"],
            "variants": {v: {k: x for k, x in m.items() if isinstance(x, float)} for v, m in task["variants"].items()},
            "best_prompting": task.get("best_prompting"), "curve": task.get("curve"),
            "n_test": task["n_test"], "train": {k: v for k, v in metrics["train"].items() if k != "retention"},
            "retention": metrics["train"]["retention"], "best_step": log["best_step"],
            "run_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["datasets", "methods"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-tasks")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--only", nargs="*", help="run only these names")
    parser.add_argument("--model", help="model.path for every run (default: the configs' own, the embedded SmolLM2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run, after the suite's own (e.g. smaller limits on a CPU)")
    parser.add_argument("--render", type=Path, nargs="+",
                        help="results.json files of one suite (one per dataset is fine) to write into BENCHMARKS.md")
    args = parser.parse_args()
    if args.render:
        saved = [json.loads(path.read_text()) for path in args.render]
        render({**saved[0], "runs": [run for result in saved for run in result["runs"]]})
        return
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"suite": args.suite, "date": date.today().isoformat(), "runs": [],
               "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
               "torch": torch.__version__}
    plan = ({n: (ROOT / "examples" / f"{n}.yaml", o) for n, o in DATASETS.items()} if args.suite == "datasets" else
            {n: (ROOT / "examples" / "sst2.yaml", SST2_METHODS + o + ([] if n == "full" else ["eval.baselines=[]"]))
             for n, o in METHODS.items()})
    for name, (config, overrides) in plan.items():
        if args.only and name not in args.only:
            continue
        overrides = [*overrides, *args.set]
        if args.model:
            overrides = [*overrides, f"model.path={args.model}"]
        try:
            results["runs"].append(run_one(name, config, overrides, args.out, args.data_root))
        except Exception as e:  # one failed run must not lose the others' figures
            results["runs"].append({"name": name, "error": f"{type(e).__name__}: {e}"})
        (args.out / "results.json").write_text(json.dumps(results, indent=2))


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if key in ("bleu", "chrf") else f"{value:.0%}" if key in ("valid", "answered") else f"{value:.3f}"


def render(results: dict) -> None:
    where = f"{results['machine']}, torch {results['torch']}, {results['date']}"
    runs = [r for r in results["runs"] if "error" not in r]
    failed = [r for r in results["runs"] if "error" in r]
    if results["suite"] == "datasets":
        lines = [f"Measured on {where} by `python bench/task_results.py --suite datasets`. SmolLM2-135M-Instruct, "
                 "LoRA r=16 on all linear layers; metrics on generated text, greedy decoding.", "",
                 "Prompting columns are free generation; 'best prompting' is the best of every prompting kind "
                 "measured (free, constrained to the labels, label likelihood; zero- and few-shot), named; "
                 "'classic' is TF-IDF + logistic regression on the same training split (closed label sets).", "",
                 "| dataset (config) | metric | test examples | zero-shot | few-shot | best prompting | classic | "
                 "fine-tuned | vs best prompting | retention ppl change | training |",
                 "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in runs:
            cols, v = [c for c in r["columns"] if c not in ("valid", "answered")], r["variants"]
            cell = lambda variant: " / ".join(_fmt(c, v.get(variant, {}).get(c)) for c in cols)  # noqa: E731
            last = {o.split("=", 1)[0]: o for o in r["overrides"]}  # a later override (--set) wins
            shown = " ".join(o for o in last.values() if not o.startswith("model.path="))
            headline, best = r["headline"], r.get("best_prompting") or {}
            tuned = v.get("fine_tuned", {}).get(headline)
            gain = (f"{(tuned - best['value']) * (1 if headline in ('bleu', 'chrf') else 100):+.1f} pts"
                    if tuned is not None and best.get("value") is not None else "-")
            best_cell = f"{_fmt(headline, best.get('value'))} ({best['variant']})" if best.get("variant") else "-"
            lines.append(f"| {r['name']} (`{r['config']}` {shown}) | {' / '.join(cols)} | {r['n_test']} | "
                         f"{cell('zero_shot')} | {cell('few_shot')} | {best_cell} | {cell('classic')} | "
                         f"**{cell('fine_tuned')}** | {gain} | "
                         f"{r['retention'].get('change', 0):+.1%} | {r['train']['steps']} steps, {r['train']['seconds']:.0f} s |")
        cpu = results["machine"].startswith("CPU")
        title = f"Prompting vs fine-tuning: translation, math, instructions, NER ({'CPU' if cpu else 'GPU'})"
        name = "tasks-datasets-cpu" if cpu else "tasks-datasets"
    else:
        base = next((r for r in runs if "zero_shot" in r["variants"]), None)
        lines = [f"Measured on {where} by `python bench/task_results.py --suite methods`: SST-2 (2000 training "
                 "sentences, 500 test), SmolLM2-135M-Instruct, 1 epoch, best checkpoint by validation loss. "
                 "Retention: perplexity of builtin:general reference answers (64 general instructions), "
                 "relative to the base model; lower change is better.", ""]
        if base:
            zs, fs = base["variants"]["zero_shot"], base["variants"]["few_shot"]
            best = base.get("best_prompting") or {}
            classic = base["variants"].get("classic", {}).get("accuracy")
            lines += [f"Prompting the same base model: zero-shot accuracy {zs['accuracy']:.3f}, "
                      f"few-shot {fs['accuracy']:.3f} (free generation)"
                      + (f"; the best prompting result of any kind {best['value']:.3f} ({best['variant']})"
                         if best.get("variant") else "")
                      + (f"; TF-IDF + logistic regression {classic:.3f}" if classic is not None else "") + ".", ""]
        lines += ["| method | overrides | accuracy | macro-F1 | retention ppl change | trainable share | training s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            m = r["variants"]["fine_tuned"]
            lines.append(f"| {r['name']} | `{' '.join(o for o in r['overrides'] if o.startswith('method') or 'lr' in o)}` | "
                         f"{m['accuracy']:.3f} | {m['macro_f1']:.3f} | {r['retention'].get('change', 0):+.1%} | "
                         f"{r['train'].get('trainable_share', 0):.2%} | {r['train']['seconds']:.0f} |")
        title, name = "Training methods compared: task gain vs forgetting (SST-2)", "tasks-methods"
    lines += [f"- {r['name']}: {r['error'][:200]}" if r["error"].startswith("not measured")
              else f"- {r['name']} failed: {r['error'][:200]}" for r in failed]
    body = f"<!-- bench:{name} -->\n### {title}\n\n" + "\n".join(lines) + f"\n<!-- /bench:{name} -->"
    replace_section(ROOT / "BENCHMARKS.md", name, body)
    print(body)


if __name__ == "__main__":
    main()
