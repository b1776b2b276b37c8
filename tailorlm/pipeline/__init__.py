"""The run, as typed stages a notebook can call one at a time (prepare -> baselines -> train -> evaluate ->
report, in prepare.py and stages.py) and the runner that chains them around a run directory (runner.py)."""
from tailorlm.pipeline.prepare import Prepared, TaskData, prepare, save_data_report, task_configs
from tailorlm.pipeline.runner import Outcome, run, run_stages

__all__ = ["Outcome", "Prepared", "TaskData", "prepare", "run", "run_stages", "save_data_report", "task_configs"]
