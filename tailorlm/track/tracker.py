"""Experiment tracking for one run: TensorBoard event files always (track.tensorboard), MLflow when asked.

The training loop holds one Tracker per run and calls it at the same points whatever the backends:

    with Tracker.open(out_dir, cfg, enabled=rank == 0) as tracker:
        tracker.log_params({"data.train_examples": n})
        tracker.log_metrics({"train/loss": loss, "train/lr": lr}, step)
        tracker.log_artifacts([out_dir / "report.md", out_dir / "metrics.json"])
    # close("complete"), or close("failed") when the block raised

The run's config is logged when the tracker opens (TensorBoard text, MLflow params), so every run carries it
even if log_params is never called. <run>/tracking.json records where the run was tracked (the MLflow run id),
for `tailor runs`, `tailor compare` and anyone opening the MLflow UI. <run>/live.jsonl gets one JSON line per
logged step as it happens (the studio's live curves read it). A disabled tracker (distributed ranks
other than 0) writes nothing at all.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tailorlm.config import RunConfig
from tailorlm.errors import TailorError
from tailorlm.rundir import read_json, write_json
from tailorlm.track.flat import as_text, flatten

MLFLOW_MISSING = "track.mlflow needs MLflow: pip install 'tailorlm[mlflow]'"
MLFLOW_STATUS = {"complete": "FINISHED", "failed": "FAILED"}  # anything else (interrupted, killed): KILLED
PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch call


class Tracker:
    """Use Tracker.open(...); the constructor only holds state."""

    def __init__(self, out_dir: Path, cfg: RunConfig, enabled: bool):
        self.out_dir, self.cfg, self.enabled = Path(out_dir), cfg, enabled
        self.params: dict[str, object] = {}
        self.last_metrics: dict[str, float] = {}  # final value of each metric, for TensorBoard's hparams
        self.writer = None  # torch SummaryWriter
        self.mlflow = None  # MlflowClient
        self.mlflow_run_id: str | None = None
        self._mlflow_facts: dict = {}
        self._mlflow_logged: set[str] = set()  # params are write-once in MLflow
        self.closed = not enabled

    @classmethod
    def open(cls, out_dir: Path, cfg: RunConfig, enabled: bool = True) -> Tracker:
        tracker = cls(out_dir, cfg, enabled)
        if not enabled:
            return tracker
        tracker.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.track.mlflow:
            tracker._open_mlflow()  # first: a missing MLflow fails before anything is written
        if cfg.track.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tracker.writer = SummaryWriter(log_dir=str(tracker.out_dir / "tensorboard"))
            # Indented four spaces: TensorBoard renders text as Markdown, and this keeps the YAML a code block.
            tracker.writer.add_text("config", "\n".join("    " + line for line in cfg.to_yaml().splitlines()))
        tracker._write_tracking("running")
        tracker.log_params({})
        return tracker

    def log_params(self, params: dict) -> None:
        """The flattened run config plus `params` (nested dicts are flattened too). MLflow params are write-once:
        a key logged again keeps its first value there; TensorBoard's hparams get the latest."""
        if self.closed:
            return
        new = {**flatten(self.cfg.model_dump(mode="json")), **flatten(params)}
        self.params.update(new)
        fresh = {k: v for k, v in new.items() if k not in self._mlflow_logged}
        self._mlflow_logged.update(fresh)
        if self.mlflow is not None and fresh:
            from mlflow.entities import Param

            items = [Param(k, _truncated(as_text(v))) for k, v in fresh.items()]
            for i in range(0, len(items), PARAMS_PER_BATCH):
                self.mlflow.log_batch(self.mlflow_run_id, params=items[i:i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an optimizer step, named 'group/name' (train/loss, val/accuracy); None values are skipped."""
        if self.closed:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        self.last_metrics.update(values)
        if values:  # live.jsonl: what a watcher (the studio, `tail -f`) reads while the run goes on
            with open(self.out_dir / "live.jsonl", "a", encoding="utf-8") as live:
                live.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=step)
        if self.mlflow is not None and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files or folders into the MLflow run (TensorBoard has no place for them); missing paths are skipped."""
        if self.closed or self.mlflow is None:
            return
        for path in map(Path, paths):
            if path.is_dir():
                self.mlflow.log_artifacts(self.mlflow_run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.mlflow.log_artifact(self.mlflow_run_id, str(path))

    def close(self, status: str = "complete") -> None:
        """End the run: 'complete' or 'failed' (MLflow FINISHED / FAILED). Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.writer is not None:
                self._write_hparams()
                self.writer.close()
        finally:
            try:
                if self.mlflow is not None:
                    self.mlflow.set_terminated(self.mlflow_run_id, MLFLOW_STATUS.get(status, "KILLED"))
            finally:
                self._write_tracking(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close("complete" if exc_type is None else "interrupted" if issubclass(exc_type, KeyboardInterrupt)
                   else "failed")
        return False

    def _open_mlflow(self) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TailorError(MLFLOW_MISSING) from None
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..." chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        track, root = self.cfg.track, self.out_dir.resolve().parent
        uri = track.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"
        # The default store keeps artifacts beside the database; a user's own URI keeps its server's defaults.
        artifacts = None if track.mlflow_uri else (root / "mlartifacts").as_uri()
        name = track.experiment or self.cfg.output.name
        self.mlflow = MlflowClient(tracking_uri=uri)
        try:
            run = self._resumed_run(uri)
            if run is None:
                run = self.mlflow.create_run(self._experiment_id(name, artifacts), run_name=self.out_dir.name,
                                             tags={"tailorlm.run_dir": str(self.out_dir.resolve())})
        except MlflowException as e:
            raise TailorError(f"MLflow at {uri}: {e.message}") from None
        self.mlflow_run_id = run.info.run_id
        self._mlflow_logged = set(run.data.params)
        self._mlflow_facts = {"tracking_uri": uri, "experiment": name, "experiment_id": run.info.experiment_id,
                              "run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}

    def _resumed_run(self, uri: str):
        """The MLflow run this directory was tracked in before (a resumed run: `tailor run --resume`), reopened, so
        one directory stays one MLflow run; None for a new directory or when that run is gone from the store."""
        from mlflow.exceptions import MlflowException

        try:
            before = read_json(self.out_dir / "tracking.json").get("mlflow") or {}
        except TailorError:  # a damaged tracking.json: start a new MLflow run
            return None
        if before.get("tracking_uri") != uri or not before.get("run_id"):
            return None
        try:
            self.mlflow.update_run(before["run_id"], status="RUNNING")
            return self.mlflow.get_run(before["run_id"])
        except MlflowException:
            return None

    def _experiment_id(self, name: str, artifacts: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.mlflow.create_experiment(name, artifact_location=artifacts)
        except MlflowException:
            experiment = self.mlflow.get_experiment_by_name(name)  # another run may have created it a moment ago
            if experiment is None:
                raise
            return experiment.experiment_id

    def _write_hparams(self) -> None:
        """TensorBoard's HPARAMS tab: the config beside each metric's final value. The summaries go into the run's
        own event files (SummaryWriter.add_hparams would start a second run folder and re-log the scalars)."""
        if not self.last_metrics:
            return
        from torch.utils.tensorboard.summary import hparams

        simple = {k: v if isinstance(v, (bool, int, float, str)) else as_text(v) for k, v in self.params.items()}
        finals = {k: v for k, v in self.last_metrics.items() if math.isfinite(v)}
        for summary in hparams(simple, finals):
            self.writer._get_file_writer().add_summary(summary)

    def _write_tracking(self, status: str) -> None:
        facts = {"status": status, "tensorboard": "tensorboard" if self.writer is not None else None}
        if self.mlflow is not None:
            facts["mlflow"] = self._mlflow_facts
        write_json(self.out_dir / "tracking.json", facts)


def _truncated(text: str) -> str:
    """MLflow rejects (older versions) or cuts with a warning (newer) param values over its limit: cut it here,
    marked, so a long template or path never stops a run."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500  # the limit of MLflow < 2.
    return text if len(text) <= limit else text[: limit - 3] + "..."
