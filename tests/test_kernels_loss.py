import torch

from tailorlm.data.batching import collate
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.kernels import loss as loss_module
from tailorlm.kernels.loss import completion_loss, per_sample_loss
from tailorlm.kernels.prefix import shared_prefix_len, shared_prefix_len_padded
from conftest import tiny_llama


def make_batch(shared: int = 20):
    torch.manual_seed(1)
    prefix = list(range(5, 5 + shared))
    samples = []
    for extra, answer in [(3, 2), (7, 3), (1, 1), (10, 4)]:
        ids = prefix + torch.randint(30, 300, (extra + answer,)).tolist()
        samples.append(Sample(ids, [IGNORE] * (shared + extra) + ids[shared + extra:], {}))
    return collate(samples, pad_id=3)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_matches_the_library_loss_on_completion_tokens():
    model = tiny_llama(400)
    batch = make_batch()
    total, n = completion_loss(model, batch, shared_prefix=False)
    reference = model(**batch).loss  # HF: mean over labels != -100, shifted
    assert n == 10
    torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-6)


def test_shared_prefix_gives_the_same_loss_and_gradients():
    model = tiny_llama(400)
    batch = make_batch()
    assert shared_prefix_len_padded(batch["input_ids"], limit=100) == 20
    plain, _ = completion_loss(model, batch, shared_prefix=False)
    plain.backward()
    expected = grads(model)
    model.zero_grad()
    shared, _ = completion_loss(model, batch, shared_prefix=True)
    shared.backward()
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_head_equals_one_chunk(monkeypatch):
    model = tiny_llama(400)
    batch = make_batch()
    whole, _ = completion_loss(model, batch)
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 3)
    chunked, _ = completion_loss(model, batch)
    torch.testing.assert_close(chunked, whole)


def test_per_sample_losses_are_each_rows_own_loss_with_or_without_the_shared_prefix(monkeypatch):
    model = tiny_llama(400)
    batch = make_batch()
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 3)  # rows of one sample split across head chunks
    sums, counts = per_sample_loss(model, batch, shared_prefix=True)
    plain_sums, plain_counts = per_sample_loss(model, batch, shared_prefix=False)
    assert counts.tolist() == plain_counts.tolist() == [2, 3, 1, 4]
    torch.testing.assert_close(sums, plain_sums, rtol=1e-5, atol=1e-5)
    for row in range(4):
        one = {k: v[row:row + 1] for k, v in batch.items()}
        alone, n = completion_loss(model, one, shared_prefix=False)
        assert n == counts[row]
        torch.testing.assert_close(sums[row], alone.detach(), rtol=1e-5, atol=1e-5)


def test_prefix_length_rules():
    assert shared_prefix_len([[1] * 20 + [2], [1] * 20 + [3]], limit=100) == 20
    assert shared_prefix_len([[1] * 20 + [2], [1] * 20 + [3]], limit=12) == 12
    assert shared_prefix_len([[1] * 5 + [2], [1] * 5 + [3]], limit=100) == 0  # too short to pay off
    assert shared_prefix_len([[1] * 30], limit=100) == 0  # a single row shares with nobody
