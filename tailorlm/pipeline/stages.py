"""The stages after preparation, each a function with typed inputs and outputs that a notebook can call on its
own: load the base model -> prompting baselines -> train -> evaluate -> report.

None of them writes outside the run directory it is given, and none decides what kind of run this is: a
single-task run is a task set of one (prepare.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tailorlm.config import RunConfig
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.eval.baselines import best_prompting, is_prompting, run_baselines, variant_name
from tailorlm.eval.curve_report import curve_file, plot_curve
from tailorlm.eval.during_training import TrainingEvaluation, validation_subset
from tailorlm.eval.evaluate import Evaluator
from tailorlm.eval.report import TITLES, format_metric, print_table, variant_title, write_report
from tailorlm.eval.results import Results, TaskResults
from tailorlm.eval.rollouts import TaskSampler
from tailorlm.eval.training_report import overfit_step, plot_training, training_lines
from tailorlm.models.loading import LoadedModel, load_model
from tailorlm.pipeline.prepare import Prepared, TaskData
from tailorlm.rundir import METRICS_SCHEMA, RunDir
from tailorlm.train import distributed
from tailorlm.train.fit import Fit, fit
from tailorlm.ui import console, stage


@dataclass
class Baselines:
    """The base model's prompting results (every kind, the k-shot curve) and the classic classifier, per task."""
    variants: dict[str, dict] = field(default_factory=dict)  # task -> variant -> metrics
    predictions: list[dict] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)  # task -> k-shot curve
    asked: dict[str, str] = field(default_factory=dict)  # task -> the entity format prompting asked in, if not training's

    def to_json(self) -> dict:
        return {"variants": self.variants, "predictions": self.predictions, "curves": self.curves, "asked": self.asked}


def load_base(prepared: Prepared, device) -> LoadedModel:
    stage("Model")
    cfg = prepared.cfg
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, device, prepared.tokenizer, quantize=cfg.method.name == "qlora")
    console.print(f"Loaded {loaded.name} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters, "
                  f"{next(loaded.model.parameters()).dtype}, {device}) in {time.perf_counter() - t0:.0f} s")
    return loaded


def evaluators(prepared: Prepared, device) -> dict[str, Evaluator]:
    """One Evaluator per task: the same prompts, decoding and answer parsing for every model it scores."""
    return {name: Evaluator(prepared.tokenizer, t.template, t.fmt, t.labels, prepared.cfg.eval, device,
                            t.template.label_field, spans=t.extractive) for name, t in prepared.tasks.items()}


def baselines(prepared: Prepared, model, scorers: dict[str, Evaluator]) -> Baselines:
    """Prompting baselines of the base model, every kind and the k-shot curve, and the classic classifier."""
    cfg, result = prepared.cfg, Baselines({name: {} for name in prepared.tasks})
    if not cfg.eval.baselines:  # no baselines at all: the classic classifier is one of them
        return result
    started = RunDir(cfg.model.path).is_run()  # a finished run's model is what training starts from
    result.asked = asked_formats(prepared)
    for name, t in prepared.tasks.items():
        scorer, test, train = scorers[name], t.encoded["test"], t.splits.train
        asked = result.asked.get(name)
        if asked:
            scorer, test, train = _asked_in(asked, t, scorer)
        # the rule stays short enough for an 80-column log; the details go on a line of their own
        stage(f"Prompting baselines: {name} ({'the starting model' if started else 'base model'})")
        details = ([f"starting model: {cfg.model.path}"] if started else []) + \
            ([f"entities asked for as {asked} (eval.prompting_entity_format)"] if asked else [])
        if details:
            console.print("; ".join(details))

        def report(variant: str, metrics: dict, t=t) -> None:
            console.print(f"{variant_title(variant, metrics)}: " + ", ".join(
                f"{TITLES.get(c, c)} {format_metric(c, metrics.get(c))}" for c in t.template.task.columns)
                + f" ({metrics['prompt_tokens']:.0f} prompt tokens, {metrics['seconds_per_100']:.1f} s per 100)")
        # the classic model answers in the training format, as the fine-tuned model does
        measured = run_baselines(model, scorer, train, test, cfg.eval, cfg.train.seed, report,
                                 classic_with=(scorers[name], t.encoded["test"]))
        result.variants[name] = measured.variants
        result.curves[name] = measured.curve
        result.predictions += prepared.tagged(measured.predictions, name)
    return result


def prompting_entity_format(cfg: RunConfig, started: bool) -> str | None:
    """The entity format extraction's prompting baselines ask for (eval.prompting_entity_format), where it is
    not the training format; None where they ask in the training format, or the task is not extraction."""
    template = cfg.template
    if template.preset != "ner":
        return None
    asked = cfg.eval.prompting_entity_format
    if asked == "auto":  # a finished run was trained to answer in its format; a user's own template asks in its own
        own = any(getattr(template, part) is not None for part in ("instruction", "prompt", "completion"))
        asked = template.entity_format if started or own else "list"
    return asked if asked != template.entity_format else None


def asked_formats(prepared: Prepared) -> dict[str, str]:
    """task -> the entity format its prompting baselines ask for, where it is not the training format."""
    started = RunDir(prepared.cfg.model.path).is_run()
    asked = {name: prompting_entity_format(t.cfg, started) for name, t in prepared.tasks.items()}
    return {name: entity_format for name, entity_format in asked.items() if entity_format}


def _asked_in(entity_format: str, t: TaskData, scorer: Evaluator) -> tuple[Evaluator, list[Sample], list[dict]]:
    """An evaluator asking for the entities in another format, the test samples re-rendered in it, and the
    training examples (the demonstrations) with their answers written in it. The same sentences (shortened
    where the training format's were), so every row of the table scores the same examples and reads back
    their gold entities alike."""
    template = PromptTemplate(t.cfg.template.model_copy(update={"entity_format": entity_format}))

    def written(example: dict) -> dict:  # the answer as this format writes it (derived at load in the training one)
        return {**example, **template.task.derive(example)}

    samples = []
    for sample in t.encoded["test"]:
        example = written(sample.example)
        question = template.prompt(example, t.labels)
        prompt = t.fmt.encode_prompt(t.fmt.prompt_text(question))
        answer = t.fmt.encode_completion(t.fmt.completion_text(question, template.completion(example)))
        samples.append(Sample(prompt + answer, [IGNORE] * len(prompt) + answer, example))
    evaluator = Evaluator(scorer.tokenizer, template, t.fmt, t.labels, scorer.spec, scorer.device,
                          template.label_field, spans=t.extractive)
    return evaluator, samples, [written(ex) for ex in t.splits.train]


def train(prepared: Prepared, model, run_dir: RunDir, device, scorers: dict[str, Evaluator], resume: bool = False,
          log=None) -> Fit | None:
    """Fine-tune `model` with the config's method; evaluations during training use `scorers`. Returns the
    trained model with its history (None on the other processes under torchrun)."""
    cfg = prepared.cfg
    objective = f", {cfg.objective.name}" if cfg.objective.name != "sft" else ""
    stage(f"Fine-tuning ({cfg.method.name}{objective})")
    during = TrainingEvaluation(cfg, prepared.tokenizer, prepared.validation(), scorers, device, prepared.retention)
    sampler = None
    if cfg.objective.reinforcement:  # GRPO answers the task's prompts (one task: prepare) and is rewarded by its metric
        name = next(iter(prepared.tasks))
        sampler = TaskSampler(cfg.objective.grpo, scorers[name], cfg.objective._code_allowed, cfg.eval.batch_size)
    result = fit(cfg, model, prepared.tokenizer, prepared.training_set, run_dir.path, device, resume, log, during,
                 prepared.held_out_pairs(), sampler)
    if result is None:
        return None
    history = result.history
    other = history.seconds - history.step_seconds
    console.print(f"Trained {history.completed} steps in {history.seconds:.0f} s: {history.step_seconds:.0f} s of steps "
                  f"({history.tokens / max(history.step_seconds, 1e-9):.0f} tokens/s)"
                  + (f", {other:.0f} s of evaluation and checkpoints" if other >= 1 else "")
                  + f"; saved {result.saved.relative_to(run_dir.path)}/")
    return result


def evaluate(prepared: Prepared, model, scorers: dict[str, Evaluator], found: Baselines) -> Results:
    """The fine-tuned model on every task's test split: free decoding always, constrained too where it is the
    production setting (eval.decoding)."""
    stage("Evaluation (fine-tuned)")
    tasks, predictions = {}, []
    for name, t in prepared.tasks.items():
        variants = dict(found.variants.get(name, {}))
        kinds = ["free"] + (["constrained"] if scorers[name].decodes_constrained else [])
        for kind in kinds:
            evaluated = scorers[name].run(model, t.encoded["test"], variant_name("fine_tuned", kind), kind=kind)
            variants[variant_name("fine_tuned", kind)] = evaluated.metrics
            predictions += prepared.tagged(evaluated.predictions, name)
        task = t.template.task
        decoding = _choose_decoding(prepared, model, scorers[name], t) if len(kinds) > 1 and \
            prepared.cfg.eval.decoding == "auto" else None
        tasks[name] = TaskResults(t.cfg.template.preset, task.headline, list(task.columns), variants,
                                  best_prompting(variants, task.headline), found.curves.get(name, {}), t.labels,
                                  len(t.encoded["test"]), t.preflight.facts.get("trivial", []),
                                  t.preflight.facts.get("contamination"), decoding)
    return Results(tasks, predictions)


def _choose_decoding(prepared: Prepared, model, scorer: Evaluator, task: TaskData) -> dict:
    """eval.decoding=auto: free and constrained decoding on the validation answers evaluated during training
    (the whole validation split when none are; never the test split), the higher headline chosen; a tie keeps
    free decoding, the cheaper."""
    cfg, validation = prepared.cfg, task.encoded["validation"]
    samples = validation_subset(validation, cfg.eval.during_training or len(validation), cfg.train.seed)
    headline = task.template.task.headline
    figures = {kind: scorer.run(model, samples, f"validation {kind}", kind=kind).metrics[headline]
               for kind in ("free", "constrained")}
    chosen = "constrained" if figures["constrained"] > figures["free"] else "free"
    console.print(f"decoding: {chosen}, chosen on {len(samples)} validation answers ({headline} "
                  f"{figures['free']:.3f} free, {figures['constrained']:.3f} constrained)")
    return {"chosen": variant_name("fine_tuned", chosen), "validation": figures, "rows": len(samples)}


def metrics_json(prepared: Prepared, results: Results, result: Fit) -> dict:
    """metrics.json: a section per task (a single-task run has one), the mixing and the training facts."""
    history, cfg = result.history, prepared.cfg
    scored = [e for e in history.evaluations if "reward_accuracy" in e]
    preference = {k: scored[-1][k] for k in ("reward_accuracy", "reward_margin", "pref_loss")} if scored else None
    train_facts = {"method": cfg.method.name, "objective": cfg.objective.name, "preference": preference,
                   "steps": history.completed, "planned_steps": history.steps,
                   "trainable_share": round(history.trainable / max(history.parameters, 1), 5),
                   "seconds": round(history.seconds, 1), "step_seconds": round(history.step_seconds, 3),
                   "tokens": history.tokens, "best_step": history.best_step,
                   "stopped_early": history.stopped_early, "processes": distributed.world().size,
                   "final_val_loss": history.val_loss[-1]["loss"] if history.val_loss else None,
                   "retention": result.retention}
    return {"schema": METRICS_SCHEMA, "tasks": results.sections(), "mixing": cfg.mixing.model_dump(),
            "train": train_facts}


def report(prepared: Prepared, run_dir: RunDir, results: Results, result: Fit, source: str, device) -> int | None:
    """train_log.json, example_losses.jsonl, the curves, report.md and the terminal table. Returns the step
    where overfitting began, if it did."""
    cfg, history = prepared.cfg, result.history
    overfit = overfit_step(history.evaluations)
    run_dir.write("train_log.json", {"train_loss": history.train_loss, "val_loss": history.val_loss,
                                     "evaluations": history.evaluations, "events": history.events,
                                     "best_step": history.best_step, "overfit_step": overfit,
                                     "stopped_early": history.stopped_early, "seconds": history.seconds,
                                     "step_seconds": history.step_seconds,
                                     "tokens": history.tokens, "retention": result.retention})
    run_dir.write_rows("example_losses.jsonl", result.example_losses)
    plot_training(run_dir / "loss_curve.png", history, overfit)
    tasks = prepared.tasks
    world = distributed.world()
    sections = results.sections()
    facts = {"task": ", ".join(name if name == t.cfg.template.preset else f"{name} ({t.cfg.template.preset})"
                               for name, t in tasks.items()),
             "model": source, "method": cfg.method.name + (
                 f", objective {cfg.objective.name}" if cfg.objective.name != "sft" else ""),
             "data": ", ".join(t.splits.sources["train"] for t in tasks.values()),
             "train / validation / test": f"{len(prepared.training_set)} / "
                                          f"{sum(map(len, prepared.validation().values()))} / "
                                          f"{sum(r.n_test for r in results.tasks.values())}",
             "training": f"{history.completed} steps, lr {cfg.lr:g}, {history.seconds:.0f} s on {device}" + (
                 f", {world.size} processes ({world.mode})" if world.active else ""),
             "prompting": "greedy, zero-shot: each held-out conversation before its final reply" if all(
                 t.template.task.conversational for t in tasks.values()) else
                 f"greedy; {', '.join(_kinds_measured(sections) or cfg.eval.prompting)}; k-shot curve k={cfg.eval.few_shot_k}, "
                 f"{cfg.eval.demos} demonstrations from the training split"}
    started = RunDir(cfg.model.path).is_run()
    if started:  # training continued a finished run: its model is what was prompted
        facts["prompting"] = f"the starting model (the finished run {cfg.model.path}); " + facts["prompting"]
    asked = set(asked_formats(prepared).values())
    if asked and cfg.eval.baselines:
        facts["prompting"] += f"; entities asked for as {', '.join(sorted(asked))} (eval.prompting_entity_format)"
    for name, task in results.tasks.items():
        plot_curve(run_dir / curve_file(name), task.curve, task.fine_tuned)
    write_report(run_dir / "report.md", f"tailorlm run: {cfg.output.name}", facts, sections,
                 training_lines(history, overfit, result.retention, result.example_losses, cfg.eval.select.metric))
    console.print()
    for name, task in results.tasks.items():
        print_table(task.variants, task.n_test, tuple(task.columns), name, task.trivial, task.contamination,
                    task.curve)
    if started and any(task.variants.keys() - {"fine_tuned"} for task in results.tasks.values()):
        console.print(f"prompting rows: the starting model, the finished run {cfg.model.path}", soft_wrap=True)
    return overfit


def _kinds_measured(sections: dict) -> list[str]:
    """The prompting kinds the tables hold (NER has no likelihood kind, open answers only free generation)."""
    kinds = {m.get("kind") for section in sections.values() for v, m in section["variants"].items() if is_prompting(v)}
    return [k for k in ("free", "constrained", "likelihood") if k in kinds]
