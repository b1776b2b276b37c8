"""What each model family needs to become a GGUF that llama.cpp runs the way transformers runs it.

A family is the transformers `model_type` of config.json. For each one: the GGUF architecture llama.cpp
builds its graph from, whether Q and K are reordered for llama.cpp's rotary layout, what is added to norm
weights, the hyperparameters llama.cpp reads beyond the common ones, and the settings llama.cpp cannot
reproduce. The facts follow llama.cpp's convert_hf_to_gguf.py and its model loader:

- llama, mistral: GGUF "llama"; llama.cpp rotates interleaved pairs (rope type NORM), HF rotates halves, so
  Q and K rows are permuted. Mistral is written as llama, as llama.cpp's converter does.
- qwen2, qwen3, phi3, gemma3: rope type NEOX, which rotates halves as HF does: no permutation.
- qwen2 keeps its Q/K/V biases; qwen3 and gemma3 have per-head Q/K RMS norms (attn_q_norm, attn_k_norm).
- phi3 keeps its fused qkv_proj (attn_qkv) and gate_up_proj (ffn_up, gate rows first): llama.cpp splits them.
- gemma3 stores an RMSNorm weight w and multiplies by (1 + w); llama.cpp multiplies by the weight as stored,
  so every norm weight is written as 1 + w. llama.cpp hard-codes gemma3's layer pattern (5 sliding-window
  layers, then 1 global), its local rope base (10000) and its query scale (1/sqrt(head_dim)), and applies no
  final-logit soft-capping on a model with a sliding window: a model that differs from those is refused
  rather than written as a file that computes something else. Attention soft-capping is applied by neither
  llama.cpp's gemma3 graph nor transformers' Gemma3 attention, so a config that names it exports as trained.

A sliding window that llama.cpp does not apply for the architecture (mistral, qwen2, phi3) is harmless within
the window, so the file's context length is capped at the window: inside it both runtimes agree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tailorlm.errors import TailorError


@dataclass(frozen=True)
class GGUFFamily:
    model_type: str  # transformers config.model_type
    arch: str  # gguf.MODEL_ARCH_NAMES value, the GGUF's general.architecture
    permute_qk: bool = False  # llama.cpp rotates interleaved pairs for this architecture
    norm_offset: float = 0.0  # added to every *norm.weight (gemma's (1 + w) RMSNorm)
    window_applied: bool = False  # llama.cpp applies the config's sliding window itself
    unsupported: Callable[[object], list[str]] = field(default=lambda config: [])  # what llama.cpp cannot do
    extra_metadata: Callable[[object, object], None] = field(default=lambda writer, config: None)


def _rope(config) -> dict:
    """The rope parameters of the global-attention layers (transformers 5 nests them per layer type)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in rope:
        rope = rope["full_attention"] or {}
    return dict(rope)


def rope_theta(config) -> float:
    return float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_scaling(config) -> tuple[str, float]:
    """("none" | "linear", factor); other scalings (yarn, llama3, longrope, dynamic) are refused."""
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return "none", 1.0
    if kind == "linear":
        return "linear", float(rope["factor"])
    raise TailorError(f"GGUF export of '{config.model_type}': rope scaling '{kind}' is not supported yet "
                      f"(default and linear are)")


def _phi3_unsupported(config) -> list[str]:
    missing = []
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        missing.append(f"partial rotary embedding (partial_rotary_factor={config.partial_rotary_factor})")
    return missing


def _gemma3_unsupported(config) -> list[str]:
    missing = []
    head_dim = config.head_dim
    layers = config.num_hidden_layers
    if getattr(config, "final_logit_softcapping", None):
        missing.append(f"final logit soft-capping (final_logit_softcapping={config.final_logit_softcapping}): "
                       f"llama.cpp's gemma3 graph skips it on a sliding-window model")
    scale = config.query_pre_attn_scalar
    llama_cpp_scale = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim
    if scale != llama_cpp_scale:
        missing.append(f"query_pre_attn_scalar={scale} (llama.cpp scales queries by 1/sqrt({llama_cpp_scale}))")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    types = list(getattr(config, "layer_types", None) or expected)
    if types != expected:
        missing.append("a layer pattern other than 5 sliding-window layers then 1 global (llama.cpp's fixed one)")
    local = getattr(config, "rope_parameters", None) or {}
    local_theta = (local.get("sliding_attention") or {}).get("rope_theta",
                                                             getattr(config, "rope_local_base_freq", 10000.0))
    if float(local_theta) != 10000.0:
        missing.append(f"a local rope base of {local_theta} (llama.cpp fixes 10000)")
    if not getattr(config, "sliding_window", None):
        missing.append("no sliding window (llama.cpp's gemma3 expects one)")
    return missing


def _gemma3_metadata(writer, config) -> None:
    writer.add_sliding_window(config.sliding_window)


def _phi3_metadata(writer, config) -> None:
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(original)


FAMILIES: dict[str, GGUFFamily] = {f.model_type: f for f in (
    GGUFFamily("llama", "llama", permute_qk=True),
    GGUFFamily("mistral", "llama", permute_qk=True),
    GGUFFamily("qwen2", "qwen2"),
    GGUFFamily("qwen3", "qwen3"),
    GGUFFamily("phi3", "phi3", unsupported=_phi3_unsupported, extra_metadata=_phi3_metadata),
    GGUFFamily("gemma3_text", "gemma3", norm_offset=1.0, window_applied=True, unsupported=_gemma3_unsupported,
               extra_metadata=_gemma3_metadata),
)}
# A base read from a GGUF names its architecture, not its transformers model_type.
BY_ARCH: dict[str, GGUFFamily] = {"llama": FAMILIES["llama"], "qwen2": FAMILIES["qwen2"], "qwen3": FAMILIES["qwen3"],
                                  "phi3": FAMILIES["phi3"], "gemma3": FAMILIES["gemma3_text"]}
SUPPORTED_NAMES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")


def family_for(model_type: str, from_gguf: bool = False) -> GGUFFamily:
    """The family of a model (its config's model_type, or a base GGUF's architecture); a clear error otherwise."""
    family = (BY_ARCH if from_gguf else FAMILIES).get(model_type)
    if family is None:
        hint = (" (the multimodal Gemma3ForConditionalGeneration: export its text model, Gemma3ForCausalLM)"
                if model_type == "gemma3" and not from_gguf else "")
        raise TailorError(f"GGUF export supports the {', '.join(SUPPORTED_NAMES)} architectures; '{model_type}' "
                          f"is not supported yet{hint} (--format hf or --format adapter export any model)")
    return family


def check_supported(family: GGUFFamily, config) -> None:
    """Refuse, naming each setting, a model llama.cpp would run differently from transformers."""
    missing = family.unsupported(config)
    if missing:
        raise TailorError(f"GGUF export of this {family.model_type} model: llama.cpp cannot reproduce "
                          f"{'; '.join(missing)}. Use --format hf or --format adapter")
    rope_scaling(config)  # raises for a scaling llama.cpp is not told about here
