"""Label log-likelihood: score every answer of a closed label set after a prompt, and take the most likely.

This is how language-model evaluation usually scores a multiple-choice task (lm-eval-harness's
loglikelihood requests): it measures what the model knows without asking it to follow an answer format,
so a base model that would ramble on instead of answering still gets its due.

The prompt is run once, and each label's continuation runs on its key/value cache (cropped back after each
label): one prompt pass per batch of examples, and one short pass per label of more than one token. The
opening every prompt shares (system prompt, instruction, demonstrations) is run once for the whole set, and
rows are batched with left padding, as in generation (a row at a time costs more than the arithmetic on a CPU).

The same pass also decodes: greedy decoding constrained to the labels only ever compares tokens that some
label's continuation scored in exactly that context, so its answer is read off these scores
(constrained_answer) instead of being generated again.
"""
from __future__ import annotations

import copy

import torch

from tailorlm.kernels.prefix import shared_prefix_len, window_shorter_than
from tailorlm.ui import progress


@torch.no_grad()
def answer_token_logprobs(model, prompts: list[list[int]], answers: list[list[int]], device, batch_size: int = 16,
                          description: str = "label likelihood") -> list[list[list[float]]]:
    """For each prompt and answer, the log-probability of each of the answer's tokens given the prompt and the
    answer's earlier tokens (prompts x answers x answer tokens): their sum is the answer's score, and together
    they hold every step of greedy decoding constrained to the answers (constrained_answer)."""
    if not answers or any(not a for a in answers):
        raise ValueError("internal: every answer needs at least one token")
    model.eval()
    longest_prompt = max(map(len, prompts))
    if window_shorter_than(model, longest_prompt + max(map(len, answers))):
        # A sliding window counts cache slots, padding and a separately computed opening included, so a padded
        # or prefix-shared row would see less than the same prompt alone: such rows are scored one at a time,
        # and each answer on a copy of the cache (a window-cropped cache cannot be cropped back).
        batch_size, shared, follow = 1, False, "copy"
    else:
        shared = len(prompts) > 1
        follow = "side_by_side" if scores_side_by_side(model, longest_prompt, answers) else "crop"
    # Keep one own token per prompt: its logits predict each answer's first token.
    n_prefix = shared_prefix_len(prompts, min(len(p) for p in prompts) - 1) if shared else 0
    prefix = _forward(model, torch.tensor([prompts[0][:n_prefix]], device=device), None, None, None)[1] \
        if n_prefix else None
    scores: list[list[list[float]]] = [[] for _ in prompts]
    # Batches of similar length, as in generation: a batch runs as wide as its longest row, and on the default
    # job's articles batches in input order were half padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    with progress(description, len(prompts)) as advance:
        for start in range(0, len(prompts), batch_size):
            rows = order[start:start + batch_size]
            for i, row in zip(rows, _score_batch(model, [prompts[i] for i in rows], answers, n_prefix, prefix, device,
                                                 follow)):
                scores[i] = row
            advance(len(rows))
    return scores


def _score_batch(model, prompts: list[list[int]], answers: list[list[int]], n_prefix: int, prefix, device,
                 follow: str = "side_by_side"):
    """One batch: [shared prefix | left padding | own tokens], then each answer's later tokens on that cache."""
    batch = len(prompts)
    own = [p[n_prefix:] for p in prompts]
    width = max(map(len, own))
    ids = torch.zeros((batch, width), dtype=torch.long, device=device)
    mask = torch.zeros((batch, n_prefix + width), dtype=torch.long, device=device)
    positions = torch.zeros((batch, width), dtype=torch.long, device=device)
    mask[:, :n_prefix] = 1
    for r, tokens in enumerate(own):
        pad = width - len(tokens)
        ids[r, pad:] = torch.tensor(tokens, device=device)
        mask[r, n_prefix + pad:] = 1
        positions[r, pad:] = torch.arange(n_prefix, n_prefix + len(tokens), device=device)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(batch)
    logits, cache = _forward(model, ids, mask, positions, cache)
    return score_after_prompts(model, logits[:, -1], cache, mask, answers, follow)


def score_after_prompts(model, last_logits, cache, mask, answers: list[list[int]], follow: str = "side_by_side"):
    """Each answer's token log-probabilities after a batch of left-padded prompts that `cache` holds (mask: their
    real tokens; last_logits: each prompt's last position). The cache holds the prompts alone again after."""
    batch = mask.shape[0]
    answer_ids = torch.tensor([a[0] for a in answers], device=mask.device)
    tokens = torch.zeros((batch, len(answers), max(map(len, answers))), device=mask.device)  # batch x answer x token
    tokens[:, :, 0] = torch.log_softmax(last_logits.float(), -1)[:, answer_ids]  # first tokens: prompt's logits
    lengths = mask.sum(1)
    if follow == "side_by_side":
        _follow_side_by_side(model, answers, mask, lengths, cache, tokens)
    else:
        _follow_one_by_one(model, answers, mask, lengths, cache, tokens, copy_cache=follow == "copy")
    return [[row[a][:len(answer)] for a, answer in enumerate(answers)] for row in tokens.tolist()]


def scores_side_by_side(model, longest_prompt: int, answers: list[list[int]]) -> bool:
    """Whether every longer answer can follow a batch's prompts in one pass (_follow_side_by_side): a hand-made
    4D mask, which the attention must take as given (eager, SDPA; not flash attention), and which replaces the
    model's own window (so the window must cover the whole pass)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", "eager") in ("eager", "sdpa") and not \
        window_shorter_than(model, longest_prompt + sum(len(a) - 1 for a in answers) + 1)


def _follow_side_by_side(model, answers: list[list[int]], mask, lengths, cache, tokens) -> None:
    """Every longer answer's later tokens in one pass: the answers sit side by side after the batch's cache, and
    each token sees the cache and its own answer's earlier tokens only (a block-diagonal causal mask), at the
    positions it would have alone. One pass instead of one per answer: on the default job each pass copied the
    whole cache twice (append, then crop), 60% of label likelihood's time with ten answers of two tokens."""
    longer = [(index, answer) for index, answer in enumerate(answers) if len(answer) > 1]
    if not longer:
        return
    device, batch = mask.device, mask.shape[0]
    owner = torch.tensor([k for k, (_, a) in enumerate(longer) for _ in a[:-1]], device=device)
    offset = torch.tensor([j for _, a in longer for j in range(len(a) - 1)], device=device)
    ids = torch.tensor([t for _, a in longer for t in a[:-1]], device=device).expand(batch, -1)
    n = ids.shape[1]
    own_answer = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # n x n
    sees = torch.cat([mask.bool()[:, None, :].expand(batch, n, -1), own_answer.expand(batch, n, n)], -1)
    dtype = next(model.parameters()).dtype
    mask_4d = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill(~sees, torch.finfo(dtype).min)[:, None]
    logits, cache = _forward(model, ids, mask_4d, lengths[:, None] + offset, cache, last_only=False)
    cache.crop(-n)
    logps = torch.log_softmax(logits.float(), -1)
    start = 0
    for index, answer in longer:
        targets = torch.tensor(answer[1:], device=device).expand(batch, -1)
        span = logps[:, start:start + len(answer) - 1]
        tokens[:, index, 1:len(answer)] = span.gather(-1, targets[..., None])[..., 0]
        start += len(answer) - 1


def _follow_one_by_one(model, answers: list[list[int]], mask, lengths, cache, tokens, copy_cache: bool) -> None:
    """Each longer answer runs on the batch's cache, which is cropped back after it: the cache is never copied
    per answer (a repeated 500-token cache for every row and label costs more than the arithmetic), except
    (copy_cache) under a sliding window shorter than the rows, whose layers cannot be cropped back past it."""
    device, batch = mask.device, mask.shape[0]
    for index, answer in enumerate(answers):
        if len(answer) == 1:
            continue
        follow = torch.tensor(answer[:-1], device=device).expand(batch, -1)
        steps = torch.arange(len(answer) - 1, device=device)
        follow_mask = torch.cat([mask, torch.ones((batch, len(answer) - 1), dtype=torch.long, device=device)], 1)
        run_on = copy.deepcopy(cache) if copy_cache else cache
        follow_logits, run_on = _forward(model, follow, follow_mask, lengths[:, None] + steps, run_on, last_only=False)
        if not copy_cache:
            run_on.crop(-(len(answer) - 1))  # drop this answer's tokens again (this transformers takes a count)
        targets = torch.tensor(answer[1:], device=device).expand(batch, -1)
        tokens[:, index, 1:len(answer)] = torch.log_softmax(follow_logits.float(), -1).gather(-1, targets[..., None])[..., 0]


def _forward(model, ids: torch.Tensor, mask, positions, cache, last_only: bool = True):
    """(logits, cache) of ids run on top of cache; only the last position's logits unless last_only=False."""
    if positions is None:
        start = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1 if last_only else 0)
    return out.logits, out.past_key_values


def constrained_answer(answers: list[list[int]], token_logprobs: list[list[float]], max_tokens: int) -> list[int]:
    """The tokens that greedy decoding constrained to `answers` (generate.LabelTrie) writes, read off one prompt's
    answer_token_logprobs instead of decoding again.

    Each step of that decoding picks, among the tokens that continue some answer from the tokens written so
    far, the most probable one in that very context; an answer through those tokens scored exactly that token
    in exactly that context. So the pass that scores the label set decodes it too: a closed-set baseline gets
    constrained decoding and label likelihood for the price of one (on the default job two generation runs,
    about 7% of the job). As in decoding, an answer that is also the start of a longer one is continued, a
    finished one stops, and no more than max_tokens are written; ties go to the lower token id (argmax)."""
    path: list[int] = []
    while len(path) < max_tokens:
        step = len(path)
        options = [(logps[step], answer[step]) for answer, logps in zip(answers, token_logprobs)
                   if len(answer) > step and answer[:step] == path]
        if not options:
            break
        path.append(max(options, key=lambda o: (o[0], -o[1]))[1])
    return path
