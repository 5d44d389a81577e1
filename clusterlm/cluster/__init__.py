"""The cluster as an object: probe, spec, FLOPs, memory, planner, Slurm. Torch-free except probe runners."""
