"""Training on several processes with PyTorch's own engine: torchrun starts the processes, DDP or FSDP2
(`fully_shard`) keeps them in step, and this module is the only place that knows.

How results stay independent of the process count:
  * train.batch_size is the global batch. Every process builds the same global batches in the same order
    (data/batching.epoch_batches is a pure function of seed and epoch) and takes its share of each one.
  * Each step's loss is the sum of token losses over the whole global step divided by its total completion
    tokens. A process scales its part by world_size because DDP and FSDP average gradients over processes,
    so the averaged gradient is exactly the single-process one (up to float summation order).
  * Checkpoints hold full, unsharded tensors keyed by parameter name, the optimizer state in the same form
    (torch.distributed.checkpoint's full state dict), and the loop's global position, so a run resumes on
    any number of processes.
  * Decisions (early stop, guardrail) use rank 0's evaluation, broadcast to all, so no process can go its own
    way and leave the others waiting in a collective.
Only rank 0 writes files or prints; the others stay quiet. A process that fails closes its connections, the
others' next collective errors out, and torchrun ends the whole job.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from tailorlm.config import DistSpec
from tailorlm.errors import TailorError
from tailorlm.models.layers import block_list_name
from tailorlm.ui import console


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(spec: DistSpec, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (nothing to do for one process); returns (world, this
    process's device: cuda:<local rank> on GPUs)."""
    global _world
    if not launched_by_torchrun():
        _world = World()
        return _world, device
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TailorError(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                              f"visible): start at most one process per GPU, or set train.device=cpu")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=spec.timeout_minutes))
    _world = World(rank, size, local, spec.strategy)
    if not _world.main:  # one voice: rank 0 prints progress and results for the whole job
        from transformers.utils import logging as hf_logging

        console.quiet = True
        hf_logging.disable_progress_bar()
    return _world, device


def shutdown() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def check_method(method: str) -> None:
    w = _world
    if w.mode == "fsdp" and method in ("qlora", "gradual_unfreeze"):
        raise TailorError(f"train.distributed.strategy=fsdp does not support method.name={method} yet; "
                          f"use train.distributed.strategy=ddp")


# --- the model ---------------------------------------------------------------------------------------------

class _Driver(torch.nn.Module):
    """Runs a function of the model as this module's forward. DDP and FSDP hook the forward of the module
    they wrap; wrapping this one puts tailorlm's own computations (the fused chunked loss, which calls the
    decoder and head directly; generation) inside those hooks instead of the library's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[torch.nn.Module], object]):
        return fn(self.model)


class Wrapped:
    """The model as the loop sees it, on one process or under a process group.

    module: the model the strategy and checkpoints see (under FSDP its weights are sharded in place).
    forward(fn) runs a training forward through DDP/FSDP; run(fn) runs evaluation code (under FSDP, inside
    the root's forward, so its weights are gathered). keep: rank 0's unsharded copy under FSDP, which gets
    the trained weights at the end."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.module, self.driver, self.keep, self.device = model, None, None, device
        w = _world  # mode is "single" unless torchrun started several processes (or a benchmark forces it)
        if w.mode == "ddp":
            self._ddp()
        elif w.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if w.main:  # the plain model for after training; FSDP below replaces the parameters in place
                self.keep = copy.deepcopy(model).to("cpu")
            blocks, _ = block_list_name(model)
            for block in model.get_submodule(blocks):
                fully_shard(block)  # each block's weights are gathered just for its own forward and backward
            self.driver = _Driver(model)
            fully_shard(self.driver)  # the rest (embeddings, final norm, head) is gathered for the whole call

    def _ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer broadcast: buffers (rotary tables) never change, and a broadcast in every forward would
        # tie evaluation on rank 0 to the other ranks.
        self.driver = DistributedDataParallel(_Driver(self.module), device_ids=ids, broadcast_buffers=False)

    def forward(self, fn: Callable[[torch.nn.Module, bool], object]):
        """fn(model, shared_prefix) as a training forward, with the gradient hooks of DDP/FSDP: how every
        objective (train/objectives.py) runs its loss."""
        if self.driver is None:
            return fn(self.module, True)
        # FSDP frees a block's gathered weights after each call and reduces its gradient after one backward,
        # so a block must run once per step: no separate shared-prefix pass (kernels/prefix.py) under FSDP.
        once = _world.mode == "fsdp"
        return self.driver(lambda model: fn(model, not once))

    def run(self, fn: Callable[[torch.nn.Module], object]):
        """Evaluation code: on the plain model, except under FSDP (inside the root forward, on every rank)."""
        if _world.mode == "fsdp":
            try:
                return self.driver(fn)
            finally:  # the root keeps its weights gathered after a forward (for the backward that usually
                self.driver.reshard()  # follows); none follows here, and the optimizer holds the shards
        return fn(self.module)

    def refresh(self) -> None:
        """After the trainable set changed (gradual unfreezing): DDP fixes its gradient buckets at
        construction, so it is rebuilt for the new set."""
        if _world.mode == "ddp":
            self._ddp()

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if last or self.driver is None:
            return contextlib.nullcontext()
        if _world.mode == "ddp":
            return self.driver.no_sync()
        return _fsdp_no_sync(self.driver)

    def finished(self, trained: dict[str, torch.Tensor]) -> torch.nn.Module | None:
        """The plain trained model on rank 0 (None on the others): under FSDP, rank 0's copy with the trained
        parameters gathered from their shards (a collective: every rank calls this)."""
        if _world.mode == "fsdp":
            trained = full_tensors(trained)
        if not _world.main:
            return None
        if self.keep is None:
            return self.module
        params = dict(self.keep.named_parameters())
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        return self.keep.to(self.device)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded values of (possibly FSDP-sharded) parameters; a collective under FSDP, so every rank calls
    it with the same names in the same order."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in params.items()}


def scalar(value) -> float:
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


# --- optimizer state, independent of the process count --------------------------------------------------

def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name: the same for 1 process, DDP or FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # cpu_offload under a process group: the gathered state lands on rank 0 only, in host memory
    options = StateDictOptions(full_state_dict=True, cpu_offload=_world.active)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# --- collectives (no-ops for one process) ----------------------------------------------------------------

def sum_floats(*values: float) -> list[float]:
    if not _world.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj):
    """Rank 0's object on every rank."""
    if not _world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not _world.active:
        return [obj]
    out = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def share(samples: list, w: World) -> tuple[list, bool]:
    """This rank's share of a global micro-batch: every size-th sample from its rank. A rank left without
    samples (a short last batch) still runs one forward and backward, weighted 0, so the gradient
    collectives stay matched; returns (samples, is_real)."""
    mine = samples[w.rank::w.size]
    return (mine, True) if mine else (samples[:1], False)
