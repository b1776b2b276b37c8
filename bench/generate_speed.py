"""Evaluation speed: one example at a time with transformers' generate, against tailorlm's batched generation,
on the default job's test split (zero-shot prompts, greedy, the evaluator's token budget).

    python bench/generate_speed.py [--limit N]

tailorlm's generation sorts prompts by length, batches them with left padding and a KV cache, runs the
prompt opening every row shares once, and stops a batch as soon as every row has ended. Both sides decode
greedily, so their texts should agree; the share that does is reported (float rounding may flip a few).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test examples")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update ('' to skip)")
    args = parser.parse_args()

    from tailorlm.config import ModelSpec, load_config
    from tailorlm.data.dataset import load_splits
    from tailorlm.data.templates import PromptTemplate
    from tailorlm.data.tokenize import ChatFormat, encode_examples
    from tailorlm.eval.evaluate import Evaluator
    from tailorlm.eval.generate import generate, stop_token_ids
    from tailorlm.models.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(None)
    loaded = load_model(ModelSpec(path="default"), device)
    model, tokenizer = loaded.model, loaded.tokenizer
    template = PromptTemplate(cfg.template)
    splits = load_splits(cfg.data, template.fields, "label")
    fmt = ChatFormat(tokenizer, cfg.template)
    test, _ = encode_examples(splits.test, template, fmt, splits.labels, cfg.template)
    test = test[: args.limit] if args.limit else test
    evaluator = Evaluator(tokenizer, template, fmt, splits.labels, cfg.eval, device)
    prompts = evaluator.prompts(test)[0]  # (prompt ids, demonstrations dropped): zero-shot drops none

    t0 = time.perf_counter()
    batched = generate(model, tokenizer, prompts, evaluator.max_new_tokens, cfg.eval.batch_size, device)
    batched_s = time.perf_counter() - t0

    stops = stop_token_ids(tokenizer, model)
    single = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=evaluator.max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            single.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    single_s = time.perf_counter() - t0

    agree = sum(a.strip() == b.strip() for a, b in zip(batched, single)) / len(prompts)
    rows = [("transformers generate, one example at a time", single_s, None),
            (f"tailorlm batched (batch {cfg.eval.batch_size})", batched_s, single_s / batched_s)]
    table = ["| generation | seconds | examples/s | speed-up |", "|---|---|---|---|"]
    table += [f"| {name} | {s:.1f} | {len(prompts) / s:.2f} | {'-' if x is None else f'{x:.2f}x'} |"
              for name, s, x in rows]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "2-core CPU, fp32"
    body = (f"<!-- bench:generate -->\n### Evaluation speed: the default job's test split ({len(prompts)} examples, "
            f"zero-shot prompts, up to {evaluator.max_new_tokens} new tokens)\n\nMeasured {date.today().isoformat()} "
            f"on {where} by `python bench/generate_speed.py`; target: at least 3x. Greedy texts identical for "
            f"{agree:.0%} of examples.\n\n" + "\n".join(table) + "\n<!-- /bench:generate -->")
    print(body)
    if args.markdown:
        from bench.report import replace_section
        replace_section(Path(args.markdown), "generate", body)


if __name__ == "__main__":
    main()
