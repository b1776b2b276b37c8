"""The search of `tailor auto`: successive halving over (model, recipe) configs within a wall-clock budget,
chosen on the validation split alone (each trial: trials.py).

The budget covers the search: the trials, each scored on validation. The final test evaluation follows it
(run.py states its estimate before the search starts). Before each trial the time left is checked against
the trial's estimate (the cost model's at first, then what the trials measured, per model and method). On the
first rung, each measurement re-fits the plan: more configs when the machine is faster than estimated, fewer
(the lowest priors first) when it is slower, so the longer rungs keep their share. After the plan's last
rung, when the measured rates leave room, the best third goes on to the next length of the ladder; when none
fits, the next-best of the rung below train at the last length while they fit. A trial near the deadline gets
train.max_seconds, so its training stops in time for its evaluation; past the deadline, training stops at the
next logged step. So auto ends within one evaluation of its budget.

Trials already in the study (an interrupted run of the same command, or another worker sharing the study) are
read back, cost nothing, and are never trained again. A rung waits for trials another worker is running, and
the winner is chosen once no worker is searching, from all the study's trials (workers.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tailorlm.auto.plan import ETA, Config, Plan, Rates, dropped, make_plan, narrower, next_rung, plan_cost
from tailorlm.auto.trials import Trial, TrialRunner, read_back
from tailorlm.auto.workers import check_in, check_out, wait_for_the_others
from tailorlm.ui import console

WAIT_POLL_S = 5.0  # how often a worker looks whether another worker's trial of this rung has finished


@dataclass
class Search:
    """What the search found: every trial, the plan it followed, and the winner."""
    metric: str
    plan: Plan
    lengths: list[int]  # the ladder of rung lengths
    trials: list[Trial] = field(default_factory=list)
    winner: Trial | None = None
    spent: float = 0.0  # seconds of the search, earlier runs of it included
    full: int = 0  # the full length before the budget fitted the top (plan.fitted_top); 0: the ladder's top
    epoch_steps: float = 0.0  # optimizer steps in one pass over the training rows (0: unknown)

    def best_of_rung(self, rung: int) -> list[Trial]:
        done = [t for t in self.trials if t.rung == rung and t.state == "complete"]
        return sorted(done, key=lambda t: t.rank)  # stable: ties of both keep the priors' order


def measure(rates: Rates, config: Config, trial: Trial) -> None:
    """Replace the estimates with what a finished trial measured: seconds per step, to start, and per answer."""
    if trial.state != "complete" or trial.trained <= 0 or trial.train_seconds <= 0:
        return
    name = config.candidate.name
    rates.step[(name, config.recipe.method)] = trial.train_seconds / trial.trained
    load = max(trial.seconds - trial.loop_seconds, 0.0)
    # a process's first trial also pays its one-time imports and warm-up: it may lower the estimate, not raise it
    rates.load[name] = load if rates.warm else min(load, rates.load[name])
    rates.warm = True
    if rates.answers:
        answered = rates.answers * rates.evaluations(trial.steps)
        rates.per_answer[name] = max(trial.loop_seconds - trial.train_seconds, 0.0) / answered


def refit(plan: Plan, configs: list[Config], rates: Rates, seconds: float, paid: set) -> None:
    """Re-fit the first rung to `seconds` at the measured rates: the most configs (a prefix of the priors, at
    least those already run) whose plan still fits; when none does, the plan loses a rung, a middle one before
    the top (plan.narrower)."""
    ran = max((i + 1 for i, c in enumerate(configs) if (c.key, plan.rungs[0]) in paid), default=1)
    while True:
        for n in range(len(configs), ran - 1, -1):
            if plan_cost(configs[:n], plan.rungs, rates, paid) <= seconds:
                plan.configs, plan.dropped = configs[:n], dropped(configs[n:])
                return
        if len(plan.rungs) == 1:
            plan.configs, plan.dropped = configs[:ran], dropped(configs[ran:])
            return
        plan.rungs[:] = narrower(plan.rungs)


def search(configs: list[Config], lengths: list[int], rates: Rates, runner: TrialRunner, spent: float,
           budget: float, fixed: dict, metric: str) -> Search:
    started = time.monotonic() - spent
    left = lambda: budget - (time.monotonic() - started)  # noqa: E731
    # it ends within one evaluation of the budget: the dearest evaluation (and start) is the allowance
    overrun = max(rates.load.values()) + rates.answers * max(rates.per_answer.values())

    def heartbeat() -> None:  # still searching, and done by then (workers.py); renewed before each trial and wait
        check_in(runner.study, time.time() + max(left(), 0.0) + overrun)

    heartbeat()
    try:
        found = _halve(configs, lengths, rates, runner, left, fixed, metric, heartbeat)
    except BaseException:  # a failed or interrupted search is not one the other workers should wait for
        check_out(runner.study)
        raise
    found.spent = time.monotonic() - started
    wait_for_the_others(runner.study)
    _take_the_study(found, runner, configs)
    found.winner = choose_winner(found.trials)
    if found.winner is None:  # none finished: the best of those the budget cut short (they evaluated as they ended)
        cut = [t for t in found.trials if t.state == "stopped" and t.value is not None]
        found.winner = max(cut, key=lambda t: t.value, default=None)
    return found


def _halve(configs: list[Config], lengths: list[int], rates: Rates, runner: TrialRunner, left, fixed: dict,
           metric: str, heartbeat) -> Search:
    """The plan's rungs, then the time left at the last length (_fill)."""
    paid = {(c.key, steps) for c in configs for steps in lengths if _done(runner.lookup(c, steps))}
    plan = make_plan(configs, lengths, rates, left(), paid)
    for key, why in plan.dropped:
        console.print(f"[yellow]not tried yet: {key} ({why})[/]")
    found = Search(metric, plan, lengths)
    rung, entries = 0, plan.configs
    while rung < len(plan.rungs):
        steps = plan.rungs[rung]
        if rung:
            ranked = [t.key for t in found.best_of_rung(rung - 1)]
            count = max(1, math.ceil(len(ranked) / ETA))
            entries = [next(c for c in configs if c.key == key) for key in ranked[:count]]
        i = 0
        while i < len(plan.configs if rung == 0 else entries):
            config = (plan.configs if rung == 0 else entries)[i]
            i += 1
            heartbeat()
            trial = _run_or_skip(config, steps, rung, rates, runner, left, fixed)
            found.trials.append(trial)
            if trial.state == "skipped" and rung:
                break  # a lower-ranked config must not stand in for a better one that did not fit
            measure(rates, config, trial)
            if trial.state != "skipped":
                paid.add((config.key, steps))
            if rung == 0:
                refit(plan, configs, rates, left(), paid)
        _wait_for_others(found, rung, runner, entries if rung else plan.configs, steps, heartbeat)
        if not found.best_of_rung(rung):
            break
        longer = next_rung(plan, lengths) if rung == len(plan.rungs) - 1 else None
        if longer:  # the best third goes on to the next length, when the measured rates leave room
            best = [next(c for c in configs if c.key == t.key) for t in found.best_of_rung(rung)]
            going_on = best[:max(1, math.ceil(len(best) / ETA))]
            if plan_cost(going_on, [longer], rates, paid) <= left():
                plan.rungs.append(longer)
        rung += 1
    _fill(found, configs, rates, runner, left, fixed, paid, heartbeat)
    return found


def choose_winner(trials: list[Trial]) -> Trial | None:
    """The best finished trial of the longest length any trial finished (a rung trains from scratch to its
    length: the longest is what the search got furthest with). Ties of the rank go to the older study trial,
    so every worker of one study, seeing the same trials, chooses the same one."""
    done = [t for t in trials if t.state == "complete"]
    if not done:
        return None
    longest = max(t.steps for t in done)
    return min((t for t in done if t.steps == longest), key=lambda t: (t.rank, t.number if t.number is not None
                                                                       else math.inf))


def _take_the_study(found: Search, runner: TrialRunner, configs: list[Config]) -> None:
    """After every worker's search has ended: the study's finished trials of this run's configs that this worker
    has not seen (another worker trained them after this one last looked) join its list, and those it saw
    running take their results. Rungs are then numbered by length over all of them, since each worker's plan
    may have skipped another rung (plan.rung_sets)."""
    from optuna.trial import TrialState

    keys = {c.key for c in configs}
    finished = {t.number: read_back(t) for t in runner.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("key") in keys}
    for index, trial in enumerate(found.trials):
        latest = finished.pop(trial.number, None) if trial.number is not None else None
        if trial.state == "running":
            found.trials[index] = latest or Trial(trial.key, trial.rung, trial.steps, "failed",
                                                  note="its worker stopped")
    found.trials.extend(sorted(finished.values(), key=lambda t: t.number))
    order = sorted({t.steps for t in found.trials})
    for trial in found.trials:
        trial.rung = order.index(trial.steps)


def _fill(found: Search, configs: list[Config], rates: Rates, runner: TrialRunner, left, fixed: dict,
          paid: set, heartbeat) -> None:
    """Time left after the last rung, too little for a longer one: the next-best configs of the rung below
    train at the last rung's length, in their order, while the next one fits. The budget buys more candidates
    for the top instead of ending early (TREC-6, 30 minutes: 6 of them were left unused before this)."""
    top = max((t.rung for t in found.trials if t.state == "complete"), default=0)
    if top == 0:
        return
    steps = found.plan.rungs[top]
    for ranked in found.best_of_rung(top - 1):
        config = next(c for c in configs if c.key == ranked.key)
        if (config.key, steps) in paid or any(t.key == config.key and t.rung == top for t in found.trials):
            continue
        if rates.trial(config, steps) > left():
            return  # a lower-ranked config does not stand in for a better one that did not fit
        heartbeat()
        trial = _run_or_skip(config, steps, top, rates, runner, left, fixed)
        found.trials.append(trial)
        measure(rates, config, trial)
        paid.add((config.key, steps))


def _done(trial: Trial | None) -> bool:
    return trial is not None and trial.state == "complete"


def _run_or_skip(config: Config, steps: int, rung: int, rates: Rates, runner: TrialRunner, left, fixed) -> Trial:
    """The study's record when there is one (free); else the trial when it fits what is left; else skipped."""
    recorded = runner.lookup(config, steps)
    if recorded is not None:
        recorded.rung = rung  # its worker's plan may have numbered its rungs otherwise (plan.rung_sets)
        return recorded
    need, room = rates.trial(config, steps), left()
    if room < need:
        return Trial(config.key, rung, steps, "skipped", note=f"the budget: needs about {need:.0f} s, "
                                                            f"{max(room, 0):.0f} s left")
    runner.deadline = time.monotonic() + room
    # Near the deadline, training stops in time for the trial's start and its evaluation to fit as well. Far
    # from it, no limit: the trial's config.yaml is then exactly what a user would re-run.
    runner.max_seconds = room - (need - steps * rates.step[(config.candidate.name, config.recipe.method)]) \
        if need > 0.6 * room else None
    return runner(config, steps, rung, fixed, rates.evaluations(steps))


def _wait_for_others(found: Search, rung: int, runner: TrialRunner, entries: list[Config], steps: int,
                     heartbeat) -> None:
    """Trials of this rung that another worker is running: wait for them, then take their results."""
    for index, trial in enumerate(found.trials):
        if trial.rung != rung or trial.state != "running":
            continue
        config = next(c for c in entries if c.key == trial.key)
        while (latest := runner.lookup(config, steps)) is not None and latest.state == "running":
            heartbeat()
            time.sleep(WAIT_POLL_S)
        if latest is not None:
            latest.rung = rung
        found.trials[index] = latest or Trial(trial.key, rung, steps, "failed", note="its worker stopped")


def open_auto_study(url: str, name: str, metric: str, fingerprint: str, out) -> "optuna.Study":
    """The study of one auto folder: created, or loaded to resume. A study of another metric or another config
    (other data, template or settings) is refused: its trials would not compare."""
    import optuna

    from tailorlm.errors import TailorError
    from tailorlm.sweep.study import fail_interrupted, open_study, pin

    optuna.logging.disable_default_handler()
    try:
        study = open_study(url, name, None, metric, "maximize")
    except TailorError as e:
        raise TailorError(f"{out}: holds a search on another metric ({e}); use another --output") from None
    if pin(study, "config", fingerprint) != fingerprint:
        raise TailorError(f"{out}: holds a search of another config (its data, template or settings differ); use "
                          f"another --output, or remove the folder to start over")
    fail_interrupted(study)
    return study
