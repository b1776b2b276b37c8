"""GRPO in the one loop: the loss of one group checked by hand for each variant, the reward rising on a tiny model
that can learn it, resume exact with sampling, and rewards that are the task's own metrics (code only with
--allow-code)."""
import math

import pytest
import torch
from conftest import labeled_csv, tiny_llama, write

from tailorlm.config import GRPOSpec, MethodSpec, ObjectiveSpec, RewardTerm, TrainSpec, load_config
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.errors import ConfigError, TailorError
from tailorlm.eval.rollouts import sample_answers
from tailorlm.models.methods import make_strategy
from tailorlm.train.grpo import STD_EPS, GRPO, Rollout
from tailorlm.train.loop import Hooks, train
from tailorlm.train.step import StepContext


class FixedSampler:
    """Stands in for eval/rollouts.py: the same answers and rewards for every prompt."""
    max_new_tokens = 5

    def __init__(self, completions, rewards):
        self.completions, self.rewards = completions, rewards

    def __call__(self, model, items):
        return [Rollout([list(c) for c in self.completions], list(self.rewards)) for _ in items]


def objective(loss: str, sampler, beta: float | None = None) -> GRPO:
    spec = ObjectiveSpec(name="grpo", beta=beta, grpo=GRPOSpec(group_size=len(sampler.rewards), loss=loss))
    return GRPO(spec, sampler)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_one_groups_loss_and_gradient_match_a_hand_computation(loss):
    rewards = [1.0, 0.0, 0.0, 1.0]
    sampler = FixedSampler([[5, 6, 2], [7, 2], [8, 9, 10, 2], [11, 2]], rewards)
    grpo = objective(loss, sampler)
    prompt = Sample([1, 4, 4], [IGNORE] * 3, {})
    grpo.begin_step([[prompt]], lambda fn: fn(torch.nn.Identity()), StepContext(0, torch.device("cpu")))
    r = torch.tensor(rewards, dtype=torch.float64)
    expected_a = (r - r.mean()) if loss == "dr_grpo" else (r - r.mean()) / (r.std() + STD_EPS)
    assert grpo.groups[id(prompt)].advantages == pytest.approx(expected_a.tolist())
    seqs = grpo.sequences([prompt])
    assert [s.labels for s in seqs][0] == [IGNORE] * 3 + [5, 6, 2]  # the prompt carries no loss
    lengths = [3, 2, 4, 2]
    assert grpo.units([prompt]) == {"grpo": 4, "dr_grpo": 4 * 5, "dapo": sum(lengths)}[loss]
    assert grpo.figures()["flat_groups"] == 0 and grpo.figures()["reward"] == pytest.approx(0.5)

    # per-token log-probs of the answers, one answer after the other
    logps = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.2, -3.0, -1.0, -0.7, -2.5, -0.1, -0.4], requires_grad=True)
    sample = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    total = grpo.token_losses(logps, sample, expected_a.float(), None)
    # ratio = 1 at the update: the loss is -A per token, averaged per answer (grpo) or summed (others)
    a_token = expected_a[sample]
    by_hand = sum(-a for a in expected_a.tolist()) if loss == "grpo" else float(-a_token.sum())
    assert float(total) == pytest.approx(by_hand, abs=1e-6)
    total.backward()
    per_answer = [1 / n for n in lengths] if loss == "grpo" else [1.0] * 4
    assert logps.grad.tolist() == pytest.approx([-float(expected_a[s]) * per_answer[s] for s in sample.tolist()],
                                                abs=1e-6)


def test_the_ratio_is_clipped_and_the_kl_term_is_k3():
    sampler = FixedSampler([[5, 2], [6, 2]], [1.0, 0.0])
    grpo = objective("dapo", sampler)
    # a later update of a group (num_iterations): the answer's probability rose 1.5x since it was sampled, so a
    # positive advantage is clipped at 1 + clip (no gradient), a negative one is not
    sampling = [[-1.0]]
    logps = torch.tensor([-1.0 + math.log(1.5)], requires_grad=True)
    up = grpo.token_losses(logps, torch.tensor([0]), torch.tensor([2.0]), None, sampling)
    assert float(up) == pytest.approx(-1.2 * 2.0)
    up.backward()
    assert logps.grad.tolist() == [0.0]
    logps.grad = None
    down = grpo.token_losses(logps, torch.tensor([0]), torch.tensor([-2.0]), None, sampling)
    assert float(down) == pytest.approx(1.5 * 2.0)
    down.backward()
    assert logps.grad.tolist() == pytest.approx([1.5 * 2.0])
    # clip_high (DAPO's clip-higher) lets a rising answer go further
    high = GRPO(ObjectiveSpec(name="grpo", grpo=GRPOSpec(group_size=2, loss="dapo", clip_high=0.28)), sampler)
    assert float(high.token_losses(logps.detach(), torch.tensor([0]), torch.tensor([2.0]), None, sampling)) == \
        pytest.approx(-1.28 * 2.0)
    # the KL term against the starting model's log-prob: exp(ref - logp) - (ref - logp) - 1, times beta
    kl = objective("dapo", sampler, beta=0.5)
    total = kl.token_losses(torch.tensor([-1.0, -2.0]), torch.tensor([0, 1]), torch.tensor([0.0, 0.0]),
                            [[-1.5], [-2.0]])
    gap = -1.5 - -1.0
    assert float(total) == pytest.approx(0.5 * (math.exp(gap) - gap - 1))


def test_num_iterations_trains_each_group_that_many_steps_on_the_same_answers(tiny_tokenizer, tmp_path):
    result, sampler = grpo_run(tiny_tokenizer, 6, tmp_path / "mu", iterations=3, with_sampler=True)
    assert sampler.calls == 2  # two groups of 4 prompts, one micro-batch each
    rewards = [r["reward"] for r in result.train_loss]
    assert rewards[0] == rewards[1] == rewards[2] and rewards[3] == rewards[4] == rewards[5]  # one group, 3 steps
    assert [r["sampling_seconds"] > 0 for r in result.train_loss] == [True, False, False] * 2
    # checkpoint_every=1, the last two kept: saved only between groups
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "mu").iterdir() if p.name.startswith("step-")) == [3, 6]


def test_a_flat_group_teaches_nothing():
    sampler = FixedSampler([[5, 2], [6, 2], [7, 2]], [1.0, 1.0, 1.0])
    grpo = objective("grpo", sampler)
    prompt = Sample([1, 4], [IGNORE] * 2, {})
    grpo.begin_step([[prompt]], lambda fn: fn(torch.nn.Identity()), StepContext(0, torch.device("cpu")))
    assert grpo.groups[id(prompt)].advantages == [0.0, 0.0, 0.0]
    assert grpo.figures()["flat_groups"] == 1.0 and grpo.figures()["reward_spread"] == 0.0


class TokenShareSampler:
    """Samples from the model itself and rewards the share of answer tokens below half the vocabulary: a reward
    a tiny random model starts near 0.5 on and can learn."""
    max_new_tokens = 4

    def __init__(self, tokenizer, group: int, interrupt_at: int | None = None):
        self.tokenizer, self.group, self.interrupt_at, self.calls = tokenizer, group, interrupt_at, 0

    def __call__(self, model, items):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C as this step starts: its checkpoint is the step before
        answers = sample_answers(model, self.tokenizer, [s.prompt_ids for s in items], self.group, 1.0,
                                 self.max_new_tokens, 8, torch.device("cpu"))
        half = len(self.tokenizer) // 2
        return [Rollout(group, [sum(t < half for t in a) / max(len(a), 1) for a in group]) for group in answers]


def prompts(tokenizer, n: int = 8) -> list[Sample]:
    out = []
    for i in range(n):
        ids = tokenizer(f"<|im_start|>user\nsay something {i}<|im_end|>\n<|im_start|>assistant\n",
                        add_special_tokens=False)["input_ids"]
        out.append(Sample(ids + [2], [IGNORE] * len(ids) + [2], {}))
    return out


def grpo_run(tokenizer, steps: int, out=None, resume=None, iterations: int = 1, interrupt_at=None,
             with_sampler: bool = False):
    from tailorlm.train.checkpoint import CheckpointStore

    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer), seed=0)
    strategy = make_strategy(MethodSpec(name="full"))
    model = strategy.prepare(model)
    spec = ObjectiveSpec(name="grpo", grpo=GRPOSpec(group_size=6, loss="dapo", num_iterations=iterations))
    hooks = Hooks(checkpoints=CheckpointStore(out, 2)) if out else None
    result = train(model, strategy, prompts(tokenizer), TrainSpec(max_steps=steps, batch_size=4, warmup_ratio=0,
                                                                   checkpoint_every=1, eval_every=0),
                   3e-2, tokenizer.pad_token_id, torch.device("cpu"), hooks, resume,
                   GRPO(spec, sampler := TokenShareSampler(tokenizer, 6, interrupt_at)))
    return (result, sampler) if with_sampler else result


def test_the_reward_rises_on_a_task_the_model_can_learn(tiny_tokenizer):
    result = grpo_run(tiny_tokenizer, 24)
    rewards = [r["reward"] for r in result.train_loss]
    assert {"reward", "reward_spread", "flat_groups", "answer_tokens", "sampling_seconds"} <= set(result.train_loss[0])
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.7 and last > first + 0.2, rewards


def test_a_resumed_grpo_run_samples_and_ends_as_one_that_never_stopped(tiny_tokenizer, tmp_path):
    whole = grpo_run(tiny_tokenizer, 6, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # stopped as step 5 samples (one micro-batch per step)
        grpo_run(tiny_tokenizer, 6, tmp_path / "cut", interrupt_at=5)
    resumed = grpo_run(tiny_tokenizer, 6, tmp_path / "cut", resume=tmp_path / "cut" / "step-00000004")
    assert [r["reward"] for r in resumed.train_loss] == [r["reward"] for r in whole.train_loss]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_rewards_are_the_tasks_metrics_of_each_answer(tiny_tokenizer):
    from tailorlm.eval.rollouts import _term_scorer

    class Evaluator:  # what the reward terms read of the evaluator
        def __init__(self, task, labels=()):
            self.task, self.labels = task, list(labels)

    from tailorlm.tasks.classification import TASK as CLASSIFY
    from tailorlm.tasks.ner import TASK as NER
    from tailorlm.tasks.translation import TASK as TRANSLATE

    label = _term_scorer(RewardTerm(metric="accuracy"), Evaluator(CLASSIFY, ["negative", "positive"]), False)
    assert [label(t, True, {"label": "positive"}) for t in ("positive", "negative", "no idea")] == [1.0, 0.0, 0.0]
    parses = _term_scorer(RewardTerm(format=0.2), Evaluator(CLASSIFY, ["negative", "positive"]), False)
    assert [parses(t, True, {"label": "positive"}) for t in ("negative", "no idea")] == [1.0, 0.0]
    sentence = {"tokens": ["Bieber", "was", "in", "LA"], "tags": ["B-person", "O", "O", "B-location"],
                "entities": [{"type": "person", "text": "Bieber"}, {"type": "location", "text": "LA"}]}
    entities = _term_scorer(RewardTerm(metric="f1"), Evaluator(NER, ["person", "location"]), False)
    assert entities("[Bieber | person] was in LA", True, sentence) == pytest.approx(2 / 3)
    empty = {"tokens": ["nothing", "here"], "tags": ["O", "O"], "entities": []}
    assert entities("nothing here", True, empty) == 1.0  # nothing to find, nothing claimed
    chrf = _term_scorer(RewardTerm(metric="chrf"), Evaluator(TRANSLATE), False)
    assert chrf("ein Haus", True, {"source": "a house", "target": "ein Haus"}) == pytest.approx(1.0)
    with pytest.raises(TailorError, match="metric 'bleu' is not one the classification task measures"):
        _term_scorer(RewardTerm(metric="bleu"), Evaluator(CLASSIFY, ["a", "b"]), False)


def test_a_reward_function_runs_only_with_allow_code(tmp_path):
    from tailorlm.eval.rollouts import _term_scorer
    from tailorlm.tasks.classification import TASK

    code = write(tmp_path / "rewards.py", "def short(completion, example):\n    return 1.0 / (1 + len(completion))\n")
    config = write(tmp_path / "grpo.yaml", f"objective:\n  name: grpo\n  grpo:\n    reward:\n      - metric: accuracy\n"
                                           f"      - function: {code}:short\n        weight: 0.5\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert f"objective.grpo.reward[1].function (line 6): {code}:short is Python code, which a config cannot run by " \
           f"itself. If you trust that code, add --allow-code to the command (allow_code=True in Python)" in str(refused.value)
    cfg = load_config(config, allow_code=True)
    term = cfg.objective.grpo.reward[1]
    assert (term.label, term.scale) == ("short", 0.5)

    class Evaluator:
        task, labels = TASK, ["a", "b"]

    assert _term_scorer(term, Evaluator(), cfg.objective._code_allowed)("abc", True, {}) == 0.25
    with pytest.raises(TailorError, match="add --allow-code to the command"):
        _term_scorer(term, Evaluator(), False)  # a config built in Python is checked again where the code loads


def test_tailor_run_trains_grpo_on_a_table_and_logs_its_rewards(tmp_path, tiny_model_dir):
    import json

    from tailorlm.cli import main

    data = labeled_csv(tmp_path / "reviews.csv", 6)
    out = tmp_path / "run"
    assert main(["run", f"data.train={data}", f"model.path={tiny_model_dir}", "objective.name=grpo",
                 "objective.grpo.group_size=2", "objective.grpo.max_new_tokens=4", "train.max_steps=2",
                 "train.batch_size=2", "train.eval_every=0", "eval.baselines=[]", "eval.classic=false",
                 "eval.retention.data=null", "template.max_length=96", "--output", str(out)]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log["train_loss"]] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 and "reward/accuracy" in r for r in log["train_loss"])
    assert "classification/accuracy" in log["evaluations"][-1]  # the task's metric chose the checkpoint
    report = (out / "report.md").read_text()
    assert "## Rewards of the sampled answers (GRPO)" in report and "| groups that taught nothing |" in report
    assert "| reward/accuracy |" in report and "Sampling took " in report


def test_the_grpo_example_is_a_valid_config_that_rewards_entity_f1():
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "examples" / "wnut17_grpo.yaml")
    assert cfg.objective.reinforcement and [t.label for t in cfg.objective.grpo.reward] == ["f1", "format"]
    assert cfg.template.preset == "ner" and cfg.model.path == "runs/wnut17-sft"


@pytest.mark.parametrize("packing", [False, True])
def test_the_stored_log_probs_of_the_sampling_weights_line_up_with_the_trained_ones(tiny_tokenizer, packing):
    """num_iterations > 1 stores each answer token's log-prob as sampled; at the first update the weights are the
    same, so the ratio is 1 token by token, in padded and packed batches alike, at temperature 0.7 too."""
    torch.manual_seed(0)
    model = tiny_llama(len(tiny_tokenizer), seed=0)
    spec = ObjectiveSpec(name="grpo", grpo=GRPOSpec(group_size=4, loss="dapo", num_iterations=2, temperature=0.7))
    grpo = GRPO(spec, TokenShareSampler(tiny_tokenizer, 4))
    ctx = StepContext(tiny_tokenizer.pad_token_id, torch.device("cpu"), packing=packing)
    items = prompts(tiny_tokenizer, 3)
    grpo.begin_step([items], lambda fn: fn(model), ctx)
    batch = ctx.batch(grpo.sequences(items))
    stored = grpo.token_losses  # the loss with the stored sampling log-probs, and with the ratio fixed at 1
    from tailorlm.kernels.loss import completion_token_logps

    logps, sample, _ = completion_token_logps(model, batch, True, 0.7)
    groups = [grpo.groups[id(it)] for it in items]
    advantages = torch.tensor([a for g in groups for a in g.advantages])
    with_sampling = stored(logps, sample, advantages, None, [r for g in groups for r in g.sampling])
    at_one = stored(logps, sample, advantages, None, None)
    assert float(with_sampling) == pytest.approx(float(at_one), abs=1e-5)
    assert len([x for g in groups for r in g.sampling for x in r]) == logps.numel()


def test_sampling_ignores_the_models_own_generation_filters(tiny_tokenizer):
    """A model file's generation_config (top_k, no-repeat n-grams...) would sample another distribution than the
    one the loss scores: the sampler sets each to the value that leaves the distribution alone."""
    torch.manual_seed(0)
    model = tiny_llama(len(tiny_tokenizer), seed=0)
    model.generation_config.top_k = 1  # greedy, if it were used: every answer the same
    model.generation_config.no_repeat_ngram_size = 1  # no token twice, if it were used
    prompt = prompts(tiny_tokenizer, 1)[0].prompt_ids
    answers = sample_answers(model, tiny_tokenizer, [prompt], 24, 1.0, 12, 1, torch.device("cpu"))[0]
    assert len({tuple(a) for a in answers}) > 12
    assert any(len(set(prompt + a)) < len(prompt + a) for a in answers)


def test_settings_grpo_cannot_honour_are_refused_before_loading(tmp_path):
    from tailorlm.pipeline.prepare import grpo_problems

    cfg = load_config(None, ["objective.name=grpo", "objective.beta=0.05", "method.name=full",
                             "objective.grpo.num_iterations=2", "train.eval_every=5", "train.micro_batch_tokens=4096"])
    assert grpo_problems(cfg) == [
        "objective.beta: 0.05 needs method lora or qlora under grpo: the starting model is the base with the adapter "
        "off (full weights would need a second copy); set it to 0 or use LoRA",
        "train.micro_batch_tokens: grpo samples group_size answers per prompt, so a prompt's tokens do not size its "
        "micro-batch; leave it unset (batch_size and grad_accum set the step)",
        "train.eval_every: 5 is not a multiple of objective.grpo.num_iterations (2): evaluations and checkpoints fall "
        "between groups"]
    assert grpo_problems(load_config(None, ["objective.name=grpo", "objective.beta=0.05"])) == []  # LoRA
    with pytest.raises(ConfigError, match="two reward terms are named f1"):
        load_config(None, ["objective.name=grpo", "objective.grpo.reward=[{metric: f1}, {metric: f1, weight: 2}]"])
    with pytest.raises(ConfigError, match="a format term's weight is its value"):
        load_config(None, ["objective.grpo.reward=[{format: 0.2, weight: 3}]"])


def test_a_bad_reward_and_a_cut_off_answer_score_as_they_should(tmp_path):
    from tailorlm.eval.rollouts import _term_scorer
    from tailorlm.tasks.classification import TASK as CLASSIFY
    from tailorlm.tasks.ner import TASK as NER

    class Evaluator:
        def __init__(self, task, labels=()):
            self.task, self.labels = task, list(labels)

    code = write(tmp_path / "bad.py", "def nan(completion, example):\n    return float('nan')\n")
    score = _term_scorer(RewardTerm(function=f"{code}:nan"), Evaluator(CLASSIFY, ["a"]), True)
    with pytest.raises(TailorError, match=f"{code}:nan returned nan for the answer 'x'; a reward is a finite number"):
        score("x", True, {})
    empty = {"tokens": ["nothing", "here"], "tags": ["O", "O"], "entities": []}
    f1 = _term_scorer(RewardTerm(metric="f1"), Evaluator(NER, ["person"]), False)
    assert (f1("nothing here", True, empty), f1("nothing [here", False, empty)) == (1.0, 0.0)


def test_a_finished_runs_config_naming_a_reward_function_is_read_without_running_it(tmp_path):
    from tailorlm.rundir import RunDir

    run = tmp_path / "run"
    write(run / "config.yaml", "objective:\n  name: grpo\n  grpo:\n    reward: {function: r.py:f}\n")
    cfg = RunDir(run).config()  # export, predict and serve read it; none of them runs the reward
    assert cfg.objective.grpo.reward[0].function == "r.py:f" and not cfg.objective._code_allowed
