"""tailor auto: the budget is kept, successive halving keeps the best third, the test split is read only after the
choice, a killed search resumes where it stopped, and the recommendation names the classic model when it wins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailorlm.auto import search as search_module
from tailorlm.auto import trials as trials_module
from tailorlm.auto.candidates import Candidate
from tailorlm.auto.plan import (Config, Rates, fitted_top, ladder, make_plan, narrower, parse_budget, recipes,
                                rung_sets, survivors)
from tailorlm.auto import workers
from tailorlm.auto.search import Search, choose_winner, search
from tailorlm.auto.trials import Trial
from tailorlm.errors import TailorError
from conftest import build_tiny_tokenizer, labeled_csv, tiny_llama, write

SMALL, LARGE = Candidate("small", "small", 100_000_000), Candidate("large", "large", 300_000_000)


def test_budget_text():
    assert [parse_budget(t) for t in ("20m", "1h30m", "90s", "15", "1.5h")] == [1200, 5400, 90, 900, 5400]
    for bad in ("soon", "20 minutes", "0m", ""):
        with pytest.raises(TailorError, match="--budget .*: "):
            parse_budget(bad)


def test_recipes_keep_what_the_config_sets():
    assert [r.label() for r in recipes(SMALL, {})] == [
        "LoRA r16, lr 0.0003", "LoRA r16, lr 0.001", "LoRA r16, lr 0.0001", "full, lr 3e-05", "full, lr 0.0001"]
    assert [r.label() for r in recipes(Candidate("big", "big", 7_000_000_000), {})][-1] == "LoRA r16, lr 0.0001"
    # a learning rate belongs to the config's method: a LoRA rate would wreck full fine-tuning
    assert [r.label() for r in recipes(SMALL, {"train.lr": 5e-4, "method.lora.r": 8})] == ["LoRA r8, lr 0.0005"]
    assert [r.label() for r in recipes(SMALL, {"train.lr": 5e-5}, "full")] == ["full, lr 5e-05"]
    assert [r.label() for r in recipes(SMALL, {"method.name": "full"})] == ["full, lr 3e-05", "full, lr 0.0001"]


def test_fixed_recipe_reads_the_config_file_unless_the_recipe_is_searched(tmp_path):
    from tailorlm.auto.run import fixed_recipe

    config = write(tmp_path / "task.yaml", "train: {lr: 5.0e-4, epochs: 1, batch_size: 16}\nmethod: {name: lora}\n")
    assert fixed_recipe(config, ["method.lora.r=8"]) == {
        "method.name": "lora", "method.lora.r": 8, "train.lr": 5e-4, "train.epochs": 1}
    # --search-recipe: a config written for `tailor run` gives its data and template; the command line still fixes
    assert fixed_recipe(config, ["method.lora.r=8"], search_recipe=True) == {"method.lora.r": 8}
    assert fixed_recipe(None, []) == {}  # the embedded default job's recipe is what auto competes with


def configs() -> list[Config]:
    by_model = [[Config(c, r) for r in recipes(c, {})] for c in (SMALL, LARGE)]
    return [row[i] for i in range(5) for row in by_model]


def rates() -> Rates:
    return Rates({(m, k): s for m, s in (("small", 1.0), ("large", 2.0)) for k in ("lora", "full")},
                 {"small": 5.0, "large": 5.0}, {"small": 0.1, "large": 0.2}, answers=10)


def test_the_plan_starts_short_and_fits_the_budget_with_fewer_configs_then_fewer_rungs():
    lengths = ladder(90)
    plan = make_plan(configs(), lengths, rates(), 10_000)
    assert plan.rungs == lengths == [10, 30, 90] and len(plan.configs) == 10 and not plan.dropped
    assert survivors(10, 3) == [10, 4, 2] and plan.seconds == plan.cost(rates())
    tight = make_plan(configs(), lengths, rates(), 700)
    assert tight.seconds <= 700 and tight.rungs == [10, 30, 90] and 4 <= len(tight.configs) < 10
    assert [c.key for c in tight.configs] == [c.key for c in configs()[:len(tight.configs)]]  # the last go first
    assert [key for key, _ in tight.dropped] == [c.key for c in configs()[len(tight.configs):]]
    tighter = make_plan(configs(), lengths, rates(), 100)
    assert tighter.seconds <= 100 and tighter.rungs[0] == 10 and len(tighter.rungs) < 3
    # trials already in the study cost nothing
    free = {(c.key, 10) for c in configs()}
    assert make_plan(configs(), lengths, rates(), 100, free).rungs == [10, 30]
    # too little for the whole ladder with four configs, enough for the top: its middle rung goes, not the top
    # (407 s for four configs on three rungs; three configs at 10 steps and the best of them at 90 take 246 s)
    short = make_plan(configs(), lengths, rates(), 300)
    assert short.rungs == [10, 90] and len(short.configs) == 3 and short.seconds == 246
    assert rung_sets(lengths) == [[10, 30, 90], [10, 90], [30, 90], [90], [10, 30], [10]]
    assert narrower([10, 30, 90]) == [10, 90] and narrower([10, 90]) == [10]
    # one config has nothing to halve: the longest length that fits
    assert make_plan(configs()[:1], lengths, rates(), 60).rungs == [30]
    with pytest.raises(TailorError, match=r"the budget left for the search \(15 s\) is too small: the shortest trial "
                                          r"\(10 steps\) needs about 16 s"):
        make_plan(configs(), lengths, rates(), 15)


def test_a_budget_too_short_for_the_full_length_fits_the_top_to_it():
    from dataclasses import replace

    # the full length stays while a plan ending at it fits with a choice to make (two configs: 234 s)
    assert [fitted_top(configs(), 90, rates(), s) for s in (10_000, 300, 234)] == [(90, 0)] * 3
    # 200 s: the longest top onto which three configs halve, within 98% of the time (196 s, leaving the search
    # a margin); the next length up does not fit
    assert fitted_top(configs(), 90, rates(), 200) == (67, 3)
    fitted = make_plan(configs(), ladder(67), replace(rates(), top=67), 200)
    assert fitted.rungs == [7, 67] and len(fitted.configs) == 3 and fitted.seconds == 192
    assert make_plan(configs()[:3], [8, 68], replace(rates(), top=68), 10_000).seconds == 198
    # two configs when three do not fit: here both train the top alone, where starting a trial costs more than
    # its steps (58 s; a first rung of 4 steps and the best at 12 would cost 60)
    assert fitted_top(configs(), 90, rates(), 60) == (13, 2)
    assert make_plan(configs(), ladder(13), replace(rates(), top=13), 60).rungs == [13]
    # one config alone trains the longest length that fits, with its three evaluations (50 + 5 + 3 s)
    assert fitted_top(configs()[:1], 90, rates(), 60) == (50, 1)
    # no top longer than the full ladder's first rung fits: the full length, and make_plan's fallback
    assert fitted_top(configs(), 90, rates(), 35) == (90, 0)


def test_the_fitted_top_is_kept_in_the_study_for_a_resume_and_a_length_the_user_set_is_not_fitted(tmp_path, capsys):
    import optuna

    from tailorlm.auto.run import _fit_the_ladder

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="fit")
    measured = rates()
    assert _fit_the_ladder(ladder(90), configs(), measured, 200, {}, study, url) == ladder(67) == [7, 22, 67]
    assert measured.top == 67 and study.user_attrs["top"] == 67
    assert "the full length (90 steps) does not fit the budget: the longest trial will train 67 steps, the most " \
           "that fits after a first round of 3 configs" in capsys.readouterr().out
    # resumed with less time left: the same lengths, so the trials already in the study are read back
    assert _fit_the_ladder(ladder(90), configs(), rates(), 100, {}, study, url) == [7, 22, 67]
    assert "the longest trial trains 67 steps, as the first run of this search fitted it to its budget (the full " \
           "length is 90 steps); another --output starts a search fitted to this budget" in capsys.readouterr().out
    assert _fit_the_ladder(ladder(90), configs(), rates(), 200, {"train.epochs": 3}, study, url) == [10, 30, 90]
    # a study whose trials ran before a top was recorded keeps the full length they were planned on
    older = optuna.create_study(storage=url, study_name="older")
    older.tell(older.ask(), 0.5)
    assert _fit_the_ladder(ladder(90), configs(), rates(), 200, {}, older, url) == [10, 30, 90]
    assert older.user_attrs["top"] == 90 and capsys.readouterr().out == ""


def test_the_advice_on_length_names_what_set_it():
    from tailorlm.auto.report import length_advice

    def found(lengths, steps, values, full=0, epoch_steps=62.5):
        out = Search("task/accuracy", None, lengths, full=full, epoch_steps=epoch_steps)
        out.trials = [Trial(f"c{i}", i, n, "complete", v) for i, (n, v) in enumerate(zip(steps, values))]
        out.winner = out.trials[-1]
        return out

    # the user's config fixed one epoch: the advice is the config's length, in its own epochs
    assert length_advice(found([7, 63], [7, 63], [0.27, 0.92])) == (
        "Validation task/accuracy was still rising at the full length (63 steps, 1.0 epochs): a larger train.epochs "
        "(or train.max_steps) would let it train longer.")
    # the budget fitted the top (SST-2, 15 minutes): the advice is the budget
    assert length_advice(found([16, 146], [16, 146], [0.88, 0.93], full=750, epoch_steps=250)) == (
        "Validation task/accuracy was still rising at the longest length the budget allowed (146 steps, 0.6 epochs; "
        "the full length is 750 steps): a larger --budget would let it train longer.")
    assert length_advice(found([7, 21, 63], [7, 21], [0.5, 0.7])).startswith(
        "Longer training was still paying (task/accuracy +0.200 on validation from 7 to 21 steps), and the budget "
        "stopped the search short of 63 steps")
    assert length_advice(found([7, 63], [7, 63], [0.92, 0.925])) is None  # not rising: no advice


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class FakeRunner:
    """A trial that takes the time the rates say, plus 20%, and scores by the recipe's rate and the length."""

    def __init__(self, clock: FakeClock, quality: dict[str, float]):
        import optuna

        self.clock, self.quality, self.deadline, self.max_seconds, self.calls = clock, quality, None, None, []
        self.study = optuna.create_study()  # the roll call of workers (workers.py): this one alone

    def lookup(self, config, steps):
        return None

    def __call__(self, config, steps, rung, fixed, evaluations=1) -> Trial:
        self.calls.append((config.key, rung))
        seconds = 1.2 * rates().trial(config, steps)
        self.clock.now += seconds
        assert self.clock.now <= self.deadline + 1e-9, "a trial started that could not end before the deadline"
        value = self.quality[config.key] + steps / 1000
        return Trial(config.key, rung, steps, "complete", value, seconds, seconds * 0.8, seconds * 0.9, steps, 100)


def test_successive_halving_keeps_the_best_third_within_the_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(search_module, "time", clock)
    quality = {c.key: 0.5 + 0.01 * i for i, c in enumerate(configs())}  # the last config is the best
    quality[configs()[3].key] = 0.9  # ... except this one
    runner = FakeRunner(clock, quality)
    budget, measured = 800.0, rates()
    found = search(configs(), ladder(90), measured, runner, 0.0, budget, {}, "task/accuracy")
    assert clock.now <= budget
    first = [t for t in found.trials if t.rung == 0]
    assert len(first) == len(found.plan.configs)
    ranked = sorted(first, key=lambda t: -t.value)
    second = [t.key for t in found.trials if t.rung == 1]
    assert second and set(second) == {t.key for t in ranked[:len(second)]}
    assert len(second) == -(-len(first) // 3)
    assert found.winner.key == configs()[3].key and found.winner.rung == max(t.rung for t in found.trials)
    # the time left after the last rung: the next-best of the rung below at its length, in order, while they fit
    top = max(t.rung for t in found.trials)
    below = [t.key for t in found.best_of_rung(top - 1)]
    at_top = [t.key for t in found.trials if t.rung == top]
    halving = -(-len(below) // 3)
    assert at_top == below[:len(at_top)] and len(at_top) > halving
    if len(at_top) < len(below):
        following = next(c for c in configs() if c.key == below[len(at_top)])
        assert measured.trial(following, found.plan.rungs[top]) > budget - clock.now


def test_a_trial_another_plan_numbered_otherwise_joins_this_plan_at_its_length(monkeypatch):
    """Another worker (or an earlier run) trained config 1 to 90 steps as its rung 3 of [10, 30, 90]; this
    budget plans [10, 90]. The record is read back at this plan's rung, and rungs number by length."""
    import copy

    clock = FakeClock()
    monkeypatch.setattr(search_module, "time", clock)
    quality = {c.key: 0.5 for c in configs()}
    quality[configs()[1].key] = 0.9
    record = Trial(configs()[1].key, 2, 90, "complete", 0.99, 100.0, 80.0, 90.0, 90, 1000, number=0)

    class Recorded(FakeRunner):
        def lookup(self, config, steps):
            return copy.copy(record) if (config.key, steps) == (record.key, 90) else None

    found = search(configs(), ladder(90), rates(), Recorded(clock, quality), 0.0, 300.0, {}, "task/accuracy")
    assert found.plan.rungs[-1] == 90 and 30 not in found.plan.rungs
    assert found.winner.key == record.key and found.winner.steps == 90 and found.winner.number == 0
    assert {(t.steps, t.rung) for t in found.trials} == {(10, 0), (90, 1)}


def test_an_interrupted_search_checks_out_so_no_other_worker_waits_for_it(monkeypatch):
    import os
    import socket

    clock = FakeClock()
    monkeypatch.setattr(search_module, "time", clock)

    class Interrupted(FakeRunner):
        def __call__(self, config, steps, rung, fixed, evaluations=1):
            assert self.study.user_attrs[me]["state"] == "searching"
            raise KeyboardInterrupt

    me = f"worker {socket.gethostname()} {os.getpid()}"
    runner = Interrupted(clock, {c.key: 0.5 for c in configs()})
    with pytest.raises(KeyboardInterrupt):
        search(configs(), ladder(90), rates(), runner, 0.0, 300.0, {}, "task/accuracy")
    assert runner.study.user_attrs[me]["state"] == "done"


def test_the_budget_stops_what_does_not_fit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(search_module, "time", clock)
    runner = FakeRunner(clock, {c.key: 0.5 for c in configs()})
    # planned for 200 s, but every trial takes 20% more than planned: the last ones are skipped, never overrun
    found = search(configs(), ladder(90), rates(), runner, 0.0, 200.0, {}, "task/accuracy")
    assert clock.now <= 200.0
    assert any(t.state == "skipped" and t.note.startswith("the budget: needs about") for t in found.trials) or \
        len(runner.calls) == sum(1 for t in found.trials if t.state == "complete")


def test_when_no_trial_finishes_the_best_one_the_budget_cut_short_wins(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(search_module, "time", clock)

    class CutShort(FakeRunner):
        def __call__(self, config, steps, rung, fixed, evaluations=1) -> Trial:
            trial = super().__call__(config, steps, rung, fixed, evaluations)
            trial.state, trial.note = "stopped", f"the budget: stopped at step {steps - 5} of {steps}"
            return trial

    quality = {c.key: 0.5 + 0.1 * i for i, c in enumerate(configs()[:2])}
    found = search(configs()[:2], [30], rates(), CutShort(clock, quality), 0.0, 200.0, {}, "task/accuracy")
    assert [t.state for t in found.trials] == ["stopped", "stopped"]
    assert found.winner.key == configs()[1].key  # the better of the two, though neither trained its full length


def test_trials_that_tie_on_the_metric_rank_by_validation_loss():
    keys = [c.key for c in configs()[:4]]
    found = Search("task/accuracy", None, [10])
    found.trials = [Trial(keys[0], 0, 10, "complete", 0.825, val_loss=0.44),
                    Trial(keys[1], 0, 10, "complete", 0.825, val_loss=0.30),
                    Trial(keys[2], 0, 10, "complete", 0.900, val_loss=0.90),
                    Trial(keys[3], 0, 10, "complete", 0.825)]  # read back from a study without the loss: last
    assert [t.key for t in found.best_of_rung(0)] == [keys[2], keys[1], keys[0], keys[3]]


def test_a_trial_of_the_top_length_evaluates_at_each_third_and_is_priced_so():
    runner = trials_module.TrialRunner(None, [], None, None, "", Path("out"), "task/accuracy", 10)
    measured = rates()
    measured.top = 90
    short, top = (dict(o.split("=", 1) for o in runner.trial_overrides(configs()[0], n, {}, measured.evaluations(n)))
                  for n in (30, 90))
    assert short["train.eval_every"] == "0" and "train.eval_at_start" not in short
    assert (top["train.eval_every"], top["train.eval_at_start"], top["eval.select.min_delta"]) == ("30", "false", "0.1")
    # small: 1 s a step, 5 s to start, 10 answers at 0.1 s per evaluation
    assert measured.trial(configs()[0], 30) == 36 and measured.trial(configs()[0], 90) == 98


def test_every_worker_chooses_the_same_winner_from_the_same_trials():
    keys = [c.key for c in configs()[:3]]
    trials = [Trial(keys[0], 0, 10, "complete", 0.99, number=0),
              Trial(keys[1], 1, 30, "complete", 0.80, val_loss=0.5, number=4),
              Trial(keys[2], 1, 30, "complete", 0.80, val_loss=0.5, number=3),
              Trial(keys[0], 1, 30, "stopped", 0.95, number=5)]
    # the longest length any trial finished; a tie of metric and loss goes to the older study trial, whatever
    # order a worker saw them in
    assert choose_winner(trials).number == 3 and choose_winner(trials[::-1]).number == 3
    assert choose_winner(trials[3:]) is None


def test_a_worker_chooses_only_once_no_other_live_worker_is_searching(tmp_path):
    import os
    import socket
    import subprocess
    import threading
    import time

    import optuna

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="roll")
    host = socket.gethostname()
    live = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        searching = {"state": "searching", "ends_by": time.time() + 3600}
        study.set_user_attr(f"worker {host} {live.pid}", searching)
        study.set_user_attr(f"worker {host} {gone.pid}", searching)  # its process has ended: not waited for
        study.set_user_attr("worker far-away 11", searching)  # another machine, before its stated end
        study.set_user_attr("worker far-away 12", {"state": "searching", "ends_by": time.time() - 1})  # past it
        study.set_user_attr("worker far-away 13", {"state": "done", "ends_by": time.time()})
        workers.check_in(study, time.time() + 60)
        assert sorted(workers.still_searching(study)) == sorted([f"{host} {live.pid}", "far-away 11"])
        study.set_user_attr("worker far-away 11", {"state": "done", "ends_by": time.time()})
        waiter = threading.Thread(target=workers.wait_for_the_others, args=(study, 0.05))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # the live worker of this machine is still searching
        assert study.user_attrs[f"worker {host} {os.getpid()}"]["state"] == "done"  # this one checked out first
        study.set_user_attr(f"worker {host} {live.pid}", {"state": "done", "ends_by": time.time()})
        waiter.join(5)
        assert not waiter.is_alive()
        # who scores the winner on test: its trainer while it lives, or once it scored it during this run
        started = time.time()
        mine = Trial("k", 1, 30, "complete", 0.9, number=7, host=host, pid=os.getpid())
        theirs = Trial("k", 1, 30, "complete", 0.9, number=7, host=host, pid=live.pid)
        stopped = Trial("k", 1, 30, "complete", 0.9, number=7, host=host, pid=gone.pid)
        assert workers.left_to_its_trainer(study, mine, started) is None
        assert workers.left_to_its_trainer(study, theirs, started) == f"worker {live.pid} on {host} (this machine)"
        assert workers.left_to_its_trainer(study, stopped, started) is None  # it stopped before scoring
        study.set_user_attr("scored", {"number": 7, "at": time.time(), "by": f"{host} {gone.pid}"})
        assert workers.left_to_its_trainer(study, stopped, started) == f"worker {gone.pid} on {host} (this machine)"
        assert workers.left_to_its_trainer(study, stopped, time.time() + 1) is None  # scored before this run: again
    finally:
        live.kill()
        live.wait()


@pytest.fixture(scope="module")
def auto_task(tmp_path_factory):
    """Two tiny random models and a table TF-IDF separates perfectly, which no tiny model learns in seconds."""
    root = tmp_path_factory.mktemp("auto")
    tokenizer = build_tiny_tokenizer()
    for seed, name in ((0, "tiny-a"), (1, "tiny-b")):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data = labeled_csv(root / "reviews.csv", 20)
    config = write(root / "task.yaml", f"data: {{train: {data}}}\ntemplate: {{max_length: 96}}\n"
                                       "train: {batch_size: 4}\neval: {baselines: [zero_shot], few_shot_k: 0}\n"
                                       "output: {name: tinyauto}\n")
    return root, config


def test_auto_chooses_on_validation_resumes_and_recommends_the_classic_model(auto_task, monkeypatch):
    from tailorlm.auto import run as auto_run
    from tailorlm.cli import main
    from tailorlm.eval.evaluate import Evaluator

    root, config = auto_task
    out = root / "out"
    args = ["auto", str(config), "--budget", "75s", "--only-listed", "--model", str(root / "tiny-a"),
            "--model", str(root / "tiny-b"), "--output", str(out)]
    scored, phase = [], {"final": False}
    real_run, real_final = Evaluator.run, auto_run.evaluate_winner

    def spy_run(self, model, samples, *a, **k):
        scored.extend((phase["final"], s.example["text"]) for s in samples)
        return real_run(self, model, samples, *a, **k)

    def spy_final(*a, **k):
        phase["final"] = True
        return real_final(*a, **k)

    monkeypatch.setattr(Evaluator, "run", spy_run)
    monkeypatch.setattr(auto_run, "evaluate_winner", spy_final)
    # killed during its third trial; the same command then resumes
    calls = {"n": 0}
    real_trial = trials_module.TrialRunner.__call__

    def dies_in_the_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_trial(self, *a, **k)

    monkeypatch.setattr(trials_module.TrialRunner, "__call__", dies_in_the_third)
    assert main(args) == 130  # Ctrl-C
    monkeypatch.setattr(trials_module.TrialRunner, "__call__", real_trial)
    assert main(args + ["--data-curve"]) == 0
    result = json.loads((out / "auto.json").read_text())
    trials = result["trials"]
    resumed = [t for t in trials if t["note"] == trials_module.READ_BACK]
    assert len(resumed) == 2 and {t["rung"] for t in resumed} == {0}
    assert len({t["run_dir"] for t in trials if t["run_dir"]}) == len([t for t in trials if t["run_dir"]])
    # the test split was scored only once the choice was made
    test_rows = {json.loads(line)["input"] for line in open(out / f"trial-{result['winner']['number']}"
                                                           / "predictions.jsonl")}
    assert test_rows and not any(text in test_rows for final, text in scored if not final)
    assert any(final for final, _ in scored)
    # the winner: the best validation score at the longest rung, and a finished run folder
    top = max(t["rung"] for t in trials if t["state"] == "complete")
    best = max(t["value"] for t in trials if t["rung"] == top and t["state"] == "complete")
    assert result["winner"]["rung"] == top and result["winner"]["value"] == best
    winner = out / f"trial-{result['winner']['number']}"
    assert (winner / "example_losses.jsonl").read_text() == ""  # trials skip the pass over the training rows
    assert all(t["val_loss"] > 0 for t in trials if t["state"] == "complete")
    section = json.loads((winner / "metrics.json").read_text())["tasks"]["classification"]
    assert {"fine_tuned", "majority", "classic", "zero_shot"} <= set(section["variants"])
    assert json.loads((winner / "manifest.json").read_text())["tasks"]["classification"]["decoding"] == "free"
    # honest: TF-IDF separates this table, so the recommendation names it
    board = (out / "leaderboard.md").read_text()
    assert "**Use the classic model (tf-idf + logistic regression)**" in board
    assert result["recommendation"][0].startswith("**Use the classic model")
    # would more rows help: the winner's recipe on a quarter and a half of the rows, then all of them
    curve = result["data_curve"]
    assert [(p["share"], p["rows"]) for p in curve["points"]] == [(0.25, 7), (0.5, 14), (1.0, 28)]
    assert curve["points"][-1]["value"] == section["variants"]["fine_tuned"]["accuracy"]
    assert "Test accuracy by training rows (same recipe and steps): 25% (7 rows)" in board
    # the search's budget, both runs together, kept to within one evaluation; the test evaluation follows it
    assert result["spent_seconds"] <= 75 + 5 and result["final_seconds"] > 0
    assert "for the search, which took" in board


def test_two_workers_on_one_study_split_the_trials_and_one_scores_the_winner(auto_task, tmp_path):
    """Two `tailor auto` processes started on one folder (one study): no trial is trained twice, both train some,
    both choose the same winner, and only the worker that trained it scores it on test and writes the report."""
    import os
    import subprocess
    import sys

    import optuna

    root, config = auto_task
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "tailorlm", "auto", str(config), "--budget", "50s", "--only-listed", "--model",
               str(root / "tiny-a"), "--output", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in procs]
    assert [w.returncode for w in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="tinyauto", storage=f"sqlite:///{out / 'study.db'}")
    trained = [t.user_attrs for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len({(a["key"], a["steps"]) for a in trained}) == len(trained)  # none twice
    assert {a["pid"] for a in trained} == {w.pid for w in procs}  # both did some of the work
    result = json.loads((out / "auto.json").read_text())
    scorer = next(i for i, w in enumerate(procs) if w.pid == result["winner"]["pid"])
    assert "Leaderboard: " in outputs[scorer]
    assert f"trained by worker {procs[scorer].pid} on" in outputs[1 - scorer].replace("\n", " ")
    assert "Leaderboard: " not in outputs[1 - scorer]
