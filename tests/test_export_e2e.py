"""The real SmolLM2-135M-Instruct: a short fine-tuning run on BBC News, exported to GGUF f16 and q8_0, checked."""
import pytest

from tailorlm.cli import main

# Replaced by the export (file type, quantization version) or by the run's own values (equal for SmolLM2).
REPLACED = {"general.file_type", "general.quantization_version"}
# Forgetting checks (retention perplexity on general data) and generation during training are not what
# this test is about and take most of a short run's time: off.
QUIET_EVAL = ["eval.retention.data=null", "eval.during_training=0"]


@pytest.mark.slow
def test_smollm2_run_exports_gguf_that_keeps_its_metadata_and_passes_the_checks(tmp_path):
    from gguf import GGUFReader

    from tailorlm.export.build import export_run
    from tailorlm.export.layout import training_prompts
    from tailorlm.export.verify import F16_TOLERANCE, Q8_0_TOLERANCE, verify_export
    from tailorlm.models.loading import default_model_path
    from tailorlm.models.trained import load_trained

    run = tmp_path / "bbc"
    assert main(["run", "data.limit.train=16", "data.limit.validation=8", "data.limit.test=8", "train.max_steps=2",
                 "eval.baselines=[]", "template.max_length=128", "--output", str(run), *QUIET_EVAL]) == 0
    trained = load_trained(run, merge=True)
    cases = training_prompts(trained)
    source = GGUFReader(default_model_path())
    source_fields = {name: f.contents() for name, f in source.fields.items()
                     if not name.startswith("GGUF.") and name not in REPLACED}
    assert source_fields["general.architecture"] == "llama" and len(source_fields["tokenizer.ggml.tokens"]) == 49152

    figures = {}
    for quant, tolerance in (("f16", F16_TOLERANCE), ("q8_0", Q8_0_TOLERANCE)):
        result = export_run(trained, "gguf", quant)
        report = verify_export(trained, result, cases)
        report.show()
        assert report.ok, report.checks
        figures[quant] = report.figures["logits_rel_diff"]
        assert report.figures["template_identical"] == report.figures["modelfile_identical"] == len(cases) == 3

        exported = GGUFReader(result.gguf_file)
        fields = {name: f.contents() for name, f in exported.fields.items() if not name.startswith("GGUF.")}
        # every architecture and tokenizer field of the source file, unchanged (context length, rope, tokens, merges,
        # chat template, special ids), and only the file type changed
        assert {k: v for k, v in fields.items() if k not in REPLACED} == source_fields
        assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[quant]
        assert fields["llama.context_length"] == 8192 and fields["tokenizer.ggml.eos_token_id"] == 2
        def shapes(reader):
            return sorted((t.name, t.shape.tolist()) for t in reader.tensors)
        assert shapes(exported) == shapes(source)
        modelfile = result.modelfile.read_text()
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
        assert 'PARAMETER stop "<|im_end|>"' in modelfile

    print(f"max |logit diff| / logit std: f16 {figures['f16']:.4f}, q8_0 {figures['q8_0']:.4f}")
    assert figures["f16"] < figures["q8_0"]
