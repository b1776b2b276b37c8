"""`tailor sweep CONFIG --space SPACE`: hyperparameter search, each trial a `tailor run` of the config with the
trial's values, chosen and pruned on the validation split. Re-running the same command resumes the sweep;
running it in several terminals at once shares the trials out."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  tailor sweep task.yaml --space space.yaml             search; results in sweeps/<study>/
  tailor sweep task.yaml --space space.yaml --trials 40 resume the same study and take it to 40 trials
  tailor sweep task.yaml                                no space: the learning rate (and LoRA rank) by default
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def register(verbs) -> None:
    sweep = verbs.add_parser(
        "sweep", help="search hyperparameters (Optuna): trials of `tailor run`, pruned and chosen on validation",
        description="Run trials of CONFIG with values drawn from the space file, keep the study in SQLite "
                    "(resume by running the same command again; several workers may share it), and write "
                    "results.md/.csv, history.png, importances.png and best.yaml in the sweep directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sweep.add_argument("config", metavar="CONFIG", help="the base run spec (as for `tailor run`)")
    sweep.add_argument("--space", "-s", metavar="SPACE", help="the space file: params to search and the sweep's "
                                                               "settings (README: Hyperparameter sweeps)")
    sweep.add_argument("--trials", "-n", type=_positive, metavar="N",
                       help="trials in the study in total, across runs and workers (overrides n_trials)")
    sweep.add_argument("--output", "-o", metavar="DIR", help="sweep directory (default: sweeps/<study>)")
    sweep.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite:///<sweep dir>/study.db)")
    sweep.add_argument("--study", metavar="NAME", help="study name (default: the config's output.name)")
    sweep.set_defaults(handler=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    # Lazy on purpose: cli.py imports this module to build its parser on every `tailor` call; the verb's own
    # imports (torch, transformers, optuna, rich) load only when it runs.
    from pathlib import Path

    import optuna

    from tailorlm.config import load_config
    from tailorlm.models import kept_weights
    from tailorlm.sweep.objective import TrialRun, choose_metric
    from tailorlm.sweep.results import best_trial, print_results, write_results
    from tailorlm.sweep.space import check_against_config, default_space, load_space
    from tailorlm.sweep.study import (
        fail_interrupted,
        make_sampler,
        open_study,
        run_trials,
        storage_url,
    )
    from tailorlm.ui import console

    base = load_config(args.config, trust_remote_code=args.trust_remote_code)
    space = load_space(args.space) if args.space else default_space(base)
    if args.trials:
        space = space.model_copy(update={"n_trials": args.trials})
    check_against_config(space, args.space, args.config, base)
    metric, direction = choose_metric(space, base)
    name = args.study or space.study or base.output.name
    sweep_dir = Path(args.output or Path("sweeps") / name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not args.space:
        console.print("No --space: searching the default space (saved as space.yaml in the sweep directory):\n"
                      + space.to_yaml())
        (sweep_dir / "space.yaml").write_text(space.to_yaml())
    url = storage_url(space, sweep_dir, args.storage)

    optuna.logging.disable_default_handler()  # the sweep prints its own line per trial, without tracebacks
    study = open_study(url, name, space, metric, direction)
    console.print(f"Study '{name}' in {url}: {metric} on the validation split ({direction}), "
                  f"{space.sampler} sampler, {space.pruner.name} pruner")
    fail_interrupted(study)

    def after_each(study: optuna.Study, trial) -> None:
        best = best_trial(study)
        outcome = f"{metric} {trial.value:.4g}" if trial.value is not None else trial.state.name.lower()
        console.print(f"[bold]Trial {trial.number} {trial.state.name.lower()}[/]: {outcome}"
                      + (f"; best so far: trial {best.number}, {metric} {best.value:.4g}" if best else ""))
        write_results(study, space, metric, sweep_dir, args.config, args.trust_remote_code)

    objective = TrialRun(args.config, base, space, metric, sweep_dir, lambda n: make_sampler(space, space.seed + n))
    with kept_weights.keeping():  # every trial of the sweep loads the same model: a GGUF is parsed once
        run_trials(study, url, objective, space.n_trials, after_each)
    write_results(study, space, metric, sweep_dir, args.config, args.trust_remote_code)
    console.print()
    print_results(study, space, metric)
    best = best_trial(study)
    if best is None:
        console.print(f"[yellow]No trial has completed yet; no best.yaml in {sweep_dir}/[/]")
        return 1
    console.print(f"Best: trial {best.number}, {metric} {best.value:.4g}. Results in {sweep_dir}/ (results.md, "
                  f"results.csv, history.png); train it with `tailor run {sweep_dir / 'best.yaml'}`")
    return 0
