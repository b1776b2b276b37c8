"""The run directory: the one owner of every file `tailor run` writes and every later command reads.

Layout (a run is a list of tasks; a single-task run's one task is named after its preset):

    config.yaml        the resolved config            run.json          status: running | failed | complete
    manifest.json      what using the model needs     metrics.json      every variant's test metrics
    baselines.json     prompting results (resume)     train_log.json    losses, evaluations, events
    predictions.jsonl  every generated test answer    example_losses.jsonl
    report.md, *.png   for people                     adapter/ or model/, checkpoints/
    tasks/<name>/      each task's preflight.json, data_report.json, token_lengths.png, k_shot_curve.png

checkpoints/ belongs to train/checkpoint.py (CheckpointStore), which writes each one to a temporary folder
and renames it into place under the same rule.

Predict, serve, chat, export and the registry read a run only through `RunDir`, and use-time facts (labels,
template, chat layout, task, base model, a few test examples for export checks) come from manifest.json, not
from reports or the original data files, which may have moved. Every write follows one rule, `write_text`: a
temporary sibling, synced to disk, renamed into place, then the folder synced. A reader never sees half a file,
and neither a killed run nor a power cut leaves one (or an empty one) behind. A sweep's result files and the
checkpoint pointers (latest, best) are written by it too.

One process writes a run directory at a time. `RunLock` holds an exclusive flock on `<run>/.lock` (a
filelock.UnixFileLock) for the life of the process, with the holder's pid in the file; the kernel drops it
when the process dies, even by SIGKILL, so a crashed run never leaves a stale lock behind and `--resume` can
take over at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from filelock import Timeout, UnixFileLock

from tailorlm.config import RunConfig, load_config
from tailorlm.errors import DiskFullError, TailorError, is_disk_full

LOCK = ".lock"
MANIFEST_VERSION = 1
# metrics.json's layout: 2 keeps a section per task under "tasks" for every run. Schema 1 (no "schema" field)
# put a single-task run's section at the top level; RunDir.metrics upgrades it on read.
METRICS_SCHEMA = 2
WEIGHT_FOLDERS = ("adapter", "model")  # LoRA family / full fine-tuning and freezing


def write_text(path: Path, text: str) -> None:
    """The one write rule: a temporary sibling, synced, renamed into place (move_into_place), so readers never
    see a partial file and a power cut never leaves an empty one. A write that fails leaves no temporary file
    behind, and one that fails for want of space says so (DiskFullError)."""
    # The pid keeps processes that share a folder (a sweep's workers) from writing into each other's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        move_into_place(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(path, path.parent, e) from e
        raise


def move_into_place(tmp: Path, path: Path) -> Path:
    """A finished temporary file renamed over `path`. Its data reaches the disk before the rename, or a power
    cut could leave the new name on an empty file; the folder is synced after it, or the rename itself could
    be lost."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(path.parent)
    return path


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """A folder's entries (a rename, a new file) on disk: without it a power cut can lose them."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def read_json(path: Path) -> dict:
    """A run file as a dict; {} when it is missing (a failed run has no metrics.json), an error naming the file
    when it is damaged."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TailorError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


@dataclass
class TaskManifest:
    """What using one task of a trained model needs, recorded when the run ends."""
    preset: str  # classification, ner, ...
    labels: list[str]  # the closed label set (classification) or entity types (ner); [] for open answers
    template: dict  # the TemplateSpec the model was trained with
    chat_layout: str  # "chat template" (the tokenizer's) or "plain" (prompt + "Answer:")
    examples: list[dict] = field(default_factory=list)  # a few test examples: export checks render them
    # How the fine-tuned model answers (free or constrained): eval.decoding, or what validation chose under
    # eval.decoding=auto, so predict and serve answer as the run's headline was measured. None: an older run
    # (its eval.decoding decides).
    decoding: str | None = None


@dataclass
class Manifest:
    base_model: str  # model.path as configured ("default", a folder, a .gguf)
    method: str
    weights: str  # "adapter" or "model"
    tasks: dict[str, TaskManifest]
    version: int = MANIFEST_VERSION
    legacy: bool = False  # rebuilt from an older run's config.yaml and data_report.json

    def task(self, name: str | None = None) -> tuple[str, TaskManifest]:
        """One task's facts: the only task, or `name` in a multi-task run (an error lists the choices)."""
        if name is None and len(self.tasks) == 1:
            return next(iter(self.tasks.items()))
        if name not in self.tasks:
            what = "a multi-task run" if name is None else f"no task '{name}' in this run"
            raise TailorError(f"{what}; choose one with --task ({', '.join(self.tasks)})")
        return name, self.tasks[name]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: Path) -> Manifest:
        try:
            tasks = {name: TaskManifest(**t) for name, t in data["tasks"].items()}
            return cls(data["base_model"], data["method"], data["weights"], tasks, data.get("version", 1))
        except (KeyError, TypeError, AttributeError) as e:
            raise TailorError(f"{where}: not a manifest this version of tailorlm reads ({e}); "
                              f"re-run the training, or remove the file to rebuild it from config.yaml") from None


class RunLock:
    """The exclusive flock on <run>/.lock, taken without waiting, with the holder's pid in the file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        # flock itself, never a marker file (a killed process would leave one behind); held by the process, not
        # the thread that took it; the pid written only once the lock is ours, so a refused process erases nothing
        self._lock = UnixFileLock(self.path, mode=0o644, thread_local=False, blocking=False,
                                  fallback_to_soft=False, on_acquired=_write_pid)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            holder = "unknown"
            with contextlib.suppress(OSError):
                holder = self.path.read_bytes()[:64].decode(errors="replace").strip() or holder
            raise TailorError(f"{self.path.parent} is being written by another tailor process (pid {holder}); "
                              f"wait for it to finish, or choose another --output") from None
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


class RunDir:
    """One run directory. Paths are attributes; reads and writes are methods."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        """output.dir, or runs/<output.name>-<timestamp>."""
        if cfg.output.dir:
            return cls(cfg.output.dir)
        return cls(Path("runs") / f"{cfg.output.name}-{datetime.now():%Y%m%d-%H%M%S}")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- what kind of folder this is --------------------------------------------------------------------
    def is_run(self) -> bool:
        """A folder `tailor run` wrote (config.yaml, and no config.json: a model folder is not a run)."""
        return self.path.is_dir() and (self / "config.yaml").is_file() and not (self / "config.json").is_file()

    def started(self) -> list[str]:
        """The files every started run has (config.yaml, run.json) that this folder lacks; [] for a run."""
        return [name for name in ("config.yaml", "run.json") if not (self / name).is_file()]

    def require_run(self, verb: str) -> None:
        if not self.path.is_dir():
            raise TailorError(f"{self.path}: not found ({verb} takes a run directory written by `tailor run`)")
        if not self.is_run():
            raise TailorError(f"{self.path}: not a run directory (no config.yaml and run.json; "
                              f"{verb} takes a run directory written by `tailor run`)")

    def require_complete(self, verb: str, doing: str) -> None:
        """A clear error unless this is a run directory whose run finished; `doing` ends the sentence."""
        self.require_run(verb)
        if self.status() != "complete":
            raise TailorError(f"{self.path}: the run is not complete (status: {self.status()}); "
                              f"finish it with `tailor run --resume {self.path}` before {doing}")

    # --- writing: the lock and the status ----------------------------------------------------------------
    def check_output(self, overwrite: bool, resume: bool = False) -> None:
        """What open() would refuse, checked before minutes of data preparation (and again when it opens)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise TailorError(f"output directory {path} is an existing file, not a folder; choose another --output")
        if resume:
            if not (path / "config.yaml").is_file():
                raise TailorError(f"--resume: {path} is not a run directory (no config.yaml)")
            return
        if path.exists() and any(p.name != LOCK for p in path.iterdir()) and not overwrite:
            raise TailorError(f"output directory {path} already exists and is not empty; choose another --output, "
                              f"set output.overwrite=true, or continue it with `tailor run --resume {path}`")
        for parent in path.parents:  # a file where a folder of the path should be: mkdir would fail later
            if parent.exists() and not parent.is_dir():
                raise TailorError(f"output directory {path}: {parent} is a file, not a folder; choose another --output")

    def open(self, overwrite: bool, resume: bool = False) -> RunLock:
        """Lock the directory, then make sure it is empty (a new run) or a run to continue (resume)."""
        self.check_output(overwrite, resume)
        lock = RunLock(self.path).acquire()  # before deleting anything: never wipe a directory another run writes
        if not resume:
            for child in self.path.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return lock

    def state(self) -> dict:
        return read_json(self / "run.json")

    def status(self) -> str:
        try:
            return self.state().get("status", "unknown")
        except TailorError:
            return "unreadable run.json"

    def set_state(self, state: dict) -> None:
        write_json(self / "run.json", state)

    # --- the config and the manifest ---------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        write_text(self / "config.yaml", cfg.to_yaml())

    def raw_config(self) -> dict:
        """config.yaml as plain data, unvalidated: listing runs must work for configs an older version wrote."""
        try:
            return yaml.safe_load((self / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TailorError(f"{self / 'config.yaml'}: invalid YAML ({e})") from None

    def config(self, trust_remote_code: bool = False) -> RunConfig:
        return load_config(self / "config.yaml", trust_remote_code=trust_remote_code, read_only=True)

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self / "manifest.json", manifest.to_json())

    def manifest(self, cfg: RunConfig | None = None) -> Manifest:
        """manifest.json; for a run written before manifests existed, rebuilt from its config and data reports
        (the only place those reports are still read for use)."""
        if (self / "manifest.json").is_file():
            return Manifest.from_json(read_json(self / "manifest.json"), self / "manifest.json")
        cfg = cfg or self.config()
        tasks = {}
        for task in cfg.task_set():
            labels = list(read_json(self.task_path(task.name) / "data_report.json").get("labels") or [])
            tasks[task.name] = TaskManifest(task.template.preset, labels, task.template.model_dump(mode="json"),
                                            "unknown", [])
        weights = next((w for w in WEIGHT_FOLDERS if (self / w).is_dir()), "adapter")
        return Manifest(cfg.model.path, cfg.method.name, weights, tasks, legacy=True)

    def task_path(self, name: str) -> Path:
        """Where one task's reports live: tasks/<name>/. A single-task run written before tasks were always a
        list kept them in the run folder itself, where they are still found."""
        folder = self.path / "tasks" / name
        if not folder.is_dir() and (self / "data_report.json").is_file():
            return self.path
        return folder

    def task_folder(self, name: str) -> Path:
        """tasks/<name>/, created for writing."""
        folder = self.path / "tasks" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def weights(self) -> Path:
        """The trained weights: adapter/ (LoRA family) or model/ (full fine-tuning, freezing), as manifest.json
        records them; a run from before manifests (or one stopped before writing its manifest) is looked at."""
        if (self / "manifest.json").is_file():
            named = self.manifest().weights
            if (self / named).is_dir():
                return self / named
            raise TailorError(f"{self.path}: manifest.json records the trained weights in {named}/, and there is no "
                              f"such folder; was it moved or deleted?")
        for name in WEIGHT_FOLDERS:
            if (self / name).is_dir():
                return self / name
        raise TailorError(f"{self.path}: no adapter/ or model/ folder (run status: {self.status()}); "
                          f"was the run finished? `tailor run --resume {self.path}` continues it")

    # --- results ---------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """metrics.json in this version's layout (a section per task), whichever version wrote it; {} when the
        run has none yet."""
        return upgrade_metrics(read_json(self / "metrics.json"), self.raw_config)

    def train_log(self) -> dict:
        return read_json(self / "train_log.json")

    def read(self, name: str) -> dict:
        return read_json(self / name)

    def write(self, name: str, obj) -> None:
        write_json(self / name, obj)

    def write_rows(self, name: str, rows: list[dict]) -> None:
        write_jsonl(self / name, rows)


def upgrade_metrics(data: dict, raw_config) -> dict:
    """metrics.json as schema METRICS_SCHEMA. Schema 1 kept a multi-task run's sections under "tasks" already,
    and a single-task run's one section at the top level beside "train"; that task is named after its preset,
    as tasks are now. raw_config: a callable giving config.yaml as plain data, read only when needed."""
    if not data or data.get("schema") == METRICS_SCHEMA:
        return data
    if "tasks" in data:
        return {"schema": METRICS_SCHEMA, **data}
    config = raw_config() or {}
    name = data.get("task") or (config.get("template") or {}).get("preset") or "task"
    section = {k: v for k, v in data.items() if k != "train"}
    return {"schema": METRICS_SCHEMA, "tasks": {name: section}, "mixing": config.get("mixing"),
            "train": data.get("train")}
