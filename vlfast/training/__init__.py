"""``vlfast train`` / ``vlfast eval``: training and evaluation of the registered models.

* :mod:`.trainer` -- :class:`Trainer` (``train()``, ``train_step()``, ``state_dict()``) and the command line;
* :mod:`.engine` -- the :class:`Engine` interface and :class:`TorchEngine` (one process);
  :mod:`.deepspeed_engine` (DeepSpeed ZeRO 0-3) and :mod:`.fsdp` (PyTorch FSDP2) behind it;
* :mod:`.checkpoint` -- :class:`CheckpointManager` (atomic folders, ``latest``, every file name) and
  safe loading (:func:`load_file`);
* :mod:`.data` -- synthetic, CSV and webdataset-style tar-shard data through a ``DataLoader``;
* :mod:`.optim`, :mod:`.metrics`, :mod:`.activation`, :mod:`.evaluate`.
"""

from .checkpoint import CheckpointError, CheckpointManager, StepFolder, load_file
from .data import DataError, build_data, parse_data_spec
from .engine import Engine, TorchEngine, TrainError
from .trainer import Trainer, main, make_engine

__all__ = ["main", "Trainer", "Engine", "TorchEngine", "make_engine", "TrainError", "DataError", "build_data",
           "parse_data_spec", "CheckpointManager", "StepFolder", "CheckpointError", "load_file"]
