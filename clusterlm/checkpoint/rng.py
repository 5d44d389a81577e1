"""Random generator states a bit-exact resume needs: Python `random`, numpy's global RNG, torch CPU
and (if CUDA is initialised) every CUDA device.

    rng = capture_rng_state()     # at the point whose RNG state a resume should see
    restore_rng_state(rng)        # after the model is built, before the first step

`capture_rng_state` returns JSON-friendly values (python, numpy) and tensors (torch_cpu, cuda);
the store splits them with clusterlm.checkpoint.flatten into JSON plus safetensors.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

KEYS = ("python", "numpy", "torch_cpu", "cuda")


def capture_rng_state() -> dict[str, Any]:
    """{"python": {...}, "numpy": {...}} as JSON-friendly values and {"torch_cpu": uint8 Tensor,
    "cuda": [uint8 Tensor, ...]} as tensors; `restore_rng_state` takes it back."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": _np_to_json(np_state),
        "torch_cpu": torch.get_rng_state(),
    }
    # an uninitialised CUDA has only its default state; querying it would create a context for nothing
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators captured by `capture_rng_state` (only those present in `state`)."""
    unknown = set(state) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown RNG state keys {sorted(unknown)}; expected python, numpy, torch_cpu, cuda")
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "numpy" in state:
        np.random.set_state(state["numpy"])  # accepts the dict form with a list key
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to("cpu", torch.uint8))
    if "cuda" in state:
        cuda = [t.to("cpu", torch.uint8) for t in state["cuda"]]
        if not torch.cuda.is_available():
            log.warning("checkpoint holds %d CUDA RNG states but CUDA is unavailable; not restored", len(cuda))
        else:
            if len(cuda) != torch.cuda.device_count():
                log.warning("checkpoint holds %d CUDA RNG states, this machine has %d devices; restoring %d",
                            len(cuda), torch.cuda.device_count(), min(len(cuda), torch.cuda.device_count()))
            for i, t in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(t, i)


def _np_to_json(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _np_to_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
