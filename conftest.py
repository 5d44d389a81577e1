"""Root pytest configuration: a process group left behind by one test is torn down before the next.

A test that initialises torch.distributed (a fake or gloo group in this process) and fails before
its own cleanup would otherwise make every later `init_process_group` fail with "trying to
initialize the default process group twice". torch is only looked at if something imported it.
"""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
