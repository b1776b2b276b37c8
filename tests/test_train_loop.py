import math

import pytest
import torch
from conftest import tiny_llama

from tailorlm.config import MethodSpec, TrainSpec
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.models.methods import make_strategy
from tailorlm.train.loop import Hooks, plan_steps, train
from tailorlm.train.optim import make_optimizer, make_schedule
from tailorlm.train.step import StepContext, accumulate_gradients, validation_loss


def memorize_samples(tokenizer, n: int = 8) -> list[Sample]:
    samples = []
    for i in range(n):
        prompt = tokenizer(f"<|im_start|>user\nthe film {i}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(("positive" if i % 2 else "negative") + "<|im_end|>", add_special_tokens=False)["input_ids"]
        samples.append(Sample(prompt + answer, [IGNORE] * len(prompt) + answer, {}))
    return samples


def val_loss_hook(samples, batch_size=4):
    return lambda model, ctx, step: {"val_loss": validation_loss(model, samples, batch_size, ctx)}


def run(tokenizer, spec: TrainSpec, method="full", lr=1e-2, n=8, hooks=None):
    model = tiny_llama(len(tokenizer), seed=0)
    strategy = make_strategy(MethodSpec(name=method))
    model = strategy.prepare(model)
    hooks = hooks or Hooks(evaluate=val_loss_hook(memorize_samples(tokenizer, 4)))
    result = train(model, strategy, memorize_samples(tokenizer, n), spec, lr, tokenizer.pad_token_id,
                   torch.device("cpu"), hooks)
    return model, result


def test_loss_falls(tiny_tokenizer):
    model, result = run(tiny_tokenizer, TrainSpec(max_steps=30, batch_size=4, eval_every=10, warmup_ratio=0))
    losses = [r["loss"] for r in result.train_loss]
    assert losses[-1] < 0.5 * losses[0]
    assert [r["step"] for r in result.val_loss] == [0, 10, 20, 30]
    assert result.val_loss[-1]["loss"] < result.val_loss[0]["loss"]
    assert result.tokens > 0


def test_time_counts_evaluations_in_the_phase_but_not_in_the_steps(tiny_tokenizer):
    import time

    def slow_evaluation(model, ctx, step):
        time.sleep(0.3)
        return {"val_loss": 1.0}
    _, result = run(tiny_tokenizer, TrainSpec(max_steps=4, batch_size=4, eval_every=2),
                    hooks=Hooks(evaluate=slow_evaluation))
    assert [e["step"] for e in result.evaluations] == [0, 2, 4]  # the first and the last are in the phase too
    assert result.seconds - result.step_seconds >= 3 * 0.3
    assert 0 < result.step_seconds < result.seconds


def test_a_time_limit_ends_training_at_a_step_evaluated_as_the_last(tiny_tokenizer):
    import time

    def slow_evaluation(model, ctx, step):
        time.sleep(0.2)
        return {"val_loss": 1.0}
    # the step-0 evaluation alone takes longer than the limit: the first step is the last
    _, result = run(tiny_tokenizer, TrainSpec(max_steps=50, batch_size=4, eval_every=20, max_seconds=0.1),
                    hooks=Hooks(evaluate=slow_evaluation))
    assert result.completed == 1 and result.stopped_early and result.steps == 50
    assert [e["step"] for e in result.evaluations] == [0, 1]  # evaluated where it stopped
    assert result.events == [{"step": 1, "event": "time limit: stopped at step 1 after 0.1 s (train.max_seconds)"}]


def test_every_evaluation_prints_one_line_and_marks_the_best_step(tiny_tokenizer, capsys):
    values = iter([3.0, 2.0, 2.5, 1.0])
    hooks = Hooks(evaluate=lambda model, ctx, step: {"val_loss": next(values)},
                  describe=lambda metrics: f"val_loss {metrics['val_loss']:.1f}")
    run(tiny_tokenizer, TrainSpec(max_steps=6, batch_size=4, eval_every=2), hooks=hooks)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 0/6: val_loss 3.0  (base model)", "step 2/6: val_loss 2.0  (best so far by val_loss)",
                       "step 4/6: val_loss 2.5", "step 6/6: val_loss 1.0  (best so far by val_loss)"]
    # without the base model's evaluation (a tailor auto trial): the first is at step 2
    values = iter([2.0, 2.5, 1.0])
    run(tiny_tokenizer, TrainSpec(max_steps=6, batch_size=4, eval_every=2, eval_at_start=False), hooks=hooks)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed[0] == "step 2/6: val_loss 2.0  (best so far by val_loss)" and len(printed) == 3
    # on a task metric, a checkpoint kept by a tie says so
    from tailorlm.config import SelectSpec

    values = iter([(0.9, 2.0), (0.875, 1.5), (0.9, 1.8)])
    hooks = Hooks(evaluate=lambda model, ctx, step: dict(zip(("t/accuracy", "val_loss"), next(values))),
                  describe=lambda metrics: f"accuracy {metrics['t/accuracy']}",
                  select=SelectSpec(metric="t/accuracy", min_delta=0.025))
    run(tiny_tokenizer, TrainSpec(max_steps=6, batch_size=4, eval_every=2, eval_at_start=False), hooks=hooks)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 2/6: accuracy 0.9  (best so far by t/accuracy)",
                       "step 4/6: accuracy 0.875  (kept: t/accuracy level with the best within 0.025, and a lower "
                       "val_loss)", "step 6/6: accuracy 0.9"]


def test_an_evaluation_without_a_describer_prints_its_numbers(tiny_tokenizer, capsys):
    hooks = Hooks(evaluate=lambda model, ctx, step: {"val_loss": 0.5, "accuracy": 0.25, "note": "x"})
    run(tiny_tokenizer, TrainSpec(max_steps=2, batch_size=4, eval_every=2), hooks=hooks)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 0/2: val_loss 0.5, accuracy 0.25  (base model)",
                       "step 2/2: val_loss 0.5, accuracy 0.25  (best so far by val_loss)"]


def cpu(tokenizer, packing: bool = True) -> StepContext:
    return StepContext(tokenizer.pad_token_id, torch.device("cpu"), packing=packing)


def training_forward(model):
    """What the loop passes as forward (Wrapped.forward on one process): fn(model, shared_prefix)."""
    return lambda fn: fn(model, True)


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_equals_the_big_batch(tiny_tokenizer, packing):
    samples = memorize_samples(tiny_tokenizer, 6)
    model = tiny_llama(len(tiny_tokenizer))
    big_loss, _ = accumulate_gradients(training_forward(model), [samples], cpu(tiny_tokenizer, packing))
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # Uneven micro-batches: a mean per micro-batch would weight these samples wrongly.
    small_loss, _ = accumulate_gradients(training_forward(model), [samples[:1], samples[1:4], samples[4:]], cpu(tiny_tokenizer, packing))
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name, p in model.named_parameters():
        # Micro-batches sum the same terms in another order: float32 rounding of about 1e-7 of the tensor's
        # largest entry, which a plain atol of 1e-8 calls a mismatch on entries near zero.
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_token_budget_regroups_a_step_into_fuller_micro_batches(tiny_tokenizer):
    """train.micro_batch_tokens: 3 micro-batches become packs of up to 72 tokens, with the same update."""
    from tailorlm.train.step import regroup

    samples = memorize_samples(tiny_tokenizer, 6)
    group = [samples[:1], samples[1:4], samples[4:]]
    assert [len(s) for s in samples] == [24] * 6
    assert regroup(group, 72) == [samples[:3], samples[3:]]  # same samples, same order, up to 72 tokens each
    assert regroup(group, 1) == [[s] for s in samples]  # a sample over the budget goes alone

    model = tiny_llama(len(tiny_tokenizer))
    ctx = cpu(tiny_tokenizer)
    calls = []
    real_batch = ctx.batch
    ctx.batch = lambda s: calls.append(len(s)) or real_batch(s)
    plain_loss, _ = accumulate_gradients(training_forward(model), group, ctx)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls.clear()
    ctx.token_budget = 10_000
    fused_loss, _ = accumulate_gradients(training_forward(model), group, ctx)
    assert calls == [6]  # one packed micro-batch instead of three
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, p in model.named_parameters():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_same_seed_same_weights(tiny_tokenizer):
    a, _ = run(tiny_tokenizer, TrainSpec(max_steps=4, batch_size=2, eval_every=0, seed=5))
    b, _ = run(tiny_tokenizer, TrainSpec(max_steps=4, batch_size=2, eval_every=0, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_an_objective_is_one_class_the_loop_calls_through_its_interface(tiny_tokenizer):
    """SFT is an objective like the others: a subclass of it changes training through the interface alone,
    with no branch in the loop, and SFT named explicitly is the default bit for bit."""
    from tailorlm.train.objectives import TokenLoss

    calls = {"begin_step": 0, "units": 0, "loss": 0}

    class Counted(TokenLoss):
        def begin_step(self, group, run, ctx):
            calls["begin_step"] += 1
            assert len(group) == 2  # the step's micro-batches (grad_accum)

        def units(self, items):
            calls["units"] += 1
            return super().units(items)

        def loss(self, forward, batch, items):
            calls["loss"] += 1
            return super().loss(forward, batch, items)

    spec = TrainSpec(max_steps=3, batch_size=2, grad_accum=2, eval_every=0, seed=3)

    def trained(objective):
        model = tiny_llama(len(tiny_tokenizer), seed=0)
        strategy = make_strategy(MethodSpec(name="full"))
        model = strategy.prepare(model)
        train(model, strategy, memorize_samples(tiny_tokenizer), spec, 1e-2, tiny_tokenizer.pad_token_id,
              torch.device("cpu"), Hooks(), objective=objective)
        return model

    counted, default = trained(Counted()), trained(None)
    assert calls == {"begin_step": 3, "units": 3, "loss": 6}
    assert all(torch.equal(x, y) for x, y in zip(counted.parameters(), default.parameters()))


def test_non_finite_loss_stops_with_a_message(tiny_tokenizer):
    from tailorlm.errors import TailorError

    with pytest.raises(TailorError, match="the training loss became nan at step 1; lower train.lr or check the data$"):
        model = tiny_llama(len(tiny_tokenizer))
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        strategy = make_strategy(MethodSpec(name="full"))
        train(model, strategy, memorize_samples(tiny_tokenizer), TrainSpec(max_steps=2, eval_every=0), 1e-3,
              tiny_tokenizer.pad_token_id, torch.device("cpu"))


def test_schedule_warms_up_then_decays():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    spec = TrainSpec(warmup_ratio=0.1, schedule="cosine")
    optimizer = make_optimizer([{"params": [param], "lr": 1.0}], spec)
    schedule = make_schedule(optimizer, spec, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1.0)
    assert lrs[50] < lrs[10] and lrs[99] < 0.01
    assert plan_steps(10, TrainSpec(batch_size=4, grad_accum=2, epochs=3)) == (2, 6)


def warmup_then(schedule: str, warmup: int, total: int, step: int) -> float:
    """The schedule's factor written out: warmup (step+1)/(warmup+1), so the first step does not run at lr 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup_ratio", "total"), [(0.0, 7), (0.05, 40), (0.1, 100), (0.4, 12), (0.3, 1)])
def test_each_schedule_gives_every_group_its_own_lr_times_the_written_out_factor(schedule, warmup_ratio, total):
    """Three groups with their own lrs (as gradual unfreezing has), through the step after the last. Cosine and
    constant match the written-out factor exactly; linear computes its decay as (total - step) / span, not
    1 - progress, so it can be one rounding apart: within 1e-15."""
    spec = TrainSpec(warmup_ratio=warmup_ratio, schedule=schedule)
    base = [1e-3, 3e-4, 5e-5]
    optimizer = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": lr} for lr in base], spec)
    sched = make_schedule(optimizer, spec, total_steps=total)
    warmup = int(round(warmup_ratio * total))
    for step in range(total + 1):
        expected, factor = warmup_then(schedule, warmup, total, step), sched.lr_lambdas[0](step)
        if schedule == "linear":
            assert abs(factor - expected) <= 1e-15
        else:
            assert factor == expected
        assert sched.get_last_lr() == [g["lr"] for g in optimizer.param_groups] == [lr * factor for lr in base]
        optimizer.step()
        sched.step()
    assert [g["initial_lr"] for g in optimizer.param_groups] == base


def test_a_schedule_restored_from_a_checkpoint_goes_on_where_it_stopped(tmp_path):
    from tailorlm.train.checkpoint import _read_trainer, save_trainer

    spec = TrainSpec(warmup_ratio=0.2, schedule="cosine")

    def fresh():
        groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": lr} for lr in (1e-3, 2e-4)]
        optimizer = make_optimizer(groups, spec)
        return optimizer, make_schedule(optimizer, spec, total_steps=20)

    optimizer, sched = fresh()
    for _ in range(7):
        optimizer.step()
        sched.step()
    save_trainer({"schedule": sched.state_dict()}, tmp_path / "trainer.safetensors")
    resumed_optimizer, resumed = fresh()
    resumed.load_state_dict(_read_trainer(tmp_path)["schedule"])
    for _ in range(13):
        for o, s in ((optimizer, sched), (resumed_optimizer, resumed)):
            o.step()
            s.step()
        assert resumed.get_last_lr() == sched.get_last_lr()
        assert [g["lr"] for g in resumed_optimizer.param_groups] == sched.get_last_lr()


def test_validation_loss_is_mean_per_completion_token(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    samples = memorize_samples(tiny_tokenizer, 4)
    whole = validation_loss(model, samples, 4, cpu(tiny_tokenizer))
    pieces = validation_loss(model, samples, 1, cpu(tiny_tokenizer))
    padded = validation_loss(model, samples, 4, cpu(tiny_tokenizer, packing=False))
    assert whole == pytest.approx(pieces, rel=1e-5)
    assert whole == pytest.approx(padded, rel=1e-5)


def test_packed_and_padded_training_reach_the_same_weights(tiny_tokenizer):
    packed, _ = run(tiny_tokenizer, TrainSpec(max_steps=3, batch_size=4, eval_every=0, packing="on"))
    padded, _ = run(tiny_tokenizer, TrainSpec(max_steps=3, batch_size=4, eval_every=0, packing="off"))
    # Equal up to float rounding; Adam turns a rounding-size gradient on an unused row into a ~1e-5 step.
    for (name, a), b in zip(packed.named_parameters(), padded.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_activation_checkpointing_changes_nothing_but_memory(tiny_tokenizer):
    """Recomputed layers (in backward) must take the same packed-attention path as the forward did."""
    plain, _ = run(tiny_tokenizer, TrainSpec(max_steps=2, batch_size=4, eval_every=0, packing="on"))
    recomputed, _ = run(tiny_tokenizer, TrainSpec(max_steps=2, batch_size=4, eval_every=0, packing="on",
                                                  gradient_checkpointing=True))
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_fast_training_leaves_the_model_as_it_found_it():
    """Evaluation and export after training must see the plain model: attention, compile, checkpointing."""
    from tailorlm.kernels.fused import decoder_layers
    from tailorlm.train.step import fast_training

    model = make_strategy(MethodSpec(name="lora")).prepare(tiny_llama(400))
    before = model.config._attn_implementation
    spec = TrainSpec(packing="on", compile="on", gradient_checkpointing=True)
    with fast_training(model, spec, 3, torch.device("cpu")) as ctx:
        assert ctx.packing and model.config._attn_implementation == "tailor_packed"
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
        assert model.get_base_model().is_gradient_checkpointing
        with ctx.eager():  # generation mid-training: the library's attention (padded, KV cache), eager layers
            assert model.config._attn_implementation == before
            assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
        assert model.config._attn_implementation == "tailor_packed"
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert model.config._attn_implementation == before
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert not model.get_base_model().is_gradient_checkpointing


def test_auto_compiles_lora_on_cuda_and_full_fine_tuning_only_when_the_run_is_long_enough():
    from tailorlm.train.loop import planned_tokens
    from tailorlm.train.step import COMPILE_FULL_AFTER_TOKENS as AFTER, compiles

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    lora = make_strategy(MethodSpec(name="lora")).prepare(tiny_llama(400))
    full = make_strategy(MethodSpec(name="full")).prepare(tiny_llama(400))
    auto = TrainSpec()
    assert compiles(lora, auto, cuda, 1) and not compiles(lora, auto, cpu, 10**6)
    assert not compiles(full, auto, cuda, AFTER - 1) and compiles(full, auto, cuda, AFTER)
    # tokens, whatever the micro-batches: 10 samples of 300 tokens, batches of 4 -> 3 steps an epoch; 2.5 epochs
    samples = [Sample(list(range(300)), list(range(300)), {}) for _ in range(10)]
    assert planned_tokens(samples, TrainSpec(batch_size=4, epochs=2)) == 6000
    assert planned_tokens(samples, TrainSpec(batch_size=4, max_steps=7)) == 7000
    assert compiles(full, TrainSpec(compile="on"), cpu, 1) and not compiles(lora, TrainSpec(compile="off"), cuda, 10**6)
