"""The default job's metrics, pinned, and run folders of the previous layout still read.

tests/golden/run_schema_1/ is a run folder (its JSON files and config) that the version before runs became a
list of tasks wrote for the embedded default job (BBC News topics, LoRA, every prompting kind, the k-shot
curve, the classic classifier, retention) on the suite's tiny random Llama: 4 steps, evaluations at steps 2
and 4, 40 test rows, one CPU thread. Its metrics.json is schema 1: the single task's section at the top level.

The same job run now must write the same figures to the last digit, wall-clock fields aside, in the current
layout; reading the old folder through RunDir must give exactly that layout. Regenerating is only for an
intended change of figures, named in its commit: run the job below and copy the folder's JSON files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_golden_figures import deterministic_cpu

import tailorlm
from tailorlm.rundir import METRICS_SCHEMA, RunDir
from tailorlm.track.registry import load_run

GOLDEN = Path(__file__).parent / "golden" / "run_schema_1"
JOB = ["train.max_steps=4", "train.eval_every=2", "data.limit.test=40"]
WALL_CLOCK = {"seconds", "step_seconds", "seconds_per_100", "train_seconds"}


def without_wall_clock(value):
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(GOLDEN, tmp_path / "old-run"))


def test_the_default_job_writes_the_golden_figures_in_the_current_layout(tmp_path, tiny_model_dir, old_run):
    with deterministic_cpu():
        run = tailorlm.run(None, model=str(tiny_model_dir), output=tmp_path / "run", overrides=JOB, quiet=True)
    written = RunDir(run.path).read("metrics.json")  # as written, not upgraded on read
    assert written["schema"] == METRICS_SCHEMA and list(written["tasks"]) == ["classification"]
    # The majority-class row joined the baselines after the golden run (issue 38, an intended addition): every
    # figure the old version wrote must still come out the same.
    majority = written["tasks"]["classification"]["variants"].pop("majority")
    assert majority["kind"] == "majority class" and majority["accuracy"] < 0.5
    assert without_wall_clock(written) == without_wall_clock(RunDir(old_run).metrics())
    assert run.results["classification"].fine_tuned == written["tasks"]["classification"]["variants"][
        "fine_tuned"]["accuracy"]


def test_a_run_folder_of_the_previous_layout_reads_as_a_list_of_one_task(old_run):
    run_dir = RunDir(old_run)
    old = run_dir.read("metrics.json")
    assert "schema" not in old and "variants" in old  # schema 1: the one section at the top level
    metrics = run_dir.metrics()
    assert list(metrics) == ["schema", "tasks", "mixing", "train"]
    section = metrics["tasks"]["classification"]
    assert section == {k: v for k, v in old.items() if k != "train"} and metrics["train"] == old["train"]
    assert metrics["mixing"] == run_dir.raw_config()["mixing"]
    # its data reports stayed in the run folder itself, where tasks now have tasks/<name>/
    assert run_dir.task_path("classification") == run_dir.path
    assert run_dir.manifest().tasks["classification"].labels == section["labels"]
    record = load_run(old_run)
    assert record.task == "classification"
    assert record.headlines()["classification"].fine_tuned == section["variants"]["fine_tuned"]["accuracy"]
    results = tailorlm.load(old_run).results["classification"]
    assert (results.headline, results.n_test, results.best_prompting) == (
        "accuracy", 40, section["best_prompting"])
