"""`tailor sweep` on the tiny random model: results and best.yaml, pruning, resume, two workers on one SQLite
study, failed and interrupted trials, and clear errors for bad space files."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import labeled_csv, write

from tailorlm.cli import main
from tailorlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Trials are tiny: one thread each is faster than two fighting over a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def base(tmp_path, tiny_model_dir) -> Path:
    data = labeled_csv(tmp_path / "reviews.csv")
    return write(tmp_path / "base.yaml", f"""\
model: {{path: {tiny_model_dir}}}
data: {{train: {data}}}
template: {{max_length: 96}}
train: {{max_steps: {MAX_STEPS}, batch_size: 4, eval_every: 2}}
eval: {{baselines: [], during_training: 4, max_new_tokens: 4, retention: {{data: null}}}}
track: {{tensorboard: false}}
""")


SPACE = """\
n_trials: {n}
metric: val_loss
pruner: {pruner}
params:
  train.lr: {{type: log-float, low: 1.0e-4, high: 1.0e-1}}
  method.lora.r: [4, 8]
  method.lora.alpha: 2r
  method.lora.target_modules: [all-linear, [q_proj, v_proj]]
"""


def space(tmp_path, n=3, pruner="none", text=None) -> Path:
    return write(tmp_path / "space.yaml", text or SPACE.format(n=n, pruner=pruner))


def sweep(*args) -> int:
    return main(["sweep", *map(str, args)])


def study_of(out: Path, name="base") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def logged_value(run_dir: Path, metric: str) -> float:
    """The validation metric at the step the run kept, read straight from its train_log.json."""
    log = json.loads((run_dir / "train_log.json").read_text())
    step = log["best_step"] or log["evaluations"][-1]["step"]
    return next(e[metric] for e in log["evaluations"] if e["step"] == step)


def test_sweep_writes_results_plot_and_a_runnable_best_config(tmp_path, base):
    out = tmp_path / "sweep"
    assert sweep(base, "--space", space(tmp_path), "--output", out) == 0
    for name in ("results.md", "results.csv", "history.png", "best.yaml", "study.db"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"complete"}
    for row in rows:
        assert float(row["value"]) == pytest.approx(logged_value(out / f"trial-{row['trial']}", "val_loss"))
        assert float(row["seconds"]) > 0 and row["train.lr"] and row["method.lora.r"] in ("4", "8")

    best = study_of(out).best_trial
    assert best.value == min(float(r["value"]) for r in rows)
    assert next(r for r in rows if r["note"] == "best")["trial"] == str(best.number)
    cfg = load_config(out / "best.yaml")
    assert cfg.train.lr == pytest.approx(best.params["train.lr"])
    assert cfg.method.lora.r == best.params["method.lora.r"]
    assert cfg.method.lora.alpha == 2 * cfg.method.lora.r
    expected_modules = "all-linear" if best.params["method.lora.target_modules"] == "all-linear" else ["q_proj", "v_proj"]
    assert cfg.method.lora.target_modules == expected_modules
    assert cfg.model.path == load_config(base).model.path  # the rest is the base config
    report = (out / "results.md").read_text()
    assert "val_loss on the validation split (minimize)" in report and "![history](history.png)" in report


def test_a_trial_behind_is_pruned_before_its_planned_steps(tmp_path, base):
    out = tmp_path / "sweep"
    # A threshold no loss can meet prunes every trial at its first evaluation after training starts.
    code = sweep(base, "--space", space(tmp_path, n=2, pruner="{name: threshold, upper: 0.0}"), "--output", out)
    assert code == 1  # nothing completed, so there is no best.yaml
    trials = study_of(out).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in trials:
        assert trial.user_attrs["pruned_at_step"] == 2 < MAX_STEPS
        status = json.loads((out / f"trial-{trial.number}" / "run.json").read_text())
        assert status["status"] == "failed" and "pruned at step 2" in status["error"]
        assert not (out / f"trial-{trial.number}" / "train_log.json").exists()  # training never reached the end
    assert not (out / "best.yaml").exists()
    assert "stopped at step 2" in (out / "results.md").read_text()


def test_rerunning_the_command_resumes_the_same_study(tmp_path, base, capsys):
    out = tmp_path / "sweep"
    spec = space(tmp_path, n=2)
    assert sweep(base, "--space", spec, "--output", out) == 0
    assert sweep(base, "--space", spec, "--output", out, "--trials", 3) == 0
    trials = study_of(out).trials
    assert [t.number for t in trials] == [0, 1, 2]  # 3 in total, not 2 + 3
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0", "trial-1", "trial-2"]
    assert list(out.glob("*.db")) == [out / "study.db"]
    # The study is full: running again starts nothing.
    capsys.readouterr()
    assert sweep(base, "--space", spec, "--output", out, "--trials", 3) == 0
    assert "already holds 3 of 3 trials" in capsys.readouterr().out
    assert len(study_of(out).trials) == 3


def test_two_workers_share_one_sqlite_study(tmp_path, base):
    out = tmp_path / "sweep"
    # Shorter trials (fixed values in the space): this test is about sharing the study, not about training.
    # An odd budget: the two workers start together and finish their first trials together, so both look for a
    # third at the same moment, and only one may get it.
    spec = space(tmp_path, text=SPACE.format(n=3, pruner="none") + "  train.max_steps: 2\n  eval.during_training: 0\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tailorlm", "sweep", str(base), "--space", str(spec), "--output", str(out)]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    trials = study_of(out).trials
    assert [t.number for t in trials] == [0, 1, 2], "\n\n".join(log[-3000:] for log in logs)
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0", "trial-1", "trial-2"]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 3


def test_workers_finishing_together_never_run_past_the_budget(tmp_path):
    """Six workers (threads, each with its own connection to the study, as separate processes have) whose trials
    end at the same moment and who then linger, as writing results does: each must still start a trial only
    while the study holds fewer than the budget, and no trial may be started twice."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tailorlm.sweep.space import SweepSpec
    from tailorlm.sweep.study import open_study, run_trials

    spec = SweepSpec.model_validate({"params": {"train.lr": [1e-4]}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n_workers, budget = 6, 9
    in_step = threading.Barrier(n_workers, timeout=60)
    started = []  # trial numbers, in the order objectives ran them

    def objective(trial) -> float:
        started.append(trial.number)
        if trial.number < n_workers:  # each worker's first trial: they all end at once
            in_step.wait()
        return float(trial.number)

    def worker(_) -> None:
        study = open_study(url, "s", spec, "val_loss", "minimize")
        run_trials(study, url, objective, budget, after_each=lambda study, trial: time.sleep(0.05))

    with ThreadPoolExecutor(n_workers) as pool:
        for result in [pool.submit(worker, n) for n in range(n_workers)]:
            result.result()
    assert sorted(started) == list(range(budget))
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [(t.number, t.state, t.value) for t in trials] == [
        (n, optuna.trial.TrialState.COMPLETE, float(n)) for n in range(budget)]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, base):
    out = tmp_path / "sweep"
    # No sample fits 8 tokens: each trial fails in data preparation, with a TailorError.
    text = "n_trials: 2\nparams:\n  template.max_length: [8]\n  template.overlong: drop\n"
    assert sweep(base, "--space", space(tmp_path, text=text), "--output", out) == 1
    trials = study_of(out).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("template.max_length=8" in t.user_attrs["error"] for t in trials)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["state"] for r in rows] == ["failed", "failed"] and "max_length=8" in rows[0]["note"]


def test_a_trial_whose_worker_died_is_marked_interrupted(tmp_path):
    from tailorlm.sweep.results import state_of
    from tailorlm.sweep.space import SweepSpec
    from tailorlm.sweep.study import fail_interrupted, open_study

    spec = SweepSpec.model_validate({"params": {"train.lr": [1e-4]}})
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", spec, "val_loss", "minimize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        trial = study.ask()
        trial.set_user_attr("host", __import__("socket").gethostname())
        trial.set_user_attr("pid", pid)
    assert fail_interrupted(study) == [0]
    states = [state_of(t) for t in study.trials]
    assert states == ["interrupted", "running"]


def test_the_study_refuses_another_metric(tmp_path):
    from tailorlm.errors import TailorError
    from tailorlm.sweep.space import SweepSpec
    from tailorlm.sweep.study import open_study

    spec = SweepSpec.model_validate({"params": {"train.lr": [1e-4]}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(url, "s", spec, "val_loss", "minimize")
    with pytest.raises(TailorError, match="optimises val_loss, not accuracy"):
        open_study(url, "s", spec, "accuracy", "maximize")


@pytest.mark.parametrize("text, messages", [
    ("n_trials: 2\nmetrc: accuracy\nparams:\n  train.lr: [1.0e-4]\n",
     ["metrc (line 2): unknown key (did you mean 'metric'?)"]),
    ("params:\n  train.epochs: {type: int, low: 3, high: 1}\n  train.lr: {type: log-float, low: 0, high: 1}\n",
     ["params.train.epochs (line 2): low (3) must be below high (1)", "params.train.lr (line 3): a log-float range needs low > 0"]),
    ("params:\n  train.lr: {type: float, low: 0.1, high: 0.2, lwo: 1}\n",
     ["params.train.lr.lwo (line 2): unknown key (did you mean 'low'?)"]),
    ("params:\n  train.lr: {type: logfloat, low: 0.1, high: 0.2}\n", ["params.train.lr (line 2): type must be one of"]),
    ("pruner: {name: percentile}\nparams:\n  train.lr: [1.0e-4]\n", ["pruner (line 1): percentile is required"]),
    ("params:\n  train.lr: [1.0e-4]\n  train.lrr: {type: float, low: 0.1, high: 0.2}\n",
     ["params.train.lrr (line 3): unknown key (did you mean 'lr'?)"]),
    ("params:\n  method.lora.r: [8, 0]\n  method.lora.alpha: [r, 0r]\n",
     ["params.method.lora.r (line 2): 0: Input should be greater than 0", "params.method.lora.alpha (line 3): '0r' (= 0.0)"]),
    ("params: {}\n", ["params (line 1): Dictionary should have at least 1 item"]),
    ("metric: bleu\nparams:\n  train.lr: [1.0e-4]\n", ["metric: 'bleu' is not measured", "val_loss, classification/accuracy"]),
])
def test_bad_space_files_get_clear_errors(tmp_path, base, capsys, text, messages):
    out = tmp_path / "sweep"
    assert sweep(base, "--space", space(tmp_path, text=text), "--output", out) == 2
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for message in messages:
        assert message in printed
    assert not out.exists()  # nothing is written before the space is valid


def test_default_metric_follows_the_config(base):
    from tailorlm.sweep.objective import choose_metric
    from tailorlm.sweep.space import SweepSpec, default_space

    cfg = load_config(base)
    spec = default_space(cfg)
    assert set(spec.params) == {"train.lr", "method.lora.r", "method.lora.alpha"}
    # the task's headline on validation text, named as training logs it ('task/metric')
    assert choose_metric(spec, cfg) == ("classification/accuracy", "maximize")
    assert choose_metric(spec, load_config(base, ["eval.select.metric=macro_f1"])) == ("classification/macro_f1",
                                                                                       "maximize")
    assert choose_metric(spec, load_config(base, ["eval.during_training=0"])) == ("val_loss", "minimize")
    forced = SweepSpec.model_validate({"metric": "accuracy", "direction": "minimize", "params": {"train.lr": [1e-4]}})
    assert choose_metric(forced, cfg) == ("classification/accuracy", "minimize")


def test_values_survive_the_trip_through_overrides(base):
    from tailorlm.sweep.space import overrides, resolve

    cfg = load_config(base)
    values = resolve({"train.lr": 1e-5, "method.lora.r": 8, "method.lora.alpha": "4r",
                      "method.lora.target_modules": ["q_proj", "v_proj"], "output.name": "16"}, cfg)
    trial_cfg = load_config(base, overrides(values))
    assert (trial_cfg.train.lr, trial_cfg.method.lora.r, trial_cfg.method.lora.alpha) == (1e-5, 8, 32)
    assert trial_cfg.method.lora.target_modules == ["q_proj", "v_proj"] and trial_cfg.output.name == "16"
    assert resolve({"method.lora.alpha": "r"}, cfg)["method.lora.alpha"] == cfg.method.lora.r  # the base rank


def test_importances_are_plotted_once_enough_trials_completed(tmp_path):
    from tailorlm.sweep.results import write_plots

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + 0.1 * t.suggest_int("y", 0, 3), n_trials=3)
    assert [p.name for p in write_plots(study, tmp_path)] == ["history.png"]
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + 0.1 * t.suggest_int("y", 0, 3), n_trials=3)
    assert [p.name for p in write_plots(study, tmp_path)] == ["history.png", "importances.png"]
