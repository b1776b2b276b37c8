"""GRPO's sampler and rewards (train/grpo.py asks for them): the task's prompts answered group_size times by
sampling from the model as it trains, each answer scored by what evaluation already measures.

The default reward is the task's headline metric of one answer against its example's reference: a correct
label (1 or 0), the entity F1 of the sentence, the exact final answer, chrF, ROUGE-L. The same scorer as
evaluation (tasks/*.py), so the model is rewarded for exactly what its report will measure. Terms add up with
their weights (objective.grpo.reward). A term may be a user's function, which is their code: it is loaded only
when the command said --allow-code (config/loading.py refuses such a config otherwise, and this module checks
again, since a config can also be built in Python).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

import torch

from tailorlm.config import GRPOSpec, RewardTerm
from tailorlm.data.samples import Sample
from tailorlm.errors import TailorError
from tailorlm.eval.evaluate import Evaluator
from tailorlm.eval.generate import stop_token_ids
from tailorlm.train.grpo import Rollout

# Arguments of generate() win over the model's generation_config.json, whose sampling filters and penalties
# (top_k 50, top_p 0.9, repetition_penalty 1.05 in many chat models' files) would sample answers from another
# distribution than the one GRPO's loss scores: each is set to the value that leaves the distribution alone.
UNFILTERED = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
              "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}
PERCENT_METRICS = ("bleu", "chrf")  # reported 0..100 (sacrebleu); rewards are kept on 0..1 like the others
COUNT_KEYS = ("gold", "predicted")  # an extraction with nothing to find and nothing found: a perfect answer


class TaskSampler:
    """Samples group_size answers per prompt (temperature objective.grpo.temperature, no top-k or top-p: the
    policy's own distribution) and rewards each with the configured terms."""

    def __init__(self, spec: GRPOSpec, evaluator: Evaluator, code_allowed: bool, batch_size: int):
        self.spec, self.evaluator = spec, evaluator
        self.tokenizer, self.device = evaluator.tokenizer, evaluator.device
        self.max_new_tokens = spec.max_new_tokens or evaluator.max_new_tokens
        # prompts per generate call: each brings group_size rows to the cache
        self.prompts_per_call = max(1, batch_size // spec.group_size)
        self.terms = [(term, _term_scorer(term, evaluator, code_allowed)) for term in
                      (spec.reward or [RewardTerm(metric=evaluator.task.headline)])]

    def __call__(self, model, items: list[Sample]) -> list[Rollout]:
        answers = sample_answers(model, self.tokenizer, [s.prompt_ids for s in items], self.spec.group_size,
                                 self.spec.temperature, self.max_new_tokens, self.prompts_per_call, self.device)
        stops = set(stop_token_ids(self.tokenizer, model))
        rollouts = []
        for item, completions in zip(items, answers):
            texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
            ended = [bool(c) and c[-1] in stops for c in completions]
            terms = {term.label: [score(text, done, item.example) for text, done in zip(texts, ended)]
                     for term, score in self.terms}
            rewards = [sum(term.scale * terms[term.label][i] for term, _ in self.terms) for i in range(len(texts))]
            rollouts.append(Rollout(completions, rewards, terms))
        return rollouts


def sample_answers(model, tokenizer, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                   prompts_per_call: int, device) -> list[list[list[int]]]:
    """n sampled answers to each prompt, as token ids up to and including the stop token that ended them (an
    answer cut at max_new_tokens has none): exactly the tokens the policy produced, which GRPO trains on."""
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), prompts_per_call):
        rows = prompts[start:start + prompts_per_call]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                   num_return_sequences=n, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=pad, **UNFILTERED)
        for i in range(len(rows)):
            group = []
            for ids in generated[i * n:(i + 1) * n, width:].tolist():
                end = next((j for j, t in enumerate(ids) if t in stops), None)
                group.append(ids if end is None else ids[:end + 1])
            out.append(group)
    return out


def _term_scorer(term: RewardTerm, evaluator: Evaluator, code_allowed: bool) -> Callable[[str, bool, dict], float]:
    """score(answer text, whether it ended, example) for one reward term."""
    task, labels = evaluator.task, evaluator.labels
    if term.function is not None:
        function = load_reward_function(term.function, code_allowed)

        def called(text: str, ended: bool, example: dict) -> float:
            value = function(text, {k: v for k, v in example.items() if not k.startswith("_")})
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TailorError(f"objective.grpo.reward: {term.function} returned {value!r} for the answer "
                                  f"{text[:60]!r}; a reward is a finite number")
            return float(value)
        return called
    if term.format is not None:
        def parses(text: str, ended: bool, example: dict) -> float:
            metrics, _ = task.score([text], [example], labels)
            for key in ("valid", "answered"):  # a label of the set; a final answer given
                if key in metrics:
                    return float(metrics[key])
            return float(ended and bool(text))
        return parses
    if term.metric not in task.columns:
        raise TailorError(f"objective.grpo.reward: metric '{term.metric}' is not one the {task.name} task measures "
                          f"({', '.join(task.columns)})")

    def metric(text: str, ended: bool, example: dict) -> float:
        metrics, _ = task.score([text], [example], labels)
        if ended and all(metrics.get(k) == 0 for k in COUNT_KEYS):  # an answer cut off claims nothing
            return 1.0
        value = float(metrics.get(term.metric) or 0.0)
        value = value / 100 if term.metric in PERCENT_METRICS else value
        return value if math.isfinite(value) else 0.0

    return metric


def load_reward_function(spec: str, code_allowed: bool) -> Callable:
    """FILE.py:NAME, imported from the file: the user's code, so only with --allow-code."""
    if not code_allowed:
        raise TailorError(f"objective.grpo.reward: the function {spec} is Python code; add --allow-code to the command "
                          f"(allow_code=True in Python) to let it run")
    file, _, name = spec.rpartition(":")
    path = Path(file).expanduser()
    if not path.is_file():
        raise TailorError(f"objective.grpo.reward: {file}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"tailor_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise TailorError(f"objective.grpo.reward: {file} failed to load: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TailorError(f"objective.grpo.reward: {file} has no function {name}")
    return function
