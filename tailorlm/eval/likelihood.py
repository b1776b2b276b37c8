"""Label log-likelihood: score every answer of a closed label set after a prompt, and take the most likely.

This is how language-model evaluation usually scores a multiple-choice task (lm-eval-harness's
loglikelihood requests): it measures what the model knows without asking it to follow an answer format,
so a base model that would ramble on instead of answering still gets its due.

The prompt is run once, its key/value cache is repeated for the L labels, and the L label continuations
run as one batch on top: one prompt pass and one label pass per example, however many labels there are.
The opening every prompt shares (system prompt, instruction, demonstrations) is run once for the whole set.
"""
from __future__ import annotations

import copy

import torch

from tailorlm.kernels.prefix import shared_prefix_len
from tailorlm.ui import progress


@torch.no_grad()
def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]], device,
                    description: str = "label likelihood") -> list[list[float]]:
    """For each prompt, the summed log-probability of each answer's tokens following it (prompts x answers)."""
    if not answers or any(not a for a in answers):
        raise ValueError("internal: every answer needs at least one token")
    model.eval()
    n_answers, longest = len(answers), max(len(a) for a in answers)
    answer_ids = torch.zeros((n_answers, longest), dtype=torch.long, device=device)  # right-padded: causal
    valid = torch.zeros((n_answers, longest), dtype=torch.bool, device=device)       # attention never sees pads
    for i, a in enumerate(answers):
        answer_ids[i, :len(a)] = torch.tensor(a, device=device)
        valid[i, :len(a)] = True
    # Keep one own token per prompt: its logits predict each answer's first token.
    n_prefix = shared_prefix_len(prompts, min(len(p) for p in prompts) - 1) if len(prompts) > 1 else 0
    prefix = _run(model, torch.tensor(prompts[0][:n_prefix], device=device), None, 0) if n_prefix else None
    scores = []
    with progress(description, len(prompts)) as advance:
        for prompt in prompts:
            cache = copy.deepcopy(prefix[1]) if prefix else None
            last_logits, cache = _run(model, torch.tensor(prompt[n_prefix:], device=device), cache, n_prefix)
            first = torch.log_softmax(last_logits.float(), -1)[answer_ids[:, 0]]  # each answer's first token
            total = first
            if longest > 1:
                cache.batch_repeat_interleave(n_answers)
                start = len(prompt)
                positions = torch.arange(start, start + longest - 1, device=device).expand(n_answers, -1)
                mask = torch.ones((n_answers, start + longest - 1), dtype=torch.long, device=device)
                logits = model(input_ids=answer_ids[:, :-1], past_key_values=cache, position_ids=positions,
                               attention_mask=mask, use_cache=True).logits.float()
                rest = torch.log_softmax(logits, -1).gather(-1, answer_ids[:, 1:, None])[..., 0]
                total = total + (rest * valid[:, 1:]).sum(-1)
            scores.append(total.tolist())
            advance(1)
    return scores


def _run(model, ids: torch.Tensor, cache, start: int):
    """(logits of the last position, cache) after running ids from position `start` on top of `cache`."""
    positions = torch.arange(start, start + len(ids), device=ids.device)[None]
    out = model(input_ids=ids[None], past_key_values=cache, position_ids=positions, use_cache=True)
    return out.logits[0, -1], out.past_key_values
