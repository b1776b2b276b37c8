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
    train(model, strategy, memorize_samples(tiny_tokenizer), [], TrainSpec(max_steps=3, lr=1e-2, eval_every=0),
          1e-2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    moved = changed(before, model)
    assert moved and all("lora_" in n for n in moved), moved
    # B starts at zero, so after training both A and B of some adapter have moved.
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)


def test_full_fine_tuning_changes_base_weights(tiny_tokenizer, tiny_model):
    strategy = make_strategy(MethodSpec(name="full"))
    model = strategy.prepare(tiny_model)
    before = snapshot(model)
    train(model, strategy, memorize_samples(tiny_tokenizer), [], TrainSpec(max_steps=2, lr=1e-3, eval_every=0),
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
