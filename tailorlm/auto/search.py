"""The search of `tailor auto`: successive halving over (model, recipe) configs, within a wall-clock budget,
chosen on the validation split alone.

Every trial is a `tailor run` of the user's config with the trial's model, recipe and length, with
eval.test=false: it never reads the test split, and no prompting baseline runs. Its score is the task's
headline metric on generated validation answers at the checkpoint it kept (sweep/objective.py's
validation_value, the rule `tailor sweep` uses).

The trials live in an Optuna study (SQLite in the auto folder), one record per (config, rung): run the same
command again and the trials already finished are read back, not trained again; a trial whose process died is
marked failed (the sweep's rule) and trained anew. Time already spent counts against the budget on resume.

The budget covers the trials and the final test evaluation. Before each trial the time left is checked
against the trial's estimate (the cost model's at first, then what the trials measured, per model and
method); during one, training stops at the first logged step past the deadline. So auto ends within one
training step and one evaluation of its budget, give or take the estimate of the final evaluation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tailorlm.auto.plan import ETA, Config, Plan, Rates, evaluations, make_plan, next_rung, plan_cost, survivors
from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError
from tailorlm.pipeline import run
from tailorlm.rundir import RunDir
from tailorlm.sweep.space import overrides as as_overrides
from tailorlm.sweep.study import fail_interrupted, study_lock
from tailorlm.sweep.objective import validation_value
from tailorlm.ui import console, stage


class BudgetSpent(Exception):
    """Raised inside a trial when the deadline has passed; the trial ends where it is."""


@dataclass
class Trial:
    key: str  # the config's key (model | recipe)
    rung: int
    steps: int
    state: str  # complete, stopped (budget), failed, skipped (budget)
    value: float | None = None
    seconds: float = 0.0  # wall-clock, load to report
    train_seconds: float = 0.0  # optimizer steps alone
    loop_seconds: float = 0.0  # the training loop: steps and evaluations
    trained: int = 0  # steps trained (fewer than `steps` when the budget stopped it)
    tokens: int = 0
    step: int | None = None  # the checkpoint it kept
    run_dir: str | None = None
    number: int | None = None  # the study's trial number
    note: str = ""


@dataclass
class Search:
    """What the search found: every trial, the plan it followed, and the winner."""
    metric: str
    plan: Plan
    trials: list[Trial] = field(default_factory=list)
    winner: Trial | None = None
    spent: float = 0.0  # seconds of trials, this run and earlier ones of the same study

    def best_of_rung(self, rung: int) -> list[Trial]:
        done = [t for t in self.trials if t.rung == rung and t.state == "complete"]
        return sorted(done, key=lambda t: -t.value)


class TrialRunner:
    """Runs one trial of a config at a rung, or reads it back from the study when it already ran."""

    def __init__(self, config_path: str | None, cli_overrides: list[str], base: RunConfig, study: optuna.Study,
                 url: str, out_dir: Path, metric: str, answers: int, deadline: float):
        self.config_path, self.cli_overrides, self.base = config_path, cli_overrides, base
        self.study, self.url, self.out_dir, self.metric = study, url, out_dir, metric
        self.answers, self.deadline = answers, deadline
        self.max_seconds: float | None = None  # the trial's training-loop time limit (search sets it)

    def trial_overrides(self, config: Config, steps: int, rung: int, fixed: dict) -> list[str]:
        values: dict[str, object] = {"model.path": config.candidate.path, **config.recipe.overrides(),
                                     "train.max_steps": steps,
                                     # one evaluation at the end of the first rung; longer trials pick a checkpoint
                                     "train.eval_every": 0 if rung == 0 else max(1, steps // 2),
                                     "eval.test": False, "eval.select.metric": self.metric,
                                     "eval.retention.data": None, "eval.during_training": self.answers,
                                     "train.max_seconds": self.max_seconds}
        values = {k: v for k, v in values.items() if (k not in fixed or k in ("eval.test", "train.max_steps"))
                  and not (k == "train.max_seconds" and v is None)}
        return self.cli_overrides + as_overrides(values)

    def recorded(self, key: str, rung: int) -> optuna.trial.FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("key") == key and t.user_attrs.get("rung") == rung:
                return t
        return None

    def __call__(self, config: Config, steps: int, rung: int, fixed: dict) -> Trial:
        with study_lock(self.url, self.study.study_name):
            found = self.recorded(config.key, rung)
            if found is None:
                trial = self.study.ask()
                for k, v in {"key": config.key, "rung": rung, "steps": steps, "model": config.candidate.name,
                             "recipe": config.recipe.label(), "pid": _pid(), "host": _host()}.items():
                    trial.set_user_attr(k, v)
        if found is not None:
            return _from_record(found)
        out = self.out_dir / "trials" / f"trial-{trial.number}"
        trial.set_user_attr("run_dir", str(out))
        stage(f"Trial {trial.number}: {config.key}, {steps} steps (rung {rung + 1})")
        started = time.monotonic()
        result = Trial(config.key, rung, steps, "complete", run_dir=str(out), number=trial.number)
        last: dict = {}

        def observe(metrics: dict, step: int) -> None:
            if f"val/{self.metric}" in metrics:
                last.update(value=metrics[f"val/{self.metric}"], step=step)
            if time.monotonic() > self.deadline:
                raise BudgetSpent(f"the budget ran out at step {step}")

        try:
            cfg = load_config(self.config_path, self.trial_overrides(config, steps, rung, fixed),
                              trust_remote_code=self.base.model.trust_remote_code)
            run(cfg, out, observe=observe)
            result.value, result.step = validation_value(out / "train_log.json", self.metric)
            log = RunDir(out).read("train_log.json")
            timed_out = [e["event"] for e in log.get("events", []) if e["event"].startswith("time limit")]
            result.note = f"the budget: {timed_out[0].removeprefix('time limit: ')}" if timed_out else ""
            result.train_seconds, result.tokens = float(log.get("step_seconds", 0)), int(log.get("tokens", 0))
            result.loop_seconds = float(log.get("seconds", 0))
            result.trained = log["train_loss"][-1]["step"] if log.get("train_loss") else 0
        except BudgetSpent as e:
            result.state, result.note = "stopped", str(e)
            result.value, result.step = last.get("value"), last.get("step")
        except TailorError as e:
            result.state, result.note = "failed", str(e)
            console.print(f"[bold red]trial {trial.number} failed:[/] {e}")
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        result.seconds = time.monotonic() - started
        for k, v in {"seconds": result.seconds, "train_seconds": result.train_seconds, "tokens": result.tokens,
                     "loop_seconds": result.loop_seconds, "trained": result.trained,
                     "step": result.step, "note": result.note, "outcome": result.state}.items():
            trial.set_user_attr(k, v)
        if result.state == "complete":
            self.study.tell(trial, result.value)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        return result


def _from_record(t: optuna.trial.FrozenTrial) -> Trial:
    a = t.user_attrs
    return Trial(a["key"], a["rung"], a["steps"], "complete" if t.state == TrialState.COMPLETE else "running",
                 t.value, a.get("seconds", 0.0), a.get("train_seconds", 0.0), a.get("loop_seconds", 0.0),
                 a.get("trained", 0), a.get("tokens", 0), a.get("step"), a.get("run_dir"), t.number,
                 "from an earlier run of this search")


def _pid() -> int:
    import os
    return os.getpid()


def _host() -> str:
    import socket
    return socket.gethostname()


def measure(rates: Rates, config: Config, trial: Trial, evaluations: int) -> None:
    """Replace the estimates with what the trial measured: seconds per step, to start, and per answer."""
    if trial.state != "complete" or trial.trained <= 0 or trial.train_seconds <= 0:
        return
    name = config.candidate.name
    rates.step[(name, config.recipe.method)] = trial.train_seconds / trial.trained
    rates.load[name] = max(trial.seconds - trial.loop_seconds, 0.0)
    if rates.answers:
        rates.per_answer[name] = max(trial.loop_seconds - trial.train_seconds, 0.0) / (evaluations * rates.answers)


def search(configs: list[Config], top: int, rates: Rates, runner: TrialRunner, reserve, spent: float,
           budget: float, fixed: dict, metric: str) -> Search:
    """Successive halving within what is left of the budget; `reserve()` is the time the final evaluation
    needs, re-estimated as trials measure the machine."""
    started = time.monotonic() - spent
    left = lambda: budget - (time.monotonic() - started)  # noqa: E731
    plan = make_plan(configs, top, rates, left() - reserve())
    for key, why in plan.dropped:
        console.print(f"[yellow]not tried: {key} ({why})[/]")
    found = Search(metric, plan)
    entries = plan.configs
    counts = survivors(len(plan.configs), len(plan.rungs))
    rung = 0
    while rung < len(plan.rungs):
        steps, count = plan.rungs[rung], counts[rung]
        if rung:
            ranked = {t.key: t for t in found.best_of_rung(rung - 1)}
            entries = [c for c in sorted(entries, key=lambda c: -ranked[c.key].value if c.key in ranked else 1)
                       if c.key in ranked][:count]
        for config in _each(lambda: entries if rung else plan.configs):
            need = rates.trial(config, steps, evaluations(rung))
            if left() - reserve() < need:
                found.trials.append(Trial(config.key, rung, steps, "skipped", note=f"the budget: needs about "
                                          f"{need:.0f} s, {max(left() - reserve(), 0):.0f} s left"))
                continue
            runner.deadline = time.monotonic() + left() - reserve()  # the final evaluation keeps its share
            # training itself stops in time for the trial's start and its last evaluation to fit as well
            runner.max_seconds = max(left() - reserve() - need + steps * rates.step[
                (config.candidate.name, config.recipe.method)], 1.0)
            trial = runner(config, steps, rung, fixed)
            found.trials.append(trial)
            measure(rates, config, trial, evaluations(rung))
            if rung == 0:  # measured rates may fit more of the configs the first plan left out
                widen(plan, configs, rates, left() - reserve(), done=len(found.trials))
                entries = plan.configs
                counts[:] = survivors(len(plan.configs), len(plan.rungs))
        if not found.best_of_rung(rung):
            break
        # The plan was cut short of the full length by estimates made before any trial ran: with what the
        # trials measured, the best third may still fit one rung longer.
        longer = next_rung(plan, top) if rung == len(plan.rungs) - 1 else None
        survivors_next = max(1, math.ceil(len(found.best_of_rung(rung)) / ETA))
        if longer and sum(rates.trial(t_config, longer, evaluations(rung + 1)) for t_config in
                          _top(entries, found, rung, survivors_next)) <= left() - reserve():
            plan.rungs.append(longer)
            counts.append(survivors_next)
        rung += 1
    found.spent = time.monotonic() - started
    for rung in reversed(range(len(plan.rungs))):
        best = found.best_of_rung(rung)
        if best:
            found.winner = best[0]
            break
    return found


def _each(current):
    """The items of a list that may grow while it is walked (the first rung, as measured rates widen it)."""
    i = 0
    while i < len(current()):
        yield current()[i]
        i += 1


def widen(plan: Plan, configs: list[Config], rates: Rates, seconds: float, done: int) -> None:
    """Take more of `configs` into the plan while the rest of it, at the measured rates, fits `seconds`
    (the first `done` trials of the first rung have run)."""
    first = plan.rungs[0]
    for n in range(len(configs), len(plan.configs), -1):
        rest = plan_cost(configs[:n], plan.rungs, rates) - sum(rates.trial(c, first) for c in configs[:done])
        if rest <= seconds:
            plan.configs = configs[:n]
            plan.dropped = [(c.key, "the budget: it did not fit beside the configs before it") for c in configs[n:]]
            return


def _top(entries: list[Config], found: Search, rung: int, n: int) -> list[Config]:
    ranked = [t.key for t in found.best_of_rung(rung)][:n]
    return [c for c in entries if c.key in ranked]


def open_auto_study(url: str, name: str, metric: str) -> optuna.Study:
    """The study of one auto folder: created, or loaded to resume; a study kept for another metric is refused."""
    optuna.logging.disable_default_handler()
    from tailorlm.sweep.study import open_study
    from tailorlm.sweep.space import SweepSpec

    study = open_study(url, name, SweepSpec(params={"train.lr": 1.0}), metric, "maximize")
    fail_interrupted(study)
    return study
