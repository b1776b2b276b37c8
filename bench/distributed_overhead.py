"""What the distributed wrappers cost on one device: the same training steps plain, under DDP and under FSDP2
(fully_shard), each on a 1-process group, so the difference is the wrappers' own work (hooks, bucketing,
all-gather and reduce-scatter bookkeeping), not communication between devices.

    python bench/distributed_overhead.py                  # GPU: SmolLM2-135M and Llama-3.2-1B shapes, bf16
    python bench/distributed_overhead.py --shape smollm2-135m --max-len 256 --steps 6   # this CPU (gloo)

Each mode builds the model afresh from the same seed and runs tailorlm's own step (train/step.py through
train/distributed.Wrapped). Writes the table as the `distributed` section of BENCHMARKS.md (--markdown ''
to skip). With several GPUs, `torchrun --nproc-per-node N -m tailorlm run ...` is the multi-GPU run.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_speed import SHAPES, synthetic_samples  # noqa: E402


def one_mode(mode: str, shape: str, method: str, samples, args, device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailorlm.config import MethodSpec, TrainSpec
    from tailorlm.models.methods import make_strategy
    from tailorlm.train import distributed
    from tailorlm.train.optim import make_optimizer
    from tailorlm.train.step import accumulate_gradients, fast_training

    distributed._world = distributed.World(mode=mode)  # a 1-process group, wrapped as torchrun would
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=True)).to(device, dtype)
    strategy = make_strategy(MethodSpec(name=method))
    model = strategy.prepare(model)
    model.train()
    spec = TrainSpec(batch_size=args.batch, max_grad_norm=1.0, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wrapped = distributed.Wrapped(model, device)
    with fast_training(wrapped.module, spec, pad_id=0, device=device) as ctx:
        optimizer = make_optimizer(strategy.param_groups(wrapped.module, 1e-5), spec)
        batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]

        def step(batch) -> int:
            _, tokens = accumulate_gradients(wrapped.forward, [batch], ctx, wrapped.no_sync)
            torch.nn.utils.clip_grad_norm_(strategy.trainable(wrapped.module), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return tokens

        for batch in batches[:args.warmup]:
            step(batch)
        sync(device)
        start, tokens = time.perf_counter(), 0
        for batch in batches[args.warmup:args.warmup + args.steps]:
            tokens += step(batch)
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    distributed._world = distributed.World()
    return {"shape": shape, "method": method, "mode": mode, "tokens_per_s": tokens / seconds, "peak_gib": peak,
            "steps": args.steps}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def table(results: list[dict], device_name: str) -> str:
    lines = [f"Measured {date.today()} on {device_name}, one process: the wrappers' own cost, no communication.", "",
             "| shape | method | wrapper | real tokens/s | vs plain | peak GiB |", "|---|---|---|---|---|---|"]
    for r in results:
        plain = next(p for p in results if p["shape"] == r["shape"] and p["method"] == r["method"]
                     and p["mode"] == "single")
        change = r["tokens_per_s"] / plain["tokens_per_s"] - 1
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-"
        name = {"single": "none (plain)", "ddp": "DDP", "fsdp": "FSDP2 (fully_shard)"}[r["mode"]]
        lines.append(f"| {r['shape']} | {r['method']} | {name} | {r['tokens_per_s']:,.0f} | "
                     f"{'' if r is plain else f'{change:+.1%}'} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    from bench.report import replace_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="train.compile for every mode (off: the wrappers' cost without compile time)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shape or (["smollm2-135m", "llama-3.2-1b"] if device.type == "cuda" else ["smollm2-135m"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    results = []
    for shape in shapes:
        samples = synthetic_samples(args.batch * (args.warmup + args.steps), SHAPES[shape]["vocab_size"], seed=0,
                                    max_len=args.max_len)
        for method in args.methods.split(","):
            for mode in ("single", "ddp", "fsdp"):
                results.append(one_mode(mode, shape, method, samples, args, device))
                print(json.dumps(results[-1]), flush=True)
    dist.destroy_process_group()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"this CPU ({torch.get_num_threads()} threads, gloo)"
    text = table(results, name)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.markdown:
        command = "python bench/distributed_overhead.py " + " ".join(sys.argv[1:])
        body = (f"<!-- bench:distributed -->\n### Distributed wrappers on one device\n\n`{command.strip()}`\n\n"
                f"{text}\n<!-- /bench:distributed -->")
        replace_section(Path(args.markdown), "distributed", body)


if __name__ == "__main__":
    main()
