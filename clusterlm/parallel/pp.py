"""Pipeline parallel with torch.distributed.pipelining: the Transformer cut into stages by layers.

Stage s of pp keeps layers [s*L//pp, (s+1)*L//pp) (the ModuleDict keeps their global names, so
checkpoints line up with the unsplit model); the first stage keeps tok_embeddings (and learned
positions), the last keeps the final norm and output. The other ends are set to None, which the
Transformer's forward already understands (hidden states in, hidden states out).
Schedules: "gpipe" (all forwards, then all backwards) and "1f1b" (one forward one backward in the
steady state: activation memory bounded by pp micro-batches instead of all of them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from clusterlm.parallel.dims import pipeline_microbatches  # torch-free: layout checks and planner count them

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """layer indices of `stage` (even split; the first stages take one extra layer when uneven)"""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def split_stage(model: nn.Module, pp: int, stage: int) -> nn.Module:
    """Drop from `model` (in place, any device incl. meta) what stage `stage` of `pp` does not run."""
    keep = {str(i) for i in stage_layers(len(model.layers), pp, stage)}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage > 0:
        model.tok_embeddings = None
        model.pos_embeddings = None
    if stage < pp - 1:
        model.norm = None
        model.output = None
    return model


def build_schedule(stage_model: nn.Module, pp_mesh: DeviceMesh, device: torch.device, batch_size: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: str = "1f1b"):
    """The schedule that runs one rank micro-batch (split into pipeline_microbatches) through all stages.

    Gradients are not rescaled by the schedule (scale_grads=False): loss_fn carries the scale, so
    several schedule steps can accumulate into one optimizer step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    pp, stage_idx = pp_mesh.size(), pp_mesh.get_local_rank()
    stage = PipelineStage(stage_model, stage_idx, pp, device, group=pp_mesh.get_group())
    return SCHEDULES[schedule](stage, n_microbatches=pipeline_microbatches(batch_size, pp), loss_fn=loss_fn,
                               scale_grads=False)


# ---- the schedule's private attributes, named once --------------------------------------------------
# torch.distributed.pipelining fixes a schedule's loss function and micro-batch count at construction
# and has no public setter; the trainer swaps the loss per optimizer step (its 1/(accum * n_mb) scale)
# and for evaluation. These two attributes of torch's _PipelineSchedule are the only private API
# clusterlm uses; tests/unit/test_torch_private_api.py fails loudly when a torch release renames them.
SCHEDULE_LOSS_ATTR = "_loss_fn"
SCHEDULE_MICROBATCHES_ATTR = "_n_microbatches"


def _private(schedule: object, name: str) -> object:
    if not hasattr(schedule, name):
        raise RuntimeError(f"torch {torch.__version__}: {type(schedule).__name__} has no attribute {name!r}; "
                           "clusterlm's pipeline support (parallel/pp.py) needs updating for this torch")
    return getattr(schedule, name)


def schedule_microbatches(schedule: object) -> int:
    """Pipeline micro-batches per schedule step."""
    return int(_private(schedule, SCHEDULE_MICROBATCHES_ATTR))


def schedule_loss_fn(schedule: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _private(schedule, SCHEDULE_LOSS_ATTR)  # type: ignore[return-value]


def set_schedule_loss_fn(schedule: object, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Replace the loss the schedule's last stage computes (for the next step or eval)."""
    _private(schedule, SCHEDULE_LOSS_ATTR)
    setattr(schedule, SCHEDULE_LOSS_ATTR, loss_fn)
