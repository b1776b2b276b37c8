"""GRPO speed, tailorlm against TRL's GRPOTrainer, side by side in one run: the same model, the same prompts
(tailorlm renders them once; TRL gets the same tokens as text), the same group size, batch, answer length,
LoRA adapter, learning rate and loss. Every step counts, the first (warm-up) included, for both.

    pip install "trl==1.16.0"        # not a dependency of tailorlm: this comparison is its only user
    .venv/bin/python bench/grpo_speed.py examples/trec.yaml --steps 8 --out bench/results_grpo_speed_cpu.json

What it reports per trainer: seconds per step (mean), answer tokens per step and per second of step time,
and, for tailorlm, the share of the step spent sampling (its train_log records it). The rewards are not the
same and do not enter the timing: tailorlm's is its accuracy reward (the answer mapped to the label set),
TRL's here the exact label match of the answer's first line, which a base model's free answers rarely make
(then TRL's update has no signal, but its forward and backward passes run all the same).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

GROUP, PROMPTS, MAX_NEW, LR, LOSS = 4, 8, 16, 5e-5, "dapo"


def tailorlm_side(config: str, steps: int, out: Path) -> dict:
    from tailorlm.api import run

    overrides = {"objective.name": "grpo", "objective.grpo.group_size": GROUP, "objective.grpo.loss": LOSS,
                 "objective.grpo.max_new_tokens": MAX_NEW, "train.batch_size": PROMPTS, "train.max_steps": steps,
                 "train.lr": LR, "train.eval_every": 0, "eval.during_training": 0, "eval.test": False,
                 "eval.example_losses": False, "eval.retention.data": None, "method.name": "lora"}
    run(config, output=out, overrides=overrides, quiet=True)
    log = json.loads((out / "train_log.json").read_text())
    rows = log["train_loss"]
    return {"trainer": "tailorlm", "steps": len(rows), "seconds_per_step": log["step_seconds"] / len(rows),
            "answer_tokens_per_step": statistics.mean(r["sampled_tokens"] for r in rows),
            "sampling_seconds_per_step": statistics.mean(r["sampling_seconds"] for r in rows)}


def trl_side(config: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tailorlm.config import load_config
    from tailorlm.models.loading import load_model
    from tailorlm.pipeline.prepare import prepare

    cfg = load_config(config, [])
    prepared = prepare(cfg)
    loaded = load_model(cfg.model, torch.device("cpu"))
    tokenizer = loaded.tokenizer
    items = prepared.training_set[:steps * PROMPTS]
    # the gold answer is the sample's loss-carrying tokens, less the end-of-turn token
    rows = [{"prompt": tokenizer.decode(s.prompt_ids),
             "label": tokenizer.decode(s.input_ids[len(s.prompt_ids):], skip_special_tokens=True).strip()}
            for s in items]

    def accuracy(prompts, completions, label, **_):
        return [float(c.strip().split("\n")[0].strip().lower() == gold.strip().lower())
                for c, gold in zip(completions, label)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds, self.lengths = {}, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.starts[state.global_step] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.starts[state.global_step - 1])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, num_generations=GROUP, per_device_train_batch_size=GROUP * PROMPTS,
                          max_completion_length=MAX_NEW, learning_rate=LR, loss_type=LOSS, beta=0.0,
                          temperature=1.0, max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
                          bf16=False, save_strategy="no", lr_scheduler_type="constant", seed=0)
        lora = LoraConfig(r=cfg.method.lora.r, lora_alpha=cfg.method.lora.alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=loaded.model, reward_funcs=accuracy, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=lora, callbacks=[clock])
        trainer.train()
    tokens = statistics.mean(clock.lengths) * GROUP * PROMPTS if clock.lengths else None
    return {"trainer": "trl " + __import__("trl").__version__, "steps": len(clock.seconds),
            "seconds_per_step": statistics.mean(clock.seconds), "answer_tokens_per_step": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [tailorlm_side(a.config, a.steps, Path(tmp) / "run"), trl_side(a.config, a.steps)]
    for r in results:
        if r.get("answer_tokens_per_step") and r.get("seconds_per_step"):
            r["answer_tokens_per_second"] = r["answer_tokens_per_step"] / r["seconds_per_step"]
        if r.get("sampling_seconds_per_step") and r.get("seconds_per_step"):
            r["sampling_share"] = r["sampling_seconds_per_step"] / r["seconds_per_step"]
    setup = {"config": a.config, "group_size": GROUP, "prompts_per_step": PROMPTS, "max_new_tokens": MAX_NEW,
             "lr": LR, "loss": LOSS, "lora_r": 16, "steps": a.steps}
    text = json.dumps({"setup": setup, "results": results}, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
