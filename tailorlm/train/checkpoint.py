"""Crash-safe, exactly resumable checkpoints.

A checkpoint is a folder `checkpoints/step-00000040/` with:
  weights.safetensors   every parameter the method can change (strategy.checkpoint_params)
  trainer.pt            optimizer and schedule state, RNG states (plain tensors and lists: loads with
                        torch.load(weights_only=True))
  state.json            the loop's position and history (step, epoch, batch, losses, best so far)
  COMPLETE              written last: a folder without it is a torn write and is never read

Writes are atomic: everything goes into `.tmp-step-N/`, each file is fsynced, the folder is renamed into
place, COMPLETE is written and synced, and only then does `latest` (a one-line file, itself replaced by
rename) move and are old checkpoints pruned. A kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tailorlm.errors import TailorError

MARKER = "COMPLETE"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
             "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, step: int, params: dict[str, torch.Tensor], trainer: dict, state: dict,
             best_step: int | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # contiguous CPU copies: safetensors needs them, and the live tensors keep training on their device
        save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()},
                  tmp / "weights.safetensors")
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        for name in ("weights.safetensors", "trainer.pt", "state.json"):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # a complete checkpoint of the same step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        (final / MARKER).write_text("ok\n")
        _fsync_file(final / MARKER)
        _fsync_dir(final)
        _write_text_atomic(self.root / "latest", final.name + "\n")
        if best_step is not None:
            _write_text_atomic(self.root / "best", self.path(best_step).name + "\n")
        self.prune(best_step)
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / MARKER).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the `latest` pointer, else a scan: the pointer may lag a kill)."""
        found = self.complete()
        return found[-1] if found else None

    def best(self) -> Path | None:
        pointer = self.root / "best"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / MARKER).is_file():
                return path
        return None

    def prune(self, best_step: int | None) -> None:
        keep = {p.name for p in self.complete()[-self.keep:]}
        if best_step is not None:
            keep.add(self.path(best_step).name)
        for path in self.root.glob("step-*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):  # torn writes of a killed process
            shutil.rmtree(tmp, ignore_errors=True)


def load_weights(path: Path, params: dict[str, torch.nn.Parameter]) -> None:
    """Copy a checkpoint's weights into the live parameters (names must match the method's set)."""
    saved = load_file(path / "weights.safetensors")
    missing = set(params) - set(saved)
    if missing:
        raise TailorError(f"{path}: checkpoint lacks {len(missing)} parameter(s) this run trains, e.g. "
                          f"{sorted(missing)[0]} (was it written with another method or model?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def load_trainer(path: Path) -> tuple[dict, dict]:
    """(trainer state: optimizer, schedule, rng; loop state from state.json)."""
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return trainer, json.loads((path / "state.json").read_text())
