"""The real SmolLM2-135M-Instruct on real SST-2 sentences: a small slice, end to end, through the CLI."""
import copy
import json
from pathlib import Path

import pytest
import torch

from tailorlm.cli import main
from tailorlm.config import TemplateSpec, load_config
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_training_prompt_is_the_chat_template_generation_prompt(smollm2):
    tokenizer = smollm2.tokenizer
    spec = TemplateSpec()
    ex = {"text": "A gorgeous, witty film.", "label": "positive", "_where": "x"}
    (sample,), _ = encode_examples([ex], PromptTemplate(spec), ChatFormat(tokenizer, spec), ["negative", "positive"], spec)
    messages = [{"role": "user", "content": PromptTemplate(spec).prompt(ex, ["negative", "positive"])}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert sample.prompt_ids == list(expected)
    assert tokenizer.decode(sample.input_ids[len(sample.prompt_ids):]) == "positive<|im_end|>"


@pytest.mark.slow
def test_sst2_slice_fine_tunes_and_saves_a_peft_adapter(tmp_path, shared_data, smollm2):
    from peft import PeftModel

    sst2 = shared_data / "sst2"
    out = tmp_path / "sst2"
    overrides = [f"data.train={sst2 / 'stsa.binary.train'}", f"data.validation={sst2 / 'stsa.binary.dev'}",
                 f"data.test={sst2 / 'stsa.binary.test'}", "data.limit.train=96", "data.limit.validation=16",
                 "data.limit.test=48", "train.max_steps=10", "train.batch_size=8", "train.eval_every=5",
                 "eval.few_shot_k=2", "eval.during_training=8", "eval.retention.limit=16"]
    load_config(EXAMPLES / "sst2.yaml", overrides)  # the example config itself is valid
    assert main(["run", str(EXAMPLES / "sst2.yaml"), "--output", str(out), *overrides]) == 0

    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["classification"]["variants"]
    tuned = metrics["fine_tuned"]
    assert tuned["valid"] == 1.0  # after 10 steps every answer is a label
    assert tuned["accuracy"] >= 0.7
    log = json.loads((out / "train_log.json").read_text())
    assert log["val_loss"][-1]["loss"] < log["val_loss"][0]["loss"]
    assert log["train_loss"][-1]["loss"] < log["train_loss"][0]["loss"]
    # evaluations at 0, 5, 10 with the metric on generated validation text and retention of general data
    assert [e["step"] for e in log["evaluations"]] == [0, 5, 10]
    assert {"classification/accuracy", "classification/macro_f1", "retention_ppl"} <= set(log["evaluations"][-1])
    assert log["evaluations"][-1]["classification/valid"] == 1.0  # the generated validation answers are all labels by step 10
    assert 1.0 < log["retention"]["base_ppl"] < 20.0 and abs(log["retention"]["change"]) < 0.25

    base = copy.deepcopy(smollm2.model)
    ids = torch.tensor([[1, 4093, 314, 253, 1345]])
    before = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    assert not torch.allclose(adapted(input_ids=ids).logits, before)
