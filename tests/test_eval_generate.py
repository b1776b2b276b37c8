import types

import pytest
import torch

from tailorlm.eval.generate import _STATIC_FAILED, STATIC_AFTER_STEPS, LabelTrie, generate, scores_together, \
    static_cache_applies
from conftest import tiny_llama


def prompts(tokenizer):
    head = "<|im_start|>user\nClassify the text. Answer with one of: negative, positive.\n\nText: "
    texts = ["the film won an award", "awful", "the team won the match with a late goal from the striker", "great movie"]
    return [tokenizer(f"{head}{t}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"] for t in texts]


def writer(tokenizer, seed):
    """A random tiny model that never picks a special or blank token, so it writes visible text."""
    model = tiny_llama(len(tokenizer), seed=seed)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.lm_head.weight[blank] = 0  # logit 0, below the best of hundreds of random logits
    return model


@pytest.mark.parametrize("batch_size", [3, 2])  # 2: two batches share the opening, whose cache is reused
def test_shared_prefix_generation_equals_plain_generation(tiny_tokenizer, batch_size):
    model = writer(tiny_tokenizer, seed=3)
    ids = prompts(tiny_tokenizer)
    plain = generate(model, tiny_tokenizer, ids, 6, batch_size, torch.device("cpu"), shared_prefix=False)
    shared = generate(model, tiny_tokenizer, ids, 6, batch_size, torch.device("cpu"), shared_prefix=True)
    assert shared == plain
    assert all(plain)  # non-empty text, so the comparison means something


def test_batched_generation_equals_one_at_a_time(tiny_tokenizer):
    model = writer(tiny_tokenizer, seed=4)
    ids = prompts(tiny_tokenizer)
    batched = generate(model, tiny_tokenizer, ids, 5, 4, torch.device("cpu"))
    single = [generate(model, tiny_tokenizer, [p], 5, 1, torch.device("cpu"))[0] for p in ids]
    assert batched == single


def test_constrained_decoding_only_writes_labels(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=5)
    answers = [tiny_tokenizer(f"{label}<|im_end|>", add_special_tokens=False)["input_ids"] for label in ("negative", "positive")]
    out = generate(model, tiny_tokenizer, prompts(tiny_tokenizer), 8, 4, torch.device("cpu"), trie=LabelTrie(answers))
    assert set(out) <= {"negative", "positive"} and len(out) == 4


@pytest.mark.parametrize("batch_size", [3, 4])  # 3: the second batch is one prompt and two filler rows
def test_static_cache_generation_equals_the_dynamic_cache(tiny_tokenizer, batch_size):
    """The static cache (compiled on a GPU) pads every batch to one width and one row count: the texts, free,
    stopped early by `done`, or constrained to the labels, are those of the dynamic cache's exact-width batches."""
    model = writer(tiny_tokenizer, seed=6)
    ids = prompts(tiny_tokenizer)
    cpu = torch.device("cpu")
    answers = [tiny_tokenizer(f"{label}<|im_end|>", add_special_tokens=False)["input_ids"] for label in ("negative", "positive")]
    for options in ({}, {"done": lambda text: len(text) > 6}, {"trie": LabelTrie(answers)}):
        dynamic = generate(model, tiny_tokenizer, ids, 6, batch_size, cpu, static=False, **options)
        static = generate(model, tiny_tokenizer, ids, 6, batch_size, cpu, static=True, **options)
        assert static == dynamic and all(dynamic), options
    calls = []
    model.generate = lambda **kwargs: calls.append(kwargs) or torch.zeros((len(kwargs["input_ids"]), 70), dtype=torch.long)
    generate(model, tiny_tokenizer, ids, 6, batch_size, cpu, static=True)
    assert [c["cache_implementation"] for c in calls] == ["static"] * -(-len(ids) // batch_size)
    assert max(map(len, ids)) < 128 and {tuple(c["input_ids"].shape) for c in calls} == {(batch_size, 128)}
    calls.clear()  # one prompt, batch 4: still four rows, and a power of two wide
    generate(model, tiny_tokenizer, [ids[0] * 3], 6, 4, cpu, static=True)
    assert 128 < len(ids[0] * 3) < 256 and [tuple(c["input_ids"].shape) for c in calls] == [(4, 256)]


def test_static_cache_applies_on_cuda_only_and_steps_aside_for_scoring(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    assert not static_cache_applies(model, 100)  # a CPU model: the dynamic cache, with the shared opening
    assert static_cache_applies(model, 100, static=True) and not static_cache_applies(model, 100, static=False)
    ids, answers = prompts(tiny_tokenizer), [[5], [6]]
    assert scores_together(model, ids, answers, 4) and not scores_together(model, ids, answers, 4, static=True)


def test_a_failing_static_cache_falls_back_to_the_dynamic_cache_for_good(tiny_tokenizer, caplog):
    model = writer(tiny_tokenizer, seed=7)
    ids = prompts(tiny_tokenizer)
    expected = generate(model, tiny_tokenizer, ids, 5, 2, torch.device("cpu"), static=False)
    library_generate, static_calls = model.generate, []

    def compiler_fails(**kwargs):
        if "cache_implementation" in kwargs:
            static_calls.append(1)
            raise RuntimeError("backend compiler failed\nlong traceback")
        return library_generate(**kwargs)

    model.generate = compiler_fails
    with caplog.at_level("INFO", logger="tailorlm.kernels"):
        assert generate(model, tiny_tokenizer, ids, 5, 2, torch.device("cpu"), static=True) == expected
    assert static_calls == [1]  # the second batch went straight to the dynamic cache
    assert "compiled decoding on the static cache failed (RuntimeError: backend compiler failed); generating on " \
           "the dynamic cache instead" in caplog.text
    assert getattr(model, _STATIC_FAILED) is True
    assert not static_cache_applies(model, 100, static=True)  # even when asked: it failed on this model
    assert scores_together(model, ids, [[5], [6]], 4, static=True)  # so the shared prompt pass is back


def test_an_error_of_the_dynamic_cache_too_is_raised_and_blames_nothing(tiny_tokenizer):
    """A failing `done` callback fails on both caches: it is the caller's error, raised as it is, and the
    static cache stays on."""
    model = writer(tiny_tokenizer, seed=7)

    def broken(text):
        raise ValueError("done() is broken")

    with pytest.raises(ValueError, match=r"done\(\) is broken"):
        generate(model, tiny_tokenizer, prompts(tiny_tokenizer), 5, 2, torch.device("cpu"), static=True, done=broken)
    assert not getattr(model, _STATIC_FAILED, False)


class OnCuda(torch.nn.Module):
    """Stands for a model on a CUDA device (static_cache_applies reads the device of its first parameter)."""

    def __init__(self, config=None, quantized=False):
        super().__init__()
        self.config = config or types.SimpleNamespace(model_type="llama", sliding_window=None)
        self.hf_quantizer = object() if quantized else None

    def parameters(self, recurse=True):
        yield types.SimpleNamespace(device=torch.device("cuda"))


def test_static_cache_applies_by_default_to_long_enough_calls_on_cuda():
    assert static_cache_applies(OnCuda(), 300, steps=STATIC_AFTER_STEPS)
    assert not static_cache_applies(OnCuda(), 300, steps=STATIC_AFTER_STEPS - 1)  # 20-token labels: eager
    assert not static_cache_applies(OnCuda(quantized=True), 300)  # the compiler cannot take a 4-bit base
    windowed = types.SimpleNamespace(model_type="gemma3_text", sliding_window=512)
    assert static_cache_applies(OnCuda(windowed), 500) and not static_cache_applies(OnCuda(windowed), 600)
    failed = OnCuda()
    setattr(failed, _STATIC_FAILED, True)
    assert not static_cache_applies(failed, 300)


def test_label_trie():
    trie = LabelTrie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert trie.allowed([], [9]) == [1, 4]
    assert trie.allowed([1], [9]) == [2, 3]
    assert trie.allowed([1, 2, 9], [9]) == [9]  # past the end: only stop tokens
