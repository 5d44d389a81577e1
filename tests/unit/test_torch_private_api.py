"""The private torch APIs clusterlm uses, checked against the installed torch: a real pipeline
schedule (one stage, gloo on one process) carries the loss function and micro-batch count under the
names clusterlm.parallel.pp reads and writes; the default process group's store
(`distributed_c10d._get_default_store`) can be cloned into a second connection that the heartbeat
(clusterlm.parallel.heartbeat) writes through; torchrun registers its stop handler by a module attribute
(clusterlm.parallel.torchrun replaces it). When a torch release renames them this test fails,
naming the attribute, instead of training breaking at run time."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from clusterlm.parallel import pp


@pytest.mark.parametrize("kind", sorted(pp.SCHEDULES))
def test_pipeline_schedule_private_attributes(kind, tmp_path):
    """schedule_microbatches/schedule_loss_fn read what the constructor was given; set_schedule_loss_fn
    changes the loss the schedule computes (a one-stage step returns the new loss)."""
    from torch.distributed.pipelining import PipelineStage

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        stage = PipelineStage(nn.Linear(4, 4), 0, 1, torch.device("cpu"))
        schedule = pp.SCHEDULES[kind](stage, n_microbatches=2, loss_fn=torch.nn.functional.mse_loss)
        for name in (pp.SCHEDULE_LOSS_ATTR, pp.SCHEDULE_MICROBATCHES_ATTR):
            assert hasattr(schedule, name), f"torch {torch.__version__} renamed {type(schedule).__name__}.{name}"
        assert pp.schedule_microbatches(schedule) == 2
        assert pp.schedule_loss_fn(schedule) is torch.nn.functional.mse_loss
        x, y = torch.randn(4, 4), torch.zeros(4, 4)
        losses: list[torch.Tensor] = []
        pp.set_schedule_loss_fn(schedule, lambda out, tgt: out.sum() * 0 + 7.0)
        schedule.step(x, target=y, losses=losses)
        assert [float(v.detach()) for v in losses] == [7.0, 7.0]
    finally:
        dist.destroy_process_group()


def test_missing_attribute_is_named():
    """A schedule object without the attribute (a future torch) fails with torch's version and the name."""
    with pytest.raises(RuntimeError, match=r"has no attribute '_n_microbatches'.*parallel/pp.py"):
        pp.schedule_microbatches(object())


def test_default_store_clones_into_a_second_connection(tmp_path):
    """The heartbeat's store: a clone of the default group's TCPStore sees the original's keys."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        get = getattr(dist.distributed_c10d, "_get_default_store", None)
        assert get is not None, f"torch {torch.__version__} removed distributed_c10d._get_default_store (parallel/heartbeat.py)"
        clone = get().clone()
        clone.set("heartbeat/0", b"x")
        assert get().get("heartbeat/0") == b"x"
    finally:
        dist.destroy_process_group()


def test_dcp_reader_metadata_path(tmp_path):
    """checkpoint/distributed.py's _SafeReader reads the index FileSystemReader._get_metadata_path names
    (dcp/.metadata; __RANK.metadata per rank) before torch's unrestricted pickle.load does."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(tmp_path))
    assert str(reader._get_metadata_path()) == str(tmp_path / ".metadata")
    assert str(reader._get_metadata_path(3)) == str(tmp_path / "__3.metadata")


def test_torchrun_registers_its_stop_handler_by_module_attribute():
    """clusterlm.parallel.torchrun replaces torch.distributed.elastic.multiprocessing.api's
    _terminate_process_handler (so that torchrun acts on one stop signal only); that works only while
    PContext.start looks the handler up by that name when it registers it."""
    import inspect

    import torch.distributed.elastic.multiprocessing.api as elastic_api

    assert callable(getattr(elastic_api, "_terminate_process_handler", None)), \
        f"torch {torch.__version__} removed elastic api._terminate_process_handler (parallel/torchrun.py)"
    assert "signal.signal(sig, _terminate_process_handler)" in inspect.getsource(elastic_api.PContext.start), \
        f"torch {torch.__version__}: PContext.start no longer registers _terminate_process_handler (parallel/torchrun.py)"
