"""The strongest honest baseline: label likelihood against a direct computation, constrained and free kinds, the
k-shot curve with its dropped demonstrations, retrieved demonstrations, the classic classifier, and the gain
measured against the best prompting result of any kind."""
import math

import pytest
import torch

from tailorlm.config import EvalSpec, TemplateSpec
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.eval.baselines import best_prompting, run_baselines, variant_name
from tailorlm.eval.classic import nearest, tfidf_logistic_regression
from tailorlm.eval.evaluate import Evaluator, pick_demos
from tailorlm.eval import likelihood
from tailorlm.eval.likelihood import answer_token_logprobs
from tailorlm.tasks.classification import answer_complete
from conftest import tiny_llama

LABELS = ["negative", "positive"]
TEXTS = {"positive": ["a great movie", "the actor won an award", "great film great director", "the team won"],
         "negative": ["an awful film", "the director failed", "awful awful movie", "the minister said awful"]}
CPU = torch.device("cpu")


def examples(n_rounds: int = 1) -> list[dict]:
    return [{"text": f"{t} {i}" if i else t, "label": label, "_where": f"d.csv, line {j}"}
            for i in range(n_rounds) for label, texts in TEXTS.items() for j, t in enumerate(texts, 2)]


def setup(tokenizer, **eval_overrides):
    spec = TemplateSpec(max_length=256)
    template, fmt = PromptTemplate(spec), ChatFormat(tokenizer, spec)
    samples, _ = encode_examples(examples(), template, fmt, LABELS, spec)
    evaluator = Evaluator(tokenizer, template, fmt, LABELS, EvalSpec(batch_size=4, **eval_overrides), CPU)
    return evaluator, samples


def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]]) -> list[list[float]]:
    """Each answer's summed token log-probabilities after each prompt, as label likelihood scores it."""
    return [[sum(tokens) for tokens in row] for row in answer_token_logprobs(model, prompts, answers, CPU)]


def direct_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), summed over the answer's tokens, from one plain forward pass of the whole text."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


@pytest.mark.parametrize("side_by_side", [True, False])  # the answers' later tokens in one pass, or one by one
def test_answer_logprobs_equal_a_direct_computation(tiny_tokenizer, monkeypatch, side_by_side):
    if not side_by_side:  # as under flash attention, which takes no hand-made mask: the answers one by one
        monkeypatch.setattr(likelihood, "_follow_side_by_side",
                            lambda *a: likelihood._follow_one_by_one(*a, copy_cache=False))
    model = tiny_llama(len(tiny_tokenizer), seed=1)
    shared = list(range(30, 45))  # a shared opening: the prefix cache path
    prompts = [shared + [50, 51, 52], shared + [60, 61], shared + [70]]
    answers = [[5], [7, 8, 9], [10, 11], [7, 8, 12]]  # one token, longer ones of different lengths, a shared start
    got = answer_logprobs(model, prompts, answers)
    for prompt, row in zip(prompts, got):
        assert row == pytest.approx([direct_logprob(model, prompt, a) for a in answers], abs=1e-4)
    alone = answer_logprobs(model, [prompts[1]], answers)  # no shared prefix: one prompt
    assert alone[0] == pytest.approx(got[1], abs=1e-4)


def test_label_likelihood_picks_the_label_with_the_highest_summed_logprob(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=2)
    evaluator, samples = setup(tiny_tokenizer)
    result = evaluator.run(model, samples, "zero_shot_likelihood", kind="likelihood")
    forms = {label: [tiny_tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)
                     for text in (label, label.capitalize())] for label in LABELS}
    assert [(LABELS[i], ids) for i, ids in evaluator.forms] == [(label, ids) for label in LABELS for ids in forms[label]]
    for sample, prediction in zip(samples, result.predictions):
        # A label's probability is that of its spellings together: log(p(negative) + p(Negative)).
        scores = [math.log(sum(math.exp(direct_logprob(model, sample.prompt_ids, ids)) for ids in forms[label]))
                  for label in LABELS]
        assert prediction["predicted"] == LABELS[max(range(2), key=scores.__getitem__)]
    assert result.metrics["valid"] == 1.0 and result.metrics["kind"] == "likelihood"
    assert result.metrics["prompt_tokens"] == pytest.approx(sum(len(s.prompt_ids) for s in samples) / len(samples), abs=0.1)
    # the answers scored are exactly the completions training teaches, end-of-turn token included
    assert [tiny_tokenizer.decode(a) for a in evaluator.answers] == ["negative<|im_end|>", "positive<|im_end|>"]


def test_constrained_decoding_always_answers_a_label(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=3)
    evaluator, samples = setup(tiny_tokenizer)
    result = evaluator.run(model, samples, "zero_shot_constrained", kind="constrained")
    assert {p["predicted"] for p in result.predictions} <= set(LABELS) and result.metrics["valid"] == 1.0


def test_constrained_answers_read_off_the_label_pass_follow_greedy_decoding_step_by_step():
    answers = [[1, 2, 9], [1, 3, 9], [4, 9], [4, 9, 5]]  # a shared start; an answer that starts a longer one
    logps = [[-0.5, -2.0, -0.1], [-0.5, -1.0, -0.1], [-0.9, -0.2], [-0.9, -0.2, -3.0]]
    assert likelihood.constrained_answer(answers, logps, 8) == [1, 3, 9]  # 1 beats 4, then 3 beats 2
    assert likelihood.constrained_answer(answers, logps, 2) == [1, 3]  # cut at the token budget, as decoding is
    logps[0][0] = logps[1][0] = -1.0
    # [4, 9] is complete but also starts [4, 9, 5]: decoding constrained to the trie continues it, however unlikely
    assert likelihood.constrained_answer(answers, logps, 8) == [4, 9, 5]
    assert likelihood.constrained_answer([[7], [6]], [[-1.0], [-1.0]], 8) == [6]  # a tie: the lower id, as argmax


@pytest.mark.parametrize("chat_template", ["auto", "never"])  # the chat layout, and the plain one of base models
def test_constrained_decoding_read_off_the_label_pass_equals_constrained_generation(tiny_tokenizer, chat_template):
    from tailorlm.eval.generate import LabelTrie, generate

    spec = TemplateSpec(max_length=256, chat_template=chat_template)
    template, fmt = PromptTemplate(spec), ChatFormat(tiny_tokenizer, spec)
    labels = ["negative", "positive", "neutral", "very negative"]  # forms sharing their first tokens
    rows = [{**ex, "label": labels[i % 4]} for i, ex in enumerate(examples(2))]
    samples, _ = encode_examples(rows, template, fmt, labels, spec)
    evaluator = Evaluator(tiny_tokenizer, template, fmt, labels, EvalSpec(batch_size=4), CPU)
    trie = LabelTrie([ids for _, ids in evaluator.forms])
    prompts = [s.prompt_ids for s in samples]
    chosen = set()
    for seed in range(6):
        model = tiny_llama(len(tiny_tokenizer), seed=seed)
        read_off = evaluator.run_kinds(model, samples, {"constrained": "c", "likelihood": "l"})["constrained"]
        assert read_off.metrics["shared_pass"]
        decoded = generate(model, tiny_tokenizer, prompts, evaluator.max_new_tokens, 4, CPU, trie)
        assert [p["generated"] for p in read_off.predictions] == decoded
        chosen.update(decoded)
    assert len(chosen) > 2, chosen  # the models' choices vary, so the comparison means something


def test_constrained_and_likelihood_kinds_share_one_scoring_pass(tiny_tokenizer, monkeypatch):
    model = tiny_llama(len(tiny_tokenizer), seed=5)
    evaluator, samples = setup(tiny_tokenizer)
    passes = []
    scored = likelihood.answer_token_logprobs
    monkeypatch.setattr("tailorlm.eval.evaluate.answer_token_logprobs", lambda *a, **k: passes.append(1) or scored(*a, **k))
    together = evaluator.run_kinds(model, samples, {"constrained": "c", "likelihood": "l"})
    assert len(passes) == 1
    assert together["constrained"].metrics["seconds_per_100"] == together["likelihood"].metrics["seconds_per_100"]
    # alone, constrained decoding is generated (cheaper than scoring every label) and likelihood is the pass
    alone = evaluator.run(model, samples, "c", kind="constrained")
    assert len(passes) == 1 and "shared_pass" not in alone.metrics
    assert together["constrained"].predictions == alone.predictions
    assert together["likelihood"].predictions == evaluator.run(model, samples, "l", kind="likelihood").predictions
    assert len(passes) == 2


def test_free_generation_beside_the_scored_kinds_starts_from_the_same_prompt_pass(tiny_tokenizer, monkeypatch):
    from tailorlm.eval import evaluate, generate as generation

    model = tiny_llama(len(tiny_tokenizer), seed=4)
    evaluator, samples = setup(tiny_tokenizer)
    kinds = {"free": "f", "constrained": "c", "likelihood": "l"}
    apart = {kind: evaluator.run(model, samples, name, kind=kind) for kind, name in kinds.items()}
    calls = []
    for module, name in ((evaluate, "answer_token_logprobs"), (evaluate, "generate"), (generation, "_score_on_prompts")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    together = evaluator.run_kinds(model, samples, kinds)
    # one pass: the scoring runs on each batch's prompt cache inside generation, nothing is run a second time
    assert calls == ["_score_on_prompts"] * 2  # 8 samples in batches of 4
    for kind in kinds:
        assert together[kind].predictions == apart[kind].predictions
    seconds = {kind: together[kind].metrics["seconds_per_100"] for kind in kinds}
    assert seconds["constrained"] == seconds["likelihood"] != seconds["free"] and min(seconds.values()) > 0
    assert "shared_pass" not in together["free"].metrics and together["likelihood"].metrics["shared_pass"]


def test_free_generation_stops_once_a_label_is_named_or_the_line_ends():
    done = answer_complete(["sport", "tech", "very positive"])
    assert not done("The topic is tech")  # 'tech' may still become 'technology'
    assert not done("The topic is technology ")
    assert done("The topic is tech.") and done("The topic is sport and")
    assert done("I am not sure\nThe") and not done("\n  I am not")  # a leading newline is not an answer
    assert done("very   positive!") and not done("very posit")


@pytest.mark.parametrize("limit, dropped", [(4096, [0, 0, 0]), (None, None)])
def test_the_curve_has_each_k_and_counts_dropped_demos(tiny_tokenizer, limit, dropped):
    model = tiny_llama(len(tiny_tokenizer), seed=4)
    evaluator, samples = setup(tiny_tokenizer, few_shot_k=[3, 0, 1], curve_rows=5)
    train = examples(3)
    if limit is None:  # a limit that fits the 1-shot prompts but not all 3 demonstrations
        one_shot, _ = evaluator.prompts(samples, pick_demos(train, 1, 0))
        three_shot, _ = evaluator.prompts(samples, pick_demos(train, 3, 0))
        limit = max(map(len, one_shot)) + evaluator.max_new_tokens + 2
        assert max(map(len, three_shot)) + evaluator.max_new_tokens > limit
    evaluator.spec = evaluator.spec.model_copy(update={"max_prompt_tokens": limit})
    out = run_baselines(model, evaluator, train, samples, evaluator.spec, seed=0, report=lambda *a: None)
    points = out.curve["points"]
    assert [p["k"] for p in points] == [0, 1, 3] and out.curve["kind"] == "likelihood"
    assert [p["rows"] for p in points] == [8, 5, 8]  # the end points use the whole split, inner ones curve_rows
    assert out.variants["few_shot_likelihood"]["k"] == 3
    if dropped is not None:
        assert [p["dropped_demos"] for p in points] == dropped
    else:
        # every row loses what does not fit: recount it by building each prompt by hand
        expected = 0
        for sample in samples:
            shots = [(evaluator.template.prompt(d, LABELS), evaluator.template.completion(d)) for d in pick_demos(train, 3, 0)]
            question = evaluator.template.prompt(sample.example, LABELS)
            while shots and len(evaluator.fmt.encode_prompt(evaluator.fmt.prompt_text(question, shots))) + evaluator.max_new_tokens > limit:
                shots.pop()
                expected += 1
        assert points[2]["dropped_demos"] == expected > 0 and points[0]["dropped_demos"] == 0
        assert out.variants["few_shot"]["dropped_demos"] == expected
    assert out.curve["best_k"] == max(points, key=lambda p: (p["value"], -p["k"]))["k"]
    expected_variants = {variant_name(b, k) for b in ("zero_shot", "few_shot") for k in ("free", "constrained", "likelihood")}
    assert set(out.variants) == expected_variants | {"classic", "majority"}
    # the majority class: the most frequent training label, scored on every test row
    counts = {label: sum(ex["label"] == label for ex in train) for label in LABELS}
    top = max(sorted(counts), key=counts.get)
    share = sum(s.example["label"] == top for s in samples) / len(samples)
    assert out.variants["majority"]["label"] == top and out.variants["majority"]["accuracy"] == pytest.approx(share)


def test_similar_demos_are_each_rows_nearest_training_examples(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=5)
    evaluator, samples = setup(tiny_tokenizer, few_shot_k=[0, 2], demos="similar", prompting=["likelihood"], classic=False)
    train = [{"text": "awful awful movie again", "label": "negative"}, {"text": "the team won again", "label": "positive"},
             {"text": "weather report", "label": "negative"}]
    seen = []
    real = evaluator.prompts

    def spy(rows, demos=()):
        seen.append(demos)
        return real(rows, demos)

    evaluator.prompts = spy
    out = run_baselines(model, evaluator, train, samples, evaluator.spec, seed=0, report=lambda *a: None)
    per_row = seen[-1]
    assert len(per_row) == len(samples)
    row = next(i for i, s in enumerate(samples) if s.example["text"] == "awful awful movie")
    assert per_row[row][-1]["text"] == "awful awful movie again"  # the most similar sits next to the question
    assert set(out.variants) == {"zero_shot_likelihood", "few_shot_likelihood"}


def test_classic_classifier_and_retrieval():
    train = [f"{w} film" for w in ("great", "superb", "lovely")] + [f"{w} film" for w in ("awful", "dire", "bad")]
    labels = ["positive"] * 3 + ["negative"] * 3
    result = tfidf_logistic_regression(train * 3, labels * 3, ["a superb film", "a dire film"])
    assert result.predicted == ["positive", "negative"] and result.seconds_per_100 >= 0
    assert nearest(train, ["dire dire"], 2)[0][0] == 4
    assert tfidf_logistic_regression(["a", "b"], ["x", "x"], ["c"]).predicted == ["x"]  # one label: that label


def test_the_gain_is_over_the_best_prompting_result_of_any_kind():
    variants = {"zero_shot": {"accuracy": 0.2}, "zero_shot_likelihood": {"accuracy": 0.7},
                "few_shot_constrained": {"accuracy": 0.7}, "classic": {"accuracy": 0.9}, "fine_tuned": {"accuracy": 0.8}}
    assert best_prompting(variants, "accuracy") == {"variant": "zero_shot_likelihood", "value": 0.7}  # ties: first
    from tailorlm.eval.report import best_line, comparison_rows

    rows = {r[0]: r for r in comparison_rows(variants, ("accuracy",))}
    assert rows["fine-tuned"][2] == "+10.0 pts" and rows["TF-IDF + logistic reg."][2] == ""
    assert best_line(variants, "accuracy") == ("vs prompting: against the best prompting result, zero-shot, "
                                               "likelihood (accuracy 0.700)")


def test_a_single_k_is_the_curve_from_zero():
    assert EvalSpec(few_shot_k=4).few_shot_k == [0, 4]
    assert EvalSpec(few_shot_k=[6, 0, 3, 3]).few_shot_k == [0, 3, 6]


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_answer_logprobs_are_exact_under_a_sliding_window_shorter_than_the_rows(family):
    """Gemma-3's tiny config slides an 8-token window over 18-token rows: padding or a shared opening would
    change what a row sees, so such rows are scored one at a time (a window-cropped cache cannot be cropped
    back either); Qwen2 has no window and takes the batched path."""
    from family_models import tiny_family_model

    model = tiny_family_model(family, 400, seed=1)
    shared = list(range(30, 45))
    prompts, answers = [shared + [50, 51, 52], shared + [60, 61], shared + [70]], [[5], [7, 8, 9], [10, 11]]
    got = answer_logprobs(model, prompts, answers)
    for prompt, row in zip(prompts, got):
        assert row == pytest.approx([direct_logprob(model, prompt, a) for a in answers], abs=1e-4)


@pytest.mark.parametrize("setting", [None, True, False])
def test_eval_static_cache_reaches_generation(tiny_tokenizer, monkeypatch, setting):
    """eval.static_cache is what generation is asked for, and what decides whether free generation shares the
    scored kinds' prompt pass."""
    from tailorlm.eval import evaluate

    seen = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **kw: seen.append(kw["static"]) or [""] * len(a[2]))
    monkeypatch.setattr(evaluate, "scores_together", lambda *a: seen.append(a[4]) or False)
    evaluator, samples = setup(tiny_tokenizer, static_cache=setting)
    evaluator.run_kinds(tiny_llama(len(tiny_tokenizer)), samples, {"free": "zero_shot", "likelihood": "zero_shot"})
    assert seen == [setting, setting]
