"""`tailor run`: the user's path in order. data -> template -> tokens -> baselines -> train -> evaluate -> report.

Everything that can fail on bad input (config, files, columns, templates) is checked before the output
directory is created, and the directory is only marked complete (run.json status) when everything is written.

Under torchrun every process runs this: all prepare the data and train together; rank 0 alone writes the run
directory, runs the prompting baselines and the final evaluation (train/distributed.py).
"""
from __future__ import annotations

import json
import os
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
from tailorlm.eval.baselines import best_prompting, run_baselines, variant_name
from tailorlm.eval.curve_report import curve_file, plot_curve
from tailorlm.eval.evaluate import Evaluator
from tailorlm.eval.report import (
    TITLES,
    format_metric,
    print_table,
    variant_title,
    write_json,
    write_predictions,
    write_report,
)
from tailorlm.models.loading import (
    inspect_model,
    load_model,
    load_tokenizer,
    resolve_device,
)
from tailorlm.eval.training_report import overfit_step, plot_training, training_lines
from tailorlm.models.methods import check_supported
from tailorlm.rundir import check_output_dir, open_run_dir, read_status, resolve_output_dir
from tailorlm.train import distributed
from tailorlm.train.fit import check_select, fit
from tailorlm.train.loop import seed_everything
from tailorlm.track.tracker import Tracker
from tailorlm.ui import console, stage


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
    pf = run_preflight(cfg, splits, encoded, reports, template, tokenizer, inspect_model(cfg.model), device)
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


def run(cfg: RunConfig, out_dir: Path | None = None, resume: bool = False, observe=None) -> dict:
    """The whole run. resume=True continues out_dir from its latest complete checkpoint (same config).

    observe(metrics, step), when given, sees every logged metric as training goes ('train/loss', 'val/val_loss',
    'val/accuracy', ...), e.g. for a sweep to prune a trial; an exception it raises stops the run."""
    started = time.perf_counter()
    world, device = distributed.init(cfg.train.distributed, resolve_device(cfg.train.device))
    try:
        return _run(cfg, out_dir, resume, observe, started, world, device)
    finally:
        distributed.shutdown()


def _run(cfg: RunConfig, out_dir: Path | None, resume: bool, observe, started: float, world, device) -> dict:
    out_dir = distributed.from_main(out_dir or resolve_output_dir(cfg))  # one name, not one timestamp per process
    check_output_dir(out_dir, cfg.output.overwrite, resume)
    if resume and read_status(out_dir).get("status") == "complete" and (out_dir / "metrics.json").is_file():
        # Redoing the final steps would overwrite its results and timings with a second, partial run's.
        console.print(f"{out_dir} is a complete run (run.json); nothing to resume. Its results are in "
                      f"{out_dir}/report.md; start a new run to train again.", soft_wrap=True)
        return json.loads((out_dir / "metrics.json").read_text())
    check_supported(cfg.method, device)
    distributed.check_method(cfg.method.name)
    configs = task_configs(cfg)
    datas = {name: prepare_data(c, name if cfg.tasks else None) for name, c in configs.items()}
    check_select(cfg, {name: d.template for name, d in datas.items()})
    for data in datas.values():
        enforce(data.preflight)  # thresholds set to error stop here, before anything is written
    if not world.main:
        return _run_in(cfg, out_dir, configs, datas, resume, device, observe)
    lock = open_run_dir(out_dir, cfg.output.overwrite, resume)
    try:
        if not resume:
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
            for name, data in datas.items():
                task_dir = out_dir / "tasks" / name if cfg.tasks else out_dir
                task_dir.mkdir(parents=True, exist_ok=True)
                save_data_report(task_dir, data, configs[name])
        status = {"status": "running", "started": datetime.now().isoformat(timespec="seconds"), "pid": os.getpid()}
        write_json(out_dir / "run.json", status)
        try:
            metrics = _run_in(cfg, out_dir, configs, datas, resume, device, observe)
        except BaseException as e:
            write_json(out_dir / "run.json", {**status, "status": "failed", "error": str(e) or type(e).__name__})
            raise
        write_json(out_dir / "run.json", {**status, "status": "complete", "seconds": round(time.perf_counter() - started, 1)})
    finally:
        lock.release()
    console.print(f"\n[bold]Run complete in {time.perf_counter() - started:.0f} s.[/] Results in {out_dir}/ "
                  f"(report.md, metrics.json, predictions.jsonl)")
    return metrics


def _run_in(cfg: RunConfig, out_dir: Path, configs: dict[str, RunConfig], datas: dict[str, PreparedData],
            resume: bool, device, observe=None) -> dict:
    main = distributed.world().main
    seed_everything(cfg.train.seed)
    tokenizer = next(iter(datas.values())).tokenizer

    stage("Model")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, device, tokenizer, quantize=cfg.method.name == "qlora")
    console.print(f"Loaded {loaded.name} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters, "
                  f"{next(loaded.model.parameters()).dtype}, {device}) in {time.perf_counter() - t0:.0f} s")

    evaluators = {name: Evaluator(tokenizer, d.template, d.fmt, d.splits.labels, cfg.eval, device, d.template.label_field)
                  for name, d in datas.items()}
    # Rank 0 alone runs the baselines (the others wait for it at the first collective of training).
    variants, predictions, curves = _baselines(cfg, out_dir, datas, evaluators, loaded.model) if main else ({}, [], {})

    stage(f"Fine-tuning ({cfg.method.name})")
    train_set = _training_set(cfg, datas)
    validation = {name: d.encoded["validation"] for name, d in datas.items()}
    with Tracker.open(out_dir, cfg, enabled=main) as tracker:  # closed as failed if anything below raises
        tracker.log_params({"lr": cfg.lr, "train_samples": len(train_set)})  # the resolved values

        def log(metrics: dict, step: int) -> None:
            tracker.log_metrics(metrics, step)
            if observe:
                observe(metrics, step)

        result = fit(cfg, loaded.model, tokenizer, train_set, validation, evaluators, out_dir, device, resume, log)
        if result is None:  # not rank 0: its part ended with training
            return {}
        history = result.history
        other = history.seconds - history.step_seconds
        console.print(f"Trained {history.completed} steps in {history.seconds:.0f} s: {history.step_seconds:.0f} s of steps "
                      f"({history.tokens / max(history.step_seconds, 1e-9):.0f} tokens/s)"
                      + (f", {other:.0f} s of evaluation and checkpoints" if other >= 1 else "")
                      + f"; saved {result.saved.relative_to(out_dir)}/")
        overfit = _save_training(out_dir, result)

        stage("Evaluation (fine-tuned)")
        sections = {}
        for name, d in datas.items():
            # Free decoding always; constrained too where it is the production setting (eval.decoding).
            kinds = ["free"] + (["constrained"] if cfg.eval.decoding == "constrained" and evaluators[name].closed else [])
            for kind in kinds:
                evaluated = evaluators[name].run(result.model, d.encoded["test"], variant_name("fine_tuned", kind), kind=kind)
                variants[name][variant_name("fine_tuned", kind)] = evaluated.metrics
                predictions += [{**p, "task": name} if cfg.tasks else p for p in evaluated.predictions]
            tuned = variants[name]["fine_tuned"]
            sections[name] = {"task": configs[name].template.preset, "headline": d.template.task.headline,
                              "columns": list(d.template.task.columns), "variants": variants[name],
                              "best_prompting": best_prompting(variants[name], d.template.task.headline),
                              "curve": curves.get(name, {}),
                              "labels": d.splits.labels, "n_test": len(d.encoded["test"]),
                              # why the score may not be a result: a single label, test rows also in train
                              "trivial": d.preflight.facts.get("trivial", []),
                              "contamination": d.preflight.facts.get("contamination")}
            tracker.log_metrics({f"test/{name + '/' if cfg.tasks else ''}{k}": v for k, v in tuned.items()
                                 if isinstance(v, float)}, history.completed)
        train_facts = {"method": cfg.method.name, "steps": history.completed, "planned_steps": history.steps,
                       "trainable_share": round(history.trainable / max(history.parameters, 1), 5),
                       "seconds": round(history.seconds, 1), "step_seconds": round(history.step_seconds, 3),
                       "tokens": history.tokens, "best_step": history.best_step,
                       "stopped_early": history.stopped_early, "processes": distributed.world().size,
                       "final_val_loss": history.val_loss[-1]["loss"] if history.val_loss else None,
                       "retention": result.retention}
        metrics = ({"tasks": sections, "mixing": cfg.mixing.model_dump(), "train": train_facts} if cfg.tasks
                   else {**next(iter(sections.values())), "train": train_facts})
        write_predictions(out_dir / "predictions.jsonl", predictions)
        write_json(out_dir / "metrics.json", metrics)
        first = next(iter(datas.values()))
        facts = {"task": ", ".join(f"{n} ({c.template.preset})" for n, c in configs.items()) if cfg.tasks else cfg.template.preset,
                 "model": loaded.source, "method": cfg.method.name,
                 "data": ", ".join(d.splits.sources["train"] for d in datas.values()),
                 "train / validation": f"{len(train_set)} / {sum(map(len, validation.values()))}" + ("" if cfg.tasks else f" / test {len(first.encoded['test'])}"),
                 "training": f"{history.completed} steps, lr {cfg.lr:g}, {history.seconds:.0f} s on {device}" + (
                     f", {distributed.world().size} processes ({distributed.world().mode})"
                     if distributed.world().active else ""),
                 "prompting": f"greedy; {', '.join(cfg.eval.prompting)}; k-shot curve k={cfg.eval.few_shot_k}, "
                              f"{cfg.eval.demos} demonstrations from the training split"}
        for name, section in sections.items():
            plot_curve(out_dir / curve_file(name, bool(cfg.tasks)), section["curve"],
                       section["variants"]["fine_tuned"].get(section["headline"]))
        write_report(out_dir / "report.md", f"tailorlm run: {cfg.output.name}", facts, sections,
                     training_lines(history, overfit, result.retention, result.example_losses, cfg.eval.select.metric))
        tracker.log_artifacts([out_dir / n for n in ("report.md", "metrics.json", "loss_curve.png", "train_log.json")])
    console.print()
    for name, section in sections.items():
        print_table(section["variants"], section["n_test"], tuple(section["columns"]), name if cfg.tasks else None,
                    section["trivial"], section["contamination"], section["curve"])
    return metrics


def _save_training(out_dir: Path, result) -> int | None:
    """train_log.json, example_losses.jsonl and the curves; returns the step where overfitting began, if any."""
    history = result.history
    overfit = overfit_step(history.evaluations)
    write_json(out_dir / "train_log.json", {"train_loss": history.train_loss, "val_loss": history.val_loss,
                                            "evaluations": history.evaluations, "events": history.events,
                                            "best_step": history.best_step, "overfit_step": overfit,
                                            "stopped_early": history.stopped_early, "seconds": history.seconds,
                                            "step_seconds": history.step_seconds,
                                            "tokens": history.tokens, "retention": result.retention})
    write_predictions(out_dir / "example_losses.jsonl", result.example_losses)
    plot_training(out_dir / "loss_curve.png", history, overfit)
    return overfit


def _baselines(cfg: RunConfig, out_dir: Path, datas: dict, evaluators: dict, model) -> tuple[dict, list, dict]:
    """Prompting baselines of the base model (every kind, the k-shot curve) and the classic classifier, saved to
    baselines.json so a resumed run does not redo them. Returns (variants, predictions, curves) per task."""
    saved = out_dir / "baselines.json"
    if saved.is_file():
        cached = json.loads(saved.read_text())
        if "curves" in cached:  # written by this version: a run resumed across an upgrade measures them anew
            console.print("Prompting baselines: reusing baselines.json from the interrupted run")
            return cached["variants"], cached["predictions"], cached["curves"]
    variants: dict[str, dict] = {name: {} for name in datas}
    predictions: list[dict] = []
    curves: dict[str, dict] = {}
    if cfg.eval.baselines:
        stage("Prompting baselines (base model)")
    for name, d in datas.items():
        def report(variant: str, metrics: dict, task=name, d=d) -> None:
            console.print(f"{task + ' ' if cfg.tasks else ''}{variant_title(variant, metrics)}: " + ", ".join(
                f"{TITLES.get(c, c)} {format_metric(c, metrics.get(c))}" for c in d.template.task.columns)
                + f" ({metrics['prompt_tokens']:.0f} prompt tokens, {metrics['seconds_per_100']:.1f} s per 100)")
        if not cfg.eval.baselines:  # no baselines at all: the classic classifier is one of them
            continue
        result = run_baselines(model, evaluators[name], d.splits.train, d.encoded["test"], cfg.eval, cfg.train.seed,
                               report)
        variants[name] = result.variants
        curves[name] = result.curve
        predictions += [{**p, "task": name} if cfg.tasks else p for p in result.predictions]
    write_json(saved, {"variants": variants, "predictions": predictions, "curves": curves})
    return variants, predictions, curves


def _training_set(cfg: RunConfig, datas: dict[str, PreparedData]) -> list:
    """The training list: the one task's, or the tasks' mixed per cfg.mixing."""
    if not cfg.tasks:
        return next(iter(datas.values())).encoded["train"]
    trains = [d.encoded["train"] for d in datas.values()]
    shares = mixing_shares([len(t) for t in trains], [t.weight for t in cfg.tasks], cfg.mixing.strategy,
                           cfg.mixing.temperature)
    mixed = mix(trains, shares, cfg.train.seed)
    console.print("mixing (" + cfg.mixing.strategy + "): " +
                  ", ".join(f"{n} {share:.0%} of {len(mixed)}" for n, share in zip(datas, shares)))
    return mixed
