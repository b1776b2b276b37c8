"""Merged weights -> one GGUF file, written with the `gguf` package's GGUFWriter (no llama.cpp build needed).

Tensors are named by gguf's own TensorNameMap for the architecture, 1-D tensors (norms, biases) stay F32 as in
llama.cpp's converter, 2-D ones become F16 or Q8_0 (gguf.quants). What differs between model families (the
architecture name, the Q/K reordering, norm offsets, what llama.cpp cannot reproduce) is in gguf_families.py.
The metadata comes from the base model's own GGUF when it was loaded from one
(gguf_metadata.copy_source_metadata), else from config.json and the tokenizer (gguf_metadata.add_model_metadata).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tailorlm.errors import TailorError
from tailorlm.export.gguf_families import GGUFFamily, check_supported, family_for
from tailorlm.export.gguf_metadata import add_model_metadata, copy_source_metadata
from tailorlm.export.layout import Layout


def gguf_family(model: torch.nn.Module, base_source: str) -> GGUFFamily:
    """The model's family, checked: a clear error, before anything is written, for a model this writer would
    turn into a file llama.cpp runs differently."""
    if base_source.endswith(".gguf"):
        field = source_reader(base_source).get_field("general.architecture")
        family = family_for(field.contents() if field else "unknown", from_gguf=True)
    else:
        family = family_for(model.config.model_type)
    if model is not None and not base_source.endswith(".gguf"):
        check_supported(family, model.config)
    return family


def gguf_architecture(model: torch.nn.Module, base_source: str) -> str:
    """The architecture name the GGUF will state (see gguf_family)."""
    return gguf_family(model, base_source).arch


@lru_cache(maxsize=2)
def source_reader(path: str):
    """The base GGUF, read once per process (parsing its 49k-token vocabulary takes seconds)."""
    import gguf

    return gguf.GGUFReader(path)


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, quant: str, base_source: str, layout: Layout) -> None:
    import gguf

    family = gguf_family(model, base_source)
    arch = family.arch
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
        add_model_metadata(writer, model.config, tokenizer, layout, family)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in gguf_tensors(model, names, family):  # one float32 copy at a time: the writer keeps only the encoded
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


def gguf_tensors(model: torch.nn.Module, names: dict[str, str], family: GGUFFamily):
    """(GGUF name, float32 array) for each weight, transformed as llama.cpp's converter does for the family:
    Q and K permuted where llama.cpp rotates interleaved pairs, norm weights shifted where HF adds an offset."""
    config, state = model.config, model.state_dict()
    for hf_name, name in names.items():
        array = state[hf_name].detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            array = permute_for_rope(array, config.num_attention_heads)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            array = permute_for_rope(array, config.num_key_value_heads)
        elif family.norm_offset and hf_name.endswith("norm.weight"):
            array = array + np.float32(family.norm_offset)
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
