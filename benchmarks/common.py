"""Shared by the benchmark scripts: what machine a figure came from.

    from common import cpu_model      # benchmarks/ is the script's folder, so on sys.path
"""

from __future__ import annotations

import platform
from pathlib import Path

from clusterlm.cluster.parsers import parse_cpuinfo


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo through the probe's parser), else what platform says."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text()).model
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
