"""A classic tagger beside the prompting baselines for extraction: a linear-chain CRF (sklearn-crfsuite) on
word-shape, affix and context features, trained on the same training sentences and scored on the same test
sentences as every other variant. It is what TF-IDF + logistic regression is for classification: the
strongest honest baseline that costs seconds, so a fine-tuned model that loses to it is seen to lose.

The features are the standard ones of the CoNLL and WNUT shared tasks' CRF entries: the word lowercased, its
prefixes and suffixes, its shape (Xxxx, dd-dd), case and digit flags, the marks of social text (@user, #tag,
URLs), and the same for the words around it.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

# L1 and L2 weights and iterations of the sklearn-crfsuite tutorial's CoNLL setting; L-BFGS converges well
# inside 100 iterations on a few thousand sentences.
C1, C2, ITERATIONS = 0.1, 0.1, 100
WINDOW = 2  # words on each side whose features a word sees


def _shape(word: str) -> str:
    shape = re.sub(r"[A-Z]", "X", re.sub(r"[a-z]", "x", re.sub(r"\d", "d", word)))
    return re.sub(r"(.)\1{2,}", r"\1\1", shape)  # 'Xxxxxxx' -> 'Xxx': runs shortened, so shapes generalise


def _word(word: str, prefix: str) -> dict:
    lower = word.lower()
    return {f"{prefix}lower": lower, f"{prefix}shape": _shape(word), f"{prefix}title": word.istitle(),
            f"{prefix}upper": word.isupper(), f"{prefix}digit": word.isdigit()}


def word_features(tokens: list[str], i: int) -> dict:
    """Features of token i: its own (affixes too) and its neighbours' within WINDOW words."""
    word = tokens[i]
    features = {"bias": 1.0, **_word(word, ""), "suffix2": word[-2:].lower(), "suffix3": word[-3:].lower(),
                "prefix2": word[:2].lower(), "prefix3": word[:3].lower(), "hyphen": "-" in word,
                "mention": word.startswith("@"), "hashtag": word.startswith("#"),
                "url": word.lower().startswith(("http", "www.")), "length": min(len(word), 12)}
    for offset in range(-WINDOW, WINDOW + 1):
        j = i + offset
        if offset == 0:
            continue
        if 0 <= j < len(tokens):
            features.update(_word(tokens[j], f"{offset:+d}:"))
        else:
            features[f"{offset:+d}:edge"] = True  # the sentence starts or ends within the window
    return features


@dataclass
class CrfResult:
    predicted: list[list[str]]  # BIO tags per test sentence
    seconds_per_100: float  # tagging time alone, per 100 test sentences
    train_seconds: float


def crf_tagger(train_tokens: list[list[str]], train_tags: list[list[str]], test_tokens: list[list[str]]) -> CrfResult:
    """Fit on the training sentences' BIO tags, tag the test sentences."""
    import sklearn_crfsuite

    started = time.perf_counter()
    model = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=C1, c2=C2, max_iterations=ITERATIONS,
                                 all_possible_transitions=True)
    model.fit([[word_features(s, i) for i in range(len(s))] for s in train_tokens], train_tags)
    trained = time.perf_counter()
    predicted = [list(tags) for tags in model.predict([[word_features(s, i) for i in range(len(s))]
                                                       for s in test_tokens])]
    per_100 = (time.perf_counter() - trained) / max(len(test_tokens), 1) * 100
    return CrfResult(predicted, per_100, trained - started)
