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
    kill_and_resume(tmp_path, run_args(tiny_model_dir, labeled_csv(tmp_path / "reviews.csv"), "{out}", method))


def preference_rows(objective: str) -> list[dict]:
    """Pairs (or kto's unpaired answers) over the classification fields of labeled_csv's reviews."""
    texts = {"positive": "a great movie with an award winning actor", "negative": "an awful film the director failed"}
    rows = []
    for i in range(12):
        for label, text in texts.items():
            wrong = "negative" if label == "positive" else "positive"
            answer = {"completion": label if i % 2 else wrong, "kto_tag": bool(i % 2)} if objective == "kto" \
                else {"chosen": label, "rejected": wrong}
            rows.append({"text": f"{text} {i}", "label": label, **answer})
    return rows


@pytest.mark.parametrize("method, objective", [("lora", "dpo"), ("full", "dpo"), ("lora", "orpo"), ("lora", "simpo"),
                                               ("lora", "kto")])
def test_a_killed_preference_run_resumes_bitwise_identical(tmp_path, tiny_model_dir, method, objective):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(objective)))
    args = run_args(tiny_model_dir, data, "{out}", method) + [f"objective.name={objective}"]
    killed = kill_and_resume(tmp_path, args)
    if objective in ("dpo", "kto"):  # the reference log-probs travel with every checkpoint
        from tailorlm.train.checkpoint import load_trainer

        trainer, _ = load_trainer(CheckpointStore(killed / "checkpoints").latest())
        assert trainer["references"].shape[1] == 2 and trainer["references"].dtype == torch.float64


def kill_and_resume(tmp_path, args: list[str]) -> Path:
    """Run `args` twice at once ('{out}' is the output folder), SIGKILL one after its fifth checkpoint, resume it,
    and check both end with the same weights, bit for bit, and the same history. Returns the killed run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = tailor(*[str(straight) if a == "{out}" else a for a in args])
    victim = tailor(*[str(killed) if a == "{out}" else a for a in args])
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
    return killed


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
