"""GGUF metadata (key/value fields) for an exported model: copied from the base GGUF, or built for a HF folder.

A base loaded from a GGUF keeps that file's architecture and tokenizer fields as they are (copied with
GGUFReader): they are what llama.cpp and Ollama already run this model with. Only the chat template and the
EOS id are set from the run, so they name the layout and end-of-turn token training used.
"""
from __future__ import annotations

import json

from tailorlm.errors import TailorError
from tailorlm.export.layout import Layout

# Fields the writer sets itself, or that describe the old tensors rather than the model.
_NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment",
               "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"}


def copy_source_metadata(writer, source, layout: Layout) -> None:
    """Every key/value field of the base GGUF (a gguf.GGUFReader) except the ones the export replaces."""
    import gguf

    for field in source.fields.values():
        if field.name.startswith("GGUF.") or field.name in _NOT_COPIED:  # GGUF.*: the reader's header, not fields
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_chat_template(layout.chat_template)
    writer.add_eos_token_id(layout.end_of_turn_id)


def add_model_metadata(writer, config, tokenizer, layout: Layout, family) -> None:
    """The hyperparameters from config.json, and the tokenizer, as llama.cpp's converter writes them for the
    family (export/gguf_families.py)."""
    from tailorlm.export.gguf_families import rope_scaling, rope_theta

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and not family.window_applied and (config.model_type != "qwen2" or config.use_sliding_window):
        context = min(context, window)  # llama.cpp does not slide for this architecture: exact up to the window
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1])
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    kind, factor = rope_scaling(config)
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or family.arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    family.extra_metadata(writer, config)
    add_byte_level_bpe_tokenizer(writer, tokenizer, config.vocab_size, layout)


def add_byte_level_bpe_tokenizer(writer, tokenizer, vocab_size: int, layout: Layout) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2 and Llama 3 use) as tokenizer.ggml.* fields."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE" or not _is_byte_level(spec):
        raise TailorError("GGUF export from a Hugging Face folder supports byte-level BPE tokenizers (GPT-2, "
                          "SmolLM2, Llama 3 style) only; this tokenizer is not supported yet")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise TailorError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_eos_token_id(layout.end_of_turn_id)
    adds_bos, adds_eos = _added_special_tokens(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    writer.add_chat_template(layout.chat_template)


def _is_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how the text is split before BPE.

    Only splits that transformers' GGUF tokenizer loader rebuilds identically are named, so a round trip
    through the GGUF tokenizes exactly as training did: GPT-2's own regex ("gpt-2"), or one of the regexes
    transformers keeps for llama.cpp's names (Llama 3's "llama-bpe", Qwen2's "qwen2", ...)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex:
                return name
    described = ", ".join(p.get("type", "?") for p in parts) or pre.get("type", "none")
    raise TailorError(f"GGUF export: the tokenizer's pre-tokenizer ({described}) has no llama.cpp name that "
                      "transformers reads back the same way; not supported yet")


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS around plain text, observed rather than read from flags
    (tokenizers state it in several places)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    adds_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    adds_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return adds_bos, adds_eos
