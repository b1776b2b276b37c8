"""One parse of a GGUF file per load, where transformers parses it three times.

transformers reads a GGUF model in three separate calls (tokenizer, config, weights), and each one builds a
new `gguf.GGUFReader` over the whole file: for SmolLM2-135M that is about 5 s a parse on a 2-core CPU, most of
it the 49k-token vocabulary read string by string. Mapping the weights' names then builds gguf's tensor-name
table once per module of the model (397 times, about 3 s), always for the same architecture and depth.

Inside `shared_parse()` both are looked up in a memo: the reader of an unchanged file, and the name table of
an (architecture, depth). transformers imports both names from the `gguf` package at call time, so they are
swapped there for the length of the load and put back after; the objects handed out are what gguf itself
builds, and transformers only reads them. The reader is kept from the tokenizer's load to the weights' load
(`forget()` then drops it, as does a load that fails inside): one file at a time, so a long-lived process that only ever
reads a tokenizer (the studio's preview, a llama.cpp server) holds at most one. Only the thread inside the load
shares: another thread reading a GGUF meanwhile (an export) gets gguf's own objects.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from pathlib import Path

from tailorlm.models.files import file_identity

_lock = threading.RLock()
_kept: dict[tuple, object] = {}  # (file identity, mode) -> its GGUFReader; one entry at most
_users = 0  # loads inside shared_parse() now, in any thread: the first swaps the names in, the last back
_originals: dict[str, object] = {}
_loading = threading.local()  # .depth: this thread is inside shared_parse(); other threads get gguf's own


@contextmanager
def shared_parse():
    """While inside, every GGUFReader of an unchanged file and every tensor-name table is built once."""
    global _users
    import gguf

    with _lock:
        if _users == 0:
            _originals.update(GGUFReader=gguf.GGUFReader, get_tensor_name_map=gguf.get_tensor_name_map)
            gguf.GGUFReader, gguf.get_tensor_name_map = _reader, _name_map
        _users += 1
    _loading.depth = getattr(_loading, "depth", 0) + 1
    try:
        yield
    except BaseException:
        forget()  # a failed load keeps nothing of the file for a later one
        raise
    finally:
        _loading.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                gguf.GGUFReader = _originals["GGUFReader"]
                gguf.get_tensor_name_map = _originals["get_tensor_name_map"]
                _shared_name_map.cache_clear()


def forget() -> None:
    """Drop the kept reader (after the weights are read, nothing else needs the file's metadata)."""
    with _lock:
        _kept.clear()


def _reader(path, mode: str = "r"):
    if not getattr(_loading, "depth", 0):  # another thread (an export, say) while a load runs: nothing shared
        return _originals["GGUFReader"](path, mode)
    key = (file_identity(Path(path)), mode)
    with _lock:
        if key not in _kept:
            reader = _originals["GGUFReader"](path, mode)  # a damaged file raises here, and nothing is kept
            _kept.clear()
            _kept[key] = reader
        return _kept[key]


def _name_map(arch, n_blocks: int):
    if not getattr(_loading, "depth", 0):
        return _originals["get_tensor_name_map"](arch, n_blocks)
    return _shared_name_map(arch, n_blocks)


@functools.lru_cache(maxsize=8)
def _shared_name_map(arch, n_blocks: int):
    return _originals["get_tensor_name_map"](arch, n_blocks)
