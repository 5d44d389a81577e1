"""clusterlm: language models from raw text to a served API, on one CPU or a Slurm cluster.

Nothing is imported eagerly here, so `import clusterlm` (and `clusterlm --help`) stays fast
and does not need torch.
"""

__version__ = "0.1.0"
