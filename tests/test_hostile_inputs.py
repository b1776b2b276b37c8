"""A corpus of hostile and broken inputs, run through every CLI verb that takes them: each must end in one clear
line that names the file, a non-zero exit code, no traceback, and nothing written. Plus the security cases:
remote code only when the command says so, no pickle ever loaded, templates that cannot reach Python."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tailorlm.cli import main
from conftest import build_tiny_tokenizer, labeled_csv, tiny_llama, write

FAST = ["train.max_steps=2", "train.batch_size=4", "eval.baselines=[]", "template.max_length=96",
        "eval.during_training=0", "train.eval_every=0"]
PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."  # pickle.dumps(1): a pickle, harmless here


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One folder of hostile models, runs and files, built once (tiny models: seconds)."""
    root = tmp_path_factory.mktemp("hostile")
    tokenizer = build_tiny_tokenizer()
    good = root / "good-model"
    tiny_llama(len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)

    def model_copy(name: str, drop: tuple = ()) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        for f in drop:
            (folder / f).unlink()
        return folder

    write(root / "text.gguf", "this is a text file, renamed\n")
    from tailorlm.models.loading import default_model_path

    real = default_model_path()  # a real GGUF, cut after its header began: a failed download
    write(root / "cut.gguf", real.read_bytes()[:4096])
    write(root / "header-cut.gguf", real.read_bytes()[:12])
    write(root / "vocab-only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1))  # a header that counts no tensors
    write(model_copy("pickled", drop=("model.safetensors",)) / "pytorch_model.bin", PICKLE)
    model_copy("no-weights", drop=("model.safetensors",))
    write(model_copy("garbage-weights") / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    write(model_copy("bad-config") / "config.json", '{"model_type": "llama",\n "hidden_size": 32,,\n}')
    more = model_copy("missing-tensors")  # a config for 4 layers over the weights of 2
    config = json.loads((more / "config.json").read_text())
    write(more / "config.json", json.dumps({**config, "num_hidden_layers": 4}))
    custom = model_copy("custom-code")
    write(custom / "config.json", json.dumps({**config, "model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    write(custom / "evil.py", "raise SystemExit('remote code ran')\n")
    write(model_copy("bad-tokenizer") / "tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}')
    write(root / "weights.bin", PICKLE)

    data = labeled_csv(root / "reviews.csv")
    run = root / "run"
    assert main(["run", f"model.path={good}", f"data.train={data}", "--output", str(run), *FAST]) == 0

    def run_copy(name: str) -> Path:
        shutil.copytree(run, root / name, ignore=shutil.ignore_patterns(".lock"))
        return root / name

    remote = run_copy("run-remote-code")
    write(remote / "config.yaml", (remote / "config.yaml").read_text().replace(
        "trust_remote_code: false", "trust_remote_code: true"))
    adapter = run_copy("run-pickled-adapter") / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    write(adapter / "adapter_model.bin", PICKLE)
    write(run_copy("run-garbage-adapter") / "adapter" / "adapter_model.safetensors", b"\x00" * 64)
    write(run_copy("run-bad-yaml") / "config.yaml", "model: {path: default\ndata: [\n")
    write(root / "a-file", "not a folder\n")
    write(root / "escape.yaml", "template:\n  prompt: \"{{ text.__class__.__mro__[1].__subclasses__() }}\"\n")
    write(root / "parquet-that-is-csv.parquet", "text,label\nok,x\n")
    write(root / "csv-that-is-gzip.csv", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    write(root / "bad-retention.jsonl", '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say\n')
    return root


# verb arguments ({r}: the corpus folder) -> a piece of the one error line, which must name the file.
CASES = {
    "gguf-that-is-text": (["run", "model.path={r}/text.gguf", "data.train={r}/reviews.csv"],
                          "{r}/text.gguf is not a GGUF file"),
    "gguf-cut-short": (["run", "model.path={r}/cut.gguf", "data.train={r}/reviews.csv"],
                       "{r}/cut.gguf is a damaged GGUF file"),
    "gguf-header-cut-short": (["run", "model.path={r}/header-cut.gguf", "data.train={r}/reviews.csv"],
                              "{r}/header-cut.gguf is a damaged GGUF file (its header is cut short)"),
    "gguf-without-tensors": (["chat", "{r}/vocab-only.gguf"],
                             "{r}/vocab-only.gguf is a GGUF file with no tensors (a vocabulary-only file?)"),
    "pickle-only-folder": (["run", "model.path={r}/pickled", "data.train={r}/reviews.csv"],
                           "{r}/pickled holds its weights only as a pickle (pytorch_model.bin)"),
    "pickle-file": (["chat", "{r}/weights.bin"], "{r}/weights.bin is a pickle"),
    "folder-without-weights": (["preflight", "model.path={r}/no-weights", "data.train={r}/reviews.csv"],
                               "{r}/no-weights has no weights: expected model.safetensors"),
    "weights-not-safetensors": (["serve", "{r}/garbage-weights"],
                                "{r}/garbage-weights/model.safetensors is not a valid safetensors file"),
    "config-not-json": (["chat", "{r}/bad-config"], "{r}/bad-config/config.json, line 2: the model config is not valid JSON"),
    "weights-lack-tensors": (["run", "model.path={r}/missing-tensors", "data.train={r}/reviews.csv"],
                             "{r}/missing-tensors: the weights lack 18 of the 38 tensors"),
    "remote-code-folder": (["chat", "{r}/custom-code"], "{r}/custom-code: this model's architecture (evil) is Python code"),
    "damaged-tokenizer": (["run", "model.path={r}/bad-tokenizer", "data.train={r}/reviews.csv"],
                          "cannot load the tokenizer of '{r}/bad-tokenizer'"),
    "run-asks-remote-code-export": (["export", "{r}/run-remote-code", "--format", "adapter"],
                                    "{r}/run-remote-code/config.yaml: 1 problem(s)"),
    "run-asks-remote-code-chat": (["chat", "{r}/run-remote-code"], "{r}/run-remote-code/config.yaml: 1 problem(s)"),
    "run-asks-remote-code-predict": (["predict", "{r}/run-remote-code", "{r}/reviews.csv", "-o", "{r}/p.jsonl"],
                                     "{r}/run-remote-code/config.yaml: 1 problem(s)"),
    "run-asks-remote-code-serve": (["serve", "{r}/run-remote-code"], "{r}/run-remote-code/config.yaml: 1 problem(s)"),
    "run-asks-remote-code-resume": (["run", "--resume", "{r}/run-remote-code"], "{r}/run-remote-code/config.yaml: 1 problem(s)"),
    "pickled-adapter": (["export", "{r}/run-pickled-adapter", "--format", "hf", "-o", "{r}/x"],
                        "{r}/run-pickled-adapter/adapter holds its weights only as a pickle (adapter_model.bin)"),
    "garbage-adapter": (["predict", "{r}/run-garbage-adapter", "{r}/reviews.csv", "-o", "{r}/p.jsonl"],
                        "{r}/run-garbage-adapter/adapter/adapter_model.safetensors is not a valid safetensors file"),
    "run-config-not-yaml": (["export", "{r}/run-bad-yaml", "--format", "adapter"], "{r}/run-bad-yaml/config.yaml: 1 problem(s)"),
    "output-is-a-file": (["run", "model.path={r}/good-model", "data.train={r}/reviews.csv", "--output", "{r}/a-file"],
                         "output directory {r}/a-file is an existing file"),
    "output-under-a-file": (["preflight", "model.path={r}/good-model", "data.train={r}/reviews.csv", "--output",
                             "{r}/a-file/out"], "{r}/a-file"),
    "export-output-is-a-file": (["export", "{r}/run", "--format", "adapter", "-o", "{r}/a-file"], "{r}/a-file"),
    "predict-output-under-a-file": (["predict", "{r}/run", "{r}/reviews.csv", "-o", "{r}/a-file/p.jsonl"], "{r}/a-file"),
    "template-escape": (["run", "{r}/escape.yaml", "model.path={r}/good-model", "data.train={r}/reviews.csv"],
                        "{r}/escape.yaml: 1 problem(s) in the config:\n  - template.prompt: the template tried something"),
    "parquet-that-is-csv": (["preflight", "model.path={r}/good-model", "data.train={r}/parquet-that-is-csv.parquet"],
                            "{r}/parquet-that-is-csv.parquet"),
    "csv-that-is-gzip": (["preflight", "model.path={r}/good-model", "data.train={r}/csv-that-is-gzip.csv"],
                         "{r}/csv-that-is-gzip.csv"),
    "predict-data-missing": (["predict", "{r}/run", "{r}/nope.csv", "-o", "{r}/p.jsonl"], "{r}/nope.csv"),
    "compare-a-file": (["compare", "{r}/run", "{r}/a-file"], "{r}/a-file"),
    "runs-a-file": (["runs", "{r}/a-file"], "{r}/a-file"),
    "export-not-a-run": (["export", "{r}/good-model", "--format", "hf"], "{r}/good-model"),
}


@pytest.mark.parametrize("name", CASES)
def test_hostile_input_ends_in_one_clear_line(corpus, capsys, name):
    argv, expected = CASES[name]
    before = sorted(p.name for p in corpus.iterdir())
    code = main([a.format(r=corpus) for a in argv])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0, text
    assert "Traceback" not in text and "unexpected" not in text, text
    assert "error:" in text and expected.format(r=corpus) in text, text
    assert "remote code ran" not in text
    assert sorted(p.name for p in corpus.iterdir()) == before  # nothing half-written beside the inputs


def test_bad_weights_are_found_before_the_run_directory_exists(corpus, tmp_path):
    out = tmp_path / "out"
    for model in ("garbage-weights", "missing-tensors", "pickled", "text.gguf", "cut.gguf", "vocab-only.gguf"):
        assert main(["run", f"model.path={corpus / model}", f"data.train={corpus / 'reviews.csv'}",
                     "--output", str(out), *FAST]) == 2
        assert not out.exists()


def test_bad_retention_data_fails_before_the_run_directory_or_the_model(corpus, tmp_path, capsys, monkeypatch):
    """eval.retention.data is read with the rest of the input: a broken file stops the run before the run folder
    exists, the weights load or any baseline runs."""
    import tailorlm.pipeline.stages as stages

    monkeypatch.setattr(stages, "load_base", lambda *a: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    for data, expected in ((corpus / "bad-retention.jsonl", f"{corpus}/bad-retention.jsonl, line 2: invalid JSON"),
                           (corpus / "missing.jsonl", f"{corpus}/missing.jsonl")):
        code = main(["run", f"model.path={corpus / 'good-model'}", f"data.train={corpus / 'reviews.csv'}",
                     f"eval.retention.data={data}", "--output", str(out), *FAST])
        text = capsys.readouterr()
        assert code == 2 and expected in text.out + text.err, text
        assert not out.exists()


def test_remote_code_runs_only_with_the_flag(corpus, capsys):
    """The flag is the consent; without it a run folder's config cannot turn remote code on."""
    from tailorlm.config import load_config
    from tailorlm.models.trained import load_trained

    cfg = load_config(corpus / "run-remote-code" / "config.yaml", trust_remote_code=True)
    assert cfg.model.trust_remote_code is True
    trained = load_trained(corpus / "run-remote-code", trust_remote_code=True)  # a built-in architecture: loads
    assert trained.cfg.model.trust_remote_code is True
    assert load_config(corpus / "run" / "config.yaml").model.trust_remote_code is False
    with pytest.raises(SystemExit, match="remote code ran"):  # with consent, the folder's code does run
        main(["chat", str(corpus / "custom-code"), "--trust-remote-code", "--debug"])
    assert main(["run", "model.trust_remote_code=true", "--print-config"]) == 2
    assert "add --trust-remote-code to the command" in capsys.readouterr().out


def test_no_pickle_is_loaded_even_beside_safetensors(corpus, monkeypatch):
    """A pytorch_model.bin next to model.safetensors is never opened: torch.load is not called at all."""
    from tailorlm.config import ModelSpec
    from tailorlm.models.loading import load_model

    folder = corpus / "good-model"

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_model(ModelSpec(path=str(folder)), torch.device("cpu"))
    assert loaded.model.config.num_hidden_layers == 2


def test_resume_of_a_complete_run_does_nothing(corpus, capsys):
    run = corpus / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["run", "--resume", str(run)]) == 0
    assert "is a complete run (run.json); nothing to resume" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, corpus, capsys):
    """A truncated newest checkpoint (a full disk) is passed over for the newest intact one, with a message."""
    run = tmp_path / "run"
    args = [f"model.path={corpus / 'good-model'}", f"data.train={corpus / 'reviews.csv'}", "train.max_steps=4",
            "train.checkpoint_every=1", "train.batch_size=4", "eval.baselines=[]", "template.max_length=96",
            "eval.during_training=0", "train.eval_every=0", "train.keep_checkpoints=3"]
    assert main(["run", "--output", str(run), *args]) == 0
    state = json.loads((run / "run.json").read_text())
    write(run / "run.json", json.dumps({**state, "status": "failed"}))  # as if killed after step 4's save
    weights = run / "checkpoints" / "step-00000004" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["run", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step-00000004 is damaged (weights.safetensors has 100 bytes" in out
    assert "Resumed from" in out and "step-00000003 at step 3 of 4" in out.replace("\n", "")


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import tailorlm.config as config

    def broken(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(config, "load_config", broken)
    assert main(["run", "--print-config"]) == 1
    out = capsys.readouterr().out
    assert "error: unexpected error: unpack requires a buffer of 4 bytes (a tailorlm bug: run the same command " \
           "with --debug for the traceback, and report it)" in " ".join(out.split())
    with pytest.raises(struct.error):
        main(["run", "--print-config", "--debug"])
