"""Experiment tracking (TensorBoard, MLflow) for a run, and the run registry behind `tailor runs` and `tailor compare`."""
