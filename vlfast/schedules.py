"""Schedules for momentum encoders and weight averages."""

import math


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    r"""Cosine momentum ramp of BYOL (Grill et al., 2020), MoCo v3 (Chen et al., 2021) and DINO (Caron et al., 2021).

    .. math:: m(t) = f - (f - m_0)\,\frac{1 + \cos(\pi t / T)}{2}

    with ``m_0 = base`` at step 0 rising to ``f = final`` (1.0) at ``total_steps``;
    steps past ``total_steps`` stay at ``final``.  MoCo v3 calls it per iteration as
    ``1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - moco_m)`` with fractional epochs,
    which is this formula with ``step / total_steps = epoch / epochs``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    for name, v in (("base", base), ("final", final)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    t = min(step, total_steps) / total_steps
    return final - (final - base) * (1.0 + math.cos(math.pi * t)) / 2.0
