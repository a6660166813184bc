"""The machinery behind :func:`vlfast.patch`: one walk over the model, one report, one swap rule.

Each supported library has an *integration* (``torch_nn``, ``timm``, ``open_clip``,
``transformers``): an object with

* ``name`` and ``looks_for`` (what it replaces, for the report and the "nothing to patch" warning);
* ``applies(model) -> bool``: a cheap test (does any submodule come from the library?), so a
  library is imported only when the model uses it;
* optionally ``prepare(model, ctx)``: model-level work before the walk (e.g. select the
  ``"vlfast"`` attention implementation of a Hugging Face model);
* ``convert(path, module, ctx) -> nn.Module | None``: the replacement of one submodule it
  knows, built to share the original's parameters (or ``None``: not its module, or left
  with ``ctx.leave(...)`` and a reason).

The walk swaps instances (never classes): the replacement keeps the original's
``Parameter`` objects, buffers, hooks and train/eval mode, so ``state_dict`` keys, optimizers
built before patching and weight tying stay valid. A module shared by several parents is
replaced once.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

log = logging.getLogger("vlfast")

# hook dictionaries carried over to a replacement (the handles keep working: they refer to the dicts)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


@dataclasses.dataclass(frozen=True)
class Replaced:
    path: str  #: module path in the model ("" for the model itself)
    kind: str  #: e.g. "torch.nn.MultiheadAttention", "timm Attention", "HF attention interface"
    original: str  #: qualified class name of the original
    replacement: str  #: qualified class name of the replacement (or what was set)


@dataclasses.dataclass(frozen=True)
class Left:
    path: str
    original: str
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What :func:`vlfast.patch` did: every replacement by module path and kind, and what it left and why."""

    replaced: List[Replaced] = dataclasses.field(default_factory=list)
    left: List[Left] = dataclasses.field(default_factory=list)
    looked_for: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """``{kind: number replaced}``."""
        return dict(Counter(r.kind for r in self.replaced))

    def __len__(self) -> int:
        return len(self.replaced)

    def summary(self) -> str:
        parts = [f"{n} {kind}" for kind, n in sorted(self.counts().items())]
        text = "vlfast.patch: replaced " + (", ".join(parts) if parts else "nothing")
        if self.left:
            reasons = Counter(f"{lf.original}: {lf.reason}" for lf in self.left)
            text += "; left " + "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items()))
        for note in self.notes:
            text += f"; {note}"
        return text

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  replaced {r.path or '<model>'}: {r.original} -> {r.replacement} ({r.kind})"
                  for r in self.replaced]
        lines += [f"  left {lf.path or '<model>'}: {lf.original}: {lf.reason}" for lf in self.left]
        return "\n".join(lines)


def qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class PatchContext:
    """Options of one :func:`vlfast.patch` call and the report it fills."""

    attention: bool = True
    masking: bool = True
    backend: Optional[str] = None
    report: PatchReport = dataclasses.field(default_factory=PatchReport)

    def leave(self, path: str, module, reason: str) -> None:
        self.report.left.append(Left(path, qualname(module), reason))

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def replaced(self, path: str, kind: str, original, replacement) -> None:
        rep = replacement if isinstance(replacement, str) else qualname(replacement)
        self.report.replaced.append(Replaced(path, kind, qualname(original), rep))


def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the hooks and the train/eval mode of ``old`` (the module it replaces)."""
    for attr in _HOOK_DICTS:
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
    new.train(old.training)
    return new


def share_parameters(old: nn.Module, new: nn.Module) -> nn.Module:
    """Load ``old``'s state into ``new`` (built on the meta device or not) by assigning ``old``'s
    ``Parameter`` and buffer objects, strictly: ``new`` must have exactly ``old``'s state-dict keys."""
    originals = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if name in originals:  # assign=True copies requires_grad from the new module's parameter
            p.requires_grad_(originals[name].requires_grad)
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    ref_meta = any(t.is_meta for t in old.parameters())
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta and not ref_meta]
    if leftover:
        raise RuntimeError(f"vlfast.patch: {leftover} of the replacement of {type(old).__name__} were not loaded")
    return new


def library_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_warned_versions: set = set()


def check_tested_version(dist: str, tested: Sequence[str]) -> None:
    """Warn once when the installed ``dist`` is not a version vlfast's integration tests ran against."""
    v = library_version(dist)
    if v is None or dist in _warned_versions:
        return
    if not any(v == t or v.startswith(t + ".") for t in tested):
        _warned_versions.add(dist)
        warnings.warn(f"vlfast.patch: {dist} {v} is not a version vlfast was tested with ({', '.join(tested)}); "
                      "check the report (vlfast.patch(model, report=True)) and the outputs", stacklevel=3)


def module_from(module: nn.Module, *prefixes: str) -> bool:
    """Whether ``module``'s class is defined in a module under one of ``prefixes`` (e.g. ``"timm."``)."""
    name = type(module).__module__
    return any(name == p.rstrip(".") or name.startswith(p) for p in prefixes)


def walk_and_swap(model: nn.Module, convert: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace, in place, every submodule for which ``convert(path, module)`` returns a module.

    ``convert`` is called once per distinct module (a shared module gets one shared
    replacement); the replacement's own submodules are not visited again.  Returns ``model``
    or, when ``model`` itself is converted, its replacement.
    """
    new_root = convert("", model)
    if new_root is not None:
        return new_root
    done: Dict[int, Optional[nn.Module]] = {}
    stack: List[Tuple[str, nn.Module]] = [("", model)]
    seen_parents = set()
    while stack:
        prefix, parent = stack.pop()
        if id(parent) in seen_parents:
            continue
        seen_parents.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if id(child) not in done:
                done[id(child)] = convert(path, child)
            new = done[id(child)]
            if new is not None:
                setattr(parent, name, new)
            else:
                stack.append((path, child))
    return model
