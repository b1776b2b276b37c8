"""`tailor auto CONFIG --budget 20m`: the best model and recipe for the config's task within a time budget,
chosen on validation and proven once on test (tailorlm/auto/)."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  tailor auto examples/trec.yaml --budget 30m --search-recipe
                                                   every installed embedded model and recipe, 30 minutes
                                                   (the example's own lr and epochs are searched, not kept)
  tailor auto task.yaml --budget 1h --model ./my-model --model ./other.gguf
                                                   the embedded models and two of your own
  tailor auto task.yaml --budget 20m --only-listed --model ./my-model
                                                   your models alone
  tailor auto task.yaml --budget 30m               run again after an interruption: finished trials are kept
  tailor auto task.yaml --budget 30m --data-curve  then: would more labelled rows help?
"""


def register(verbs) -> None:
    auto = verbs.add_parser(
        "auto", help="choose the model and recipe for your task within a time budget (on validation), then "
                     "score the winner once on test beside prompting and a classic model",
        description="Successive halving over every candidate model and recipe (LoRA and full fine-tuning at "
                    "several learning rates, trained for lengths that fit the budget), each trial a `tailor run` "
                    "scored on the validation split. The config gives the task, data and template; recipe keys it "
                    "sets (model.path, method, train.lr, train.epochs or max_steps) are kept as set. Writes "
                    "leaderboard.md and auto.json; the winner's trial folder is a finished run.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    auto.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                      help="a run spec (the embedded default job when absent) and dotted overrides, kept fixed")
    auto.add_argument("--budget", "-b", required=True, metavar="TIME",
                      help="wall-clock time for the search (its trials, scored on validation): 20m, 1h, 1h30m, 90s. "
                           "The final test evaluation follows; its estimate is printed first")
    auto.add_argument("--model", "-m", action="append", default=[], metavar="PATH",
                      help="another candidate model (a folder or a .gguf); repeat for several")
    auto.add_argument("--only-listed", action="store_true", help="try only the --model paths, not the embedded models")
    auto.add_argument("--output", "-o", metavar="DIR", help="the auto folder (default: auto/<output.name>)")
    auto.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite:///<auto folder>/study.db)")
    auto.add_argument("--search-recipe", action="store_true",
                      help="search the recipe keys the config file sets too (a config written for `tailor run`); "
                           "those set on the command line are still kept")
    auto.add_argument("--data-curve", action="store_true",
                      help="afterwards, train the winner's recipe on 25%% and 50%% of the training rows and score each "
                           "on test: whether labelling more rows would pay (outside the budget)")
    auto.set_defaults(handler=run_auto)


def run_auto(args: argparse.Namespace) -> int:
    from tailorlm.auto.plan import parse_budget
    from tailorlm.auto.run import auto
    from tailorlm.errors import TailorError

    budget = parse_budget(args.budget)
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config else args.args
    if args.only_listed and not args.model:
        raise TailorError("--only-listed needs at least one --model PATH")
    outcome = auto(config, overrides, budget, args.model, not args.only_listed, args.output, args.storage,
                   args.trust_remote_code, args.data_curve, args.search_recipe)
    return 0 if outcome.search.winner is not None else 1
