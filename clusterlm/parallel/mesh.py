"""The DeviceMesh of a run, built from ParallelDims, and this rank's coordinates in it.

    dims = ParallelDims(dp_shard=2, tp=2)
    mesh = build_mesh(dims, "cpu")         # 4 ranks: ("pp", "dp_replicate", "dp_shard", "tp") = (1, 1, 2, 2)
    coords = Coords.of(mesh)              # dp_rank, tp_rank, pp_rank of this process

All four dimensions are always present (size 1 where unused), in MESH_DIM_NAMES order, so code can
index `mesh["tp"]` without asking whether tp is used. Needs an initialised default process group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from clusterlm.errors import ConfigError
from clusterlm.parallel.dims import MESH_DIM_NAMES, ParallelDims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """A 4-D mesh (pp, dp_replicate, dp_shard, tp) over all ranks of the default group."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dims.world_size != world:
        raise ConfigError(f"dp_replicate*dp_shard*tp*pp = {dims.describe()} = {dims.world_size} ranks, "
                          f"but the job has world size {world}")
    shape = tuple(getattr(dims, n) for n in MESH_DIM_NAMES)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)


def dry_run_mesh(dims: ParallelDims, device_type: str = "cpu") -> str:
    """Build the 4-D mesh of `dims` in this one process on torch's fake process group (the public
    `fake` backend: every collective is a no-op), then tear it down: checks that a layout builds at
    its full world size without the ranks. Returns the mesh's description."""
    if dist.is_initialized():
        raise RuntimeError("dry_run_mesh needs a process without a default process group")
    # store=None: torch makes the fake backend's own store (passing one would need its internal module)
    dist.init_process_group("fake", rank=0, world_size=dims.world_size)
    try:
        return str(build_mesh(dims, device_type))
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Coords:
    """This rank's place: pp stage, data-parallel rank (replicate-major), tp rank."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    dims: ParallelDims

    @classmethod
    def of(cls, mesh: DeviceMesh | None, dims: ParallelDims | None = None) -> Coords:
        if mesh is None:
            return cls(0, 0, 0, 0, dims or ParallelDims())
        c = mesh.get_coordinate()
        assert c is not None, "this rank is not in the mesh"
        sizes = dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))
        degrees = {n: int(sizes[n]) for n in MESH_DIM_NAMES}  # the mesh's; the rest of the layout from `dims`
        dims = dataclasses.replace(dims, **degrees) if dims is not None else ParallelDims(**degrees)
        return cls(*[int(v) for v in c], dims=dims)

    @property
    def dp_rank(self) -> int:
        """index among the dp = dp_replicate*dp_shard ranks that see different data"""
        return self.dp_replicate * self.dims.dp_shard + self.dp_shard

    @property
    def is_last_stage(self) -> bool:
        return self.pp == self.dims.pp - 1

    @property
    def owns_loss(self) -> bool:
        """one rank per data-parallel rank counts the loss: the last stage, tp rank 0"""
        return self.is_last_stage and self.tp == 0
