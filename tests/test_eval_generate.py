import pytest
import torch

from tailorlm.eval.generate import LabelTrie, generate
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


def test_label_trie():
    trie = LabelTrie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert trie.allowed([], [9]) == [1, 4]
    assert trie.allowed([1], [9]) == [2, 3]
    assert trie.allowed([1, 2, 9], [9]) == [9]  # past the end: only stop tokens
