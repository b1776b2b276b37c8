"""One trial: the base config plus the trial's overrides, run by the pipeline like `tailor run`, reported to
Optuna at each evaluation (so a poor trial is pruned early) and scored on the validation split at the end."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import optuna

from tailorlm.config import RunConfig, load_config
from tailorlm.data.templates import PromptTemplate
from tailorlm.errors import ConfigError, TailorError
from tailorlm.eval.during_training import metric_key, metric_names, resolve_metric
from tailorlm.pipeline import run, task_configs
from tailorlm.rundir import RunDir
from tailorlm.sweep.space import SweepSpec, overrides, resolve
from tailorlm.train.selection import lower_is_better
from tailorlm.ui import console, stage


def choose_metric(space: SweepSpec, cfg: RunConfig) -> tuple[str, str]:
    """(metric, direction): the space's, else eval.select.metric when the config sets it, else the task's headline
    on generated validation text; checked against what training actually measures."""
    templates = {name: PromptTemplate(c.template) for name, c in task_configs(cfg).items()}
    metric = space.metric
    if metric is None:
        # A task's headline is the natural target when there is one task to take it from; with several, no
        # one headline speaks for the run, so eval.select.metric (val_loss unless set) does.
        if "metric" in cfg.eval.select.model_fields_set or len(templates) > 1 or not cfg.eval.during_training:
            metric = cfg.eval.select.metric
        else:
            name, template = next(iter(templates.items()))
            metric = metric_key(name, template.task.headline)
    allowed = metric_names(cfg, templates)
    resolved = resolve_metric(metric, allowed)
    if resolved is None:
        hint = "" if cfg.eval.during_training else " (eval.during_training=0 turns generated-text metrics off)"
        raise ConfigError("sweep", [(f"metric: '{metric}' is not measured on the validation split during training"
                                    f"{hint}; choose one of: {', '.join(allowed)}")])
    metric = resolved
    direction = space.direction or ("minimize" if lower_is_better(metric) else "maximize")
    return metric, direction


class TrialRun:
    """The objective Optuna calls once per trial; returns the trial's validation metric."""

    def __init__(self, config_path: str, base: RunConfig, space: SweepSpec, metric: str, sweep_dir: Path, sampler_for):
        self.config_path, self.base, self.space, self.metric = config_path, base, space, metric
        self.sweep_dir, self.sampler_for = sweep_dir, sampler_for

    def __call__(self, trial: optuna.Trial) -> float:
        # Who runs the trial, so a later worker can tell a trial whose process died from one still running.
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        # A sampler seeded by the trial number: workers sharing the study, and a resumed sweep, never draw the
        # same random start twice, and a one-worker sweep is reproducible. (Independent sampling happens at
        # suggest time, below, so the fresh sampler is the one that draws.)
        trial.study.sampler = self.sampler_for(trial.number)
        values = resolve({key: p.suggest(trial, key) for key, p in self.space.params.items()}, self.base)
        out_dir = self.sweep_dir / f"trial-{trial.number}"
        trial.set_user_attr("overrides", overrides(values))
        trial.set_user_attr("run_dir", str(out_dir))
        stage(f"Sweep trial {trial.number}: " + " ".join(overrides(values)))

        try:
            # remote code only when the sweep's own command allowed it (the base config then carries it)
            cfg = load_config(self.config_path, overrides(values), trust_remote_code=self.base.model.trust_remote_code)
            run(cfg, out_dir, observe=self._reporter(trial))
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Exception as e:
            trial.set_user_attr("error", str(e) or type(e).__name__)
            if isinstance(e, TailorError):
                console.print(f"[bold red]trial {trial.number} failed:[/] {e}")
            raise
        value, step = validation_value(out_dir / "train_log.json", self.metric)
        trial.set_user_attr("step", step)
        return value

    def _reporter(self, trial: optuna.Trial):
        key = f"val/{self.metric}"

        def observe(metrics: dict, step: int) -> None:
            # Step 0 is the base model before any training: the same for every trial, so it says nothing.
            if key not in metrics or step == 0:
                return
            trial.report(metrics[key], step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"trial {trial.number} pruned at step {step}: {self.metric} "
                                         f"{metrics[key]:.4g} trails the other trials")
        return observe


def validation_value(train_log: Path, metric: str) -> tuple[float, int]:
    """The metric on the validation split at the step the run kept (its best checkpoint under eval.select, else
    its last evaluation): the model the trial delivers.

    Selection must never read the test split (metrics.json's 'fine_tuned' variant): picking hyperparameters by
    test score tunes them to the test set, and the test score of the winner would no longer be an honest
    estimate. The test split stays untouched until the user runs best.yaml."""
    log = RunDir(train_log.parent).read(train_log.name)
    evaluations = [e for e in log.get("evaluations", []) if e.get("step", 0) > 0 and metric in e]
    if not evaluations:
        raise TailorError(f"{train_log}: no evaluation measured {metric} after training started; the sweep needs a "
                          f"validation split and train.eval_every (or the end-of-run evaluation)")
    best = [e for e in evaluations if e["step"] == log.get("best_step")]
    chosen = (best or evaluations)[-1]
    value = float(chosen[metric])
    if not math.isfinite(value):
        raise TailorError(f"{train_log}: {metric} is {value} at step {chosen['step']}")
    return value, chosen["step"]
