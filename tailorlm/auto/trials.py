"""One trial of `tailor auto`: a `tailor run` of the user's config with the trial's model, recipe and length,
recorded in the search's Optuna study, or read back from it when it already ran.

A trial runs with eval.test=false (it never reads the test split, and no prompting baseline runs), without
the training set's per-example losses (on a short trial they cost as much as its steps), and with one
evaluation, at its end: rungs train from scratch to their own length, so the last step is what halving
compares. A trial of the ladder's top length is the model the user gets, and no rung follows it: it evaluates
at each third of its length and keeps its best checkpoint, as `tailor run` does (plan.Rates.evaluations), where
a difference of one validation answer is a tie that the validation loss breaks (train/selection.py). Its
score is the task's headline metric on generated validation answers (the rule `tailor sweep` uses,
sweep/objective.py's validation_value).

Records are matched on the config's key and the trial's length. A trial that the budget cut short (its
training loop stopped at train.max_seconds, or the deadline struck) is kept in the study as failed: it is
not comparable with trials that trained their full length, and a later run with more time trains it again.
"""
from __future__ import annotations

import gc
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tailorlm.auto.plan import Config
from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError
from tailorlm.eval.report import SCALE_100
from tailorlm.pipeline import run
from tailorlm.rundir import RunDir
from tailorlm.sweep.objective import validation_value
from tailorlm.sweep.space import overrides as as_overrides
from tailorlm.sweep.study import study_lock
from tailorlm.ui import console, stage

READ_BACK = "read back from the study (an earlier run, or another worker)"


class BudgetSpent(Exception):
    """Raised inside a trial when the deadline has passed; the trial ends where it is."""


@dataclass
class Trial:
    key: str  # the config's key (model | recipe)
    rung: int
    steps: int  # planned
    state: str  # complete; stopped (the budget cut it short); failed; skipped (did not fit); running (elsewhere)
    value: float | None = None
    seconds: float = 0.0  # wall-clock, load to report
    train_seconds: float = 0.0  # optimizer steps alone
    loop_seconds: float = 0.0  # the training loop: steps and evaluations
    trained: int = 0  # steps trained
    tokens: int = 0
    step: int | None = None  # the checkpoint it kept
    run_dir: str | None = None
    number: int | None = None  # the study's trial number
    note: str = ""
    host: str | None = None  # the worker that trained it (its folder is on that machine)
    pid: int | None = None
    val_loss: float | None = None  # at the kept step: breaks ties of the metric (rank)

    @property
    def rank(self) -> tuple[float, float]:
        """Sorts best first: the metric, then, among ties, the validation loss; a trial without either after.
        A small validation split ties often (40 answers: the default job's two 0.825s); the loss on its gold
        answers ranks those by how surely the model gives them."""
        return (-self.value if self.value is not None else math.inf,
                self.val_loss if self.val_loss is not None else math.inf)


class TrialRunner:
    """Runs a config for a number of steps, or reads the trial back from the study when it already ran."""

    def __init__(self, config_path: str | None, cli_overrides: list[str], base: RunConfig, study: optuna.Study,
                 url: str, out_dir: Path, metric: str, answers: int):
        self.config_path, self.cli_overrides, self.base = config_path, cli_overrides, base
        self.study, self.url, self.out_dir, self.metric, self.answers = study, url, out_dir.resolve(), metric, answers
        self.deadline = float("inf")  # time.monotonic() past which a trial stops (search sets it)
        self.max_seconds: float | None = None  # the trial's training-loop limit, when the budget is near

    def trial_overrides(self, config: Config, steps: int, fixed: dict, evaluations: int = 1) -> list[str]:
        values: dict[str, object] = {"model.path": config.candidate.path, **config.recipe.overrides(),
                                     "train.max_steps": steps, "train.eval_every": 0, "eval.test": False,
                                     "eval.select.metric": self.metric, "eval.retention.data": None,
                                     "eval.during_training": self.answers, "eval.example_losses": False}
        if evaluations > 1:  # a top-length trial: its checkpoints differing by one validation answer tie
            values.update({"train.eval_every": math.ceil(steps / evaluations), "train.eval_at_start": False,
                           "eval.select.min_delta": round(self._one_answer(), 6)})
        values = {k: v for k, v in values.items() if k not in fixed or k in ("eval.test", "train.max_steps")}
        if self.max_seconds is not None:
            values["train.max_seconds"] = round(self.max_seconds, 1)
        return self.cli_overrides + as_overrides(values)

    def _one_answer(self) -> float:
        """What one validation answer moves the metric by, about: 1/answers of its range."""
        scale = 100.0 if self.metric.rsplit("/", 1)[-1] in SCALE_100 else 1.0
        return scale / max(self.answers, 1)

    def lookup(self, config: Config, steps: int) -> Trial | None:
        """The study's record of this config at this length: finished, or running in another live worker."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("key") == config.key and t.user_attrs.get("steps") == steps:
                return read_back(t)
        return None

    def __call__(self, config: Config, steps: int, rung: int, fixed: dict, evaluations: int = 1) -> Trial:
        """The trial, or its record; `evaluations` > 1 spreads that many over its length and keeps the best
        (the plan's Rates.evaluations decides, and prices them)."""
        with study_lock(self.url, self.study.study_name):
            found = self.lookup(config, steps)
            if found is None:
                trial = self.study.ask()
                for k, v in {"key": config.key, "rung": rung, "steps": steps, "model": config.candidate.name,
                             "recipe": config.recipe.label(), "pid": os.getpid(), "host": socket.gethostname()}.items():
                    trial.set_user_attr(k, v)
        if found is not None:
            return found
        out = self.out_dir / f"trial-{trial.number}"  # as a sweep lays them out: tailor runs lists them
        trial.set_user_attr("run_dir", str(out))
        stage(f"Trial {trial.number}: {config.key}, {steps} steps (rung {rung + 1})")
        started = time.monotonic()
        result = Trial(config.key, rung, steps, "complete", run_dir=str(out), number=trial.number,
                       host=socket.gethostname(), pid=os.getpid())

        def observe(metrics: dict, step: int) -> None:
            # Training steps stop at the deadline; an evaluation under way finishes (the one evaluation auto may
            # overrun by), since stopping it would throw away the trial it scores.
            if "train/loss" in metrics and time.monotonic() > self.deadline:
                raise BudgetSpent(f"the budget ran out at step {step}")

        import torch

        try:
            cfg = load_config(self.config_path, self.trial_overrides(config, steps, fixed, evaluations),
                              trust_remote_code=self.base.model.trust_remote_code)
            run(cfg, out, observe=observe)
            self._read_log(result, out)
        except BudgetSpent as e:
            result.state, result.note = "stopped", str(e)
        except (TailorError, torch.cuda.OutOfMemoryError) as e:  # the sweep's rule: record it, go on
            result.state, result.note = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
            console.print(f"[bold red]trial {trial.number} failed:[/] {e}")
        except BaseException:  # Ctrl-C or a bug: its time still counts against the budget on resume
            trial.set_user_attr("seconds", time.monotonic() - started)
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            gc.collect()  # the trial's model goes now, not when the next one is already loading its own
        result.seconds = time.monotonic() - started
        for k, v in {"seconds": result.seconds, "train_seconds": result.train_seconds, "tokens": result.tokens,
                     "loop_seconds": result.loop_seconds, "trained": result.trained, "step": result.step,
                     "note": result.note, "outcome": result.state, "val_loss": result.val_loss}.items():
            trial.set_user_attr(k, v)
        if result.state == "complete":
            self.study.tell(trial, result.value)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        return result

    def _read_log(self, result: Trial, out: Path) -> None:
        log = RunDir(out).read("train_log.json")
        result.train_seconds, result.tokens = float(log.get("step_seconds", 0)), int(log.get("tokens", 0))
        result.loop_seconds = float(log.get("seconds", 0))
        result.trained = log["train_loss"][-1]["step"] if log.get("train_loss") else 0
        result.value, result.step = validation_value(out / "train_log.json", self.metric)
        result.val_loss = next((e.get("val_loss") for e in log.get("evaluations", []) if e.get("step") == result.step),
                               None)
        if result.trained < result.steps:  # train.max_seconds stopped it: not comparable with full-length trials
            result.state = "stopped"
            result.note = f"the budget: stopped at step {result.trained} of {result.steps}"


def read_back(t: optuna.trial.FrozenTrial) -> Trial:
    a = t.user_attrs
    return Trial(a["key"], a["rung"], a["steps"], "complete" if t.state == TrialState.COMPLETE else "running",
                 t.value, a.get("seconds", 0.0), a.get("train_seconds", 0.0), a.get("loop_seconds", 0.0),
                 a.get("trained", 0), a.get("tokens", 0), a.get("step"), a.get("run_dir"), t.number, READ_BACK,
                 a.get("host"), a.get("pid"), a.get("val_loss"))


def recorded_seconds(study: optuna.Study) -> float:
    """Time the study's trials took, in every run of the search so far (an interrupted one's included)."""
    return sum(t.user_attrs.get("seconds", 0.0) for t in study.get_trials(deepcopy=False))
