"""Duplicates and train/eval leakage, exact and near.

Exact means equal after lowercasing and collapsing punctuation and whitespace ("Great film!" == "great
film"). Near means a Jaccard similarity of word 3-gram sets at or above a threshold, found with MinHash
and banded LSH so the cost stays linear in the number of examples; every candidate pair is then checked
with the exact Jaccard, so MinHash only decides which pairs to look at, never the verdict.
"""
from __future__ import annotations

import difflib
import re
import zlib
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"\w+")
_PRIME = (1 << 61) - 1
N_HASHES, BANDS = 64, 16  # 16 bands of 4 rows: pairs at Jaccard 0.85 are candidates with probability > 0.99


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, n: int = 3) -> set[int]:
    words = normalise(text).split()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams if g}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _signatures(sets: list[set[int]]) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.integers(1, _PRIME, N_HASHES, dtype=np.uint64)
    b = rng.integers(0, _PRIME, N_HASHES, dtype=np.uint64)
    sig = np.full((len(sets), N_HASHES), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, s in enumerate(sets):
        if s:
            x = np.fromiter(s, dtype=np.uint64)[:, None]
            sig[i] = ((x * a + b) % _PRIME).min(axis=0)  # uint64 wrap-around is fine: it is still a hash
    return sig


def near_pairs(texts: list[str], threshold: float, others: list[str] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, similarity) for texts[i] ~ texts[j] (i < j), or texts[i] ~ others[j] when others is given;
    pairs that are exact duplicates after normalisation are left to exact_groups/exact_overlap."""
    left = [shingles(t) for t in texts]
    right = left if others is None else [shingles(t) for t in others]
    sig_l = _signatures(left)
    sig_r = sig_l if others is None else _signatures(right)
    rows = N_HASHES // BANDS
    found: dict[tuple[int, int], float] = {}
    for band in range(BANDS):
        buckets: dict[bytes, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        cols = slice(band * rows, (band + 1) * rows)
        for i, row in enumerate(sig_l[:, cols]):
            buckets[row.tobytes()][0].append(i)
        if others is not None:
            for j, row in enumerate(sig_r[:, cols]):
                buckets[row.tobytes()][1].append(j)
        for lefts, rights in buckets.values():
            pairs = ((i, j) for i in lefts for j in lefts if i < j) if others is None else \
                ((i, j) for i in lefts for j in rights)
            for i, j in pairs:
                if (i, j) not in found:
                    found[(i, j)] = jaccard(left[i], right[j])
    exact_l = [normalise(t) for t in texts]
    exact_r = exact_l if others is None else [normalise(t) for t in others]
    return sorted((i, j, s) for (i, j), s in found.items() if s >= threshold and exact_l[i] != exact_r[j])


def exact_groups(texts: list[str]) -> list[list[int]]:
    """Groups (of 2 or more indices) of texts equal after normalisation."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[normalise(t)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def exact_overlap(texts: list[str], reference: list[str]) -> list[tuple[int, int]]:
    """(i, j) with texts[i] equal to reference[j] after normalisation (the first such j)."""
    index = {}
    for j, t in enumerate(reference):
        index.setdefault(normalise(t), j)
    return [(i, index[k]) for i, t in enumerate(texts) if (k := normalise(t)) in index]


def answer_similarity(a: str, b: str, threshold: float) -> float | None:
    """How alike two answers are when they nearly match, else None: 1.0 when only case, punctuation or
    whitespace tells them apart, else difflib's ratio over their whitespace-collapsed text when it reaches
    threshold. Its cheap upper bounds are tried first, so unlike answers cost little."""
    if normalise(a) == normalise(b):
        return 1.0
    matcher = difflib.SequenceMatcher(None, " ".join(a.split()), " ".join(b.split()), autojunk=False)
    if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
        return None
    ratio = matcher.ratio()
    return ratio if ratio >= threshold else None


_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_LETTERS = re.compile(r"[a-z]+")


def keyboard_mash(text: str) -> bool:
    """A reply that looks typed at random: five keys in a row of the keyboard ("qwerty"), or four in a
    word typed on one of the lower rows ("asdf", "hjkl"), or a word of
    six letters or more, four of them different, with no vowel ("sdfghj"; "hmmmmm" is a word). Real chat logs
    hold such turns; trained on, they teach the model to answer with noise."""
    for word in _LETTERS.findall(text.lower()):
        for row in _KEYBOARD_ROWS:  # "erty" is in "property", "pretty": four keys count on the lower rows only
            run = 5 if row == _KEYBOARD_ROWS[0] or not set(word) <= set(row) else 4
            if any(word[i:i + run] in row for i in range(len(word) - run + 1)):
                return True
        if len(word) >= 6 and len(set(word)) >= 4 and not set(word) & set("aeiouy"):
            return True
    return False


def weak_replies(replies: list[str]) -> tuple[list[int], list[int]]:
    """(indexes of one-word replies, indexes of keyboard-mash replies)."""
    one_word = [i for i, r in enumerate(replies) if len(r.split()) <= 1]
    mash = [i for i, r in enumerate(replies) if keyboard_mash(r)]
    return one_word, mash
