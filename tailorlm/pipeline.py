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
from tailorlm.data.mixing import mix, mixing_shares
from tailorlm.data.preflight import (
    Preflight,
    enforce,
    plot_lengths,
    run_preflight,
    show,
)
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.errors import DataError, TailorError
from tailorlm.eval.evaluate import Evaluator, pick_demos
from tailorlm.eval.report import (
    TITLES,
    format_metric,
    plot_losses,
    print_table,
    write_json,
    write_predictions,
    write_report,
)
from tailorlm.models.loading import (
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
)
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


def prepare_data(cfg: RunConfig, task_name: str | None = None) -> PreparedData:
    """Data -> template -> tokens -> preflight, all before any output is written or weights are loaded."""
    stage(f"Data: {task_name}" if task_name else "Data")
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

    tokenizer = load_tokenizer(cfg.model)  # a wrong model path is reported now, before any output exists
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


def task_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """One run config per task: the run's own data and template, or each entry of `tasks`."""
    if not cfg.tasks:
        return {cfg.template.preset: cfg}
    return {t.name: cfg.model_copy(update={"data": t.data, "template": t.template}) for t in cfg.tasks}


def run(cfg: RunConfig, out_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    out_dir = out_dir or resolve_output_dir(cfg)
    configs = task_configs(cfg)
    datas = {name: prepare_data(c, name if cfg.tasks else None) for name, c in configs.items()}
    for data in datas.values():
        enforce(data.preflight)  # thresholds set to error stop here, before anything is written
    prepare_output_dir(out_dir, cfg.output.overwrite)
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    for name, data in datas.items():
        task_dir = out_dir / "tasks" / name if cfg.tasks else out_dir
        task_dir.mkdir(parents=True, exist_ok=True)
        save_data_report(task_dir, data, configs[name])
    status = {"status": "running", "started": datetime.now().isoformat(timespec="seconds")}
    write_json(out_dir / "run.json", status)
    try:
        metrics = _run_in(cfg, out_dir, configs, datas)
    except BaseException as e:
        write_json(out_dir / "run.json", {**status, "status": "failed", "error": str(e) or type(e).__name__})
        raise
    write_json(out_dir / "run.json", {**status, "status": "complete", "seconds": round(time.perf_counter() - started, 1)})
    console.print(f"\n[bold]Run complete in {time.perf_counter() - started:.0f} s.[/] Results in {out_dir}/ "
                  f"(report.md, metrics.json, predictions.jsonl)")
    return metrics


def _run_in(cfg: RunConfig, out_dir: Path, configs: dict[str, RunConfig], datas: dict[str, PreparedData]) -> dict:
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    tokenizer = next(iter(datas.values())).tokenizer

    stage("Model")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, device, tokenizer)
    model = loaded.model
    console.print(f"Loaded {loaded.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                  f"{next(model.parameters()).dtype}, {device}) in {time.perf_counter() - t0:.0f} s")

    evaluators = {name: Evaluator(tokenizer, d.template, d.fmt, d.splits.labels, cfg.eval, device, d.template.label_field)
                  for name, d in datas.items()}
    variants: dict[str, dict] = {name: {} for name in datas}
    predictions: list[dict] = []
    if cfg.eval.baselines:
        stage("Prompting baselines (base model)")
    for name, d in datas.items():
        for variant in cfg.eval.baselines:
            demos = pick_demos(d.splits.train, cfg.eval.few_shot_k, cfg.train.seed,
                               d.template.label_field) if variant == "few_shot" else []
            result = evaluators[name].run(model, d.encoded["test"], variant, demos)
            variants[name][variant] = result.metrics
            predictions += [{**p, "task": name} if cfg.tasks else p for p in result.predictions]
            console.print(f"{name + ' ' if cfg.tasks else ''}{variant}: " + ", ".join(f"{TITLES.get(c, c)} {format_metric(c, result.metrics.get(c))}"
                                                            for c in d.template.task.columns))

    stage(f"Fine-tuning ({cfg.method.name})")
    train_set, val_set = _training_sets(cfg, datas)
    strategy = make_strategy(cfg.method)
    model = strategy.prepare(model)
    history = train(model, strategy, train_set, val_set, cfg.train, cfg.lr, tokenizer.pad_token_id, device)
    saved = strategy.save(model, tokenizer, out_dir)
    console.print(f"Trained {history.steps} steps in {history.seconds:.0f} s "
                  f"({history.tokens / max(history.seconds, 1e-9):.0f} tokens/s); saved {saved.relative_to(out_dir)}/")
    write_json(out_dir / "train_log.json", {"train_loss": history.train_loss, "val_loss": history.val_loss,
                                            "seconds": history.seconds, "tokens": history.tokens})
    plot_losses(out_dir / "loss_curve.png", history.train_loss, history.val_loss)

    stage("Evaluation (fine-tuned)")
    sections = {}
    for name, d in datas.items():
        result = evaluators[name].run(model, d.encoded["test"], "fine_tuned")
        variants[name]["fine_tuned"] = result.metrics
        predictions += [{**p, "task": name} if cfg.tasks else p for p in result.predictions]
        sections[name] = {"task": configs[name].template.preset, "headline": d.template.task.headline,
                          "columns": list(d.template.task.columns), "variants": variants[name],
                          "labels": d.splits.labels, "n_test": len(d.encoded["test"])}
    train_facts = {"steps": history.steps, "seconds": round(history.seconds, 1), "tokens": history.tokens,
                   "final_val_loss": history.val_loss[-1]["loss"] if history.val_loss else None}
    metrics = ({"tasks": sections, "mixing": cfg.mixing.model_dump(), "train": train_facts} if cfg.tasks
               else {**next(iter(sections.values())), "train": train_facts})
    write_predictions(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "metrics.json", metrics)
    _, total = plan_steps(len(train_set), cfg.train)
    first = next(iter(datas.values()))
    facts = {"task": ", ".join(f"{n} ({c.template.preset})" for n, c in configs.items()) if cfg.tasks else cfg.template.preset,
             "model": loaded.source, "method": cfg.method.name,
             "data": ", ".join(d.splits.sources["train"] for d in datas.values()),
             "train / validation": f"{len(train_set)} / {len(val_set)}" + ("" if cfg.tasks else f" / test {len(first.encoded['test'])}"),
             "training": f"{total} steps, lr {cfg.lr:g}, {history.seconds:.0f} s on {device}",
             "decoding": f"greedy, {cfg.eval.decoding}, few-shot k={cfg.eval.few_shot_k} from the training split"}
    write_report(out_dir / "report.md", f"tailorlm run: {cfg.output.name}", facts, sections)
    console.print()
    for name, section in sections.items():
        print_table(section["variants"], section["n_test"], tuple(section["columns"]), name if cfg.tasks else None)
    return metrics


def _training_sets(cfg: RunConfig, datas: dict[str, PreparedData]) -> tuple[list, list]:
    """The training list (tasks mixed per cfg.mixing) and the validation list (all tasks' validation)."""
    if not cfg.tasks:
        data = next(iter(datas.values()))
        return data.encoded["train"], data.encoded["validation"]
    trains = [d.encoded["train"] for d in datas.values()]
    shares = mixing_shares([len(t) for t in trains], [t.weight for t in cfg.tasks], cfg.mixing.strategy,
                           cfg.mixing.temperature)
    mixed = mix(trains, shares, cfg.train.seed)
    console.print("mixing (" + cfg.mixing.strategy + "): " +
                  ", ".join(f"{n} {share:.0%} of {len(mixed)}" for n, share in zip(datas, shares)))
    return mixed, [s for d in datas.values() for s in d.encoded["validation"]]
