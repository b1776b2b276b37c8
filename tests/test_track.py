"""Tracker: scalars, config and hparams in TensorBoard event files; params, metric history, artifacts and status in
a local MLflow SQLite store; the disabled tracker, idempotent close, the missing-MLflow error."""
import json
import sys

import pytest

from tailorlm.config import RunConfig
from tailorlm.errors import TailorError
from tailorlm.track.tracker import MLFLOW_MISSING, Tracker

LOSSES = {1: 2.5, 2: 2.0, 3: 1.75}


def config(**track) -> RunConfig:
    return RunConfig.model_validate({"track": track, "output": {"name": "sentiment"}, "train": {"lr": 2e-4}})


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def test_tensorboard_gets_scalars_config_and_hparams(tmp_path):
    out = tmp_path / "run-a"
    with Tracker.open(out, config()) as tracker:
        for step, loss in LOSSES.items():
            tracker.log_metrics({"train/loss": loss, "train/lr": 1e-4 * step, "val/loss": None}, step)
        tracker.log_metrics({"val/accuracy": 0.75}, 3)
        tracker.log_artifacts([out / "report.md"])  # TensorBoard has no artifacts: ignored, no error
    acc = events(out)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == list(LOSSES.items())
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3]
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(3e-4)
    assert [(e.step, e.value) for e in acc.Scalars("val/accuracy")] == [(3, 0.75)]
    assert "val/loss" not in acc.Tags()["scalars"]  # a None value is skipped, not logged as 0
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: sentiment" in config_text and "lr: 0.0002" in config_text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and b"train.lr" in hparams["_hparams_/session_start_info"]
    assert json.loads((out / "tracking.json").read_text()) == {"status": "complete", "tensorboard": "tensorboard"}


def test_disabled_tracker_writes_nothing(tmp_path):
    out = tmp_path / "rank-1"
    tracker = Tracker.open(out, config(mlflow=True), enabled=False)
    tracker.log_params({"extra": 1})
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_artifacts([tmp_path])
    tracker.close("complete")
    assert not out.exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_close_is_idempotent_and_logging_after_it_is_ignored(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker.open(out, config())
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.close("complete")
    tracker.close("failed")
    tracker.log_metrics({"train/loss": 9.0}, 2)
    assert json.loads((out / "tracking.json").read_text())["status"] == "complete"
    assert [(e.step, e.value) for e in events(out).Scalars("train/loss")] == [(1, 1.0)]


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory):
    """One runs folder for the MLflow tests: they share its mlflow.db, as runs of one project do."""
    pytest.importorskip("mlflow")
    return tmp_path_factory.mktemp("runs")


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    facts = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(facts["tracking_uri"])
    return client, client.get_run(facts["run_id"]), facts


def test_mlflow_gets_params_metric_history_artifacts_and_status(mlflow_root):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out = mlflow_root / "sentiment-1"
    cfg = RunConfig.model_validate({"track": {"mlflow": True}, "output": {"name": "sentiment"},
                                    "template": {"instruction": "Classify. " * 1000}})
    tracker = Tracker.open(out, cfg)
    tracker.log_params({"data": {"train_examples": 17}})
    for step, loss in LOSSES.items():
        tracker.log_metrics({"train/loss": loss}, step)
    (out / "report.md").write_text("# report")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG")
    tracker.log_artifacts([out / "report.md", out / "plots", out / "missing.json"])
    tracker.close("complete")
    tracker.close("failed")  # idempotent: the status stays FINISHED

    client, run, facts = mlflow_run(out)
    assert facts["tracking_uri"] == f"sqlite:///{mlflow_root.resolve() / 'mlflow.db'}"
    assert facts["experiment"] == "sentiment" and run.info.run_name == "sentiment-1"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.train_examples"] == "17" and params["method.name"] == "lora"
    assert params["eval.baselines"] == '["zero_shot", "few_shot"]' and params["train.max_steps"] == "null"
    long = params["template.instruction"]
    assert len(long) == MAX_PARAM_VAL_LENGTH and long.endswith("...") and long.startswith("Classify. Classify.")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == list(LOSSES.items())
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["plots", "report.md"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
    assert (mlflow_root / "mlartifacts").is_dir()  # artifacts stored beside the database, not in ./mlruns


def test_a_failing_run_is_marked_failed_in_an_existing_experiment(mlflow_root):
    first = mlflow_root / "sentiment-1"
    out = mlflow_root / "sentiment-2"
    with pytest.raises(RuntimeError), Tracker.open(out, config(mlflow=True, tensorboard=False)) as tracker:
        tracker.log_metrics({"train/loss": 3.0}, 1)
        raise RuntimeError("loss is NaN")
    _, run, facts = mlflow_run(out)
    assert run.info.status == "FAILED"
    assert facts["experiment_id"] == mlflow_run(first)[2]["experiment_id"]
    assert json.loads((out / "tracking.json").read_text())["status"] == "failed"
    assert not (out / "tensorboard").exists()


def test_a_resumed_run_continues_its_mlflow_run(mlflow_root):
    out = mlflow_root / "resumed"
    first = Tracker.open(out, config(mlflow=True, tensorboard=False))
    first.log_metrics({"train/loss": 2.0}, 1)  # then the process is killed: close is never called
    with Tracker.open(out, config(mlflow=True, tensorboard=False)) as again:
        again.log_params({"resumed_from": 1})
        again.log_metrics({"train/loss": 1.5}, 2)
    client, run, facts = mlflow_run(out)
    assert facts["run_id"] == first.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["resumed_from"] == "1"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")) == [(1, 2.0), (2, 1.5)]


def test_missing_mlflow_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import raise ImportError
    out = tmp_path / "run"
    with pytest.raises(TailorError) as err:
        Tracker.open(out, config(mlflow=True))
    assert str(err.value) == MLFLOW_MISSING == "track.mlflow needs MLflow: pip install 'tailorlm[mlflow]'"
    assert not any(out.iterdir())
