import pytest
import torch

from tailorlm.config import MethodSpec, TrainSpec
from tailorlm.models.methods import make_strategy
from tailorlm.train.loop import train
from test_train_loop import memorize_samples


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_lora_changes_only_adapter_weights(tiny_tokenizer, tiny_model):
    model = make_strategy(MethodSpec(name="lora", lora={"r": 4, "alpha": 8})).prepare(tiny_model)
    before = snapshot(model)
    strategy = make_strategy(MethodSpec(name="lora"))
    train(model, strategy, memorize_samples(tiny_tokenizer), TrainSpec(max_steps=3, lr=1e-2, eval_every=0),
          1e-2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    moved = changed(before, model)
    assert moved and all("lora_" in n for n in moved), moved
    # B starts at zero, so after training both A and B of some adapter have moved.
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)


def test_full_fine_tuning_changes_base_weights(tiny_tokenizer, tiny_model):
    strategy = make_strategy(MethodSpec(name="full"))
    model = strategy.prepare(tiny_model)
    before = snapshot(model)
    train(model, strategy, memorize_samples(tiny_tokenizer), TrainSpec(max_steps=2, lr=1e-3, eval_every=0),
          1e-3, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    moved = changed(before, model)
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    assert "model.embed_tokens.weight" in moved
    assert len(moved) == len(before)


def test_lora_adapter_is_standard_peft(tmp_path, tiny_tokenizer, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    strategy = make_strategy(MethodSpec(name="lora", lora={"r": 4}))
    model = strategy.prepare(base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    saved = strategy.save(model, tiny_tokenizer, tmp_path)
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
    x = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def train_method(tokenizer, model, method: dict, steps=4, lr=1e-2, **train):
    strategy = make_strategy(MethodSpec(**method))
    model = strategy.prepare(model)
    before = snapshot(model)
    result = train_fn(model, strategy, memorize_samples(tokenizer), TrainSpec(max_steps=steps, batch_size=4,
                      eval_every=0, warmup_ratio=0, schedule="constant", **train), lr, tokenizer.pad_token_id,
                      torch.device("cpu"))
    return model, before, result, strategy


train_fn = train


def test_freezing_the_first_blocks_keeps_them_and_the_embeddings(tiny_tokenizer, tiny_model):
    model, before, _, _ = train_method(tiny_tokenizer, tiny_model, {"name": "freeze", "freeze": {"first_blocks": 1}})
    moved = changed(before, model)
    assert not any(n.startswith("model.layers.0.") or "embed" in n for n in moved), moved
    assert {n for n in before if n.startswith("model.layers.1.")} <= moved
    assert "model.norm.weight" in moved


def test_freezing_by_name_pattern(tiny_tokenizer, tiny_model):
    model, before, _, _ = train_method(tiny_tokenizer, tiny_model, {"name": "freeze", "freeze": {"patterns": ["*.mlp.*"]}})
    moved = changed(before, model)
    assert moved and not any(".mlp." in n for n in moved)
    assert "model.layers.0.self_attn.q_proj.weight" in moved


def test_freezing_nothing_is_an_error(tiny_model):
    from tailorlm.errors import TailorError

    with pytest.raises(TailorError, match=r"method.freeze froze nothing: set method.freeze.first_blocks or a pattern"):
        make_strategy(MethodSpec(name="freeze", freeze={"patterns": ["*.no_such.*"]})).prepare(tiny_model)


def test_gradual_unfreezing_goes_top_down_on_schedule(tiny_tokenizer):
    from conftest import tiny_llama

    model = tiny_llama(len(tiny_tokenizer), layers=4)
    method = {"name": "gradual_unfreeze", "unfreeze": {"groups": 3, "every": 2, "lr_decay": 0.5}}
    strategy = make_strategy(MethodSpec(**method))
    strategy.prepare(model)
    assert strategy.labels == ["blocks 2-3, norm/head", "blocks 0-1", "embeddings"]
    groups = strategy.param_groups(model, 1e-2)
    assert [g["lr"] for g in groups] == [1e-2, 5e-3, 2.5e-3]
    # After 2 steps only group 0 has trained; group 1 joins at step 3, group 2 at step 5.
    model2, before, result, _ = train_method(tiny_tokenizer, tiny_llama(len(tiny_tokenizer), layers=4), method, steps=2)
    moved = changed(before, model2)
    assert moved and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in moved), moved
    model3, before, result, _ = train_method(tiny_tokenizer, tiny_llama(len(tiny_tokenizer), layers=4), method, steps=5)
    assert "model.embed_tokens.weight" in changed(before, model3)
    assert [e["step"] for e in result.events] == [0, 2, 4]
    assert result.events[1]["event"] == "step 3: training blocks 2-3, norm/head; blocks 0-1"


def test_gradual_unfreezing_spreads_stages_over_the_run_by_default(tiny_tokenizer, tiny_model):
    strategy = make_strategy(MethodSpec(name="gradual_unfreeze", unfreeze={"groups": 2}))
    strategy.prepare(tiny_model)
    strategy.plan(total_steps=10, steps_per_epoch=5)
    assert [strategy.stage_at(s) for s in (0, 4, 5, 9)] == [0, 0, 1, 1]
    epochs = make_strategy(MethodSpec(name="gradual_unfreeze", unfreeze={"groups": 2, "unit": "epoch", "every": 1}))
    epochs.prepare(tiny_model)
    epochs.plan(total_steps=10, steps_per_epoch=3)
    assert [epochs.stage_at(s) for s in (0, 2, 3, 9)] == [0, 0, 1, 1]


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_dora_and_rslora_are_peft_adapters(tmp_path, tiny_tokenizer, tiny_model, option):
    import json

    model, before, _, strategy = train_method(tiny_tokenizer, tiny_model, {"name": "lora", "lora": {"r": 4, option: True}},
                                              steps=2)
    assert changed(before, model)
    saved = strategy.save(model, tiny_tokenizer, tmp_path)
    assert json.loads((saved / "adapter_config.json").read_text())[option] is True


def test_qlora_without_a_gpu_is_a_clear_error():
    from tailorlm.errors import TailorError
    from tailorlm.models.methods import check_supported

    with pytest.raises(TailorError, match=r"^method.name=qlora needs a CUDA GPU .*this machine has none: use method.name=lora"):
        check_supported(MethodSpec(name="qlora"), torch.device("cpu"))
