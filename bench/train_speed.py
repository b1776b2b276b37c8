"""Training speed: plain transformers + PEFT against tailorlm, side by side in one job, on the same data.

    python bench/train_speed.py --suite gpu          # H100/H200: Llama-3.2-1B and SmolLM2-135M shapes
    python bench/train_speed.py --suite gpu-families # H100/H200: Qwen2.5-0.5B and Gemma-3-1B shapes, LoRA
    python bench/train_speed.py --suite gpu-accum    # 32 samples per step as 4 x 8 accumulation vs fuller packs
    python bench/train_speed.py --suite cpu-default  # this machine: the default job's data and model
    python bench/train_speed.py --suite cpu-smoke    # tiny shapes, a few steps: CI checks that it runs

(a) baseline: the model as transformers builds it (SDPA attention), LoRA through PEFT with its defaults
    (fp32 adapters on a bf16 base), batches padded to the longest sample, the library's loss (full logits).
(b) tailorlm: the same model and data through tailorlm's own training step (train/step.py): packed rows,
    variable-length attention, completion-only chunked loss, bf16 autocast, compiled layers, fused AdamW.

Every case runs in its own process so peak memory and compile caches do not leak between cases. Results go
to a JSON file and into BENCHMARKS.md between the markers of this suite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # random weights of the real architectures' shapes
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
}
FAMILY_SHAPES = {  # other families, random weights of their released shapes (config class, arguments)
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         rope_theta=1000000.0)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                            num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                            head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
                                            rope_theta=1000000.0)),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM datasheet)
KEEP_OPEN = contextlib.ExitStack()
BATCH = 8  # samples per optimizer step, for both sides (equal real tokens per step)


# ---------------------------------------------------------------- data
def synthetic_samples(n: int, vocab: int, seed: int, max_len: int = 2048):
    """Instruction-like lengths: log-normal, median 220 tokens, long tail, clipped to 16..max_len.
    Every token carries loss (the case least favourable to tailorlm's completion-only head)."""
    from tailorlm.data.samples import Sample

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(220) + 0.8 * torch.randn(n, generator=g)).clamp(16, max_len).long().tolist()
    out = []
    for length in lengths:
        ids = torch.randint(100, vocab, (length,), generator=g).tolist()
        out.append(Sample(ids, list(ids), {}))
    return out


def default_job_samples(tokenizer):
    from tailorlm.config import load_config
    from tailorlm.data.dataset import load_splits
    from tailorlm.data.templates import PromptTemplate
    from tailorlm.data.tokenize import ChatFormat, encode_examples

    cfg = load_config(None)
    template = PromptTemplate(cfg.template)
    splits = load_splits(cfg.data, template.fields, "label")
    samples, _ = encode_examples(splits.train, template, ChatFormat(tokenizer, cfg.template), splits.labels,
                                 cfg.template)
    return cfg, samples


# ---------------------------------------------------------------- one case, in its own process
def build(case: dict, device: torch.device):
    """(model, tokenizer or None, samples) for a case."""
    if case["shape"] == "default-job":
        from tailorlm.config import ModelSpec
        from tailorlm.models.loading import load_model

        loaded = load_model(ModelSpec(path="default", dtype="float32"), device)
        cfg, samples = default_job_samples(loaded.tokenizer)
        return loaded.model, cfg, samples
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kind, shape = FAMILY_SHAPES.get(case["shape"], ("LlamaConfig", SHAPES.get(case["shape"])))
    config = getattr(transformers, kind)(**shape, tie_word_embeddings=True, max_position_embeddings=1 << 20,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    n = samples_per_step(case) * (case["steps"] + case["warmup"])
    return model, None, synthetic_samples(n, config.vocab_size, seed=1)


def samples_per_step(case: dict) -> int:
    return BATCH * case.get("accum", 1)


def micro_batches(samples: list) -> list[list]:
    """An optimizer step's samples as the recipe's micro-batches of BATCH (accumulated when accum > 1)."""
    return [samples[i:i + BATCH] for i in range(0, len(samples), BATCH)]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def baseline_runner(model, case, pad_id: int, device):
    """Plain transformers + PEFT: padded batches, the library's loss, torch's default AdamW."""
    from peft import get_peft_model

    from tailorlm.data.batching import collate

    if case["method"] == "lora":
        model = get_peft_model(model, lora_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(samples) -> int:  # accumulation as the library's examples do it: each micro-batch's mean loss / count
        tokens, parts = 0, micro_batches(samples)
        for part in parts:
            batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
            (model(**batch).loss / len(parts)).backward()
            tokens += int(batch["attention_mask"].sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens
    return model, step


def tailorlm_runner(model, case, pad_id: int, device):
    """tailorlm's own step: the strategy, optimizer and StepContext the training loop uses."""
    from tailorlm.config import MethodSpec, TrainSpec
    from tailorlm.models.methods import make_strategy
    from tailorlm.train.optim import make_optimizer
    from tailorlm.train.step import accumulate_gradients, fast_training

    spec = TrainSpec(batch_size=BATCH, max_grad_norm=None, packing=case.get("packing", "auto"),
                     gradient_checkpointing=case.get("checkpointing", False), compile=case.get("compile", "auto"),
                     micro_batch_tokens=case.get("budget"))
    strategy = make_strategy(MethodSpec(name=case["method"]))
    model = strategy.prepare(model)
    model.train()
    ctx = KEEP_OPEN.enter_context(fast_training(model, spec, pad_id, device))  # for the process's lifetime
    optimizer = make_optimizer(strategy.param_groups(model, 1e-5), spec)

    def step(samples) -> int:  # the loop's step (train/loop.py) without its bookkeeping
        _, tokens = accumulate_gradients(lambda fn: fn(model, True), micro_batches(samples), ctx)  # Wrapped.forward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens
    return model, step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: dict) -> dict:
    device = torch.device(case["device"])
    torch.set_num_threads(case.get("threads", torch.get_num_threads()))
    model, cfg, samples = build(case, device)
    pad_id = 0
    if cfg is not None:  # the default job: its own batches, in its own order
        from tailorlm.data.batching import epoch_batches
        pad_id = model.config.pad_token_id or 0
        order = epoch_batches(samples, cfg.train.batch_size, cfg.train.seed, 0)
        batches = [[samples[i] for i in idx] for idx in order][: case["warmup"] + case["steps"]]
    else:
        per_step = samples_per_step(case)
        batches = [samples[i:i + per_step] for i in range(0, len(samples), per_step)]
    n_params = sum(p.numel() for p in model.parameters())
    runner = baseline_runner if case["impl"] == "baseline" else tailorlm_runner
    model, step = runner(model, case, pad_id, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if case.get("max_context"):
        return {**case, "max_context": max_context(step, SHAPES[case["shape"]]["vocab_size"], case)}
    t0 = time.perf_counter()
    for b in batches[: case["warmup"]]:
        step(b)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0, tokens, step_ms = time.perf_counter(), 0, []
    for b in batches[case["warmup"]:]:
        began = time.perf_counter()
        tokens += step(b)
        if case.get("series"):  # per-step times (a sync each): shows a step time that grows with the run
            sync(device)
            step_ms.append(round(1000 * (time.perf_counter() - began), 1))
    sync(device)
    seconds = time.perf_counter() - t0
    flops_per_token = (4 if case["method"] == "lora" else 6) * n_params
    out = {**case, "tokens_per_s": tokens / seconds, "warmup_s": warmup_s, "params": n_params,
           "step_ms": 1000 * seconds / max(1, len(batches) - case["warmup"]), "real_tokens": tokens,
           **({"step_ms_series": step_ms} if step_ms else {})}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        out.update(gpu=name, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   mfu=tokens / seconds * flops_per_token / peak if peak else None)
    return out


def max_context(step, vocab: int, case: dict) -> int:
    """Longest single sample (batch 1) whose training step fits in GPU memory, over the given lengths."""
    from tailorlm.data.samples import Sample

    best = 0
    for length in case["lengths"]:
        ids = torch.randint(100, vocab, (length,)).tolist()
        try:
            step([Sample(ids, list(ids), {})])
            sync(torch.device(case["device"]))
            best = length
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


# ---------------------------------------------------------------- suites
def suite_cases(suite: str) -> list[dict]:
    if suite == "cpu-smoke":
        return [dict(shape="tiny", method=m, impl=i, device="cpu", steps=2, warmup=1)
                for m in ("lora", "full") for i in ("baseline", "tailorlm")]
    if suite == "cpu-default":
        return [dict(shape="default-job", method="lora", impl="baseline", device="cpu", steps=6, warmup=1),
                dict(shape="default-job", method="lora", impl="tailorlm", device="cpu", steps=6, warmup=1,
                     packing="off"),
                dict(shape="default-job", method="lora", impl="tailorlm", device="cpu", steps=6, warmup=1,
                     packing="on")]
    gpu = dict(device="cuda", warmup=5)
    if suite == "gpu-families":  # LoRA on the other families' shapes, next to the Llama rows of --suite gpu
        return [dict(gpu, shape=shape, method="lora", impl=impl, steps=15) for shape in FAMILY_SHAPES
                for impl in ("baseline", "tailorlm")]
    if suite == "gpu-accum":  # equal samples per optimizer step (32): the recipe's 4 x 8, or fuller packed rows
        # full fine-tuning also compiled, alone and with the fuller rows: the two gains measured together
        compiled = {"full": (("tailorlm", {"compile": "on"}), ("tailorlm", {"budget": 16384, "compile": "on"}))}
        return [dict(gpu, shape="llama-3.2-1b", method=method, impl=impl, steps=10, accum=4, **extra)
                for method in ("lora", "full") for impl, extra in
                (("baseline", {}), ("tailorlm", {}), ("tailorlm", {"budget": 16384}), *compiled.get(method, ()))]
    cases = []
    for shape, steps in (("smollm2-135m", 30), ("llama-3.2-1b", 20)):
        for method in ("lora", "full"):
            cases.append(dict(gpu, shape=shape, method=method, impl="baseline", steps=steps))
            cases.append(dict(gpu, shape=shape, method=method, impl="tailorlm", steps=steps))
            if method == "full":  # compiled, with each step's time: the recompilations show as slow steps
                cases.append(dict(gpu, shape=shape, method=method, impl="tailorlm", steps=steps, compile="on",
                                  series=True))
    return cases


def context_cases(baseline_max: int | None) -> list[dict]:
    common = dict(shape="llama-3.2-1b", method="lora", device="cuda", steps=0, warmup=0, max_context=True)
    if baseline_max is None:
        return [dict(common, impl="baseline", lengths=[4096 * 2**i for i in range(6)])]
    target = 8 * baseline_max
    return [dict(common, impl="tailorlm", checkpointing=True, compile="off",
                 lengths=[target // 4, target // 2, target])]


def run_in_subprocess(case: dict, logs: Path | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    if logs:  # the case's own output (compiler logs when TORCH_LOGS is set), one file per case
        logs.mkdir(parents=True, exist_ok=True)
        name = "-".join(str(case.get(k)) for k in ("shape", "method", "impl", "compile", "budget"))
        (logs / f"{len(list(logs.iterdir())):02d}-{name}.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {**case, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gpu", "gpu-families", "gpu-accum", "cpu-default", "cpu-smoke"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="run only cases whose shape contains this text")
    parser.add_argument("--method", choices=["lora", "full"], help="run only this method's cases")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--logs", type=Path, help="keep each case's output in this folder")
    parser.add_argument("--render", help="re-render BENCHMARKS.md from a saved results JSON")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update ('' to skip)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        KEEP_OPEN.close()  # undo the training setup now, not in the interpreter's teardown
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        from bench.report import update_markdown
        update_markdown(Path(args.markdown), saved["suite"], saved["results"])
        return
    results = []

    def record(result: dict) -> dict:  # saved after every case, so a run cut short keeps what it measured
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            saved = {"suite": args.suite, "date": date.today().isoformat(), "results": results}
            Path(args.json).write_text(json.dumps(saved, indent=1))
        return result

    for case in suite_cases(args.suite):
        if (not args.only or args.only in case["shape"]) and args.method in (None, case["method"]):
            record(run_in_subprocess(case, args.logs))
    if args.suite == "gpu" and (not args.only or args.only == "context"):
        base = record(run_in_subprocess(context_cases(None)[0]))
        if base.get("max_context"):
            record(run_in_subprocess(context_cases(base["max_context"])[0]))
    if args.markdown:
        from bench.report import update_markdown
        update_markdown(Path(args.markdown), args.suite, results)
    from bench.report import table
    print(table(args.suite, results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
