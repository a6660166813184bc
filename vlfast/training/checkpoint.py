"""Atomic checkpoints: ``<out>/checkpoints/step_<N>/`` plus a ``latest`` pointer file.

A checkpoint is written into ``checkpoints/.tmp-step_<N>-<pid>/`` and renamed into
place with :func:`os.replace`; ``latest`` (holding the directory name) is updated by
writing ``latest.tmp-<pid>`` and renaming it.  A crash at any point leaves either the
previous complete checkpoint or the new one; leftover ``.tmp-*`` entries are ignored
and removed by :func:`clean_tmp`.

Every file is read by :func:`load_file`: ``torch.load(..., weights_only=True)``, so a
checkpoint from elsewhere cannot run code when it is loaded (a pickle that would call a
function is refused with :class:`CheckpointError`).  What is saved is therefore only
tensors and plain containers of numbers and strings: the NumPy RNG state is stored as a
tensor (:func:`rng_state`).
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
STATE_FILE = "trainer_state.pt"


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


def export_safetensors(step_dir: str, names=("model", "ema")) -> list:
    """Write ``<name>.safetensors`` beside each ``<name>.pt`` of a checkpoint folder (read with
    :func:`load_file`; tensors made contiguous and unshared, since safetensors stores no aliasing:
    tied weights are stored once per name).  Each file is written to a temporary name and
    renamed.  Returns the paths written."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("safetensors export needs the safetensors package: pip install safetensors") from None
    out = []
    for name in names:
        src = os.path.join(step_dir, f"{name}.pt")
        if not os.path.isfile(src):
            continue
        state = load_file(src)
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        dst = os.path.join(step_dir, f"{name}.safetensors")
        tmp = dst + f".tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": "pt", "source": f"{name}.pt"})
        os.replace(tmp, dst)
        out.append(dst)
    return out


def ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


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


def clean_tmp(out_dir: str) -> list:
    """Remove partial checkpoints / pointer files left by a crash; returns their names."""
    root = ckpt_root(out_dir)
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX) or name.startswith(LATEST + ".tmp"):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
            removed.append(name)
    return removed


def save_checkpoint(out_dir: str, step: int, engine, trainer_state: dict, ema=None, args: Optional[dict] = None) -> str:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; returns its path.

    With several ranks (``engine.world_size > 1``) every rank calls this: all write their
    part (``engine.save``) into one shared ``.tmp-step_N-dist`` directory; after a barrier
    rank 0 writes the trainer state and renames the directory into place, then a final
    barrier.  The trainer state (RNG) is rank 0's.

    ``ema``: a :class:`vlfast.nn.EMA`, written by rank 0 to ``ema.pt``; a
    :class:`vlfast.distributed.ZeroEMA` (ZeRO-3) is gathered with ``full_state_dict()`` (every rank
    takes part, one parameter at a time; only rank 0 keeps the tensors, on the CPU).
    """
    root = ckpt_root(out_dir)
    name = f"step_{step}"
    rank, world = int(getattr(engine, "rank", 0)), int(getattr(engine, "world_size", 1))
    barrier = getattr(engine, "barrier", lambda: None)
    suffix = "dist" if world > 1 else str(os.getpid())
    tmp = os.path.join(root, f"{TMP_PREFIX}{name}-{suffix}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    if world > 1:
        barrier()
    engine.save(tmp)
    if world > 1:
        barrier()
    final = os.path.join(root, name)
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
        torch.save(ema_state, os.path.join(tmp, "ema.pt"))
    state = dict(trainer_state)
    state["step"] = step
    state["rng"] = rng_state()
    state["args"] = args or {}
    torch.save(state, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump({"step": step, "args": args or {}}, f, indent=1, default=str)
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. the final save after save-every)
        old = os.path.join(root, f"{TMP_PREFIX}old-{name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    ptr_tmp = os.path.join(root, f"{LATEST}.tmp-{os.getpid()}")
    with open(ptr_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(ptr_tmp, os.path.join(root, LATEST))
    _fsync_dir(root)
    if world > 1:
        barrier()
    return final


def find_latest(out_dir: str) -> Optional[str]:
    """Path of the checkpoint ``latest`` points at, or None."""
    root = ckpt_root(out_dir)
    ptr = os.path.join(root, LATEST)
    if not os.path.isfile(ptr):
        return None
    with open(ptr) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not name or name.startswith(TMP_PREFIX) or not os.path.isfile(os.path.join(path, STATE_FILE)):
        return None
    return path


def load_checkpoint(path: str, engine, ema=None) -> dict:
    """Restore ``engine`` (and ``ema``) from ``path``; returns the trainer state (RNG not yet applied)."""
    engine.load(path)
    if ema is not None:
        ema_path = os.path.join(path, "ema.pt")
        if os.path.isfile(ema_path):
            # memory-mapped: a ZeroEMA copies just this rank's slices out of it
            ema_state = load_file(ema_path, mmap=True)
            ema.load_state_dict(ema_state)
            del ema_state
    return load_file(os.path.join(path, STATE_FILE))
