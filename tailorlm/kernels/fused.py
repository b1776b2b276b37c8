"""Fused kernels for the decoder layers, through torch.compile (CUDA only).

Each decoder layer is compiled on its own ("regional compilation"): the layers share one code path, so one
graph serves all of them and compile time stays in seconds. Inductor fuses what a hand-written kernel
would: RMSNorm (square, mean, rsqrt, scale in one pass), RoPE (the rotate-half and two multiplies), SwiGLU
(silu(gate) * up), and the LoRA path's scale-and-add into the base projection's output, in forward and
backward. Writing these by hand in Triton would duplicate what the compiler already generates for every
architecture transformers supports; we keep hand-written code for what it cannot do (packing, the
completion-only head). On CPU compiling costs minutes on a 2-core machine for little gain, so it stays off.
"""
from __future__ import annotations

from typing import Callable

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The repeated blocks of a causal LM (looking through a PEFT wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place (dynamic shapes: packed rows change length every step).
    Returns how many layers were compiled."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
        layer._compiled_call_impl = _row_length_unbacked(layer._compiled_call_impl)
    return len(layers)


def _row_length_unbacked(compiled: Callable) -> Callable:
    """Call `compiled` with a packed row's length marked unbacked: a size the compiler may not guard on.

    With a plain dynamic length, inductor picks its reduction strategy from the length it first sees and
    guards on that range (on an H200: `2 <= T <= 2559`, then `2560 <= T <= 4095`, for the norm weights'
    gradients of full fine-tuning), so each new range compiled the layer again, 3-4 s apiece, and compiled
    full fine-tuning ran slower than eager (BENCHMARKS.md). Unbacked, one compiled layer serves every length.
    Every tensor input that spans the row (hidden states, rotary tables, positions) is marked, so that the
    compiler never ties the length back to a guarded size. Padded batches keep plain dynamic shapes."""
    def call(*args, **kwargs):
        if kwargs.get("cu_seq_lens_q") is not None:  # a packed row (kernels/attention.py)
            hidden = args[0] if args else kwargs.get("hidden_states")
            length = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else None
            for value in (*args, *kwargs.values()) if length else ():
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == length > 1:
                        torch._dynamo.decorators.mark_unbacked(t, 1)
        return compiled(*args, **kwargs)

    return call


def uncompile_layers(model: torch.nn.Module) -> None:
    """Back to eager layers (generation runs other shapes, with a KV cache, and has its own fast path)."""
    for layer in decoder_layers(model) or []:
        layer._compiled_call_impl = None  # the attribute nn.Module.compile sets; clearing it restores eager calls
