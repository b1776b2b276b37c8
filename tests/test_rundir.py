"""RunDir: the one reader and writer of a run directory; manifest.json carries what using the model needs."""
import json
import shutil

import pytest

from conftest import labeled_csv
from tailorlm.cli import main
from tailorlm.errors import TailorError
from tailorlm.export.layout import training_prompts
from tailorlm.models.trained import load_trained
from tailorlm.rundir import RunDir, write_json

FAST = ["train.max_steps=2", "train.batch_size=4", "train.eval_every=2", "eval.baselines=[]",
        "template.max_length=96"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rundir")
    data = labeled_csv(root / "reviews.csv")
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={data}", "-o", str(root / "run"), *FAST]) == 0
    return root


def test_the_manifest_records_what_using_the_model_needs(finished):
    run = RunDir(finished / "run")
    manifest = run.manifest()
    assert not manifest.legacy and manifest.method == "lora" and manifest.weights == "adapter"
    name, task = manifest.task()
    assert (name, task.preset, task.labels, task.chat_layout) == ("classification", "classification",
                                                                 ["negative", "positive"], "chat template")
    assert task.template["max_length"] == 96 and len(task.examples) == 4  # every test row (4 of 24)
    assert all(set(ex) == {"text", "label"} for ex in task.examples)
    assert not [p.name for p in run.path.rglob("*.tmp")]  # every write renamed into place


def test_export_checks_need_no_data_file_once_the_run_is_done(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished / "run", copy)
    (finished / "reviews.csv").rename(tmp_path / "moved.csv")  # the training data is gone
    try:
        trained = load_trained(copy)
        assert trained.labels == ["negative", "positive"]
        cases = training_prompts(trained)
        assert len(cases) == 3 and cases[0].user.endswith(json.loads((copy / "manifest.json").read_text())
                                                         ["tasks"]["classification"]["examples"][0]["text"])
        (copy / "manifest.json").unlink()  # a run written before manifests: labels from its data report
        legacy = load_trained(copy)
        assert legacy.manifest.legacy and legacy.labels == ["negative", "positive"]
        with pytest.raises(TailorError, match=r"the checks need the run's test data, which cannot be read now: "
                                              r".*reviews\.csv.*runs written by this version keep a few test "
                                              r"examples in manifest\.json"):
            training_prompts(legacy)
    finally:
        (tmp_path / "moved.csv").rename(finished / "reviews.csv")


def test_a_damaged_run_file_is_named(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished / "run", copy)
    write_json(copy / "manifest.json", {"tasks": []})
    with pytest.raises(TailorError, match=r"manifest\.json: not a manifest this version of tailorlm reads"):
        RunDir(copy).manifest()
    (copy / "run.json").write_text("{oops")
    assert RunDir(copy).status() == "unreadable run.json"
    with pytest.raises(TailorError, match=r"run\.json: invalid JSON"):
        RunDir(copy).state()
    with pytest.raises(TailorError, match=r"the run is not complete \(status: unreadable run\.json\)"):
        RunDir(copy).require_complete("tailor export", "exporting")
