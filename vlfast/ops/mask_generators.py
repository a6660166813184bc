"""Patch-mask generators for masked image / video modelling.

* :func:`block_masking` -- BEiT / SimMIM-style blockwise masking on a 2-D patch
  grid (Bao et al., 2021, "BEiT: BERT Pre-Training of Image Transformers",
  arXiv:2106.08254; Xie et al., 2021, "SimMIM", arXiv:2111.09886).
* :func:`tube_masking` -- VideoMAE tube masking (Tong et al., 2022, "VideoMAE",
  arXiv:2203.12602): one random spatial mask per clip, repeated on every frame.

Both return a ``torch.bool`` tensor where ``True`` means *masked* (the token is
removed / replaced by a mask token) and every row has exactly the same number of
masked tokens, so the masks can be used to gather a dense ``(B, L_keep, D)``
tensor of visible tokens.  The number of masked tokens is
``L - int(L * (1 - mask_ratio))`` for ``L`` tokens per frame, i.e. the number of
*kept* tokens equals MAE's ``len_keep = int(L * (1 - mask_ratio))``.

The masks are small, so they are built on the CPU with plain PyTorch (all
randomness drawn from the given ``torch.Generator``, or torch's global RNG) and
then moved to ``device``.
"""

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from .. import _validation as check

__all__ = ["block_masking", "tube_masking"]

GridLike = Union[int, Tuple[int, int]]

# Bounded work per row for block placement: stop after this many consecutive
# rejected rectangles (as BEiT's MaskingGenerator does) or this many rectangles
# in total; the remainder is filled patch-wise (see _fill_adjacent).
_MAX_CONSECUTIVE_FAILURES = 10
_MAX_ATTEMPTS_PER_ROW = 1000
_RAND_CHUNK = 1024


# --------------------------------------------------------------------------- validation

def _check_grid(grid) -> Tuple[int, int]:
    if isinstance(grid, (tuple, list, torch.Size)):
        if len(grid) != 2:
            raise ValueError(f"grid must be an int or a pair (H, W), got a sequence of length {len(grid)}")
        return check.integer("grid[0] (H)", grid[0], 1), check.integer("grid[1] (W)", grid[1], 1)
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral):
        raise TypeError(f"grid must be an int or a pair (H, W) of ints, got {type(grid).__name__}")
    side = check.integer("grid", grid, 1)
    return side, side


def _check_generator(generator) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (masks are built on the CPU), "
                         f"got one on {generator.device}")
    return generator


def _num_masked(num_tokens: int, mask_ratio: float) -> int:
    """Masked count such that the kept count equals MAE's ``int(L * (1 - mask_ratio))``."""
    return num_tokens - int(num_tokens * (1.0 - mask_ratio))


# --------------------------------------------------------------------------- randomness

class _Uniforms:
    """Scalar U[0, 1) draws from ``generator`` (or the global RNG), fetched in chunks."""

    def __init__(self, generator: Optional[torch.Generator]):
        self._gen = generator
        self._buf = []
        self._pos = 0

    def __call__(self) -> float:
        if self._pos == len(self._buf):
            self._buf = torch.rand(_RAND_CHUNK, dtype=torch.float64, generator=self._gen).tolist()
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return u

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self()

    def randint(self, n: int) -> int:
        """Uniform integer in ``[0, n)``."""
        return min(int(self() * n), n - 1)


# --------------------------------------------------------------------------- block masking

def _place_blocks(mask: torch.Tensor, target: int, min_patches: int, max_patches: int,
                  log_aspect: Tuple[float, float], rng: _Uniforms) -> int:
    """BEiT-style rectangle placement into ``mask`` (H, W) in place; returns the masked count (<= target)."""
    H, W = mask.shape
    count = 0
    failures = 0
    attempts = 0
    while count < target and failures < _MAX_CONSECUTIVE_FAILURES and attempts < _MAX_ATTEMPTS_PER_ROW:
        attempts += 1
        budget = min(target - count, max_patches)
        area = rng.uniform(min(min_patches, budget), budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = max(1, int(round(math.sqrt(area * aspect))))
        w = max(1, int(round(math.sqrt(area / aspect))))
        added = 0
        if h <= H and w <= W:
            top = rng.randint(H - h + 1)
            left = rng.randint(W - w + 1)
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            # Accept only blocks that add something and do not overshoot the target.
            if 0 < added <= budget:
                block.fill_(True)
            else:
                added = 0
        if added:
            count += added
            failures = 0
        else:
            failures += 1
    return count


def _fill_adjacent(mask: torch.Tensor, need: int, generator: Optional[torch.Generator]) -> None:
    """Mask ``need`` more patches of ``mask`` (H, W) in place, preferring unmasked 4-neighbours of masked ones.

    Each round masks a random subset of the current frontier (all of it if
    ``need`` allows); with no masked patch yet, a random patch seeds it.  Every
    round masks at least one patch, so this terminates in at most ``need`` rounds.
    """
    flat = mask.view(-1)
    while need > 0:
        if bool(flat.any()):
            nb = torch.zeros_like(mask)
            nb[1:] |= mask[:-1]
            nb[:-1] |= mask[1:]
            nb[:, 1:] |= mask[:, :-1]
            nb[:, :-1] |= mask[:, 1:]
            cand = (nb & ~mask).view(-1).nonzero().view(-1)
            k = min(need, cand.numel())
        else:  # nothing masked yet: seed with one random patch
            cand = torch.arange(flat.numel())
            k = 1
        # cand is non-empty here: some patch is unmasked (need > 0) and, the grid
        # being connected, some unmasked patch borders a masked one.
        pick = cand[torch.rand(cand.numel(), generator=generator).argsort()[:k]]
        flat[pick] = True
        need -= k


def block_masking(batch_size: int, grid: GridLike, mask_ratio: float, *, min_num_patches: int = 16,
                  max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                  max_aspect: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  device=None) -> torch.Tensor:
    r"""Blockwise (BEiT / SimMIM-style) random patch masks with an exact masked count.

    For each of ``batch_size`` samples, random axis-aligned rectangles are placed on
    the ``(H, W)`` patch grid as in BEiT's ``MaskingGenerator`` (Bao et al., 2021,
    arXiv:2106.08254, Algorithm 1): with ``budget = min(remaining, max_num_patches)``,
    a rectangle has area drawn uniformly from ``[min(min_num_patches, budget), budget]``,
    aspect ratio ``h / w`` drawn log-uniformly from ``[min_aspect, max_aspect]``,
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``, and a
    uniformly random top-left corner; it is accepted if it fits in the grid and
    masks at least one and at most ``budget`` new patches (so the target is never
    exceeded).  Placement stops at the target, after 10 consecutive rejected
    rectangles (as in BEiT), or after 1000 rectangles in total.  Unlike BEiT, which
    may stop short of the target, any shortfall is then filled with random
    unmasked patches adjacent (4-neighbourhood) to masked ones, so **every row has
    exactly** ``num_masked`` masked patches::

        L = H * W
        num_masked = L - int(L * (1 - mask_ratio))

    i.e. the number of *visible* patches equals MAE's ``len_keep = int(L * (1 - mask_ratio))``.
    Work per row is bounded, so this is fast for any ratio in ``[0, 1)`` and any
    grid size.

    Args:
        batch_size: number of masks (rows), an int ``>= 0``.
        grid: patch grid, an int ``S`` (meaning ``(S, S)``) or a pair ``(H, W)`` of ints ``>= 1``.
        mask_ratio: fraction of patches to mask, in ``[0, 1)``.
        min_num_patches: minimum rectangle area in patches (BEiT: 16), int ``>= 1``.
            Rectangles are smaller only when the remaining budget is smaller.
        max_num_patches: maximum rectangle area in patches, int ``>= min_num_patches``,
            or ``None`` (default) for no limit beyond the target count.
        min_aspect: smallest aspect ratio ``h / w`` (BEiT: 0.3), ``> 0``.
        max_aspect: largest aspect ratio; ``None`` (default) means ``1 / min_aspect``.
            Must be ``>= min_aspect`` when given.
        generator: CPU ``torch.Generator`` that all randomness is drawn from (a seeded
            generator reproduces the masks); ``None`` uses torch's global RNG.
        device: device of the returned tensor (built on the CPU, then moved); default CPU.

    Returns:
        ``torch.bool`` tensor of shape ``(batch_size, H * W)``; ``True`` = masked.
        Tokens are in row-major order: patch ``(i, j)`` is at flat index ``i * W + j``,
        so ``mask.view(batch_size, H, W)`` recovers the grid.

    Raises:
        TypeError: an argument has the wrong type (e.g. ``generator`` not a ``torch.Generator``).
        ValueError: an argument is out of range (e.g. ``mask_ratio`` not in ``[0, 1)``).
    """
    batch_size = check.integer("batch_size", batch_size, 0)
    H, W = _check_grid(grid)
    mask_ratio = check.mask_ratio(mask_ratio)
    min_num_patches = check.integer("min_num_patches", min_num_patches, 1)
    if max_num_patches is not None:
        max_num_patches = check.integer("max_num_patches", max_num_patches, 1)
        if max_num_patches < min_num_patches:
            raise ValueError(f"max_num_patches must be >= min_num_patches ({min_num_patches}), "
                             f"got {max_num_patches}")
    min_aspect = check.real("min_aspect", min_aspect)
    if min_aspect <= 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    if max_aspect is None:
        lo, hi = sorted((min_aspect, 1.0 / min_aspect))
    else:
        max_aspect = check.real("max_aspect", max_aspect)
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect must be >= min_aspect ({min_aspect}), got {max_aspect}")
        lo, hi = min_aspect, max_aspect
    log_aspect = (math.log(lo), math.log(hi))
    generator = _check_generator(generator)

    L = H * W
    target = _num_masked(L, mask_ratio)
    max_patches = target if max_num_patches is None else max_num_patches
    out = torch.zeros(batch_size, H, W, dtype=torch.bool)
    if target > 0:
        rng = _Uniforms(generator)
        for b in range(batch_size):
            m = out[b]
            count = _place_blocks(m, target, min_num_patches, max_patches, log_aspect, rng)
            _fill_adjacent(m, target - count, generator)
    out = out.view(batch_size, L)
    return out if device is None else out.to(device)


# --------------------------------------------------------------------------- tube masking

def tube_masking(batch_size: int, frames: int, grid: GridLike, mask_ratio: float, *,
                 generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    r"""VideoMAE tube masking: one random spatial mask per sample, repeated on every frame.

    Following VideoMAE (Tong et al., 2022, arXiv:2203.12602), each sample draws a
    uniformly random subset of exactly ``num_masked`` of the ``L = H * W`` spatial
    positions (``argsort`` of uniform noise, as in MAE), with::

        num_masked = L - int(L * (1 - mask_ratio))

    (so the visible count per frame equals MAE's ``len_keep``), and masks those
    positions on every temporal slot, forming "tubes" through time.  Each row has
    exactly ``frames * num_masked`` masked tokens.

    Args:
        batch_size: number of masks (rows), an int ``>= 0``.
        frames: number of temporal token slots ``T`` (frames after tubelet grouping,
            e.g. 16 frames with tubelet size 2 give ``T = 8``), int ``>= 1``.
        grid: spatial patch grid, an int ``S`` (meaning ``(S, S)``) or a pair ``(H, W)``.
        mask_ratio: fraction of spatial positions to mask, in ``[0, 1)``.
        generator: CPU ``torch.Generator`` that all randomness is drawn from; ``None``
            uses torch's global RNG.
        device: device of the returned tensor (built on the CPU, then moved); default CPU.

    Returns:
        ``torch.bool`` tensor of shape ``(batch_size, frames * H * W)``; ``True`` = masked.
        Tokens are ordered ``(frame, row, column)``: token ``(t, i, j)`` is at flat index
        ``t * H * W + i * W + j``, and ``mask.view(batch_size, frames, H * W)[:, t]`` is
        the same for every ``t``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range (e.g. ``frames < 1``, ``mask_ratio`` not in ``[0, 1)``).
    """
    batch_size = check.integer("batch_size", batch_size, 0)
    frames = check.integer("frames", frames, 1)
    H, W = _check_grid(grid)
    mask_ratio = check.mask_ratio(mask_ratio)
    generator = _check_generator(generator)

    L = H * W
    target = _num_masked(L, mask_ratio)
    spatial = torch.zeros(batch_size, L, dtype=torch.bool)
    if target > 0 and batch_size > 0:
        ids = torch.rand(batch_size, L, generator=generator).argsort(dim=1)[:, :target]
        spatial.scatter_(1, ids, True)
    out = spatial.unsqueeze(1).expand(batch_size, frames, L).reshape(batch_size, frames * L)
    return out if device is None else out.to(device)
