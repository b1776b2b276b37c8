"""GRPO (Shao et al. 2024, DeepSeekMath) as an objective of the one loop: each step samples a group of answers
per prompt from the current model, rewards each one, and raises the likelihood of the answers that beat their
group's mean reward while lowering the others'.

The loop asks it what it asks every objective (objectives.py). begin_step samples the step's groups: the
sampler is handed in (eval/rollouts.py builds it from the task's prompts and metrics, since train/ does not
import eval/). Then units, sequences and loss train on the sampled answers as completions of their prompts,
so packing, accumulation, DDP, checkpoints and resume work as for SFT. Sampling draws from torch's generator,
whose state every checkpoint holds, so a resumed run samples the same answers as one that never stopped.

The token loss is the clipped-ratio surrogate: ratio = p(token) / p_old(token), loss = -min(ratio * A,
clip(ratio, 1 - clip, 1 + clip_high) * A), with A the answer's advantage. A group trains num_iterations
updates (the loop gives the same prompts that many steps; checkpoints fall between groups, so resume stays
exact): at the first the ratio is 1 (the gradient is -A * grad log p), at the later ones the clip bounds how
far they move. How token losses become the step's loss (objective.grpo.loss):
- grpo: each answer's tokens averaged, then the answers; A = (r - mean) / (std + eps) within the group.
- dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training"): tokens summed and divided by a constant,
  group_size x max_new_tokens, and A = r - mean: no bias for short wrong answers or easy questions.
- dapo (Yu et al. 2025): every token of the step counts once (summed over the step, divided by its tokens).
With objective.beta > 0, beta x KL to the starting model (the k3 estimator) is added per token; the starting
model is the base with the LoRA adapter off, so no second copy of the weights is held (LoRA only).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tailorlm.config import ObjectiveSpec
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.errors import TailorError
from tailorlm.kernels.loss import completion_token_logps
from tailorlm.train import distributed
from tailorlm.train.objectives import Objective

STD_EPS = 1e-4  # added to a group's reward spread before dividing (TRL's value): a spread of 0 gives A = 0


@dataclass
class Rollout:
    """One prompt's sampled answers: the tokens of each (ending with its stop token when it ended), its summed
    reward, and each reward term's score by name."""
    completions: list[list[int]]
    rewards: list[float]
    terms: dict[str, list[float]] = field(default_factory=dict)


class Sampler(Protocol):
    """Answers `items` (prompt samples) group_size times each, on the model as it is, and rewards them."""
    max_new_tokens: int

    def __call__(self, model, items: list[Sample]) -> list[Rollout]: ...


@dataclass
class _Group:
    sequences: list[Sample]  # prompt + answer, the answer carrying the loss
    advantages: list[float]
    reference: list[list[float]] | None = None  # per answer token: the starting model's log-prob (beta > 0)
    sampling: list[list[float]] | None = None  # per answer token: the sampling weights' log-prob (num_iterations > 1)
    uses: int = 0  # optimizer steps it has trained


class GRPO(Objective):
    name = "grpo"

    def __init__(self, spec: ObjectiveSpec, sampler: Sampler):
        self.spec, self.beta, self.sampler = spec.grpo, spec.strength, sampler
        self.repeats = spec.grpo.num_iterations
        self.high = self.spec.clip_high if self.spec.clip_high is not None else self.spec.clip
        self.groups: dict[int, _Group] = {}  # id(prompt sample) -> its group, for this step
        self.step_tokens = 0  # answer tokens of the step over every process (dapo's normaliser)
        self._figures: dict = {}

    def unit_name(self) -> str:
        return f"prompts (grpo, {self.spec.group_size} answers each)"

    def units(self, items: list[Sample]) -> int:
        answers = len(items) * self.spec.group_size
        if self.spec.loss == "dr_grpo":
            return answers * self.sampler.max_new_tokens
        return self.step_tokens if self.spec.loss == "dapo" else answers

    def sequences(self, items: list[Sample]) -> list[Sample]:
        return [s for it in items for s in self.groups[id(it)].sequences]

    def begin_step(self, group: list[list[Sample]], run, ctx) -> None:
        """Sample and reward every prompt's answers (this process's share of each micro-batch), then their
        advantages and, with beta > 0, the starting model's log-probs of them."""
        world, began = distributed.world(), time.perf_counter()
        current = [self.groups.get(id(it)) for items in group for it in distributed.share(items, world)[0]]
        if current and all(g is not None and g.uses < self.repeats for g in current):
            for g in current:  # the same prompts again (num_iterations): their answers train once more
                g.uses += 1
            self._figures.update(sampling_seconds=0.0, sampled_tokens=0)
            return
        self.groups, tokens = {}, 0
        rewards, spreads, flat, lengths, terms = [], [], 0, [], {}
        for items in group:
            mine, real = distributed.share(items, world)
            rollouts = run(lambda model: _sampling(model, ctx, lambda m: self.sampler(m, mine)))
            for item, rollout in zip(mine, rollouts):
                self.groups[id(item)] = self._group(item, rollout)
                if not real:  # a rank's stand-in for a short micro-batch trains at weight 0: not counted
                    continue
                tokens += sum(len(c) for c in rollout.completions)
                lengths += [len(c) for c in rollout.completions]
                rewards += rollout.rewards
                spread = torch.tensor(rollout.rewards, dtype=torch.float64).std().item()
                spreads.append(spread)
                flat += spread == 0
                for name, scores in rollout.terms.items():
                    terms.setdefault(name, []).extend(scores)
            if self.beta:
                self._attach_reference(mine, run, ctx)
            if self.repeats > 1:  # the later updates compare with the weights that sampled the answers
                self._attach_sampling(mine, run, ctx)
        sampled = time.perf_counter() - began
        names = sorted(terms)  # the same on every process: the sampler's terms
        totals = distributed.sum_floats(float(tokens), sum(rewards), float(len(rewards)), sum(spreads),
                                        float(flat), float(len(spreads)), sum(lengths),
                                        *(sum(terms[n]) for n in names))
        self.step_tokens = int(totals[0])
        answers, groups = max(totals[2], 1.0), max(totals[5], 1.0)
        self._figures = {"reward": totals[1] / answers, "reward_spread": totals[3] / groups,
                         "flat_groups": totals[4] / groups, "answer_tokens": totals[6] / answers,
                         "sampled_tokens": tokens, "sampling_seconds": sampled,
                         **{f"reward/{name}": total / answers for name, total in zip(names, totals[7:])}}

    def figures(self) -> dict:
        """The step's rewards for the log: the mean, the mean spread within groups, the share of groups whose
        answers all scored the same (they teach nothing), each term's mean, answer length, sampling time."""
        return dict(self._figures)

    def _group(self, item: Sample, rollout: Rollout) -> _Group:
        prompt = item.prompt_ids
        sequences = [Sample(prompt + list(c), [IGNORE] * len(prompt) + list(c), item.example)
                     for c in rollout.completions]
        r = torch.tensor(rollout.rewards, dtype=torch.float64)
        centred = r - r.mean()
        advantages = centred if self.spec.loss == "dr_grpo" else centred / (r.std() + STD_EPS)
        return _Group(sequences, advantages.tolist(), uses=1)

    def _attach_reference(self, items: list[Sample], run, ctx) -> None:
        def reference(model, sequences) -> list[list[float]]:
            if not hasattr(model, "disable_adapter"):
                raise TailorError("objective.beta above 0 for grpo needs method lora or qlora: the starting model "
                                  "is the base with the adapter off (full fine-tuning would hold a second copy)")
            with model.disable_adapter():
                return _answer_logps(model, sequences, ctx, self.spec.temperature)

        for item, per_answer in zip(items, self._per_group(items, run, reference)):
            self.groups[id(item)].reference = per_answer

    def _attach_sampling(self, items: list[Sample], run, ctx) -> None:
        measure = lambda m, seqs: _answer_logps(m, seqs, ctx, self.spec.temperature)  # noqa: E731
        for item, per_answer in zip(items, self._per_group(items, run, measure)):
            self.groups[id(item)].sampling = per_answer

    def _per_group(self, items: list[Sample], run, measure) -> list[list[list[float]]]:
        """measure(model, sequences) over every answer of `items`, split back per prompt."""
        sequences = [s for it in items for s in self.groups[id(it)].sequences]
        per_answer = run(lambda model: measure(model, sequences))
        out = []
        for item in items:
            n = len(self.groups[id(item)].sequences)
            out.append(per_answer[:n])
            per_answer = per_answer[n:]
        return out

    def loss(self, forward, batch: dict, items: list[Sample]) -> torch.Tensor:
        logps, sample, _ = forward(lambda model, shared_prefix: completion_token_logps(
            model, batch, shared_prefix, self.spec.temperature))
        groups = [self.groups[id(it)] for it in items]
        advantages = torch.tensor([a for g in groups for a in g.advantages], dtype=logps.dtype, device=logps.device)
        return self.token_losses(logps, sample, advantages,
                                 [r for g in groups for r in g.reference] if self.beta else None,
                                 [r for g in groups for r in g.sampling] if self.repeats > 1 else None)

    def token_losses(self, logps: torch.Tensor, sample: torch.Tensor, advantages: torch.Tensor,
                     reference: list[list[float]] | None, sampling: list[list[float]] | None = None) -> torch.Tensor:
        """The summed loss of a batch of answers: logps of every answer token in order, the answer (index into
        advantages) each belongs to, the starting model's log-probs of them (beta > 0) and the sampling
        weights' (num_iterations > 1; otherwise these weights sampled them, and the ratio is 1)."""
        a = advantages[sample]
        old = logps.detach() if sampling is None else _flat(sampling, logps)
        ratio = torch.exp(logps - old)
        per_token = -torch.min(ratio * a, ratio.clamp(1 - self.spec.clip, 1 + self.high) * a)
        if reference is not None:
            gap = _flat(reference, logps) - logps
            per_token = per_token + self.beta * (torch.exp(gap) - gap - 1)
        if self.spec.loss != "grpo":
            return per_token.sum()
        n = advantages.numel()
        sums = per_token.new_zeros(n).index_add(0, sample, per_token)
        counts = per_token.new_zeros(n).index_add(0, sample, torch.ones_like(per_token)).clamp(min=1)
        return (sums / counts).sum()


@contextlib.contextmanager
def _still(model):
    """The model in eval mode without gradients (no dropout: what sampled is what is scored), put back after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _sampling(model, ctx, sample: Callable):
    """The sampler on the plain model (no packing or compiled layers)."""
    with _still(model), ctx.eager():
        return sample(model)


def _answer_logps(model, sequences: list[Sample], ctx, temperature: float) -> list[list[float]]:
    """Each answer's token log-probs under `model` as it is."""
    with _still(model), ctx.autocast():
        logps, sample, _ = completion_token_logps(model, ctx.batch(sequences), False, temperature)
    return _split(logps.double(), sample, len(sequences))


def _flat(per_answer: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([x for answer in per_answer for x in answer], dtype=like.dtype, device=like.device)


def _split(logps: torch.Tensor, sample: torch.Tensor, n: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in range(n)]
    for value, index in zip(logps.tolist(), sample.tolist()):
        if index < n:  # a packed row's filler segment has no answer
            out[index].append(value)
    return out
