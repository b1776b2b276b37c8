"""Preference tuning: the readers of every pair format, the encoding, each objective's loss against its formula,
exact accumulation, references stored with checkpoints, model.path naming a run, and `tailor pairs`."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tailorlm.cli import main
from tailorlm.config import MethodSpec, ObjectiveSpec, TemplateSpec, TrainSpec, load_config
from tailorlm.data.dataset import load_splits
from tailorlm.data.samples import IGNORE, Preference, Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_preference_examples
from tailorlm.errors import DataError, TailorError
from tailorlm.kernels.loss import per_sample_loss, sequence_logps
from tailorlm.kernels.packing import pack
from tailorlm.data.batching import collate
from tailorlm.models.methods import make_strategy
from tailorlm.train.checkpoint import CheckpointStore, load_trainer
from tailorlm.train.loop import Hooks, train
from tailorlm.train.objectives import make_objective
from tailorlm.train.step import StepContext, accumulate_gradients
from conftest import tiny_llama, trained_weights, write

CPU = torch.device("cpu")


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def splits_of(path: Path, preset: str = "instruction", preference: str = "pairs"):
    cfg = load_config(text=f"data: {{train: {path}, validation: {path}, test: {path}}}\ntemplate: {{preset: {preset}}}")
    template = PromptTemplate(cfg.template)
    return load_splits(cfg.data, template.fields, template.label_field, template.task, preference=preference), template


def test_trl_llamafactory_and_conversational_pairs_become_task_examples(tmp_path):
    trl = jsonl(tmp_path / "trl.jsonl", [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}])
    lf = jsonl(tmp_path / "lf.jsonl", [{"instruction": "Add", "input": "2 2", "chosen": "4", "rejected": "5"}])
    conv = jsonl(tmp_path / "conv.jsonl", [{  # TRL's implicit prompt: the turns both answers share
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}])
    (ex,), _ = splits_of(trl)[0].train, None
    assert (ex["instruction"], ex["input"], ex["output"], ex["_chosen"], ex["_rejected"]) == ("Say hi", "", "hi", "hi", "no")
    ex = splits_of(lf)[0].train[0]
    assert (ex["instruction"], ex["input"], ex["output"], ex["_rejected"]) == ("Add", "2 2", "4", "5")
    ex = splits_of(conv, "chat")[0].train[0]
    assert ex["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ex["_rejected"] == [{"role": "assistant", "content": "Go away."}]
    ex = splits_of(conv)[0].train[0]  # the instruction preset takes a one-turn conversation as text
    assert (ex["instruction"], ex["_chosen"], ex["_rejected"]) == ("Hi", "Hello!", "Go away.")


def test_kto_records_read_label_or_kto_tag(tmp_path):
    path = jsonl(tmp_path / "kto.jsonl", [{"prompt": "Say a", "completion": "a", "label": True},
                                          {"prompt": "Say b", "completion": "c", "kto_tag": False}])
    train = splits_of(path, preference="unpaired")[0].train
    assert [(ex["_chosen"], ex["_desirable"]) for ex in train] == [("a", True), ("c", False)]
    assert "label" not in train[0]  # the label column was the desirability, not a task field


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "x", "output": "y"}, "line 2: not a preference record: a preference objective trains on records "
                                     "with 'chosen' and 'rejected'; found keys: prompt, output"),
    ({"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     "line 2: chosen and rejected must both be text or both be message lists"),
    ({"prompt": "x", "chosen": " ", "rejected": "b"}, "line 2: empty 'chosen' answer"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "line 2: empty 'chosen' answer"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"},
     "line 2: 'prompt' turn 1: expected an object with a 'role' and text 'content', got 'x'"),
    ({"prompt": [{"role": "system", "content": None}, {"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"},
     "line 2: 'prompt' turn 1: expected an object with a 'role' and text 'content', got {'role': 'system', "
     "'content': None}"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "user", "content": "z"}]}, "line 2: 'rejected' must continue the prompt with assistant "
                                                       "turns only"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, row, problem):
    path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        splits_of(path)
    assert str(e.value) == f"{path}, {problem}"


def test_pairs_share_the_prompt_and_carry_the_sft_mask(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}", "chosen": w, "rejected": f"not {w} at all"}
                                        for w in ("a", "b", "c")])
    splits, template = splits_of(path)
    spec = TemplateSpec(preset="instruction")
    fmt = ChatFormat(tiny_tokenizer, spec)
    items, report = encode_preference_examples(splits.train, template, fmt, [], spec, seed=0)
    assert report.kept == len(items) == len(splits.train)
    for item in items:
        assert item.chosen.prompt_ids == item.rejected.prompt_ids
        for sample, text in ((item.chosen, item.example["_chosen"]), (item.rejected, item.example["_rejected"])):
            answer = [t for t in sample.labels if t != IGNORE]
            assert answer == fmt.encode_completion(fmt.completion_text(template.prompt(item.example, []), text))


def test_kto_pairs_each_prompt_with_another_examples_answer(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "k.jsonl", [{"prompt": f"Say {w}", "completion": w * (i + 1), "label": i % 2 == 0}
                                        for i, w in enumerate("abcde")])
    splits, template = splits_of(path, preference="unpaired")
    spec = TemplateSpec(preset="instruction")
    items, _ = encode_preference_examples(splits.train, template, ChatFormat(tiny_tokenizer, spec), [], spec, 0)
    answers = {tuple(it.chosen.input_ids[len(it.chosen.prompt_ids):]) for it in items}
    for item in items:
        mine = item.chosen.input_ids[len(item.chosen.prompt_ids):]
        other = item.rejected.input_ids[len(item.rejected.prompt_ids):]
        assert item.rejected.prompt_ids == item.chosen.prompt_ids and other != mine and tuple(other) in answers
        assert item.desirable == item.example["_desirable"]


def pair_items(n: int = 8, seed: int = 0) -> list[Preference]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = torch.randint(5, 90, (4 + i % 3,), generator=g).tolist()
        good, bad = [7, 8, 9], [10, 11, 12][:2 + i % 2]  # the same preference behind every prompt: it generalises
        items.append(Preference(Sample(prompt + good, [IGNORE] * len(prompt) + good, {}),
                                Sample(prompt + bad, [IGNORE] * len(prompt) + bad, {}), desirable=i % 2 == 0))
    return items


def test_sequence_logps_match_the_token_loss_packed_or_padded(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    samples = [s for it in pair_items(4) for s in (it.chosen, it.rejected)]
    padded = collate(samples, 0)
    with torch.no_grad():
        sums, counts = sequence_logps(model, padded)
        packed_sums, packed_counts = sequence_logps(model, pack(samples))
        losses, tokens = per_sample_loss(model, padded)
    assert torch.allclose(sums, -losses, atol=1e-5) and torch.equal(counts, tokens.float())
    assert torch.allclose(packed_sums[:len(samples)], sums, atol=1e-4)
    assert torch.equal(packed_counts[:len(samples)], counts)


def formula(name: str, pc, pr, rc, rr, nc, nr, beta, good=None, kl=0.0):
    """Each objective's loss from the papers, written independently of objectives.py."""
    sig = lambda x: -F.logsigmoid(torch.tensor(x)).item()  # noqa: E731
    if name == "dpo":
        return sig(beta * ((pc - rc) - (pr - rr)))
    if name == "ipo":
        return (((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return sig(beta * (pc / nc - pr / nr) - 0.5)
    if name == "orpo":
        odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
        return -pc / nc + beta * sig(odds(pc / nc) - odds(pr / nr))
    if name == "kto":
        z = beta * ((pc - rc) - kl)
        return 1 - torch.sigmoid(torch.tensor(z if good else -z)).item()


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_each_objective_computes_its_papers_loss(name):
    spec = ObjectiveSpec(name="dpo" if name == "ipo" else name, loss="ipo" if name == "ipo" else "sigmoid")
    objective = make_objective(spec)
    items = pair_items(4)
    logps = torch.tensor([-3.0, -5.0, -2.5, -1.0, -6.0, -4.0, -2.0, -2.2])
    counts = torch.tensor([3.0, 2.0, 3.0, 3.0, 3.0, 2.0, 3.0, 3.0])
    for i, item in enumerate(items):
        item.reference = [-4.0 + i, -4.5]
    objective.kl = 0.3
    if name == "kto":  # one sequence per answer: its mismatched pair only enters z0
        logps, counts = logps[::2], counts[::2]
    losses, _, _ = objective._losses(logps, counts, items)
    for i, item in enumerate(items):
        j = i if name == "kto" else 2 * i
        pc, nc = logps[j].item(), counts[j].item()
        pr, nr = (logps[2 * i + 1].item(), counts[2 * i + 1].item()) if name != "kto" else (0, 1)
        want = formula(name, pc, pr, *item.reference, nc, nr, spec.strength, item.desirable, kl=0.3)
        assert losses[i].item() == pytest.approx(want, rel=1e-5), (name, i)


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto"])
def test_accumulating_micro_batches_gives_the_one_batch_gradient(tiny_tokenizer, name):
    items = pair_items(6)
    grads = []
    for group in ([items], [items[:2], items[2:3], items[3:]]):
        torch.manual_seed(0)
        model = tiny_llama(len(tiny_tokenizer))
        objective = make_objective(ObjectiveSpec(name=name))
        ctx = StepContext(0, CPU, packing=False)
        objective.attach_references(model, items, ctx, 4)
        objective.begin_step(group, lambda fn: fn(model), ctx)
        forward = lambda fn: fn(model, True)  # noqa: E731
        loss, _ = accumulate_gradients(forward, group, ctx, objective=objective)
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_dpo_starts_at_log_2_learns_and_stores_references_with_checkpoints(tmp_path, tiny_tokenizer):
    items, held = pair_items(16), pair_items(4, seed=1)
    strategy = make_strategy(MethodSpec(name="lora"))
    model = strategy.prepare(tiny_llama(len(tiny_tokenizer)))
    before = {n: p.detach().clone() for n, p in strategy.checkpoint_params(model).items()}
    store = CheckpointStore(tmp_path / "checkpoints")
    result = train(model, strategy, items, TrainSpec(max_steps=8, batch_size=4, eval_every=4), 5e-3, 0, CPU,
                   Hooks(checkpoints=store), objective=make_objective(ObjectiveSpec(name="dpo")), held_out=held)
    assert result.train_loss[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is its reference
    assert result.train_loss[-1]["loss"] < result.train_loss[0]["loss"]
    first, last = result.evaluations[0], result.evaluations[-1]
    assert first["reward_margin"] == pytest.approx(0, abs=1e-4) and first["reward_accuracy"] == 0.5  # all ties
    assert last["reward_margin"] > 0.05
    assert last["reward_accuracy"] > 0.5 and last["pref_loss"] < first["pref_loss"]
    assert any(not torch.equal(before[n], p) for n, p in strategy.checkpoint_params(model).items())
    trainer, _ = load_trainer(store.latest())
    assert trainer["references"].tolist() == [it.reference for it in items + held]


def test_a_nan_preference_loss_stops_the_run(tmp_path, tiny_tokenizer, monkeypatch):
    import tailorlm.train.objectives as objectives

    real = objectives.SimPO._losses

    def poisoned(self, logps, counts, items):
        loss, c, r = real(self, logps, counts, items)
        return loss * float("nan"), c, r

    monkeypatch.setattr(objectives.SimPO, "_losses", poisoned)
    strategy = make_strategy(MethodSpec(name="lora"))
    model = strategy.prepare(tiny_llama(len(tiny_tokenizer)))
    with pytest.raises(TailorError, match=r"the training loss became nan at step 1; lower train.lr or check the data"):
        train(model, strategy, pair_items(8), TrainSpec(max_steps=4, batch_size=4, eval_every=0), 1e-3, 0, CPU,
              objective=make_objective(ObjectiveSpec(name="simpo")))


def sft_then_pairs_rows(n: int = 12) -> list[dict]:
    texts = {"positive": "a great movie with an award winning actor", "negative": "an awful film the director failed"}
    return [{"text": f"{texts[label]} {i}", "label": label, "chosen": label,
             "rejected": "negative" if label == "positive" else "positive"}
            for i in range(n) for label in texts]


def tiny_args(model, out, *extra):
    return ["run", f"model.path={model}", "--output", str(out), "train.max_steps=4", "train.batch_size=4",
            "train.eval_every=2", "eval.baselines=[]", "eval.retention.data=null", "template.max_length=96",
            "train.lr=1e-2", *extra]


def test_model_path_names_a_lora_run_and_continues_from_its_merged_model(tmp_path, tiny_model_dir):
    from tailorlm.config import ModelSpec
    from tailorlm.models.loading import load_model
    from tailorlm.models.trained import load_trained

    data = jsonl(tmp_path / "pairs.jsonl", sft_then_pairs_rows())
    sft = tmp_path / "sft"
    assert main(tiny_args(tiny_model_dir, sft, f"data.train={data}")) == 0
    merged = load_trained(sft, CPU, merge=True).model.state_dict()
    started = load_model(ModelSpec(path=str(sft)), CPU).model.state_dict()
    assert merged.keys() == started.keys() and all(torch.equal(merged[k], started[k]) for k in merged)
    dpo = tmp_path / "dpo"
    assert main(tiny_args(sft, dpo, f"data.train={data}", "objective.name=dpo")) == 0
    metrics = json.loads((dpo / "metrics.json").read_text())
    assert metrics["train"]["objective"] == "dpo" and 0 <= metrics["train"]["preference"]["reward_accuracy"] <= 1
    log = json.loads((dpo / "train_log.json").read_text())
    assert log["train_loss"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the SFT model is the reference
    assert "## Held-out preference pairs" in (dpo / "report.md").read_text()
    # the DPO run's adapter sits on the SFT model: loading it back merges both
    assert load_trained(dpo, CPU, merge=True).model is not None and trained_weights(dpo)


def test_tailor_pairs_writes_wrong_answers_and_a_dpo_config_that_runs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import tailorlm.pipeline.pairs as pairs
    from tailorlm.eval.evaluate import Evaluator

    rows = [{k: r[k] for k in ("text", "label")} for r in sft_then_pairs_rows()]
    data = jsonl(tmp_path / "table.jsonl", rows)
    sft = tmp_path / "sft"
    assert main(tiny_args(tiny_model_dir, sft, f"data.train={data}")) == 0
    real = Evaluator.run

    def answers(self, model, samples, variant, demos=(), kind=None):  # a model that is wrong on every third row
        result = real(self, model, samples, variant, demos, kind)
        for i, (p, s) in enumerate(zip(result.predictions, samples)):
            p["generated"] = s.example["label"] if i % 3 else ("positive" if s.example["label"] == "negative" else "negative")
        return result

    monkeypatch.setattr(pairs.Evaluator, "run", answers)
    capsys.readouterr()
    assert main(["pairs", str(sft)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    folder = sft / "pairs"
    written = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert written and all(r["chosen"] == r["label"] and r["rejected"] != r["label"] for r in written)
    wrong = len({r["text"] for r in written})  # pairs of the rarer chosen label are repeated to balance them
    assert f"{wrong} of 18 training answers were wrong: {wrong} pairs" in out
    assert f"Next: tailor run {folder / 'dpo.yaml'}" in out
    assert sum(r["chosen"] == "positive" for r in written) == sum(r["chosen"] == "negative" for r in written)
    cfg = load_config(folder / "dpo.yaml")
    assert (cfg.model.path, cfg.objective.name, cfg.data.train) == (str(sft.resolve()), "dpo",
                                                                    str(folder.resolve() / "pairs.jsonl"))
    assert cfg.train.lr is None  # the preference default, not the SFT run's rate
    held_out = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
    assert cfg.eval.select.metric == ("reward_accuracy" if any("rejected" in r for r in held_out) else "val_loss")
    monkeypatch.undo()
    assert main(["run", str(folder / "dpo.yaml"), "--output", str(tmp_path / "dpo")]) == 0


def test_pairs_refuses_a_task_without_right_or_wrong_answers(tmp_path, tiny_model_dir, capsys):
    config = write(tmp_path / "c.yaml", f"model: {{path: {tiny_model_dir}}}\ntemplate: {{preset: instruction}}\n")
    assert main(["pairs", str(config)]) == 2
    assert ("template.preset instruction has no right or wrong answer to pair on; pairs work for classification, "
            "ner, qa, math") in capsys.readouterr().out.replace("\n", "")


def test_pairs_of_a_label_set_are_balanced_over_the_chosen_label():
    from tailorlm.pipeline.pairs import balance

    pairs = [{"chosen": "pos", "i": i} for i in range(5)] + [{"chosen": "neg", "i": i} for i in range(2)]
    out, added = balance(pairs, seed=0)
    assert added == 3 and len(out) == 10
    assert sum(r["chosen"] == "pos" for r in out) == sum(r["chosen"] == "neg" for r in out) == 5
    assert all(r in pairs for r in out) and all(r in out for r in pairs)  # repeats only, none lost
    assert balance(pairs, seed=0) == (out, added)  # seeded


def test_a_kto_split_of_one_answer_is_refused_by_its_file(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "one.jsonl", [{"prompt": "Say a", "completion": "a", "label": True}])
    splits, template = splits_of(path, preference="unpaired")
    spec = TemplateSpec(preset="instruction")
    with pytest.raises(DataError, match=f"^{path}: kto needs at least two examples in a split"):
        encode_preference_examples(splits.train, template, ChatFormat(tiny_tokenizer, spec), [], spec, 0)


def test_kto_mismatched_answers_are_cut_to_max_length(tmp_path, tiny_tokenizer):
    long = " ".join(["word"] * 10)
    path = jsonl(tmp_path / "k.jsonl", [{"prompt": f"Say {long}", "completion": "ok", "label": True},
                                        {"prompt": "Say it", "completion": long, "label": False}])
    splits, template = splits_of(path, preference="unpaired")
    spec = TemplateSpec(preset="instruction", max_length=60)
    fmt = ChatFormat(tiny_tokenizer, spec)
    items, _ = encode_preference_examples(splits.train, template, fmt, [], spec, 0)
    assert len(items) == 2 and all(len(item.chosen) <= 60 for item in items)
    crossed = next(item for item in items if item.example["_chosen"] == "ok")  # the long prompt, the long answer
    assert len(crossed.chosen.prompt_ids) + len(items[1 - items.index(crossed)].chosen.input_ids) > 60
    assert len(crossed.rejected) == 60


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "x", "completion": "a", "label": "yes"}, "'label' must be true or false (JSON booleans), not \"yes\""),
    ({"prompt": "x", "completion": "a", "label": 1}, "'label' must be true or false (JSON booleans), not 1"),
    ({"prompt": "x", "completion": "a", "label": None}, "'label' must be true or false (JSON booleans), not null"),
    ({"prompt": "x", "completion": "a", "kto_tag": "true"},
     "'kto_tag' must be true or false (JSON booleans), not \"true\""),
])
def test_a_kto_label_that_is_not_a_boolean_is_named_with_its_file_and_line(tmp_path, row, problem):
    """Not "not a preference record": the record is one, with a label that would have to be guessed at."""
    path = jsonl(tmp_path / "kto.jsonl", [{"prompt": "ok", "completion": "b", "label": False}, row])
    with pytest.raises(DataError) as e:
        splits_of(path, preference="unpaired")
    assert str(e.value) == f"{path}, line 2: {problem}"


def pairs_with(same: list[tuple[str, str]], n_distinct: int = 3) -> list[dict]:
    distinct = [{"prompt": f"Say {w}", "chosen": w, "rejected": f"never {w} at all"} for w in "abcdefgh"[:n_distinct]]
    return distinct + [{"prompt": f"Repeat {i}", "chosen": c, "rejected": r} for i, (c, r) in enumerate(same)]


def test_pairs_with_identical_answers_are_left_out_of_training(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "p.jsonl", pairs_with([("Same answer.", "Same answer."), ("two  words\n", " two words")]))
    splits, template = splits_of(path)
    spec = TemplateSpec(preset="instruction")
    items, report = encode_preference_examples(splits.train, template, ChatFormat(tiny_tokenizer, spec), [], spec, 0)
    assert [it.example["_chosen"] for it in items] == ["a", "b", "c"]
    assert (report.total, report.kept) == (5, 3)
    assert dict(report.dropped) == {"pairs with identical chosen and rejected answers": 2}
    assert report.summary() == "3/5 kept, 0 truncated to fit, dropped: 2 pairs with identical chosen and rejected answers"


def test_a_split_whose_every_pair_is_identical_is_refused_by_its_file(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "same.jsonl", pairs_with([("x", "x"), ("y", "y "), ("z", "z"), ("w", "w")], n_distinct=0))
    splits, template = splits_of(path)
    spec = TemplateSpec(preset="instruction")
    with pytest.raises(DataError) as e:
        encode_preference_examples(splits.train, template, ChatFormat(tiny_tokenizer, spec), [], spec, 0)
    assert str(e.value) == (f"{path}: all 4 pairs have the same chosen and rejected answer (once whitespace is "
                            f"collapsed; e.g. line 1, line 2, line 3), so there is no preference to learn; give each "
                            f"pair a rejected answer that differs from its chosen one")


@pytest.mark.parametrize("name, zero", [("dpo", True), ("ipo", True), ("simpo", True), ("orpo", False)])
def test_an_identical_pair_gives_no_gradient_except_through_an_sft_term(tiny_tokenizer, name, zero):
    """Why identical pairs may be left out: both sides are one sequence, so the preference term is flat. orpo's
    (and sft_weight's) token loss on the chosen answer is the one gradient such a pair would still give."""
    objective = make_objective(ObjectiveSpec(name="dpo" if name == "ipo" else name,
                                                  loss="ipo" if name == "ipo" else "sigmoid"))
    ctx = StepContext(0, CPU, packing=False)

    def step(items: list[Preference]) -> tuple[float, float]:
        """(the step's loss, its largest gradient entry)"""
        model = tiny_llama(len(tiny_tokenizer))
        objective.attach_references(model, items, ctx, 4)
        loss, _ = accumulate_gradients(lambda fn: fn(model, True), [items], ctx, objective=objective)
        return loss, max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)

    distinct = pair_items(3)
    same = [Preference(it.chosen, Sample(list(it.chosen.input_ids), list(it.chosen.labels), {})) for it in distinct]
    loss, largest = step(same)
    assert (largest < 1e-4 * step(distinct)[1]) == zero  # zero up to the float summation order (~1e-7 of it)
    if name == "dpo":
        assert loss == pytest.approx(math.log(2), abs=1e-6)
