"""Cheap checks of a model's files before anything is loaded or written: the file type, the header, the
tensor names. A bad file is found in milliseconds, before the run directory exists, with a message that
names the file and says what to do, instead of a loader's traceback minutes into a run.

Weights load only from safetensors and GGUF. A pickle (pytorch_model.bin, *.pt, *.ckpt) can run arbitrary
code while it is unpickled; torch's weights_only default blocks the known attacks today, but a file format
that cannot carry code at all is the guarantee we give, so pickles are refused, with the way to convert them.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from tailorlm.errors import TailorError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GGUF_MAGIC = b"GGUF"
CONVERT_HINT = ("convert it once, where you trust the file, with: python -c \"from transformers import "
                "AutoModelForCausalLM as M; M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\" "
                "(or, for a PEFT adapter, PeftModel.from_pretrained(base, '{src}').save_pretrained(...))")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a model folder, or an error naming the file and the line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TailorError(f"{path}: {what} is not UTF-8 text (is it the right file?)") from None
    except json.JSONDecodeError as e:
        raise TailorError(f"{path}, line {e.lineno}: {what} is not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise TailorError(f"{path}: {what} must be a JSON object, not {type(value).__name__}")
    return value


def file_identity(path: Path) -> tuple:
    """The same file, unchanged, within one process: (resolved path, inode, size, modification and change
    times). The change time moves on any rewrite or rename, even a copy that keeps the modification time."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def check_gguf(path: Path) -> None:
    """The file starts like a GGUF and its header counts some tensors: 24 bytes read. Its metadata is parsed
    whole only to explain a loader's failure (explain_gguf_failure): that takes seconds (the gguf reader builds
    a 49k-token vocabulary string by string), and the loaders parse it anyway."""
    with open(path, "rb") as f:
        head = f.read(24)  # magic, version (uint32), tensor count and metadata count (uint64 each)
    if head[:4] != GGUF_MAGIC:
        raise TailorError(f"model.path: {path} is not a GGUF file (it starts with {head[:4]!r}, a GGUF with b'GGUF'); "
                          f"was it renamed, or truncated by a failed download?")
    if len(head) < 24:
        raise TailorError(f"model.path: {path} is a damaged GGUF file (its header is cut short); "
                          f"download or export it again")
    order = "<" if struct.unpack("<I", head[4:8])[0] < 0x10000 else ">"  # a big-endian file's version reads huge
    if struct.unpack(order + "Q", head[8:16])[0] == 0:
        raise TailorError(f"model.path: {path} is a GGUF file with no tensors (a vocabulary-only file?)")


def explain_gguf_failure(path: Path) -> None:
    """Raise what is wrong with a GGUF file that a loader could not read, when its metadata does not parse."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on a cut or damaged file
        raise TailorError(f"model.path: {path} is a damaged GGUF file ({type(e).__name__}: {e}); "
                          f"download or export it again") from None


def safetensors_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors shards of a folder (one file, or every shard its index names), checked to exist."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TailorError(f"{index}: the safetensors index has no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise TailorError(f"{index} names {len(missing)} shard(s) that are not in the folder, e.g. {missing[0]} "
                              f"(an incomplete download?)")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TailorError(f"{folder} holds its weights only as a pickle ({', '.join(pickles[:3])}); tailorlm loads "
                          f"safetensors and GGUF only, because loading a pickle can run code. "
                          + CONVERT_HINT.format(src=folder))
    raise TailorError(f"{folder} has no weights: expected {stem}.safetensors or {stem}.safetensors.index.json "
                      f"(an incomplete download or copy?)")


def tensor_names(files: list[Path]) -> set[str]:
    """Every tensor name in safetensors files, read from their headers alone (no weights are read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                names.update(f.keys())
        except Exception as e:  # SafetensorError (bad header) or OSError: not what the extension says
            raise TailorError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]}); was it "
                              f"truncated, or renamed from another format?") from None
    return names


def check_tensor_names(files: list[Path], expected: list[str]) -> None:
    """The weights hold the tensors the model's config calls for. Names are compared without their leading
    module prefix ('model.', 'transformer.'), which checkpoints of one architecture spell differently."""
    def short(name: str) -> str:
        return name.split(".", 1)[1] if "." in name and name.split(".", 1)[0] in ("model", "transformer") else name

    have = {short(n) for n in tensor_names(files)}
    missing = [n for n in expected if short(n) not in have]
    if len(missing) == len(expected):
        raise TailorError(f"{files[0].parent}: the weights hold none of the tensors its config.json describes "
                          f"(e.g. {expected[0]}); the config and weights are from different models")
    if missing:
        raise TailorError(f"{files[0].parent}: the weights lack {len(missing)} of the {len(expected)} tensors its "
                          f"config.json describes, e.g. {missing[0]} (an incomplete download, or another model's "
                          f"config?)")


def check_adapter(folder: Path) -> None:
    """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors (never adapter_model.bin)."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise TailorError(f"{folder}: adapter_config.json is missing (not a complete adapter; was the run finished?)")
    read_json(config, "the adapter config")
    tensor_names(safetensors_files(folder, "adapter_model"))


def check_remote_code(folder: Path, config: dict, trust_remote_code: bool) -> None:
    """A folder whose architecture exists only as its own Python files needs the user's explicit consent."""
    from transformers import CONFIG_MAPPING

    if trust_remote_code or "auto_map" not in config or config.get("model_type") in CONFIG_MAPPING:
        return
    raise TailorError(f"{folder}: this model's architecture ({config.get('model_type', 'unnamed')}) is Python code "
                      f"shipped in the folder (config.json auto_map); tailorlm runs it only when the command says "
                      f"so: add --trust-remote-code if you trust that code")
