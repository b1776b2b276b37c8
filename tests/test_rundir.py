"""RunDir: the one reader and writer of a run directory; manifest.json carries what using the model needs."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import labeled_csv
from tailorlm.cli import main
from tailorlm.errors import DiskFullError, TailorError
from tailorlm.export.layout import training_prompts
from tailorlm.models.trained import load_trained
from tailorlm.rundir import RunDir, RunLock, write_json

FAST = ["train.max_steps=2", "train.batch_size=4", "train.eval_every=2", "eval.baselines=[]",
        "template.max_length=96"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rundir")
    data = labeled_csv(root / "reviews.csv")
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={data}", "-o", str(root / "run"), *FAST]) == 0
    return root


def test_the_manifest_records_what_using_the_model_needs(finished):
    run = RunDir(finished / "run")
    manifest = run.manifest()
    assert not manifest.legacy and manifest.method == "lora" and manifest.weights == "adapter"
    name, task = manifest.task()
    assert (name, task.preset, task.labels, task.chat_layout) == ("classification", "classification",
                                                                 ["negative", "positive"], "chat template")
    assert task.template["max_length"] == 96 and len(task.examples) == 4  # every test row (4 of 24)
    assert all(set(ex) == {"text", "label"} for ex in task.examples)
    assert not [p.name for p in run.path.rglob("*.tmp")]  # every write renamed into place


def test_the_weights_are_the_folder_the_manifest_names_not_the_first_one_found(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    run = RunDir(run_dir)
    shutil.copytree(run_dir / "adapter", run_dir / "model")  # a stray model/ beside the LoRA run's adapter/
    assert run.weights() == run_dir / "adapter"
    shutil.rmtree(run_dir / "adapter")
    with pytest.raises(TailorError, match=rf"^{run_dir}: manifest.json records the trained weights in adapter/, and "
                                          r"there is no such folder; was it moved or deleted\?$"):
        run.weights()
    (run_dir / "manifest.json").unlink()  # a run from before manifests: the folder there is the weights
    assert run.weights() == run_dir / "model"


def test_export_checks_need_no_data_file_once_the_run_is_done(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished / "run", copy)
    (finished / "reviews.csv").rename(tmp_path / "moved.csv")  # the training data is gone
    try:
        trained = load_trained(copy)
        assert trained.labels == ["negative", "positive"]
        cases = training_prompts(trained)
        assert len(cases) == 3 and cases[0].user.endswith(json.loads((copy / "manifest.json").read_text())
                                                         ["tasks"]["classification"]["examples"][0]["text"])
        (copy / "manifest.json").unlink()  # a run written before manifests: labels from its data report
        legacy = load_trained(copy)
        assert legacy.manifest.legacy and legacy.labels == ["negative", "positive"]
        with pytest.raises(TailorError, match=r"the checks need the run's test data, which cannot be read now: "
                                              r".*reviews\.csv.*runs written by this version keep a few test "
                                              r"examples in manifest\.json"):
            training_prompts(legacy)
    finally:
        (tmp_path / "moved.csv").rename(finished / "reviews.csv")


def test_a_damaged_run_file_is_named(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished / "run", copy)
    write_json(copy / "manifest.json", {"tasks": []})
    with pytest.raises(TailorError, match=r"manifest\.json: not a manifest this version of tailorlm reads"):
        RunDir(copy).manifest()
    (copy / "run.json").write_text("{oops")
    assert RunDir(copy).status() == "unreadable run.json"
    with pytest.raises(TailorError, match=r"run\.json: invalid JSON"):
        RunDir(copy).state()
    with pytest.raises(TailorError, match=r"the run is not complete \(status: unreadable run\.json\)"):
        RunDir(copy).require_complete("tailor export", "exporting")


def test_write_text_removes_its_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    real = Path.write_text

    def half(self, text, *args, **kwargs):
        real(self, text[:3], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(TailorError) as e:
        write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    assert str(e.value) == (f"the disk is full: could not write {tmp_path / 'metrics.json'}; free some space on the "
                            f"disk that holds {tmp_path}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run_json_fits", [True, False])
def test_a_full_disk_fails_the_run_with_a_way_to_resume_and_leaves_no_temporary_file(
        tmp_path, tiny_model_dir, monkeypatch, capsys, run_json_fits):
    """A checkpoint write runs out of space: the run is marked failed when run.json still fits (the failed
    write's partial files are gone by then), and the message says how to go on; when even run.json does not
    fit, the message says that it still reads running."""
    import tailorlm.train.checkpoint as checkpoint

    full = []
    real = Path.write_text

    def no_room(tensors, path, metadata=None):
        Path(path).write_bytes(b"the first bytes fit")
        full.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    def nothing_fits_once_full(self, text, *args, **kwargs):
        if full and not run_json_fits:
            real(self, text[:5], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", no_room)
    monkeypatch.setattr(Path, "write_text", nothing_fits_once_full)
    out = tmp_path / "run"
    code = main(["run", f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'r.csv')}", "-o", str(out),
                 *FAST])
    message = (f"the disk is full: could not write {out / 'checkpoints' / 'step-00000002'}; free some space on the "
               f"disk that holds {out}, then continue the run with `tailor run --resume {out}`")
    state = json.loads((out / "run.json").read_text())
    if run_json_fits:
        assert state["status"] == "failed" and state["error"] == message
    else:
        message += " (run.json could not be marked failed either, for want of space: it still says running)"
        assert state["status"] == "running"
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 2 and f"error: {message}" in printed
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []


def test_a_full_disk_outside_a_run_is_said_as_such_not_as_a_bug(capsys):
    from tailorlm.cli import _report

    assert _report(OSError(errno.ENOSPC, "No space left on device")) == 2
    assert _report(RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")) == 2
    assert capsys.readouterr().out.splitlines() == [
        "error: the disk is full: a write failed; free some space, then run the command again",
        "error: the disk quota is used up: a write failed; free some space, then run the command again"]


def test_write_text_syncs_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    import stat

    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append("sync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync file")
        fsync(fd)

    def recording_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    assert events == ["sync file", "rename", "sync folder"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_sync_that_finds_the_disk_full_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    write_json(tmp_path / "metrics.json", {"accuracy": 0.5})

    def no_room(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(DiskFullError, match="the disk is full: could not write .*metrics.json"):
        write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 0.5}


HOLD_THE_LOCK = """
import sys, time
from tailorlm.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    """Another process's lock refuses at once and names its pid (which the refused attempt leaves in the file);
    SIGKILL drops it, so the next run takes it without cleaning up."""
    from tailorlm.track.lock import writer_is_gone

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = (f"{run} is being written by another tailor process (pid {holder.pid}); wait for it to finish, "
                   f"or choose another --output")
        with pytest.raises(TailorError, match=f"^{re.escape(refused)}$"):
            RunLock(run).acquire()
        assert (run / ".lock").read_text() == f"{holder.pid}\n"
        assert not writer_is_gone(run)
    finally:
        holder.kill()
        holder.wait()
    assert writer_is_gone(run)
    lock = RunLock(run).acquire()
    assert (run / ".lock").read_text() == f"{os.getpid()}\n" and not writer_is_gone(run)
    lock.release()
    lock.release()  # a second release is harmless
    assert writer_is_gone(run) and [p.name for p in run.iterdir()] == [".lock"]  # released, the file kept
