"""`tailor auto` from start to end: the candidates, the data facts and the cost model, the search within the
budget, the test split once for the winner, the leaderboard.

The config gives the task, the data and the template. The recipe is auto's to choose: the model, the method
and LoRA rank, the learning rate and the number of steps (RECIPE_KEYS). Any of them the config or the command
line sets is kept as set. How trials are run (their evaluations, the test split left alone) is auto's own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tailorlm.auto import workers
from tailorlm.auto.candidates import Candidate, Skipped, candidate_for, find_candidates
from tailorlm.auto.data_curve import data_curve
from tailorlm.auto.final import Final, evaluate_winner
from tailorlm.auto.plan import FULL_MAX_PARAMS, Config, Rates, duration, fitted_top, full_steps, ladder, recipes
from tailorlm.auto.report import write_leaderboard
from tailorlm.auto.search import Search, open_auto_study, search
from tailorlm.auto.trials import TrialRunner, recorded_seconds
from tailorlm.config import RunConfig, load_config, parse_override
from tailorlm.data.cost import estimate_training
from tailorlm.data.model_shape import read_shape
from tailorlm.errors import ConfigError, TailorError
from tailorlm.eval.during_training import metric_key
from tailorlm.models import kept_weights
from tailorlm.models.loading import resolve_device
from tailorlm.pipeline.prepare import prepare
from tailorlm.sweep.study import storage_url, study_lock
from tailorlm.sweep.space import overrides as as_overrides
from tailorlm.track.flat import flatten
from tailorlm.ui import console, stage

RECIPE_KEYS = ("model.path", "method.name", "method.lora.r", "method.lora.alpha", "train.lr", "train.max_steps",
               "train.epochs")
VALIDATION_ANSWERS = 100  # generated validation answers that score each trial (fewer when the split is smaller)
LOAD_SECONDS = 10.0  # a trial's start before any measurement: model load, data, first evaluation's setup


@dataclass
class AutoOutcome:
    out: Path
    search: Search
    final: Final | None
    candidates: list[Candidate]
    skipped: list[Skipped]


def fixed_recipe(config_path: str | None, overrides: list[str], search_recipe: bool = False) -> dict[str, object]:
    """The recipe keys the user set: in the config file (not the embedded default job's, whose recipe is the
    fixed one auto competes with, nor a file's under search_recipe: a config written for `tailor run`, whose
    recipe auto should search) or on the command line."""
    raw = {}
    if config_path is not None and not search_recipe:
        raw = flatten(yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {})
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return {k: raw[k] for k in RECIPE_KEYS if k in raw}


@kept_weights.keeping()  # trials of one model load it once (models/kept_weights.py)
def auto(config_path: str | None, overrides: list[str], budget: float, models: list[str] = (),
         embedded: bool = True, output: str | Path | None = None, storage: str | None = None,
         trust_remote_code: bool = False, curve: bool = False, search_recipe: bool = False) -> AutoOutcome:
    clock, started_at = time.monotonic(), time.time()
    base = load_config(config_path, list(overrides), trust_remote_code=trust_remote_code)
    if base.tasks:
        raise ConfigError(str(config_path), ["tasks: tailor auto searches a config of one task (data and template); "
                                             "run a multi-task mix with tailor run"])
    if base.objective.preference:
        raise ConfigError(str(config_path), [f"objective.name: {base.objective.name}: tailor auto searches "
                                             f"supervised fine-tuning (sft)"])
    fixed = fixed_recipe(config_path, list(overrides), search_recipe)
    out = Path(output or Path("auto") / base.output.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(base.train.device)
    candidates, skipped = _candidates(base, fixed, list(models), embedded, trust_remote_code)

    stage("Data and the cost of each recipe")
    plan_in = _cost_model(base, config_path, list(overrides), fixed, candidates, skipped, device, trust_remote_code)
    rates, n_train, n_val, n_test, task_name, headline = plan_in
    candidates = [c for c in candidates if any(name == c.name for name, _ in rates.step)]  # those with a recipe
    metric = metric_key(task_name, headline)
    batch = base.train.batch_size * base.train.grad_accum
    full = full_steps(n_train, batch, fixed)
    lengths = ladder(full)
    answers = rates.answers = min(VALIDATION_ANSWERS, n_val)
    rates.top = lengths[-1]
    method = base.method.name

    def final_estimate() -> float:
        """The final evaluation's time, after the search: the test rows through every candidate's prompting
        (none when the config asks for no baselines), and the winner (free and constrained decoding), each
        model loaded once."""
        prompting = len(base.eval.baselines) * max(1, min(len(base.eval.prompting), 2))
        return sum(rates.load[c.name] * bool(prompting) + rates.per_answer[c.name] * n_test * prompting
                   for c in candidates) + max(rates.load.values()) + max(rates.per_answer.values()) * n_test * 2

    by_model = [[Config(c, r) for r in recipes(c, fixed, method)] for c in candidates]
    configs = [row[i] for i in range(max(map(len, by_model))) for row in by_model if i < len(row)]  # priors first
    for c in list(candidates):
        shortest = min(rates.trial(x, lengths[0]) for x in configs if x.candidate is c)
        if shortest > budget:
            skipped.append(Skipped(c.name, f"too slow for the budget: its shortest trial ({lengths[0]} steps) needs "
                                           f"about {duration(shortest)}"))
            console.print(f"[yellow]skipped {c.name}: {skipped[-1].why}[/]")
            candidates.remove(c)
            configs = [x for x in configs if x.candidate is not c]
    if not configs:
        raise TailorError(f"tailor auto: the budget ({duration(budget)}) is too small for any candidate; give a "
                          f"larger --budget")

    url = storage_url(None, out, storage)
    study = open_auto_study(url, base.output.name, metric, _fingerprint(base), out)
    spent = recorded_seconds(study) + study.user_attrs.get("other_seconds", 0.0)
    console.print(f"{len(configs)} configs of {len(candidates)} model(s); {n_train} training rows, {answers} "
                  f"validation answers score each trial on {metric}; {duration(budget)} for the search"
                  + (f", of which {duration(spent)} spent by earlier runs of it" if spent else "")
                  + f"; then the test split, once: about {duration(final_estimate())}")
    if search_recipe and config_path is not None:
        console.print("searched, not kept (--search-recipe): the recipe " + str(config_path) + " sets")
    if fixed:
        console.print("kept as set: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    lengths = _fit_the_ladder(lengths, configs, rates, budget - spent - (time.monotonic() - clock), fixed, study, url)
    runner = TrialRunner(config_path, list(overrides), base, study, url, out, metric, answers)
    trials_before = recorded_seconds(study)
    found = search(configs, lengths, rates, runner, spent + (time.monotonic() - clock), budget, fixed, metric)
    found.full, found.epoch_steps = full, n_train / batch
    searched = time.monotonic() - clock
    # what this run spent on planning counts on a later resume too (its trials are in the study)
    study.set_user_attr("other_seconds", study.user_attrs.get("other_seconds", 0.0) + max(
        searched - (recorded_seconds(study) - trials_before), 0.0))
    final = None
    elsewhere = workers.left_to_its_trainer(study, found.winner, started_at) if found.winner is not None else None
    if elsewhere:  # the other worker scores it on test and writes the leaderboard; two would race on one folder
        folder = Path(str(found.winner.run_dir)).parent
        console.print(f"\nThe winner is {found.winner.key} ({metric} {found.winner.value:.3f} on validation), "
                      f"trained by {elsewhere}: " + (
                          f"that worker has scored it on test; the leaderboard is in {folder / 'leaderboard.md'}."
                          if workers.scored_by_peer(study, found.winner, started_at) else
                          f"that worker scores it on test and writes the leaderboard in its auto folder ({folder}). "
                          f"If it stops before writing it, run this command again there."))
        return AutoOutcome(out, found, None, candidates, skipped)
    if found.winner is not None:
        winner_model = found.winner.key.split(" | ")[0]
        final = evaluate_winner(Path(found.winner.run_dir), base, candidates, winner_model, device, trust_remote_code)
    final_seconds = time.monotonic() - clock - searched
    rows_curve = None
    if curve and final is not None and final.results.tasks[final.task].fine_tuned is not None:
        rows_curve = data_curve(Path(found.winner.run_dir), n_train, headline,
                                final.results.tasks[final.task].fine_tuned, out, trust_remote_code)
    facts_md = {"task": f"{task_name} ({headline} on validation chooses; the test split is read once, at the end)",
                "data": f"{n_train} training / {n_val} validation / {n_test} test rows",
                "budget": f"{duration(budget)} for the search, which took {duration(spent + searched)}; then the "
                          f"test split, once: {duration(final_seconds)}",
                "search": f"successive halving over {len(found.plan.configs)} of {len(configs)} configs, rungs of "
                          f"{', '.join(map(str, found.plan.rungs))} steps"}
    text = write_leaderboard(out, base.output.name, found, final, candidates, skipped, facts_md, spent + searched,
                             final_seconds, rows_curve)
    console.print()
    console.print(text.split("## Recommendation", 1)[-1].strip(), soft_wrap=True)
    if found.winner is not None:
        workers.scored(study, found.winner)
    console.print(f"\nLeaderboard: {out / 'leaderboard.md'}")
    return AutoOutcome(out, found, final, candidates, skipped)


def _fit_the_ladder(lengths: list[int], configs: list[Config], rates: Rates, seconds: float, fixed: dict,
                    study, url: str) -> list[int]:
    """The ladder with its top fitted to the budget (plan.fitted_top), unless the user set the length. The first
    run of a search records the top in the study: a resumed run, or another worker, plans on the same lengths,
    so the trials already there are read back rather than trained again at lengths of their own. A study whose
    trials ran before a top was recorded keeps the full length they were planned on."""
    natural = lengths[-1]
    if {"train.max_steps", "train.epochs"} & fixed.keys():
        return lengths
    with study_lock(url, study.study_name):
        recorded = study.user_attrs.get("top")
        if recorded is None:
            top, first_round = (natural, 0) if study.get_trials(deepcopy=False) else \
                fitted_top(configs, natural, rates, seconds)
            study.set_user_attr("top", top)
    if recorded is not None:
        top = int(recorded)
        if top != natural:
            console.print(f"the longest trial trains {top} steps, as the first run of this search fitted it to its "
                          f"budget (the full length is {natural} steps); another --output starts a search fitted to "
                          f"this budget")
    elif top < natural:
        console.print(f"the full length ({natural} steps) does not fit the budget: the longest trial will train "
                      f"{top} steps, the most that fits after a first round of {first_round} configs")
    rates.top = top
    return ladder(top)


def _candidates(base: RunConfig, fixed: dict, models: list[str], embedded: bool,
                trust_remote_code: bool) -> tuple[list[Candidate], list[Skipped]]:
    stage("Candidates")
    if "model.path" in fixed:
        if models or not embedded:
            console.print("[yellow]the config sets model.path: --model and --only-listed are not used[/]")
        candidates, skipped = [candidate_for(str(fixed["model.path"]), trust_remote_code)], []
    else:
        candidates, skipped = find_candidates(models, embedded, base.template.preset == "chat", trust_remote_code)
    for s in skipped:
        console.print(f"[yellow]skipped {s.name}: {s.why}[/]")
    return candidates, skipped


def _cost_model(base: RunConfig, config_path, overrides: list[str], fixed: dict, candidates: list[Candidate],
                skipped: list[Skipped], device, trust_remote_code: bool):
    """Each candidate's data facts and the cost model's seconds per step of each recipe's method, before any
    trial measures them. A candidate with no recipe (full fine-tuning fixed on a model too large for it) is
    skipped, with the reason."""
    rates, facts = Rates({}, {}, {}), {}
    for c in candidates:
        cfg = base.model_copy(update={"model": base.model.model_copy(update={"path": c.path})})
        mine = recipes(c, fixed, base.method.name)
        if not mine:
            skipped.append(Skipped(c.name, f"no recipe: full fine-tuning is offered up to "
                                           f"{FULL_MAX_PARAMS / 1e6:.0f}M parameters"))
            console.print(f"[yellow]skipped {c.name}: {skipped[-1].why}[/]")
            continue
        with _quiet():
            prepared = prepare(cfg)
        (name, task), = prepared.tasks.items()
        samples, batch = prepared.training_set, cfg.train.batch_size * cfg.train.grad_accum
        facts.setdefault("rows", (len(samples), len(task.encoded["validation"]), len(task.encoded["test"])))
        facts.setdefault("task", (name, task.template.task.headline))
        top = full_steps(len(samples), batch, fixed)
        shape = read_shape([c.path], c.params)
        for recipe in mine:
            method_cfg = load_config(config_path, overrides + as_overrides(recipe.overrides()),
                                     trust_remote_code=trust_remote_code)
            estimate = estimate_training(method_cfg, shape, samples, top * batch / len(samples), device)
            rates.step[(c.name, recipe.method)] = estimate.seconds / top
        # Until a trial measures them: a start of LOAD_SECONDS, and an answer costing what a training sample
        # does (its forward and backward against a prompt pass and a few cached decoding steps)
        rates.load[c.name] = LOAD_SECONDS
        rates.per_answer[c.name] = rates.step[(c.name, mine[0].method)] / batch
    if not facts:
        raise TailorError("tailor auto has no model to try: " + "; ".join(f"{s.name}: {s.why}" for s in skipped))
    return (rates, *facts["rows"], *facts["task"])


def _fingerprint(base: RunConfig) -> str:
    """What makes two searches' trials comparable: the config, less the recipe (auto's to choose) and names."""
    flat = flatten(base.model_dump(mode="json"))
    kept = {k: v for k, v in flat.items() if not k.startswith(("method.", "output.")) and k not in RECIPE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """Preparing the data once per candidate for the plan prints what `tailor run` prints; auto says it once."""
    was = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = was
