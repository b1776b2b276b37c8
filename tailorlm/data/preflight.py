"""Preflight: what the data will do to training, shown before a single step is trained.

Rows read and skipped, duplicates, train/eval leakage, empty prompts or answers, preference pairs whose two
answers are identical or nearly so, label balance, token lengths (with a histogram), truncation, which tokens
carry loss, and tokens and time per epoch. Each finding
is ok, warn or error; config `preflight.*` decides which checks stop the run (e.g. `leakage: error`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.text import Text

from tailorlm.config import RunConfig
from tailorlm.data import quality
from tailorlm.data.cost import estimate_training
from tailorlm.data.model_shape import ModelShape, read_shape
from tailorlm.data.preferences import IDENTICAL, answer_text, identical_answers
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.errors import TailorError
from tailorlm.ui import console

SPLITS = ("train", "validation", "test")
SHOW = 3  # examples listed per finding


@dataclass
class Preflight:
    findings: list[dict] = field(default_factory=list)  # {check, level, message, examples}
    facts: dict = field(default_factory=dict)

    def add(self, check: str, level: str, message: str, examples: list[str] = ()) -> None:
        self.findings.append({"check": check, "level": level, "message": message, "examples": list(examples)[:SHOW]})

    @property
    def errors(self) -> list[dict]:
        return [f for f in self.findings if f["level"] == "error"]


def _level(policy: str, problem: bool) -> str | None:
    """ok when there is no problem; otherwise the configured policy (None: not reported)."""
    return "ok" if not problem else (None if policy == "ignore" else policy)


def run_preflight(cfg: RunConfig, splits, encoded: dict[str, list[Sample]], reports: dict, template, tokenizer,
                  n_params: int | ModelShape, device: torch.device) -> Preflight:
    """Every check on one task's data. n_params: the model's parameter count, whose layout is then read from
    the model's config (data/model_shape.py), or the layout itself where the caller has it."""
    spec, pf = cfg.preflight, Preflight()
    # Duplicates and leakage compare the examples' own inputs, not rendered prompts: the template's shared
    # instruction would make every short input look nearly the same.
    inputs = {n: [_input_text(ex, template.input_fields) for ex in splits[n]] for n in SPLITS}
    answers = {n: [template.completion(ex) for ex in splits[n]] for n in SPLITS}
    prompts = {n: [template.prompt(ex, splits.labels) for ex in splits[n]] for n in SPLITS}

    read = {n: len(splits[n]) for n in SPLITS}
    skipped = {n: sum(r.values()) for n, r in splits.skipped.items()}
    pf.facts["rows"] = {"read": read, "skipped": splits.skipped, "truncated": {n: reports[n].truncated for n in SPLITS},
                        "dropped": {n: dict(reports[n].dropped) for n in SPLITS}}
    pf.add("rows", "warn" if skipped else "ok", f"examples: {read}" + (f"; skipped rows: {skipped}" if skipped else ""))

    empty = [f"{ex['_where']}" for n in SPLITS for ex, p, a in zip(splits[n], prompts[n], answers[n])
             if not p.strip() or not a.strip()]
    if (lv := _level(spec.empty, bool(empty))):
        pf.add("empty", lv, f"{len(empty)} examples with an empty prompt or answer", empty)

    if template.task.conversational:
        check_replies(pf, splits.train)

    for n in SPLITS:
        check_pairs(pf, n, splits[n], spec.identical_pairs, spec.near_identical_pairs, spec.max_near_rows)

    for n in SPLITS:  # duplicates inside each split: the same prompt and answer twice is double weight
        whole = [p + "\n" + a for p, a in zip(inputs[n], answers[n])]
        groups = quality.exact_groups(whole)
        near = quality.near_pairs(whole, spec.near_duplicate_jaccard) if len(whole) <= spec.max_near_rows else []
        extra = sum(len(g) - 1 for g in groups)
        where = [" = ".join(splits[n][i]["_where"] for i in g[:2]) for g in groups] + \
                [f"{splits[n][i]['_where']} ~ {splits[n][j]['_where']} ({s:.2f})" for i, j, s in near]
        if (lv := _level(spec.duplicates, bool(groups or near))):
            why = ("; `tailor pairs` repeats the pairs of rarer labels on purpose, to balance them"
                   if n == "train" and cfg.objective.preference and groups else "")
            pf.add("duplicates", lv, f"{n}: {extra} exact and {len(near)} near duplicates "
                                     f"(Jaccard >= {spec.near_duplicate_jaccard}){why}", where)

    for n in ("validation", "test"):  # leakage: an evaluation prompt the model has trained on
        exact = quality.exact_overlap(inputs[n], inputs["train"])
        small = len(inputs[n]) * len(inputs["train"]) <= spec.max_near_rows ** 2
        near = quality.near_pairs(inputs[n], spec.near_duplicate_jaccard, inputs["train"]) if small else []
        where = [f"{splits[n][i]['_where']} = {splits.train[j]['_where']}" for i, j in exact] + \
                [f"{splits[n][i]['_where']} ~ {splits.train[j]['_where']} ({s:.2f})" for i, j, s in near]
        if (lv := _level(spec.leakage, bool(exact or near))):
            pf.add("leakage", lv, f"{n}: {len(exact)} prompts also in train, {len(near)} nearly", where)
        if n == "test":  # kept whatever the policy: the report marks a test score the model partly trained on
            pf.facts["contamination"] = contamination(len(inputs[n]), exact, near, small)

    if template.label_field:
        dist = {n: _counts([ex[template.label_field] for ex in splits[n]], splits.labels) for n in SPLITS}
        counts = [c for c in dist["train"].values()]
        ratio = max(counts) / max(1, min(counts))
        pf.facts["labels"] = dist
        pf.facts["trivial"] = check_label_sets(pf, dist, spec.single_label)
        # With one training label the ratio is 1.0, which would read as a balanced, healthy label set.
        one_label = sum(1 for c in counts if c) == 1
        if not one_label and (lv := _level(spec.imbalance, ratio > spec.max_imbalance)):
            pf.add("labels", lv, f"train labels {dist['train']}; largest/smallest = {ratio:.1f}"
                                 + (f" (over {spec.max_imbalance:g})" if ratio > spec.max_imbalance else ""))

    lengths = np.array([len(s) for s in encoded["train"]])
    pcts = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}
    pf.facts["train_token_lengths"] = pcts
    cut = sum(reports[n].truncated + sum(v for why, v in reports[n].dropped.items() if why != IDENTICAL)
              for n in SPLITS)
    if (lv := _level(spec.truncation, bool(cut))):
        pf.add("length", lv, f"tokens per train sample {pcts}; max_length {cfg.template.max_length}: "
                             f"{cut} samples truncated or dropped ({cfg.template.overlong})")

    tokens = int(lengths.sum())
    steps = cfg.train.max_steps
    epochs = steps * cfg.train.batch_size * cfg.train.grad_accum / len(lengths) if steps else cfg.train.epochs
    shape = n_params if isinstance(n_params, ModelShape) else \
        read_shape([cfg.model.path, getattr(tokenizer, "name_or_path", "")], n_params)
    estimate = estimate_training(cfg, shape, encoded["train"], epochs, device)
    pf.facts.update(tokens_per_epoch=tokens, epochs=round(epochs, 3), estimated_train_seconds=round(estimate.seconds),
                    estimate_basis=estimate.basis)
    pf.add("time", "ok", f"{tokens:,} tokens per epoch x {epochs:.2g} epochs; estimated training time on "
                         f"{device.type}: {_duration(estimate.seconds)}: {estimate.describe()}")
    pf.facts["loss_preview"] = [loss_preview(s, tokenizer).plain for s in encoded["train"][:2]]
    return pf


def check_replies(pf: Preflight, conversations: list[dict]) -> None:
    """What the trained replies of real chat logs hold: one-word answers and keyboard mash."""
    where, replies = [], []
    for ex in conversations:
        for turn, m in enumerate(ex["messages"], start=1):
            if m["role"] == "assistant" and m.get("weight", 1) and not m.get("tool_calls"):
                where.append(f"{ex['_where']}, turn {turn}")
                replies.append(m["content"])
    one_word, mash = quality.weak_replies(replies)
    share = len(one_word) / max(1, len(replies))
    pf.facts["replies"] = {"trained": len(replies), "one_word": len(one_word), "keyboard_mash": len(mash)}
    pf.add("replies", "warn" if mash or share >= 0.05 else "ok",
           f"{len(replies):,} assistant replies in train: {len(one_word):,} of one word ({share:.1%}), {len(mash)} "
           f"that look like keyboard mash" + (" (give such turns \"weight\": 0, or drop them)" if mash else ""),
           [f"{where[i]}: {replies[i][:60]!r}" for i in mash])


def check_pairs(pf: Preflight, split: str, examples: list[dict], policy: str, threshold: float,
                max_rows: int) -> None:
    """Preference pairs that cannot teach: identical answers (left out of training, data/preferences.py) and
    nearly identical ones, whose preference rests on a few characters (kept: a one-word correction can be the
    point). A split of identical pairs only never gets here: encoding refuses it."""
    if policy == "ignore":
        return
    pairs = [ex for ex in examples if "_rejected" in ex]
    same = [ex["_where"] for ex in pairs if identical_answers(ex)]
    if same:
        pf.add("pairs", policy, f"{split}: {len(same)} of {len(pairs)} pairs have the same chosen and rejected "
                                f"answer (once whitespace is collapsed); they teach no preference and are left out "
                                f"(preflight.identical_pairs)", same)
    if len(pairs) > max_rows:
        return
    near = [(ex["_where"], s) for ex in pairs if not identical_answers(ex) and
            (s := quality.answer_similarity(answer_text(ex["_chosen"]), answer_text(ex["_rejected"]), threshold))]
    if near:
        pf.add("pairs", "warn", f"{split}: {len(near)} of {len(pairs)} pairs have nearly the same chosen and rejected "
                                f"answer (only case or punctuation differs, or similarity >= {threshold:g}); check "
                                f"that the difference is the preference you mean to teach",
               [f"{where} ({s:.2f})" for where, s in near])


def check_label_sets(pf: Preflight, dist: dict[str, dict[str, int]], policy: str) -> list[str]:
    """Findings for a degenerate label set; returns why a test score would be trivial (empty when it would not).

    A training split with one label teaches the model to repeat it, and a test split with one label is scored
    perfectly by a model that always answers it: either way accuracy and macro-F1 read 1.000 and mean nothing."""
    trivial = []
    train = [label for label, count in dist["train"].items() if count]
    if len(train) == 1:
        n = dist["train"][train[0]]
        trivial.append(f"the training split has a single label ('{train[0]}'), so the model can only learn to repeat it")
        if (lv := _level(policy, True)):
            pf.add("labels", lv, f"train: every one of the {n} examples has the label '{train[0]}': the model can "
                                 f"only learn to repeat it, so its test score would mean nothing "
                                 f"(preflight.single_label)")
    test = [label for label, count in dist["test"].items() if count]
    if len(test) == 1:
        trivial.append(f"every test example has the label '{test[0]}', so always answering it scores 1.000")
        pf.add("labels", "warn", f"test: every one of the {dist['test'][test[0]]} examples has the label "
                                 f"'{test[0]}'; the report marks the test score as trivial")
    return trivial


def contamination(n_test: int, exact: list[tuple[int, int]], near: list[tuple[int, int, float]],
                  near_checked: bool) -> dict:
    """How many test rows also occur in train (exactly, or nearly when near duplicates were searched for)."""
    exact_rows = {i for i, _ in exact}
    near_rows = {i for i, _, _ in near} - exact_rows
    found = len(exact_rows) + len(near_rows)
    return {"test_rows": n_test, "in_train": found, "share": round(found / n_test, 4) if n_test else 0.0,
            "exact": len(exact_rows), "near": len(near_rows), "near_checked": near_checked}


def _input_text(example: dict, fields: set[str]) -> str:
    return "\n".join(str(example[f]) for f in sorted(fields) if f in example)


def _counts(values: list[str], labels: list[str]) -> dict[str, int]:
    return {label: values.count(label) for label in labels}


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def loss_preview(sample: Sample, tokenizer) -> Text:
    """The sample's tokens, dim where they are prompt and bold green where the model is trained on them."""
    text = Text()
    for token, label in zip(sample.input_ids, sample.labels):
        piece = tokenizer.decode([token])
        text.append(piece, style="bold green" if label != IGNORE else "dim")
    return text


def show(pf: Preflight, tokenizer=None, samples: list[Sample] = ()) -> None:
    styles = {"ok": "green", "warn": "yellow", "error": "bold red"}
    for f in pf.findings:
        console.print(f"[{styles[f['level']]}]{f['level']:>5}[/] {f['check']:<10} {f['message']}")
        for ex in f["examples"]:
            console.print(f"{'':17}{ex}", style="dim")
    if tokenizer is not None:
        for s in samples[:1]:
            console.print("[dim]loss preview of the first training sample (green tokens carry loss):[/]")
            console.print(loss_preview(s, tokenizer))


def plot_lengths(path: Path, samples: list[Sample], max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist([len(s) for s in samples], bins=40, color="#4c72b0")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per training sample")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def enforce(pf: Preflight) -> None:
    if pf.errors:
        what = "; ".join(f"{f['check']}: {f['message']}" for f in pf.errors)
        raise TailorError(f"preflight failed ({what}); fix the data or relax preflight.* in the config")
