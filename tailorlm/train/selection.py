"""Best-checkpoint selection and early stopping on one validation metric."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tailorlm.config import SelectSpec

LOWER_IS_BETTER = ("loss", "perplexity", "ppl")
FLOAT_SLACK = 1e-9  # 0.925 - 0.900 is 0.025000000000000022: one answer of 40 is still one answer


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


@dataclass
class Selector:
    metric: str
    patience: int | None = None
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    best_loss: float | None = None  # the validation loss at best_step: breaks ties of the metric
    top_value: float | None = None  # the best metric seen (best_value may sit up to min_delta below it, a tie won)
    by_tie: bool = False  # the last update kept a checkpoint by a tie, not by its metric

    @classmethod
    def from_spec(cls, spec: SelectSpec) -> "Selector":
        return cls(spec.metric, spec.patience, spec.min_delta)

    def update(self, step: int, metrics: dict) -> bool:
        """Record an evaluation; True when it is the best so far.

        Better than the kept checkpoint by more than min_delta: the best, as before ties were read. Otherwise,
        within min_delta of the best value seen (equal, when min_delta is 0): a tie, which the lower validation
        loss wins. A task metric on a small validation split moves in steps of one answer (2.5 points on 40)
        and ties often; the loss on the gold answers is the smoother signal of which checkpoint gives them more
        surely (the one-standard-error idea: within the noise of the best, prefer what the steadier measure
        prefers). Ties compare with the best seen, not the last tie's winner, so a run of ties cannot walk the
        metric down."""
        value = metrics.get(self.metric)
        if value is None:
            return False
        sign = -1.0 if lower_is_better(self.metric) else 1.0
        if self.top_value is None or sign * (value - self.top_value) > 0:
            self.top_value = value
        improved = self.best_value is None or sign * (value - self.best_value) > self.min_delta + FLOAT_SLACK
        loss = metrics.get("val_loss")
        self.by_tie = not improved and self.metric != "val_loss" and loss is not None and self.best_loss is not None \
            and loss < self.best_loss and sign * (value - self.top_value) >= -self.min_delta - FLOAT_SLACK
        if improved or self.by_tie:
            self.best_value, self.best_step, self.bad_evals, self.best_loss = value, step, 0, loss
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Selector":
        return cls(**state)
