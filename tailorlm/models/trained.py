"""Load what `tailor run` produced, for use: a run directory, or any model `model.path` accepts.

Export, chat, predict and serve all start here, so they see the model exactly as evaluation saw it: the run's
base model, its adapter (or fully fine-tuned weights), and the run's own template and chat format, so a
prompt is rendered token for token as in training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorlm.config import ModelSpec, RunConfig, load_config
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.models.files import check_adapter
from tailorlm.models.loading import load_model, load_tokenizer


@dataclass
class Trained:
    model: torch.nn.Module  # a PeftModel when the run trained an adapter and merge=False
    tokenizer: object
    cfg: RunConfig  # the run's config; defaults (classification preset) for a plain model
    run_dir: Path | None  # None for a plain model
    base_source: str  # the base model's path as loaded (folder, .gguf file)
    weights: Path | None  # the run's adapter/ or model/ folder
    labels: list[str]  # the run's label set (classification), [] otherwise

    @property
    def method(self) -> str:
        return self.cfg.method.name if self.run_dir else "base"

    @property
    def is_adapter(self) -> bool:
        return self.weights is not None and self.weights.name == "adapter"

    def template(self) -> PromptTemplate:
        return PromptTemplate(self.cfg.template)

    def chat_format(self) -> ChatFormat:
        return ChatFormat(self.tokenizer, self.cfg.template)


def is_run_dir(path: str | Path) -> bool:
    """A folder `tailor run` wrote (its config.yaml); run_weights then says whether it finished."""
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").is_file() and not (p / "config.json").is_file()


def run_weights(run_dir: Path) -> Path:
    """The trained weights of a run: adapter/ (LoRA family) or model/ (full fine-tuning, freezing)."""
    for name in ("adapter", "model"):
        if (run_dir / name).is_dir():
            return run_dir / name
    status = _status(run_dir)
    raise TailorError(f"{run_dir}: no adapter/ or model/ folder (run status: {status}); "
                      f"was the run finished? `tailor run --resume {run_dir}` continues it")


def load_trained(path: str | Path, device: torch.device | str = "cpu", merge: bool = False,
                 trust_remote_code: bool = False) -> Trained:
    """A run directory (base + trained weights + template) or a plain model (folder, .gguf, 'default').

    merge=True folds a LoRA adapter into the base weights (what `export --format hf|gguf` ships).
    trust_remote_code=True lets the model's own Python run; a run's config.yaml asking for it is not enough."""
    device = torch.device(device)
    if not is_run_dir(path):
        spec = ModelSpec(path=str(path), trust_remote_code=trust_remote_code)
        loaded = load_model(spec, device)
        return Trained(loaded.model, loaded.tokenizer, RunConfig(model=spec), None, loaded.source, None, [])
    run_dir = Path(path)
    cfg = load_config(run_dir / "config.yaml", trust_remote_code=trust_remote_code)
    weights = run_weights(run_dir)
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
    return Trained(model, loaded.tokenizer, cfg, run_dir, _base_source(cfg), weights, _labels(run_dir))


def _base_source(cfg: RunConfig) -> str:
    from tailorlm.models.loading import locate

    folder, gguf_file = locate(cfg.model.path)
    return str(Path(folder) / gguf_file) if gguf_file else folder


def _labels(run_dir: Path) -> list[str]:
    report = run_dir / "data_report.json"
    if report.is_file():
        return list(json.loads(report.read_text()).get("labels") or [])
    return []


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "unknown"
