"""The training-time estimate: FLOPs per token by method (data/cost.py) over the model's layout
(data/model_shape.py), and this machine's measured figures, cached (data/machine_rate.py)."""
import json

import pytest
import torch

from tailorlm.config import MethodSpec, RunConfig, TrainSpec
from tailorlm.data import cost, machine_rate
from tailorlm.data.model_shape import gguf_config, read_shape, shape_from_config
from tailorlm.data.samples import IGNORE, Sample
from conftest import tiny_llama, write

WORDS = "the quick brown fox jumps over a lazy dog".split()
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _machine_figures_in_a_scratch_cache(tmp_path_factory):
    """The module's estimates measure this machine once, into a cache of their own, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILOR_CACHE_DIR", str(tmp_path_factory.mktemp("machine-cache")))
        yield


def _meta_llama(config: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # sizes only, no memory
        return LlamaForCausalLM(LlamaConfig(**config))


def _shape(config: dict):
    model = _meta_llama(config)
    return shape_from_config(config, sum(p.numel() for p in model.parameters())), model


def _per_token(shape, method: MethodSpec, steps: int = 8, per_epoch: int = 8) -> float:
    """FLOPs of one token through decoder and head (no attention term), over the method's phases."""
    return sum(share * cost.token_cost(shape, trains, adapters).per_token()
               for share, trains, adapters in cost.method_phases(shape, method, per_epoch, steps))


def test_full_fine_tuning_costs_six_flops_per_parameter_and_token():
    tied, _ = _shape(SMOLLM2)
    assert tied.n_params == 134_515_008  # SmolLM2-135M's count
    assert _per_token(tied, MethodSpec(name="full")) == 6 * tied.n_params
    untied, _ = _shape({**SMOLLM2, "tie_word_embeddings": False})
    # The input embedding is a lookup: only the head's copy of the vocabulary is multiplied.
    assert _per_token(untied, MethodSpec(name="full")) == 6 * (untied.n_params - 49152 * 576)


def test_freezing_most_blocks_costs_less_than_lora_which_costs_less_than_full():
    shape, _ = _shape(SMOLLM2)
    full, lora = _per_token(shape, MethodSpec(name="full")), _per_token(shape, MethodSpec(name="lora"))
    assert _per_token(shape, MethodSpec(name="freeze", freeze={"first_blocks": 20})) < lora < full
    # Freezing a third leaves two thirds of the blocks at 6 FLOPs a parameter: more than LoRA's 4 over every
    # block (its adapters start at the bottom, but the base never needs weight gradients).
    assert lora < _per_token(shape, MethodSpec(name="freeze", freeze={"first_blocks": 10})) < full
    assert _per_token(shape, MethodSpec(name="qlora")) == lora  # the same FLOPs over a 4-bit base


def test_freezing_the_bottom_blocks_saves_exactly_their_backward():
    from tailorlm.models.layers import parameter_depths

    shape, model = _shape(SMOLLM2)
    depths = parameter_depths(model)
    frozen = sum(p.numel() for name, p in model.named_parameters() if 0 <= depths[name] < 12)
    saved = _per_token(shape, MethodSpec(name="full")) - \
        _per_token(shape, MethodSpec(name="freeze", freeze={"first_blocks": 12}))
    # Their input and weight gradients (4 FLOPs a parameter); the tied head's weight gradient, since it is the
    # frozen embedding; and the input gradient of block 12's first norm, which nothing below needs.
    assert saved == 4 * frozen + 2 * 49152 * 576 + 2 * 576


def test_lora_counts_the_frozen_base_with_its_input_gradients_and_the_adapters():
    shape, model = _shape(SMOLLM2)
    rank, hidden = 8, 576
    matrices = [p.shape for name, p in model.named_parameters() if ".layers." in name and p.ndim == 2]
    first_qkv = sum(p.numel() for name, p in model.named_parameters()
                    if name.startswith("model.layers.0.self_attn.") and name[-13] in "qkv")
    adapters = sum(6 * rank * (inputs + outputs) for outputs, inputs in matrices)
    # Everything pays forward and input gradient (4N) and only the adapters get weight gradients, except what
    # lies below the lowest adapter: block 0's first norm and its query/key/value matrices (and their A
    # matrices) read the frozen embedding, so no gradient has to reach their inputs.
    expected = 4 * shape.n_params - 2 * hidden - 2 * first_qkv + adapters - 3 * 2 * rank * hidden
    assert _per_token(shape, MethodSpec(name="lora", lora={"r": rank})) == expected
    only_query = _per_token(shape, MethodSpec(name="lora", lora={"r": rank, "target_modules": ["q_proj"]}))
    assert only_query < expected


@pytest.mark.parametrize("unfreeze", [{"groups": 3}, {"groups": 4, "every": 3},
                                      {"groups": 2, "every": 1, "unit": "epoch"}])
def test_gradual_unfreezing_is_counted_stage_by_stage_as_the_strategy_trains(tiny_tokenizer, unfreeze):
    from tailorlm.models.methods import GradualUnfreeze

    model = tiny_llama(len(tiny_tokenizer), layers=6)
    shape = shape_from_config(model.config.to_dict(), sum(p.numel() for p in model.parameters()))
    spec = MethodSpec(name="gradual_unfreeze", unfreeze=unfreeze)
    strategy = GradualUnfreeze(spec)
    strategy.prepare(model)
    strategy.plan(total_steps=10, steps_per_epoch=4)
    stages = [strategy.stage_at(step) for step in range(10)]
    phases = cost.unfreeze_phases(shape, spec, 4, 10)
    assert [share for share, _, _ in phases] == [stages.count(s) / 10 for s in sorted(set(stages))]
    for (_, trains, _), stage in zip(phases, sorted(set(stages))):
        strategy.on_step(stages.index(stage), model)
        live = {name for name, p in model.named_parameters() if p.requires_grad}
        assert {part.name for part in shape.parts if part.counted and trains(part)} == live
    per_step = []  # each step's cost from what the strategy really leaves trainable at that step
    for step in range(10):
        strategy.on_step(step, model)
        live = {name for name, p in model.named_parameters() if p.requires_grad}
        per_step.append(cost.token_cost(shape, lambda part: part.name in live).per_token())
    averaged = _per_token(shape, spec, 10, per_epoch=4)
    assert averaged == pytest.approx(sum(per_step) / 10)
    assert per_step[0] < averaged < _per_token(shape, MethodSpec(name="full"), 10)


def test_attention_costs_twelve_flops_per_block_width_and_key_when_the_whole_model_trains():
    shape, _ = _shape(SMOLLM2)
    assert cost.token_cost(shape, lambda part: True).attention == 12 * 30 * 576
    assert cost.token_cost(shape, lambda part: False).attention == 4 * 30 * 576  # forward only
    assert cost.token_cost(shape, lambda part: True, recompute=True).attention == 16 * 30 * 576


def test_an_epoch_is_counted_over_the_batches_as_training_builds_them(tiny_tokenizer):
    samples = _prompted(tiny_tokenizer, 8)
    padded, packed = (cost.epoch_work(samples, 8, seed=1, packed=p) for p in (False, True))
    opening, width = cost.shared_opening(samples), max(len(s) for s in samples)
    # One batch: the shared opening once, then every row padded to the longest.
    assert padded.decoder_tokens == opening + 8 * (width - opening)
    assert packed.decoder_tokens == padded.real_tokens == sum(len(s) for s in samples)
    assert padded.head_tokens == packed.head_tokens == sum(sum(t != IGNORE for t in s.labels[1:]) for s in samples)


def test_paired_objectives_count_both_answers_and_the_reference_pass(tiny_model, tiny_tokenizer):
    shape = shape_from_config(tiny_model.config.to_dict(), sum(p.numel() for p in tiny_model.parameters()))
    samples = _prompted(tiny_tokenizer, 16)
    sft, orpo, dpo = (cost.run_cost(RunConfig(objective={"name": name}), shape, samples, 2.0, packed=True)
                      for name in ("sft", "orpo", "dpo"))
    assert orpo.flops == 2 * sft.flops
    spec = RunConfig().train
    work = cost.epoch_work(samples, spec.batch_size, spec.seed, packed=True)
    forward = work.flops(cost.token_cost(shape, lambda part: False))
    assert dpo.flops == pytest.approx(2 * sft.flops + 2 * forward)  # DPO's reference: one forward, once


def test_the_layout_read_from_a_model_folder_matches_its_parameters(tiny_model_dir, tiny_model):
    params = {name: p.numel() for name, p in tiny_model.named_parameters()}
    shape = read_shape(["no-such/model", str(tiny_model_dir)], sum(params.values()))
    assert shape.source == "config.json" and shape.blocks == 2
    assert {part.name: part.params for part in shape.parts if part.counted} == params
    unknown = read_shape(["no-such/model"], 1000)
    assert unknown.source == "parameter count only"
    assert _per_token(unknown, MethodSpec(name="full")) == 6000 and _per_token(unknown, MethodSpec(name="lora")) == 4000
    assert _per_token(unknown, MethodSpec(name="freeze", freeze={"first_blocks": 1})) == 6000


def test_a_gguf_header_gives_the_sizes_without_parsing_the_vocabulary(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_embedding_length(48)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"token{i}" for i in range(120)])
    writer.add_token_scores([0.0] * 120)
    writer.add_tensor("token_embd.weight", np.zeros((120, 48), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    sizes = {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 120}
    assert gguf_config(path) == sizes
    real = sum(p.numel() for p in _meta_llama({**sizes, "tie_word_embeddings": True}).parameters())
    shape = read_shape([str(tmp_path)], real)  # a folder holding one GGUF, as the default model's package does
    assert shape.source == "GGUF header" and shape.blocks == 3 and shape.n_params == real
    assert [p.name for p in shape.parts if p.kind == "head"] == ["model.embed_tokens.weight"]  # found to be tied


def _prompted(tokenizer, n: int = 16) -> list[Sample]:
    opening = tokenizer("<|im_start|>system\nClassify the text. Answer with one of: positive negative<|im_end|>\n"
                        "<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    samples = []
    for i in range(n):
        prompt = opening + tokenizer(f"the film {' '.join(WORDS[:i % 7 + 2])}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)["input_ids"]
        answer = tokenizer(("positive" if i % 2 else "negative") + "<|im_end|>", add_special_tokens=False)["input_ids"]
        samples.append(Sample(prompt + answer, [IGNORE] * len(prompt) + answer, {}))
    return samples


def test_the_shared_opening_is_the_one_training_computes_once(tiny_tokenizer):
    from tailorlm.data.batching import collate
    from tailorlm.kernels.prefix import shared_prefix_len_padded

    samples = _prompted(tiny_tokenizer, 8)
    batch = collate(samples, tiny_tokenizer.pad_token_id)
    first_predicting = int((batch["labels"][:, 1:] != IGNORE).int().argmax(1).min())
    assert cost.shared_opening(samples) == shared_prefix_len_padded(batch["input_ids"], first_predicting) > 8
    assert cost.shared_opening(samples[:1]) == 0


@pytest.mark.parametrize("spec", [TrainSpec(), TrainSpec(epochs=3, batch_size=5, grad_accum=2), TrainSpec(max_steps=7)])
def test_steps_are_planned_as_the_training_loop_plans_them(spec):
    from tailorlm.train.loop import plan_steps

    assert cost.plan_steps(43, spec) == plan_steps(43, spec)


def test_the_rate_is_measured_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(machine_rate, "measure_matmul", lambda *args: calls.append(args) or 5e10)
    assert machine_rate.matmul_rate(CPU, torch.float32, 64) == (5e10, False)
    measured = len(calls)  # once, and once more on one thread where torch runs several
    assert measured == (1 if torch.get_num_threads() == 1 else 2)
    assert machine_rate.matmul_rate(CPU, torch.float32, 64) == (5e10, True)
    assert len(calls) == measured
    assert machine_rate.matmul_rate(CPU, torch.float32, 128) == (5e10, False)  # another width, another figure
    stored = json.loads((tmp_path / "machine_rates.json").read_text())
    assert len(stored) == 2 and all(torch.__version__ in key and "float32" in key for key in stored)


def test_threads_that_wait_on_each_other_are_held_to_what_one_thread_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE_DIR", str(tmp_path))
    # as measured on a busy machine: two threads slower than one
    monkeypatch.setattr(machine_rate, "measure_matmul",
                        lambda *args: 3e10 if torch.get_num_threads() == 1 else 1e10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert machine_rate.matmul_rate(CPU, torch.float32, 64) == (3e10, False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damage", ['{"matmul 1024x', "[1, 2]", None])
def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TAILOR_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(machine_rate, "measure_small_pass", lambda *args: calls.append(args) or 2e-5)
    key = f"small pass | {machine_rate.machine_facts(CPU, torch.float32)}"
    text = damage if damage is not None else json.dumps({key: "fast"})  # a figure that is not a number
    (tmp_path / "machine_rates.json").write_text(text, encoding="utf-8")
    assert machine_rate.pass_seconds(CPU, torch.float32) == (2e-5, False)
    assert json.loads((tmp_path / "machine_rates.json").read_text()) == {key: 2e-5}
    measured = len(calls)
    assert machine_rate.pass_seconds(CPU, torch.float32) == (2e-5, True) and len(calls) == measured


def test_a_cache_that_cannot_be_written_only_costs_a_measurement(tmp_path, monkeypatch):
    blocked = write(tmp_path / "a-file", "not a folder")
    monkeypatch.setenv("TAILOR_CACHE_DIR", str(blocked))
    monkeypatch.setattr(machine_rate, "measure_update", lambda device: 3e-9)
    assert machine_rate.update_seconds(CPU) == (3e-9, False)
    assert machine_rate.update_seconds(CPU) == (3e-9, False)


# Measured against the estimate: 24 steps of the tiny model on one thread (two threads on a shared machine
# wait on each other for every small product, which made the same steps 20x slower here). The tiny model is
# launch-bound, so this checks the per-pass floor more than the FLOP count; other load on the machine slows
# the training and the benchmarks unequally, so the bound is a factor of 4 either way, not a tolerance.
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_the_estimate_is_within_a_factor_of_4_of_a_measured_tiny_training(tiny_tokenizer, method):
    from tailorlm.models.methods import make_strategy
    from tailorlm.train.loop import Hooks, train

    spec = MethodSpec(name=method, freeze={"first_blocks": 2})
    cfg = RunConfig(method=spec, train=TrainSpec(max_steps=24, batch_size=8, eval_every=0, warmup_ratio=0))
    samples = _prompted(tiny_tokenizer, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_llama(len(tiny_tokenizer), layers=4)
        shape = shape_from_config(model.config.to_dict(), sum(p.numel() for p in model.parameters()))
        estimate = cost.estimate_training(cfg, shape, samples, 24 * 8 / len(samples), CPU)
        strategy = make_strategy(spec)
        model = strategy.prepare(model)
        result = train(model, strategy, samples, cfg.train, 1e-3, tiny_tokenizer.pad_token_id, CPU, Hooks())
    finally:
        torch.set_num_threads(threads)
    ratio = result.step_seconds / estimate.seconds
    assert 1 / 4 < ratio < 4, f"{method}: measured {result.step_seconds:.2f} s, estimated {estimate.seconds:.2f} s"
