"""``vlfast train --fsdp``: :class:`FSDPEngine`, PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

* **Sharding** (:func:`shard_model`): over a 1-D device mesh of the data-parallel ranks (gloo on the
  CPU, NCCL on CUDA), ``fully_shard`` each transformer block -- every child of every ``nn.ModuleList``
  of the model (the towers' ``blocks`` / ``resblocks`` / ``layer`` lists; the momentum copies' lists
  too, so a momentum network is sharded exactly like its online network) -- then the root (the
  remaining parameters: embeddings, norms, heads).  0-dim parameters (CLIP's ``logit_scale``, ALBEF's
  ``itc.temp``), which ``fully_shard`` refuses, stay replicated outside FSDP; :meth:`FSDPEngine.step`
  averages their gradients over the ranks (the data-parallel convention FSDP applies to the others).
* ``--precision bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` -- the sharded
  parameters (and AdamW's state) stay fp32, FSDP all-gathers them in bf16 and reduce-scatters the
  gradients in fp32 -- plus ``torch.autocast(bf16)`` for the forward, as the other engines, so the
  replicated fp32 parameters and buffers (ITC queues, temperatures) meet bf16 activations safely.
  ``fp16`` is refused (it would need a sharded gradient scaler).
* **Contrastive negatives**: the models gather features over the default process group
  (:mod:`vlfast.comm`, gradients summed back to their rows), which is the data-parallel group here;
  with FSDP's gradient averaging every step computes the single-process step on the global batch.
* **Momentum encoders and EMA**: the models' momentum updates are hoisted into a forward pre-hook that
  runs before FSDP's (while every parameter is a sharded DTensor) and average the local shards
  (:class:`vlfast.nn.MomentumEncoder`, :func:`vlfast.sharding.dtensor_momentum_update_`); ``--ema``'s
  :class:`vlfast.nn.EMA` of the sharded model averages this rank's shards -- no gather, no broadcast.
* **Checkpoints** (inside :mod:`vlfast.training.checkpoint`'s atomic folders): ``dcp/`` holds the
  model and optimizer through ``torch.distributed.checkpoint`` (each rank writes its shards; loading
  reshards); ``model.pt`` is the full state dict gathered on rank 0 for export, as the other engines
  write it; ``rng_rank<r>.pt`` each rank's random streams (several ranks); ``momentum_masters_rank<r>.pt``
  fp32 masters of low-precision momentum shards (only for a model whose parameters are themselves bf16).
* **Safe loading**: DCP's ``FileSystemReader.read_metadata`` reads its ``.metadata`` file with a plain
  ``pickle.load`` and ``DefaultLoadPlanner.load_bytes`` reads non-tensor entries with
  ``torch.load(weights_only=False)`` (torch 2.14): both would run code planted in a checkpoint.  Here
  the metadata goes through :class:`SafeFileSystemReader`'s unpickler, which only resolves DCP's own
  metadata classes, torch's dtypes / sizes / layouts and pathlib paths (anything else -- what a pickle
  needs to call code -- is refused with one error line), and non-tensor entries
  through :class:`SafeLoadPlanner` (``torch.load(weights_only=True)``); tensors DCP reads with
  ``weights_only=True`` already.

Multi-node: torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m vlfast.training.trainer --model clip_vit_b16 --fsdp --precision bf16 --batch-size 4096
"""

import io
import os
import pickle
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .engine import Engine, TrainError, default_rank_env
from .optim import param_groups

__all__ = ["FSDPEngine", "shard_model", "transformer_blocks", "init_process_group", "SafeFileSystemReader",
           "SafeLoadPlanner"]



# --------------------------------------------------------------------------- process group, sharding
def init_process_group(device: torch.device) -> None:
    """The default process group from the launcher's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
    (``vlfast train --nproc`` and torchrun set them; a lone process gets a 1-rank group): gloo on the CPU,
    NCCL on CUDA."""
    default_rank_env()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method="env://")


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """Every child of every ``nn.ModuleList`` of ``model``, outermost lists first (a list inside a block
    belongs to that block), in ``named_modules`` order."""
    out: List[nn.Module] = []

    def walk(mod: nn.Module) -> None:
        for child in mod.children():
            if isinstance(child, nn.ModuleList):
                out.extend(child)
            else:
                walk(child)

    walk(model)
    return out


def _scalar_params(model: nn.Module) -> set:
    return {p for p in model.parameters() if p.dim() == 0}


def shard_model(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each of :func:`transformer_blocks` and then ``model`` on ``mesh`` (1-D), with
    ``mp_policy`` (a ``MixedPrecisionPolicy``); 0-dim parameters are left out (replicated, see the module
    docstring).  A model with a ``momentum_update(*forward_args)`` method (MoCo, ALBEF) gets it hoisted
    into a forward pre-hook that runs before FSDP's (:func:`vlfast.distributed.zero.hoist_momentum_updates`),
    so its momentum encoders average sharded parameters.  Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vlfast.distributed.zero import hoist_momentum_updates

    if mesh.ndim != 1:
        raise ValueError(f"shard_model takes a 1-D (data-parallel) mesh, got {mesh.ndim} dimensions")
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    ignored = _scalar_params(model)
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored)
    model._vlfast_replicated = [p for p in model.parameters() if p in ignored]  # noqa: SLF001 - ours
    if callable(getattr(model, "momentum_update", None)):
        hoist_momentum_updates(model)  # registered after fully_shard with prepend=True: runs first
    return model


# --------------------------------------------------------------------------- safe DCP loading
def _allowed_metadata_global(module: str, name: str):
    """What DCP's ``.metadata`` pickle may name: DCP's metadata / storage classes and torch's plain types."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    if module == md.__name__ and isinstance(getattr(md, name, None), type):
        return getattr(md, name)
    if module == fs.__name__ and name == "_StorageInfo":
        return fs._StorageInfo
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                        torch.memory_format)):
        return getattr(torch, name)
    if module == "torch.serialization" and name == "_get_layout":  # a name -> torch.layout lookup
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        import pathlib

        return getattr(pathlib, name)  # StorageMeta.checkpoint_id: a path built from strings
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        obj = _allowed_metadata_global(module, name)
        if obj is None:
            raise ckpt.CheckpointError(f"refusing to load {self._path}: the DCP metadata names {module}.{name}, "
                                       "which is not one of DCP's metadata classes (a crafted checkpoint?)")
        return obj


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        """``FileSystemReader`` whose ``read_metadata`` resolves only DCP's metadata classes (module docstring)."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f, str(path)).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
                    raise ckpt.CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
            if not isinstance(metadata, Metadata):
                raise ckpt.CheckpointError(f"refusing to load {path}: it holds a {type(metadata).__name__}, "
                                           "not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader


def _safe_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _SafeLoadPlanner(DefaultLoadPlanner):
        """``DefaultLoadPlanner`` reading non-tensor entries with ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise ckpt.CheckpointError(f"refusing to load DCP entry {read_item.dest_index.fqn!r}: not plain "
                                           f"data (read with weights_only=True; {str(exc).splitlines()[0]})") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what DCP's own uses

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafeLoadPlanner


def SafeFileSystemReader(path: str):  # noqa: N802 - a class factory (DCP imported on use)
    """A DCP ``FileSystemReader`` for ``path`` that unpickles no code (see the module docstring)."""
    return _safe_reader_class()(path)


def SafeLoadPlanner():  # noqa: N802
    """A DCP ``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""
    return _safe_planner_class()()


# --------------------------------------------------------------------------- the engine
class FSDPEngine(Engine):
    """FSDP2 data parallelism over every rank of the default process group (see the module docstring).

    ``model`` is the sharded network (call it for the forward); AdamW over the param groups of
    :func:`vlfast.training.optim.param_groups`; ``save``/``load`` are collective (every rank calls them).
    """

    def __init__(self, model: nn.Module, *, lr: float, precision: str = "fp32", device=None,
                 weight_decay: float = 0.05, grad_clip: float = 0.0):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not (dist.is_available() and dist.is_initialized()):
            raise TrainError("FSDPEngine needs an initialized process group (vlfast.training.fsdp.init_process_group)")
        if precision not in ("fp32", "bf16"):
            raise TrainError(f"--fsdp supports --precision fp32 and bf16, not {precision}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision
        self.grad_clip = float(grad_clip)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        self.model = shard_model(model, self.mesh, mp_policy=policy)
        self.module = self.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, weight_decay), lr=lr)

    def barrier(self) -> None:
        dist.barrier()

    def backward(self, loss, boundary: bool = True):
        # accumulation: gradients stay unsharded and unreduced until the last micro-batch's backward
        self.model.set_requires_gradient_sync(boundary)
        loss.backward()

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def _average_replicated_grads(self) -> None:
        """Average the gradients of the parameters FSDP does not manage (0-dim ones) over the ranks."""
        grads = [p.grad for p in getattr(self.model, "_vlfast_replicated", ()) if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view(g.shape))

    @torch.no_grad()
    def _clip(self) -> None:
        """``clip_grad_norm_``'s formula over sharded (DTensor) and replicated gradients together: the global
        norm from every rank's local squares (one all_reduce), each gradient times ``min(1, max / (norm + 1e-6))``."""
        from vlfast.sharding import is_dtensor, local_tensor

        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return
        sharded = [local_tensor(g).float() for g in grads if is_dtensor(g)]
        plain = [g.float() for g in grads if not is_dtensor(g)]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in sharded:
            sq += g.pow(2).sum()
        if self.world_size > 1:
            dist.all_reduce(sq)
        for g in plain:  # replicated: the same on every rank, counted once
            sq += g.pow(2).sum()
        coef = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            local_tensor(g).mul_(coef.to(g.dtype))

    def step(self):
        self._average_replicated_grads()
        if self.grad_clip > 0:
            self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _dcp_state(self) -> dict:
        """What DCP saves / loads in place: the model's own ``state_dict()`` (DTensor shards sharing the
        parameters' storage; the models' state-dict hooks, e.g. MoCo's ``momentum_encoder.*`` keys, apply,
        which DCP's ``get_model_state_dict`` does not allow) and the optimizer state keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": self.model.state_dict(), "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """``model.state_dict()`` with full tensors on the CPU on rank 0 (``{}`` elsewhere): each DTensor is
        all-gathered in turn (collective: every rank calls this)."""
        from vlfast.sharding import is_dtensor

        out = {}
        for k, v in self.model.state_dict().items():
            if is_dtensor(v):
                v = v.full_tensor()
            if self.rank == 0:
                out[k] = v.detach().to("cpu", copy=True)
        return out

    def save(self, folder):
        import torch.distributed.checkpoint as dcp

        folder = ckpt.StepFolder(folder)
        dcp.save(self._dcp_state(), storage_writer=dcp.FileSystemWriter(folder.dcp))
        self.save_rank_state(folder)
        full = self.full_state_dict()
        if self.rank == 0:  # collective above; rank 0 holds the full tensors
            torch.save(full, folder.model)

    def load(self, folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        folder = ckpt.StepFolder(folder)
        if not os.path.isdir(folder.dcp):
            raise TrainError(f"no FSDP (DCP) checkpoint in {folder.path} (was it written by another engine?)")
        state = self._dcp_state()
        reader = SafeFileSystemReader(folder.dcp)
        reader.read_metadata()  # on every rank first: a refused file is one CheckpointError, not DCP's wrapping
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        except CheckpointException as exc:  # DCP wraps every rank's failure (a BaseException)
            causes = [e for e in _exceptions(exc) if isinstance(e, ckpt.CheckpointError)]
            if causes:
                raise causes[0] from None
            raise
        # the model's tensors were loaded in place; the optimizer's state goes back through DCP's mapping
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optim"])
        self.load_momentum_masters(folder)


def _exceptions(exc: BaseException):
    """The per-rank exceptions inside DCP's ``CheckpointException`` (``failures``: rank -> (exception,
    traceback)), plus ``exc`` itself."""
    out = [exc]
    for v in getattr(exc, "failures", {}).values():
        inner = v[0] if isinstance(v, tuple) and v else v
        if isinstance(inner, BaseException):
            out.append(inner)
    return out
