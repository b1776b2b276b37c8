"""A classic classifier beside the prompting baselines: TF-IDF features and logistic regression (scikit-learn).

Trained on the same training split and scored on the same test split as every other variant. It answers in
milliseconds, so a user sees at once when fine-tuning a language model buys nothing a linear model could not.
It also gives the nearest training examples by TF-IDF cosine, which retrieved few-shot demonstrations use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import TfidfVectorizer


# scikit-learn is imported where it is used: it takes seconds to import, and predict, chat and serve load this
# module (through the report's names) without ever fitting a classifier.
def _vectorizer() -> TfidfVectorizer:
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Word unigrams and bigrams with sublinear tf: the usual strong default for short-text classification.
    # One-character words count too: labels and inputs in short-text data are often single letters or digits.
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=200_000,
                           token_pattern=r"(?u)\b\w+\b")


@dataclass
class ClassicResult:
    predicted: list[str]
    seconds_per_100: float  # prediction time alone, per 100 test rows (training is reported apart)
    train_seconds: float


def tfidf_logistic_regression(train_texts: list[str], train_labels: list[str], test_texts: list[str],
                              seed: int = 0) -> ClassicResult:
    """Fit on the training split, predict the test split."""
    started = time.perf_counter()
    vectorizer = _vectorizer()
    features = vectorizer.fit_transform(train_texts)
    if len(set(train_labels)) < 2:  # one label: nothing to learn, the answer is that label
        return ClassicResult([train_labels[0]] * len(test_texts), 0.0, time.perf_counter() - started)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced", random_state=seed)
    model.fit(features, train_labels)
    trained = time.perf_counter()
    predicted = [str(p) for p in model.predict(vectorizer.transform(test_texts))]
    per_100 = (time.perf_counter() - trained) / max(len(test_texts), 1) * 100
    return ClassicResult(predicted, per_100, trained - started)


def majority_class(train_labels: list[str], n_test: int) -> ClassicResult:
    """The most frequent training label for every test row (ties: the label first in sorted order). Its accuracy
    is the share a model earns by learning only the prior; its macro-F1 shows how little that is."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    for label in train_labels:
        counts[label] = counts.get(label, 0) + 1
    top = min(counts, key=lambda label: (-counts[label], label))
    return ClassicResult([top] * n_test, 0.0, time.perf_counter() - started)


def nearest(train_texts: list[str], query_texts: list[str], k: int) -> list[list[int]]:
    """Indices of the k training texts most similar to each query (TF-IDF cosine), most similar first."""
    if k <= 0 or not train_texts:
        return [[] for _ in query_texts]
    vectorizer = _vectorizer()
    train = vectorizer.fit_transform(train_texts)
    similarity = (vectorizer.transform(query_texts) @ train.T).toarray()  # rows are L2-normalised: cosine
    order = np.argsort(-similarity, axis=1, kind="stable")  # ties keep training order: deterministic
    return order[:, :min(k, len(train_texts))].tolist()
