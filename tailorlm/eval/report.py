"""The run's results: metrics.json, predictions.jsonl, a loss-curve PNG and report.md, plus the terminal table."""
from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from tailorlm.eval.baselines import best_prompting
from tailorlm.eval.curve_report import curve_lines, curve_summary
from tailorlm.ui import console

# Column titles for the terminal table and report.md. The table shows the task's metrics (tasks/); the last
# column is the fine-tuned gain, in points of the headline metric, over the best prompting variant.
TITLES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "valid": "valid answers", "f1": "entity F1",
          "precision": "precision", "recall": "recall", "exact_match": "exact match", "token_f1": "token F1",
          "bleu": "BLEU", "chrf": "chrF", "answered": "answered", "rouge_l": "ROUGE-L",
          "text_f1": "text F1"}
PERCENT = {"valid", "answered"}  # shares, shown as %
SCALE_100 = {"bleu", "chrf"}  # sacrebleu reports 0-100; the others are 0-1
VARIANT_TITLES = {"zero_shot": "zero-shot prompting", "few_shot": "few-shot prompting", "fine_tuned": "fine-tuned",
                  "classic": "TF-IDF + logistic reg.", "majority": "majority class"}
KIND_TITLES = {"constrained": "constrained", "likelihood": "likelihood"}
CLASSIC_TITLES = {"crf": "CRF tagger", "sliding window": "sliding window"}
COST = ("prompt tokens", "s/100")  # the last columns: what a prediction costs


def variant_title(name: str, metrics: dict | None = None) -> str:
    """'few-shot (k=6), likelihood' for few_shot_likelihood; the free-generation rows keep their plain titles."""
    kind = next((k for k in KIND_TITLES if name.endswith("_" + k)), "")
    base = name[: -len(kind) - 1] if kind else name
    title = VARIANT_TITLES.get(base, base)
    if base == "classic" and metrics and metrics.get("kind") in CLASSIC_TITLES:  # the classic model of its task
        title = CLASSIC_TITLES[metrics["kind"]]
    if base == "majority" and metrics and metrics.get("label") is not None:
        title += f" ({metrics['label']})"
    if kind or (base == "few_shot" and metrics and metrics.get("k")):
        title = title.replace(" prompting", "")
    if base == "few_shot" and metrics and metrics.get("k"):
        title += f" (k={metrics['k']})"
    return f"{title}, {KIND_TITLES[kind]}" if kind else title


def format_metric(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if key in PERCENT else f"{value:.1f}" if key in SCALE_100 else f"{value:.3f}"


def header(columns: tuple[str, ...], cost: bool = True) -> list[str]:
    return ["variant", *(TITLES.get(c, c) for c in columns), "vs prompting", *(COST if cost else ())]


def _cost(m: dict) -> tuple[str, str]:
    tokens, seconds = m.get("prompt_tokens"), m.get("seconds_per_100")
    return ("-" if tokens is None else f"{tokens:.0f}",
            "-" if seconds is None else f"{seconds:.2f}" if seconds < 1 else f"{seconds:.1f}")


def comparison_rows(variants: dict[str, dict], columns: tuple[str, ...], trivial: bool = False) -> list[tuple[str, ...]]:
    """One row per variant. A fine-tuned row's gain is over the best prompting result of any kind (see
    best_line); with a trivial test score it reads 'trivial', not points."""
    headline = columns[0]
    best = best_prompting(variants, headline)
    rows = []
    for name, m in variants.items():
        gain = ""
        if name.startswith("fine_tuned") and trivial:
            gain = "trivial"
        elif name.startswith("fine_tuned") and best is not None and m.get(headline) is not None:
            points = (m[headline] - best["value"]) * (1 if headline in SCALE_100 else 100)
            gain = f"{points:+.1f} pts"
        rows.append((variant_title(name, m), *(format_metric(c, m.get(c)) for c in columns), gain, *_cost(m)))
    return rows


def best_line(variants: dict[str, dict], headline: str) -> str | None:
    """Which prompting result the gain is measured against, named."""
    best = best_prompting(variants, headline)
    if best is None:
        return None
    return (f"vs prompting: against the best prompting result, {variant_title(best['variant'], variants[best['variant']])} "
            f"({TITLES.get(headline, headline)} {format_metric(headline, best['value'])})")


# A fine-tuned accuracy within this of the majority class's is reported as the label prior, not a result.
PRIOR_MARGIN = 0.01


def score_notes(trivial: list[str], contamination: dict | None, variants: dict[str, dict] | None = None) -> list[str]:
    """Lines shown beside a comparison table whose test score is not a result to take at face value: trivial
    (a single label; preflight facts 'trivial'), contaminated (test rows also in train; 'contamination'), or no
    better than always answering the majority label."""
    notes = [f"test score trivial: {reason}" for reason in trivial]
    # (a trivial score is already qualified; a prior that scores nothing is no bar to clear)
    majority = {} if trivial else (variants or {}).get("majority", {})
    for name, m in (variants or {}).items():
        if name.startswith("fine_tuned") and majority.get("accuracy") and m.get("accuracy") is not None \
                and m["accuracy"] <= majority["accuracy"] + PRIOR_MARGIN:
            notes.append(f"{variant_title(name, m)}: accuracy {m['accuracy']:.3f} against {majority['accuracy']:.3f} "
                         f"for always answering '{majority.get('label')}': it learned little beyond the label prior "
                         f"(macro-F1 {format_metric('macro_f1', m.get('macro_f1'))})")
    if contamination and contamination["in_train"]:
        c = contamination
        share = f"{c['share']:.0%}" if c["share"] >= 0.01 else "under 1%"
        how = f" ({c['exact']} exactly, {c['near']} nearly)" if c["near"] else ""
        notes.append(f"test score contaminated: {c['in_train']} of {c['test_rows']} test rows ({share}) "
                     f"also occur in train{how}")
    return notes


def measured_columns(variants: dict[str, dict], columns: tuple[str, ...]) -> tuple[str, ...]:
    """The headline, and each other metric that some variant has (chat's call_match needs tool-call turns)."""
    return columns[:1] + tuple(c for c in columns[1:] if any(m.get(c) is not None for m in variants.values()))


def print_table(variants: dict[str, dict], n_test: int, columns: tuple[str, ...], task: str,
                trivial: list[str] = (), contamination: dict | None = None, curve: dict | None = None) -> None:
    table = Table(title=f"{task}: test split, {n_test} examples, metrics on generated text")
    columns = measured_columns(variants, columns)
    # The cost columns stay in report.md (each baseline's line printed them as it ran): without them the table
    # fits an 80-column terminal, with variant names wrapping at spaces.
    for column in header(columns, cost=False):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column != "variant")
    for row in comparison_rows(variants, columns, bool(trivial)):
        table.add_row(*row[:-len(COST)], style="bold green" if row[0].startswith("fine-tuned") else None)
    console.print(table)
    for note in score_notes(list(trivial), contamination, variants):  # first: they qualify every figure above
        console.print(f"[bold yellow]{escape(note)}[/]", soft_wrap=True)
    for line in filter(None, [best_line(variants, columns[0]), curve_summary(curve)]):
        console.print(escape(line), soft_wrap=True)


def per_type_lines(variants: dict[str, dict], best: dict | None) -> list[str]:
    """Extraction's F1 per entity type (strict spans): the fine-tuned model, the classic tagger and the best
    prompting row, with each type's number of test entities."""
    shown = [v for v in ("fine_tuned", "classic", (best or {}).get("variant")) if v and "per_type" in variants.get(v, {})]
    if not shown:
        return []
    types = sorted({t for v in shown for t in variants[v]["per_type"]})
    support = {t: max(variants[v]["per_type"].get(t, {}).get("support", 0) for v in shown) for t in types}
    lines = ["", "Entity F1 per type (strict spans):", "",
             "| type | test entities | " + " | ".join(variant_title(v, variants[v]) for v in shown) + " |",
             "|---|---:|" + "---:|" * len(shown)]
    for kind in types:
        cells = [f"{variants[v]['per_type'][kind]['f1']:.3f}" if kind in variants[v]["per_type"] else "-"
                 for v in shown]
        lines.append(f"| {kind} | {support[kind]} | " + " | ".join(cells) + " |")
    return lines


def write_report(path: Path, title: str, facts: dict[str, str], sections: dict[str, dict],
                 training: list[str] = ()) -> None:
    """report.md: one comparison table per task (sections: task name -> its metrics.json entry), then the
    training section (eval/training_report.py) and the confusion tables."""
    lines = [f"# {title}", ""]
    lines += [f"- **{k}:** {v}" for k, v in facts.items()]
    for name, section in sections.items():
        variants, labels = section["variants"], section["labels"]
        columns = measured_columns(variants, tuple(section["columns"]))
        lines += ["", f"## Prompting vs fine-tuning: {name} (test split, {section['n_test']} examples, metrics on generated text)", "",
                  "| " + " | ".join(header(columns)) + " |", "|---|" + "---:|" * (len(columns) + 1 + len(COST))]
        trivial = section.get("trivial", [])
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(variants, columns, bool(trivial))]
        notes = score_notes(trivial, section.get("contamination"), variants)
        best = best_line(variants, columns[0])
        lines += ["", f"- {best}"] if best else []
        if any(m.get("shared_pass") for m in variants.values()):
            lines.append("- constrained and likelihood rows: both read off one scoring pass of every label, whose time "
                         "each shows (constrained decoding on its own, as `eval.decoding: constrained` runs it, is "
                         "generated); free generation goes on from the same prompt pass, and each row's time counts "
                         "that pass once, with its own scoring or decoding")
        if notes:
            lines += ["", *(f"- **{note}**" for note in notes)]
        if section.get("decoding"):
            chosen = section["decoding"]
            figures = ", ".join(f"{kind} {format_metric(columns[0], v)}" for kind, v in chosen["validation"].items())
            lines.append(f"- fine-tuned answers: {variant_title(chosen['chosen'])}, chosen on {chosen['rows']} "
                         f"validation answers ({TITLES.get(columns[0], columns[0])}: {figures})")
        lines += per_type_lines(variants, section.get("best_prompting"))
        lines += curve_lines(section.get("curve"), variants.get("fine_tuned", {}).get(columns[0]), name)
    lines += ["", "## Loss", "", "![loss curve](loss_curve.png)", "", *training]
    for section in sections.values():
        labels = section["labels"]
        for name, m in section["variants"].items():
            if "confusion" not in m:
                continue
            cols = labels + (["(invalid)"] if any("(invalid)" in r for r in m["confusion"].values()) else [])
            lines += [f"## Confusion: {variant_title(name, m)} (rows: expected, columns: predicted)", "",
                      "| expected | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for gold in labels:
                row = m["confusion"].get(gold, {})
                lines.append(f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
            lines.append("")
    path.write_text("\n".join(lines))
