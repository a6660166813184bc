"""Helpers, constants and tile tables shared by vlfast's Triton kernels (one place for each).

* ``interpret()``: True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, read
  at every launch; this is ``vlfast._backend.triton_interpret``).
* Constants: ``LOG2E`` and ``LN2`` are host floats; ``LOG2E_C`` and ``LN2_C`` are the same values
  as ``tl.constexpr``, the only kind of global a ``@triton.jit`` function may read.  Kernels use
  base-2 exponentials: ``exp(x) = exp2(x * LOG2E)``, ``log(x) = log2(x) * LN2``.
* dtypes: ``TL_DTYPES`` (torch -> tl), ``compute_type`` (fp32 math unless a side is fp64),
  ``dtype_class`` (the ``dtype`` column of the tile tables), and the two constexprs of ``mma``:
  ``dot_precision`` (``DOT_PREC``: IEEE for fp32 inputs, TF32 when torch's fp32 matmul precision is
  "high" / "medium", see ``fp32_matmul_uses_tf32``) and ``upcast_dot`` (``UPCAST``).
* Device helpers: ``mma`` (``tl.dot`` with fp32 accumulation) and ``round_to`` (output rounding).
* Tiles: ``TileTable`` (one per kernel module, registered by name), ``INTERPRETER_TILES`` (the
  interpreter's tiles of every table, chosen here and nowhere else) and ``override_tiles``
  (a context manager for tests and tuning).  ``vlfast.kernels.tile_tables()`` lists the tables.
* Autotune (opt-in, ``VLFAST_AUTOTUNE=1``; off by default): ``autotune`` times a pruned set of
  candidates around the table's row on the first launch of each (table, kind, dtype, shape key)
  and keeps the fastest; ``tuned_tiles()`` lists the choices, ``clear_tuned()`` forgets them.
"""

import contextlib
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vlfast._backend import triton_interpret as interpret


# ----------------------------------------------------------------------------- interpreter fix
def _fix_interpreter_index() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` numpy-2.4-proof; True when a fix was applied.

    Triton <= 3.6's interpreter converts a scalar tensor to a Python int with ``int(handle.data)``,
    a 1-element 1-D numpy array, which numpy >= 2.4 refuses ("TypeError: only 0-dimensional arrays
    can be converted to Python scalars"; 1.25-2.3 warn), so every ``range(0, Nk, BLOCK_N)`` over a runtime bound
    fails.  triton-lang/triton#9171, fixed in 3.7 by #9172 (``int(handle.data.squeeze())``): a probe
    of the interpreter's own patch decides, and the fix re-sets ``__index__`` exactly as #9172 does.
    """
    import warnings

    import numpy as np
    from triton.runtime import interpreter as ti

    original = getattr(ti, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_vlfast_index_fix", False):
        return False

    class _Probe:
        pass

    class _Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    original(_Probe, _Scope())
    probe = _Probe()
    probe.handle = ti.TensorHandle(np.array([3], dtype=np.int32), tl.int32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)   # numpy 1.25-2.3 warns, then converts
            if probe.__index__() == 3:
                return False
    except (TypeError, DeprecationWarning):
        pass

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._vlfast_index_fix = True
    ti._patch_lang_tensor = _patch_lang_tensor
    return True


if interpret():
    _fix_interpreter_index()

# ----------------------------------------------------------------------------- constants
LOG2E = 1.4426950408889634     # log2(e)
LN2 = 0.6931471805599453       # ln(2) = 1 / log2(e)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)

# ----------------------------------------------------------------------------- dtypes
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def compute_type(*dtypes: torch.dtype):
    """The ``tl`` type elementwise kernels compute in: fp64 when any side is fp64, else fp32."""
    return TL_DTYPES[torch.float64 if torch.float64 in dtypes else torch.float32]


def dtype_class(dtype: torch.dtype) -> str:
    """The ``dtype`` key of the tile tables: ``"fp32"``, ``"fp16/bf16"`` (2-byte) or ``"fp64"``."""
    if dtype in (torch.float16, torch.bfloat16):
        return "fp16/bf16"
    if dtype == torch.float32:
        return "fp32"
    if dtype == torch.float64:
        return "fp64"
    raise TypeError(f"no tile class for dtype {dtype}")


def fp32_matmul_uses_tf32() -> bool:
    """True when torch lets fp32 matmuls use TF32 tensor cores: ``torch.set_float32_matmul_precision``
    is ``"high"`` or ``"medium"`` (or, equivalently, ``torch.backends.cuda.matmul.allow_tf32 = True``).

    Read where cuBLAS reads it: torch >= 2.9 keeps the setting as
    ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"`` or ``"ieee"``), which the legacy
    setters write too, and which does not raise when a program mixes the legacy and the new API
    (``torch.get_float32_matmul_precision()`` then does); older torch: the legacy getter.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return torch.get_float32_matmul_precision() in ("high", "medium")


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PREC`` of ``mma`` for inputs of ``dtype``, read at every launch.

    fp32 inputs: IEEE fp32 dots (FMA, no tensor cores) by default; TF32 tensor-core dots (inputs
    rounded to a 10-bit mantissa, fp32 accumulation) when the program opted in to TF32 for its own
    fp32 matmuls, ``torch.set_float32_matmul_precision("high")`` or ``"medium"``
    (``fp32_matmul_uses_tf32``); ``"highest"`` (torch's default) restores IEEE.  The value is a
    ``tl.constexpr``: TF32 and IEEE are two compiled kernels, with tiles of their own (the tile
    tables' ``"tf32"`` rows, else their ``"fp32"`` ones: ``tile_classes``).  fp16/bf16 inputs:
    tensor cores whatever the setting (the value is then irrelevant to ``tl.dot``).  Triton's CPU
    interpreter ignores the precision (numpy fp32 products): it does not emulate TF32's rounding,
    so the interpreter's results are IEEE ones either way; the TF32 error is measured on a GPU
    (``tests/kernels/test_tf32.py``).
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if fp32_matmul_uses_tf32() else "ieee"


def tile_classes(dtype: torch.dtype) -> Tuple[str, ...]:
    """The ``dtype`` cells of the tile tables that serve inputs of ``dtype``, in order of preference:
    ``("tf32", "fp32")`` for fp32 inputs whose dots run in TF32 (``dot_precision`` is ``"tf32"``:
    tensor-core tiles where a table has ``"tf32"`` rows for the kind, its fp32 rows otherwise),
    else ``(dtype_class(dtype),)``."""
    if dtype == torch.float32 and dot_precision(dtype) == "tf32":
        return ("tf32", "fp32")
    return (dtype_class(dtype),)


def upcast_dot(dtype: torch.dtype) -> bool:
    """``UPCAST`` of ``mma``: bf16 in the interpreter, whose ``tl.dot`` multiplies bf16's raw uint16 storage."""
    return dtype == torch.bfloat16 and interpret()


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation (``acc`` may be None).

    UPCAST (bf16 in the interpreter only, see ``upcast_dot``) widens the operands first, which
    gives the same products as the GPU's bf16 MMA (bf16 x bf16 is exact in fp32).
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def round_to(x, OUT_BF16: tl.constexpr, out_ty: tl.constexpr):
    """Cast an fp32/fp64 value to ``out_ty`` with round-to-nearest-even.

    bf16 is rounded with integer arithmetic on the fp32 bits (NaN kept quiet), so the
    result is the same on GPUs and in the Triton CPU interpreter (which truncates).
    ``OUT_BF16`` must be ``out_ty == tl.bfloat16``.
    """
    if OUT_BF16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x32 != x32, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)


# ----------------------------------------------------------------------------- tile tables
# The interpreter's tiles, for every table (the one place they are chosen).  The interpreter runs
# each program in numpy, so small tiles keep the tests fast; they are not a GPU choice.  An entry
# replaces those values of the row that the GPU would use.
INTERPRETER_TILES: Dict[str, Dict[str, Dict[str, int]]] = {
    "attention": {
        "fwd": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_preprocess": dict(BLOCK_M=16),
        "bwd_kv": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "bwd_q": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
        "dropout_mask": dict(BLOCK_M=32, BLOCK_N=64),
    },
    "contrastive": {
        "fwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, num_warps=4, num_stages=1),
        "bwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, num_warps=4, num_stages=1),
        "combine": dict(BLOCK_M=16),
    },
}

_TABLES: Dict[str, "TileTable"] = {}
_OVERRIDES: Dict[Tuple[str, str], Dict[str, int]] = {}


class TileTable:
    """The tile choices of one kernel module, as data (one table per module, registered by name).

    ``rows`` are tuples over ``columns``; the first ``len(keys)`` columns are the keys:

    * ``kind``: which launch; ``kernels`` maps every kind to the ``@triton.jit`` kernels it sizes;
    * ``dtype``: ``dtype_class`` of the inputs (``"fp32"``, ``"fp16/bf16"``, ``"fp64"``) or ``"any"``;
      ``"tf32"`` rows serve fp32 inputs with TF32 dots (``tile_classes``), which fall back to the
      kind's ``"fp32"`` rows where it has no ``"tf32"`` row;
    * the table's own keys: a ``max_<NAME>`` cell matches a query ``NAME`` that is <= the cell, any
      other key cell a query equal to it; a ``None`` cell matches every query.

    The first matching row wins.  The remaining columns are tile values (``BLOCK_*`` constexprs and
    the ``num_warps`` / ``num_stages`` launch options); ``None`` means the kind does not use it
    (Triton's default for a launch option).  ``lookup`` starts from that row, applies
    ``INTERPRETER_TILES[name][kind]`` when the interpreter runs the kernels, then ``override_tiles``.
    """

    def __init__(self, name: str, doc: str, kernels: Mapping[str, Sequence[str]],
                 keys: Sequence[str], values: Sequence[str], rows: Sequence[tuple]):
        if tuple(keys[:2]) != ("kind", "dtype"):
            raise ValueError(f"tile table {name}: the first keys must be kind and dtype, got {tuple(keys)}")
        self.name = name
        self.doc = doc
        self.kernels = {kind: tuple(ks) for kind, ks in kernels.items()}
        self.keys = tuple(keys)
        self.values = tuple(values)
        self.columns = self.keys + self.values
        self.rows = tuple(tuple(r) for r in rows)
        for r in self.rows:
            if len(r) != len(self.columns):
                raise ValueError(f"tile table {name}: row {r} does not have the columns {self.columns}")
            if r[0] not in self.kernels:
                raise ValueError(f"tile table {name}: row {r} has an unknown kind (kinds: {tuple(self.kernels)})")
        missing = [k for k in self.kernels if not any(r[0] == k for r in self.rows)]
        if missing:
            raise ValueError(f"tile table {name}: no row for the kinds {missing}")
        self.interpreter = {kind: dict(v) for kind, v in INTERPRETER_TILES.get(name, {}).items()}
        for kind, vals in self.interpreter.items():
            self._check_values(kind, vals)
        _TABLES[name] = self

    def _check_values(self, kind: str, vals: Mapping[str, int]) -> None:
        if kind not in self.kernels:
            raise ValueError(f"tile table {self.name} has no kind {kind!r} (kinds: {', '.join(self.kernels)})")
        for col, v in vals.items():
            if col not in self.values:
                raise ValueError(f"tile table {self.name} has no tile value {col!r} (values: {', '.join(self.values)})")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{self.name}.{kind}.{col} must be a positive int, got {v!r}")
            if col.startswith("BLOCK") and v & (v - 1):
                raise ValueError(f"{self.name}.{kind}.{col} must be a power of two, got {v}")

    def _matches(self, row: tuple, kind: str, dtype: Optional[str], query: Mapping[str, int]) -> bool:
        if row[0] != kind or row[1] not in ("any", dtype):
            return False
        for key, cell in zip(self.keys[2:], row[2:len(self.keys)]):
            if cell is None:
                continue
            name = key[4:] if key.startswith("max_") else key
            if name not in query:
                raise TypeError(f"{self.name} tiles of kind {kind!r} are looked up by {name}=, which is missing")
            if (query[name] > cell) if key.startswith("max_") else (query[name] != cell):
                return False
        return True

    def query_names(self) -> Tuple[str, ...]:
        """The keyword arguments ``lookup`` may need besides ``kind`` and ``dtype``."""
        return tuple(k[4:] if k.startswith("max_") else k for k in self.keys[2:])

    def lookup(self, kind: str, dtype: Optional[torch.dtype] = None, *, gpu: bool = False,
               **query) -> Dict[str, Optional[int]]:
        """``{value column: tile}`` for launch ``kind`` on inputs of ``dtype`` (``query``: the other keys).

        ``dtype`` and a key may be left out where the kind's rows do not depend on them ("any" / None).
        ``gpu=True`` gives the GPU rows even under the interpreter (the launch-plan account).
        """
        if kind not in self.kernels:
            raise ValueError(f"tile table {self.name} has no kind {kind!r} (kinds: {', '.join(self.kernels)})")
        unknown = set(query) - set(self.query_names())
        if unknown:
            raise TypeError(f"{self.name} tiles are looked up by kind, dtype and "
                            f"{', '.join(self.query_names()) or 'nothing else'}, not {', '.join(sorted(unknown))}")
        classes = (None,) if dtype is None else tile_classes(dtype)
        out = next((dict(zip(self.values, row[len(self.keys):])) for dc in classes for row in self.rows
                    if self._matches(row, kind, dc, query)), None)
        if out is None:
            raise ValueError(f"tile table {self.name}: no row for kind={kind}, dtype={'/'.join(map(str, classes))}, "
                             f"{query}")
        if interpret() and not gpu:
            out.update(self.interpreter.get(kind, {}))
        out.update(_OVERRIDES.get((self.name, kind), {}))
        return out

    def format(self) -> list:
        """The table as aligned text lines (for ``vlfast info``)."""
        cells = [list(self.columns)] + [["-" if c is None else str(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        for kind, vals in self.interpreter.items():
            lines.append(f"interpreter {kind}: " + ", ".join(f"{k}={v}" for k, v in vals.items()))
        return lines

    def __repr__(self) -> str:
        return f"TileTable({self.name!r}, kinds={tuple(self.kernels)}, {len(self.rows)} rows)"


def registered_tables() -> Dict[str, TileTable]:
    """The tile tables of the kernel modules imported so far, by name."""
    return dict(_TABLES)


@contextlib.contextmanager
def override_tiles(table: str, **kinds: Mapping[str, int]):
    """Force tile values of one table inside a ``with`` block (tests and tuning).

    ``with override_tiles("attention", fwd=dict(BLOCK_M=64, BLOCK_N=32)): ...`` makes every lookup
    of that kind return those values, on the GPU and in the interpreter alike.  Blocks nest (the
    inner value wins) and are undone on exit.  ``table`` is a registered table (import its kernel
    module first); unknown kinds or columns, and ``BLOCK_*`` values that are not powers of two,
    raise ValueError.  A process-wide setting: not for concurrent threads.
    """
    if table not in _TABLES:
        raise ValueError(f"unknown tile table {table!r} (registered: {', '.join(sorted(_TABLES)) or 'none'}; "
                         f"import its vlfast.kernels module first)")
    t = _TABLES[table]
    for kind, vals in kinds.items():
        if not isinstance(vals, Mapping):
            raise TypeError(f"override_tiles: {kind}= must be a mapping of tile values, got {type(vals).__name__}")
        t._check_values(kind, vals)
    saved = {k: dict(v) for k, v in _OVERRIDES.items()}
    try:
        for kind, vals in kinds.items():
            _OVERRIDES[(table, kind)] = {**_OVERRIDES.get((table, kind), {}), **vals}
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


# ----------------------------------------------------------------------------- autotune (opt-in)
Tiles = Dict[str, Optional[int]]
_TUNED: Dict[tuple, Tiles] = {}
_TUNE_LOG: Dict[tuple, List[Tuple[Tiles, Optional[float]]]] = {}
AUTOTUNE_ENV = "VLFAST_AUTOTUNE"


def env_flag(name: str) -> bool:
    """An on/off environment switch: 1 / true / yes / on, or unset / empty / 0 / false / no / off
    (anything else is a ValueError naming the variable)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {os.environ[name]!r}")


def autotune_enabled() -> bool:
    """``VLFAST_AUTOTUNE`` is on (``env_flag``, read at every launch)."""
    return env_flag(AUTOTUNE_ENV)


def tune_candidates(table: "TileTable", kind: str, base: Mapping[str, Optional[int]],
                    dtype: Optional[torch.dtype] = None, limits: Optional[Mapping[str, int]] = None,
                    prune: Optional[Callable[[Tiles], bool]] = None) -> List[Tiles]:
    """The pruned search space around ``base`` (the row ``lookup`` gave): ``base`` first, then each
    tile of the table's other rows of ``kind`` (and ``dtype``'s class) and every one-step neighbour
    of ``base`` (one ``BLOCK_*`` halved or doubled, ``num_warps`` 4 <-> 8, ``num_stages`` -1 / +1),
    without duplicates.  ``BLOCK_*`` stay powers of two in [16, ``limits[col]``] (default 256),
    ``num_stages`` in [1, 4]; ``prune(cand)`` False drops a candidate (a kernel's own rules, e.g.
    >= 64 rows per warpgroup for wgmma).  Columns ``base`` has as None stay None."""
    limits = dict(limits or {})
    dcs = () if dtype is None else tile_classes(dtype)
    out: List[Tiles] = []

    def add(c):
        c = {k: c.get(k, base[k]) if base[k] is not None else None for k in base}
        for col, v in c.items():
            if v is None:
                continue
            if col.startswith("BLOCK") and not (16 <= v <= limits.get(col, 256)):
                return
            if col == "num_stages" and not 1 <= v <= 4:
                return
            if col == "num_warps" and v not in (4, 8):
                return
        if c not in out and (prune is None or not out or prune(c)):
            out.append(c)

    add(dict(base))
    for row in table.rows:
        if row[0] == kind and row[1] in ("any", *dcs):
            add(dict(zip(table.values, row[len(table.keys):])))
    for col, v in base.items():
        if v is None:
            continue
        if col.startswith("BLOCK"):
            steps = (v // 2, v * 2)
        elif col == "num_warps":
            steps = (8 if v == 4 else 4,)
        else:
            steps = (v - 1, v + 1)
        for s in steps:
            add({**base, col: s})
    return out


def _time_once(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(run, warmup=5, rep=20))
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def autotune(table: "TileTable", kind: str, dtype: torch.dtype, key: tuple, base: Mapping[str, Optional[int]],
             run: Callable[[Tiles], None], device: torch.device, **space) -> Tiles:
    """The tiles for one launch: ``base`` unless ``VLFAST_AUTOTUNE`` is on; then the fastest of
    ``tune_candidates(table, kind, base, dtype, **space)`` for this ``key`` (the launcher's shape
    bucket and flags), timed once per process (``triton.testing.do_bench`` on CUDA, one wall-clock
    run elsewhere) and cached.

    ``run(tiles)`` launches the kernel with those tiles; it must be repeatable (the launcher resets
    what it accumulates before its real launch, which follows with the chosen tiles).  A
    candidate that does not fit the device (``triton.runtime.errors.OutOfResources``) is skipped
    and recorded; ``base`` itself must run.  ``override_tiles`` wins over tuning (tests pin tiles).
    """
    if not autotune_enabled() or _OVERRIDES.get((table.name, kind)):
        return dict(base)
    ck = (table.name, kind, tile_classes(dtype)[0], key)   # TF32 tunes apart from IEEE fp32
    if ck in _TUNED:
        return dict(_TUNED[ck])
    from triton.runtime.errors import OutOfResources

    log: List[Tuple[Tiles, Optional[float]]] = []
    for i, cand in enumerate(tune_candidates(table, kind, base, dtype, **space)):
        try:
            log.append((cand, _time_once(lambda c=cand: run(c), device)))
        except OutOfResources:
            if i == 0:
                raise
            log.append((cand, None))            # does not fit this device: skipped, recorded
    best = min((x for x in log if x[1] is not None), key=lambda x: x[1])[0]
    _TUNED[ck] = dict(best)
    _TUNE_LOG[ck] = log
    return dict(best)


def tuned_tiles() -> Dict[tuple, Dict[str, object]]:
    """``{(table, kind, dtype class, key): {"tiles": chosen, "timings": [(candidate, ms or None), ...]}}``
    (None: the candidate did not fit the device)."""
    return {k: {"tiles": dict(v), "timings": list(_TUNE_LOG.get(k, []))} for k, v in _TUNED.items()}


def clear_tuned() -> None:
    """Forget every tuned choice (the next launch of each key tunes again)."""
    _TUNED.clear()
    _TUNE_LOG.clear()
