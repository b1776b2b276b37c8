"""Crash-safe, exactly resumable checkpoints.

A checkpoint is a folder `checkpoints/step-00000040/` with:
  weights.safetensors   every parameter the method can change (strategy.checkpoint_params)
  trainer.safetensors   optimizer and schedule state, RNG states: the tensors, with the structure around
                        them as JSON in the file's metadata (no pickle: nothing in a checkpoint can run code)
  state.json            the loop's position and history (step, epoch, batch, losses, best so far)
  COMPLETE              written last: a manifest of each file's size and SHA-256. A folder without it is a
                        torn write and is never read; one whose files do not match it (a disk that filled up,
                        a truncated copy, an edited file) is skipped for the newest checkpoint that does

Writes are atomic: everything goes into `.tmp-step-N/`, each file is fsynced, the folder is renamed into
place, COMPLETE is written and synced, and only then does `latest` (a one-line file, written by the run
directory's one write rule, rundir.write_text) move and are old checkpoints pruned. A kill at any moment
leaves the previous checkpoint intact; a write that fails (a full disk) removes its partial files at once and
says which checkpoint could not be written.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tailorlm.errors import DiskFullError, TailorError, is_disk_full
from tailorlm.rundir import fsync_file, fsync_folder, write_text
from tailorlm.ui import console

MARKER = "COMPLETE"
FILES = ("weights.safetensors", "trainer.safetensors", "state.json")
STRUCTURE_KEY = "tailorlm.trainer"  # the safetensors metadata entry that holds the trainer state's structure


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
        """Write one checkpoint. A write that fails removes what it had written (the temporary folder, or the
        renamed one before COMPLETE marks it), so a full disk gets back the space it filled; a failure for want
        of space is a DiskFullError naming the checkpoint."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = self.root / f".tmp-{final.name}"
        renamed = marked = False
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            # contiguous CPU copies: safetensors needs them, and the live tensors keep training on their device
            save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()},
                      tmp / "weights.safetensors")
            save_trainer(trainer, tmp / "trainer.safetensors")
            (tmp / "state.json").write_text(json.dumps(state))
            for name in FILES:
                fsync_file(tmp / name)
            fsync_folder(tmp)
            if final.exists():  # a complete checkpoint of the same step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            renamed = True
            fsync_folder(self.root)
            (final / MARKER).write_text(json.dumps({"files": {name: _fingerprint(final / name) for name in FILES}}))
            fsync_file(final / MARKER)
            fsync_folder(final)
            marked = True
            write_text(self.root / "latest", final.name + "\n")
            if best_step is not None:
                write_text(self.root / "best", self.path(best_step).name + "\n")
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if renamed and not marked:  # never read without its marker: only the space it holds is left
                shutil.rmtree(final, ignore_errors=True)
            if is_disk_full(e):  # safetensors reports it as its own error type: said here as what it is
                raise DiskFullError(final, self.root, e) from e
            raise
        self.prune(best_step)
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / MARKER).is_file())

    def latest(self, verify: bool = False) -> Path | None:
        """The newest complete checkpoint (a scan: the `latest` pointer may lag a kill). verify=True reads every
        file against the manifest and falls back, saying so, past any that do not match."""
        for path in reversed(self.complete()):
            problem = damage(path) if verify else None
            if problem is None:
                return path
            console.print(f"[yellow]checkpoint {path} is damaged ({problem}); trying the one before it[/]", soft_wrap=True)
        return None

    def best(self) -> Path | None:
        pointer = self.root / "best"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / MARKER).is_file():
                problem = damage(path)
                if problem is None:
                    return path
                console.print(f"[yellow]the best checkpoint {path} is damaged ({problem}); keeping the final "
                              f"weights instead[/]", soft_wrap=True)
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


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def damage(path: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is not a manifest written by this version of tailorlm"
    if set(manifest) != set(FILES):
        return f"{MARKER} lists {sorted(manifest)}, expected {list(FILES)}"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected.get('bytes')}"
        if _fingerprint(file)["sha256"] != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def _pack(value, tensors: dict):
    """JSON-able structure with each tensor replaced by a reference into `tensors`. Tuples and dicts with
    non-string keys (optimizer states key by index) are tagged so they come back as they were."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        pairs = [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]
        return {"__dict__": pairs}
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"internal: cannot store a {type(value).__name__} in a checkpoint")


def _unpack(value, tensors: dict):
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_unpack(v, tensors) for v in value["__tuple__"])
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["__dict__"]}
    return value


def save_trainer(trainer: dict, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(trainer, tensors)
    save_file(tensors, path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def _read_trainer(path: Path) -> dict:
    from safetensors import safe_open

    file = path / "trainer.safetensors"
    if not file.is_file():
        old = " (trainer.pt: a pickle from an older tailorlm, which is no longer loaded)" if (path / "trainer.pt").exists() else ""
        raise TailorError(f"{path}: no trainer.safetensors{old}; start the run again")
    try:
        with safe_open(str(file), framework="pt") as f:
            structure = json.loads((f.metadata() or {})[STRUCTURE_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return _unpack(structure, tensors)
    except Exception as e:  # a bad header, no structure entry, a reference to a missing tensor
        raise TailorError(f"{file} is not a trainer state written by tailorlm "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None


def load_weights(path: Path, params: dict[str, torch.nn.Parameter]) -> None:
    """Copy a checkpoint's weights into the live parameters (names must match the method's set)."""
    try:
        saved = load_file(path / "weights.safetensors")
    except Exception as e:  # SafetensorError or OSError: not the file tailorlm wrote
        raise TailorError(f"{path / 'weights.safetensors'} is not a readable safetensors file "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = set(params) - set(saved)
    if missing:
        raise TailorError(f"{path}: checkpoint lacks {len(missing)} parameter(s) this run trains, e.g. "
                          f"{sorted(missing)[0]} (was it written with another method or model?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def load_trainer(path: Path) -> tuple[dict, dict]:
    """(trainer state: optimizer, schedule, rng; loop state from state.json)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise TailorError(f"{path / 'state.json'} is not readable loop state ({e})") from None
    return _read_trainer(path), state
