"""Optimizer parameter groups and the learning-rate schedule of ``vlfast train``.

* :func:`param_groups`: AdamW groups with weight decay on the weight matrices only.  Excluded
  (decay 0), as open_clip's ``main.py`` (``p.ndim < 2 or "bn"/"ln"/"bias" in name or
  "logit_scale" in name``) and timm's ``param_groups_weight_decay`` (``ndim <= 1``, ``.bias``,
  ``model.no_weight_decay()``) do: every parameter with fewer than 2 dimensions (biases,
  norm scales, ``logit_scale``, temperatures), every parameter of a normalization layer or an
  ``nn.Embedding``, position embeddings and learned tokens (``pos_embed``, ``cls_token``,
  ``mask_token``, ``positional_embedding``, ``class_embedding``, ...), and the names a model
  lists in ``no_weight_decay()`` (timm's convention).
* :func:`lr_at`: linear warmup from 0 over ``warmup_steps`` (step ``s`` of the warmup has
  ``lr * s / warmup_steps``), then ``constant`` or ``cosine`` decay to ``min_lr`` at the last
  step (Loshchilov & Hutter, 2017, arXiv:1608.03983, without restarts):
  ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t = (s - warmup) / (total - warmup)``.
"""

import math
from typing import Dict, List

import torch
from torch import nn

SCHEDULES = ("constant", "cosine")

# parameter names (last component) that are embeddings or learned tokens: never decayed
_NO_DECAY_NAMES = frozenset({
    "pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "positional_embedding", "class_embedding",
    "decoder_pos_embed", "query_tokens", "logit_scale", "logit_bias", "temp", "temperature", "bias",
    "relative_position_bias_table", "attn_pool_query", "query", "text_projection_bias",
})
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


def no_decay_names(model: nn.Module) -> set:
    """Names of ``model``'s trainable parameters that get no weight decay (see the module docstring)."""
    listed = set()
    if callable(getattr(model, "no_weight_decay", None)):
        listed = {str(n) for n in model.no_weight_decay()}
    out = set()
    for mod_name, mod in model.named_modules():
        whole = isinstance(mod, _NORMS + (nn.Embedding,))
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if whole or p.ndim < 2 or pname in _NO_DECAY_NAMES or full in listed or pname in listed:
                out.add(full)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``
    over the trainable parameters (each once, in ``named_parameters`` order; empty groups dropped)."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    skip = no_decay_names(model)
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (1-based) of ``total_steps`` (formula above)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 1 <= step <= max(total_steps, 1):
        raise ValueError(f"step must be in [1, {total_steps}], got {step}")
    if warmup_steps < 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr <= lr, got {warmup_steps}, {min_lr}, {lr}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    span = total_steps - warmup_steps
    t = (step - warmup_steps) / span if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every parameter group's ``lr`` to ``value`` (groups keep their own weight decay)."""
    for g in optimizer.param_groups:
        g["lr"] = value
