"""Distributed helpers of vlfast: differentiable all-gather for contrastive losses, DeepSpeed/ZeRO."""

from .gather import all_gather_no_grad, all_gather_with_grad, all_reduce_sum_no_grad, world_info
# ZeroEMA is not re-exported here (vlfast.nn imports this package): it is vlfast.nn.ZeroEMA, and
# vlfast.distributed.zero.ZeroEMA resolves to it lazily
from .zero import (ZeroMomentum, attach_zero_momentum, deepspeed_config, gathered_momentum_update_,
                   is_zero3_param, register_external_parameters, remove_cpu_shm_segments, zero3_momentum_update_)

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum_no_grad", "world_info", "deepspeed_config",
           "zero3_momentum_update_", "gathered_momentum_update_", "ZeroMomentum", "attach_zero_momentum",
           "is_zero3_param", "register_external_parameters", "remove_cpu_shm_segments"]
