"""Distributed helpers of vlfast: differentiable all-gather for contrastive losses."""

from .gather import all_gather_no_grad, all_gather_with_grad, world_info

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "world_info"]
