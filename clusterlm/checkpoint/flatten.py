"""Nested Python state <-> a JSON skeleton plus a flat dict of tensors, so nothing is pickled.

    skeleton, tensors = flatten_state(opt.state_dict())  # tensors: {"state.3.exp_avg": Tensor, ...}
    opt.load_state_dict(unflatten_state(skeleton, tensors))  # exactly the same structure back

`checkpoint/store.py` writes the tensors to safetensors and the skeleton to JSON. The round trip is
exact for dict (keys: str, int, float, bool, None), list, tuple, str, int, float (nan and inf
included), bool, None and torch.Tensor (dtype, shape and values; the device is the caller's
business). Anything else raises TypeError naming where in the structure it sits.

Skeleton encoding (plain JSON; markers are single-key objects):
- a tensor becomes {"__tensor__": KEY}, KEY being the dotted path ("state.3.exp_avg");
- a tuple becomes {"__tuple__": [...]}; a list stays a list;
- a dict whose keys are all str not starting with "__" stays an object; any other dict becomes
  {"__dict__": [[key, value], ...]} (int keys of optimizer state, or keys that look like markers).
"""

from __future__ import annotations

from typing import Any

import torch

TENSOR = "__tensor__"
TUPLE = "__tuple__"
DICT = "__dict__"
_KEY_TYPES = (str, int, float, bool, type(None))


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `obj` into a JSON-serialisable skeleton and {dotted path: tensor} (tensors as given)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            key = ".".join(path) or "tensor"
            if key in tensors:  # two paths that join to the same string ("a.b" vs ["a", "b"])
                n = 1
                while f"{key}#{n}" in tensors:
                    n += 1
                key = f"{key}#{n}"
            tensors[key] = x
            return {TENSOR: key}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {TUPLE: [enc(v, [*path, str(i)]) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, [*path, k]) for k, v in x.items()}
            for k in x:
                if not isinstance(k, _KEY_TYPES):
                    raise TypeError(f"cannot store dict key {k!r} ({type(k).__name__}) at "
                                    f"'{'.'.join(path) or '<root>'}': keys must be str, int, float, bool or None")
            return {DICT: [[k, enc(v, [*path, str(k)])] for k, v in x.items()]}
        raise TypeError(f"cannot store {type(x).__name__} at '{'.'.join(path) or '<root>'}': only dict, list, "
                        "tuple, str, int, float, bool, None and torch.Tensor are supported (no pickle)")

    return enc(obj, []), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`; raises ValueError if the skeleton names a tensor that is absent."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if len(x) == 1:
                if TENSOR in x:
                    key = x[TENSOR]
                    if key not in tensors:
                        raise ValueError(f"tensor '{key}' named in the JSON skeleton is missing from the tensor "
                                         f"file ({len(tensors)} tensors present)")
                    return tensors[key]
                if TUPLE in x:
                    return tuple(dec(v) for v in x[TUPLE])
                if DICT in x:
                    return {k: dec(v) for k, v in x[DICT]}
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(skeleton)
