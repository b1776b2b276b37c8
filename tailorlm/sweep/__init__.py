"""`tailor sweep`: hyperparameter search over a run config with Optuna.

space.py    the space file: what to search (dotted config keys) and how (trials, metric, sampler, pruner), validated
objective.py one trial: the base config plus the trial's overrides, run by the pipeline, pruned on its validation metric
study.py    the shared Optuna study (SQLite by default): create or resume, several workers, interrupted trials
results.py  what a sweep leaves behind: results table (terminal, .md, .csv), plots, best.yaml
command.py  the command line
"""
