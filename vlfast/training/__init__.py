"""``vlfast train``: a single-process trainer for the registered models.

:mod:`.trainer` holds the command line and the loop, :mod:`.data` the data sources
(synthetic, CSV, webdataset-style tar shards), :mod:`.checkpoint` the atomic
checkpoint layout, and :class:`.trainer.Engine` the pluggable optimisation engine
(:class:`.trainer.TorchEngine` here; a DeepSpeed engine can implement the same
interface).
"""

from .checkpoint import find_latest, load_checkpoint, save_checkpoint
from .data import DataError, build_data, parse_data_spec
from .trainer import Engine, TorchEngine, TrainError, main

__all__ = ["main", "Engine", "TorchEngine", "TrainError", "DataError", "build_data", "parse_data_spec",
           "save_checkpoint", "load_checkpoint", "find_latest"]
