"""Apply a parallel layout to a model from outside it, in one order: pipeline split, TP,
activation checkpointing, compile, FSDP/DDP; then materialise and initialise the local shards.

    pm = build_parallel_model(model_cfg, parallel_cfg, mesh, device, seed=0, micro_batch=8, loss_fn=lm_loss)
    loss = pm.forward_backward(x, y, accum=accum, sync=is_last_micro_batch)  # loss/accum, this rank
    norm = pm.clip_grad_norm_(1.0)                     # global norm over every shard and stage
    pm.module                                          # the (sharded) nn.Module: optimizer, checkpoints

Initialisation with sharded parameters: the model is built on the meta device and sharded there,
so no rank ever holds the whole model. Each parameter is then filled by running the model's own
`init_weights(seed)` on a meta "shadow" model in which only that one parameter is a real (full,
CPU) tensor, and this rank's shard is cut from it (`distribute_tensor(..., src_data_rank=None)`:
every rank draws the same full tensor, so no communication). Peak extra memory: one full
parameter. The values are exactly the single-process ones (init_weights seeds a generator per
parameter name), which is what the parity tests rely on.

The loss is the caller's (the trainer passes clusterlm.eval.metrics.lm_loss): `loss_fn(logits
(B, T, V), targets (B, T)) -> mean token loss`; parallel/ computes it where the layout needs it (inside
loss parallel, on the last pipeline stage).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from clusterlm.models.config import ModelConfig
from clusterlm.parallel.ac import apply_ac, clean_name
from clusterlm.parallel.dims import ParallelDims
from clusterlm.parallel.mesh import Coords
from clusterlm.parallel.pp import schedule_loss_fn, schedule_microbatches, set_schedule_loss_fn

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (B, T, V), targets (B, T)) -> scalar


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> nn.Parameter:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters[leaf]
    mod._parameters[leaf] = value
    return old


Transform = Callable[[nn.Module], nn.Module]  # changes a freshly built model in place (LoRA, freezing)
InitFn = Callable[[nn.Module, int], None]  # fills the parameters a transform added, after init_weights


def _init(model: nn.Module, seed: int, init_extra: InitFn | None) -> None:
    model.init_weights(seed)
    if init_extra is not None:
        init_extra(model, seed)


@torch.no_grad()
def init_sharded(model: nn.Module, cfg: ModelConfig, seed: int, transform: Transform | None = None,
                 init_extra: InitFn | None = None) -> None:
    """Fill every (possibly DTensor) parameter and buffer of `model` with the values
    build_model(cfg).init_weights(seed) gives the full model (see the module docstring); with a
    `transform` (applied to the shadow too) and `init_extra` for the parameters it adds."""
    from clusterlm.models.build import build_model

    with torch.device("meta"):
        shadow = build_model(cfg)
        if transform is not None:
            shadow = transform(shadow)
    # buffers (rotary tables) are small: materialise all of them in the shadow once
    for name, buf in list(shadow.named_buffers()):
        mod_name, _, leaf = name.rpartition(".")
        (shadow.get_submodule(mod_name) if mod_name else shadow)._buffers[leaf] = torch.empty_like(buf, device="cpu")
    shadow_params = dict(shadow.named_parameters())
    for name, p in model.named_parameters():
        name = clean_name(name)
        full = nn.Parameter(torch.empty(shadow_params[name].shape, dtype=torch.float32), requires_grad=False)
        old = _set_param(shadow, name, full)
        _init(shadow, seed, init_extra)  # meta parameters are skipped; only `full` gets values
        _set_param(shadow, name, old)
        shadow._tie()
        value = full.data.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(value)
    shadow_bufs = {clean_name(n): b for n, b in shadow.named_buffers()}
    for name, b in model.named_buffers():
        b.copy_(shadow_bufs[clean_name(name)])


class ParallelModel:
    """A model laid out over a DeviceMesh, with the few operations the training loop needs."""

    def __init__(self, module: nn.Module, wrapped: nn.Module, coords: Coords, mesh: DeviceMesh | None,
                 kind: str, loss_fn: LossFn, schedule=None, micro_batch: int = 0,
                 loss_parallel: bool = False) -> None:
        self.module = module  # parameters/state_dict live here (DDP's inner module when wrapped)
        self.wrapped = wrapped  # what forward is called on
        self.coords = coords
        self.mesh = mesh
        self.kind = kind  # "single", "ddp", "fsdp" or "none" (tp/pp without data-parallel wrapping)
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.micro_batch = micro_batch  # rows per rank micro-batch (the pipeline's fixed shape)
        self.loss_parallel = loss_parallel  # logits are vocabulary-split DTensors (parallel/tp.py)

    def loss_context(self):
        """Where the loss of `wrapped`'s logits is computed (torch's loss_parallel under TP loss parallel)."""
        from clusterlm.parallel.tp import loss_context

        return loss_context(self.loss_parallel)

    @property
    def inference_module(self) -> nn.Module:
        """`module` returning plain full (B, T, V) logits (for evaluation, which sums plain tensors)."""
        return _FullLogits(self.module) if self.loss_parallel else self.module

    # ---- one micro-batch -----------------------------------------------------------------------
    def _sync_context(self, sync: bool):
        if self.kind == "ddp" and not sync:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, *, accum: int = 1, sync: bool = True,
                         autocast=contextlib.nullcontext, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward + backward of one micro-batch with loss/accum; returns the detached loss/accum on
        ranks that own a loss (last stage, tp rank 0), zeros elsewhere. `loss_scale`: backward runs
        on loss * loss_scale (fp16's dynamic loss scaling, train/amp.py); the returned loss is unscaled."""
        with self._sync_context(sync):
            if self.schedule is not None:
                losses: list[torch.Tensor] = []
                n_mb = schedule_microbatches(self.schedule)
                set_schedule_loss_fn(self.schedule,
                                     lambda logits, tgt: self.loss_fn(logits, tgt) / (accum * n_mb) * loss_scale)
                with autocast():
                    self._run_schedule(self.schedule.step, x, y, losses)
                loss = (torch.stack(losses).sum().detach() / loss_scale if losses
                        else torch.zeros((), device=x.device))
            else:
                with autocast():
                    # a tuple is several model inputs: an encdec model's (source, source mask, target input)
                    logits = self.wrapped(*x) if isinstance(x, tuple) else self.wrapped(x)
                with self.loss_context():
                    loss = self.loss_fn(logits, y) / accum
                    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
                loss = loss.detach()
                if isinstance(loss, DTensor):
                    loss = loss.full_tensor()
        return loss if self.coords.owns_loss else torch.zeros_like(loss)

    def _run_schedule(self, run, x: torch.Tensor, y: torch.Tensor, losses: list[torch.Tensor]) -> None:
        """One pipeline-schedule call (`schedule.step` or `schedule.eval`) with this stage's part: the
        first stage feeds the inputs, the last the targets (and collects the micro-batch losses).
        Both go in contiguous: torch 2.11's stage checks (2.13 no longer) compare strides with those it
        recorded, and refuse a row slice such as tokens[:, :-1] ("stride mismatch")."""
        if self.coords.pp == 0:
            run(x.contiguous())
        elif self.coords.is_last_stage:
            run(target=y.contiguous(), losses=losses)
        else:
            run()

    @torch.no_grad()
    def pipeline_eval_loss(self, batches, device: torch.device, autocast=contextlib.nullcontext) -> float | None:
        """Mean token loss over `batches` through the pipeline (pp > 1), known on every rank.

        Every rank must pass the same batches; batches with fewer rows than the training micro-batch
        are skipped (the stages' buffers have its shape). None if no batch was full."""
        assert self.schedule is not None, "pipeline_eval_loss needs pp > 1"
        n_mb = schedule_microbatches(self.schedule)
        train_loss_fn = schedule_loss_fn(self.schedule)
        set_schedule_loss_fn(self.schedule, self.loss_fn)
        self.module.eval()
        total, n = torch.zeros((), dtype=torch.float64, device=device), 0
        try:
            for x, y in batches:
                if x.shape[0] != self.micro_batch:
                    continue
                x, y = x.to(device), y.to(device)
                losses: list[torch.Tensor] = []
                with autocast():
                    self._run_schedule(self.schedule.eval, x, y, losses)
                if losses:
                    total += torch.stack(losses).double().sum() / n_mb
                n += 1
        finally:
            self.module.train()
            set_schedule_loss_fn(self.schedule, train_loss_fn)
        if n == 0:
            return None
        mean = total / n if self.coords.owns_loss else torch.zeros_like(total)
        return float(self.mean_over_dp(mean))

    # ---- reductions across ranks ---------------------------------------------------------------
    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the loss-owning ranks / dp: the global mean of a per-rank mean (e.g. the loss)."""
        if self.mesh is None:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.coords.dims.dp

    @torch.no_grad()
    @torch.no_grad()
    def unscale_grads_(self, loss_scale: float) -> None:
        """Divide every gradient by `loss_scale` (after a backward on the scaled loss; each rank its
        own shards and stage)."""
        if loss_scale == 1.0:
            return
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / loss_scale)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip all gradients to a global L2 norm of max_norm (0 or inf: no clipping); returns the
        norm before clipping. Same formula as torch.nn.utils.clip_grad_norm_ (coef =
        max_norm / (norm + 1e-6), at most 1), over sharded (DTensor) and pipeline-split parameters."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.mesh is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
        device = params[0].grad.device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for p in params:
            g = p.grad
            n = torch.linalg.vector_norm(g, dtype=torch.float32)
            if isinstance(n, DTensor):
                n = n.full_tensor()  # reduces the partial norms of the shards
            sq += n.to(device) ** 2
        # identical on every dp and tp rank of a stage: count each stage once, then sum the stages
        c = self.coords
        if c.dp_rank != 0 or c.tp != 0:
            sq.zero_()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm and math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef)
        return float(norm)

    @property
    def fused_optimizer_ok(self) -> bool:
        """False when DTensor and plain parameters mix (TP without FSDP: norms stay plain tensors):
        torch's fused AdamW kernel refuses mixed lists."""
        kinds = {isinstance(p, DTensor) for p in self.module.parameters()}
        return len(kinds) == 1


def build_parallel_model(mcfg: ModelConfig, pc: ParallelDims, mesh: DeviceMesh | None, device: torch.device, *,
                         seed: int, micro_batch: int, loss_fn: LossFn, param_dtype: torch.dtype | None = None,
                         compile: bool = False, pp_schedule: str = "1f1b", wrap: str = "auto",
                         transform: Transform | None = None, init_extra: InitFn | None = None) -> ParallelModel:
    """Build the model on meta, lay it out (pp split, TP, AC, compile, FSDP/DDP), materialise, init.

    wrap: "auto" picks DDP for pure replication, FSDP2 when parameters are sharded, nothing on one
    process; "ddp" or "fsdp" force that wrapper (e.g. to measure its overhead on one GPU). `loss_fn`:
    the training loss (module docstring). `transform` changes the model right after it is built on
    meta, before any layout (fine-tuning: LoRA adapters, frozen parameters); `init_extra(model,
    seed)` then fills what it added, after init_weights (both also run on init_sharded's shadow)."""
    if wrap not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"wrap={wrap!r}; expected auto, ddp or fsdp")
    from clusterlm.models.build import build_model

    with torch.device("meta"):
        model = build_model(mcfg)
        if transform is not None:
            model = transform(model)
    coords = Coords.of(mesh, pc)
    dims = coords.dims
    if mesh is None or (dims.world_size == 1 and wrap == "auto"):
        model.to_empty(device=device)
        _init(model, seed, init_extra)  # before AC: init seeds each parameter by its name, which AC's wrapper changes
        apply_ac(model, pc.activation_checkpointing)
        wrapped = torch.compile(model) if compile else model
        return ParallelModel(model, wrapped, coords, mesh, "single", loss_fn)

    if dims.pp > 1:
        from clusterlm.parallel.pp import split_stage

        split_stage(model, dims.pp, coords.pp)
    # sequence/loss parallel need the whole model on the stage: a later pipeline stage would receive a
    # sequence slice and take its length for the full one (rotary positions)
    seq_par = dims.tp > 1 and pc.sequence_parallel and dims.pp == 1
    if dims.tp > 1 and pc.sequence_parallel and not seq_par:
        log.info("tp=%d with pp=%d: sequence and loss parallel are off (supported without pipeline parallel)",
                 dims.tp, dims.pp)
    if dims.tp > 1:
        from clusterlm.parallel.tp import apply_tp

        apply_tp(model, mesh["tp"], sequence_parallel=seq_par, loss_parallel=seq_par)
    ddp = wrap == "ddp" or (wrap == "auto" and dims.dp_wrapper == "ddp")
    if ddp:  # replicated: every rank holds the full model, initialised before AC and compile rename its
        model.to_empty(device=device)  # parameters (init seeds each by name; init_sharded strips the wrappers)
        _init(model, seed, init_extra)
    apply_ac(model, pc.activation_checkpointing)
    if compile:
        from clusterlm.parallel.ac import block_stacks

        for _, layers in block_stacks(model):
            for key, block in list(layers.items()):
                layers[key] = torch.compile(block)
    if ddp:
        from clusterlm.parallel.ddp import apply_ddp

        wrapped = apply_ddp(model, mesh["dp_replicate"], device)
        kind = "ddp"
    else:
        kind = "none"
        if dims.dp > 1 or wrap == "fsdp":
            from clusterlm.parallel.fsdp import apply_fsdp

            dp_mesh = mesh[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(model, dp_mesh, param_dtype=param_dtype)
            kind = "fsdp"
        model.to_empty(device=device)
        init_sharded(model, mcfg, seed, transform, init_extra)
        wrapped = model
    schedule = None
    if dims.pp > 1:
        from clusterlm.parallel.pp import build_schedule

        schedule = build_schedule(model, mesh["pp"], device, micro_batch, loss_fn, pp_schedule)
    log.info("layout %s: %s on this rank (pp stage %d, dp rank %d, tp rank %d)", dims.describe(), kind,
             coords.pp, coords.dp_rank, coords.tp)
    return ParallelModel(model, wrapped, coords, mesh, kind, loss_fn, schedule, micro_batch, loss_parallel=seq_par)


class _FullLogits(nn.Module):
    """Calls the model and gathers vocabulary-split logits into a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        from clusterlm.parallel.tp import full_logits

        return full_logits(self.model(*args, **kwargs))
