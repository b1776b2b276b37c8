"""A run or model made ready to answer: loaded for inference, then given a generation engine.

`tailor chat`, `tailor predict`, `tailor serve` (PyTorch or llama.cpp), Run.predict/generate/chat and the
studio's Chat all load here, through models/trained.py, so each sees the run's base model, trained weights,
template and chat format exactly as evaluation did. A LoRA adapter is merged into the base weights on load:
the same function, one matmul per layer instead of two.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tailorlm.errors import TailorError

if TYPE_CHECKING:
    import torch

    from tailorlm.models.trained import Trained
    from tailorlm.serve.engine import Engine

BACKENDS = ("torch", "llamacpp")


@dataclass
class OpenedEngine:
    engine: Engine
    name: str  # the model id clients use: the run directory's name, or the model file's or folder's
    trained: Trained | None  # the model in PyTorch; None under llama.cpp, which reads the run's GGUF itself


@dataclass
class RunBesideBase:
    """A run and its base model, both under the run's template and system prompt, so only the weights differ."""
    device: torch.device
    trained: dict[str, Trained]  # "fine_tuned", "base"
    engines: dict[str, Engine]  # the same keys


def load_for_inference(model: str | Path, device: str = "auto",
                       trust_remote_code: bool = False) -> tuple[Trained, torch.device]:
    """A run directory (its adapter merged) or a plain model (a folder, a .gguf, 'default'), on the device
    `device` resolves to (auto: a GPU when there is one); returns the model and that device."""
    from tailorlm.models.loading import resolve_device
    from tailorlm.models.trained import load_trained

    resolved = resolve_device(device)
    return load_trained(model, resolved, merge=True, trust_remote_code=trust_remote_code), resolved


def engine_for(trained: Trained, device: torch.device | str, max_batch: int = 8) -> Engine:
    """The PyTorch engine for a loaded model, prompting it with its own chat format (the run's template)."""
    from tailorlm.serve.engine import Engine

    return Engine(trained.model, trained.tokenizer, trained.chat_format(), device, max_batch)


def open_engine(model: str, *, backend: str = "torch", device: str = "auto", max_batch: int = 8,
                threads: int | None = None, trust_remote_code: bool = False) -> OpenedEngine:
    """An engine for a run or model, named as clients will ask for it. torch: the model in PyTorch on `device`,
    up to max_batch greedy requests generated together. llamacpp: a .gguf file, or a finished run's GGUF export,
    in llama.cpp on the CPU with `threads` threads (default: all)."""
    if backend == "llamacpp":
        from tailorlm.serve.llamacpp import load_llamacpp_engine

        engine, name = load_llamacpp_engine(model, threads)
        return OpenedEngine(engine, name, None)
    if backend != "torch":
        raise TailorError(f"unknown engine '{backend}'; choose one of: {', '.join(BACKENDS)}")
    trained, resolved = load_for_inference(model, device, trust_remote_code)
    return OpenedEngine(engine_for(trained, resolved, max_batch), model_id(model, trained), trained)


def model_id(path: str | Path, trained: Trained) -> str:
    """The name clients use: the run directory's name, or the model file or folder name."""
    if trained.run_dir is not None:
        return Path(path).resolve().name
    return Path(trained.base_source).name


def load_run_beside_base(run_dir: str | Path, device: str = "auto") -> RunBesideBase:
    """The run's model and its base model, each with an engine, for answering the same input side by side."""
    from tailorlm.models.trained import load_trained

    tuned, resolved = load_for_inference(run_dir, device)
    base = load_trained(tuned.base_source, resolved)
    # The run's Trained with the base weights: the run's config, so the base is prompted with the run's template.
    trained = {"fine_tuned": tuned, "base": dataclasses.replace(tuned, model=base.model, tokenizer=base.tokenizer)}
    return RunBesideBase(resolved, trained, {side: engine_for(model, resolved) for side, model in trained.items()})
