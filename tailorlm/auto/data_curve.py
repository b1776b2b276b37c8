"""Would more labelled rows help? The winner's recipe (its model, method, learning rate and steps) trained again
on 25% and 50% of the training rows (data.limit.train: a stratified, seeded subset), each scored once on the
test split beside the winner's own score on all of them. Scarce labels are the usual reason to fine-tune a
small model: the slope says whether labelling more would pay. It runs after the search, outside its budget.
"""
from __future__ import annotations

from pathlib import Path

from tailorlm.config import load_config
from tailorlm.eval.results import TaskResults
from tailorlm.pipeline import run
from tailorlm.ui import stage

SHARES = (0.25, 0.5)
PAYS = 0.01  # a doubling of the rows that adds at least this much (a point) is worth labelling for


def data_curve(winner: Path, n_train: int, headline: str, full_value: float, out: Path,
               trust_remote_code: bool = False) -> dict:
    """{points: [{share, rows, value}], gain_per_doubling} for the winner's recipe; runs in out/data-curve/."""
    points = []
    for share in SHARES:
        rows = max(1, round(n_train * share))
        stage(f"Data curve: {share:.0%} of the training rows ({rows})")
        cfg = load_config(winner / "config.yaml", [f"data.limit.train={rows}", "eval.test=true", "eval.baselines=[]",
                                                   "train.max_seconds=null"], trust_remote_code=trust_remote_code)
        metrics = run(cfg, out / "data-curve" / f"rows-{rows}")
        section = TaskResults.from_json(next(iter(metrics["tasks"].values())))  # the decoding the run chose
        points.append({"share": share, "rows": rows, "value": section.fine_tuned})
    points.append({"share": 1.0, "rows": n_train, "value": full_value})
    return {"metric": headline, "points": points, "gain_per_doubling": points[-1]["value"] - points[-2]["value"]}


def curve_lines(curve: dict) -> list[str]:
    """The data curve for the report, and what it says about labelling more."""
    figures = ", ".join(f"{p['share']:.0%} ({p['rows']} rows): {p['value']:.3f}" for p in curve["points"])
    gain = curve["gain_per_doubling"]
    verdict = ("labelling more rows would likely pay" if gain >= PAYS else
               "more rows of the same kind are unlikely to help much; the model or the recipe is the limit")
    return [f"Test {curve['metric']} by training rows (same recipe and steps): {figures}. The last doubling added "
            f"{gain * 100:+.1f} points: {verdict}."]
