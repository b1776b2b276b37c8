"""`tailor auto`: the best model for the user's task within a time budget, chosen on validation, proven on test.

candidates.py  the models to try: the embedded ones that are installed, and the user's paths
plan.py        the recipes, the trial lengths, and the successive-halving plan that fits the budget
search.py      the trials (each a `tailor run` that never reads the test split), kept in an Optuna study
final.py       the test split, once: the winner, every candidate's prompting, the classic model
report.py      leaderboard.md, auto.json and the recommendation
run.py         all of it in order
"""
