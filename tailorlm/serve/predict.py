"""`tailor predict`: a finished run's model applied to a data file, one JSON line per row.

Rows are read with the run's data settings (format, columns, label names) by the same readers as training,
rendered by the run's template and chat format through the same encoder (so a prompt is the training prompt,
token for token, truncated the same way), generated greedily in batches as in evaluation, and read back with
the run's task (a label, entities, a number...). A label column is optional: prediction is the point.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tailorlm.config import RunConfig
from tailorlm.data.dataset import to_examples  # the row -> example mapping training uses, error messages included
from tailorlm.data.records import Table
from tailorlm.data.sources import read_table
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.errors import TailorError
from tailorlm.eval.evaluate import Evaluator, _input_text
from tailorlm.rundir import write_jsonl


@dataclass
class PredictionSet:
    examples: list[dict]  # as read (with '_where'); answer fields only when the file has them
    prompts: list[list[int] | None]  # training-identical prompt ids; None for a row that cannot fit
    truncated: list[bool]
    has_answers: bool  # every row carries the answer columns (labels), so expected values and metrics exist
    skipped: dict[str, int]  # rows skipped per reason (data.skip_bad_rows)


def read_rows(data: str | Table, cfg: RunConfig, template: PromptTemplate,
              limit: int | None = None) -> tuple[list[dict], bool, dict]:
    """The rows (a file, or a Table already read) as template examples, read and checked as training reads
    them; answers optional."""
    spec, task = cfg.data, template.task
    if task.conversational:  # a conversation's next reply is what `tailor chat` and `tailor serve` give
        raise TailorError("tailor predict reads tables of single prompts; for a model trained on conversations "
                          "use `tailor chat RUN` or `tailor serve RUN` (OpenAI chat completions), and `tailor run` "
                          "for scores on held-out conversations")
    table = data if isinstance(data, Table) else read_table(data, spec.format, spec.encoding)
    if limit:
        table.records = table.records[:limit]
    answer_fields = _answer_fields(template)
    columns = set(table.columns) | ({"instruction", "input", "output"} if "messages" in table.columns else set())
    has_answers = all(spec.columns.get(f, f) in columns for f in answer_fields)
    needed = template.fields if has_answers else template.input_fields
    if not has_answers:  # a configured mapping for the answer column must not demand it
        spec = spec.model_copy(update={"columns": {f: c for f, c in spec.columns.items() if f not in answer_fields}})
    skipped: Counter = Counter()
    examples = to_examples(table, spec, needed, template.label_field if has_answers else None, task, skipped)
    return examples, has_answers, dict(skipped)


def _answer_fields(template: PromptTemplate) -> set[str]:
    """The data fields only the completion reads (label, answer, entities...): what a file may leave out."""
    fields = template.fields - template.input_fields
    task = template.task
    return (fields - task.derived) | (task.structured if fields & task.derived else set())


def prepare(data_path: str, cfg: RunConfig, template: PromptTemplate, fmt: ChatFormat, labels: list[str],
            limit: int | None = None) -> PredictionSet:
    examples, has_answers, skipped = read_rows(data_path, cfg, template, limit)
    # The training encoder wants a completion. Rows without one get a stand-in: the longest label (a prompt
    # that had to be shortened keeps room for any answer, as in training) or an empty answer for open tasks.
    stand_in = max(labels, key=lambda label: len(fmt.encode_completion(label)), default="")
    to_encode = examples if has_answers else [_with_placeholder_answer(ex, template, stand_in) for ex in examples]
    samples, _ = encode_examples(to_encode, template, fmt, labels, cfg.template)
    by_where = {s.example["_where"]: s for s in samples}
    prompts, truncated = [], []
    for ex in to_encode:
        sample = by_where.get(ex["_where"])
        prompts.append(sample.prompt_ids if sample else None)
        truncated.append(bool(sample) and sample.example is not ex)
    return PredictionSet(examples, prompts, truncated, has_answers, skipped)


def _with_placeholder_answer(ex: dict, template: PromptTemplate, label: str = "") -> dict:
    task = template.task
    filled = {**ex, **{f: [] if f in task.structured else "" for f in _answer_fields(template)}}
    if template.label_field:
        filled[template.label_field] = label
    return {**filled, **(task.derive(filled) if task.derived else {})}


def predict(trained, data_path: str, output: Path, batch_size: int | None = None, limit: int | None = None,
            task: str | None = None, device="cpu") -> dict:
    """Write the predictions file; returns {'rows', 'skipped', 'too_long', 'metrics'} for the summary."""
    lines, summary = predict_rows(trained, data_path, batch_size, limit, task, device)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output, lines)
    return summary


def predict_rows(trained, data_path: str | Table, batch_size: int | None = None, limit: int | None = None,
                 task: str | None = None, device="cpu", decoding: str | None = None) -> tuple[list[dict], dict]:
    """One prediction per row ({row, where, input, generated, predicted[, expected]}), and the summary.
    decoding: free or constrained (where the task has constrained decoding); None answers as the run's
    headline was measured."""
    cfg, entry = trained.task(task)  # the task's config and its manifest entry (labels)
    template, fmt = PromptTemplate(cfg.template), ChatFormat(trained.tokenizer, cfg.template)
    labels = entry.labels
    rows = prepare(data_path, cfg, template, fmt, labels, limit)
    # The evaluator decides the token budget and constrained decoding exactly as in the run's evaluation.
    evaluator = Evaluator(trained.tokenizer, template, fmt, labels, cfg.eval, device, template.label_field)
    ready = [i for i, p in enumerate(rows.prompts) if p is not None]
    # The manifest says how the run's headline answers were decoded (auto: validation's choice); a run written
    # before it recorded that decodes constrained only when eval.decoding says so.
    decoding = decoding or entry.decoding or ("constrained" if cfg.eval.decoding == "constrained" else "free")
    if "constrained" not in evaluator.kinds:
        decoding = "free"
    generated = evaluator.decode(trained.model, [rows.prompts[i] for i in ready], [rows.examples[i] for i in ready],
                                 decoding, "predict",
                                 batch_size or cfg.eval.batch_size)
    scored = [rows.examples[i] if rows.has_answers else _with_placeholder_answer(rows.examples[i], template)
              for i in ready]
    metrics, predicted = template.task.score(generated, scored, labels) if ready else ({}, [])
    results = {i: (g, p) for i, g, p in zip(ready, generated, predicted)}
    lines = []
    for i, ex in enumerate(rows.examples):
        line = {"row": i, "where": ex["_where"], "input": _input_text(ex, template, labels)}
        if i in results:
            line.update(generated=results[i][0], predicted=results[i][1], truncated=rows.truncated[i])
        else:
            line.update(generated=None, predicted=None,
                        error=f"longer than template.max_length={cfg.template.max_length} (template.overlong="
                              f"{cfg.template.overlong})")
        if rows.has_answers:
            line["expected"] = template.completion(ex)
        lines.append(line)
    return lines, {"rows": len(lines), "skipped": rows.skipped, "too_long": len(lines) - len(ready),
                   "metrics": metrics if rows.has_answers else None, "columns": template.task.columns}
