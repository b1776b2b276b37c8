"""Attention for packed rows: causal within each sample, never across samples.

Registered with transformers' AttentionInterface, so the library's own model code (RoPE, projections, LoRA
layers) runs unchanged and only the attention call changes. The model forward receives `cu_seq_lens_q`
(sample boundaries); calls without it (generation, padded batches) go to the library's SDPA path.
- CUDA, half precision: one variable-length FlashAttention call (torch.nn.attention.varlen), which skips
  every cross-sample block, so a packed row costs the attention FLOPs of its samples and no more.
- elsewhere: one causal SDPA call per sample, exact and cheap at CPU lengths.
A layer with a sliding window (Gemma 3's local layers, Mistral, Phi-3) passes `sliding_window`: each query
then sees only the last `sliding_window` keys of its sample, as transformers' own mask does (FlashAttention's
window where this torch has it, else the per-sample path with an explicit mask, said once in the log).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tailorlm.kernels.fallback import say_once

PACKED = "tailor_packed"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_ARGS = inspect.signature(varlen_attn).parameters
except ImportError:  # pragma: no cover - older torch: per-sample SDPA everywhere
    varlen_attn, _VARLEN_ARGS = None, {}


def varlen_available(query: torch.Tensor) -> bool:
    return varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _varlen(query, key, value, cu_seqlens, max_len, scaling, window: int | None = None):
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D) through FlashAttention varlen."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    kwargs = {"scale": scaling}
    if "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in _VARLEN_ARGS:
        kwargs["window_size"] = (window - 1 if window else -1, 0)  # causal, over the last `window` keys
    else:
        kwargs["is_causal"] = True
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)[None]


def _per_sample_sdpa(query, key, value, cu_seqlens, scaling, window: int | None = None):
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if window and b - a > window:  # transformers' sliding mask: key j is seen from query i when 0 <= i - j < window
            i = torch.arange(b - a, device=q.device)
            distance = i[:, None] - i[None, :]
            mask = (distance >= 0) & (distance < window)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row (batch size 1)")
    window = kwargs.get("sliding_window") or None
    if window and varlen_available(query) and "window_size" not in _VARLEN_ARGS:
        say_once("packed attention: this torch's FlashAttention varlen has no sliding window; layers with one "
                  "run one SDPA call per sample instead")
    if varlen_available(query) and (not window or "window_size" in _VARLEN_ARGS):
        out = _varlen(query, key, value, cu_seqlens, int(kwargs["max_length_q"]), scaling, window)
    else:
        out = _per_sample_sdpa(query, key, value, cu_seqlens, scaling, window)
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
