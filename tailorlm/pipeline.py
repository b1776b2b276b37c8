"""`tailor run`: the user's path in order. data -> template -> tokens -> baselines -> train -> evaluate -> report.

Everything that can fail on bad input (config, files, columns, templates) is checked before the output
directory is created, and the directory is only marked complete (run.json status) when everything is written.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


from tailorlm.config import RunConfig
from tailorlm.data.dataset import load_splits
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.errors import DataError, TailorError
from tailorlm.eval.evaluate import Evaluator, pick_demos
from tailorlm.eval.report import TITLES, format_metric, plot_losses, print_table, write_json, write_predictions, write_report
from tailorlm.data.preflight import Preflight, enforce, plot_lengths, run_preflight, show
from tailorlm.models.loading import count_parameters, load_model, load_tokenizer, locate, resolve_device
from tailorlm.models.methods import make_strategy
from tailorlm.train.loop import plan_steps, seed_everything, train
from tailorlm.ui import console, stage


def resolve_output_dir(cfg: RunConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.output.name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise TailorError(f"output directory {path} already exists and is not empty; "
                              f"choose another --output or set output.overwrite=true")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


@dataclass
class PreparedData:
    """Everything known before the model's weights are loaded: examples, tokens, and the preflight."""
    template: PromptTemplate
    splits: object
    tokenizer: object
    fmt: ChatFormat
    encoded: dict
    reports: dict
    preflight: Preflight


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Data -> template -> tokens -> preflight, all before any output is written or weights are loaded."""
    stage("Data")
    template = PromptTemplate(cfg.template)
    label_field = template.label_field
    if template.task.label_field and label_field is None:
        raise TailorError("template.completion must use {{ label }}: the classification preset learns to answer the label")
    splits = load_splits(cfg.data, template.fields, label_field, template.task)
    for name in ("train", "validation", "test"):
        console.print(f"{name:>10}: {len(splits[name]):5d} examples from {splits.sources[name]}")
    for name, reasons in splits.skipped.items():
        for reason, count in reasons.items():
            console.print(f"[yellow]{name:>10}: skipped {count} row(s): {reason}[/]")
    if splits.labels:
        console.print(f"{'labels' if label_field else 'types':>10}: {', '.join(splits.labels)}")
    # Render every example once now, so a template error surfaces before any output or model load.
    for ex in splits.train + splits.validation + splits.test:
        template.prompt(ex, splits.labels), template.completion(ex)

    locate(cfg.model.path)  # a wrong model path is reported now, not after the output directory exists
    tokenizer = load_tokenizer(cfg.model)
    fmt = ChatFormat(tokenizer, cfg.template)
    encoded, reports = {}, {}
    for name in ("train", "validation", "test"):
        encoded[name], reports[name] = encode_examples(splits[name], template, fmt, splits.labels, cfg.template)
        console.print(f"{name:>10}: {reports[name].summary()}")
        if not encoded[name]:
            raise DataError(splits.sources[name], None, f"no {name} sample fits template.max_length={cfg.template.max_length}")

    stage("Preflight")
    device = resolve_device(cfg.train.device)
    pf = run_preflight(cfg, splits, encoded, reports, template, tokenizer, count_parameters(cfg.model), device)
    show(pf, tokenizer, encoded["train"])
    return PreparedData(template, splits, tokenizer, fmt, encoded, reports, pf)


def save_data_report(out_dir: Path, data: PreparedData, cfg: RunConfig) -> None:
    splits, reports = data.splits, data.reports
    write_json(out_dir / "preflight.json", {"findings": data.preflight.findings, **data.preflight.facts})
    plot_lengths(out_dir / "token_lengths.png", data.encoded["train"], cfg.template.max_length)
    write_json(out_dir / "data_report.json", {
        "sources": splits.sources, "labels": splits.labels, "skipped_rows": splits.skipped,
        "splits": {n: {"examples": len(splits[n]), "samples": reports[n].kept, "truncated": reports[n].truncated,
                       "dropped": dict(reports[n].dropped)} for n in data.encoded},
        "train_tokens_per_epoch": sum(len(s) for s in data.encoded["train"])})


def run(cfg: RunConfig, out_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    out_dir = out_dir or resolve_output_dir(cfg)
    data = prepare_data(cfg)
    enforce(data.preflight)  # thresholds set to error stop here, before anything is written
    prepare_output_dir(out_dir, cfg.output.overwrite)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    save_data_report(out_dir, data, cfg)
    status = {"status": "running", "started": datetime.now().isoformat(timespec="seconds")}
    write_json(out_dir / "run.json", status)
    try:
        metrics = _run_in(cfg, out_dir, data, started)
    except BaseException as e:
        write_json(out_dir / "run.json", {**status, "status": "failed", "error": str(e) or type(e).__name__})
        raise
    write_json(out_dir / "run.json", {**status, "status": "complete", "seconds": round(time.perf_counter() - started, 1)})
    console.print(f"\n[bold]Run complete in {time.perf_counter() - started:.0f} s.[/] Results in {out_dir}/ "
                  f"(report.md, metrics.json, predictions.jsonl)")
    return metrics


def _run_in(cfg: RunConfig, out_dir: Path, data: PreparedData, started: float) -> dict:
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    template, splits, fmt, encoded = data.template, data.splits, data.fmt, data.encoded
    label_field = template.label_field

    stage("Model")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, device)
    model, tokenizer = loaded.model, data.tokenizer
    console.print(f"Loaded {loaded.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                  f"{next(model.parameters()).dtype}, {device}) in {time.perf_counter() - t0:.0f} s")

    evaluator = Evaluator(tokenizer, template, fmt, splits.labels, cfg.eval, device, label_field)
    test = encoded["test"]
    variants, predictions = {}, []
    if cfg.eval.baselines:
        stage("Prompting baselines (base model)")
    for variant in cfg.eval.baselines:
        demos = pick_demos(splits.train, cfg.eval.few_shot_k, cfg.train.seed, label_field) if variant == "few_shot" else []
        result = evaluator.run(model, test, variant, demos)
        variants[variant], predictions = result.metrics, predictions + result.predictions
        console.print(f"{variant}: " + ", ".join(f"{TITLES.get(c, c)} {format_metric(c, result.metrics.get(c))}"
                                                 for c in template.task.columns))

    stage(f"Fine-tuning ({cfg.method.name})")
    strategy = make_strategy(cfg.method)
    model = strategy.prepare(model)
    history = train(model, strategy, encoded["train"], encoded["validation"], cfg.train, cfg.lr,
                    tokenizer.pad_token_id, device)
    saved = strategy.save(model, tokenizer, out_dir)
    console.print(f"Trained {history.steps} steps in {history.seconds:.0f} s "
                  f"({history.tokens / max(history.seconds, 1e-9):.0f} tokens/s); saved {saved.relative_to(out_dir)}/")
    write_json(out_dir / "train_log.json", {"train_loss": history.train_loss, "val_loss": history.val_loss,
                                            "seconds": history.seconds, "tokens": history.tokens})
    plot_losses(out_dir / "loss_curve.png", history.train_loss, history.val_loss)

    stage("Evaluation (fine-tuned)")
    result = evaluator.run(model, test, "fine_tuned")
    variants["fine_tuned"], predictions = result.metrics, predictions + result.predictions

    metrics = {"task": cfg.template.preset, "headline": template.task.headline, "variants": variants,
               "labels": splits.labels, "n_test": len(test),
               "train": {"steps": history.steps, "seconds": round(history.seconds, 1), "tokens": history.tokens,
                         "final_val_loss": history.val_loss[-1]["loss"] if history.val_loss else None}}
    write_predictions(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "metrics.json", metrics)
    _, total = plan_steps(len(encoded["train"]), cfg.train)
    facts = {"task": cfg.template.preset, "model": loaded.source, "method": cfg.method.name, "data": splits.sources["train"],
             "train / validation / test": f"{len(encoded['train'])} / {len(encoded['validation'])} / {len(test)}",
             "training": f"{total} steps, lr {cfg.lr:g}, {history.seconds:.0f} s on {device}",
             "decoding": f"greedy, {cfg.eval.decoding}, few-shot k={cfg.eval.few_shot_k} from the training split"}
    write_report(out_dir / "report.md", f"tailorlm run: {cfg.output.name}", facts, variants, splits.labels,
                 template.task.columns)
    console.print()
    print_table(variants, len(test), template.task.columns)
    return metrics
