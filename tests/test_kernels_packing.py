"""Packed rows must compute exactly what the padded batch computes: same loss, same gradients."""
import pytest
import torch
from conftest import tiny_llama

from tailorlm.data.batching import collate
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.kernels.attention import packed_attention
from tailorlm.kernels.loss import completion_loss
from tailorlm.kernels.packing import pack


def samples(seed: int = 3) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in [(9, 2), (4, 5), (17, 1), (6, 3), (12, 6)]:
        ids = torch.randint(10, 390, (prompt + answer,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:], {}))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_layout():
    batch = pack(samples(), pad_to_multiple=16)
    lengths = [11, 9, 18, 9, 18]
    assert batch["cu_seqlens"].tolist() == [0, 11, 20, 38, 47, 65, 80]  # a filler segment rounds 65 up to 80
    assert batch["input_ids"].shape == (1, 80) and batch["real_tokens"] == 65
    assert batch["position_ids"][0, 11:14].tolist() == [0, 1, 2]  # positions restart per sample
    assert batch["max_len"] == 128  # the longest sample (18), rounded up to a bucket
    starts = [0, 11, 20, 38, 47]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert (batch["labels"][0, 65:] == IGNORE).all()
    assert int((batch["labels"] != IGNORE).sum()) == sum(lengths) - sum([9, 4, 17, 6, 12])


@pytest.mark.parametrize("pad_to_multiple", [1, 32])
def test_packed_loss_and_gradients_equal_the_padded_batch(pad_to_multiple):
    model = tiny_llama(400, layers=2)
    padded = collate(samples(), pad_id=3)
    expected, n = completion_loss(model, padded, shared_prefix=False)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()
    with packed_attention(model):
        got, m = completion_loss(model, pack(samples(), pad_to_multiple=pad_to_multiple, pad_id=3))
        got.backward()
    assert m == n == 17
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_does_not_cross_samples():
    """Changing one sample's tokens leaves the other samples' hidden states untouched."""
    model = tiny_llama(400)
    a, b = samples(), samples()
    b[1] = Sample([t + 1 for t in b[1].input_ids], b[1].labels, {})
    with packed_attention(model), torch.no_grad():
        ha = model.model(**_inputs(pack(a))).last_hidden_state[0]
        hb = model.model(**_inputs(pack(b))).last_hidden_state[0]
    same = torch.ones(ha.shape[0], dtype=torch.bool)
    same[11:20] = False
    torch.testing.assert_close(ha[same], hb[same])
    assert not torch.allclose(ha[11:20], hb[11:20])


def test_max_len_buckets():
    from tailorlm.kernels.packing import bucket
    assert [bucket(n) for n in (1, 128, 129, 700, 1024, 1025)] == [128, 128, 256, 1024, 1024, 2048]


def test_context_manager_restores_the_attention_implementation():
    model = tiny_llama(400)
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation == "tailor_packed"
    assert model.config._attn_implementation == before


def _inputs(batch):
    from tailorlm.kernels.loss import packed_kwargs
    return {"input_ids": batch["input_ids"], **packed_kwargs(batch)}


def test_compiled_layers_take_packed_rows_of_any_length_without_compiling_again():
    """Inductor used to guard on the packed row's length range (2 <= T <= 4096 here, 2559 and 4095 on an H200),
    so compiled full fine-tuning compiled every layer again when a longer row came; the length is now unbacked.
    On CPU the per-sample attention splits the layer in two, and the part after the split is still recompiled:
    only the layer's own input is checked here (the GPU test checks the whole layer)."""
    from conftest import recompilations

    from tailorlm.config import MethodSpec, TrainSpec
    from tailorlm.models.methods import make_strategy
    from tailorlm.train.step import fast_training

    model = make_strategy(MethodSpec(name="full")).prepare(tiny_llama(400))
    ids = [10 + i % 380 for i in range(400)]
    rows = [[Sample(ids[:n], ids[:n], {}) for _ in range(k)] for n, k in ((100, 3), (400, 11))]  # 300, 4,400 tokens
    with recompilations() as reports, fast_training(model, TrainSpec(packing="on", compile="on"), 3,
                                                    torch.device("cpu")) as ctx:
        for row in rows:
            loss, _ = completion_loss(model, ctx.batch(row))
            loss.backward()
    assert not [r for r in reports if "hidden_states.size()[1]" in r], reports
