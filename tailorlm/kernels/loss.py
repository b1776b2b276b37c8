"""Completion-only cross-entropy that never builds logits for tokens that carry no loss.

A causal LM's head turns every hidden state into vocabulary logits (49k wide for SmolLM2). In instruction
tuning most tokens are prompt tokens whose logits are thrown away by the loss mask. We run the decoder,
gather only the positions whose next token is a completion token, and apply the head to those, in chunks
that are recomputed in backward, so full fp32 logits never exist. On the default job this skips about a
fifth of the model's FLOPs and most of its activation memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tailorlm.data.samples import IGNORE
from tailorlm.kernels.fallback import say_once
from tailorlm.kernels.prefix import shared_prefix_len_padded, suffix_hidden

CHUNK_ROWS = 2048  # head rows per chunk: bounds the fp32 logits alive at once to CHUNK_ROWS x vocab


def _chunk_loss(hidden_NxH: torch.Tensor, targets_N: torch.Tensor, weight_VxH: torch.Tensor, bias_V,
                reduction: str = "sum") -> torch.Tensor:
    logits_NxV = F.linear(hidden_NxH, weight_VxH, bias_V).float()
    return F.cross_entropy(logits_NxV, targets_N, reduction=reduction)


def decoder_and_head(model: torch.nn.Module):
    """(decoder, head) of a causal LM, looking through a PEFT wrapper; None when the model is not split so."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    if getattr(base.config, "final_logit_softcapping", None):
        reason = (f"{base.config.model_type}: final logit soft-capping; the completion-only head and shared "
                  f"prefixes are off, the library's full logits are used")
        say_once(reason)
        return None
    return decoder, head


def packed_kwargs(batch: dict) -> dict:
    """Forward arguments of a packed row (kernels/packing.py): restarting positions and sample boundaries."""
    cu = batch["cu_seqlens"]
    return {"position_ids": batch["position_ids"], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": batch["max_len"], "max_length_k": batch["max_len"]}


def completion_loss(model: torch.nn.Module, batch: dict, shared_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token losses over completion tokens, number of those tokens) for one batch.

    The batch is either padded rows (input_ids, labels, attention_mask) or one packed row (packing.pack)."""
    input_ids_BxT, labels_BxT = batch["input_ids"], batch["labels"]
    targets_BxT = labels_BxT[:, 1:]  # position t predicts token t+1
    keep_BxT = targets_BxT != IGNORE
    n_tokens = int(keep_BxT.sum())
    packed = "cu_seqlens" in batch
    inputs = packed_kwargs(batch) if packed else {"attention_mask": batch["attention_mask"]}
    parts = decoder_and_head(model)
    if parts is None:  # unusual heads (soft-capped, wrapped): take the library's logits
        logits_BxTxV = model(input_ids=input_ids_BxT, use_cache=False, **inputs).logits[:, :-1]
        return F.cross_entropy(logits_BxTxV[keep_BxT].float(), targets_BxT[keep_BxT], reduction="sum"), n_tokens
    hidden_NxH, targets_N = _completion_states(parts[0], batch, inputs, keep_BxT, shared_prefix and not packed)
    return _head_loss(hidden_NxH, targets_N, parts[1]), n_tokens


def _completion_states(decoder, batch: dict, inputs: dict, keep_BxT: torch.Tensor, shared_prefix: bool):
    """(hidden states of the positions whose next token carries loss, those tokens), row by row in order."""
    input_ids_BxT, targets_BxT = batch["input_ids"], batch["labels"][:, 1:]
    # Padded rows may share an opening (system prompt, instruction); it carries no loss, so compute it once.
    # The limit keeps every position that predicts a completion token out of the prefix.
    prefix_len = 0
    if shared_prefix:  # a batch without completion tokens gets limit 0, so no prefix
        first_predicting = int(keep_BxT.int().argmax(1).min())
        prefix_len = shared_prefix_len_padded(input_ids_BxT, first_predicting)
    if prefix_len:
        hidden_BxSxH = suffix_hidden(decoder, input_ids_BxT, batch["attention_mask"], prefix_len)
        keep_BxT, targets_BxT = keep_BxT[:, prefix_len:], targets_BxT[:, prefix_len:]
    else:
        hidden_BxSxH = decoder(input_ids=input_ids_BxT, use_cache=False, **inputs).last_hidden_state
    return hidden_BxSxH[:, :-1][keep_BxT], targets_BxT[keep_BxT]


def _head_loss(hidden_NxH: torch.Tensor, targets_N: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    total = hidden_NxH.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_NxH.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hidden_NxH[rows], targets_N[rows], head.weight, head.bias,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden_NxH[rows], targets_N[rows], head.weight, head.bias)
    return total


def sequence_logps(model: torch.nn.Module, batch: dict, shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sample's completion tokens, how many there are), one entry per sample in
    batch order (a packed row's filler segment last), with gradients: what preference objectives compare. The
    same completion-only head as completion_loss, so no full logits exist here either."""
    token_logps_N, sample_N, n_samples = completion_token_logps(model, batch, shared_prefix)
    sums_S = token_logps_N.new_zeros(n_samples).index_add(0, sample_N, token_logps_N)
    counts_S = torch.zeros(n_samples, device=sums_S.device).index_add_(0, sample_N, torch.ones_like(token_logps_N))
    return sums_S, counts_S


def completion_token_logps(model: torch.nn.Module, batch: dict, shared_prefix: bool = True,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log-probability of every completion token, in order, with gradients; the sample each belongs to; the
    number of samples): the per-token figures GRPO's clipped ratio needs, from the completion-only head.
    temperature: of the distribution scored (logits / temperature), the one answers were sampled from."""
    input_ids_BxT, targets_BxT = batch["input_ids"], batch["labels"][:, 1:]
    keep_BxT = targets_BxT != IGNORE
    packed = "cu_seqlens" in batch
    if packed:  # one row: a kept position's sample is the segment its predicted token falls in
        bounds = batch["cu_seqlens"].long()
        sample_N = torch.searchsorted(bounds, keep_BxT[0].nonzero()[:, 0] + 1, right=True) - 1
        n_samples = bounds.numel() - 1
    else:
        sample_N, n_samples = keep_BxT.nonzero()[:, 0], input_ids_BxT.shape[0]
    inputs = packed_kwargs(batch) if packed else {"attention_mask": batch["attention_mask"]}
    parts = decoder_and_head(model)
    if parts is None:
        logits_BxTxV = model(input_ids=input_ids_BxT, use_cache=False, **inputs).logits[:, :-1]
        token_logps_N = -F.cross_entropy(logits_BxTxV[keep_BxT].float() / temperature, targets_BxT[keep_BxT],
                                         reduction="none")
    else:
        hidden_NxH, targets_N = _completion_states(parts[0], batch, inputs, keep_BxT, shared_prefix and not packed)
        token_logps_N = -_head_token_losses(hidden_NxH, targets_N, parts[1], temperature)
    return token_logps_N, sample_N, n_samples


def _head_token_losses(hidden_NxH: torch.Tensor, targets_N: torch.Tensor, head: torch.nn.Linear,
                       temperature: float = 1.0) -> torch.Tensor:
    """Each completion token's loss, the head run in chunks (recomputed in backward when training), of the
    logits divided by `temperature`: (W h + b) / T as W (h / T) + b / T, so the hidden rows are scaled, never a
    copy of the vocabulary matrix."""
    bias = head.bias
    if temperature != 1:
        hidden_NxH, bias = hidden_NxH / temperature, (bias / temperature if bias is not None else None)
    chunks = []
    for start in range(0, hidden_NxH.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        args = (hidden_NxH[rows], targets_N[rows], head.weight, bias, "none")
        chunks.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*args))
    return torch.cat(chunks) if chunks else hidden_NxH.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def per_sample_loss(model: torch.nn.Module, batch: dict, shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion-token loss per row, completion tokens per row) for padded rows, for reports of the
    hardest examples: sequence_logps without gradient, negated (the shared prefix as in training: this pass
    runs over the whole training set, so it is worth it)."""
    logps_B, counts_B = sequence_logps(model, batch, shared_prefix)
    return -logps_B, counts_B.long()
