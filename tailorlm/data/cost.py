"""The compute of a training run, counted before it starts: FLOPs per token by method, over the real batches.

Per token, a weight matrix of P parameters costs 2P FLOPs forward; in backward, 2P more for the gradient of
its input, needed when any trainable parameter lies below it (gradients flow down to the lowest trainable
part and stop there), and 2P for its own gradient when it trains. So full fine-tuning costs 6N; blocks below
the lowest trainable one (method.freeze.first_blocks) run forward only, 2P; a frozen matrix above trainable
ones costs 4P; LoRA keeps the whole base frozen with adapters from the first block up, so about 4N plus the
adapters' 6r(d_in + d_out) a matrix. The input embedding is a lookup (no FLOPs); the head runs only on the
tokens that carry loss (kernels/loss.py), and a tied head trains or freezes with the embeddings.

Attention's scores cost 4 x width FLOPs per query and key forward, twice that again in backward where the
block's input gradient is needed: the 12 x layers x context x width of the usual accounting, with the
context the batches really attend over. The batches themselves are laid out as training lays them out
(data/batching.py): padded rows (CPU) compute their padding and share their common opening once
(kernels/prefix.py); packed rows (CUDA) compute real tokens only.

Not counted, because they are not training steps: evaluations during training, the prompting baselines,
the reports. KTO's reference point, a forward pass over a few mismatched answers each step, is left out too.
Paired preference objectives are counted as twice the chosen answers (the rejected ones are not encoded here).
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from tailorlm.config import MethodSpec, RunConfig, TrainSpec
from tailorlm.data import machine_rate
from tailorlm.data.batching import epoch_batches
from tailorlm.data.model_shape import BOTTOM, TOP, ModelShape, Part, unfreeze_group
from tailorlm.data.samples import IGNORE, Sample

MIN_SHARED_PREFIX = 8  # kernels/prefix.py: a shorter common opening is computed row by row


@dataclass(frozen=True)
class TokenCost:
    """FLOPs of each kind of token while one set of parameters trains, and the passes a micro-batch makes."""
    decoder: float  # per token through the decoder (blocks, norms, LoRA adapters)
    head: float  # per token that carries loss: the head runs on those alone
    attention: float  # per (query, key) pair attended: summed over the blocks
    passes: int  # matrix passes per micro-batch (forward, input gradient, weight gradient of each part)
    trainable: int  # parameters the optimizer updates at each step

    def per_token(self, context: float = 0.0) -> float:
        """FLOPs of a token that carries loss and attends over `context` keys."""
        return self.decoder + self.head + self.attention * context


def token_cost(shape: ModelShape, trains: Callable[[Part], bool], adapters: tuple[Part, ...] = (),
               recompute: bool = False) -> TokenCost:
    """The cost of a token when `trains` says which parts train, with LoRA `adapters` (trainable) beside
    them. recompute: activation checkpointing runs each block's forward again in backward."""
    trainable = {id(p) for p in shape.parts if trains(p)} | {id(p) for p in adapters}
    lowest = min((p.flow for p in shape.parts + adapters if id(p) in trainable), default=math.inf)
    decoder = head = 0.0
    passes = 0
    trained = sum(p.params for p in shape.parts + adapters if id(p) in trainable and p.counted)
    for part in shape.parts + adapters:
        if part.kind == "lookup":
            continue
        input_gradient, own_gradient = part.flow > lowest, id(part) in trainable
        again = recompute and (input_gradient or own_gradient) and 0 <= part.level < TOP
        n = 1 + input_gradient + own_gradient + again  # each pass is 2 FLOPs per parameter
        passes += n
        if part.kind == "head":
            head += 2 * n * part.params
        else:
            decoder += 2 * n * part.params
    attention = 0.0
    for block in range(shape.blocks if shape.attention_width else 0):
        # the scores sit between the query/key/value and output matrices: two products forward (QK, AV),
        # twice as many backward when the block's input gradient is needed, and again under recompute
        n = 1 + 2 * (block * 10 + 2.5 > lowest) + (recompute and block * 10 + 2.5 > lowest)
        attention += 4 * shape.attention_width * n
        passes += 2 * n
    return TokenCost(decoder, head, attention, passes, trained)


def method_phases(shape: ModelShape, method: MethodSpec, steps_per_epoch: int, total_steps: int
                  ) -> list[tuple[float, Callable[[Part], bool], tuple[Part, ...]]]:
    """(share of the steps, which parts train, LoRA adapters) for each phase of the method's training."""
    if method.name in ("lora", "qlora"):
        return [(1.0, _nothing, lora_adapters(shape, method.lora.r, method.lora.target_modules))]
    if not shape.layered:  # which parameters a freeze spares cannot be placed: counted in full, an upper bound
        return [(1.0, _everything, ())]
    if method.name == "freeze":
        spec = method.freeze

        def trains(part: Part) -> bool:  # as models/methods.py Freeze.prepare decides it
            low = part.level == BOTTOM or 0 <= part.level < spec.first_blocks
            return not ((spec.first_blocks and low) or any(fnmatch.fnmatch(part.name, p) for p in spec.patterns))
        return [(1.0, trains, ())]
    if method.name == "gradual_unfreeze":
        return unfreeze_phases(shape, method, steps_per_epoch, total_steps)
    return [(1.0, _everything, ())]


def _everything(part: Part) -> bool:
    return True


def _nothing(part: Part) -> bool:
    return False


def lora_adapters(shape: ModelShape, rank: int, targets: str | list[str]) -> tuple[Part, ...]:
    """Two trainable parts per adapted matrix, PEFT's A (r x inputs) and B (outputs x r). 'all-linear' adapts
    every block matrix (never the head); a list names modules by their last name; another string is a
    regular expression over whole module names, as PEFT reads it."""
    def adapted(part: Part) -> bool:
        module = part.name.removesuffix(".weight")
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return module.rsplit(".", 1)[-1] in targets
    # A reads the matrix's input, B reads A's output: B's input gradient is needed even where A's is not
    found = tuple(Part(p.name.removesuffix("weight") + f"lora_{ab}.weight", p.level, p.flow + step, rank * size)
                  for p in shape.parts if p.matrix and p.kind == "decoder" and adapted(p)
                  for ab, step, size in (("A", 0, p.matrix[0]), ("B", 0.1, p.matrix[1])))
    if found or any(p.matrix for p in shape.parts):
        return found
    # A layout without matrices (its architecture's keys are not read): adapters from the first block up,
    # their own size unknown, so the base is counted with its input gradients and the adapters as free.
    first = min(p.flow for p in shape.parts if p.kind == "decoder")
    return (Part("adapters", 0, first - 0.5, 0),)


def unfreeze_groups(shape: ModelShape, n_groups: int) -> list[set[int]]:
    """The levels of each unfreezing group, top first, by the strategy's own rule (unfreeze_group)."""
    n_blocks = shape.blocks
    n_groups = max(1, min(n_groups, n_blocks + 1))
    groups: list[set[int]] = [set() for _ in range(n_groups)]
    for level in {p.level for p in shape.parts}:
        groups[unfreeze_group(level, n_blocks, n_groups)].add(level)
    return [g for g in groups if g]


def unfreeze_phases(shape: ModelShape, method: MethodSpec, steps_per_epoch: int, total_steps: int):
    """Stage s trains groups 0..s; each stage's share of the steps as GradualUnfreeze plans and steps them."""
    spec = method.unfreeze
    groups = unfreeze_groups(shape, spec.groups)
    if spec.every is not None:
        every = spec.every * (steps_per_epoch if spec.unit == "epoch" else 1)
    else:
        every = max(1, math.ceil(total_steps / len(groups)))
    phases = []
    for stage in range(len(groups)):
        first = stage * every
        last = total_steps if stage == len(groups) - 1 else min(total_steps, (stage + 1) * every)
        if last > first:
            live = set().union(*groups[:stage + 1])
            phases.append(((last - first) / total_steps, lambda part, live=live: part.level in live, ()))
    return phases


@dataclass(frozen=True)
class Work:
    """What one epoch of batches computes: tokens through the decoder (padding and a once-computed shared
    opening as training runs them), tokens through the head, (query, key) pairs attended, real tokens."""
    decoder_tokens: float
    head_tokens: float
    attended_pairs: float
    real_tokens: int

    def flops(self, cost: TokenCost) -> float:
        return (self.decoder_tokens * cost.decoder + self.head_tokens * cost.head
                + self.attended_pairs * cost.attention)


def epoch_work(samples: list[Sample], batch_size: int, seed: int, packed: bool) -> Work:
    """The first epoch's batches as the training loop builds them (later epochs differ only in order)."""
    decoder = head = pairs = 0.0
    for idx in epoch_batches(samples, batch_size, seed, 0):
        rows = [samples[i] for i in idx]
        lengths = [len(s) for s in rows]
        head += sum(sum(t != IGNORE for t in s.labels[1:]) for s in rows)
        if packed:  # causal attention over each sample alone
            decoder += sum(lengths)
            pairs += sum(n * (n + 1) / 2 for n in lengths)
            continue
        width, prefix = max(lengths), shared_opening(rows)
        decoder += prefix + len(rows) * (width - prefix)
        pairs += prefix * (prefix + 1) / 2 + len(rows) * (width - prefix) * width  # padded rows see every key
    return Work(decoder, head, pairs, sum(len(s) for s in samples))


def shared_opening(rows: list[Sample]) -> int:
    """The tokens every row starts with that training computes once (kernels/prefix.py): up to the first
    position that predicts a loss token, and only when at least MIN_SHARED_PREFIX long."""
    if len(rows) < 2:
        return 0
    limit = min(next((t for t, label in enumerate(s.labels[1:]) if label != IGNORE), 0) for s in rows)
    first, n = rows[0].input_ids, min(limit, *(len(s) for s in rows))
    for row in rows[1:]:
        i = 0
        while i < n and row.input_ids[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


def plan_steps(n_samples: int, spec: TrainSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps), as train/loop.py plans them."""
    per_epoch = math.ceil(math.ceil(n_samples / spec.batch_size) / spec.grad_accum)
    return per_epoch, spec.max_steps or per_epoch * spec.epochs


@dataclass(frozen=True)
class RunCost:
    flops: float  # the whole run's training FLOPs
    passes: float  # matrix passes, summed over every micro-batch of the run
    updates: float  # parameters updated, summed over every optimizer step
    tokens: float  # real training tokens, all epochs

    @property
    def flops_per_token(self) -> float:
        return self.flops / max(self.tokens, 1)


def run_cost(cfg: RunConfig, shape: ModelShape, samples: list[Sample], epochs: float, packed: bool) -> RunCost:
    """The training FLOPs of `epochs` passes over `samples` under cfg's method and objective."""
    spec = cfg.train
    per_epoch, total = plan_steps(len(samples), spec)
    work = epoch_work(samples, spec.batch_size, spec.seed, packed)
    # Paired preference objectives run the chosen and the rejected answer: about twice the chosen alone.
    sequences = 2 if cfg.objective.name in ("dpo", "orpo", "simpo") else 1
    micro_batches = math.ceil(len(samples) / spec.batch_size) * epochs * sequences
    flops = passes = updates = 0.0
    for share, trains, adapters in method_phases(shape, cfg.method, per_epoch, total):
        cost = token_cost(shape, trains, adapters, spec.gradient_checkpointing)
        flops += share * work.flops(cost) * epochs * sequences
        passes += share * cost.passes * micro_batches
        updates += share * cost.trainable * total
    if cfg.objective.name in ("dpo", "kto"):  # the reference log-probs: one forward pass before training
        reference = token_cost(shape, _nothing)
        flops += sequences * work.flops(reference)
        passes += reference.passes * micro_batches / epochs
    return RunCost(flops, passes, updates, work.real_tokens * epochs)


# How the three measured figures (data/machine_rate.py) become seconds. Fitted on CPU runs on one thread (two
# threads on the shared machine they were fitted on waited on each other), and kept as round figures:
# - SmolLM2's width (576, four blocks, and the default job on the whole model) trained at 0.7-0.9 of the
#   measured matmul rate: norms, rotary, softmax and the loss take time and few FLOPs. 0.7 errs long;
# - the tiny test model, which computes almost nothing, took 7-8 times the small-pass benchmark per pass:
#   each pass brings its module's Python and its elementwise operations with it;
# - full fine-tuning paid 2.5-3.3 bare optimizer updates per trainable parameter and step: the gradient is
#   also written by backward (densely for the embeddings), summed for tied weights and read by the norm.
# No GPU was at hand to fit them there: on CUDA the same factors are applied to the figures measured there.
EFFICIENCY = 0.7
PASS_OVERHEAD = 7.5
UPDATE_OVERHEAD = 3.0


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: dict  # what the estimate rests on, for preflight.json

    def describe(self) -> str:
        b = self.basis
        return (f"{b['flops_per_token'] / 1e6:,.3g} MFLOP a token ({b['method']}, layout from {b['layout']}) at "
                f"{b['rate_flops'] / 1e9:,.3g} GFLOP/s ({b['efficiency']:.0%} of the measured matmul rate, "
                f"{'cached' if b['cached'] else 'measured now'}); evaluations not included")


def estimate_training(cfg: RunConfig, shape: ModelShape, samples: list[Sample], epochs: float,
                      device: torch.device) -> Estimate:
    """The training steps' seconds on this machine: FLOPs at the achievable matmul rate, plus the launch-bound
    floor of every pass and the memory-bound optimizer update. Evaluations during training, the prompting
    baselines and the reports are not training steps and are left out."""
    packed = cfg.train.packing == "on" or (cfg.train.packing == "auto" and device.type == "cuda")
    cost = run_cost(cfg, shape, samples, epochs, packed)
    dtype = machine_rate.compute_dtype(device, cfg.model.dtype)
    matmul, cached_matmul = machine_rate.matmul_rate(device, dtype, shape.hidden or 1024)
    per_pass, cached_pass = machine_rate.pass_seconds(device, dtype)
    per_update, cached_update = machine_rate.update_seconds(device)
    rate = matmul * EFFICIENCY
    seconds = cost.flops / rate + cost.passes * per_pass * PASS_OVERHEAD + cost.updates * per_update * UPDATE_OVERHEAD
    return Estimate(seconds, {
        "method": cfg.method.name, "layout": shape.source, "flops_per_token": round(cost.flops_per_token),
        "rate_flops": round(rate), "matmul_flops": round(matmul), "efficiency": EFFICIENCY,
        "seconds_per_pass": per_pass * PASS_OVERHEAD, "seconds_per_update": per_update * UPDATE_OVERHEAD,
        "cached": cached_matmul and cached_pass and cached_update, "batches": "packed" if packed else "padded"})
