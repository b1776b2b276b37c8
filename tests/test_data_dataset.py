from collections import Counter

import pytest

from tailorlm.config import DataSpec
from tailorlm.data.dataset import load_splits, sample_stratified, split_stratified
from tailorlm.errors import DataError
from conftest import labeled_csv, write


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    spec = DataSpec(train=str(labeled_csv(tmp_path / "d.csv", n_per_label=20)), split={"validation": 0.1, "test": 0.25})
    a = load_splits(spec, {"text", "label"})
    b = load_splits(spec, {"text", "label"})
    assert [ex["text"] for ex in a.test] == [ex["text"] for ex in b.test]
    assert Counter(ex["label"] for ex in a.test) == {"positive": 5, "negative": 5}
    assert Counter(ex["label"] for ex in a.validation) == {"positive": 2, "negative": 2}
    seen = [ex["text"] for split in (a.train, a.validation, a.test) for ex in split]
    assert len(seen) == len(set(seen)) == 40
    assert a.labels == ["negative", "positive"]
    assert a.test[0]["_where"].startswith(f"{tmp_path / 'd.csv'}, line ")


def test_limits_keep_label_proportions():
    examples = [{"label": "a"}] * 60 + [{"label": "b"}] * 30 + [{"label": "c"}] * 10
    picked = sample_stratified(examples, 10, seed=1, key="label")
    assert Counter(ex["label"] for ex in picked) == {"a": 6, "b": 3, "c": 1}
    rest, part = split_stratified([{"label": str(i % 2), "i": i} for i in range(10)], [0.2], seed=0, key="label")
    assert len(part) == 2 and len(rest) == 8


def test_column_mapping_and_label_names(tmp_path):
    path = write(tmp_path / "reviews.jsonl", "".join(f'{{"review": "text {i}", "stars": {i % 2}}}\n' for i in range(20)))
    spec = DataSpec(train=str(path), columns={"text": "review", "label": "stars"},
                    label_names={"0": "negative", "1": "positive"})
    splits = load_splits(spec, {"text", "label"})
    assert splits.labels == ["negative", "positive"]
    assert {ex["label"] for ex in splits.train} == {"negative", "positive"}


def test_label_names_with_integer_keys_map_integer_labels(tmp_path):
    """{0: negative}, as YAML reads the field's own example, maps 0 in a CSV and in JSON alike."""
    rows = "".join(f'{{"text": "text {i}", "label": {i % 2}}}\n' for i in range(20))
    for path in (write(tmp_path / "d.jsonl", rows), labeled_csv(tmp_path / "d.csv", n_per_label=10)):
        if path.suffix == ".csv":
            path.write_text(path.read_text().replace(",positive", ",1").replace(",negative", ",0"))
        splits = load_splits(DataSpec(train=str(path), label_names={0: "negative", 1: "positive"}), {"text", "label"})
        assert splits.labels == ["negative", "positive"]
        assert Counter(ex["label"] for ex in splits.train + splits.validation + splits.test) == {"negative": 10,
                                                                                                "positive": 10}


@pytest.mark.parametrize("content, spec_extra, message", [
    ("text,lable\na,x\n", {}, r"d.csv: no column 'label' \(did you mean 'lable'\?\); the columns are: text, lable"),
    ("review,label\na,x\n", {"columns": {"text": "body"}},
     r"no column 'body' \(mapped from template field 'text'\); the columns are: review, label"),
    ("text,label\na,x\nb,\n", {}, r"d.csv, line 3: empty value in column 'label'"),
    ("text,label\na,0\nb,7\n", {"label_names": {"0": "neg"}}, r"d.csv, line 3: label '7' is not in data.label_names \(known: 0\)"),
])
def test_bad_columns_and_values(tmp_path, content, spec_extra, message):
    spec = DataSpec(train=str(write(tmp_path / "d.csv", content)), **spec_extra)
    with pytest.raises(DataError, match=message):
        load_splits(spec, {"text", "label"})


def test_mixed_label_types_and_wrong_value_types(tmp_path):
    mixed = write(tmp_path / "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(DataError, match=r"m.jsonl, line 2: mixed label types: int \(first at line 1\) and str"):
        load_splits(DataSpec(train=str(mixed)), {"text", "label"})
    nested = write(tmp_path / "n.jsonl", '{"text": ["a"], "label": 1}\n')
    with pytest.raises(DataError, match=r"n.jsonl, line 1: column 'text' holds a list, expected text or a number"):
        load_splits(DataSpec(train=str(nested)), {"text", "label"})


def test_empty_split_is_an_error(tmp_path):
    path = write(tmp_path / "tiny.csv", "text,label\na,x\n")
    with pytest.raises(DataError, match=r"the (validation|test) split is empty"):
        load_splits(DataSpec(train=str(path)), {"text", "label"})


def test_skip_bad_rows_counts_each_reason(tmp_path):
    from tailorlm.errors import DataError

    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood one,a\n,b\nfine,b\n  ,a\nok,c\nsure,a\n")
    with pytest.raises(DataError, match=r"d.csv, line 3: empty value in column 'text'"):
        load_splits(DataSpec(train=str(path), test=str(path), validation=str(path)), {"text", "label"})
    spec = DataSpec(train=str(path), test=str(path), validation=str(path), skip_bad_rows=True,
                    label_names={"a": "alpha", "b": "beta"})
    splits = load_splits(spec, {"text", "label"})
    assert len(splits.train) == 3
    assert splits.skipped["train"] == {"empty value in column 'text'": 2,
                                       "label 'c' is not in data.label_names (known: a, b)": 1}


def test_empty_share_caps_entity_free_training_sentences(tmp_path):
    from tailorlm.tasks import TASKS

    with_entity = "Paris\tB-location\nis\tO\nnice\tO\n\n"
    without = "it\tO\nrains\tO\n{i}\tO\n\n"
    train = write(tmp_path / "train.conll", with_entity * 2 + "".join(without.format(i=i) for i in range(6)))
    test = write(tmp_path / "test.conll", with_entity + without.format(i="x"))
    spec = DataSpec(train=str(train), validation=str(test), test=str(test), empty_share=0.5)
    splits = load_splits(spec, {"text", "entities_text"}, None, TASKS["ner"])
    assert len(splits.train) == 4 and sum(not ex["entities"] for ex in splits.train) == 2  # 2 of 4 = the share
    assert splits.skipped == {"train": {"no entity, beyond data.empty_share=0.5": 4}}
    assert len(splits.test) == 2  # evaluation splits keep their entity-free sentences
    again = load_splits(spec, {"text", "entities_text"}, None, TASKS["ner"])
    assert [ex["text"] for ex in again.train] == [ex["text"] for ex in splits.train]  # seeded


def test_empty_share_is_for_extraction_tasks(tmp_path):
    path = labeled_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"data.empty_share applies to extraction tasks \(template.preset: ner\)"):
        load_splits(DataSpec(train=str(path), empty_share=0.2), {"text", "label"})
