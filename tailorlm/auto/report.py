"""What `tailor auto` leaves behind: a leaderboard of every trial, the test table, and a recommendation that
says plainly when fine-tuning is not worth it.

auto.json holds the same facts for programs; leaderboard.md is for people.
"""
from __future__ import annotations

from pathlib import Path

from tailorlm.auto.candidates import Candidate, Skipped
from tailorlm.auto.data_curve import curve_lines
from tailorlm.auto.final import Final
from tailorlm.auto.search import Search
from tailorlm.eval.report import TITLES, best_line, comparison_rows, format_metric, header, measured_columns, score_notes
from tailorlm.rundir import write_json, write_text

CLASSIC_MARGIN = 0.01  # a classic model within a point of the best fine-tuned one is the recommendation
STILL_RISING = 0.01  # the top rung beat the one before by this much: longer training would likely pay


def recommendation(found: Search, final: Final | None) -> list[str]:
    """The advice. Which model is the winner was decided on validation; whether to use it rather than the
    classic model or prompting is read off the test table, and says so."""
    if found.winner is None:
        failed = [t for t in found.trials if t.state == "failed"]
        if failed:
            return [f"No trial finished: {len(failed)} failed, the first with: {failed[0].note}"]
        return ["No trial finished within the budget: give a larger --budget (the trials above say what each "
                "needed)."]
    if final is None:
        return [f"The winner is {found.winner.key} ({found.metric} {found.winner.value:.3f} on validation); the "
                f"test split was not scored."]
    task = final.results.tasks[final.task]
    headline, variants = task.headline, task.variants
    title, tuned = TITLES.get(headline, headline), task.fine_tuned
    lines = []
    classic = variants.get("classic")
    if classic and classic.get(headline) is not None and tuned is not None \
            and classic[headline] >= tuned - CLASSIC_MARGIN:
        cost = (variants[task.chosen].get("seconds_per_100") or 0) / max(classic.get("seconds_per_100") or 0, 1e-6)
        lines.append(f"**Use the classic model ({classic.get('kind', 'classic')})**: on the test split it scores "
                     f"{title} {format_metric(headline, classic[headline])} against {format_metric(headline, tuned)} "
                     f"for the best fine-tuned model, at {cost:,.0f}x less time per prediction.")
    else:
        lines.append(f"**Use the fine-tuned {found.winner.key}** ({title} {format_metric(headline, tuned)} on the "
                     f"test split). Its folder {found.winner.run_dir} is a finished run: tailor predict, chat, serve "
                     f"and export take it.")
    if found.winner.state == "stopped":
        lines.append(f"No trial trained its full length within the budget: the winner is the one it cut short "
                     f"({found.winner.note.removeprefix('the budget: ')}); a larger --budget trains it fully.")
    prompting = [(model, best) for model, best in final.prompting.items() if best]
    if prompting and tuned is not None:
        model, best = max(prompting, key=lambda mb: mb[1]["value"])
        if best["value"] >= tuned:
            lines.append(f"Prompting {model} does as well on the test split ({best['variant']}: "
                         f"{format_metric(headline, best['value'])}): fine-tuning did not pay on this task.")
    advice = length_advice(found)
    return lines + ([advice] if advice else [])


def length_advice(found: Search) -> str | None:
    """When the winner beat the best of the rung below by STILL_RISING or more on validation: what would let it
    train longer. A larger budget when the budget set the length (the search stopped short of the ladder's top,
    or the top was fitted to the budget); else a larger train.epochs."""
    below = found.best_of_rung(found.winner.rung - 1) if found.winner.rung else []
    if not below or found.winner.value - below[0].value < STILL_RISING:
        return None
    top, full = found.lengths[-1], found.full or found.lengths[-1]
    if found.winner.steps < top:
        return (f"Longer training was still paying ({found.metric} +{found.winner.value - below[0].value:.3f} on "
                f"validation from {below[0].steps} to {found.winner.steps} steps), and the budget stopped the search "
                f"short of {top} steps: a larger --budget would likely help.")
    epochs = f", {top / found.epoch_steps:.1f} epochs" if found.epoch_steps else ""
    if top < full:
        return (f"Validation {found.metric} was still rising at the longest length the budget allowed ({top} "
                f"steps{epochs}; the full length is {full} steps): a larger --budget would let it train longer.")
    return (f"Validation {found.metric} was still rising at the full length ({top} steps{epochs}): a larger "
            f"train.epochs (or train.max_steps) would let it train longer.")


def write_leaderboard(out: Path, name: str, found: Search, final: Final | None, candidates: list[Candidate],
                      skipped: list[Skipped], facts: dict[str, str], spent: float, final_seconds: float,
                      curve: dict | None = None) -> str:
    """leaderboard.md and auto.json in `out`; returns the markdown. `spent`: seconds of the search (what the
    budget covers), earlier interrupted runs of it included; `final_seconds`: the test evaluation's."""
    lines = [f"# tailor auto: {name}", ""] + [f"- **{k}:** {v}" for k, v in facts.items()]
    lines += ["", "## Models", "", "| model | parameters | tried |", "|---|---:|---|"]
    lines += [f"| {c.name} | {c.params / 1e6:.0f}M | yes |" for c in candidates]
    lines += [f"| {s.name} | - | no: {s.why} |" for s in skipped]
    rungs = ", ".join(str(s) for s in found.plan.rungs)
    lines += ["", f"## Trials (validation {found.metric}; rungs of {rungs} steps, the best third of each going on)",
              "", "| trial | model | recipe | steps | validation | val loss | kept step | seconds | tokens/s | outcome |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in sorted(found.trials, key=lambda t: (t.rung, *t.rank)):
        model, recipe = t.key.split(" | ", 1)
        rate = f"{t.tokens / t.train_seconds:.0f}" if t.train_seconds else "-"
        value = "-" if t.value is None else f"{t.value:.3f}"
        outcome = t.state + (f": {t.note}" if t.note else "") + (" (winner)" if t is found.winner else "")
        steps = f"{t.trained} of {t.steps}" if t.trained and t.trained < t.steps else str(t.steps)
        loss = "-" if t.val_loss is None else f"{t.val_loss:.3f}"
        lines.append(f"| {t.number if t.number is not None else '-'} | {model} | {recipe} | {steps} | {value} | {loss} | "
                     f"{t.step if t.step is not None else '-'} | {t.seconds:.0f} | {rate} | {outcome} |")
    lines += [f"- not tried: {key} ({why})" for key, why in found.plan.dropped]
    if final is not None:
        task = final.results.tasks[final.task]
        columns = measured_columns(task.variants, tuple(task.columns))
        lines += ["", f"## Test split ({task.n_test} examples, scored once, after the choice)", "",
                  "| " + " | ".join(header(columns)) + " |", "|---|" + "---:|" * (len(columns) + 3)]
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(task.variants, columns, bool(task.trivial))]
        lines += [f"- {line}" for line in filter(None, [best_line(task.variants, columns[0])])]
        lines += [f"- **{note}**" for note in score_notes(task.trivial, task.contamination, task.variants)]
        lines += ["", "Best prompting of each candidate model (test):", ""]
        lines += [f"- {model}: " + (f"{best['variant']}, {TITLES.get(task.headline, task.headline)} "
                                    f"{format_metric(task.headline, best['value'])}" if best else "not measured")
                  for model, best in final.prompting.items()]
    advice = recommendation(found, final) + (curve_lines(curve) if curve else [])
    lines += ["", "## Recommendation", "", *advice, ""]
    text = "\n".join(lines)
    write_text(out / "leaderboard.md", text)
    write_json(out / "auto.json", {
        "metric": found.metric, "rungs": found.plan.rungs, "spent_seconds": round(spent, 1),
        "search_seconds": round(found.spent, 1), "final_seconds": round(final_seconds, 1),
        "winner": found.winner.__dict__ if found.winner else None, "trials": [t.__dict__ for t in found.trials],
        "dropped": found.plan.dropped, "models": [c.__dict__ for c in candidates],
        "skipped": [s.__dict__ for s in skipped], "recommendation": advice, **({
            "test": final.results.sections(), "prompting": final.prompting} if final else {}),
        **({"data_curve": curve} if curve else {})})
    return text
