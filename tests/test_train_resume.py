"""Crash safety end to end: a run killed with SIGKILL and resumed ends with the same weights, bit for bit, as
one that never stopped (LoRA and full fine-tuning); one run directory, one writer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tailorlm.cli import main
from tailorlm.rundir import RunLock
from tailorlm.train.checkpoint import CheckpointStore
from conftest import labeled_csv, trained_weights

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


def run_args(model_dir, data, out, method):
    return ["run", f"model.path={model_dir}", f"data.train={data}", "--output", str(out), f"method.name={method}",
            f"train.max_steps={STEPS}", "train.batch_size=2", "train.checkpoint_every=1", "train.eval_every=0",
            "eval.baselines=[]", "eval.retention.data=null", "template.max_length=96", "train.lr=5e-3",
            "method.lora.dropout=0.1"]  # dropout draws random numbers every step: the RNG state must resume too


def tailor(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tailorlm", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_killed_and_resumed_run_ends_bitwise_identical(tmp_path, tiny_model_dir, method):
    data = labeled_csv(tmp_path / "reviews.csv")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = tailor(*run_args(tiny_model_dir, data, straight, method))
    victim = tailor(*run_args(tiny_model_dir, data, killed, method))
    ready = killed / "checkpoints" / "step-00000005" / "COMPLETE"
    deadline = time.time() + 120
    while not ready.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint, mid-evaluation
    victim.wait()
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # it never got to finish
    # the newest complete checkpoint (the `latest` pointer may lag one behind: the kill can land before it moves)
    latest = int(CheckpointStore(killed / "checkpoints").latest().name.split("-")[1])
    assert 5 <= latest < STEPS
    resumed = tailor("run", "--resume", str(killed))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "Resumed from" in out and f"at step {latest} of {STEPS}" in out
    assert reference.wait(timeout=300) == 0
    a, b = trained_weights(straight), trained_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, not allclose
    log = json.loads((killed / "train_log.json").read_text())
    assert [r["step"] for r in log["train_loss"]] == list(range(1, STEPS + 1))  # history carried over, no gaps
    assert json.loads((straight / "train_log.json").read_text())["train_loss"] == log["train_loss"]


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    lock = RunLock(out).acquire()  # another tailor process is writing here
    try:
        code = main(["run", f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'd.csv')}",
                     "--output", str(out), "output.overwrite=true", "eval.baselines=[]", "train.max_steps=1"])
        assert code == 2
        assert f"{out} is being written by another tailor process (pid {os.getpid()}); wait for it to finish" \
            in capsys.readouterr().out.replace("\n", "")
    finally:
        lock.release()
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the refused run, nothing deleted


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert f"--resume: {tmp_path} is not a run directory (no config.yaml)" in capsys.readouterr().out.replace("\n", "")
