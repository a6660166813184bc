"""Logging and per-step metrics of ``vlfast train``.

* :func:`get_logger`: the ``vlfast.train`` logger, writing ``vlfast train: <message>`` (warnings
  ``vlfast train: warning: <message>``) to stderr on rank 0 only (:class:`RankZeroFilter`; a
  record logged with ``extra={"all_ranks": True}`` passes on every rank: a rank's own finding,
  such as an unreadable image only that rank decoded).
* :class:`StepMetrics`: the loss of each step stays on the device; every ``log_every`` steps (and
  before a checkpoint and at the end) one flush all-reduces the window's losses in one collective,
  reads them back in one host sync, and writes one JSON line per step to ``metrics.jsonl``
  (``step``, ``loss``, ``lr``, ``samples_per_s`` and ``step_time_s`` averaged over the window,
  ``time``, and the data counters), TensorBoard scalars and the progress bar's loss.
"""

import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

LOGGER = "vlfast.train"


class RankZeroFilter(logging.Filter):
    """Pass records on rank 0 (``RANK`` or the process group's rank), and ``all_ranks`` records everywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        return _rank() == 0


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"vlfast train: {level}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a caller or test may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def get_logger() -> logging.Logger:
    """The trainer's logger (one stderr handler, installed once; rank-0 filter)."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(_Format())
        h.addFilter(RankZeroFilter())
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class StepMetrics:
    """Per-step metrics kept on the device and written in windows of ``log_every`` steps."""

    def __init__(self, path: Optional[str], *, batch_size: int, log_every: int, world_size: int = 1, tb=None,
                 bar=None, logger: Optional[logging.Logger] = None):
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
        self.path, self.batch_size, self.log_every, self.world = path, batch_size, log_every, world_size
        self.tb, self.bar, self.log = tb, bar, logger or get_logger()
        self._file = open(path, "a") if path is not None else None
        self._rows: List[torch.Tensor] = []  # per step: the loss, on the device
        self._host: List[Dict] = []  # per step: host-side fields
        self._t0 = time.perf_counter()
        self.last_loss = float("nan")

    def record(self, step: int, loss: torch.Tensor, *, lr: float, truncated: Optional[int] = None,
               **host_fields) -> None:
        """Keep step ``step``'s loss (a device scalar: no sync here); flush when the window is full."""
        self._rows.append(loss.detach().float().reshape(()))  # a host value moved here would sync on CUDA
        self._host.append({"step": step, "lr": lr, "truncated": truncated, **host_fields})
        if self.bar is not None:
            self.bar.update(1)
        if len(self._rows) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        """Write the pending steps (collective when ``world_size > 1``: every rank must call it)."""
        if not self._rows:
            return
        losses = torch.stack(self._rows)
        counts = torch.tensor([float(h["truncated"] or 0) for h in self._host], device=losses.device)
        vals = torch.stack([losses, counts], dim=1)  # (steps, 2): one collective for the window
        if self.world > 1:
            torch.distributed.all_reduce(vals)
            vals[:, 0] /= self.world
        vals = vals.tolist()  # the one host sync of the window
        now = time.perf_counter()
        dt = (now - self._t0) / len(vals)
        sps = self.batch_size / dt if dt > 0 else float("inf")
        for (loss, trunc), host in zip(vals, self._host):
            if not math.isfinite(loss):
                self.log.warning(f"non-finite loss at step {host['step']}")
            rec = {"step": host["step"], "loss": loss, "samples_per_s": sps, "lr": host["lr"], "time": time.time(),
                   "step_time_s": dt}
            rec.update({k: v for k, v in host.items() if k not in ("step", "lr", "truncated")})
            if host["truncated"] is not None:
                rec["truncated_captions"] = int(trunc)
            if self._file is not None:
                self._file.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                self.tb.add_scalar("loss", loss, host["step"])
                self.tb.add_scalar("samples_per_s", sps, host["step"])
                self.tb.add_scalar("lr", host["lr"], host["step"])
        if self._file is not None:
            self._file.flush()
        self.last_loss = vals[-1][0]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", sps=f"{sps:.1f}")
        self._rows, self._host, self._t0 = [], [], now

    def write_record(self, rec: Dict) -> None:
        """Write one extra JSON line (evaluation results) after the pending steps."""
        self.flush()
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
