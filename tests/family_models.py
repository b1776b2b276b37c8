"""Tiny random models of each supported family, built from their transformers config classes (no download).

Every family gets the same small shape (hidden 64, 2 layers, 4 heads, 2 KV heads, the tiny tokenizer's
vocabulary) and the features that set it apart: qwen2's Q/K/V biases, qwen3's and gemma3's Q/K norms,
phi3's fused QKV and gate_up projections, gemma3's sliding window (shorter than the test prompts), its
(1 + w) norms and, for the variant that has it, soft-capping.

Random weights at the usual 0.02 scale give nearly flat logits, whose greedy choice flips on float rounding;
`sharp=True` scales the weights up so the model's choices are decisive, as a trained model's are, and a
token-for-token comparison between runtimes tests the file rather than rounding.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
SLIDING_WINDOW = 8  # gemma3's window: shorter than every test prompt, so the window matters

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_family_model(family: str, vocab_size: int, seed: int = 0, sharp: bool = True, softcap: bool = False):
    import transformers as t

    torch.manual_seed(seed)
    common = dict(COMMON, vocab_size=vocab_size)
    if family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common, tie_word_embeddings=True))
    elif family == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    elif family == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False))
    elif family == "qwen3":
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    elif family == "phi3":
        model = t.Phi3ForCausalLM(t.Phi3Config(**common, tie_word_embeddings=False, sliding_window=None))
    elif family == "gemma3":
        config = t.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
                                    tie_word_embeddings=True,
                                    final_logit_softcapping=30.0 if softcap else None,
                                    attn_logit_softcapping=50.0 if softcap else None)
        model = t.Gemma3ForCausalLM(config)
    else:
        raise ValueError(family)
    if sharp:
        _sharpen(model, family)
    return model.eval()


def _sharpen(model, family: str) -> None:
    """Scale weights up (biases and gemma3's norms too, so they matter), for decisive logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(6.0 if "embed" not in name else 2.0)
            elif name.endswith(".bias") or family == "gemma3":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
