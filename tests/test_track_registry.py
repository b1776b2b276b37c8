"""`tailor runs` and `tailor compare` on real run directories (two tiny-model runs, LoRA and full) beside
fabricated ones: failed, interrupted (lock free), still running (lock held), multi-task with known figures."""
import json
import shutil

import pytest
import torch
from conftest import labeled_csv, write

from tailorlm.cli import main
from tailorlm.rundir import RunLock
from tailorlm.track.registry import find_runs, listing_rows

ORDER = ["broken", "killed", "multi-run", "lora-run", "full-run", "live"]  # by start time
DIFFERING = {"method.name", "train.lr", "train.max_steps", "eval.baselines", "eval.few_shot_k"}

MULTI_METRICS = {
    "tasks": {
        "topics": {"task": "classification", "headline": "accuracy", "columns": ["accuracy", "macro_f1"], "n_test": 100,
                   "variants": {"zero_shot": {"accuracy": 0.253, "macro_f1": 0.265},
                                "few_shot": {"accuracy": 0.413, "macro_f1": 0.362},
                                "fine_tuned": {"accuracy": 0.887, "macro_f1": 0.885, "confusion": {}}}},
        "german": {"task": "translation", "headline": "bleu", "columns": ["bleu", "chrf"], "n_test": 50,
                   "variants": {"zero_shot": {"bleu": 12.0, "chrf": 30.0}, "fine_tuned": {"bleu": 30.5, "chrf": 50.0}}}},
    "train": {"steps": 40, "seconds": 300.0, "tokens": 60000}}
MULTI_LOG = {"train_loss": [{"step": 20, "loss": 1.5, "lr": 1e-4}, {"step": 40, "loss": 1.0, "lr": 0.0}],
             "val_metrics": [{"step": 20, "accuracy": 0.5}, {"step": 40, "accuracy": 0.75}], "seconds": 300.0}


def fabricate(run_dir, config, state, metrics=None, log=None):
    write(run_dir / "config.yaml", config)
    write(run_dir / "run.json", json.dumps(state))
    if metrics is not None:
        write(run_dir / "metrics.json", json.dumps(metrics))
    if log is not None:
        write(run_dir / "train_log.json", json.dumps(log))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    data = labeled_csv(tmp_path_factory.mktemp("data") / "reviews.csv")
    root = tmp_path_factory.mktemp("runs")
    common = [f"model.path={tiny_model_dir}", f"data.train={data}", "train.batch_size=4", "train.eval_every=2",
              "template.max_length=96", "eval.retention.data=null", "eval.during_training=0"]
    # One thread: a 32-wide model gains nothing from two, and on a shared, busy CPU two threads wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["run", *common, "train.max_steps=3", "eval.baselines=[zero_shot]", "--output", str(root / "lora-run")]) == 0
    assert main(["run", *common, "method.name=full", "train.lr=1e-4", "train.max_steps=4",
                 "eval.baselines=[zero_shot,few_shot]", "eval.few_shot_k=1", "--output", str(root / "group" / "full-run")]) == 0
    torch.set_num_threads(threads)
    config = (root / "lora-run" / "config.yaml").read_text()
    fabricate(root / "broken", config, {"status": "failed", "started": "2020-01-01T09:00:00", "error": "loss is NaN at step 2"},
              log={"train_loss": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}], "seconds": 1.5, "tokens": 300})
    fabricate(root / "killed", config, {"status": "running", "started": "2020-01-02T09:00:00", "pid": 1})
    write(root / "killed" / ".lock", "1\n")  # left behind, held by no process: the run was killed
    fabricate(root / "multi-run", "model: {path: default}\nmethod: {name: full}\ntasks: [{name: topics}, {name: german}]\n",
              {"status": "complete", "started": "2020-01-03T09:00:00", "seconds": 320.0}, MULTI_METRICS, MULTI_LOG)
    fabricate(root / "live", config, {"status": "running", "started": "2030-01-01T09:00:00"})
    write(root / "not-a-run" / "config.yaml", config)
    (root / "group" / "notes").mkdir()
    lock = RunLock(root / "live").acquire()  # a run in progress holds its lock
    yield root
    lock.release()


def metrics_of(run_dir):
    """A single-task run's figures: its one task's section, with the run's training facts."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics["tasks"]["classification"], "train": metrics["train"]}


def run_cli(capsys, *args):
    code = main([*map(str, args)])
    return code, " ".join(capsys.readouterr().out.split())


def test_runs_are_found_one_and_two_levels_deep_oldest_first(runs):
    records = find_runs(runs)
    assert [r.name for r in records] == ORDER
    assert {r.name: r.status for r in records} == {"broken": "failed", "killed": "interrupted", "multi-run": "complete",
                                                  "lora-run": "complete", "full-run": "complete", "live": "running"}


def test_listing_reads_figures_from_the_run_files(runs, tiny_model_dir):
    summaries = {r.name: r.summary() for r in find_runs(runs)}
    lora, full = summaries["lora-run"], summaries["full-run"]
    assert (lora["method"], lora["task"], lora["model"], lora["steps"]) == ("lora", "classification", str(tiny_model_dir), 3)
    assert (full["method"], full["steps"]) == ("full", 4)
    for summary, path in ((lora, runs / "lora-run"), (full, runs / "group" / "full-run")):
        metrics = metrics_of(path)
        variants = metrics["variants"]
        assert summary["train_seconds"] == metrics["train"]["seconds"]
        assert summary["headline"]["classification"] == {
            "metric": "accuracy", "fine_tuned": variants["fine_tuned"]["accuracy"],
            "best_prompting": max(m["accuracy"] for v, m in variants.items() if v.startswith(("zero_shot", "few_shot"))),
            "best_prompting_variant": metrics["best_prompting"]["variant"],
            "gain_points": pytest.approx(100 * (variants["fine_tuned"]["accuracy"] -
                                                metrics["best_prompting"]["value"]))}
    broken = summaries["broken"]  # no metrics.json: steps and seconds from train_log.json
    assert (broken["steps"], broken["train_seconds"], broken["error"], broken["headline"]) == (2, 1.5, "loss is NaN at step 2", {})


def test_listing_rows_for_a_multi_task_run(runs):
    rows = {row[0]: row for row in listing_rows(find_runs(runs))}
    # BLEU is already 0-100, so its gain is in BLEU points; accuracy's is in percentage points.
    assert rows["multi-run"] == ["multi-run", "complete", "2020-01-03 09:00:00", "topics\ngerman", "full", "default",
                                 "40", "300", "accuracy 0.887\nbleu 30.5", "+47.4 pts\n+18.5 pts"]
    assert rows["broken"][6:] == ["2", "2", "-", ""]


def test_runs_json(runs, capsys):
    assert main(["runs", str(runs), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ORDER
    multi = next(r for r in listed if r["name"] == "multi-run")
    assert multi["headline"]["topics"]["gain_points"] == pytest.approx(47.4)
    assert multi["headline"]["german"] == {"metric": "bleu", "fine_tuned": 30.5, "best_prompting": 12.0,
                                           "best_prompting_variant": "zero_shot", "gain_points": pytest.approx(18.5)}


def test_runs_table(runs, capsys, monkeypatch):
    from tailorlm.ui import console

    monkeypatch.setattr(console, "_width", 250)  # the test's pipe is not a terminal: rich would assume 80 columns
    code, out = run_cli(capsys, "runs", runs)
    assert code == 0
    assert f"Runs under {runs}: 6" in out
    assert "│ killed │ interrupted │ 2020-01-02 09:00:00 │ classification │ lora │" in out
    assert "│ topics │" in out and "│ accuracy 0.887 │" in out and "+47.4 pts" in out and "not-a-run" not in out


def test_a_damaged_run_is_skipped_with_a_warning(runs, tmp_path, capsys):
    shutil.copytree(runs / "multi-run", tmp_path / "ok")
    shutil.copytree(runs / "multi-run", tmp_path / "damaged")
    write(tmp_path / "damaged" / "metrics.json", '{"tasks": ')
    assert [r.name for r in find_runs(tmp_path)] == ["ok"]
    assert f"warning: skipped {tmp_path / 'damaged' / 'metrics.json'}: invalid JSON" in capsys.readouterr().err


def test_runs_errors_and_empty_folders(tmp_path, capsys):
    assert run_cli(capsys, "runs", tmp_path / "nope") == (
        2, f"error: {tmp_path / 'nope'}: no such directory, so no runs to list there (tailor run writes each run "
           f"into runs/ under the folder it is started from, or where --output says)")
    assert run_cli(capsys, "runs", tmp_path) == (0, f"no runs under {tmp_path} (a run directory holds config.yaml and run.json)")


def test_compare_two_real_runs(runs, tmp_path, capsys):
    lora, full = runs / "lora-run", runs / "group" / "full-run"
    code, out = run_cli(capsys, "compare", lora, full, "--output", tmp_path / "cmp")
    assert code == 0 and f"Saved compare.md, compare.json, curves.png in {tmp_path / 'cmp'}/" in out
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["lora-run", "full-run"]
    assert set(saved["config_diff"]) == DIFFERING
    assert saved["config_diff"]["method.name"] == ["lora", "full"]
    assert saved["config_diff"]["eval.baselines"] == [["zero_shot"], ["zero_shot", "few_shot"]]

    rows = {(m["task"], m["variant"], m["metric"]): m["values"] for m in saved["metrics"]}
    lora_m, full_m = metrics_of(lora)["variants"], metrics_of(full)["variants"]
    assert rows[("classification", "fine_tuned", "accuracy")] == [lora_m["fine_tuned"]["accuracy"], full_m["fine_tuned"]["accuracy"]]
    assert rows[("classification", "few_shot", "macro_f1")] == [None, full_m["few_shot"]["macro_f1"]]
    assert ("classification", "fine_tuned", "confusion") not in rows and ("classification", "fine_tuned", "n") not in rows
    assert saved["training"]["train steps"] == [3, 4] and saved["training"]["status"] == ["complete", "complete"]
    facts = metrics_of(lora)["train"]  # tokens/s counts the optimizer steps, not the evaluations between them
    assert 0 < facts["step_seconds"] <= facts["seconds"]
    assert saved["training"]["tokens/s"][0] == round(facts["tokens"] / facts["step_seconds"])

    for label, run_dir in (("lora-run", lora), ("full-run", full)):
        log = json.loads((run_dir / "train_log.json").read_text())
        assert saved["curves"]["train_loss"][label] == [[r["step"], r["loss"]] for r in log["train_loss"]]
        assert saved["curves"]["train_loss/lr"][label] == [[r["step"], r["lr"]] for r in log["train_loss"]]
        assert saved["curves"]["val_loss"][label] == [[r["step"], r["loss"]] for r in log["val_loss"]]
    assert [s for s, _ in saved["curves"]["train_loss"]["full-run"]] == [1, 2, 3, 4]

    from matplotlib.image import imread

    image = imread(tmp_path / "cmp" / "curves.png")  # one 650x360 px panel per curve, two panels a row
    assert image.shape[:2] == (360 * -(-len(saved["curves"]) // 2), 1300)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.startswith("# Comparing 2 runs: lora-run, full-run")
    assert "| method.name | lora | full |" in md and "| train.max_steps | 3 | 4 |" in md
    assert "| classification | few-shot prompting | accuracy | - |" in md
    assert "| train steps | 3 | 4 |" in md and "![curves.png](curves.png)" in md
    assert "| model.path |" not in md  # identical keys are left out


def test_compare_runs_of_different_tasks_where_they_overlap(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output folder is ./compare-<timestamp>
    assert main(["compare", str(runs / "lora-run"), str(runs / "multi-run")]) == 0
    [out_dir] = tmp_path.glob("compare-*")
    assert sorted(p.name for p in out_dir.iterdir()) == ["compare.json", "compare.md", "curves.png"]
    saved = json.loads((out_dir / "compare.json").read_text())
    rows = {(m["task"], m["variant"], m["metric"]): m["values"] for m in saved["metrics"]}
    assert rows[("topics", "fine_tuned", "accuracy")] == [None, 0.887]
    assert rows[("german", "vs prompting", "bleu (pts)")] == [None, 18.5]
    assert rows[("classification", "zero_shot", "accuracy")][1] is None
    assert saved["config_diff"]["tasks.0.name"] == [None, "topics"]  # absent from the single-task run
    assert saved["curves"]["val_metrics/accuracy"] == {"multi-run": [[20, 0.5], [40, 0.75]]}  # any list of {step, ...}
    assert set(saved["curves"]["train_loss"]) == {"lora-run", "multi-run"}
    assert saved["training"]["train steps"][1] == 40 and saved["training"]["tokens/s"][1] == 200


def test_compare_errors_name_the_path(runs, tmp_path, capsys):
    good, not_run, missing = runs / "lora-run", runs / "not-a-run", tmp_path / "missing"
    assert run_cli(capsys, "compare", good, not_run) == (2, f"error: {not_run}: not a run directory (no run.json)")
    assert run_cli(capsys, "compare", missing, good) == (2, f"error: {missing}: no such run directory")
    assert run_cli(capsys, "compare", good) == (2, "error: tailor compare needs at least two run directories")
    assert run_cli(capsys, "compare", good, good) == (2, f"error: {good}: given more than once")
    assert not list(tmp_path.glob("compare-*"))


def test_same_named_runs_are_labelled_by_path(runs, tmp_path):
    from tailorlm.track.compare import compare_runs

    twin = tmp_path / "lora-run"
    shutil.copytree(runs / "lora-run", twin, ignore=shutil.ignore_patterns(".lock", "adapter", "tensorboard"))
    comparison = compare_runs([runs / "lora-run", twin])
    assert comparison.labels == [str(runs / "lora-run"), str(twin)]
    assert comparison.config_diff == {}
