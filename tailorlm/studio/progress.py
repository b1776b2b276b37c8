"""What a studio run is doing now, for the live panel: its stage, its step counter, elapsed time and ETA.

The run writes its stage and open progress bars to a file beside its log (ui.PROGRESS_FILE_ENV); this reads it
and works out each bar's rate and time left, so the page only has to show it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def read_progress(path: Path, running: bool) -> dict | None:
    """{'stage', 'elapsed', 'step', 'bars': [{'description', 'done', 'total', 'elapsed', 'eta', 'info'}]}, or None
    before the run has written anything. `step` is the training bar's count ({'done', 'total'}) once training has
    started. A finished run's file keeps its last state, with no ETA."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet, or a file this run did not write as expected
        return None
    if not isinstance(state, dict):
        return None
    now = time.time() if running else float(state.get("updated") or time.time())
    since_update = max(0.0, now - float(state.get("updated") or now))
    bars = []
    for bar in state.get("bars") or []:
        done, total = int(bar.get("done") or 0), int(bar.get("total") or 0)
        fresh = done - int(bar.get("start") or 0)  # a resumed run's earlier steps took no time here
        elapsed = float(bar.get("elapsed") or 0) + since_update
        # The rate so far times the work left: the same estimate the terminal's bar shows.
        eta = elapsed / fresh * (total - done) if running and fresh > 0 and total >= done else None
        bars.append({"description": str(bar.get("description", "")), "done": done, "total": total,
                     "elapsed": round(elapsed, 1), "eta": None if eta is None else round(eta, 1),
                     "info": str(bar.get("info") or "")})
    training = next((b for b in bars if b["description"] == "train"), None)
    return {"stage": state.get("stage"), "elapsed": round(now - float(state.get("started") or now), 1),
            "step": {"done": training["done"], "total": training["total"]} if training else None, "bars": bars}
