"""The engine interface of ``vlfast train`` (:class:`Engine`) and its user-facing error (:class:`TrainError`).

The engines themselves: :class:`vlfast.training.trainer.TorchEngine`,
:class:`vlfast.training.trainer.DeepSpeedEngine`, :class:`vlfast.training.fsdp.FSDPEngine`.
"""

import contextlib
import os

import torch

from . import checkpoint as ckpt
from .optim import set_lr


class TrainError(Exception):
    """A user-facing error: printed as one ``vlfast train: error: ...`` line."""


class Engine:
    """What the loop needs from an optimisation engine (plain torch, DeepSpeed, ...).

    ``autocast()`` is the forward context; ``backward(loss)``; ``step()`` (optimizer
    step + zero grads); ``state_dict()/load_state_dict()``; ``save(dir)/load(dir)``.
    ``model`` is the module to call; ``lr`` the current learning rate.
    """

    model: torch.nn.Module
    rank: int = 0
    world_size: int = 1

    def autocast(self):
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float("nan")

    def set_lr(self, value: float) -> None:
        """The learning rate of the next :meth:`step` (every parameter group)."""
        set_lr(self.optimizer, value)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        torch.save(self.state_dict(), os.path.join(directory, "engine.pt"))

    def load(self, directory: str) -> None:
        self.load_state_dict(ckpt.load_file(os.path.join(directory, "engine.pt")))
