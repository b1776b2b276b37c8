import pytest

from tailorlm.tasks.classification import classification_metrics, normalise_label

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.parametrize("generated, expected", [
    ("business", "business"),
    ("Business.", "business"),
    ("  TECH  ", "tech"),
    ("Sports: the article is about football", "sports"),
    ("The topic of this news article is Politics", "politics"),
    ("Business: Business: Business:", "business"),
    ("business or tech", "business"),  # the first label named is the answer
    ("It is about tech, not business", "tech"),
    ("I cannot tell", None),
    ("", None),
    ("technology", None),  # close is not equal
])
def test_normalise_label(generated, expected):
    assert normalise_label(generated, LABELS) == expected


def test_longer_labels_win_at_the_same_position():
    assert normalise_label("very positive!", ["positive", "very positive", "negative"]) == "very positive"
    assert normalise_label("positive, not very positive", ["positive", "very positive"]) == "positive"


def test_metrics_count_invalid_answers_as_wrong():
    m = classification_metrics(["a", "a", "b", "b"], ["a", None, "b", "a"], ["a", "b"])
    assert m["accuracy"] == 0.5
    assert m["valid"] == 0.75
    assert m["confusion"] == {"a": {"a": 1, "(invalid)": 1}, "b": {"b": 1, "a": 1}}
    # F1(a) = 2*1/(2*1+1+1) = 0.5 ; F1(b) = 2*1/(2*1+0+1) = 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
