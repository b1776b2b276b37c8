"""A run's GGUF export in llama.cpp against the merged PyTorch model, on every test prompt of the run.

    python bench/llamacpp_agreement.py RUN [--limit N] [--threads 2]

`tailor export --verify` checks a few prompts; this runs the whole test split. Each prompt is the run's own
token ids (rendered and tokenized as in training); both engines answer greedily with the evaluation's token
budget and stop at the end token; the answers are compared as text and as the task's parsed predictions, and
scored with the task's metric. Export the run first: `tailor export RUN --format gguf`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run directory with a GGUF export")
    parser.add_argument("--limit", type=int, help="only the first N test prompts")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import torch

    from tailorlm.eval.evaluate import Evaluator
    from tailorlm.eval.generate import generate
    from tailorlm.models.loading import quiet_library_logs
    from tailorlm.models.trained import load_trained
    from tailorlm.pipeline.prepare import prepare
    from tailorlm.serve.jobs import Sampling
    from tailorlm.serve.llamacpp import load_llamacpp_engine

    quiet_library_logs()
    torch.set_num_threads(args.threads)
    trained = load_trained(args.run, merge=True)
    prepared = prepare(trained.cfg, tokenizer=trained.tokenizer,
                       n_params=sum(p.numel() for p in trained.model.parameters()))
    task = next(iter(prepared.tasks.values()))
    samples = task.encoded["test"][: args.limit]
    evaluator = Evaluator(trained.tokenizer, task.template, task.fmt, task.labels, trained.cfg.eval, "cpu",
                          task.template.label_field)
    prompts = [s.prompt_ids for s in samples]
    started = time.perf_counter()
    reference = generate(trained.model, trained.tokenizer, prompts, evaluator.max_new_tokens,
                         trained.cfg.eval.batch_size, torch.device("cpu"), description="PyTorch")
    torch_s = time.perf_counter() - started
    engine, _ = load_llamacpp_engine(args.run, args.threads)
    started = time.perf_counter()
    try:
        exported = [engine.complete(p, Sampling(evaluator.max_new_tokens)).text for p in prompts]
    finally:
        engine.close()
    llama_s = time.perf_counter() - started
    examples = [s.example for s in samples]
    torch_metrics, torch_pred = task.template.task.score(reference, examples, task.labels)
    llama_metrics, llama_pred = task.template.task.score(exported, examples, task.labels)
    headline = task.template.task.headline
    figures = {"run": Path(args.run).name, "prompts": len(prompts),
               "identical_text": sum(a.strip() == b.strip() for a, b in zip(reference, exported)),
               "identical_prediction": sum(a == b for a, b in zip(torch_pred, llama_pred)),
               f"pytorch_{headline}": torch_metrics[headline], f"llamacpp_{headline}": llama_metrics[headline],
               "pytorch_s": round(torch_s, 1), "llamacpp_s": round(llama_s, 1)}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
