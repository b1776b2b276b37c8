"""What a model's parameters are, block by block, read cheaply before its weights are loaded.

The cost of a training token depends on where the trainable parameters sit, not only on how many there are:
frozen blocks below the lowest trainable one run forward only, and LoRA's adapters cost by the shape of the
matrices they sit on. Preflight runs before the model is loaded and is handed only its parameter count, so
the layout is rebuilt here from the model's config: a folder's config.json, a GGUF file's header, or a hub
id's cached config.json. Parts are named as transformers names a Llama-style model's parameters, so freeze
patterns (`method.freeze.patterns`) and LoRA's target modules can be matched against them.

The parameter count stays the source of truth: whatever the config does not describe (biases, extra norms of
other architectures) is spread evenly over the blocks, so the parts always add up to the real count.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

BOTTOM, TOP = -1, 10**9  # pseudo block indices: embeddings below every block, final norm and head above


def unfreeze_group(level: int, n_blocks: int, n_groups: int) -> int:
    """The gradual-unfreezing group (0 = top, unfrozen first) of a block index, TOP or BOTTOM: block b goes to
    floor((n_blocks - 1 - b) * n_groups / (n_blocks + 1)), the head to the first group, the embeddings to the
    last. One rule for the strategy (models/layers.py) and the cost estimate (cost.py)."""
    if level == TOP:
        return 0
    if level == BOTTOM:
        return n_groups - 1
    return min(n_groups - 1, (n_blocks - 1 - level) * n_groups // (n_blocks + 1))


@dataclass(frozen=True)
class Part:
    """Some parameters of one kind at one place in the model."""
    name: str  # a parameter name, as transformers names it in a Llama-style model
    level: int  # which freeze/unfreeze group it moves with: BOTTOM, a block index, or TOP
    flow: float  # its place in the forward pass: input gradients are needed above the lowest trainable part
    params: int
    kind: str = "decoder"  # decoder (run for every token), head (completion tokens only), lookup (no FLOPs)
    matrix: tuple[int, int] | None = None  # (inputs, outputs) of a linear layer: a LoRA adapter can sit on it
    counted: bool = True  # False for a tied head: its weight is the embedding's, counted there


@dataclass(frozen=True)
class ModelShape:
    parts: tuple[Part, ...]
    blocks: int
    hidden: int
    attention_width: int  # query heads x head size: what the attention scores are computed over
    source: str  # where the layout was read, for the estimate's basis
    layered: bool = True  # False when only the parameter count is known: no block can be told from another

    @property
    def n_params(self) -> int:
        return sum(p.params for p in self.parts if p.counted)


def shape_from_config(config: dict, n_params: int, source: str = "config.json") -> ModelShape | None:
    """The layout a Llama-style config describes, reconciled with the real parameter count; None when the
    config lacks the sizes (an architecture whose keys are not read here)."""
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    blocks = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _first(config, "vocab_size")
    if not (hidden and blocks and vocab):
        return None
    heads = _first(config, "num_attention_heads", "n_head") or max(1, hidden // 64)
    kv_heads = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    inner = _first(config, "intermediate_size", "n_inner") or 4 * hidden
    width, kv_width = heads * head_dim, kv_heads * head_dim
    matrices = [("self_attn.q_proj", 2, (hidden, width)), ("self_attn.k_proj", 2, (hidden, kv_width)),
                ("self_attn.v_proj", 2, (hidden, kv_width)), ("self_attn.o_proj", 3, (width, hidden)),
                ("mlp.gate_proj", 5, (hidden, inner)), ("mlp.up_proj", 5, (hidden, inner)),
                ("mlp.down_proj", 6, (inner, hidden))]
    described = sum(i * o for _, _, (i, o) in matrices) + 2 * hidden  # the matrices and two norms
    tied = config.get("tie_word_embeddings")
    rest = n_params - vocab * hidden - hidden  # the blocks and an untied head
    if tied is None:  # not written down: whichever reading leaves the blocks closest to what the config says
        tied = abs(rest - blocks * described) <= abs(rest - vocab * hidden - blocks * described)
    rest -= 0 if tied else vocab * hidden
    per_block, remainder = divmod(rest, blocks)
    if per_block <= 0:
        return None
    fits = described <= per_block <= 2 * described  # what the config leaves out (biases, ...) is small
    parts = [Part("model.embed_tokens.weight", BOTTOM, 0, vocab * hidden, kind="lookup")]
    for b in range(blocks):
        at = f"model.layers.{b}."
        if not fits:  # another architecture's block: its parameters are known, not its matrices
            parts.append(Part(at + "weight", b, b * 10 + 1, per_block))
            continue
        # The config's sizes, then what they leave out of the real count (biases, extra norms), kept beside
        # the first norm so that every parameter is counted somewhere in its block.
        parts.append(Part(at + "input_layernorm.weight", b, b * 10 + 1, hidden + per_block - described))
        parts += [Part(at + name + ".weight", b, b * 10 + flow, i * o, matrix=(i, o))
                  for name, flow, (i, o) in matrices]
        parts.append(Part(at + "post_attention_layernorm.weight", b, b * 10 + 4, hidden))
    parts.append(Part("model.norm.weight", TOP, blocks * 10, hidden + remainder))
    if tied:  # the embedding's weight, multiplied at the top: it trains or freezes with the embeddings
        head = Part("model.embed_tokens.weight", BOTTOM, blocks * 10 + 1, vocab * hidden, kind="head", counted=False)
    else:
        head = Part("lm_head.weight", TOP, blocks * 10 + 1, vocab * hidden, kind="head")
    return ModelShape(tuple(parts + [head]), blocks, hidden, width, source)


def shape_without_layout(n_params: int) -> ModelShape:
    """The parameter count alone, as one layer over an embedding of unknown size: full fine-tuning is counted
    as 6N, LoRA as 4N, and freezing as full fine-tuning (which blocks it spares cannot be told)."""
    parts = (Part("model.embed_tokens.weight", BOTTOM, 0, 0, kind="lookup"),
             Part("model.layers.weight", 0, 1, n_params))
    return ModelShape(parts, 1, 0, 0, "parameter count only", layered=False)


def read_shape(paths: list[str], n_params: int) -> ModelShape:
    """The layout of the model at the first of `paths` (model.path, then the tokenizer's folder) that says."""
    for path in paths:
        config, source = _config_at(path)
        shape = shape_from_config(config, n_params, source) if config else None
        if shape is not None:
            return shape
    return shape_without_layout(n_params)


def _config_at(path: str) -> tuple[dict | None, str]:
    p = Path(path).expanduser()
    try:
        if p.suffix == ".gguf" and p.is_file():
            return gguf_config(p), "GGUF header"
        if (p / "config.json").is_file():
            return json.loads((p / "config.json").read_text(encoding="utf-8")), "config.json"
        if p.is_dir() and len(ggufs := sorted(p.glob("*.gguf"))) == 1:
            return gguf_config(ggufs[0]), "GGUF header"
        if path.count("/") == 1 and not p.exists():  # a hub id: its config only if already downloaded
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            if isinstance(cached, str):
                return json.loads(Path(cached).read_text(encoding="utf-8")), "cached config.json"
    except (OSError, ValueError, struct.error):  # an unreadable config leaves the estimate coarser, no more
        pass
    return None, ""


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_SIZES = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
               "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
               "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
               "vocab_size": "vocab_size"}


def gguf_config(path: Path) -> dict:
    """The model sizes in a GGUF file's metadata, as config.json keys. Only the metadata is walked (the
    tokenizer's 49k strings are stepped over, not decoded): milliseconds, where gguf's reader takes seconds."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] < 2:
            return {}
        count, at = struct.unpack_from("<Q", data, 16)[0], 24
        found: dict[str, object] = {}

        def text() -> str:
            nonlocal at
            n = struct.unpack_from("<Q", data, at)[0]
            at += 8 + n
            return bytes(data[at - n:at]).decode("utf-8", "replace")

        def value(kind: int):
            nonlocal at
            if kind == 8:
                return text()
            if kind == 9:  # an array: its length is what is kept (a vocabulary's size)
                inner, n = struct.unpack_from("<IQ", data, at)
                at += 12
                if inner in _GGUF_SCALARS:
                    at += n * struct.calcsize("<" + _GGUF_SCALARS[inner])
                else:
                    for _ in range(n):
                        value(inner)
                return n
            (v,) = struct.unpack_from("<" + _GGUF_SCALARS[kind], data, at)
            at += struct.calcsize("<" + _GGUF_SCALARS[kind])
            return v

        for _ in range(count):
            key = text()
            (kind,) = struct.unpack_from("<I", data, at)
            at += 4
            found[key] = value(kind)
    arch = found.get("general.architecture")
    config = {name: found[f"{arch}.{key}"] for key, name in _GGUF_SIZES.items() if f"{arch}.{key}" in found}
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in found:
        config["vocab_size"] = found["tokenizer.ggml.tokens"]
    return config


def _first(config: dict, *keys: str) -> int | None:
    return next((int(config[k]) for k in keys if isinstance(config.get(k), (int, float)) and config[k]), None)
