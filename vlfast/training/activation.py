"""Activation checkpointing for ``vlfast train --grad-checkpointing``.

:func:`checkpoint_blocks` makes every transformer block of a model recompute its activations
in the backward instead of storing them (Chen et al., 2016, arXiv:1604.06174).  A block is a
child of an ``nn.ModuleList`` / ``nn.Sequential`` that is itself made of parameterized
submodules (timm's ``blocks``, HF's ``encoder.layer``, open_clip's ``resblocks``, ...); single
layers are left alone.  It runs through ``torch.utils.checkpoint.checkpoint`` with
``use_reentrant=False``, which keeps the RNG state, so dropout and the fused attention's dropout
draw the same masks in the recomputation.  The block's ``forward`` is wrapped on the instance:
parameters, ``state_dict`` keys and hooks are unchanged.  Blocks of momentum encoders (run under
``no_grad``) are wrapped too and simply run once.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _composite(m: nn.Module) -> bool:
    """A block: a module with submodules that hold parameters (attention + MLP), not one layer."""
    return any(any(True for _ in c.parameters()) for c in m.children())


def _blocks(model: nn.Module):
    seen = set()
    for mod in model.modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            for child in mod:
                if id(child) in seen or not _composite(child):
                    continue
                seen.add(id(child))
                yield child


def _wrap(block: nn.Module) -> None:
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    forward._vlfast_checkpointed = True
    block.forward = forward


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every block of ``model`` (see the module docstring); returns how many were wrapped.
    A block is wrapped once (calling this again wraps nothing new)."""
    n = 0
    outer = set()
    for blk in _blocks(model):
        # a block inside another wrapped block would be recomputed twice: wrap the outermost only
        if any(blk is m or _contains(m, blk) for m in outer):
            continue
        if getattr(blk.forward, "_vlfast_checkpointed", False):
            outer.add(blk)
            continue
        _wrap(blk)
        outer.add(blk)
        n += 1
    return n


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())
