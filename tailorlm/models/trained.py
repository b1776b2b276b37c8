"""Load what `tailor run` produced, for use: a run directory, or any model `model.path` accepts.

Export, chat, predict and serve all start here, so they see the model exactly as evaluation saw it: the run's
base model, its adapter (or fully fine-tuned weights), and the run's own template and chat format, so a
prompt is rendered token for token as in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tailorlm.config import ModelSpec, RunConfig
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.models.files import check_adapter
from tailorlm.models.loading import load_model, load_tokenizer, locate
from tailorlm.rundir import Manifest, RunDir, TaskManifest


@dataclass
class Trained:
    model: torch.nn.Module  # a PeftModel when the run trained an adapter and merge=False
    tokenizer: object
    cfg: RunConfig  # the run's config; defaults (classification preset) for a plain model
    run_dir: Path | None  # None for a plain model
    base_source: str  # the base model's path as loaded (folder, .gguf file)
    weights: Path | None  # the run's adapter/ or model/ folder
    manifest: Manifest | None = None  # the run's use-time facts (rundir.py); None for a plain model

    @property
    def method(self) -> str:
        return self.cfg.method.name if self.run_dir else "base"

    @property
    def is_adapter(self) -> bool:
        return self.weights is not None and self.weights.name == "adapter"

    @property
    def labels(self) -> list[str]:
        """The label set of a single-task run (classification), [] otherwise."""
        if self.manifest is None or len(self.manifest.tasks) != 1:
            return []
        return next(iter(self.manifest.tasks.values())).labels

    def task(self, name: str | None = None) -> tuple[RunConfig, TaskManifest]:
        """One task's config and manifest entry: the named one, or the run's only one when no name is given."""
        if self.manifest is None:
            return self.cfg, TaskManifest(self.cfg.template.preset, [], self.cfg.template.model_dump(mode="json"),
                                          "unknown")
        try:
            name, entry = self.manifest.task(name)
        except TailorError as e:
            raise TailorError(f"{self.run_dir}: {e}") from None
        spec = next((t for t in self.cfg.task_set() if t.name == name), None)
        if spec is None:  # the manifest and config.yaml disagree: the folder was edited by hand
            raise TailorError(f"{self.run_dir}: manifest.json has task '{name}', config.yaml does not")
        return self.cfg.for_task(spec), entry

    def template(self) -> PromptTemplate:
        return PromptTemplate(self.cfg.template)

    def chat_format(self) -> ChatFormat:
        return ChatFormat(self.tokenizer, self.cfg.template)


def is_run_dir(path: str | Path) -> bool:
    """A folder `tailor run` wrote (its config.yaml); RunDir.weights then says whether it finished."""
    return RunDir(path).is_run()


def load_trained(path: str | Path, device: torch.device | str = "cpu", merge: bool = False,
                 trust_remote_code: bool = False) -> Trained:
    """A run directory (base + trained weights + template) or a plain model (folder, .gguf, 'default').

    merge=True folds a LoRA adapter into the base weights (what `export --format hf|gguf` ships).
    trust_remote_code=True lets the model's own Python run; a run's config.yaml asking for it is not enough."""
    device = torch.device(device)
    run_dir = RunDir(path)
    if not run_dir.is_run():
        spec = ModelSpec(path=str(path), trust_remote_code=trust_remote_code)
        loaded = load_model(spec, device)
        return Trained(loaded.model, loaded.tokenizer, RunConfig(model=spec), None, loaded.source, None)
    cfg = run_dir.config(trust_remote_code=trust_remote_code)
    weights = run_dir.weights()
    manifest = run_dir.manifest(cfg)
    if weights.name == "adapter":
        check_adapter(weights)  # before the base model's seconds of loading
    if weights.name == "model":  # full fine-tuning saved the whole model (and its tokenizer)
        spec = cfg.model.model_copy(update={"path": str(weights)})
        loaded = load_model(spec, device, load_tokenizer(spec))
        model = loaded.model
    else:
        loaded = load_model(cfg.model, device, load_tokenizer(cfg.model))
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(loaded.model, str(weights), is_trainable=False).to(device)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a config or tensors PEFT rejects
            raise TailorError(f"{weights}: cannot load the adapter onto {cfg.model.path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if merge:
            model = model.merge_and_unload()
        model.eval()
    return Trained(model, loaded.tokenizer, cfg, run_dir.path, _base_source(cfg), weights, manifest)


def _base_source(cfg: RunConfig) -> str:
    folder, gguf_file = locate(cfg.model.path)
    return str(Path(folder) / gguf_file) if gguf_file else folder
