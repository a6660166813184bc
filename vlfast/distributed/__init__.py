"""Engine integrations of vlfast: DeepSpeed ZeRO (config, momentum/EMA updates on shards), collectives.

The layers below are re-exported for convenience: the collectives of :mod:`vlfast.comm`
and the shard primitives of :mod:`vlfast.sharding`.
"""

from ..comm import all_gather_no_grad, all_gather_with_grad, all_reduce_sum_no_grad, free_port, world_info
from ..sharding import is_zero3_param, zero3_momentum_update_
from .zero import (ZeroMomentum, attach_zero_momentum, deepspeed_config, gathered_momentum_update_,
                   hoist_momentum_updates, register_external_parameters, remove_cpu_shm_segments)
from .zero_ema import ZeroEMA, is_partitioned, make_ema

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum_no_grad", "free_port", "world_info",
           "deepspeed_config", "zero3_momentum_update_", "gathered_momentum_update_", "ZeroMomentum",
           "attach_zero_momentum", "hoist_momentum_updates", "is_zero3_param", "register_external_parameters",
           "remove_cpu_shm_segments", "ZeroEMA", "make_ema", "is_partitioned"]
