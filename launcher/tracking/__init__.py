"""Experiment trackers (TensorBoard, W&B, MLflow, trackio): one run per run dir."""
