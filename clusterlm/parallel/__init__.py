"""Parallelism applied from outside the model; the one place that reads RANK/WORLD_SIZE."""
