"""Activation checkpointing of transformer blocks: "full" (recompute each block in backward) or
"selective" (keep matmul and attention outputs, recompute the cheap element-wise ops: the op-level
policy of torchtitan). Applied per block, so parameter names gain `_checkpoint_wrapped_module.`;
`clean_name` strips it (and torch.compile's `_orig_mod.`).

`block_stacks(model)` lists every ModuleDict of blocks that parallel/ lays out per block: `layers`,
and an encoder-decoder's `encoder.layers` too (models/encdec.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from clusterlm.models.classifier import language_model

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")

# ops whose outputs selective AC keeps (the expensive ones); everything else is recomputed
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleDict]]:
    """(name prefix, ModuleDict of blocks) of every stack in `model` (a classifier: its backbone's):
    ("layers.", ...) and, for an encoder-decoder, ("encoder.layers.", ...) first."""
    lm = language_model(model)
    out = []
    encoder = getattr(lm, "encoder", None)
    if isinstance(getattr(encoder, "layers", None), nn.ModuleDict):
        out.append(("encoder.layers.", encoder.layers))
    if isinstance(getattr(lm, "layers", None), nn.ModuleDict):
        out.append(("layers.", lm.layers))
    return out


def _selective_policy(ctx, op, *args, **kwargs):  # noqa: ARG001 - torch's policy signature
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap every block of model.layers (a ModuleDict; a classifier's backbone.layers; an encoder-decoder's
    encoder.layers too) in place; mode "none" does nothing."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpointing={mode!r}; expected none, selective or full")
    stacks = block_stacks(model)
    if not stacks:
        raise ValueError(f"activation checkpointing needs a model with a `layers` ModuleDict; "
                         f"{type(model).__name__} has none")
    for _, layers in stacks:
        for key, block in list(layers.items()):
            if mode == "full":
                layers[key] = checkpoint_wrapper(block, preserve_rng_state=True)
            else:
                layers[key] = checkpoint_wrapper(block, preserve_rng_state=True,
                                                 context_fn=partial(create_selective_checkpoint_contexts,
                                                                    _selective_policy))
