"""How training went: loss, metric and retention curves with the best step and the onset of overfitting, the
unfreezing and early-stopping events, the retention change beside the task gain, and the training examples
the model fits worst (often mislabeled)."""
from __future__ import annotations

from pathlib import Path

from tailorlm.train.loop import TrainResult

OVERFIT_RISE = 0.02  # validation loss this far (relative) above its minimum at the end counts as overfitting


def overfit_step(evaluations: list[dict]) -> int | None:
    """The step after which validation loss only rose: its minimum, when the last value ended more than
    OVERFIT_RISE above it. None when validation loss was still at (or near) its best at the end."""
    points = [(e["step"], e["val_loss"]) for e in evaluations if "val_loss" in e and e["step"] > 0]
    if len(points) < 2:
        return None
    best_step, best = min(points, key=lambda p: p[1])
    return best_step if points[-1][1] > best * (1 + OVERFIT_RISE) and best_step < points[-1][0] else None


def plot_training(path: Path, history: TrainResult, overfit: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a run resumed from a checkpoint of an older tailorlm may still hold an evaluation's costs: not a curve here
    costs = ("prompt_tokens", "seconds_per_100")
    metrics = sorted({k for e in history.evaluations for k, v in e.items()
                      if k not in ("step", "val_loss", "retention_ppl", "retention_change") and isinstance(v, float)
                      and k.rsplit("/", 1)[-1] not in costs})
    retention = any("retention_ppl" in e for e in history.evaluations)
    panels = 1 + bool(metrics) + retention
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in history.train_loss]
    if rewarded(history):  # GRPO: its surrogate loss is about 0 by construction; the reward is the curve
        ax.plot(steps, [r["reward"] for r in history.train_loss], label="mean reward", alpha=0.8)
        ax.plot(steps, [r["flat_groups"] for r in history.train_loss], label="groups that taught nothing", alpha=0.6)
        ax.set_title("Reward of the sampled answers (GRPO)")
    else:
        if history.train_loss:
            ax.plot(steps, [r["loss"] for r in history.train_loss], label="train", alpha=0.8)
        val = history.val_loss
        if val:
            ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
        ax.set_ylabel("loss per completion token")
        ax.set_title("Training and validation loss")
    panel = 1
    if metrics:
        mx = axes[0][panel]
        for key in metrics:
            points = [(e["step"], e[key]) for e in history.evaluations if key in e]
            mx.plot(*zip(*points), "o-", label=key)
        mx.set_title("Validation metrics on generated text")
        panel += 1
    if retention:
        rx = axes[0][panel]
        points = [(e["step"], e["retention_ppl"]) for e in history.evaluations if "retention_ppl" in e]
        rx.plot(*zip(*points), "o-", color="tab:red", label="retention perplexity")
        rx.set_title("Retention (general data), lower is better")
    for ax in axes[0]:
        if history.best_step is not None:
            ax.axvline(history.best_step, color="green", ls="--", alpha=0.6, label=f"best (step {history.best_step})")
        if overfit is not None:
            ax.axvspan(overfit, history.completed, color="red", alpha=0.08, label="overfitting")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_lines(history: TrainResult, overfit: int | None, retention: dict, losses: list[dict],
                   select_metric: str) -> list[str]:
    """Markdown for report.md's training section."""
    lines = ["## Training", ""]
    lines.append(f"- steps: {history.completed} of {history.steps} planned"
                 + (" (stopped early)" if history.stopped_early else ""))
    if history.best_step is not None:
        lines.append(f"- best checkpoint by {select_metric}: step {history.best_step} (evaluated and saved)")
    if rewarded(history):  # GRPO does not train on the reference answers: their loss may rise as it should
        lines.append("- validation loss: of the reference answers, which GRPO does not train on; the task's "
                     "metric on generated answers is what chose the checkpoint")
    else:
        lines.append(f"- overfitting: validation loss rose after step {overfit}" if overfit is not None
                     else "- overfitting: none seen (validation loss at or near its best at the end)")
    lines += [f"- step {e['step']}: {e['event']}" for e in history.events]
    lines += preference_lines(history.evaluations) + reward_lines(history)
    if retention:
        lines += ["", "## Retention (what the model forgot of general skills)", "",
                  f"General data: {retention['source']}. Perplexity of its reference answers, lower is better.", "",
                  "| | base model | fine-tuned | change |", "|---|---:|---:|---:|",
                  f"| perplexity | {retention['base_ppl']:.2f} | {retention['final_ppl']:.2f} | {retention['change']:+.1%} |"]
        if "base_rouge_l" in retention:
            lines.append(f"| ROUGE-L of generated answers | {retention['base_rouge_l']:.3f} | "
                         f"{retention['final_rouge_l']:.3f} | {retention['final_rouge_l'] - retention['base_rouge_l']:+.3f} |")
    if losses:
        lines += ["", "## Highest-loss training examples (often mislabeled; all in example_losses.jsonl)", "",
                  "| loss | where | example |", "|---:|---|---|"]
        for row in losses[:10]:
            text = "; ".join(f"{k}: {v}" for k, v in row["example"].items() if isinstance(v, (str, int, float)))
            text = text.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['loss']:.2f} | {row['where']} | {text[:160]} |")
    return lines + [""]


def rewarded(history: TrainResult) -> bool:
    return bool(history.train_loss) and "reward" in history.train_loss[0]


def reward_lines(history: TrainResult) -> list[str]:
    """GRPO's rewards: the mean over the first and the last tenth of the steps, and the share of groups that
    taught nothing (every answer scored the same)."""
    if not rewarded(history):
        return []
    rows = history.train_loss
    tenth = max(1, len(rows) // 10)
    mean = lambda part, key: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = rows[:tenth], rows[-tenth:]
    terms = sorted(k for k in rows[0] if k.startswith("reward/"))
    lines = ["", "## Rewards of the sampled answers (GRPO)", "",
             f"| | first {tenth} steps | last {tenth} steps |", "|---|---:|---:|"]
    lines += [f"| {name} | {mean(first, key):.3f} | {mean(last, key):.3f} |" for key, name in
              [("reward", "mean reward"), *((t, t) for t in terms), ("reward_spread", "spread within groups"),
               ("flat_groups", "groups that taught nothing"), ("answer_tokens", "answer tokens")]]
    sampling = sum(r.get("sampling_seconds", 0.0) for r in rows)
    if sampling and history.step_seconds:
        tokens = sum(r.get("sampled_tokens", 0) for r in rows)
        lines += ["", f"Sampling took {sampling / history.step_seconds:.0%} of the optimizer steps' time "
                      f"({tokens / sampling:.0f} answer tokens per second on this process)."]
    return lines


def preference_lines(evaluations: list[dict]) -> list[str]:
    """How the held-out preference pairs moved (a preference objective's run), first evaluation to last."""
    scored = [e for e in evaluations if "reward_accuracy" in e]
    if not scored:
        return []
    first, last = scored[0], scored[-1]
    return ["", "## Held-out preference pairs", "", "| | step " + f"{first['step']} | step {last['step']} |",
            "|---|---:|---:|"] + [f"| {name} | {first[key]:.3f} | {last[key]:.3f} |" for key, name in (
                ("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"),
                ("pref_loss", "preference loss"))]
