"""Benchmark harness for vlfast ops (``vlfast.bench.harness``).

Each op has a module in this package (named in :data:`MODULES`) with one or more
functions decorated by :func:`register`; such a function takes ``(device, quick)``
and yields :class:`Case` objects. A case holds the callables to time
(``providers``), which of them are the baselines (eager PyTorch formulas the
kernels replace) and which are the vlfast candidates.

``main(argv)`` (also ``vlfast bench ...`` and ``python -m vlfast.bench.harness``)
times every provider of every case, prints a table, appends one JSON line per
measurement to ``<out>/<device-slug>.jsonl`` and draws ``<out>/<device-slug>.png``.

Timing: on CUDA ``triton.testing.do_bench`` (median, L2 flushed between runs;
CUDA events when triton is missing); on CPU ``torch.utils.benchmark.Timer
.blocked_autorange`` (median over blocks). Both keep at least ``MIN_RUNS`` runs.
For memory-bound cases (``bytes_moved`` given) the achieved GB/s is reported
together with its fraction of the device's copy bandwidth, measured once per run
with ``dst.copy_(src)`` on a large buffer (bytes = read + write).
A provider wrapped in :class:`SelfTimed` is not timed by the harness: it measures
itself (e.g. several ranks of a distributed run, in subprocesses) and returns a
:class:`Measured`; its row and speedups are then formed exactly as for a timed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "MODULES",
    "Case",
    "Measured",
    "SelfTimed",
    "Result",
    "register",
    "registered_ops",
    "load_modules",
    "time_fn",
    "measure_copy_bandwidth",
    "run_metadata",
    "compute_speedups",
    "format_table",
    "write_jsonl",
    "write_plot",
    "default_out_dir",
    "device_slug",
    "main",
]

#: Benchmark modules of this package, imported as ``<this package>.<name>``.
#: A name containing a dot is imported as an absolute module name instead.
MODULES: list[str] = ["ema", "masking", "attention", "contrastive", "models", "dropin", "zero", "data"]

# Timing knobs: (cuda warmup ms, cuda rep ms, cpu min_run_time s, min runs).
_TIMING = {False: (25, 100, 0.5, 5), True: (5, 20, 0.05, 3)}
# Copy-bandwidth reference buffer (bytes).
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
_COPY_BYTES_QUICK = 32 << 20

CaseFn = Callable[[torch.device, bool], Iterable["Case"]]
_REGISTRY: dict[str, list[CaseFn]] = {}


@dataclass
class Case:
    """One benchmark configuration of one op.

    ``providers`` maps a provider name to a zero-argument callable that does the
    work once (and returns nothing), or to a :class:`SelfTimed` that measures the
    work itself when the case is run. ``baselines`` / ``candidates`` name entries of
    ``providers``: every measured provider gets a speedup against each baseline.
    ``unavailable`` maps a provider name that cannot run here to the reason; it is
    reported as a row, not timed. ``setup_each`` (optional) is called once before
    each provider is measured, to reset state the providers mutate.
    """

    op: str
    name: str
    shape: str
    dtype: str
    providers: dict[str, Callable[[], Any]]
    baselines: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    bytes_moved: int | None = None
    flops: int | None = None
    setup_each: Callable[[], Any] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    targets: list["Target"] = field(default_factory=list)
    #: items processed per call (e.g. the batch size): adds an ``items/s`` column
    items: int | None = None
    #: fewest timed runs (default: the harness's); slow cases (seconds per call) lower it
    min_runs: int | None = None
    #: per-provider extra measurements made by the case itself (e.g. {"vlfast": {"peak_mb": 12.5}})
    extra: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Measured:
    """A time measured by a provider itself (returned by :class:`SelfTimed`'s ``measure``).

    ``ms``: the median time of one call, in milliseconds; ``runs``: how many timed
    calls that median is over; ``extra``: further figures for the row (like
    :attr:`Case.extra`).
    """

    ms: float
    runs: int
    extra: dict[str, float] = field(default_factory=dict)


class SelfTimed:
    """A provider that the harness does not time: ``measure()`` does its own timing.

    For work the harness's in-process timer cannot time, e.g. the ranks of a
    distributed run started as subprocesses, or figures a training run logs itself.
    The harness calls ``measure()`` once when the case is run (never when cases are
    built or listed) and reports the :class:`Measured` it returns as that provider's
    row; speedups, ``items/s`` and targets use it as a timed provider's time.  An
    exception from ``measure()`` becomes an error row.
    """

    def __init__(self, measure: Callable[[], Measured]):
        if not callable(measure):
            raise TypeError(f"SelfTimed needs a callable, got {type(measure).__name__}")
        self.measure = measure

    def __call__(self) -> Measured:
        return self.measure()

    def __repr__(self) -> str:
        return f"SelfTimed({getattr(self.measure, '__qualname__', self.measure)!r})"


@dataclass
class Target:
    """A performance goal checked on the measured figures of one case.

    ``metric`` is ``"speedup"`` (``candidate``'s speedup against ``baseline`` at
    least ``minimum``), ``"frac_copy_bw"`` (``candidate``'s fraction of the
    measured copy bandwidth at least ``minimum``) or ``"extra_ratio"`` (``candidate``'s
    ``extra[key]`` divided by ``baseline``'s at most ``maximum``, e.g. peak memory).  ``device`` restricts the goal
    to one device type ("cpu", "cuda") or, with ``device_name``, to device names
    containing it (e.g. "H200").
    """

    description: str
    candidate: str
    metric: str = "speedup"
    baseline: str | None = None
    minimum: float = 1.0
    device: str | None = None
    device_name: str | None = None
    key: str | None = None
    maximum: float | None = None


@dataclass
class Result:
    """One row of the output: a provider measured (or not) on one case."""

    op: str
    case: str
    shape: str
    dtype: str
    provider: str
    status: str  # "ok" | "unavailable" | "error"
    role: str = ""  # "baseline" | "candidate" | ""
    ms: float | None = None
    runs: int | None = None
    speedups: dict[str, float] = field(default_factory=dict)
    gbps: float | None = None
    frac_copy_bw: float | None = None
    tflops: float | None = None
    bytes_moved: int | None = None
    flops: int | None = None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def check_targets(cases_results: Sequence[tuple[tuple[str, str, list["Target"]], list["Result"]]],
                  device: torch.device, device_label: str) -> list[dict[str, Any]]:
    """Evaluate every applicable :class:`Target` on the measured results.

    ``cases_results`` holds ``((op, case name, targets), results of that case)``.
    """
    out = []
    for (op, case_name, targets), results in cases_results:
        by_provider = {r.provider: r for r in results}
        for t in targets:
            if t.device and t.device != device.type:
                continue
            if t.device_name and t.device_name.lower() not in device_label.lower():
                continue
            r = by_provider.get(t.candidate)
            value = None
            if t.metric == "extra_ratio":
                base = by_provider.get(t.baseline)
                num = r.extra.get(t.key) if r is not None else None
                den = base.extra.get(t.key) if base is not None else None
                value = num / den if num is not None and den else None
                met = None if value is None else bool(value <= t.maximum)
            else:
                if r is not None and r.status == "ok":
                    value = r.speedups.get(t.baseline) if t.metric == "speedup" else r.frac_copy_bw
                met = None if value is None else bool(value >= t.minimum)
            out.append(dict(kind="target", op=op, case=case_name, description=t.description,
                            candidate=t.candidate, metric=t.metric, baseline=t.baseline, minimum=t.minimum,
                            maximum=t.maximum, key=t.key, value=value, met=met))
    return out


def format_targets(checks: Sequence[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        if c["value"] is None:
            status, got = "NOT MEASURED", "-"
        else:
            status = "met" if c["met"] else "MISSED"
            got = f"x{c['value']:.2f}" if c["metric"] == "speedup" else f"{100 * c['value']:.0f}%"
        if c["metric"] == "extra_ratio":
            want = f"<= {100 * c['maximum']:.0f}% of {c['baseline']}'s {c['key']}"
        else:
            want = f"x{c['minimum']:.2f}" if c["metric"] == "speedup" else f"{100 * c['minimum']:.0f}%"
        lines.append(f"  [{status}] {c['op']} / {c['case']}: {c['description']} (measured {got}, goal {want})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- registry


def register(op: str) -> Callable[[CaseFn], CaseFn]:
    """Decorator: register ``fn(device, quick) -> Iterable[Case]`` for ``op``."""

    def deco(fn: CaseFn) -> CaseFn:
        fns = _REGISTRY.setdefault(op, [])
        key = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
        if not any((getattr(f, "__module__", None), getattr(f, "__qualname__", None)) == key for f in fns):
            fns.append(fn)
        return fn

    return deco


def registered_ops() -> dict[str, list[CaseFn]]:
    return {op: list(fns) for op, fns in _REGISTRY.items()}


def load_modules(names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Import the benchmark modules; return ``[(module, traceback)]`` for failures."""
    failures = []
    for name in MODULES if names is None else names:
        qual = name if ("." in name or not __package__) else f"{__package__}.{name}"
        try:
            importlib.import_module(qual)
        except BaseException as exc:  # noqa: BLE001 - reported as an error row
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append((qual, traceback.format_exc()))
    return failures


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, quick: bool = False,
            min_runs: int | None = None) -> tuple[float, int]:
    """Median time of ``fn()`` in milliseconds, and the number of timed runs."""
    warmup_ms, rep_ms, min_run_time, default_runs = _TIMING[bool(quick)]
    min_runs = default_runs if min_runs is None else min_runs
    if device.type == "cuda":
        with torch.cuda.device(device):
            # one untimed call (compilation, allocator warm-up), then an estimate
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            est = max(start.elapsed_time(end), 1e-3)
            rep = max(float(rep_ms), 1.5 * min_runs * est)
            n = max(min_runs, int(rep / est))
            try:
                from triton.testing import do_bench
            except ImportError:
                do_bench = None
            if do_bench is not None:
                ms = do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median")
                return float(ms), n
            for _ in range(max(1, int(warmup_ms / est))):
                fn()
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = sorted(s.elapsed_time(e) for s, e in evs)
            return float(times[len(times) // 2]), n

    from torch.utils.benchmark import Measurement, Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    ms_list = [timer.blocked_autorange(min_run_time=min_run_time)]
    per_block = ms_list[0].number_per_run
    while sum(len(m.times) for m in ms_list) < min_runs:
        ms_list.append(timer.timeit(per_block))
    merged = Measurement.merge(ms_list)[0] if len(ms_list) > 1 else ms_list[0]
    runs = sum(len(m.times) * m.number_per_run for m in ms_list)
    return float(merged.median) * 1e3, runs


def training_step(params, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """One training step as a provider: ``loss_fn()`` (bf16 autocast on CUDA), backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory_mb(step: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of one call of ``step`` above what was allocated before it (after a warm-up
    call: compilation, allocator); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    step()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Device copy bandwidth in GB/s: ``dst.copy_(src)``, bytes = read + write."""
    nbytes = _COPY_BYTES_QUICK if quick else _COPY_BYTES.get(device.type, _COPY_BYTES["cpu"])
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    ms, _ = time_fn(functools.partial(dst.copy_, src), device, quick)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- metadata


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _source_checkout() -> Path | None:
    """Top of the git work tree holding this file (not ignored by it), else None."""
    here = Path(__file__).resolve().parent
    top = _git(["rev-parse", "--show-toplevel"], here)
    if not top:
        return None
    # installed inside an ignored folder of some checkout (a .venv, build/): not ours
    if _git(["check-ignore", "-q", str(Path(__file__).resolve())], here) is not None:
        return None
    return Path(top)


def default_out_dir() -> Path:
    """``results/`` beside this file inside a git checkout, else ``./vlfast-bench-results``."""
    if _source_checkout() is not None:
        return Path(__file__).resolve().parent / "results"
    return Path.cwd() / "vlfast-bench-results"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_slug(device: torch.device) -> str:
    name = re.sub(r"\((r|tm|c)\)", "", device_name(device).lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{device.type}-{name}" if name else device.type


def _module_version(name: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - metadata only
        return None


def run_metadata(device: torch.device) -> dict[str, Any]:
    checkout = _source_checkout()
    commit, dirty = "unknown", None
    if checkout is not None:
        commit = _git(["rev-parse", "HEAD"], checkout) or "unknown"
        status = _git(["status", "--porcelain", "--untracked-files=no"], checkout)
        dirty = None if status is None else bool(status)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _module_version("triton"),
        "vlfast_version": _module_version("vlfast"),
        "python_version": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "vlfast_backend_env": os.environ.get("VLFAST_BACKEND"),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
        "git_commit": commit,
        "git_dirty": dirty,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- results


def compute_speedups(results: list[Result], baselines: Sequence[str]) -> None:
    """Fill ``speedups[b] = ms(b) / ms(r)`` for each ok row ``r`` and ok baseline ``b != r``."""
    base_ms = {r.provider: r.ms for r in results if r.status == "ok" and r.provider in baselines and r.ms}
    for r in results:
        if r.status != "ok" or not r.ms:
            continue
        r.speedups = {b: ms / r.ms for b, ms in base_ms.items() if b != r.provider}


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def _fmt_speedup(s: float) -> str:
    return f"x{s:.0f}" if s >= 100 else f"x{s:.2f}"


def format_table(results: Sequence[Result], width_limit: int = 48) -> str:
    """Plain-text table of results (one line per row)."""
    show_tflops = any(r.tflops is not None for r in results)
    extra_keys = list(dict.fromkeys(k for r in results for k in r.extra))
    header = ["op", "case", "shape", "provider", "time (ms)", "speedup", "GB/s", "%copy-BW"]
    if show_tflops:
        header.append("TFLOP/s")
    header += extra_keys
    lines = []
    for r in results:
        if r.status == "ok":
            t = _fmt_ms(r.ms)
            sp = ", ".join(f"{_fmt_speedup(v)} vs {b}" for b, v in r.speedups.items()) or "-"
        else:
            t = r.status.upper() if r.status == "error" else r.status
            msg = (r.error or "").strip().splitlines()
            sp = msg[-1] if msg else ""
            if len(sp) > width_limit:
                sp = sp[: width_limit - 3] + "..."
        row = [
            r.op,
            r.case,
            r.shape,
            r.provider,
            t,
            sp,
            f"{r.gbps:.1f}" if r.gbps is not None else "-",
            f"{100 * r.frac_copy_bw:.1f}%" if r.frac_copy_bw is not None else "-",
        ]
        if show_tflops:
            row.append(f"{r.tflops:.2f}" if r.tflops is not None else "-")
        row += [f"{r.extra[k]:.1f}" if k in r.extra else "-" for k in extra_keys]
        lines.append(row)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    right = {"time (ms)", "GB/s", "%copy-BW", "TFLOP/s", *extra_keys}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)
        ).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_jsonl(results: Sequence[Result], path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in results:
            row = dataclasses.asdict(r)
            for k, v in list(row.items()):
                if isinstance(v, float) and not math.isfinite(v):
                    row[k] = None
            row.update(meta)
            f.write(json.dumps(row, default=_json_default) + "\n")


def write_launch_plan(path: Path, meta: dict[str, Any]) -> Path:
    """Print the launch-plan account (``vlfast.kernels.plan``: MMA FLOPs issued vs useful, bytes
    moved vs the minimum, of the H200 launch plans at the default shapes; counted on any device,
    not timed) and write it to ``path`` (JSON: the run's metadata and ``launch_plan``, a list of
    ``Account.as_dict()``; replaced by each run)."""
    from vlfast.kernels import plan

    accounts = plan.account_table()
    print("launch plan on an H200 (the GPU rows of the tile tables, counted on this machine, not timed; "
          "bytes: the tile traffic the programs issue, L2 hits included):")
    print("\n".join(plan.format_accounts(accounts)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, launch_plan=[a.as_dict() for a in accounts]), default=_json_default,
                               indent=1) + "\n")
    return path


def write_plot(results: Sequence[Result], path: Path, title: str) -> Path | None:
    """Horizontal bars: speedup of each candidate vs each baseline, per case.

    Returns the path written, or None (with a warning on stderr) when matplotlib
    is missing or there is nothing to draw.
    """
    bars = []  # (label, speedup, baseline)
    for r in results:
        if r.status != "ok" or r.role != "candidate":
            continue
        for b, s in r.speedups.items():
            bars.append((f"{r.op}: {r.case} | {r.provider} vs {b}", s, b))
    if not bars:
        print(f"warning: no candidate speedups to plot; {path} not written", file=sys.stderr)
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        print(f"warning: matplotlib is not available ({exc}); plot {path} not written", file=sys.stderr)
        return None

    baselines = list(dict.fromkeys(b for _, _, b in bars))
    colors = {b: f"C{i % 10}" for i, b in enumerate(baselines)}
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(bars)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(bars)))[::-1]
    # log axis, bars drawn from 1 (no change) to the speedup: slowdowns point left
    vals = [s for _, s, _ in bars]
    ax.barh(ys, [v - 1.0 for v in vals], left=1.0, color=[colors[b] for _, _, b in bars])
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels([lab for lab, _, _ in bars], fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    for y, (_, s, _) in zip(ys, bars):
        ax.text(s, y, f" x{s:.2f} " if s >= 1 else f"x{s:.2f} ", va="center", ha="left" if s >= 1 else "right",
                fontsize=7)
    ax.set_xlabel("speedup (baseline time / candidate time), higher is better")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[b], label=f"vs {b}") for b in baselines], fontsize=8, loc="best")
    lo, hi = min(min(vals), 1.0), max(max(vals), 1.0)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- running


def _progress(total: int = 0):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is None:

        class _NoBar:
            total = 0

            def update(self, n=1):
                pass

            def set_description_str(self, s):
                pass

            def refresh(self):
                pass

            def close(self):
                pass

            @staticmethod
            def write(s, file=None):
                print(s, file=file or sys.stderr)

        return _NoBar()
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
    return bar


def _write(bar, msg: str) -> None:
    try:
        bar.write(msg, file=sys.stderr)
    except TypeError:
        print(msg, file=sys.stderr)


def _matches(filt: str | None, *names: str) -> bool:
    return not filt or any(filt.lower() in n.lower() for n in names)


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but torch.cuda.is_available() is False")
    return torch.device(spec)


def _run_case(case: Case, device: torch.device, quick: bool, bar) -> list[Result]:
    results: list[Result] = []
    role = {p: "baseline" for p in case.baselines}
    role.update({p: "candidate" for p in case.candidates})
    common = dict(op=case.op, case=case.name, shape=case.shape, dtype=case.dtype)
    missing = [p for p in [*case.baselines, *case.candidates] if p not in case.providers and p not in case.unavailable]
    for p in missing:
        results.append(Result(**common, provider=p, status="error", role=role.get(p, ""),
                              error=f"provider {p!r} listed in the case but has no callable"))
        _write(bar, f"ERROR [{case.op} / {case.name} / {p}]: listed provider has no callable")
    for p, reason in case.unavailable.items():
        results.append(Result(**common, provider=p, status="unavailable", role=role.get(p, ""), error=reason))
    for p, fn in case.providers.items():
        bar.set_description_str(f"{case.op}: {case.name} [{p}]")
        try:
            if case.setup_each is not None:
                case.setup_each()
            own_extra: dict[str, float] = {}
            if isinstance(fn, SelfTimed):
                got = fn.measure()
                if not isinstance(got, Measured):
                    raise TypeError(f"SelfTimed provider {p!r} returned {type(got).__name__}, not Measured")
                ms, runs, own_extra = float(got.ms), int(got.runs), dict(got.extra)
            else:
                ms, runs = time_fn(fn, device, quick, case.min_runs)
            if not (ms > 0 and math.isfinite(ms)):
                raise RuntimeError(f"timer returned a non-positive or non-finite time: {ms!r} ms")
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - reported, never swallowed
            tb = traceback.format_exc()
            _write(bar, f"ERROR [{case.op} / {case.name} / {p}]:\n{tb}")
            results.append(Result(**common, provider=p, status="error", role=role.get(p, ""), error=tb,
                                  bytes_moved=case.bytes_moved, flops=case.flops))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            r = Result(**common, provider=p, status="ok", role=role.get(p, ""), ms=ms, runs=runs,
                       bytes_moved=case.bytes_moved, flops=case.flops, extra=own_extra)
            if case.bytes_moved:
                r.gbps = case.bytes_moved / (ms * 1e-3) / 1e9  # frac_copy_bw: filled in by main()
            if case.flops:
                r.tflops = case.flops / (ms * 1e-3) / 1e12
            results.append(r)
        bar.update(1)
    for r in results:
        r.extra.update(case.extra.get(r.provider, {}))
        if case.items and r.status == "ok":
            r.extra["items/s"] = case.items / (r.ms * 1e-3)
    compute_speedups(results, case.baselines)
    order = list(dict.fromkeys([*case.baselines, *case.candidates, *case.providers, *case.unavailable]))
    results.sort(key=lambda r: order.index(r.provider) if r.provider in order else len(order))
    return results


def _iter_cases(fn: CaseFn, op: str, device: torch.device, quick: bool, errors: list[Result], bar):
    """Yield the cases of one registered function; a raising generator becomes an error row."""
    where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    try:
        it = iter(fn(device, quick))
        while True:
            try:
                case = next(it)
            except StopIteration:
                return
            yield case
            del case
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001
        tb = traceback.format_exc()
        _write(bar, f"ERROR [{op}]: building cases in {where} failed:\n{tb}")
        errors.append(Result(op=op, case=f"<cases: {where}>", shape="-", dtype="-", provider="-",
                             status="error", error=tb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vlfast bench",
        description="Time vlfast ops against their eager PyTorch baselines.",
    )
    ap.add_argument("--filter", metavar="SUBSTR",
                    help="only ops or cases whose name contains SUBSTR (case-insensitive)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and short timing (smoke test)")
    ap.add_argument("--out", metavar="DIR", help="results folder (default: bench/results in a source checkout, "
                    "else ./vlfast-bench-results)")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--list", action="store_true", help="list the cases (and their providers) and exit")
    args = ap.parse_args(argv)

    try:
        device = _resolve_device(args.device)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2

    errors: list[Result] = []
    for mod, tb in load_modules():
        print(f"ERROR: benchmark module {mod} failed to import:\n{tb}", file=sys.stderr)
        errors.append(Result(op=mod.rsplit(".", 1)[-1], case=f"<import {mod}>", shape="-", dtype="-",
                             provider="-", status="error", error=tb))

    ops = registered_ops()
    if args.list:
        bar = _progress()
        for op, fns in ops.items():
            for fn in fns:
                for case in _iter_cases(fn, op, device, args.quick, errors, bar):
                    if _matches(args.filter, op, case.name):
                        provs = ", ".join([*case.providers, *(f"{p} (unavailable)" for p in case.unavailable)])
                        print(f"{op}\t{case.name}\t{case.shape}\t{case.dtype}\t{provs}")
        bar.close()
        for e in errors:
            print(f"ERROR [{e.op} / {e.case}]: {(e.error or '').strip().splitlines()[-1:]}", file=sys.stderr)
        return 1 if errors else 0

    meta = run_metadata(device)
    # Copy-bandwidth reference: measured before and after the cases; the higher of
    # the two is used (a busy machine lowers one of them), and a spread is reported.
    copy_samples: list[float] = []

    def measure_copy() -> None:
        try:
            copy_samples.append(measure_copy_bandwidth(device, args.quick))
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            print(f"ERROR: copy-bandwidth measurement failed:\n{tb}", file=sys.stderr)
            if not any(e.op == "copy" for e in errors):
                errors.append(Result(op="copy", case="<copy bandwidth>", shape="-", dtype="-", provider="copy_",
                                     status="error", error=tb))

    measure_copy()
    copy_gbps = copy_samples[0] if copy_samples else None
    print(
        f"vlfast bench on {meta['device']} ({device.type}, {meta['torch_threads']} threads), "
        f"torch {meta['torch_version']}, triton {meta['triton_version']}, vlfast {meta['vlfast_version']}, "
        f"git {meta['git_commit'][:12]}{'+dirty' if meta['git_dirty'] else ''}; copy bandwidth "
        + (f"{copy_gbps:.1f} GB/s" if copy_gbps else "unknown"),
        flush=True,
    )

    results: list[Result] = []
    with_targets: list[tuple[tuple[str, str, list[Target]], list[Result]]] = []
    n_cases = 0
    bar = _progress()
    try:
        for op, fns in ops.items():
            for fn in fns:
                for case in _iter_cases(fn, op, device, args.quick, errors, bar):
                    if not _matches(args.filter, op, case.name):
                        continue
                    n_cases += 1
                    bar.total = (bar.total or 0) + len(case.providers)
                    bar.refresh()
                    case_results = _run_case(case, device, args.quick, bar)
                    results.extend(case_results)
                    if case.targets:
                        # keep only what the checks need: the case's providers hold its tensors
                        with_targets.append(((case.op, case.name, list(case.targets)), case_results))
                    del case
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        bar.close()

    if n_cases == 0 and not errors:
        print(f"error: no benchmark case matches --filter {args.filter!r} "
              f"(ops: {', '.join(ops) or 'none registered'})", file=sys.stderr)
        return 1

    if any(r.gbps for r in results):
        measure_copy()
    copy_gbps = max(copy_samples) if copy_samples else None
    if len(copy_samples) > 1 and min(copy_samples) < 0.8 * max(copy_samples):
        print(f"warning: the copy bandwidth varied during the run ({', '.join(f'{c:.1f}' for c in copy_samples)} "
              "GB/s): the machine is busy or throttling, so timings are noisy; %copy-BW uses the highest",
              file=sys.stderr)
    for r in results:
        if r.gbps is not None and copy_gbps:
            r.frac_copy_bw = r.gbps / copy_gbps
    meta.update(copy_gbps=copy_gbps, copy_gbps_samples=copy_samples, quick=bool(args.quick), filter=args.filter)

    all_rows = errors + results
    print(format_table(all_rows))
    notes = dict.fromkeys((r.provider, (r.error or "").strip()) for r in results if r.status == "unavailable")
    for prov, reason in notes:
        print(f"unavailable: {prov}: {reason}")

    checks = check_targets(with_targets, device, meta["device"])
    if checks:
        print("targets (ratios measured side by side in this run):")
        print(format_targets(checks))
    meta["targets"] = checks

    out = Path(args.out) if args.out else default_out_dir()
    slug = device_slug(device)
    jsonl = out / f"{slug}.jsonl"
    write_jsonl(all_rows, jsonl, meta)
    plan_path = write_launch_plan(out / f"{slug}-plan.json", meta)
    if copy_gbps:
        print(f"copy bandwidth (dst.copy_(src), read + write): {copy_gbps:.1f} GB/s"
              + (f" (best of {', '.join(f'{c:.1f}' for c in copy_samples)})" if len(copy_samples) > 1 else ""))
    print(f"results appended to {jsonl}, the launch-plan account to {plan_path}")
    if not args.no_plot:
        title = (f"vlfast speedups on {meta['device']} ({device.type}, {meta['torch_threads']} threads)\n"
                 f"torch {meta['torch_version']}, git {meta['git_commit'][:12]}"
                 f"{'+dirty' if meta['git_dirty'] else ''}, {meta['timestamp']}" + (" [quick]" if args.quick else ""))
        png = write_plot(results, out / f"{slug}.png", title)
        if png is not None:
            print(f"plot written to {png}")

    failed = [r for r in all_rows if r.status == "error"]
    if failed:
        print(f"{len(failed)} error(s):", file=sys.stderr)
        for r in failed:
            last = (r.error or "").strip().splitlines()
            print(f"  [{r.op} / {r.case} / {r.provider}] {last[-1] if last else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run through the package's own module object so that the benchmark modules'
    # ``from .harness import register`` and this main() share one registry.
    _pkg_main = importlib.import_module(__spec__.name).main if __spec__ is not None else main
    sys.exit(_pkg_main())
