"""Evaluation: tasks, generation, answer extraction, metrics and a sandbox for model-written code."""
