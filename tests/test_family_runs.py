"""Every family through every method, and through a whole `tailor run` and every export format.

test_families.py checks each family's fast paths and GGUF conversion on their own; here the same tiny models
go through the user's path: each training method for a few steps (what it trains moves, the rest stays), then
one complete run per family (its chat template, or the plain layout for a model without one), exported as a
Hugging Face folder, as an adapter and as a GGUF that `--verify` runs in transformers and in llama.cpp."""
import copy
import json

import pytest
import torch

from conftest import CHATML, labeled_csv
from family_models import FAMILIES, tiny_family_model
from tailorlm.cli import main
from tailorlm.config import FreezeSpec, MethodSpec, TrainSpec
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.models.methods import make_strategy
from tailorlm.train.loop import train
from test_export import FAST, QUIET_EVAL

METHODS = {"full": MethodSpec(name="full"), "lora": MethodSpec(name="lora"),
           "freeze": MethodSpec(name="freeze", freeze=FreezeSpec(first_blocks=1)),
           "gradual_unfreeze": MethodSpec(name="gradual_unfreeze")}
PLAIN = "mistral"  # its tiny model is saved without a chat template: the run uses the plain layout


def _samples(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        ids = torch.randint(10, vocab, (20,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * 14 + ids[14:], {}))
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_every_family(family, method, tiny_tokenizer):
    model = tiny_family_model(family, len(tiny_tokenizer), sharp=False)
    strategy = make_strategy(METHODS[method])
    model = strategy.prepare(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, strategy, _samples(len(tiny_tokenizer)), TrainSpec(max_steps=4, batch_size=4, eval_every=0,
                   warmup_ratio=0), 1e-2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert result.completed == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.train_loss)
    trained = set(strategy.checkpoint_params(model))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert trained and moved <= trained  # nothing the method leaves alone changed
    assert len(moved) >= 0.5 * len(trained), sorted(trained - moved)
    if method == "lora":
        assert all("lora_" in n for n in trained)
    if method == "freeze":  # the embeddings and the first block stay as they were
        assert not any("embed" in n or ".layers.0." in n for n in moved)


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, tiny_tokenizer):
    family = request.param
    root = tmp_path_factory.mktemp(f"run-{family}")
    model_dir = root / "model"
    tiny_family_model(family, len(tiny_tokenizer)).save_pretrained(model_dir)
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session's tokenizer stays as it is
    tokenizer.chat_template = None if family == PLAIN else CHATML
    tokenizer.save_pretrained(model_dir)
    run = root / "run"
    assert main(["run", f"model.path={model_dir}", f"data.train={labeled_csv(root / 'reviews.csv')}",
                 "--output", str(run), *FAST, *QUIET_EVAL]) == 0
    return family, run


def test_a_run_of_every_family_evaluates_and_records_its_layout(family_run):
    family, run = family_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert "accuracy" in json.dumps(metrics)
    manifest = json.loads((run / "manifest.json").read_text())
    layouts = {task["chat_layout"] for task in manifest["tasks"].values()}
    assert layouts == ({"plain"} if family == PLAIN else {"chat template"}), layouts


@pytest.mark.parametrize("fmt", ["hf", "adapter", "gguf"])
def test_every_family_exports_in_every_format_and_verifies(family_run, fmt):
    if fmt == "gguf":
        pytest.importorskip("llama_cpp", reason="the GGUF check runs the file in llama.cpp")
    family, run = family_run
    assert main(["export", str(run), "--format", fmt, "--verify"]) == 0
    written = {p.name for folder in (run / "export").glob(f"{fmt}*") for p in folder.iterdir()}
    expected = {"hf": "config.json", "adapter": "adapter_config.json", "gguf": "run-f16.gguf"}[fmt]
    assert expected in written, (family, sorted(written))
