"""Loading a finished run for use (export, chat, predict, serve): base + trained weights + the run's template."""
import pytest
import torch

from tailorlm.cli import main
from tailorlm.errors import TailorError
from tailorlm.models.trained import is_run_dir, load_trained
from conftest import labeled_csv

FAST = ["train.max_steps=2", "train.batch_size=4", "eval.baselines=[]", "template.max_length=96", "train.lr=1e-2"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_loads_as_evaluated(tmp_path, tiny_model_dir, method):
    data = labeled_csv(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={data}", f"method.name={method}",
                 "--output", str(out), *FAST]) == 0
    assert is_run_dir(out)
    trained = load_trained(out)
    plain = load_trained(tiny_model_dir)
    assert trained.method == method and plain.method == "base"
    assert trained.labels == ["negative", "positive"]
    assert trained.weights.name == ("adapter" if method == "lora" else "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        tuned, base = trained.model(ids).logits, plain.model(ids).logits
    assert not torch.allclose(tuned, base)  # the trained weights are in effect
    if method == "lora":
        merged = load_trained(out, merge=True)
        assert not hasattr(merged.model, "peft_config")
        with torch.no_grad():
            torch.testing.assert_close(merged.model(ids).logits, tuned, atol=1e-5, rtol=1e-4)
    prompt = trained.chat_format().prompt_text(trained.template().prompt({"text": "a film"}, trained.labels))
    assert prompt.startswith("<|im_start|>")


def test_an_unfinished_run_says_how_to_continue(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: default}\n")
    (run / "run.json").write_text('{"status": "failed"}')
    with pytest.raises(TailorError, match=r"no adapter/ or model/ folder \(run status: failed\).*--resume"):
        load_trained(run)
