"""What the studio tells about this machine and the models on it: the facts that decide which model and settings
fit (processor, memory, GPU), and the models a run can start from without typing a path."""
from __future__ import annotations

import os
import platform
from pathlib import Path

SCAN_DEPTH = 3  # folders below each data folder searched for models: deep enough for data/models/name/
SCAN_LIMIT = 50  # models listed at most; a data folder full of checkpoints should not stall the page


def machine_facts() -> dict:
    """Processor, cores, memory and GPUs as PyTorch sees them (what training will use)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"processor": _processor_name(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "gpus": gpus,
            "torch": torch.__version__, "device": "cuda" if gpus else "cpu"}


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def installed_models(folders: list[Path]) -> list[dict]:
    """The embedded default (when its package is installed), then the .gguf files and Hugging Face model folders
    (a config.json with weights beside it) inside the studio's readable data folders."""
    models = []
    from tailorlm.errors import TailorError
    from tailorlm.models.loading import default_model_path

    try:
        models.append({"path": "default", "name": f"SmolLM2-135M-Instruct (embedded, {default_model_path().name})"})
    except TailorError:  # its package is not installed: nothing to offer
        pass
    for root in folders:
        for path in _walk(root, SCAN_DEPTH):
            if len(models) >= SCAN_LIMIT:
                return models
            models.append({"path": str(path), "name": str(path.relative_to(root)) or path.name})
    return models


def _walk(root: Path, depth: int):
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        # Links are not followed: what they point to may lie outside the folders this studio may read.
        if entry.is_file(follow_symlinks=False) and entry.name.endswith(".gguf"):
            yield path
        elif entry.is_dir(follow_symlinks=False):
            if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
                yield path
            elif depth > 1:
                yield from _walk(path, depth - 1)
