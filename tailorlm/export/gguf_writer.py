"""Merged weights -> one GGUF file, written with the `gguf` package's GGUFWriter (no llama.cpp build needed).

Tensors are named by gguf's own TensorNameMap for the architecture, 1-D tensors (norms) stay F32 as in
llama.cpp's converter, 2-D ones become F16 or Q8_0 (gguf.quants). The metadata comes from the base model's
own GGUF when it was loaded from one (gguf_metadata.copy_source_metadata), else from config.json and the
tokenizer (gguf_metadata.add_llama_metadata).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tailorlm.errors import TailorError
from tailorlm.export.gguf_metadata import add_llama_metadata, copy_source_metadata
from tailorlm.export.layout import Layout

SUPPORTED_ARCHITECTURES = ("llama",)  # SmolLM2, Llama, TinyLlama


def gguf_architecture(model: torch.nn.Module, base_source: str) -> str:
    """The architecture name the GGUF will state; a clear error for ones this writer does not handle yet."""
    if base_source.endswith(".gguf"):
        field = source_reader(base_source).get_field("general.architecture")
        arch = field.contents() if field else "unknown"
    else:
        arch = model.config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TailorError(f"GGUF export supports the {', '.join(SUPPORTED_ARCHITECTURES)} architecture; "
                          f"'{arch}' is not supported yet (--format hf or --format adapter export any model)")
    return arch


@lru_cache(maxsize=2)
def source_reader(path: str):
    """The base GGUF, read once per process (parsing its 49k-token vocabulary takes seconds)."""
    import gguf

    return gguf.GGUFReader(path)


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, quant: str, base_source: str, layout: Layout) -> None:
    import gguf

    arch = gguf_architecture(model, base_source)
    qtype, file_type = {"f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
                        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}[quant]
    names = tensor_names(model, arch)
    writer = gguf.GGUFWriter(str(path), arch)
    if base_source.endswith(".gguf"):
        source = source_reader(base_source)
        expected, produced = {t.name for t in source.tensors}, set(names.values())
        if produced != expected:  # the fine-tuned model must have exactly the base file's tensors
            raise TailorError(f"the model's tensors do not match its base GGUF {base_source}: "
                              f"missing {sorted(expected - produced)[:5]}, extra {sorted(produced - expected)[:5]}")
        copy_source_metadata(writer, source, layout)
    else:
        add_llama_metadata(writer, model.config, tokenizer, layout)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in gguf_tensors(model, names):  # one float32 copy at a time: the writer keeps only the encoded
        data, raw_type = _encode(array, qtype)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_names(model: torch.nn.Module, arch: str) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, from gguf's TensorNameMap for the architecture."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                        config.num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to token_embd; llama.cpp (and transformers' GGUF loader) infer the tie from its absence
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TailorError(f"cannot map the weight '{hf_name}' to a GGUF tensor name for '{arch}'")
        names[hf_name] = name
    return names


def gguf_tensors(model: torch.nn.Module, names: dict[str, str]):
    """(GGUF name, float32 array) for each weight, with Q and K permuted as llama.cpp's converter does."""
    config, state = model.config, model.state_dict()
    for hf_name, name in names.items():
        array = state[hf_name].detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = permute_for_rope(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = permute_for_rope(array, config.num_key_value_heads)
        yield name, array


def permute_for_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head; llama.cpp rotates interleaved pairs. Reorder the rows
    of Q and K so llama.cpp's rotation computes HF's (llama.cpp convert_hf_to_gguf.py LlamaModel.permute;
    transformers' GGUF loader undoes it in LlamaTensorProcessor)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(array: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """(data, raw type for GGUFWriter.add_tensor): norms and biases F32, matrices F16 or Q8_0.

    A matrix whose rows are not a whole number of Q8_0 blocks (32 values) stays F16, as llama.cpp does."""
    import gguf

    if array.ndim < 2:
        return array, None
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if array.shape[-1] % block == 0:
            return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None
