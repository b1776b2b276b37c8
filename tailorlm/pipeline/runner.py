"""`tailor run`: the stages in the user's order, around one run directory.

Everything that can fail on bad input (config, files, columns, templates) is checked before the output
directory is created, and the directory is only marked complete (run.json status) when everything is written.

Under torchrun every process runs this: all prepare the data and train together; rank 0 alone writes the run
directory, runs the prompting baselines and the final evaluation (train/distributed.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping

from tailorlm.config import RunConfig
from tailorlm.data.preflight import enforce
from tailorlm.eval.results import Results, TaskResults
from tailorlm.errors import DiskFullError, is_disk_full
from tailorlm.models.loading import LoadedModel, resolve_device
from tailorlm.models.methods import check_supported
from tailorlm.pipeline import stages
from tailorlm.pipeline.prepare import Prepared, prepare, save_data_report
from tailorlm.rundir import Manifest, RunDir, TaskManifest
from tailorlm.train import distributed
from tailorlm.train.fit import Fit
from tailorlm.train.loop import seed_everything
from tailorlm.track.tracker import Tracker
from tailorlm.ui import console

MANIFEST_EXAMPLES = 20  # test examples kept in manifest.json: export checks render a few that fit


@dataclass
class Outcome:
    """What run() produced: the metrics, the run directory, and (in this process) the trained model."""
    metrics: dict
    run_dir: RunDir
    prepared: Prepared | None = None
    fit: Fit | None = None  # None for a resumed run that was already complete, and on other torchrun ranks
    base_source: str | None = None
    results: stages.Results | None = None  # the test figures, typed (metrics.json is their JSON)


def run(cfg: RunConfig, out_dir: Path | None = None, resume: bool = False, observe=None) -> dict:
    """The whole run; returns metrics.json's content. resume=True continues out_dir from its latest complete
    checkpoint (same config). observe(metrics, step), when given, sees every logged metric as training goes
    ('train/loss', 'val/val_loss', 'val/classification/accuracy', ...), e.g. for a sweep to prune a trial; an exception it
    raises stops the run."""
    return run_stages(cfg, out_dir, resume, observe).metrics


def run_stages(cfg: RunConfig, out_dir: Path | None = None, resume: bool = False, observe=None,
               given: Mapping[str, object] | None = None, model: LoadedModel | None = None) -> Outcome:
    """run(), keeping what a Python caller wants back. `given` holds in-memory data (`memory:NAME` sources);
    `model` is an already loaded base model with its tokenizer (its source names it in reports)."""
    started = time.perf_counter()
    world, device = distributed.init(cfg.train.distributed, resolve_device(cfg.train.device))
    try:
        run_dir = RunDir(distributed.from_main(out_dir or RunDir.for_config(cfg).path))  # one name for all ranks
        run_dir.check_output(cfg.output.overwrite, resume)
        if resume and run_dir.status() == "complete" and (run_dir / "metrics.json").is_file():
            # Redoing the final steps would overwrite its results and timings with a second, partial run's.
            console.print(f"{run_dir.path} is a complete run (run.json); nothing to resume. Its results are in "
                          f"{run_dir.path}/report.md; start a new run to train again.", soft_wrap=True)
            return Outcome(run_dir.metrics(), run_dir)
        check_supported(cfg.method, device)
        distributed.check_method(cfg.method.name)
        n_params = sum(p.numel() for p in model.model.parameters()) if model else None
        prepared = prepare(cfg, given, model.tokenizer if model else None, n_params)
        for task in prepared.tasks.values():
            enforce(task.preflight)  # thresholds set to error stop here, before anything is written
        if not world.main:
            _train_and_evaluate(prepared, run_dir, resume, device, observe, model)
            return Outcome({}, run_dir, prepared)
        return _owned(prepared, run_dir, resume, device, observe, model, started)
    finally:
        distributed.shutdown()


def _owned(prepared: Prepared, run_dir: RunDir, resume: bool, device, observe, model, started: float) -> Outcome:
    """Rank 0: the stages inside a locked run directory whose run.json says how it went."""
    cfg = prepared.cfg
    lock = run_dir.open(cfg.output.overwrite, resume)
    try:
        if not resume:
            run_dir.write_config(cfg)
            for name, task in prepared.tasks.items():
                save_data_report(run_dir.task_folder(name), task)
        # milliseconds: runs started within one second still list in the order they started
        status = {"status": "running", "started": datetime.now().isoformat(timespec="milliseconds"),
                  "pid": os.getpid()}
        run_dir.set_state(status)
        try:
            outcome = _train_and_evaluate(prepared, run_dir, resume, device, observe, model)
        except KeyboardInterrupt:  # Ctrl-C, or the studio's Stop: resumable, not failed
            run_dir.set_state({**status, "status": "interrupted"})
            raise
        except BaseException as e:
            error = _mark_failed(run_dir, status, e)
            if error is e:
                raise
            raise error from e
        run_dir.set_state({**status, "status": "complete", "seconds": round(time.perf_counter() - started, 1)})
    finally:
        lock.release()
    console.print(f"\n[bold]Run complete in {time.perf_counter() - started:.0f} s.[/] Results in {run_dir.path}/ "
                  f"(report.md, metrics.json, predictions.jsonl)")
    return outcome


def _mark_failed(run_dir: RunDir, status: dict, error: BaseException) -> BaseException:
    """Mark run.json failed with the error's message; returns the error to raise. A full disk, wherever in the
    run it struck (a checkpoint, a report, the tracker), becomes a DiskFullError that says how to go on. A file
    as small as run.json often still fits once the failed write has removed its partial files; when it does
    not, the message says that run.json still says running."""
    if not is_disk_full(error):
        try:
            run_dir.set_state({**status, "status": "failed", "error": str(error) or type(error).__name__})
        except DiskFullError as e:
            console.print(f"{e}; run.json still says running", style="yellow", markup=False, soft_wrap=True)
        return error
    first = _first_disk_full(error)
    target = first.target if isinstance(first, DiskFullError) else (getattr(first, "filename", None) or run_dir.path)
    then = f", then continue the run with `tailor run --resume {run_dir.path}`"
    full = DiskFullError(target, run_dir.path, error, then)
    try:
        run_dir.set_state({**status, "status": "failed", "error": str(full)})
    except DiskFullError:
        full = DiskFullError(target, run_dir.path, error, then + " (run.json could not be marked failed either, "
                                                                 "for want of space: it still says running)")
    return full


def _first_disk_full(error: BaseException) -> BaseException:
    """The write that first ran out of space: on a full disk, what runs while the failure unwinds (closing the
    tracker writes tracking.json) fails too, and its error would hide the one that named the real cause."""
    found, seen, current = error, set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if is_disk_full(current) and (isinstance(current, DiskFullError) or not isinstance(found, DiskFullError)):
            found = current
        current = current.__context__
    return found


def _train_and_evaluate(prepared: Prepared, run_dir: RunDir, resume: bool, device, observe: Callable | None,
                        model: LoadedModel | None) -> Outcome:
    main = distributed.world().main
    cfg = prepared.cfg
    seed_everything(cfg.train.seed)
    loaded = model or stages.load_base(prepared, device)
    scorers = stages.evaluators(prepared, device)
    # Rank 0 alone runs the baselines (the others wait for it at the first collective of training).
    testing = main and cfg.eval.test
    found = _baselines(prepared, run_dir, loaded.model, scorers) if testing else stages.Baselines()
    with Tracker.open(run_dir.path, cfg, enabled=main) as tracker:  # closed as failed if anything below raises
        tracker.log_params({"lr": cfg.lr, "train_samples": len(prepared.training_set)})  # the resolved values

        def log(metrics: dict, step: int) -> None:
            tracker.log_metrics(metrics, step)
            if observe:
                observe(metrics, step)

        result = stages.train(prepared, loaded.model, run_dir, device, scorers, resume, log)
        if result is None:  # not rank 0: its part ended with training
            return Outcome({}, run_dir, prepared)
        results = stages.evaluate(prepared, result.model, scorers, found) if testing else stages.Results({}, [])
        for name, task in results.tasks.items():
            tracker.log_metrics({f"test/{name}/{k}": v for k, v in task.variants["fine_tuned"].items()
                                 if isinstance(v, float)}, result.history.completed)
        metrics = stages.metrics_json(prepared, results, result)
        run_dir.write_rows("predictions.jsonl", found.predictions + results.predictions)
        run_dir.write("metrics.json", metrics)
        run_dir.write_manifest(manifest(prepared, result, run_dir, results))
        stages.report(prepared, run_dir, results, result, loaded.source, device)
        tracker.log_artifacts([run_dir / n for n in ("report.md", "metrics.json", "loss_curve.png", "train_log.json")])
    return Outcome(metrics, run_dir, prepared, result, loaded.source, results)


def manifest(prepared: Prepared, result: Fit, run_dir: RunDir, results: Results) -> Manifest:
    """What predict, serve, chat and export need later, so they never re-read reports or the data files."""
    tasks = {name: TaskManifest(t.cfg.template.preset, list(t.labels), t.cfg.template.model_dump(mode="json"),
                                "chat template" if t.fmt.uses_chat else "plain",
                                [{k: v for k, v in ex.items() if not k.startswith("_")}
                                 for ex in t.splits.test[:MANIFEST_EXAMPLES]],
                                answer_decoding(t.cfg.eval.decoding, results.tasks.get(name)))
             for name, t in prepared.tasks.items()}
    return Manifest(prepared.cfg.model.path, prepared.cfg.method.name, result.saved.name, tasks)


def answer_decoding(setting: str, task: TaskResults | None) -> str | None:
    """free or constrained: how the fine-tuned model answers after the run (eval.decoding; under auto, what
    validation chose). Free where the task has no constrained decoding; None when the test split was not scored
    (eval.test=false), which leaves it to eval.decoding."""
    if task is None:
        return None
    if "fine_tuned_constrained" not in task.variants:
        return "free"
    return "constrained" if setting == "constrained" or task.chosen == "fine_tuned_constrained" else "free"


def _baselines(prepared: Prepared, run_dir: RunDir, model, scorers) -> stages.Baselines:
    """The baselines stage, saved to baselines.json so a resumed run does not redo them."""
    cached = run_dir.read("baselines.json")
    # written by this version, asking in the same formats: a run resumed across an upgrade measures them anew
    if "curves" in cached and cached.get("asked", {}) == stages.asked_formats(prepared):
        console.print("Prompting baselines: reusing baselines.json from the interrupted run")
        return stages.Baselines(cached["variants"], cached["predictions"], cached["curves"], cached.get("asked", {}))
    found = stages.baselines(prepared, model, scorers)
    run_dir.write("baselines.json", found.to_json())
    return found
