"""Preflight: duplicates, leakage, lengths and the loss preview, and thresholds that stop a run."""
import json

from tailorlm.cli import main
from tailorlm.data import quality
from tailorlm.data.preflight import loss_preview
from tailorlm.data.tokenize import IGNORE, Sample
from conftest import write

WORDS = "the quick brown fox jumps over a lazy dog while seven tired sailors sing about the distant northern sea".split()


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
    report = json.loads((out / "preflight.json").read_text())
    by_check = {(f["check"], f["message"].split(":")[0]): f for f in report["findings"]}
    assert by_check[("duplicates", "train")]["level"] == "warn"
    assert "2 exact" in by_check[("duplicates", "train")]["message"]
    leak = by_check[("leakage", "test")]
    assert leak["level"] == "warn" and leak["message"].startswith("test: 1 prompts also in train")
    assert leak["examples"] == [f"{test}, line 2 = {train}, line 4"]
    assert report["tokens_per_epoch"] > 0 and report["estimated_train_seconds"] >= 0
    assert (out / "token_lengths.png").stat().st_size > 1000


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
    findings = json.loads((out / "preflight.json").read_text())["findings"]
    leak = next(f for f in findings if f["check"] == "leakage" and f["message"].startswith("test"))
    assert leak["level"] == "ok" and leak["message"] == "test: 0 prompts also in train, 0 nearly"
