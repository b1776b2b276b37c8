"""Hugging Face datasets (hf:, save_to_disk folders, .arrow files) and in-memory data (memory:, given=) as sources.

Every dataset is built here and saved under tmp_path: nothing comes from the hub."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

from tailorlm.config import DataSpec, load_config  # noqa: E402
from tailorlm.data.dataset import load_splits  # noqa: E402
from tailorlm.data.memory import in_memory_sources, memory_table  # noqa: E402
from tailorlm.data.sources import read_splits, read_table  # noqa: E402
from tailorlm.errors import DataError, TailorError  # noqa: E402
from tailorlm.tasks import TASKS  # noqa: E402

TOPICS = ["world", "sports", "business", "sci_tech"]
FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=TOPICS)})
NEEDED = {"text", "label"}


def news(n: int, start: int = 0, labels=None) -> "datasets.Dataset":
    """n rows, labels cycling through the four topics (or the labels given)."""
    labels = labels if labels is not None else [i % 4 for i in range(n)]
    return datasets.Dataset.from_dict({"text": [f"headline number {start + i} about {TOPICS[i % 4]}" for i in range(n)],
                                       "label": labels}, features=FEATURES)


@pytest.fixture
def news_dict(tmp_path) -> Path:
    folder = tmp_path / "news"
    datasets.DatasetDict({"train": news(40), "validation": news(8, 100), "test": news(12, 200)}).save_to_disk(folder)
    return folder


def test_a_saved_dataset_dict_gives_its_train_validation_and_test_splits(news_dict):
    splits = load_splits(DataSpec(train=str(news_dict)), NEEDED)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 8, 12)
    assert splits.labels == TOPICS  # the ClassLabel's names, in its order, with no data.label_names
    assert {ex["label"] for ex in splits.test} == set(TOPICS)
    assert splits.sources == {"train": f"{news_dict} (split 'train')", "validation": f"{news_dict} (split 'validation')",
                              "test": f"{news_dict} (split 'test')"}
    assert splits.train[0]["_where"] == f"{news_dict} (split 'train'), row 1"


def test_a_named_split_is_used_alone_and_a_given_file_wins(news_dict, tmp_path):
    splits = load_splits(DataSpec(train=f"{news_dict}@train"), NEEDED)  # @SPLIT: nothing else taken from the dict
    assert splits.sources["train"] == f"{news_dict}@train"
    assert splits.sources["test"] == f"{news_dict}@train (split 20%, seed 42)"
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (28, 4, 8)
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("text,label\nmarkets fall,business\nstorm warning,world\n")
    splits = load_splits(DataSpec(train=str(news_dict), test=str(test_csv)), NEEDED)
    assert splits.sources["validation"] == f"{news_dict} (split 'validation')" and len(splits.test) == 2
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train=f"{news_dict}@tset"), NEEDED)
    assert str(e.value) == (f"data.train: {news_dict}@tset has no split 'tset' (did you mean 'test'?); its splits are: "
                            f"train, validation, test")


def test_through_the_config_and_label_names_over_the_class_names(news_dict):
    cfg = load_config(None, [f"data.train={news_dict}", "data.label_names={0: World, 1: Sports, 2: Money, 3: Science}"])
    splits = load_splits(cfg.data, NEEDED)
    assert splits.labels == ["World", "Sports", "Money", "Science"] and len(splits.validation) == 8
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train=str(news_dict), label_names={0: "world", 1: "sports"}), NEEDED)
    assert str(e.value) == f"{news_dict} (split 'train'), row 3: label '2' is not in data.label_names (known: 0, 1)"


def test_an_unlabelled_test_split_is_passed_over(tmp_path):
    folder = tmp_path / "glue_like"
    datasets.DatasetDict({"train": news(40), "test": news(10, labels=[-1] * 10)}).save_to_disk(folder)
    splits = load_splits(DataSpec(train=str(folder)), NEEDED)
    assert splits.sources["test"] == f"{folder} (split 'train') (split 20%, seed 42)"
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 40
    fields, given = in_memory_sources(datasets.load_from_disk(str(folder)))
    assert fields == {"train": "memory:data@train"}


def test_a_saved_dataset_and_an_arrow_file(tmp_path):
    news(40).save_to_disk(tmp_path / "one")
    splits = load_splits(DataSpec(train=str(tmp_path / "one")), NEEDED)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (28, 4, 8) and splits.labels == TOPICS
    arrow = next((tmp_path / "one").glob("*.arrow"))
    table = read_table(str(arrow))
    assert len(table.records) == 40 and table.records[4].where == "row 5"
    assert table.records[1].fields == {"text": "headline number 1 about sports", "label": 1}
    assert table.class_names == {"label": TOPICS}
    same = load_splits(DataSpec(train=str(arrow), validation=str(arrow), test=str(arrow)), NEEDED)
    assert same.test[2]["label"] == "business" and same.sources["test"] == str(arrow)
    with pytest.raises(DataError, match=r"one Dataset, not a DatasetDict of splits; drop '@test'$"):
        read_table(f"{tmp_path / 'one'}@test")


def test_a_token_dataset_reads_as_conll_does(tmp_path):
    tags = datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC"])
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")), "ner_tags": datasets.List(tags)})
    rows = {"tokens": [["Ada", "Lovelace", "visited", "Paris"], ["nothing", "here"]] * 10,
            "ner_tags": [[1, 2, 0, 3], [0, 0]] * 10}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ner")
    first = read_table(str(tmp_path / "ner")).records[0].fields
    assert first["ner_tags"] == ["B-PER", "I-PER", "O", "B-LOC"] and first["text"] == "Ada Lovelace visited Paris"
    assert first["entities"] == [{"type": "PER", "text": "Ada Lovelace"}, {"type": "LOC", "text": "Paris"}]
    splits = load_splits(DataSpec(train=str(tmp_path / "ner")), {"text", "entities_text"}, None, TASKS["ner"])
    assert splits.labels == ["LOC", "PER"]


def test_bad_rows_and_columns_name_the_dataset_and_the_row(tmp_path):
    rows = news(40)
    datasets.Dataset.from_dict({"text": rows["text"][:2] + [""] + rows["text"][3:], "label": rows["label"]},
                               features=FEATURES).save_to_disk(tmp_path / "holes")
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train=str(tmp_path / "holes")), NEEDED)
    assert str(e.value) == f"{tmp_path / 'holes'}, row 3: empty value in column 'text'"
    splits = load_splits(DataSpec(train=str(tmp_path / "holes"), skip_bad_rows=True), NEEDED)
    assert splits.skipped == {"train": {"empty value in column 'text'": 1}}
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train=str(tmp_path / "holes"), columns={"text": "txt"}), NEEDED)
    assert str(e.value) == (f"{tmp_path / 'holes'}: no column 'txt' (mapped from template field 'text') (did you mean "
                            f"'text'?); the columns are: text, label")


def test_a_folder_holding_a_pickle_is_refused_unread(news_dict, monkeypatch):
    (news_dict / "train" / "cache.pkl").write_bytes(b"\x80\x04K\x01.")
    monkeypatch.setattr(datasets, "load_from_disk", lambda *a, **k: pytest.fail("the folder was read"))
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train=str(news_dict)), NEEDED)
    assert str(e.value) == (f"{news_dict}: holds a pickle file (train/cache.pkl), and pickles are never loaded: "
                            f"reading one can run any code. Keep the dataset as Dataset.save_to_disk writes it "
                            f"(Arrow and JSON files only)")


def test_a_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder, but not a dataset saved with Dataset.save_to_disk"):
        read_table(str(tmp_path / "plain"))


def test_hf_offline_gives_one_line_that_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        assert "trust_remote_code" not in kwargs
        raise ConnectionError("Couldn't reach 'imdb' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="hf:imdb"), NEEDED)
    assert str(e.value) == ("data.train: hf:imdb could not be loaded from the Hugging Face hub (Couldn't reach 'imdb' "
                            "on the Hub (OfflineModeIsEnabled)); download it where the hub is reachable and save it "
                            "with Dataset.save_to_disk, then point data.train at that folder")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError("Network is unreachable")))
    with pytest.raises(DataError, match=r"^data.test: hf:glue:sst2@test could not be loaded from the Hugging Face hub "
                                        r"\(Network is unreachable\); .* then point data.test at that folder$"):
        load_splits(DataSpec(train="memory:train", test="hf:glue:sst2@test"), NEEDED, given={"train": news(40)})


def test_hf_sources_call_load_dataset_with_name_config_and_split(monkeypatch):
    calls = []

    def fake(name, config=None, split=None, **kwargs):
        calls.append((name, config, split, kwargs))
        parts = datasets.DatasetDict({"train": news(40), "validation": news(4, 50), "test": news(6, 80)})
        return parts[split] if split else parts

    monkeypatch.setattr(datasets, "load_dataset", fake)
    splits = load_splits(DataSpec(train="hf:fancy/news:en"), NEEDED)
    assert calls == [("fancy/news", "en", None, {})]
    assert splits.sources["test"] == "hf:fancy/news:en (split 'test')" and len(splits.test) == 6
    assert load_splits(DataSpec(train="hf:news@train", test="hf:news@test"), NEEDED).sources["test"] == "hf:news@test"
    assert calls[-1] == ("news", None, "test", {})


def test_a_real_offline_hub_call_gives_the_clean_message(tmp_path):
    """HF_HUB_OFFLINE=1 as a user sets it: read when datasets is imported, so in a process of its own."""
    code = ("from tailorlm.data.sources import read_table\n"
            "try:\n    read_table('hf:tailorlm-tests/no-such-dataset@train', field='data.train')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == (
        "DataError data.train: hf:tailorlm-tests/no-such-dataset@train could not be loaded from the Hugging Face hub "
        "(Couldn't reach 'tailorlm-tests/no-such-dataset' on the Hub (OfflineModeIsEnabled)); download it where the "
        "hub is reachable and save it with Dataset.save_to_disk, then point data.train at that folder")


def frame(n: int = 16) -> "pd.DataFrame":
    return pd.DataFrame({"text": [f"review {i} {'great' if i % 2 else 'awful'}" for i in range(n)],
                         "label": ["positive" if i % 2 else "negative" for i in range(n)]})


def test_a_dataframe_a_list_and_a_dataset_passed_in(tmp_path):
    df = frame()
    splits = load_splits(DataSpec(train="memory:train"), NEEDED, given={"train": df})
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 16
    assert splits.labels == ["negative", "positive"] and splits.sources["train"] == "memory:train"
    rows = df.to_dict("records")
    splits = load_splits(DataSpec(train="memory:train", test="memory:test"), NEEDED,
                         given={"train": rows, "test": rows[:4]})
    assert len(splits.test) == 4 and splits.test[0]["_where"].startswith("memory:test, list item ")
    splits = load_splits(DataSpec(train="memory:train"), NEEDED, given={"train": news(40)})
    assert splits.labels == TOPICS and splits.train[0]["_where"].startswith("memory:train, Dataset row ")
    parts = datasets.DatasetDict({"train": news(40), "dev": news(4, 50), "test": news(40, 80)})
    splits = load_splits(DataSpec(train="memory:data"), NEEDED, given={"data": parts})
    assert splits.sources == {"train": "memory:data (split 'train')", "validation": "memory:data (split 'dev')",
                              "test": "memory:data (split 'test')"}
    splits = load_splits(DataSpec(train="memory:data@test", test="memory:data@dev"), NEEDED, given={"data": parts})
    assert splits.sources["train"] == "memory:data@test" and len(splits.test) == 4


def test_missing_values_in_memory_name_the_split_and_row():
    df = frame(40)
    df.loc[1, "text"] = math.nan
    df.loc[5, "text"] = None
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="memory:train"), NEEDED, given={"train": df})
    assert str(e.value) == "memory:train, DataFrame row 2: empty value in column 'text'"
    splits = load_splits(DataSpec(train="memory:train", skip_bad_rows=True), NEEDED, given={"train": df})
    assert splits.skipped == {"train": {"empty value in column 'text'": 2}}
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="memory:train"), NEEDED, given={"train": [{"text": "a", "label": "x"}, "b"]})
    assert str(e.value) == "memory:train, list item 2: expected a dict (one row), found str"
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="memory:train", columns={"text": "review"}), NEEDED, given={"train": df})
    assert str(e.value) == ("memory:train: no column 'review' (mapped from template field 'text'); the columns are: "
                            "text, label")


def test_memory_without_the_data_says_to_pass_it_again():
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="memory:train"), NEEDED)
    assert str(e.value) == ("data.train: memory:train is data that was passed in Python (tailorlm.run(data=...)); "
                            "pass it again from Python, or save it to a file and point data.train at it")
    with pytest.raises(DataError) as e:
        load_splits(DataSpec(train="memory:trian"), NEEDED, given={"train": frame()})
    assert str(e.value) == ("data.train: memory:trian names no data passed in Python (did you mean 'train'?); "
                            "passed: memory:train")


def test_in_memory_sources_for_what_a_notebook_passes(tmp_path):
    df = frame()
    assert in_memory_sources(df) == ({"train": "memory:train"}, {"train": df})
    parts = datasets.DatasetDict({"train": news(8), "valid": news(4), "test": news(4)})
    assert in_memory_sources(parts) == ({"train": "memory:data@train", "validation": "memory:data@valid",
                                         "test": "memory:data@test"}, {"data": parts})
    rows = df.to_dict("records")
    assert in_memory_sources({"train": df, "test": rows, "validation": str(tmp_path / "v.csv")}) == (
        {"train": "memory:train", "test": "memory:test", "validation": str(tmp_path / "v.csv")},
        {"train": df, "test": rows})
    with pytest.raises(TailorError, match=r"^data=: a dict of splits has the keys train, validation and test; "
                                          r"got 'tset' \(did you mean 'test'\?\)$"):
        in_memory_sources({"train": df, "tset": df})
    with pytest.raises(TailorError, match=r"^data=: expected a pandas DataFrame, a list of dicts or a datasets.Dataset, "
                                          r"a DatasetDict, or a dict of them by split \(train, validation, test\); "
                                          r"got int$"):
        in_memory_sources(3)
    fields, given = in_memory_sources(parts)
    tables = read_splits({"train": "memory:data", "validation": fields["validation"], "test": None}, given=given)
    assert {s: len(t.records) for s, t in tables.items()} == {"train": 8, "validation": 4, "test": 4}
    assert tables["test"].path == "memory:data (split 'test')"  # data.train named the dict without a split
    assert len(memory_table(df, "rows").records) == 16
