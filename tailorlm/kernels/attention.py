"""Attention for packed rows: causal within each sample, never across samples.

Registered with transformers' AttentionInterface, so the library's own model code (RoPE, projections, LoRA
layers) runs unchanged and only the attention call changes. The model forward receives `cu_seq_lens_q`
(sample boundaries); calls without it (generation, padded batches) go to the library's SDPA path.
- CUDA, half precision: one variable-length FlashAttention call (torch.nn.attention.varlen), which skips
  every cross-sample block, so a packed row costs the attention FLOPs of its samples and no more.
- elsewhere: one causal SDPA call per sample, exact and cheap at CPU lengths.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "tailor_packed"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_ARGS = inspect.signature(varlen_attn).parameters
except ImportError:  # pragma: no cover - older torch: per-sample SDPA everywhere
    varlen_attn, _VARLEN_ARGS = None, {}


def varlen_available(query: torch.Tensor) -> bool:
    return varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _varlen(query, key, value, cu_seqlens, max_len, scaling):
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D) through FlashAttention varlen."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    kwargs = {"scale": scaling}
    if "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in _VARLEN_ARGS:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)[None]


def _per_sample_sdpa(query, key, value, cu_seqlens, scaling):
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row (batch size 1)")
    if varlen_available(query):
        out = _varlen(query, key, value, cu_seqlens, int(kwargs["max_length_q"]), scaling)
    else:
        out = _per_sample_sdpa(query, key, value, cu_seqlens, scaling)
    return out.contiguous(), None


AttentionInterface.register(PACKED, packed_attention_forward)


def _configs(model) -> list:
    """Every distinct config object the model's modules read their attention implementation from."""
    found = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    return list(found.values())


@contextlib.contextmanager
def packed_attention(model):
    """Route the model's attention through packed_attention_forward for the duration (training only:
    generation and saved configs keep the model's own implementation)."""
    saved = [(c, c._attn_implementation) for c in _configs(model)]
    for c, _ in saved:
        c._attn_implementation = PACKED
    try:
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
