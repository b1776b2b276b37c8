"""`tailor predict`: a run's model over a data file, with the run's template, readers and answer parsing."""
import csv
import json

import pytest

from conftest import write
from test_serve_chat import serve_run
from tailorlm.cli import main
from tailorlm.errors import DataError, TailorError


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    return serve_run(tmp_path_factory, tiny_tokenizer)


@pytest.fixture(scope="module")
def trained(run):
    from tailorlm.models.trained import load_trained

    return load_trained(run, merge=True)


@pytest.fixture(scope="module")
def training_file(trained):
    return trained.cfg.data.train  # the CSV the run was trained and evaluated on


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_file_has_one_line_per_row_and_matches_the_run_evaluation(run, training_file, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), training_file, "--output", str(out), "--batch-size", "12"]) == 0
    rows = read_jsonl(out)
    assert [r["row"] for r in rows] == list(range(24))
    assert rows[0]["where"] == f"{training_file}, line 2"
    assert rows[0]["input"] == "a great movie with an award winning actor 0"
    assert {r["expected"] for r in rows} == {"positive", "negative"}
    assert all(set(r) == {"row", "where", "input", "generated", "predicted", "truncated", "expected"} for r in rows)
    # The run's own evaluation of its test rows generated exactly these answers.
    evaluated = {p["where"]: p for p in read_jsonl(run / "predictions.jsonl") if p["variant"] == "fine_tuned"}
    assert len(evaluated) == 4
    by_where = {r["where"]: r for r in rows}
    for where, p in evaluated.items():
        assert (by_where[where]["generated"], by_where[where]["predicted"]) == (p["generated"], p["predicted"])
    assert len({r["generated"] for r in rows}) > 1  # the answers differ from row to row
    assert "Wrote 24 predictions" in capsys.readouterr().out


def test_prompts_are_the_training_prompts_token_for_token(trained, training_file):
    from tailorlm.pipeline import prepare as prepare_run
    from tailorlm.serve.predict import prepare

    data = next(iter(prepare_run(trained.cfg).tasks.values()))
    trained_prompts = {s.example["_where"]: s.prompt_ids for name in ("train", "validation", "test")
                       for s in data.encoded[name]}
    rows = prepare(training_file, trained.cfg, trained.template(), trained.chat_format(), trained.labels)
    assert len(trained_prompts) == len(rows.examples) == 24
    assert {ex["_where"]: ids for ex, ids in zip(rows.examples, rows.prompts)} == trained_prompts
    # The system prompt makes some rows too long for max_length 96: they are shortened as in training.
    assert any(rows.truncated) and not all(rows.truncated)
    assert max(len(p) for p in rows.prompts) < trained.cfg.template.max_length


def test_a_file_without_labels_is_predicted(run, trained, training_file, tmp_path):
    with open(training_file, newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:5]
    unlabeled = write(tmp_path / "new.csv", "text\n" + "".join(f'"{t}"\n' for t in texts))
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), str(unlabeled), "-o", str(out), "--limit", "4"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 4 and all("expected" not in r for r in rows)
    labeled = tmp_path / "labeled.jsonl"
    assert main(["predict", str(run), training_file, "-o", str(labeled), "--limit", "4"]) == 0
    # Same texts, same prompts: the same answers whether or not a label column is there.
    assert [(r["input"], r["generated"], r["predicted"]) for r in rows] == \
           [(r["input"], r["generated"], r["predicted"]) for r in read_jsonl(labeled)]

    from tailorlm.serve.predict import prepare

    how = (trained.cfg, trained.template(), trained.chat_format(), trained.labels)
    with_labels, without = prepare(training_file, *how, limit=4), prepare(str(unlabeled), *how)
    assert without.prompts[:4] == with_labels.prompts and not without.has_answers and with_labels.has_answers


def test_a_bad_data_file_names_the_file_and_line(run, trained, tmp_path, capsys):
    from tailorlm.serve.predict import predict

    bad = write(tmp_path / "bad.csv", "text,label\n\"fine\",positive\n\"broken\",positive,extra\n")
    with pytest.raises(DataError) as caught:
        predict(trained, str(bad), tmp_path / "out.jsonl")
    assert str(caught.value) == (f"{bad}, line 3: expected 2 fields (text, label), found 3; "
                                 f"check the quoting and delimiter")
    assert main(["predict", str(run), str(bad), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "line 3: expected 2 fields" in capsys.readouterr().out
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written

    renamed = write(tmp_path / "renamed.csv", "review\nfine\n")
    with pytest.raises(DataError, match=r"renamed\.csv: no column 'text'; the columns are: review$"):
        predict(trained, str(renamed), tmp_path / "out.jsonl")


def test_predict_needs_a_run_directory(tiny_model_dir, training_file, tmp_path, capsys, trained):
    assert main(["predict", str(tiny_model_dir), training_file, "-o", str(tmp_path / "p.jsonl")]) == 2
    assert f"{tiny_model_dir}: not a run directory (config.yaml and run.json)" in capsys.readouterr().out
    with pytest.raises(TailorError, match=r": no task 'topics' in this run; choose one with --task \(classification\)$"):
        trained.task("topics")
    assert trained.task("classification")[1].preset == "classification"  # naming the only task is fine

