"""A run's [parallel] layout checked for a process count before any process starts.

`clusterlm launch` (torchrun) and `clusterlm launch --slurm` (sbatch) both call `check_layout` with the
number of processes they are about to start, so a layout the model or the batch cannot take ends in
one line and exit 2 on the launching node, not in an error per rank after the spawn, or hours later
when the queued job finally runs. Torch-free: a Slurm login node need not have torch.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def check_layout(recipe: str | None, overrides: list[str], world: int, *, counts: str | None = None,
                 change: str = "--nproc-per-node") -> list[str]:
    """The run's config and [parallel] layout checked for `world` processes before torchrun starts or
    sbatch queues the job (bad input then ends here with one line and exit 2, not once per rank after
    the spawn or hours later on the allocation). A recipe that names no layout (every size 1) on
    several processes gets data parallel replication (DDP): --parallel.dp_replicate=WORLD is added to
    the returned overrides. `counts` says where `world` came from in the error (default "N processes")
    and `change` what to change instead of the layout."""
    from clusterlm.config import load_run_config, resolve_recipe
    from clusterlm.errors import ConfigError
    from clusterlm.parallel.dims import validate_layout

    path = resolve_recipe(recipe)
    cfg = load_run_config(path, overrides)
    if cfg.parallel.world_size == 1 and world > 1:
        overrides = [*overrides, f"--parallel.dp_replicate={world}"]
        cfg = load_run_config(path, overrides)
        log.info("no [parallel] layout for %d processes: data parallel replication (DDP), "
                 "--parallel.dp_replicate=%d", world, world)
    p = cfg.parallel
    if p.world_size != world:
        raise ConfigError(f"{counts or f'{world} processes'}, but the [parallel] layout needs dp_replicate*dp_shard*tp*pp"
                          f" = {p.dp_replicate}*{p.dp_shard}*{p.tp}*{p.pp} = {p.world_size}; change {change} or "
                          f"the layout, {_fitting_layouts(p, world, change)}")
    # the vocabulary (unset until the data is prepared, as on a first run) takes no part in these checks
    tc = cfg.train
    validate_layout(p, cfg.model, world, tc.global_batch_tokens, tc.micro_batch_size, tc.seq_len)
    return overrides


def _fitting_layouts(p, world: int, change: str) -> str:
    """Layout changes that give `world` ranks, the other sizes kept (the suggestion of check_layout's
    error): a dp_shard or dp_replicate that fits, else the data-parallel product, else what to change."""
    options = []
    for name, what in (("dp_shard", "FSDP"), ("dp_replicate", "DDP" if p.dp_shard * p.tp * p.pp == 1 else "replicas")):
        rest = p.world_size // getattr(p, name)  # the product of the other three sizes
        if world % rest == 0:
            options.append(f"--parallel.{name}={world // rest} ({what})")
    if options:
        return "e.g. " + " or ".join(options)
    mp = p.tp * p.pp
    if world % mp == 0:
        return (f"e.g. --parallel.dp_replicate=1 --parallel.dp_shard={world // mp} (dp_replicate*dp_shard = "
                f"{world} / (tp*pp = {mp}))")
    return f"e.g. a multiple of tp*pp = {mp} ranks ({change}), or other tp and pp sizes"
