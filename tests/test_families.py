"""Every supported model family, on a tiny random model of it: GGUF export that llama.cpp runs exactly as
PyTorch does, training fast paths equal to the plain step, and shared-prefix generation equal to plain."""
import logging

import pytest
import torch

from conftest import CHATML
from family_models import FAMILIES, SLIDING_WINDOW, tiny_family_model
from tailorlm.data.batching import collate
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.errors import TailorError
from tailorlm.eval.generate import generate
from tailorlm.export.gguf_writer import write_gguf
from tailorlm.export.layout import Layout
from tailorlm.export.llamacpp_check import greedy_agreement
from tailorlm.kernels.attention import packed_attention
from tailorlm.kernels.loss import completion_loss
from tailorlm.kernels.packing import pack

TEXTS = ["the market rose as shares in the bank climbed", "the film won an award and the actor",
         "positive negative neutral business entertainment politics sport"]


def _layout(tokenizer):
    return Layout(CHATML, True, None, "<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))


def _prompts(tokenizer):
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert min(len(p) for p in prompts) > SLIDING_WINDOW  # gemma3's window is in play
    return prompts


# ---- GGUF export, run by llama.cpp ------------------------------------------------------------------------

def _exported_agreement(family: str, quant: str, tokenizer, folder):
    """A tiny model of the family, exported at `quant` and continued by llama.cpp beside PyTorch."""
    pytest.importorskip("llama_cpp")
    model = tiny_family_model(family, len(tokenizer))
    path = folder / f"{family}.gguf"
    write_gguf(model, tokenizer, path, quant, "", _layout(tokenizer))
    return greedy_agreement(model, path, _prompts(tokenizer), new_tokens=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_gguf_continues_every_prompt_as_pytorch_does_in_llama_cpp(family, tiny_tokenizer, tmp_path):
    agreement = _exported_agreement(family, "f16", tiny_tokenizer, tmp_path)
    assert agreement.exported == agreement.reference
    assert len(set(sum(agreement.reference, []))) > 4  # the model writes varied text, not one repeated token


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_agrees_with_pytorch_above_the_verify_threshold(family, tiny_tokenizer, tmp_path):
    from tailorlm.export.verify import Q8_0_AGREEMENT

    assert _exported_agreement(family, "q8_0", tiny_tokenizer, tmp_path).token_share >= Q8_0_AGREEMENT


def test_llama_cpp_tells_a_gemma3_file_without_its_norm_offset_apart(tiny_tokenizer, tmp_path, monkeypatch):
    """The check has teeth: gemma3 norms written as stored (no 1 + w) change what llama.cpp writes."""
    pytest.importorskip("llama_cpp")
    import dataclasses

    import tailorlm.export.gguf_families as families

    monkeypatch.setitem(families.FAMILIES, "gemma3_text",
                        dataclasses.replace(families.FAMILIES["gemma3_text"], norm_offset=0.0))
    model = tiny_family_model("gemma3", len(tiny_tokenizer))
    path = tmp_path / "broken.gguf"
    write_gguf(model, tiny_tokenizer, path, "f16", "", _layout(tiny_tokenizer))
    assert greedy_agreement(model, path, _prompts(tiny_tokenizer), new_tokens=8).prompts_identical == 0


def test_gguf_metadata_per_family(tiny_tokenizer, tmp_path):
    import gguf

    expected = {"mistral": ("llama", "blk.0.attn_q.weight"), "qwen2": ("qwen2", "blk.0.attn_q.bias"),
                "qwen3": ("qwen3", "blk.0.attn_k_norm.weight"), "phi3": ("phi3", "blk.0.attn_qkv.weight"),
                "gemma3": ("gemma3", "blk.1.post_ffw_norm.weight")}
    for family, (arch, tensor) in expected.items():
        model = tiny_family_model(family, len(tiny_tokenizer), sharp=False)
        path = tmp_path / f"{family}.gguf"
        write_gguf(model, tiny_tokenizer, path, "f16", "", _layout(tiny_tokenizer))
        reader = gguf.GGUFReader(path)
        names = {t.name: t for t in reader.tensors}
        assert reader.get_field("general.architecture").contents() == arch and tensor in names, family
        assert ("output.weight" in names) == (not model.config.tie_word_embeddings), family
        if family == "phi3":  # fused: gate and up rows in one matrix
            assert list(names["blk.0.ffn_up.weight"].shape) == [64, 256]
        if family == "gemma3":
            assert reader.get_field("gemma3.attention.sliding_window").contents() == SLIDING_WINDOW
            assert reader.get_field("gemma3.attention.key_length").contents() == 16
            stored = model.model.norm.weight.detach().numpy()
            written = names["output_norm.weight"].data
            assert abs(written - (stored + 1)).max() < 1e-6  # llama.cpp's RMSNorm multiplies by 1 + w


def test_what_llama_cpp_cannot_reproduce_is_refused_by_name(tiny_tokenizer, tmp_path):
    capped = tiny_family_model("gemma3", len(tiny_tokenizer), sharp=False, softcap=True)
    with pytest.raises(TailorError, match=r"final logit soft-capping \(final_logit_softcapping=30.0\)"):
        write_gguf(capped, tiny_tokenizer, tmp_path / "capped.gguf", "f16", "", _layout(tiny_tokenizer))
    odd = tiny_family_model("gemma3", len(tiny_tokenizer), sharp=False)
    odd.config.layer_types = ["full_attention", "full_attention"]
    with pytest.raises(TailorError, match="a layer pattern other than 5 sliding-window layers then 1 global"):
        write_gguf(odd, tiny_tokenizer, tmp_path / "odd.gguf", "f16", "", _layout(tiny_tokenizer))
    assert list(tmp_path.iterdir()) == []  # refused before a byte is written


# ---- training: fast paths equal the plain step ------------------------------------------------------------

def _samples(shared: int = 0, seed: int = 3) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    head = list(range(5, 5 + shared))
    out = []
    for prompt, answer in [(9, 2), (4, 5), (17, 1), (6, 3), (12, 6)]:
        ids = head + torch.randint(10, 390, (prompt + answer,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * (shared + prompt) + ids[shared + prompt:], {}))
    return out


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    loss, n = completion_loss(model, batch, **kwargs)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert got[1] == expected[1] and got[2].keys() == expected[2].keys()
    for name, grad in got[2].items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_and_shared_prefix_steps_equal_the_plain_step(family):
    model = tiny_family_model(family, 400, sharp=False)
    padded = collate(_samples(), pad_id=3)
    plain = _loss_and_grads(model, padded, shared_prefix=False)
    with packed_attention(model):
        _assert_same(_loss_and_grads(model, pack(_samples(), pad_to_multiple=32, pad_id=3)), plain)
    prefixed = collate(_samples(shared=20), pad_id=3)
    _assert_same(_loss_and_grads(model, prefixed, shared_prefix=True),
                 _loss_and_grads(model, prefixed, shared_prefix=False))


def test_a_soft_capped_head_falls_back_to_full_logits_and_says_so(caplog, monkeypatch):
    from tailorlm.kernels import fallback

    monkeypatch.setattr(fallback, "_said", set())  # as in a fresh process
    model = tiny_family_model("gemma3", 400, sharp=False, softcap=True)
    batch = collate(_samples(shared=20), pad_id=3)
    with caplog.at_level(logging.INFO, logger="tailorlm.kernels"):
        fast = _loss_and_grads(model, batch, shared_prefix=True)
    assert "final logit soft-capping" in caplog.text
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    reference = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(fast[0], reference.detach(), rtol=1e-5, atol=1e-5)
    with packed_attention(model):
        _assert_same(_loss_and_grads(model, pack(_samples(shared=20), pad_id=3)), fast)


# ---- evaluation: batched generation with and without the shared prefix ------------------------------------

def _classify_prompts(tokenizer) -> list[list[int]]:
    """Chat prompts of different lengths that share an opening (the shared-prefix path)."""
    head = "<|im_start|>user\nClassify the text. Answer with one of: negative, positive.\n\nText: "
    texts = ["the film won an award", "awful", "the team won the match with a late goal from the striker", "great"]
    return [tokenizer(f"{head}{t}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
            for t in texts]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_generation_equals_plain_generation(family, tiny_tokenizer):
    model = tiny_family_model(family, len(tiny_tokenizer))
    ids = _classify_prompts(tiny_tokenizer)
    plain = generate(model, tiny_tokenizer, ids, 6, 4, torch.device("cpu"), shared_prefix=False)
    shared = generate(model, tiny_tokenizer, ids, 6, 4, torch.device("cpu"), shared_prefix=True)
    one_at_a_time = [generate(model, tiny_tokenizer, [p], 6, 1, torch.device("cpu"))[0] for p in ids]
    assert shared == plain == one_at_a_time


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_scored_on_the_generation_prompt_pass_equal_the_separate_passes(family, tiny_tokenizer):
    from tailorlm.eval.generate import generate_and_score, scores_together
    from tailorlm.eval.likelihood import answer_token_logprobs

    model = tiny_family_model(family, len(tiny_tokenizer))
    ids = _classify_prompts(tiny_tokenizer)
    answers = [tiny_tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("negative", "positive<|im_end|>")]
    if not scores_together(model, ids, answers, 6):
        assert family == "gemma3"  # its window (8) is shorter than the rows: the passes stay apart
        return
    texts_, scores = generate_and_score(model, tiny_tokenizer, ids, answers, 6, 3, torch.device("cpu"))
    assert texts_ == generate(model, tiny_tokenizer, ids, 6, 3, torch.device("cpu"))
    apart = answer_token_logprobs(model, ids, answers, torch.device("cpu"), 3)
    for row, row_apart in zip(scores, apart):
        for tokens, tokens_apart in zip(row, row_apart):
            assert tokens == pytest.approx(tokens_apart, abs=1e-4)


def test_a_sliding_window_shorter_than_the_rows_turns_the_generation_prefix_off_and_says_so(caplog, monkeypatch):
    from tailorlm.kernels import fallback
    from tailorlm.kernels.prefix import generation_prefix_blocker

    monkeypatch.setattr(fallback, "_said", set())  # as in a fresh process

    model = tiny_family_model("gemma3", 400, sharp=False)
    assert generation_prefix_blocker(model, SLIDING_WINDOW) is None  # every row inside the window: harmless
    with caplog.at_level(logging.INFO, logger="tailorlm.kernels"):
        assert "sliding-window attention (window 8)" in generation_prefix_blocker(model, 40)
        generation_prefix_blocker(model, 40)
    assert caplog.text.count("sliding-window attention") == 1  # said once
    assert generation_prefix_blocker(tiny_family_model("llama", 400, sharp=False), 10_000) is None


def test_without_llama_cpp_python_the_check_is_skipped_with_the_way_to_install_it(tiny_tokenizer, tmp_path,
                                                                                  monkeypatch):
    import sys

    from tailorlm.export.verify import llama_cpp_check, VerifyReport

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    model = tiny_family_model("qwen2", len(tiny_tokenizer), sharp=False)
    cases = [type("Case", (), {"ids": p})() for p in _prompts(tiny_tokenizer)]
    report = VerifyReport()
    check = llama_cpp_check(report, model, tmp_path / "absent.gguf", "f16", cases)
    assert check.ok and check.result.startswith("skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
    assert "llama_cpp_skipped" in report.figures


def test_a_window_llama_cpp_does_not_apply_caps_the_context_length(tiny_tokenizer, tmp_path):
    import gguf

    model = tiny_family_model("mistral", len(tiny_tokenizer), sharp=False)
    model.config.sliding_window = 64  # llama.cpp runs mistral as llama, with no window: exact up to 64 tokens
    write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f16", "", _layout(tiny_tokenizer))
    assert gguf.GGUFReader(tmp_path / "m.gguf").get_field("llama.context_length").contents() == 64
