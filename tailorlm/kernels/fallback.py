"""Where a fast path cannot apply to a model (a sliding window, logit soft-capping), it steps aside for the
library's own computation, and says so once per reason: a per-batch message would bury the run's output."""
from __future__ import annotations

import logging

log = logging.getLogger("tailorlm.kernels")
_said: set[str] = set()


def say_once(reason: str) -> None:
    """Log why a fast path is off, the first time this reason comes up in the process."""
    if reason not in _said:
        _said.add(reason)
        log.info(reason)
