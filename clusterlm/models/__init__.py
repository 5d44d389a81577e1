"""Model definitions: math only (no devices, processes, environment reads or optimizers)."""
