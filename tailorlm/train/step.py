"""How one training batch is built and run on this device: packing, attention, precision, compilation.

The loop (loop.py) only asks for batches and losses; everything that makes a step fast lives here, decided
once per run from the config and the device, so the loop reads the same on CPU and GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from tailorlm.config import TrainSpec
from tailorlm.data.batching import collate, eval_batches
from tailorlm.data.samples import Sample
from tailorlm.kernels.attention import packed_attention
from tailorlm.kernels.fused import compile_layers, uncompile_layers
from tailorlm.kernels.loss import completion_loss
from tailorlm.kernels.packing import pack, to_device
from tailorlm.train import distributed
from tailorlm.train.objectives import Objective, TokenLoss

SFT = TokenLoss()  # stateless: one instance serves every call that names no objective


@dataclass
class StepContext:
    pad_id: int
    device: torch.device
    packing: bool = True
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 compute over fp32 trainable weights (GPU)
    token_budget: int | None = None  # regroup a step's samples into packed micro-batches of this many tokens
    undo: Callable[[], None] = lambda: None  # back to the plain model (set by fast_training)
    redo: Callable[[], None] = lambda: None  # and to the training setup

    def batch(self, samples: list[Sample]) -> dict:
        built = pack(samples, pad_id=self.pad_id) if self.packing else collate(samples, self.pad_id)
        return to_device(built, self.device)

    @contextlib.contextmanager
    def eager(self):
        """The plain model for a moment: generation mid-training runs other shapes, with a KV cache, padded
        attention and no autocast, so it needs the library's attention, eager layers and PEFT's casting."""
        self.undo()
        try:
            yield
        finally:
            self.redo()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def real_tokens(batch: dict) -> int:
    return int(batch["real_tokens"]) if "real_tokens" in batch else int(batch["attention_mask"].sum())


@contextlib.contextmanager
def fast_training(model, spec: TrainSpec, pad_id: int, device: torch.device, planned_tokens: int = 0):
    """Set the model up for fast training on `device`, yield how its steps should run, and undo it after.
    planned_tokens: how many the run will train on (all epochs), which decides whether compiling full
    fine-tuning pays back.

    Packed attention stays on for the whole block, not per forward: activation checkpointing recomputes
    layers during backward, and the recomputation must take the same attention path. Everything is undone
    on exit, so evaluation and export see the plain model (generation has its own fast path)."""
    base_dtype = model.get_input_embeddings().weight.dtype  # the base weights' dtype (adapters may differ)
    half = base_dtype in (torch.bfloat16, torch.float16) and device.type == "cuda"
    packing = spec.packing == "on" or (spec.packing == "auto" and device.type == "cuda")
    ctx = StepContext(pad_id, device, packing=packing, autocast_dtype=base_dtype if half else None,
                      token_budget=spec.micro_batch_tokens if packing else None)
    # PEFT would upcast every adapter input to the adapters' fp32; under autocast they run in bf16 instead.
    casting = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", False)] if half else []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    compiled = compiles(model, spec, device, planned_tokens)
    recompile_limit = torch._dynamo.config.recompile_limit
    if compiled:  # one graph per packed shape bucket; the caller's limit is put back on exit
        torch._dynamo.config.recompile_limit = max(recompile_limit, 32)
    attention = contextlib.ExitStack()

    def setup() -> None:
        for module in casting:
            module.cast_input_dtype_enabled = False
        if compiled:
            compile_layers(model)
        if packing:
            attention.enter_context(packed_attention(model))

    def teardown() -> None:
        for module in casting:
            module.cast_input_dtype_enabled = True
        if compiled:
            uncompile_layers(model)
        attention.close()

    ctx.undo, ctx.redo = teardown, setup
    if spec.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    setup()
    try:
        yield ctx
    finally:
        teardown()
        torch._dynamo.config.recompile_limit = recompile_limit
        if spec.gradient_checkpointing:
            base.gradient_checkpointing_disable()


# Compiling full fine-tuning costs a fixed warm-up and saves time per token, so whether it pays back depends
# on the tokens a run trains on, not on how they are grouped into micro-batches. Measured on the Llama-3.2-1B
# shape (BENCHMARKS.md, 2026-11-26): 8-sample micro-batches on an H200, 11 s more warm-up, paid back after
# about 1.2M tokens; 16,384-token micro-batches on an H100, 5.7 s more, after about 1.3M; 4 x 8 accumulation on
# a slower H100 host, 16 s more, after about 5M. Two million is where the loss, if any, stays a few seconds.
COMPILE_FULL_AFTER_TOKENS = 2_000_000


def compiles(model, spec: TrainSpec, device: torch.device, planned_tokens: int) -> bool:
    """Whether training compiles the decoder layers (train.compile)."""
    if spec.compile != "auto":
        return spec.compile == "on"
    return device.type == "cuda" and (_mostly_frozen(model) or planned_tokens >= COMPILE_FULL_AFTER_TOKENS)


def _mostly_frozen(model) -> bool:
    """True for parameter-efficient methods. auto always compiles these: on an H100, compiled layers made LoRA
    1.9-2.5x faster; full fine-tuning only from COMPILE_FULL_AFTER_TOKENS on."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable < 0.5 * sum(p.numel() for p in model.parameters())


def accumulate_gradients(forward: Callable, group: list[list], ctx: StepContext,
                         no_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                         objective: Objective = SFT) -> tuple[float, int]:
    """Backward over the global micro-batches of one step so the summed gradient equals that of one batch of all
    their items. Under torchrun each process runs its share of every micro-batch and scales by the process
    count, which the gradient averaging of DDP/FSDP undoes; no_sync(last) skips that averaging until the last
    micro-batch.

    forward(fn) runs fn(model, shared_prefix) as a training forward (Wrapped.forward). The objective
    (objectives.py; SFT's token loss by default) gives each micro-batch's sequences and summed loss, and the
    step's normaliser: completion tokens for SFT, pairs or answers for preference objectives.

    Returns (mean loss per normalising unit, real tokens processed), over all processes."""
    world = distributed.world()
    if ctx.token_budget:  # a budget per process: each of them runs its share of every micro-batch
        group = regroup(group, ctx.token_budget * world.size)
    n_units = objective.units([item for batch in group for item in batch])
    losses, tokens = [], 0
    for i, items in enumerate(group):
        mine, real = distributed.share(items, world)
        batch = ctx.batch(objective.sequences(mine))
        sync = no_sync(i == len(group) - 1) if no_sync else contextlib.nullcontext()
        with sync:
            with ctx.autocast():
                loss_sum = objective.loss(forward, batch, mine)
            (loss_sum * (world.size if real else 0) / max(n_units, 1)).backward()
        if real:
            losses.append(loss_sum.detach())
            tokens += real_tokens(batch)
    # read once every micro-batch is queued: reading each as it comes would make the CPU wait for the GPU
    total, tokens = distributed.sum_floats(sum(float(x) for x in losses), tokens)
    return total / max(n_units, 1), int(tokens)


def regroup(group: list[list], budget: int) -> list[list]:
    """A step's samples, in order, in micro-batches of at most `budget` tokens (a longer sample goes alone).

    Packed rows cost what their tokens cost, so a step of 4 micro-batches of 8 samples can run as one of 32:
    the loss is normalised over the whole step either way, so the update is the same, with a quarter of the
    launches and fuller matmuls."""
    out, current, used = [], [], 0
    for sample in (s for batch in group for s in batch):
        if current and used + len(sample) > budget:
            out.append(current)
            current, used = [], 0
        current.append(sample)
        used += len(sample)
    return out + [current] if current else out


@torch.no_grad()
def validation_loss(model, samples: list[Sample], batch_size: int, ctx: StepContext) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in eval_batches(samples, batch_size):
        batch = ctx.batch([samples[i] for i in idx])
        with ctx.autocast():
            loss_sum, n = completion_loss(model, batch)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)
