"""Checkpoints of ``vlfast train``: :class:`CheckpointManager` owns the layout and every file name.

Layout of a run folder ``<out>``::

    <out>/metrics.jsonl                  per-step metrics (rank 0)
    <out>/tb/                            TensorBoard events, when tensorboard is installed
    <out>/checkpoints/latest             the name of the newest complete step folder
    <out>/checkpoints/step_<N>/          one checkpoint (:class:`StepFolder` names its files)

A checkpoint is written into ``checkpoints/.tmp-step_<N>-<pid>/`` (``-dist`` with several
ranks: every rank writes its part there) and renamed into place with :func:`os.replace`;
``latest`` is updated by writing ``latest.tmp-<pid>`` and renaming it.  A crash at any
point (SIGKILL included) leaves either the previous complete checkpoint or the new one;
leftover ``.tmp-*`` entries are ignored and removed by :meth:`CheckpointManager.clean_tmp`.

Every file is read by :func:`load_file`: ``torch.load(..., weights_only=True)``, so a
checkpoint from elsewhere cannot run code when it is loaded (a pickle that would call a
function is refused with :class:`CheckpointError`).  What is saved is therefore only
tensors and plain containers of numbers and strings: the NumPy RNG state is stored as a
tensor (:func:`rng_state`).  The engines (:mod:`vlfast.training.engine`) write their own
state into the folder, under the names :class:`StepFolder` gives them.
"""

import json
import os
import pickle
import random
import shutil
from typing import Optional

import torch

TMP_PREFIX = ".tmp-"
LATEST = "latest"


class CheckpointError(Exception):
    """A checkpoint file that cannot be read safely or is not one of ours (one line to the user)."""


def load_file(path: str, map_location="cpu", *, mmap: bool = False, allow=()):
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, tuples, sets and plain
    scalars/strings only; nothing in the file is called.  A file holding anything else (a
    class instance, a function reference: what a crafted pickle needs to run code) raises
    :class:`CheckpointError` naming the file and the object refused.  ``allow``: plain
    data classes to accept besides (``torch.serialization.safe_globals``; their instances
    are rebuilt by setting attributes, never by calling code from the file).  ``mmap=True``
    memory-maps a zip-format file (falls back to a plain read for a legacy file)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((ln.strip().rstrip(".") for ln in str(exc).splitlines() if "nsupported" in ln),
                   "it holds objects other than tensors and plain containers")
        raise CheckpointError(f"refusing to load {path}: not a plain tensor file (read with weights_only=True; "
                              f"{why})") from None
    except (RuntimeError, EOFError) as exc:  # truncated / not a torch file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


class StepFolder(os.PathLike):
    """One ``step_<N>`` checkpoint folder and the names of its files (the only place they are spelled).

    * ``model`` (``model.pt``): the full ``state_dict()`` on the CPU, written by rank 0 with every
      engine (gathered under ZeRO-3 / FSDP2): what ``vlfast eval`` and an export read;
      ``safetensors("model")`` its optional safetensors copy.
    * ``ema`` (``ema.pt``): the EMA's full state dict (keys ``module.*``, timm's ``ModelEmaV3``).
    * ``state`` (``trainer_state.pt``): the trainer's state (:meth:`Trainer.state_dict`: step, data
      position) plus rank 0's random streams and the arguments; ``args`` (``args.json``) the same
      arguments as text.
    * ``optimizer`` / ``scaler`` (``optimizer.pt`` / ``scaler.pt``): the plain torch engine's.
    * ``deepspeed`` (``deepspeed/``): DeepSpeed's own checkpoint tag (per-rank shards); ``dcp``
      (``dcp/``): FSDP2's sharded ``torch.distributed.checkpoint``.
    * ``rng(rank)`` (``rng_rank<r>.pt``) and ``momentum_masters(rank)``
      (``momentum_masters_rank<r>.pt``): per-rank state with several ranks.
    """

    MODEL = "model.pt"
    EMA = "ema.pt"
    STATE = "trainer_state.pt"
    ARGS = "args.json"
    OPTIMIZER = "optimizer.pt"
    SCALER = "scaler.pt"
    DEEPSPEED = "deepspeed"
    DCP = "dcp"

    def __init__(self, path: "str | os.PathLike"):
        self.path = os.fspath(path)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"StepFolder({self.path!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StepFolder) and os.path.abspath(self.path) == os.path.abspath(other.path)

    def __hash__(self) -> int:
        return hash(os.path.abspath(self.path))

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    model = property(lambda self: self._join(self.MODEL))
    ema = property(lambda self: self._join(self.EMA))
    state = property(lambda self: self._join(self.STATE))
    args = property(lambda self: self._join(self.ARGS))
    optimizer = property(lambda self: self._join(self.OPTIMIZER))
    scaler = property(lambda self: self._join(self.SCALER))
    dcp = property(lambda self: self._join(self.DCP))

    def rng(self, rank: int) -> str:
        return self._join(f"rng_rank{rank}.pt")

    def momentum_masters(self, rank: int) -> str:
        return self._join(f"momentum_masters_rank{rank}.pt")

    def safetensors(self, name: str) -> str:
        """``<name>.safetensors`` (``name``: ``"model"`` or ``"ema"``)."""
        return self._join(f"{name}.safetensors")

    def is_complete(self) -> bool:
        """The trainer state exists: the folder was renamed into place after every part was written."""
        return os.path.isfile(self.state)


class CheckpointManager:
    """Saves, finds and loads the checkpoints of the run folder ``out_dir`` (see the module docstring).

    ``save`` and ``load`` are collective when the engine has several ranks (``engine.world_size > 1``):
    every rank calls them.  ``engine`` needs ``save(folder)`` / ``load(folder)`` (a :class:`StepFolder`),
    ``rank``, ``world_size`` and ``barrier()`` (:class:`vlfast.training.engine.Engine`).
    """

    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tb"

    def __init__(self, out_dir: str):
        self.out_dir = os.fspath(out_dir)

    @property
    def root(self) -> str:
        """``<out>/checkpoints``."""
        return os.path.join(self.out_dir, self.CHECKPOINTS)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, self.METRICS)

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.out_dir, self.TENSORBOARD)

    def step_folder(self, step: int) -> StepFolder:
        return StepFolder(os.path.join(self.root, f"step_{int(step)}"))

    # ------------------------------------------------------------------ find
    def latest(self) -> Optional[StepFolder]:
        """The complete checkpoint ``latest`` points at, or None."""
        return _read_latest(self.root)

    @staticmethod
    def resolve(path: str) -> StepFolder:
        """The step folder named by ``path``: a run folder, its ``checkpoints`` folder, a ``latest``
        file or a step folder holding ``model.pt``.  :class:`CheckpointError` otherwise."""
        path = os.fspath(path)
        if os.path.isfile(path) and os.path.basename(path) == LATEST:
            path = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(path):
            raise CheckpointError(f"{path!r}: no such folder or 'latest' file")
        if os.path.isfile(StepFolder(path).model):
            return StepFolder(path)
        for root in (path, os.path.join(path, CheckpointManager.CHECKPOINTS)):
            if os.path.isfile(os.path.join(root, LATEST)):
                step = _read_latest(root, complete=False)
                if step is None or not os.path.isfile(step.model):
                    raise CheckpointError(f"{path!r}: 'latest' names {step.name if step else '(nothing)'!r}, "
                                          f"which has no {StepFolder.MODEL}")
                return step
        raise CheckpointError(f"{path!r} is not a run folder, a checkpoints folder, a 'latest' file or a step "
                              f"folder with {StepFolder.MODEL}")

    # ------------------------------------------------------------------ clean
    def clean_tmp(self) -> list:
        """Remove partial checkpoints / pointer files left by a crash; returns their names."""
        removed = []
        if not os.path.isdir(self.root):
            return removed
        for name in os.listdir(self.root):
            if name.startswith(TMP_PREFIX) or name.startswith(LATEST + ".tmp"):
                path = os.path.join(self.root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ save
    def save(self, step: int, engine, trainer_state: dict, ema=None, args: Optional[dict] = None) -> StepFolder:
        """Write checkpoint ``step`` atomically and point ``latest`` at it; returns its folder.

        With several ranks every rank calls this: all write their part (``engine.save``) into one
        shared ``.tmp-step_N-dist`` folder; after a barrier rank 0 writes the trainer state and
        renames the folder into place, then a final barrier.  The trainer state's RNG is rank 0's.

        ``ema``: a :class:`vlfast.nn.EMA`, written by rank 0 to ``ema.pt``; a
        :class:`vlfast.distributed.ZeroEMA` (ZeRO-3) is gathered with ``full_state_dict()`` (every rank
        takes part, one parameter at a time; only rank 0 keeps the tensors, on the CPU).
        """
        final = self.step_folder(step)
        rank, world = int(getattr(engine, "rank", 0)), int(getattr(engine, "world_size", 1))
        barrier = getattr(engine, "barrier", lambda: None)
        suffix = "dist" if world > 1 else str(os.getpid())
        tmp = StepFolder(os.path.join(self.root, f"{TMP_PREFIX}{final.name}-{suffix}"))
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        if world > 1:
            barrier()
        engine.save(tmp)
        if world > 1:
            barrier()
        ema_state = None
        if ema is not None and callable(getattr(ema, "full_state_dict", None)):
            # ZeroEMA: collective (every rank), tensors kept on rank 0 only
            ema_state = ema.full_state_dict(rank0_only=True, cpu=True)
        elif ema is not None and rank == 0:
            ema_state = ema.state_dict()
        if rank != 0:
            barrier()  # rank 0 renames
            return final
        if ema_state is not None:
            torch.save(ema_state, tmp.ema)
        state = dict(trainer_state)
        state["step"] = step
        state["rng"] = rng_state()
        state["args"] = args or {}
        torch.save(state, tmp.state)
        with open(tmp.args, "w") as f:
            json.dump({"step": step, "args": args or {}}, f, indent=1, default=str)
        _fsync_dir(tmp.path)
        if os.path.exists(final):  # re-saving the same step (e.g. the final save after save-every)
            old = os.path.join(self.root, f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        ptr_tmp = os.path.join(self.root, f"{LATEST}.tmp-{os.getpid()}")
        with open(ptr_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr_tmp, os.path.join(self.root, LATEST))
        _fsync_dir(self.root)
        if world > 1:
            barrier()
        return final

    # ------------------------------------------------------------------ load
    @staticmethod
    def load(folder: "StepFolder | str", engine, ema=None) -> dict:
        """Restore ``engine`` (and ``ema``) from ``folder``; returns the trainer state (RNG not yet applied).
        This rank's own random streams, when the folder has them, are in ``state["rank_rng"]``."""
        folder = folder if isinstance(folder, StepFolder) else StepFolder(folder)
        engine.load(folder)
        if ema is not None and os.path.isfile(folder.ema):
            # memory-mapped: a ZeroEMA copies just this rank's slices out of it
            ema_state = load_file(folder.ema, mmap=True)
            ema.load_state_dict(ema_state)
            del ema_state
        state = load_file(folder.state)
        rank = int(getattr(engine, "rank", 0))
        if int(getattr(engine, "world_size", 1)) > 1 and os.path.isfile(folder.rng(rank)):
            state["rank_rng"] = load_file(folder.rng(rank))
        return state

    # ------------------------------------------------------------------ export
    @staticmethod
    def export_safetensors(folder: "StepFolder | str", names=("model", "ema")) -> list:
        """Write ``<name>.safetensors`` beside each ``<name>.pt`` of a checkpoint folder (read with
        :func:`load_file`; tensors made contiguous and unshared, since safetensors stores no aliasing:
        tied weights are stored once per name).  Each file is written to a temporary name and
        renamed.  Returns the paths written."""
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("safetensors export needs the safetensors package: pip install safetensors") from None
        folder = folder if isinstance(folder, StepFolder) else StepFolder(folder)
        out = []
        for name in names:
            src = os.path.join(folder.path, f"{name}.pt")
            if not os.path.isfile(src):
                continue
            state = load_file(src)
            tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
            dst = folder.safetensors(name)
            tmp = dst + f".tmp-{os.getpid()}"
            save_file(tensors, tmp, metadata={"format": "pt", "source": f"{name}.pt"})
            os.replace(tmp, dst)
            out.append(dst)
        return out


def _read_latest(root: str, complete: bool = True) -> Optional[StepFolder]:
    """The folder ``<root>/latest`` names (None: no pointer, an empty or temporary name, or, with
    ``complete``, a folder without its trainer state)."""
    ptr = os.path.join(root, LATEST)
    if not os.path.isfile(ptr):
        return None
    with open(ptr) as f:
        name = f.read().strip()
    if not name or name.startswith(TMP_PREFIX) or os.sep in name:
        return None
    folder = StepFolder(os.path.join(root, name))
    if complete and not folder.is_complete():
        return None
    return folder


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # plain types only (weights_only)
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
