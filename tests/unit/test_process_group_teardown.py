"""The root conftest.py tears down a process group a test leaves behind (the two tests run in order:
pytest keeps a file's order)."""

import torch.distributed as dist


def test_leaves_a_process_group_behind():
    """Initialises torch's fake backend in this process and does not destroy it."""
    dist.init_process_group("fake", rank=0, world_size=2)
    assert dist.is_initialized()


def test_next_test_starts_without_one():
    """Without the root conftest's teardown this init fails: 'trying to initialize the default process
    group twice'."""
    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=0, world_size=2)
    dist.destroy_process_group()
