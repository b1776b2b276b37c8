"""Batched greedy generation for evaluation: length-sorted batches, left padding, KV cache, early stop.

The opening that a batch's prompts share (system prompt, instruction, few-shot demonstrations) is encoded
once and its cache reused by every row (kernels/prefix.py); each row's own tokens are left-padded after it.

With decoding="constrained" every step may only continue one of the label strings (a token trie), so the
answer is always a valid label, or (a list answer such as NER's) stay inside its item grammar, one per row
(item_lists.py); with "free" the model writes what it likes and the text is normalised.

On a GPU, decoding is launch-bound: a step of a small model is a few hundred kernels of microseconds each,
driven from Python. There, for calls long enough to pay for compiling (static_cache_applies), the library's
static cache is used, so that transformers compiles the decoding step (CUDA graphs) once per shape and model;
every batch is given the same row count and a power-of-two width, since a new shape would compile again.
The shared opening is not split off there: its prompt pass is cheap on a GPU, and the library's static cache
does not take a cache computed outside it. In fp32 the texts are those of the dynamic cache; in bf16 they
differ by rounding, as much as the dynamic cache's own differ between two batch sizes (BENCHMARKS.md).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tailorlm.data.conversations import end_of_turn_markers
from tailorlm.eval.likelihood import score_after_prompts, scores_side_by_side
from tailorlm.kernels.fallback import say_once
from tailorlm.kernels.loss import decoder_and_head
from tailorlm.kernels.prefix import generation_prefix_blocker, prefix_cache, shared_prefix_len, window_shorter_than
from tailorlm.ui import progress


class LabelTrie:
    """Allowed next tokens given the tokens generated so far, for a fixed set of answer token sequences."""

    def __init__(self, sequences: list[list[int]]):
        self.children: dict[tuple[int, ...], set[int]] = {}
        for seq in sequences:
            for i in range(len(seq)):
                self.children.setdefault(tuple(seq[:i]), set()).add(seq[i])

    def allowed(self, prefix: list[int], fallback: list[int]) -> list[int]:
        return sorted(self.children.get(tuple(prefix), fallback))


class _AnswerFinished(StoppingCriteria):
    """A transformers stopping criterion: a row stops once `done(text so far)` says its answer is complete.
    Generation ends when every row has stopped, so a batch no longer waits for its most verbose row."""

    def __init__(self, tokenizer, start: int, done: Callable[[str], bool]):
        self.tokenizer, self.start, self.done = tokenizer, start, done

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    ids.update(tokenizer.convert_tokens_to_ids(end_of_turn_markers(tokenizer)))  # a turn ends, whatever eos is
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device,
             trie: LabelTrie | Callable[[int], object] | None = None, description: str = "generate",
             shared_prefix: bool = True, done: Callable[[str], bool] | None = None,
             static: bool | None = None) -> list[str]:
    """Greedy completions for token-id prompts, returned in input order. trie: one constraint for every row, or
    trie(i) -> prompt i's own (built a batch at a time, so a split's constraints are never all in memory).
    done(text), when given, ends a row's answer early (a classification answer that has named its label, or
    ended its line). static: decode on the library's static cache (compiled on a GPU); None: where
    static_cache_applies."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, trie, description, shared_prefix,
                     done, static=static)[0]


def generate_and_score(model, tokenizer, prompts: list[list[int]], answers: list[list[int]], max_new_tokens: int,
                       batch_size: int, device, description: str = "generate", done: Callable[[str], bool] | None = None,
                       timings: dict | None = None) -> tuple[list[str], list[list[list[float]]]]:
    """Free greedy completions and, on the same prompt pass, each answer's token log-probabilities
    (likelihood.answer_token_logprobs): a prompt is run once for both. timings, when given, receives the
    seconds of the prompt pass ("prompt"), of scoring the answers ("score") and of decoding ("decode").
    Only for models that scores_together() accepts."""
    timings = {} if timings is None else timings
    timings.update({"prompt": 0.0, "score": 0.0, "decode": 0.0})
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, None, description, True, done,
                     answers, timings, static=False)


def scores_together(model, prompts: list[list[int]], answers: list[list[int]], max_new_tokens: int,
                    static: bool | None = None, batch_size: int = 16) -> bool:
    """Whether generate_and_score applies: the answers follow side by side, and generation shares the opening
    (neither is the case under a sliding window shorter than the rows), on a dynamic cache (static and
    batch_size: as for generate; where the static cache applies, free generation decodes on its own, which
    costs less on a GPU than sharing a prompt pass)."""
    longest = max(map(len, prompts), default=0)
    return decoder_and_head(model) is not None and scores_side_by_side(model, longest, answers) and \
        window_shorter_than(model, longest + max_new_tokens) is None and \
        not _decodes_static(model, prompts, max_new_tokens, batch_size, static)


def _decodes_static(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                    static: bool | None) -> bool:
    """static_cache_applies for one generate call: its longest row (prompt and new tokens) and its decoding
    steps (batches x new tokens), derived here alone so that scores_together and generation agree."""
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    steps = -(-len(prompts) // max(batch_size, 1)) * max_new_tokens
    return static_cache_applies(model, longest, static, steps)


# Compiling the decoding step costs ~35 s once per shape and model (H200, SmolLM2-135M); it saves ~100 ms per
# step of 64 rows, so one call pays it back after ~350 steps, and the calls that reuse its shape (the validation
# passes during training) pay nothing. A classification call (20 new tokens) stays eager; math or translation
# answers (256 tokens) do not.
STATIC_AFTER_STEPS = 256
_STATIC_FAILED = "_tailorlm_static_cache_failed"  # set on a model whose compiled decoding failed once


def static_cache_applies(model, longest: int, static: bool | None = None, steps: int = STATIC_AFTER_STEPS) -> bool:
    """Whether generation decodes on the library's static cache: never once it failed on this model; else as
    asked (static); else on a CUDA device, for a model the compiler can take (not quantized), rows that fit its
    attention window, and a call of at least STATIC_AFTER_STEPS decoding steps (batches x new tokens)."""
    if getattr(model, _STATIC_FAILED, False):
        return False
    if static is not None:
        return static
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cuda" or steps < STATIC_AFTER_STEPS:
        return False  # decided without walking the modules: the CPU path asks this on every call
    quantized = any(getattr(m, "hf_quantizer", None) is not None for m in model.modules() if hasattr(m, "config"))
    return not quantized and window_shorter_than(model, longest) is None


def _greedy(model, static: bool, **kwargs) -> torch.Tensor:
    """model.generate, on the static cache when asked. Should that fail where the dynamic cache does not (an
    architecture the compiler cannot take, the padded batch out of memory), the batch is decoded again on the
    dynamic cache, and so is every later one on this model: the same decoding, only slower."""
    if not static or getattr(model, _STATIC_FAILED, False):
        return model.generate(**kwargs)
    on_cuda = kwargs["input_ids"].device.type == "cuda"
    compiled = {}
    try:
        if on_cuda:
            from transformers import CompileConfig

            # Static shapes: a shape not seen before compiles again, in ~35 s on an H200 for SmolLM2-135M; the
            # compiler's automatic dynamic shapes instead made the second shape one 82 s compile.
            compiled["compile_config"] = CompileConfig(dynamic=False)
        return model.generate(cache_implementation="static", **kwargs, **compiled)
    except Exception as error:  # noqa: BLE001 - compiler errors come in many types; the retry below tells
        if on_cuda:
            torch.cuda.empty_cache()
        out = model.generate(**kwargs)  # an error of the dynamic cache too is not the static cache's: it is raised
        setattr(model, _STATIC_FAILED, True)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        say_once(f"compiled decoding on the static cache failed ({type(error).__name__}: {first_line}); "
                 f"generating on the dynamic cache instead")
        return out


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device, trie,
              description: str, shared_prefix: bool, done, answers: list[list[int]] | None = None,
              timings: dict | None = None, static: bool | None = None) -> tuple[list[str], list[list[list[float]]]]:
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    scores: list[list[list[float]]] = [[] for _ in prompts] if answers else []
    parts = decoder_and_head(model)
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    static = _decodes_static(model, prompts, max_new_tokens, batch_size, static)
    shared_prefix = shared_prefix and not static and generation_prefix_blocker(model, longest) is None
    # The static cache compiles one decoding step per shape and model: every batch of every call gets
    # batch_size rows (filler rows repeat the last prompt and are dropped) and a width of a power of two, so
    # that calls of about the same length share a shape (the validation passes during training with the
    # fine-tuned model's test pass, say). Padding costs only prompt tokens, cheap on a GPU.
    fixed_width = max(128, 1 << (max((len(p) for p in prompts), default=1) - 1).bit_length()) if static else 0
    fixed_rows = batch_size if static else 0
    model.eval()
    last_prefix: tuple = ((), None)  # (prefix ids, its one-row cache)
    with progress(description, len(prompts)) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [prompts[i] for i in idx]
            rows += rows[-1:] * (fixed_rows - len(rows))
            # Keep at least one own token per row: generation starts from each row's last prompt token.
            n_prefix = shared_prefix_len(rows, min(len(r) for r in rows) - 1) if shared_prefix and parts else 0
            width = fixed_width or max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, ids in enumerate(rows):  # [shared prefix | left padding | own tokens]
                input_ids[row, :n_prefix] = torch.tensor(ids[:n_prefix], dtype=torch.long)
                attention_mask[row, :n_prefix] = 1
                input_ids[row, width - len(ids) + n_prefix:] = torch.tensor(ids[n_prefix:])
                attention_mask[row, width - len(ids) + n_prefix:] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            cache = None
            if n_prefix:
                # Batches usually share the same opening (demonstrations are the same for every row): its cache
                # is computed once per call and copied, not recomputed per batch (a 6-shot opening is ~480 tokens).
                key = tuple(rows[0][:n_prefix])
                if key != last_prefix[0]:
                    last_prefix = (key, prefix_cache(parts[0], input_ids[0, :n_prefix], 1))
                cache = copy.deepcopy(last_prefix[1])
                cache.batch_repeat_interleave(len(rows))
            if answers:
                cache = _score_on_prompts(model, input_ids, attention_mask, n_prefix, cache, answers, idx, scores,
                                          timings)
            constrain = None
            if trie is not None:
                per_row = [trie(i) for i in idx] if callable(trie) else [trie] * len(idx)
                per_row += per_row[-1:] * (len(rows) - len(idx))
                constrain = lambda row, ids: per_row[row].allowed(ids[width:].tolist(), stops)  # noqa: E731
            started = time.perf_counter()
            given = {"past_key_values": cache} if cache is not None else {}  # a static cache is the library's own
            out = _greedy(model, static, input_ids=input_ids, attention_mask=attention_mask, **given,
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=stops, pad_token_id=pad_id, prefix_allowed_tokens_fn=constrain,
                          temperature=None, top_p=None, top_k=None,
                          stopping_criteria=StoppingCriteriaList([_AnswerFinished(tokenizer, width, done)])
                          if done else None)
            if timings is not None:
                timings["decode"] += time.perf_counter() - started
            for row, i in enumerate(idx):
                ids = out[row, width:].tolist()
                cut = getattr(per_row[row], "cut_unfinished", None) if constrain else None
                if cut and not set(ids) & set(stops):  # a list answer cut short keeps its finished items only
                    ids = cut(ids)
                outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            advance(len(idx))
    return outputs, scores


def _score_on_prompts(model, input_ids, attention_mask, n_prefix: int, cache, answers: list[list[int]],
                      idx: list[int], scores: list, timings: dict):
    """Run a batch's own prompt tokens, score every answer on that cache, and hand generation the cache without
    the last prompt column (generation starts by running it: the library takes no logits from outside)."""
    started = time.perf_counter()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, n_prefix:]  # as generation numbers them
    out = model(input_ids=input_ids[:, n_prefix:], attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    scored = time.perf_counter()
    for i, row in zip(idx, score_after_prompts(model, out.logits[:, -1], out.past_key_values, attention_mask, answers)):
        scores[i] = row
    cache = out.past_key_values
    cache.crop(-1)
    timings["prompt"] += scored - started
    timings["score"] += time.perf_counter() - scored
    return cache
