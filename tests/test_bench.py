"""The benchmark script runs end to end on CPU with tiny shapes (CI checks it works; speed is not checked)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_speed_smoke_suite_runs_and_writes_its_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written text stays\n")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--suite", "cpu-smoke",
                           "--json", str(out), "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["method"], r["impl"]) for r in results} == {(m, i) for m in ("lora", "full")
                                                           for i in ("baseline", "tailorlm")}
    for r in results:
        assert "error" not in r and r["tokens_per_s"] > 0
    # Both sides train on exactly the same real tokens (packing must not drop or add any).
    assert len({r["real_tokens"] for r in results}) == 1
    text = md.read_text()
    assert "hand-written text stays" in text and text.count("<!-- bench:cpu-smoke -->") == 1
    assert text.count("| tiny |") == 4


def test_distributed_overhead_bench_runs_every_wrapper_and_writes_its_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed_overhead.py"), "--shape", "tiny",
                           "--steps", "1", "--warmup", "1", "--max-len", "32", "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {(r["method"], r["mode"]) for r in results} == {(m, w) for m in ("lora", "full")
                                                           for w in ("single", "ddp", "fsdp")}
    assert all(r["tokens_per_s"] > 0 for r in results)
    text = md.read_text()
    assert text.count("<!-- bench:distributed -->") == 1 and "| tiny | lora | DDP |" in text
