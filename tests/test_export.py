"""`tailor export` on runs of the tiny random Llama: every format, the checks, the Modelfile, every refusal."""
import copy
import dataclasses
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tailorlm.cli import main
from tailorlm.errors import TailorError
from tailorlm.export import verify as verify_module
from tailorlm.export.build import export_run
from tailorlm.export.layout import PLAIN_CHAT_TEMPLATE, Layout, run_layout, training_prompts
from tailorlm.export.modelfile import (
    CHATML_TEMPLATE,
    modelfile_text,
    ollama_layout,
    read_modelfile,
    render_template,
)
from tailorlm.export.verify import F16_TOLERANCE, Q8_0_TOLERANCE, verify_export
from tailorlm.models.trained import load_trained
from conftest import CHATML, labeled_csv, write

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's tokenizer.json
FAST = ["train.max_steps=2", "train.batch_size=4", "eval.baselines=[]", "template.max_length=96", "train.lr=1e-2"]
# Forgetting checks (retention perplexity on general data) and generation during training are not what
# these tests are about and take most of a short run's time: off.
QUIET_EVAL = ["eval.retention.data=null", "eval.during_training=0"]


def _run(tmp_path_factory, tiny_model_dir, name: str, *overrides: str):
    root = tmp_path_factory.mktemp(name)
    data = labeled_csv(root / "reviews.csv")
    out = root / name
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={data}", "--output", str(out), *FAST,
                 *QUIET_EVAL, *overrides]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    return _run(tmp_path_factory, tiny_model_dir, "lora-run")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    return _run(tmp_path_factory, tiny_model_dir, "full-run", "method.name=full")


@pytest.fixture(scope="module")
def merged(lora_run):
    return load_trained(lora_run, merge=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ---- hf ---------------------------------------------------------------------------------------------------

HF_CHECK = """
import json, sys
sys.modules["tailorlm"] = None  # the export must load with no tailorlm at all
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1].tolist()
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "a film"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"logits": logits, "prompt": prompt, "eos": model.generation_config.eos_token_id}))
"""


def test_hf_export_loads_in_plain_transformers_without_tailorlm(merged, tiny_model_dir, tmp_path):
    result = export_run(merged, "hf", output=tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in result.folder.iterdir()}
    ids = [1, 88, 86, 283, 202, 323]
    done = subprocess.run([sys.executable, "-c", HF_CHECK, str(result.folder), json.dumps(ids)], check=False,
                          cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = _logits(merged.model, ids)[-1]
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, atol=1e-5, rtol=1e-5)
    base = load_trained(tiny_model_dir)
    assert not torch.allclose(_logits(base.model, ids)[-1], expected, atol=1e-3)  # the LoRA is merged in
    assert out["prompt"] == "<|im_start|>user\na film<|im_end|>\n<|im_start|>assistant\n"
    assert out["eos"] == 2  # <|im_end|>, the end-of-turn token training taught

    report = verify_export(merged, result)
    assert report.ok and report.figures["logits_max_abs_diff"] == 0.0
    assert report.figures["template_identical"] == 3


# ---- adapter ----------------------------------------------------------------------------------------------

def test_adapter_export_records_its_base_and_reproduces_the_run(lora_run, tiny_model_dir, tmp_path):
    trained = load_trained(lora_run)
    result = export_run(trained, "adapter")
    assert result.folder == lora_run / "export" / "adapter"
    names = {p.name for p in result.folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tailorlm_base.json",
            "README.md"} <= names
    config = json.loads((result.folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    base = json.loads((result.folder / "tailorlm_base.json").read_text())
    assert base == {"model_path": str(tiny_model_dir), "folder": str(tiny_model_dir.resolve()), "gguf_file": None,
                    "source": str(tiny_model_dir), "dtype": "auto"}
    card = (result.folder / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{tiny_model_dir.resolve()}")' in card
    assert "PeftModel.from_pretrained(base" in card and "<|im_end|>" in card
    assert (result.folder / "adapter_model.safetensors").read_bytes() == \
        (lora_run / "adapter" / "adapter_model.safetensors").read_bytes()

    report = verify_export(trained, result)
    assert report.ok and report.figures["logits_max_abs_diff"] == 0.0


def test_a_full_fine_tuning_run_has_no_adapter_to_export(full_run):
    with pytest.raises(TailorError) as e:
        export_run(load_trained(full_run, merge=True), "adapter")
    assert str(e.value) == (f"{full_run}: a full fine-tuning run has no adapter to export; "
                            f"use --format hf or --format gguf")
    assert not (full_run / "export").exists()


# ---- gguf -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant, tolerance, matrix_type", [("f16", F16_TOLERANCE, "F16"), ("q8_0", Q8_0_TOLERANCE, "Q8_0")])
def test_gguf_round_trips_through_transformers(merged, lora_run, tmp_path, quant, tolerance, matrix_type):
    import gguf

    result = export_run(merged, "gguf", quant, tmp_path / quant)
    assert sorted(p.name for p in result.folder.iterdir()) == ["Modelfile", f"lora-run-{quant}.gguf"]
    reader = gguf.GGUFReader(result.gguf_file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"  # 1-D stay F32
    assert types["blk.1.attn_q.weight"] == matrix_type and types["token_embd.weight"] == matrix_type
    assert "output.weight" not in types  # tied embeddings: no separate output matrix
    def field(key):
        return reader.get_field(key).contents()
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == {"f16": 1, "q8_0": 7}[quant]
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("llama.context_length") == 512 and field("llama.rope.dimension_count") == 8
    vocab = merged.tokenizer.get_vocab()
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]  # the four special tokens are CONTROL
    assert field("tokenizer.ggml.eos_token_id") == 2 and field("tokenizer.ggml.bos_token_id") == 1
    assert field("tokenizer.ggml.padding_token_id") == 3 and field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == CHATML

    report = verify_export(merged, result)
    assert report.ok, report.checks
    assert 0 < report.figures["logits_rel_diff"] <= tolerance
    assert report.figures["template_identical"] == report.figures["modelfile_identical"] == 3


def test_f16_is_closer_than_q8_0(merged, tmp_path):
    figures = {q: verify_export(merged, export_run(merged, "gguf", q, tmp_path / q)).figures["logits_rel_diff"]
               for q in ("f16", "q8_0")}
    assert figures["f16"] * 5 < figures["q8_0"]


def test_rope_permutation_is_the_one_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tailorlm.export.gguf_writer import permute_for_rope

    weights = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)  # 2 kv heads of dim 8, 3 inputs
    permuted = permute_for_rope(weights, 2)
    assert not np.array_equal(permuted, weights)
    # within a head, rows go from halves (0..3 | 4..7) to interleaved pairs (0, 4, 1, 5, ...)
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    undone = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, 4, 2)
    assert np.array_equal(undone, weights)


def test_verify_fails_on_a_gguf_written_without_the_rope_permutation(merged, tmp_path, monkeypatch):
    import tailorlm.export.gguf_writer as writer

    # The random model's attention is nearly uniform, so where rotary pairs sit hardly matters to it; scaled-up
    # Q and K make attention sharp, as in a trained model, so a wrong Q/K layout shows in the logits.
    sharp = dataclasses.replace(merged, model=copy.deepcopy(merged.model))
    with torch.no_grad():
        for name, weight in sharp.model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                weight.mul_(20)
    right = verify_export(sharp, export_run(sharp, "gguf", "f16", tmp_path / "right"))
    assert right.ok

    monkeypatch.setattr(writer, "permute_for_rope", lambda weights, heads: weights)
    report = verify_export(sharp, export_run(sharp, "gguf", "f16", tmp_path / "broken"))
    assert not report.ok and not report.checks[0].ok
    assert report.figures["logits_rel_diff"] > 5 * F16_TOLERANCE
    assert report.checks[1].ok and report.checks[2].ok  # only the weights are wrong
    assert not report.checks[3].ok  # and llama.cpp, running the file, writes other tokens


def test_full_fine_tuning_run_exports_gguf(full_run):
    trained = load_trained(full_run, merge=True)
    result = export_run(trained, "gguf")
    assert result.gguf_file == full_run / "export" / "gguf-f16" / "full-run-f16.gguf"
    assert verify_export(trained, result).ok


# ---- chat layout and Modelfile ----------------------------------------------------------------------------

def test_modelfile_for_a_chatml_run(merged, tmp_path):
    result = export_run(merged, "gguf", "q8_0", tmp_path / "m")
    assert result.modelfile.read_text() == (
        "FROM ./lora-run-q8_0.gguf\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n"
        'PARAMETER stop "<|im_end|>"\n'
        "PARAMETER temperature 0\n")


def test_system_prompt_of_the_run_goes_into_the_modelfile(merged):
    layout = dataclasses.replace(run_layout(merged.tokenizer, merged.cfg), system="You label reviews.")
    ollama = ollama_layout(layout, merged.tokenizer)
    text = modelfile_text("m.gguf", ollama)
    assert 'SYSTEM """You label reviews."""\n' in text
    values = read_modelfile(text)
    messages = [{"role": "system", "content": "You label reviews."}, {"role": "user", "content": "a film"}]
    expected = merged.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_template(values["template"], {"System": values["system"], "Prompt": "a film"}) == expected


def test_a_chat_templates_default_system_prompt_is_kept(merged):
    """SmolLM2's template writes a default system turn when the conversation has none."""
    template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}" + CHATML[len("{% for m in messages %}"):])
    layout = Layout(template, True, None, "<|im_end|>", 2)
    ollama = ollama_layout(layout, merged.tokenizer)
    assert ollama.family == "chatml" and ollama.system == "You are SmolLM."
    rendered = render_template(ollama.template, {"System": ollama.system, "Prompt": "a film"})
    expected = merged.tokenizer.apply_chat_template([{"role": "user", "content": "a film"}], chat_template=template,
                                                    tokenize=False, add_generation_prompt=True)
    assert rendered == expected


def test_plain_layout_run_exports_its_answer_layout(merged, tmp_path):
    cfg = merged.cfg.model_copy(update={"template": merged.cfg.template.model_copy(update={"chat_template": "never"})})
    plain = dataclasses.replace(merged, cfg=cfg)
    result = export_run(plain, "gguf", "f16", tmp_path / "plain")
    import gguf

    assert gguf.GGUFReader(result.gguf_file).get_field("tokenizer.chat_template").contents() == PLAIN_CHAT_TEMPLATE
    assert result.modelfile.read_text() == ("FROM ./lora-run-f16.gguf\n"
                                            'TEMPLATE """{{ .Prompt }}\nAnswer:"""\n'
                                            'PARAMETER stop "<|im_end|>"\n'
                                            "PARAMETER temperature 0\n")
    report = verify_export(plain, result)
    assert report.ok and report.figures["template_identical"] == report.figures["modelfile_identical"] == 3


def test_the_template_checks_catch_a_wrong_template(merged, tmp_path):
    result = export_run(merged, "gguf", "f16", tmp_path / "g")
    modelfile = result.modelfile.read_text()
    result.modelfile.write_text(modelfile.replace('<|im_start|>assistant\n"""', '<|im_start|>assistant"""'))
    report = verify_export(merged, result)
    # the weights are right, so llama.cpp (the fourth check) agrees: only the Modelfile check fails
    assert [c.ok for c in report.checks] == [True, True, False, True] and report.figures["modelfile_identical"] == 0

    hf = export_run(merged, "hf", output=tmp_path / "hf")
    (hf.folder / "chat_template.jinja").write_text(CHATML.replace("'\n' }}{% endfor %}", "' ' }}{% endfor %}"))
    report = verify_export(merged, hf)
    assert [c.ok for c in report.checks] == [True, False] and report.figures["template_identical"] == 0


def test_render_template_refuses_constructs_it_does_not_know():
    assert render_template(CHATML_TEMPLATE, {"System": "", "Prompt": "{{ .System }}"}) == (
        "<|im_start|>user\n{{ .System }}<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(TailorError, match=r"cannot render: \{\{ range \.Messages \}\}"):
        render_template("{{ range .Messages }}{{ .Content }}{{ end }}", {})


def test_a_chat_template_family_without_an_ollama_translation_is_refused(merged):
    llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
              "+ '<|eot_id|>' }}{% endfor %}")
    with pytest.raises(TailorError) as e:
        ollama_layout(Layout(llama3, True, None, "<|eot_id|>", 2), merged.tokenizer)
    assert str(e.value) == ("cannot write an Ollama Modelfile for this chat template: only ChatML (<|im_start|>) and "
                            "the plain 'Answer:' layout are translated so far (the template uses <|end_header_id|>, "
                            "<|eot_id|>, <|start_header_id|>)")


# ---- refusals and the command line ------------------------------------------------------------------------

def test_an_unsupported_architecture_is_refused_before_anything_is_written(merged, tmp_path):
    other = dataclasses.replace(merged, model=SimpleNamespace(config=SimpleNamespace(model_type="mamba")))
    with pytest.raises(TailorError) as e:
        export_run(other, "gguf", output=tmp_path / "g")
    assert str(e.value) == ("GGUF export supports the llama, mistral, qwen2, qwen3, phi3, gemma3 architectures; "
                            "'mamba' is not supported yet (--format hf or --format adapter export any model)")
    assert list(tmp_path.iterdir()) == []


def test_a_base_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    from tailorlm.export.gguf_writer import gguf_architecture

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(TailorError, match=r"^GGUF export supports the llama, .* architectures; 'mamba' is not supported yet"):
        gguf_architecture(None, str(path))


@pytest.mark.parametrize("pre_tokenizer, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}, "llama3"),
])
def test_pre_tokenizer_names_that_transformers_reads_back(pre_tokenizer, name):
    from tailorlm.export.gguf_metadata import pre_tokenizer_name

    assert pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


def test_a_pre_tokenizer_without_a_faithful_gguf_name_is_refused():
    from tailorlm.export.gguf_metadata import pre_tokenizer_name

    smollm2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel", "use_regex": True}]}
    with pytest.raises(TailorError) as e:
        pre_tokenizer_name({"pre_tokenizer": smollm2})
    assert str(e.value) == ("GGUF export: the tokenizer's pre-tokenizer (Digits, ByteLevel) has no llama.cpp name that "
                            "transformers reads back the same way; not supported yet")


def test_tasks_with_different_chat_layouts_are_refused():
    from tailorlm.config import RunConfig
    from tailorlm.export.layout import run_template_spec

    task = lambda name, system: {"name": name, "data": {"train": "x.csv"}, "template": {"system": system}}  # noqa: E731
    cfg = RunConfig.model_validate({"tasks": [task("a", "Be brief."), task("b", None)]})
    with pytest.raises(TailorError) as e:
        run_template_spec(cfg)
    assert str(e.value) == ("the run's tasks use different system prompts or chat_template settings; "
                            "one exported model carries one chat layout")
    same = RunConfig.model_validate({"tasks": [task("a", "Be brief."), task("b", "Be brief.")]})
    assert run_template_spec(same).system == "Be brief."


def test_bad_arguments_are_refused(merged, lora_run, tmp_path):
    with pytest.raises(TailorError) as e:
        export_run(merged, "onnx")
    assert str(e.value) == "unknown export format 'onnx'; choose one of: hf, adapter, gguf"
    with pytest.raises(TailorError) as e:
        export_run(merged, "hf", "q8_0")
    assert str(e.value) == "--quant applies to --format gguf only (got --format hf)"
    with pytest.raises(TailorError) as e:
        export_run(merged, "gguf", "q4_k")
    assert str(e.value) == "unknown GGUF quantization 'q4_k'; choose one of: f16, q8_0"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("x")
    with pytest.raises(TailorError) as e:
        export_run(merged, "gguf", output=taken)
    assert str(e.value) == f"output {taken} already exists and is not empty; choose another --output or remove it"
    assert [p.name for p in taken.iterdir()] == ["file.txt"]
    (tmp_path / "empty").mkdir()
    assert export_run(merged, "hf", output=tmp_path / "empty").folder == tmp_path / "empty"  # an empty folder is fine


def test_a_failed_export_leaves_nothing_behind(merged, tmp_path, monkeypatch):
    import tailorlm.export.gguf_writer as writer

    def fail(*args, **kwargs):
        (args[2]).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_gguf", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(merged, "gguf", output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--format", "hf"]) == 2
    assert f"error: {tmp_path / 'nowhere'}: not found (tailor export takes a run directory written by `tailor run`)" \
        in capsys.readouterr().out.replace("\n", "")
    assert main(["export", str(tmp_path), "--format", "hf"]) == 2
    assert (f"error: {tmp_path}: not a run directory (no config.yaml and run.json; tailor export takes a run "
            f"directory written by `tailor run`)") in capsys.readouterr().out.replace("\n", "")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: default}\n")
    (run / "run.json").write_text('{"status": "running"}')
    assert main(["export", str(run), "--format", "gguf"]) == 2
    assert (f"error: {run}: the run is not complete (status: running); finish it with `tailor run --resume {run}` "
            f"before exporting") in capsys.readouterr().out.replace("\n", "")
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "onnx"])
    assert e.value.code == 2
    assert re.search(r"argument --format/-f: invalid choice: 'onnx' \(choose from '?hf'?, '?adapter'?, '?gguf'?\)",
                     capsys.readouterr().err)


def test_cli_exports_and_verifies(full_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gguf"
    assert main(["export", str(full_run), "--format", "gguf", "--quant", "q8_0", "--output", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "export checks" in printed and "FAIL" not in printed and printed.count(" ok ") == 4  # 3 + llama.cpp
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "full-run-q8_0.gguf"]
    # a check that fails makes the command fail
    monkeypatch.setitem(verify_module.TOLERANCES, "q8_0", 0.0)
    assert main(["export", str(full_run), "--format", "gguf", "--quant", "q8_0", "--output", str(tmp_path / "again"),
                 "--verify"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_chat_run_exports_and_its_checks_replay_the_held_out_conversations(tiny_model_dir, tmp_path, capsys):
    """The checks prompt with each held-out conversation before its final reply, as evaluation did (a Modelfile
    renders one prompt, so it is not compared for conversations)."""
    talks = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": f"the film won {i}"}, {"role": "assistant", "content": "good"}]}
             for i in range(24)]
    data = write(tmp_path / "talks.jsonl", "\n".join(json.dumps(t) for t in talks))
    run = tmp_path / "chat-run"
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={data}", "template.preset=chat",
                 "template.instruction=null", "template.prompt=null", "--output", str(run), *FAST, *QUIET_EVAL]) == 0
    assert "greedy, zero-shot: each held-out conversation before its final reply" in (run / "report.md").read_text()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "3/3 prompts identical" in printed and "FAIL" not in printed and "Modelfile" not in printed
    cases = training_prompts(load_trained(run))
    assert [m["role"] for m in cases[0].messages] == ["user", "assistant", "user"] and cases[0].user is None
