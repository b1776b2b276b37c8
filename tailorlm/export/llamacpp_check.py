"""llama.cpp itself as the judge of an exported GGUF: its greedy continuation against the PyTorch model's.

transformers' GGUF loader is lenient: it rebuilds a transformers model from the file and runs transformers'
code, so metadata llama.cpp reads differently (a rope type, a norm offset, a sliding window, a missing key)
passes unnoticed. Here the file runs in llama.cpp (llama-cpp-python), the runtime users load it in, on the
run's own prompt token ids (no text, so tokenizer differences cannot hide or cause a mismatch), and the
greedy tokens it writes are compared token for token with the merged PyTorch model's.

llama-cpp-python is optional: without it the check reports itself skipped, with how to install it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "pip install llama-cpp-python"


@dataclass
class GreedyAgreement:
    """How llama.cpp's greedy tokens compare with PyTorch's, prompt by prompt."""
    reference: list[list[int]] = field(default_factory=list)  # PyTorch's tokens per prompt
    exported: list[list[int]] = field(default_factory=list)  # llama.cpp's tokens per prompt
    skipped: str | None = None  # why the check could not run (llama-cpp-python missing)

    @property
    def prompts_identical(self) -> int:
        return sum(a == b for a, b in zip(self.reference, self.exported))

    @property
    def prompt_share(self) -> float:
        return self.prompts_identical / len(self.reference) if self.reference else 0.0

    @property
    def token_share(self) -> float:
        """Share of generated tokens that match before each prompt's first divergence (after it the two
        continue from different text, so later tokens say nothing about the file)."""
        total = sum(len(r) for r in self.reference)
        agreeing = 0
        for ref, got in zip(self.reference, self.exported):
            for a, b in zip(ref, got):
                if a != b:
                    break
                agreeing += 1
        return agreeing / total if total else 0.0


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python can be imported, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({INSTALL_HINT}): {e}"
    return None


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The model's greedy continuation, with no stop token (llama.cpp's side runs the same fixed length)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        token = int(out.logits[0, -1].float().argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens


def llama_cpp_greedy(gguf_path: str | Path, prompts: list[list[int]], new_tokens: int,
                     threads: int = 2) -> list[list[int]]:
    """llama.cpp's greedy continuation of each prompt (token ids in, token ids out), on the CPU."""
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + new_tokens + 8
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=False, verbose=False,
                          n_threads=threads, n_gpu_layers=0)
    try:
        vocab = llm.n_vocab()
        results = []
        for prompt in prompts:
            llm.reset()  # a new sequence: positions restart and the cache is overwritten
            llm.eval(prompt)
            tokens = []
            for _ in range(new_tokens):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
                token = int(np.argmax(logits))
                tokens.append(token)
                llm.eval([token])
            results.append(tokens)
        return results
    finally:
        llm.close()


def greedy_agreement(model: torch.nn.Module, gguf_path: str | Path, prompts: list[list[int]],
                     new_tokens: int = 8) -> GreedyAgreement:
    """llama.cpp's greedy tokens for each prompt against the PyTorch model's; skipped without llama-cpp-python."""
    reason = llama_cpp_available()
    if reason:
        return GreedyAgreement(skipped=reason)
    model.eval()
    reference = [torch_greedy(model, p, new_tokens) for p in prompts]
    return GreedyAgreement(reference, llama_cpp_greedy(gguf_path, prompts, new_tokens))
