"""Decoding speed on a GPU: generation on the dynamic cache (eager, the CPU path) against the static cache, whose
decoding step transformers compiles into CUDA graphs, on one config's zero-shot test prompts.

    python bench/decode_speed.py --config examples/gsm8k.yaml --model PATH [--data-root DIR] [--limit N]

The static cache is run twice: the first call includes compiling the decoding step (once per shape: every
batch of a call has the same width and row count), the second is what every later call with that shape costs
(the evaluations during training, the fine-tuned model's test pass). Both decode greedily. In fp32 their texts
are identical; in bf16 rounding differs between the two (other kernels, other reduction orders) and one flipped
near-tie changes the rest of a long answer. --noise-floor measures how far the dynamic cache's own texts move
when only the batch size changes (half of it), the yardstick for the share of identical texts.

    python bench/decode_speed.py --limit 8 --batch-size 8 --max-new-tokens 96 --dtype bfloat16 --noise-floor
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "gsm8k.yaml")
    parser.add_argument("--model", default="default", help="model.path")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N test prompts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, help="instead of the config's eval.max_new_tokens")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast the model (default: as loaded)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also decode on the dynamic cache at half the batch size, and compare")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update ('' to skip)")
    args = parser.parse_args()

    from tailorlm.config import load_config
    from tailorlm.data.dataset import load_splits
    from tailorlm.data.templates import PromptTemplate
    from tailorlm.data.tokenize import ChatFormat, encode_examples
    from tailorlm.eval.evaluate import Evaluator
    from tailorlm.eval.generate import generate
    from tailorlm.models.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = Path("/tmp") / f"decode_speed_{args.config.name}"
    resolved.write_text(args.config.read_text().replace("../shared/data", args.data_root))
    cfg = load_config(resolved, [f"model.path={args.model}"])
    loaded = load_model(cfg.model, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.dtype:
        model.to(getattr(torch, args.dtype))
    template = PromptTemplate(cfg.template)
    splits = load_splits(cfg.data, template.fields, template.label_field, template.task)
    fmt = ChatFormat(tokenizer, cfg.template)
    test, _ = encode_examples(splits.test, template, fmt, splits.labels, cfg.template)
    test = test[: args.limit] if args.limit else test
    evaluator = Evaluator(tokenizer, template, fmt, splits.labels, cfg.eval, device, template.label_field)
    prompts = evaluator.prompts(test)[0]
    new_tokens = args.max_new_tokens or evaluator.max_new_tokens

    def timed(static: bool, batch_size: int = args.batch_size) -> tuple[list[str], float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        texts = generate(model, tokenizer, prompts, new_tokens, batch_size, device, static=static)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return texts, time.perf_counter() - started

    dynamic, dynamic_s = timed(False)
    _, first_s = timed(True)
    static, static_s = timed(True)
    agree = sum(a == b for a, b in zip(dynamic, static)) / len(prompts)
    floor = None
    if args.noise_floor:
        halved = timed(False, max(1, args.batch_size // 2))[0]
        floor = sum(a == b for a, b in zip(dynamic, halved)) / len(prompts)
    lengths = [len(p) for p in prompts]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    figures = {"date": date.today().isoformat(), "machine": where, "torch": torch.__version__,
               "config": str(args.config), "prompts": len(prompts), "max_new_tokens": new_tokens,
               "batch_size": args.batch_size, "prompt_tokens_median": sorted(lengths)[len(lengths) // 2],
               "dynamic_s": round(dynamic_s, 2), "static_first_s": round(first_s, 2), "static_s": round(static_s, 2),
               "texts_equal": round(agree, 3),
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "texts_equal_dynamic_half_batch": None if floor is None else round(floor, 3)}
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    per100 = lambda s: f"{100 * s / len(prompts):.1f}"  # noqa: E731
    table = ["| generation | seconds | s per 100 answers | speed-up |", "|---|---|---|---|",
             f"| dynamic cache, eager (the CPU path) | {dynamic_s:.1f} | {per100(dynamic_s)} | - |",
             f"| static cache, first call (compiles the decoding step) | {first_s:.1f} | {per100(first_s)} | "
             f"{dynamic_s / first_s:.2f}x |",
             f"| static cache, compiled (every later call of that shape) | {static_s:.1f} | {per100(static_s)} | "
             f"{dynamic_s / static_s:.2f}x |"]
    body = (f"<!-- bench:decode -->\n### Decoding on a GPU: dynamic cache against the compiled static cache\n\n"
            f"Measured {figures['date']} on {where} (torch {torch.__version__}) by `python bench/decode_speed.py "
            f"--config {args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`: "
            f"{len(prompts)} zero-shot test prompts (median {figures['prompt_tokens_median']} tokens), up to "
            f"{new_tokens} new tokens, batches of {args.batch_size}, greedy, {figures['dtype']}. Texts identical for "
            f"{agree:.0%} of prompts" + ("" if floor is None else f" (the dynamic cache against itself at half the "
                                        f"batch size: {floor:.0%})") + ".\n\n" + "\n".join(table) + "\n<!-- /bench:decode -->")
    print(body)
    if args.markdown:
        from bench.report import replace_section
        replace_section(Path(args.markdown), "decode", body)


if __name__ == "__main__":
    main()
