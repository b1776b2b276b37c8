"""Shared fixtures: a tiny tokenizer and tiny random Llama built in-process (no download), the real SmolLM2
loaded once per session, and the shared datasets folder (tests that need it skip with a reason)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The machine's measured training rate (preflight's estimate) is cached per machine; the suite keeps its own,
# measured once per session, rather than writing into the user's ~/.cache.
os.environ.setdefault("TAILOR_CACHE_DIR", tempfile.mkdtemp(prefix="tailor-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = """the market rose as shares in the bank climbed after profits beat forecasts
the film won an award and the actor thanked the director at the ceremony
the minister said the government would hold an election next year
the team won the match with a late goal from the striker
the new phone has a faster chip and the software update fixes bugs
positive negative neutral business entertainment politics sport tech great awful movie
Classify the text. Answer with one of: Text: What is the topic of this news article?
""" * 3


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face model folder (safetensors + tokenizer) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (they live beside the checkout, in ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded default), loaded once for every test that needs it."""
    from tailorlm.config import ModelSpec
    from tailorlm.models.loading import load_model

    return load_model(ModelSpec(), torch.device("cpu"))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def labeled_csv(path: Path, n_per_label: int = 12) -> Path:
    rows = ["text,label"]
    texts = {"positive": "a great movie with an award winning actor", "negative": "an awful film the director failed"}
    for i in range(n_per_label):
        for label, text in texts.items():
            rows.append(f"\"{text} {i}\",{label}")
    return write(path, "\n".join(rows) + "\n")


def trained_weights(run_dir: Path) -> dict:
    """The tensors a finished run saved: its adapter (LoRA family) or its model (full, freezing)."""
    from safetensors.torch import load_file

    from tailorlm.rundir import RunDir

    folder = RunDir(run_dir).weights()
    return load_file(folder / ("adapter_model.safetensors" if folder.name == "adapter" else "model.safetensors"))


@contextlib.contextmanager
def recompilations():
    """Collect the compiler's recompilation reports (each names the guard that failed) while the block runs."""
    import logging

    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        yield reports
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
