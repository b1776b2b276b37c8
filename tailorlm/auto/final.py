"""After the search: the test split, read once. The winner is scored on it as `tailor run` scores a trained
model, beside every candidate model's prompting baselines (each kind the config asks for), the classic model
and the majority class, all on the same test rows. The winner's trial folder then holds a finished run's
metrics.json, predictions and manifest, so `tailor predict`, `chat`, `serve` and `export` take it as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tailorlm.auto.candidates import Candidate
from tailorlm.config import RunConfig
from tailorlm.eval.baselines import best_prompting
from tailorlm.eval.results import Results
from tailorlm.models.trained import load_trained
from tailorlm.pipeline import stages
from tailorlm.pipeline.prepare import prepare
from tailorlm.pipeline.runner import answer_decoding
from tailorlm.rundir import RunDir
from tailorlm.ui import stage


@dataclass
class Final:
    results: Results  # the winner's test table: its model's prompting rows, classic, majority, fine-tuned
    prompting: dict[str, dict | None]  # candidate model -> its best prompting result on test ({variant, value})
    task: str


def evaluate_winner(run_dir: Path, base: RunConfig, candidates: list[Candidate], winner_model: str, device,
                    trust_remote_code: bool = False) -> Final:
    """Score the winning trial on the test split, with every candidate model's prompting baselines. The trial's
    own config is used (so eval.decoding=auto chooses on the validation answers the trial was scored on), with
    the test split switched back on."""
    trial = RunDir(run_dir)
    trial_cfg = trial.config(trust_remote_code=trust_remote_code)
    cfg = trial_cfg.model_copy(update={"eval": trial_cfg.eval.model_copy(update={"test": True})})
    prepared = prepare(cfg)
    scorers = stages.evaluators(prepared, device)
    (name, task), = prepared.tasks.items()
    prompting, found = {}, None
    for candidate in candidates if cfg.eval.baselines else []:
        stage(f"Test split: prompting {candidate.name}")
        same = candidate.name == winner_model
        mine = prepared if same else prepare(base.model_copy(update={
            "model": base.model.model_copy(update={"path": candidate.path}), "eval": cfg.eval}))
        loaded = stages.load_base(mine, device)
        measured = stages.baselines(mine, loaded.model, scorers if same else stages.evaluators(mine, device))
        prompting[candidate.name] = best_prompting(measured.variants.get(name, {}), task.template.task.headline)
        if same:
            found = measured
        del loaded
    stage("Test split: the winner")
    trained = load_trained(run_dir, device, trust_remote_code=trust_remote_code)
    results = stages.evaluate(prepared, trained.model, scorers, found or stages.Baselines({name: {}}))
    _complete(trial, results, found, trust_remote_code)
    return Final(results, prompting, name)


def _complete(trial: RunDir, results: Results, found: stages.Baselines | None, trust_remote_code: bool) -> None:
    """The trial folder as a finished run: metrics.json with its test section, the test predictions, and the
    decoding its answers use in the manifest."""
    metrics = trial.metrics()
    metrics["tasks"] = results.sections()
    trial.write("metrics.json", metrics)
    trial.write_rows("predictions.jsonl", (found.predictions if found else []) + results.predictions)
    cfg = trial.config(trust_remote_code=trust_remote_code)
    manifest = trial.manifest(cfg)
    for name, entry in manifest.tasks.items():
        entry.decoding = answer_decoding(cfg.eval.decoding, results.tasks.get(name))
    trial.write_manifest(manifest)
