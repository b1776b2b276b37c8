"""Preflight: duplicates, leakage, lengths and the loss preview, thresholds that stop a run, and what the
training-time estimate rests on (its parts: test_data_estimate.py)."""
import json

import pytest

from tailorlm.cli import main
from tailorlm.data import cost, quality
from tailorlm.data.preflight import loss_preview
from tailorlm.data.samples import IGNORE, Sample
from conftest import write

# a run, or `tailor preflight --output`, keeps each task's reports in tasks/<name>/; these tasks are classification
TASK = "tasks/classification"

WORDS = "the quick brown fox jumps over a lazy dog while seven tired sailors sing about the distant northern sea".split()


@pytest.fixture(autouse=True, scope="module")
def _machine_figures_in_a_scratch_cache(tmp_path_factory):
    """Every preflight here measures this machine once, into a cache of the module's own, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAILOR_CACHE_DIR", str(tmp_path_factory.mktemp("machine-cache")))
        yield


def test_exact_and_near_duplicates():
    base = " ".join(WORDS)
    texts = [base, base.upper() + "!", base.replace("seven", "eight"), "completely different words here today"]
    assert quality.exact_groups(texts) == [[0, 1]]  # case and punctuation do not make a text new
    near = quality.near_pairs(texts, threshold=0.7)
    assert [(i, j) for i, j, _ in near] == [(0, 2), (1, 2)]  # one word changed; the exact pair is not repeated
    assert all(0.7 <= s < 1 for _, _, s in near)
    assert quality.near_pairs(texts[:1], 0.7, others=texts[3:]) == []


def test_overlap_against_train():
    assert quality.exact_overlap(["A b", "c d", "new"], ["x", "a B.", "C  d"]) == [(0, 1), (1, 2)]


def test_loss_preview_marks_exactly_the_completion(tiny_tokenizer):
    prompt = tiny_tokenizer("the film won", add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(" positive", add_special_tokens=False)["input_ids"]
    text = loss_preview(Sample(prompt + answer, [IGNORE] * len(prompt) + answer, {}), tiny_tokenizer)
    green = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    assert green == " positive" and text.plain == "the film won positive"


def _data(tmp_path):
    train = ["text,label"] + [f"\"{' '.join(WORDS[i:i + 9])} {i}\",{'a' if i % 2 else 'b'}" for i in range(12)]
    train += [train[1], train[2]]  # two exact duplicates
    test = ["text,label", train[3], "\"something never seen before at all\",a", "\"another unseen sentence here\",b"]
    return write(tmp_path / "train.csv", "\n".join(train) + "\n"), write(tmp_path / "test.csv", "\n".join(test) + "\n")


def test_preflight_reports_and_saves(tmp_path, tiny_model_dir):
    train, test = _data(tmp_path)
    out = tmp_path / "pf"
    assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={train}", f"data.test={test}",
                 "data.split.validation=0.2", "--output", str(out)]) == 0
    report = json.loads((out / TASK / "preflight.json").read_text())
    by_check = {(f["check"], f["message"].split(":")[0]): f for f in report["findings"]}
    assert by_check[("duplicates", "train")]["level"] == "warn"
    assert "2 exact" in by_check[("duplicates", "train")]["message"]
    leak = by_check[("leakage", "test")]
    assert leak["level"] == "warn" and leak["message"].startswith("test: 1 prompts also in train")
    assert leak["examples"] == [f"{test}, line 2 = {train}, line 4"]
    assert report["tokens_per_epoch"] > 0 and report["estimated_train_seconds"] >= 0
    assert (out / TASK / "token_lengths.png").stat().st_size > 1000


def test_leakage_as_error_stops_the_run_before_any_output(tmp_path, tiny_model_dir, capsys):
    train, test = _data(tmp_path)
    out = tmp_path / "run"
    code = main(["run", f"model.path={tiny_model_dir}", f"data.train={train}", f"data.test={test}",
                 "preflight.leakage=error", "--output", str(out)])
    assert code == 2 and not out.exists()
    assert "preflight failed (leakage: test: 1 prompts also in train" in capsys.readouterr().out.replace("\n", "")


def test_short_inputs_are_not_near_duplicates_because_of_the_template(tmp_path, tiny_model_dir):
    """Leakage compares the examples' own text: a long shared instruction must not make them look alike."""
    questions = ["who wrote hamlet", "where is paris", "what is rain", "how old is rome", "why is sky blue",
                 "when did ww2 end", "what is a fox", "who is the king", "how tall is it", "where is the sea"]
    rows = ["text,label"] + [f"{q},{'a' if i % 2 else 'b'}" for i, q in enumerate(questions * 2)]
    train = write(tmp_path / "train.csv", "\n".join(rows[:15]) + "\n")
    test = write(tmp_path / "test.csv", "\n".join([rows[0], "what is snow,a", "who wrote faust,b"]) + "\n")
    out = tmp_path / "pf"
    assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={train}", f"data.test={test}",
                 "template.instruction=" + "Read the question carefully and answer with one of the labels. " * 3,
                 "template.max_length=1024",
                 "--output", str(out)]) == 0
    findings = json.loads((out / TASK / "preflight.json").read_text())["findings"]
    leak = next(f for f in findings if f["check"] == "leakage" and f["message"].startswith("test"))
    assert leak["level"] == "ok" and leak["message"] == "test: 0 prompts also in train, 0 nearly"


def _one_label(tmp_path, label="a", n=12, name="one.csv"):
    rows = ["text,label"] + [f"\"{' '.join(WORDS[i:i + 9])} {i}\",{label}" for i in range(n)]
    return write(tmp_path / name, "\n".join(rows) + "\n")


ONE_TRAIN_LABEL = ("train: every one of the 9 examples has the label 'a': the model can only learn to repeat it, so "
                   "its test score would mean nothing (preflight.single_label)")


def test_a_single_training_label_stops_the_run_before_any_output(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    code = main(["run", f"model.path={tiny_model_dir}", f"data.train={_one_label(tmp_path)}", "--output", str(out)])
    assert code == 2 and not out.exists()
    printed = " ".join(capsys.readouterr().out.split())
    assert (f"error: preflight failed (labels: {ONE_TRAIN_LABEL}); fix the data or relax preflight.* in the config"
            in printed)


def test_a_single_training_label_lowered_to_warn_is_kept_as_a_trivial_score(tmp_path, tiny_model_dir):
    out = tmp_path / "pf"
    assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={_one_label(tmp_path)}",
                 "preflight.single_label=warn", "--output", str(out)]) == 0
    report = json.loads((out / TASK / "preflight.json").read_text())
    # No largest/smallest 'ok' beside them: a ratio of 1.0 over one label is not a healthy balance.
    assert [(f["level"], f["message"]) for f in report["findings"] if f["check"] == "labels"] == [
        ("warn", ONE_TRAIN_LABEL),
        ("warn", "test: every one of the 2 examples has the label 'a'; the report marks the test score as trivial")]
    assert report["trivial"] == ["the training split has a single label ('a'), so the model can only learn to repeat it",
                                 "every test example has the label 'a', so always answering it scores 1.000"]


def test_a_test_split_with_one_label_alone_makes_the_score_trivial(tmp_path, tiny_model_dir):
    train, _ = _data(tmp_path)
    out = tmp_path / "pf"
    assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={train}",
                 f"data.test={_one_label(tmp_path, 'b', 3, 'test.csv')}", "--output", str(out)]) == 0
    report = json.loads((out / TASK / "preflight.json").read_text())
    assert report["trivial"] == ["every test example has the label 'b', so always answering it scores 1.000"]
    assert [f["level"] for f in report["findings"] if f["check"] == "labels"] == ["warn", "ok"]


def test_contamination_is_counted_for_the_report_whatever_the_leakage_policy(tmp_path, tiny_model_dir):
    train, test = _data(tmp_path)
    for policy in ("warn", "ignore"):
        out = tmp_path / policy
        assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={train}", f"data.test={test}",
                     f"preflight.leakage={policy}", "--output", str(out)]) == 0
        report = json.loads((out / TASK / "preflight.json").read_text())
        assert report["contamination"] == {"test_rows": 3, "in_train": 1, "share": 0.3333, "exact": 1, "near": 0,
                                           "near_checked": True}


def _pairs_file(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _dpo_config(tmp_path, model, train, held=None):
    held = f"validation: {held}, test: {held}" if held else "split: {validation: 0.1, test: 0.1}"
    return write(tmp_path / "dpo.yaml", f"model: {{path: {model}}}\ndata: {{train: {train}, {held}}}\n"
                                        f"template: {{preset: instruction}}\nobjective: {{name: dpo}}\n")


SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank on a sunny day"
PAIRS = [{"prompt": f"Question {i}: {' '.join(WORDS[i:i + 5])}?", "chosen": f"A full answer about {WORDS[i]}",
          "rejected": f"{WORDS[i + 1]} is wrong here"} for i in range(6)] + [
    {"prompt": "Say yes", "chosen": "Yes, gladly.", "rejected": "Yes,  gladly.\n"},  # line 7: whitespace only
    {"prompt": "Say no", "chosen": "No.", "rejected": "No."},  # line 8: identical
    {"prompt": "Greet me", "chosen": "Hello there!", "rejected": "hello there"},  # line 9: case and punctuation
    {"prompt": "Describe it", "chosen": SENTENCE, "rejected": SENTENCE.replace("dog", "cat")},  # line 10: one word
]


def test_identical_and_nearly_identical_pairs_are_reported_with_their_lines(tmp_path, tiny_model_dir):
    train = _pairs_file(tmp_path / "pairs.jsonl", PAIRS)
    held = _pairs_file(tmp_path / "held.jsonl", PAIRS[:3])
    out = tmp_path / "pf"
    assert main(["preflight", str(_dpo_config(tmp_path, tiny_model_dir, train, held)), "--output", str(out)]) == 0
    report = json.loads((out / "tasks" / "instruction" / "preflight.json").read_text())
    pairs = [(f["level"], f["message"], f["examples"]) for f in report["findings"] if f["check"] == "pairs"]
    assert pairs == [
        ("warn", "train: 2 of 10 pairs have the same chosen and rejected answer (once whitespace is collapsed); they "
                 "teach no preference and are left out (preflight.identical_pairs)",
         [f"{train}, line 7", f"{train}, line 8"]),
        ("warn", "train: 2 of 10 pairs have nearly the same chosen and rejected answer (only case or punctuation "
                 "differs, or similarity >= 0.95); check that the difference is the preference you mean to teach",
         [f"{train}, line 9 (1.00)", f"{train}, line 10 (0.96)"])]
    assert report["rows"]["dropped"]["train"] == {"pairs with identical chosen and rejected answers": 2}
    length = next(f for f in report["findings"] if f["check"] == "length")
    assert length["level"] == "ok" and "0 samples truncated or dropped" in length["message"]  # not the pairs


def test_a_run_whose_every_pair_is_identical_stops_before_any_output(tmp_path, tiny_model_dir, capsys):
    train = _pairs_file(tmp_path / "same.jsonl", [{"prompt": f"Say {w}", "chosen": w, "rejected": f" {w} "}
                                                  for w in WORDS[:8]])
    out = tmp_path / "run"
    assert main(["run", str(_dpo_config(tmp_path, tiny_model_dir, train)), "--output", str(out)]) == 2
    assert not out.exists()
    assert (f"error: {train}: all 6 pairs have the same chosen and rejected answer (once whitespace is collapsed; "
            f"e.g. line 1, line 2, line 3), so there is no preference to learn; give each pair a rejected answer "
            f"that differs from its chosen one") in " ".join(capsys.readouterr().out.split())


def test_preflight_says_what_the_estimate_rests_on(tmp_path, tiny_model_dir):
    train, _ = _data(tmp_path)
    for run in ("first", "second"):
        out = tmp_path / run
        assert main(["preflight", f"model.path={tiny_model_dir}", f"data.train={train}", "method.name=freeze",
                     "method.freeze.first_blocks=1", "--output", str(out)]) == 0
        report = json.loads((out / TASK / "preflight.json").read_text())
    basis = report["estimate_basis"]
    assert basis["method"] == "freeze" and basis["layout"] == "config.json" and basis["cached"] is True
    assert basis["rate_flops"] == pytest.approx(cost.EFFICIENCY * basis["matmul_flops"], rel=1e-6)
    time_check = next(f["message"] for f in report["findings"] if f["check"] == "time")
    assert f"{basis['flops_per_token'] / 1e6:,.3g} MFLOP a token (freeze, layout from config.json)" in time_check
    assert time_check.endswith("cached); evaluations not included")
