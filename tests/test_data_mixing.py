"""Multi-task mixing: shares by strategy, exact counts, repetition of small tasks, seeded."""
import pytest

from tailorlm.data.mixing import mix, mixing_shares


def test_shares_by_strategy():
    assert mixing_shares([900, 100], [1, 1], "proportional", 2.0) == pytest.approx([0.9, 0.1])
    assert mixing_shares([900, 100], [1, 3], "weights", 2.0) == pytest.approx([0.25, 0.75])
    assert mixing_shares([900, 100], [1, 1], "temperature", 2.0) == pytest.approx([30 / 40, 10 / 40])
    assert mixing_shares([900, 100], [1, 1], "temperature", 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_mix_counts_repeat_small_tasks_and_are_seeded():
    big, small = [("big", i) for i in range(90)], [("small", i) for i in range(10)]
    mixed = mix([big, small], [0.5, 0.5], seed=1)
    assert len(mixed) == 100
    assert sum(1 for name, _ in mixed if name == "small") == 50  # every small sample 5 times
    assert all(mixed.count(("small", i)) == 5 for i in range(10))
    assert len({s for s in mixed if s[0] == "big"}) == 50  # 50 distinct of the 90 big samples
    assert mix([big, small], [0.5, 0.5], seed=1) == mixed and mix([big, small], [0.5, 0.5], seed=2) != mixed
