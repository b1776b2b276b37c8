"""`python -m tailorlm` with one injected failure, for the distributed tests: the process whose RANK is
FAIL_RANK raises at optimizer step FAIL_STEP (0 when started without torchrun). Lives in tests only."""
import os
import sys

from tailorlm.cli import main
from tailorlm.train import loop

FAIL_RANK, FAIL_STEP = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
_one_step = loop._Run._one_step


def failing_step(self, batches):
    if self.step == FAIL_STEP and int(os.environ.get("RANK", "0")) == FAIL_RANK:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_STEP}")
    return _one_step(self, batches)


loop._Run._one_step = failing_step
sys.exit(main(sys.argv[1:]))
