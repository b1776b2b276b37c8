"""Training under torchrun on this CPU (gloo): 2 processes follow the same loss trajectory as 1 with the same
global batch, for DDP and FSDP2; checkpoints resume across process counts; a failing rank ends the job; two
"nodes" on loopback train together. Every run is a real `tailor run` in subprocesses."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import labeled_csv, trained_weights

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
TIMEOUT = 240  # a hang would otherwise stall the suite; every run here takes seconds


def run_args(model_dir, data, out, method="full", *extra):
    # grad_accum 2 covers the skipped gradient sync of the first micro-batch; batch 3 leaves the two processes
    # unequal shares (2 + 1), and the epoch's last batch shorter still.
    return ["run", f"model.path={model_dir}", f"data.train={data}", "--output", str(out), f"method.name={method}",
            f"train.max_steps={STEPS}", "train.batch_size=3", "train.grad_accum=2", "train.eval_every=3",
            "train.checkpoint_every=1", "eval.baselines=[]", "eval.retention.data=null", "eval.during_training=4",
            "template.max_length=96", "train.lr=5e-3", "method.lora.dropout=0.0", *extra]


def env(**more):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "tests"),
            **more}


def tailor(*args, driver: bool = False, **more) -> subprocess.CompletedProcess:
    """One `tailor` command (the failure-injecting driver when asked); returns the finished process."""
    entry = [str(REPO / "tests" / "distributed_driver.py")] if driver else ["-m", "tailorlm"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env(**more), capture_output=True,
                          text=True, timeout=TIMEOUT)


def torchrun(*args, nproc: int = 2, driver: bool = False, launcher=("--standalone",), **more):
    entry = [str(REPO / "tests" / "distributed_driver.py")] if driver else ["-m", "tailorlm"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}",
                           *entry, *args], cwd=REPO, env=env(**more), capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def history(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


def assert_same_training(a: Path, b: Path, tol: float = 1e-4, weight_norm_tol: float | None = None) -> None:
    """The same losses, gradient norms, validation losses (relative tol) and final weights: elementwise, or
    within weight_norm_tol of each tensor's norm where rounding (bf16) legitimately moves them."""
    ha, hb = history(a), history(b)
    assert [r["step"] for r in ha["train_loss"]] == [r["step"] for r in hb["train_loss"]] == list(range(1, STEPS + 1))
    for ra, rb in zip(ha["train_loss"], hb["train_loss"]):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=tol), (ra, rb)
        # Adam barely notices a gradient scaled by a constant; the norm shows whether the sum is the 1-process one
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=tol), (ra, rb)
    assert [e["step"] for e in ha["evaluations"]] == [e["step"] for e in hb["evaluations"]] == [0, 3, 6]
    for ea, eb in zip(ha["evaluations"], hb["evaluations"]):
        assert ea["val_loss"] == pytest.approx(eb["val_loss"], rel=tol)
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if weight_norm_tol is None:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4, msg=name)
        else:
            assert float((wa[name] - wb[name]).norm() / wa[name].norm()) < weight_norm_tol, name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return labeled_csv(tmp_path_factory.mktemp("dist-data") / "reviews.csv")


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, data):
    """The 1-process reference runs, one per method, made once for the module."""
    root, made = tmp_path_factory.mktemp("single"), {}

    def get(method: str) -> Path:
        if method not in made:
            ok(tailor(*run_args(tiny_model_dir, data, root / method, method)))
            made[method] = root / method
        return made[method]
    return get


@pytest.mark.parametrize("strategy,method", [("ddp", "full"), ("ddp", "lora"), ("fsdp", "full"), ("fsdp", "lora")])
def test_two_processes_follow_the_single_process_trajectory(tmp_path, tiny_model_dir, data, single, strategy, method):
    out = tmp_path / "two"
    # --nproc is the CLI's shorthand for torchrun --standalone --nproc-per-node
    log = ok(tailor(*run_args(tiny_model_dir, data, out, method, f"train.distributed.strategy={strategy}"),
                    "--nproc", "2"))
    assert_same_training(single(method), out)
    assert log.count(f"over 2 processes ({strategy})") == 1  # rank 0 speaks for the job; the others are quiet
    assert log.count("Run complete") == 1
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert json.loads((out / "metrics.json").read_text())["train"]["processes"] == 2
    assert f", 2 processes ({strategy})" in (out / "report.md").read_text()
    assert len(list((out / "tensorboard").glob("events.*"))) == 1  # one writer
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["processes"] == 2


@pytest.mark.parametrize("strategy,objective", [("ddp", "dpo"), ("fsdp", "dpo"), ("ddp", "kto"), ("fsdp", "kto")])
def test_preference_objectives_follow_the_single_process_trajectory(tmp_path, tiny_model_dir, strategy, objective):
    from test_train_resume import preference_rows

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(objective)))
    one, two = tmp_path / "one", tmp_path / "two"
    ok(tailor(*run_args(tiny_model_dir, data, one, "lora", f"objective.name={objective}")))
    ok(tailor(*run_args(tiny_model_dir, data, two, "lora", f"objective.name={objective}",
                        f"train.distributed.strategy={strategy}"), "--nproc", "2"))
    assert_same_training(one, two)  # references, kto's per-step z0 and the per-pair normaliser across processes
    for ea, eb in zip(history(one)["evaluations"], history(two)["evaluations"]):
        assert ea["reward_accuracy"] == eb["reward_accuracy"]
        assert ea["pref_loss"] == pytest.approx(eb["pref_loss"], rel=1e-4)


def test_grpo_over_two_processes_resumes_exactly_where_it_stopped(tmp_path, tiny_model_dir, data):
    # each process samples its share of the step's prompts from its own random stream, which every checkpoint
    # holds per process: a job killed at step 4 and resumed trains, samples and ends as one that never stopped
    # (DDP: FSDP is refused for grpo, whose processes generate answers of different lengths)
    grpo = ("objective.name=grpo", "objective.grpo.group_size=2", "objective.grpo.max_new_tokens=4",
            "objective.grpo.temperature=1.5")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    log = ok(torchrun(*run_args(tiny_model_dir, data, whole, "lora", *grpo)))
    assert log.count("over 2 processes (ddp)") == 1
    stopped = torchrun(*run_args(tiny_model_dir, data, resumed, "lora", *grpo), driver=True, FAIL_RANK="1",
                       FAIL_STEP="4")
    assert stopped.returncode != 0
    assert (resumed / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    assert f"step-00000004 at step 4 of {STEPS}\n" in ok(torchrun("run", "--resume", str(resumed)))
    assert_same_training(whole, resumed, tol=1e-6)
    rows = history(whole)["train_loss"]
    for a, b in zip(rows, history(resumed)["train_loss"]):
        assert (a["reward"], a["flat_groups"], a["answer_tokens"]) == (b["reward"], b["flat_groups"], b["answer_tokens"])
    assert all(0.0 <= r["reward"] <= 1.0 and 1 <= r["answer_tokens"] <= 4 for r in rows)


def test_gradual_unfreezing_under_ddp_rebuilds_the_wrapper_per_stage(tmp_path, tiny_model_dir, data, single):
    extra = ("method.unfreeze.groups=3",)
    reference, out = tmp_path / "one", tmp_path / "two"
    ok(tailor(*run_args(tiny_model_dir, data, reference, "gradual_unfreeze", *extra)))
    ok(torchrun(*run_args(tiny_model_dir, data, out, "gradual_unfreeze", *extra)))
    assert_same_training(reference, out)
    assert [e["event"] for e in history(out)["events"]] == [e["event"] for e in history(reference)["events"]]


def test_a_failing_rank_ends_the_job_without_hanging(tmp_path, tiny_model_dir, data):
    out = tmp_path / "failed"
    started = time.monotonic()
    proc = torchrun(*run_args(tiny_model_dir, data, out), driver=True, FAIL_RANK="1", FAIL_STEP="4")
    assert proc.returncode != 0
    assert time.monotonic() - started < 120  # the other rank did not wait out the collective timeout
    assert "RuntimeError: injected failure on rank 1 at step 4" in proc.stdout + proc.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(tmp_path, tiny_model_dir, data, single, before, after, strategy):
    out = tmp_path / "run"
    args = run_args(tiny_model_dir, data, out, "full", f"train.distributed.strategy={strategy}")
    interrupted = (torchrun(*args, driver=True, FAIL_RANK="1", FAIL_STEP="4") if before == 2 else
                   tailor(*args, driver=True, FAIL_RANK="0", FAIL_STEP="4"))
    assert interrupted.returncode != 0
    latest = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())[-1]
    assert latest == "step-00000004"
    assert json.loads((out / "checkpoints" / latest / "state.json").read_text())["processes"] == before
    resume = ("run", "--resume", str(out))
    log = ok(tailor(*resume) if after == 1 else torchrun(*resume))
    assert f"at step 4 of {STEPS} ({before} -> {after} processes)" in log
    assert_same_training(single("full"), out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_as_one_job(tmp_path, tiny_model_dir, data, single):
    out, port = tmp_path / "nodes", free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tailorlm-test",
               "-m", "tailorlm", *run_args(tiny_model_dir, data, out)]
    nodes = [subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)[-4000:]
    assert sum(log.count("over 2 processes (ddp)") for log in logs) == 1
    assert_same_training(single("full"), out)


@pytest.mark.parametrize("method", ["gradual_unfreeze", "qlora"])
def test_fsdp_names_the_methods_it_cannot_run(monkeypatch, method):
    from tailorlm.errors import TailorError
    from tailorlm.train import distributed

    monkeypatch.setattr(distributed, "_world", distributed.World(rank=0, size=2, mode="fsdp"))
    with pytest.raises(TailorError, match=rf"^train.distributed.strategy=fsdp does not support method.name={method} "
                                          r"yet; use train.distributed.strategy=ddp$"):
        distributed.check_method(method)


def test_fsdp_shards_a_bf16_base_under_fp32_adapters(tmp_path, tiny_model_dir, data):
    # A GPU run keeps the frozen base in bf16 and the LoRA weights in fp32, so one FSDP unit holds both dtypes:
    # FSDP2 needs one dtype only among trainable parameters and all-gathers mixed ones as bytes.
    args = ("train.distributed.strategy=fsdp", "model.dtype=bfloat16")
    reference, out = tmp_path / "one", tmp_path / "two"
    ok(tailor(*run_args(tiny_model_dir, data, reference, "lora", *args)))
    log = ok(tailor(*run_args(tiny_model_dir, data, out, "lora", *args), "--nproc", "2"))
    assert "torch.bfloat16, cpu)" in log  # the base really is bf16
    # bf16 forwards of differently sharded batches round differently, and Adam turns that into small weight
    # differences: the figures match to 2%, the weights to 2% of each tensor's norm
    assert_same_training(reference, out, tol=2e-2, weight_norm_tol=2e-2)
    assert {w.dtype for w in trained_weights(out).values()} == {torch.float32}  # the adapters stayed fp32
