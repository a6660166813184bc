"""Kept for imports written before the collectives moved to :mod:`vlfast.comm`."""

from ..comm import all_gather_no_grad, all_gather_with_grad, all_reduce_sum_no_grad, broadcast_from_rank0, world_info

__all__ = ["world_info", "all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum_no_grad", "broadcast_from_rank0"]
