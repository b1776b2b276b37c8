"""This machine's speed for the training-time estimate, measured once and kept in the user's cache.

Three figures: the sustained matrix-multiply rate at a model's width, in the dtype training computes in;
the time of one small autograd pass (what a launch-bound step of a small model is made of); and the time of
an optimizer step per trainable parameter (memory-bound: much of a full fine-tuning step of few tokens).
Measuring at every preflight read up to 15x slow on a busy machine: here each is measured a few times, the best
repeat kept (the one least disturbed by other load), and stored under keys naming the machine (processor,
cores, threads, torch build, device, dtype), so a second preflight reads the figure instead of measuring.

The cache is $TAILOR_CACHE_DIR, else $XDG_CACHE_HOME/tailorlm, else ~/.cache/tailorlm. A file that does not
parse is measured again and replaced; one that cannot be written leaves the figure measured for this process.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

CACHE_FILE = "machine_rates.json"
REPEATS = 5  # timed repeats per figure; the best is kept
REPEAT_SECONDS = 0.1  # each repeat runs its operation for at least this long


def cache_dir() -> Path:
    if os.environ.get("TAILOR_CACHE_DIR"):
        return Path(os.environ["TAILOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tailorlm"


def compute_dtype(device: torch.device, model_dtype: str = "auto") -> torch.dtype:
    """The dtype training multiplies in: the weights' dtype (model.dtype), whose default is bf16 on a GPU that
    has it and fp32 elsewhere (as models/loading.py resolve_dtype decides it)."""
    if model_dtype != "auto":
        return getattr(torch, model_dtype)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def machine_facts(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured figure depends on, as one key."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    build = f"torch {torch.__version__} (cuda {torch.version.cuda}, hip {torch.version.hip})"
    return (f"{processor_name()} | {os.cpu_count()} cores, {torch.get_num_threads()} threads | {build} | {gpu} | "
            f"{str(dtype).removeprefix('torch.')}")


@functools.cache  # read once a process: it does not change while the process runs (the thread count may)
def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(device: torch.device, dtype: torch.dtype, width: int) -> tuple[float, bool]:
    """(FLOP/s of a (rows x width) @ (width x width) product, read from the cache): the shape of a
    model's projections over one micro-batch of tokens."""
    rows = 4096 if device.type == "cuda" else 1024
    return _cached(f"matmul {rows}x{width}x{width} | {machine_facts(device, dtype)}",
                   lambda: _steadiest(lambda: measure_matmul(device, dtype, rows, width), device, max))


def pass_seconds(device: torch.device, dtype: torch.dtype) -> tuple[float, bool]:
    """(seconds of one small matrix pass with autograd: forward, input gradient or weight gradient, read
    from the cache): the floor a launch-bound step pays per pass, however little it computes."""
    return _cached(f"small pass | {machine_facts(device, dtype)}",
                   lambda: _steadiest(lambda: measure_small_pass(device, dtype), device, min))


def update_seconds(device: torch.device) -> tuple[float, bool]:
    """(seconds per parameter of one optimizer step: a fresh gradient, its norm, AdamW's update, read from
    the cache): memory-bound work that grows with the trainable parameters, not with the tokens."""
    return _cached(f"update per parameter | {machine_facts(device, torch.float32)}",
                   lambda: _steadiest(lambda: measure_update(device), device, min))


def measure_matmul(device: torch.device, dtype: torch.dtype, rows: int, width: int) -> float:
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, width, device=device, dtype=dtype)
    return 2 * rows * width * width / _best_seconds(lambda: a @ b, device)


def measure_small_pass(device: torch.device, dtype: torch.dtype) -> float:
    """A linear layer's forward and backward on an 8 x 8 input: three passes (forward, input gradient,
    weight gradient), each too small to be anything but dispatch and bookkeeping."""
    x = torch.randn(8, 8, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 8, device=device, dtype=dtype, requires_grad=True)

    def step():
        torch.nn.functional.linear(x, w).sum().backward()
    return _best_seconds(step, device) / 3


def measure_update(device: torch.device) -> float:
    """One AdamW step as train/loop.py takes it, over a parameter too big for the processor's caches."""
    size = 2**24 if device.type == "cuda" else 2**22
    weight = torch.nn.Parameter(torch.randn(size, device=device))
    gradient = torch.randn(size, device=device)
    optimizer = torch.optim.AdamW([weight], fused=device.type == "cuda" or None)

    def step():
        weight.grad = gradient.clone()
        torch.nn.utils.clip_grad_norm_([weight], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _best_seconds(step, device) / size


def _steadiest(measure, device: torch.device, better):
    """The measured figure, or the same measured on one thread where that is `better` (max of rates, min of
    times). On a busy machine the threads of one product wait on each other: on the shared 2-core machine
    these figures were fitted on, two threads ran a matmul at under half the rate of one thread alone, so
    one thread is the floor a figure is held to."""
    figure = measure()
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return figure
    torch.set_num_threads(1)
    try:
        return better(figure, measure())
    finally:
        torch.set_num_threads(threads)


def _best_seconds(operation, device: torch.device) -> float:
    """The fastest of REPEATS timings of `operation` (seconds per call)."""
    operation()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(REPEATS):
        calls, start = 0, time.perf_counter()
        while True:
            operation()
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= REPEAT_SECONDS:
                break
        best = min(best, elapsed / calls)
    return best


def _cached(key: str, measure) -> tuple[float, bool]:
    path = cache_dir() / CACHE_FILE
    figures = _read(path)
    if isinstance(figures.get(key), (int, float)) and figures[key] > 0:
        return float(figures[key]), True
    value = measure()
    _write(path, {**figures, key: value})
    return value, False


def _read(path: Path) -> dict:
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or damaged: measured again, and the file rewritten
        return {}
    return figures if isinstance(figures, dict) else {}


def _write(path: Path, figures: dict) -> None:
    """Atomically: a preflight in another process reads the old file or the new one, never half of one."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".rates-", suffix=".tmp", delete=False,
                                         encoding="utf-8") as f:
            temporary = f.name
            json.dump(figures, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:  # a read-only home: the figure serves this process only
        if temporary:
            Path(temporary).unlink(missing_ok=True)
