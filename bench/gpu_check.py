"""The one-call GPU check (``make gpu-check``): install, GPU tests, benchmarks, one summary.

Run on a machine with a CUDA GPU, with that machine's own Python (no virtual environment, no
network: the H200 image's python3 with its torch and triton)::

    python3 bench/gpu_check.py                 # what `make gpu-check` runs
    python -m vlfast.bench.gpu_check --dry-run # once vlfast is installed: the plan, run nothing

Phases, each under a hard time limit (the process group is killed when it runs out) inside one
overall budget (:data:`TOTAL_BUDGET_S`, default 450 s, so the whole check ends in under 8 minutes):
setup at most 110 s, tests at most 140 s (less if the benchmarks would get under 180 s), the
benchmarks all that is left but 10 s for the summary.

1. ``setup``: ``pip install --no-build-isolation --no-deps --no-index -e .`` (builds vlfast._C with
   nvcc for sm_90 only); if that fails, again with ``VLFAST_NO_NATIVE=1`` (the pure-Python
   install, said so in the log and the summary). Skipped when this checkout is already
   importable as ``vlfast``. Then ``python -m vlfast info``.
2. ``tests``: the GPU test subset, ``pytest tests/kernels tests/ops -m "not distributed"`` with
   ``TRITON_INTERPRET`` unset, so every kernel test runs the compiled kernels on ``cuda``
   (:data:`vlfast.testing.DEVICES` holds "cuda" whenever torch sees a GPU), bf16 and fp32, the
   ``slow`` cases included (slow only in the interpreter); ``tests/kernels/test_gate.py`` (the
   CPU-side sm_90a compile gate) is left to CI. pytest-xdist and pytest-timeout are used where
   installed. Every test outcome is appended to a file as it happens, so the counts survive the
   phase's time limit.
3. ``bench``: ``vlfast bench --device cuda`` at the README's sizes, as a list of runs in priority
   order (:data:`BENCH_RUNS`), each its own harness process under its own time limit; a run whose
   budget no longer fits is skipped and reported. Each run loads only its op's benchmark module and
   builds only the cases it needs (the harness's ``--filter`` applies after a case is built, and
   building a model case already compiles and steps it).

Everything goes to one folder (``--out``; default ``$OUT`` if set, else ``bench/results/``): the
harness's ``<device>.jsonl``, ``gpu_check.log``, ``gpu_check_pytest.jsonl`` (one line per test
report) and ``gpu_check_summary.json`` (device, versions, commit, date, test counts, each
benchmark goal as met / MISSED / NOT MEASURED). The commit comes from ``--commit`` /
``$VLFAST_COMMIT``, else ``git rev-parse HEAD``, else a ``COMMIT`` file at the checkout's root,
else ``"unknown"``; result rows the harness wrote with commit "unknown" get it filled in.

Without a CUDA device the check refuses (exit code 2) unless ``--dry-run`` is given: then it prints
the plan (phases, budgets, the exact commands), writes the summary with the real metadata of this
machine and every GPU phase marked not run, and exits 0. Exit codes: 0 every phase ran and every
test passed (a MISSED goal is a result, not a failure); 1 a phase failed or timed out, or a test
failed; 2 no CUDA device (or bad arguments).

This module also serves as a pytest plugin (``-p vlfast.bench.gpu_check``: the outcome log) and as
the driver of one benchmark run (``python -m vlfast.bench.gpu_check _bench-run ...``). It imports
only the standard library at module level, so that it runs before vlfast is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TOTAL_BUDGET_S", "SETUP_BUDGET_S", "TESTS_BUDGET_S", "RESERVE_S", "BENCH_RUNS", "BenchRun", "Phase",
    "find_repo", "resolve_commit", "collect_metadata", "build_plan", "format_plan", "write_summary", "main",
]

#: The whole check, in seconds: under 8 minutes with room for the interpreter's start and exit.
TOTAL_BUDGET_S = 450
#: Installing vlfast: the native build (nvcc, sm_90 only), the pure-Python fallback, then ``vlfast info``.
INSTALL_NATIVE_S, INSTALL_PURE_S, INFO_S = 60, 30, 20
SETUP_BUDGET_S = INSTALL_NATIVE_S + INSTALL_PURE_S + INFO_S
#: The GPU test subset (cut short, never the benchmarks, when time is short).
TESTS_BUDGET_S = 140
#: Kept back at the end for the summary.
RESERVE_S = 10
#: Least time the benchmark phase is guaranteed (the test phase's limit shrinks to leave it).
BENCH_MIN_S = 180
#: A limit for each single test, where pytest-timeout is installed.
PER_TEST_TIMEOUT_S = 90

SUMMARY_NAME = "gpu_check_summary.json"
LOG_NAME = "gpu_check.log"
OUTCOMES_NAME = "gpu_check_pytest.jsonl"
OUTCOMES_ENV = "VLFAST_GPU_CHECK_OUTCOMES"

TEST_PATHS = ["tests/kernels", "tests/ops"]
TEST_MARKERS = "not distributed"
TEST_IGNORE = ["tests/kernels/test_gate.py"]


@dataclass(frozen=True)
class BenchRun:
    """One harness process: the benchmark module ``module`` (op ``op``), only ``cases`` (exact case
    names; empty: every case of the op), under ``budget_s`` seconds."""

    name: str
    op: str
    module: str
    cases: tuple[str, ...] = ()
    budget_s: int = 60


#: In priority order; a run is skipped when less time is left than its budget. Names are the
#: harness's CUDA case names (bench/*.py), at the README's sizes.
BENCH_RUNS: tuple[BenchRun, ...] = (
    BenchRun("ema", "ema", "ema", (), 40),
    BenchRun("masking", "masking", "masking", (), 30),
    BenchRun("attention-vit_b16", "attention", "attention", ("vit_b16 fwd+bwd",), 60),
    BenchRun("contrastive-8k-32k", "contrastive", "contrastive",
             ("infonce N=8192 fwd+bwd", "infonce N=32768 fwd+bwd"), 60),
    BenchRun("attention-bert_128", "attention", "attention", ("bert_128_pad30 fwd+bwd",), 45),
    BenchRun("attention-vit_h14", "attention", "attention", ("vit_h14 fwd+bwd",), 45),
    BenchRun("attention-bert_512", "attention", "attention", ("bert_512_pad30 fwd+bwd",), 45),
    BenchRun("attention-long_4096", "attention", "attention", ("long_4096 fwd+bwd",), 45),
    BenchRun("models-clip_vit_b16", "models", "models", ("clip_vit_b16 train step",), 180),
    BenchRun("contrastive-64k-256k", "contrastive", "contrastive",
             ("infonce N=65536 fwd+bwd", "infonce N=131072 fwd+bwd", "infonce N=262144 fwd+bwd"), 90),
)


@dataclass
class Phase:
    """One step of the plan and, once run, what happened."""

    name: str
    cmd: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)  # set for this step (None-valued keys: removed)
    unset: list[str] = field(default_factory=list)
    status: str = "not run"  # "ok" | "failed" | "timeout" | "skipped" | "not run"
    reason: str | None = None
    rc: int | None = None
    wall_s: float | None = None

    def shell(self) -> str:
        pre = [f"-u {k}" for k in self.unset]
        envs = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        words = (["env", *pre] if pre else []) + envs + [shlex.quote(c) for c in self.cmd]
        return " ".join(words)


# --------------------------------------------------------------------------- where, which commit


def find_repo(start: Path | None = None) -> Path:
    """The vlfast checkout: the folder above this file's ``bench/`` when it holds ``setup.py`` and
    ``tests/`` (a source checkout, editable install included), else the current folder."""
    here = Path(__file__).resolve().parent if start is None else Path(start).resolve()
    for cand in (here.parent, Path.cwd()):
        if (cand / "setup.py").is_file() and (cand / "tests").is_dir() and (cand / "bench").is_dir():
            return cand
    return Path.cwd()


def _run_quiet(cmd: list[str], cwd: Path, timeout: float = 20) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def resolve_commit(repo: Path, explicit: str | None = None) -> dict[str, Any]:
    """``{"commit", "source", "dirty"}``: ``explicit`` (``--commit``) or ``$VLFAST_COMMIT``, else git,
    else the first word of ``<repo>/COMMIT``, else ``"unknown"``. ``dirty`` is known from git only."""
    given = explicit or os.environ.get("VLFAST_COMMIT")
    if given:
        return {"commit": given.strip(), "source": "--commit" if explicit else "$VLFAST_COMMIT", "dirty": None}
    if (repo / ".git").exists():
        head = _run_quiet(["git", "rev-parse", "HEAD"], repo)
        if head:
            st = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], repo)
            return {"commit": head, "source": "git", "dirty": None if st is None else bool(st)}
    f = repo / "COMMIT"
    if f.is_file():
        words = f.read_text(errors="replace").split()
        if words:
            return {"commit": words[0], "source": "COMMIT file", "dirty": None}
    return {"commit": "unknown", "source": None, "dirty": None}


# --------------------------------------------------------------------------- metadata


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vlfast_version(repo: Path) -> str | None:
    try:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', (repo / "vlfast" / "__init__.py").read_text(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = _run_quiet([exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"], Path.cwd(), timeout=15)
    if not out:
        return None
    parts = [p.strip() for p in out.splitlines()[0].split(",")]
    return dict(zip(["name", "driver_version", "memory_total", "max_sm_clock"], parts))


def collect_metadata(repo: Path, commit: str | None = None) -> dict[str, Any]:
    """Real facts of this machine and checkout: device, versions, commit, date. Imports torch (not
    vlfast); touches the GPU only when torch sees one."""
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "vlfast_version": _vlfast_version(repo),
        "triton_version": _dist_version("triton"),
        "pytest_version": _dist_version("pytest"),
        "pytest_xdist": _dist_version("pytest-xdist"),
        "pytest_timeout": _dist_version("pytest-timeout"),
        "repo": str(repo),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "VLFAST_NO_NATIVE", "VLFAST_BACKEND",
                                                "CUDA_VISIBLE_DEVICES", "OUT")},
    }
    meta.update({f"git_{k}": v for k, v in resolve_commit(repo, commit).items()})
    try:
        import torch  # noqa: PLC0415  (the check runs before anything else is known to import)
    except Exception as exc:  # noqa: BLE001 - reported in the summary
        meta.update(torch_version=None, torch_error=f"{type(exc).__name__}: {exc}", cuda_available=False,
                    device_type="cpu", device=meta["host_cpu"], gpu=None)
        return meta
    meta.update(torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    cuda = bool(torch.cuda.is_available())
    meta["cuda_available"] = cuda
    if not cuda:
        meta.update(device_type="cpu", device=meta["host_cpu"], gpu=None)
        return meta
    props = torch.cuda.get_device_properties(0)
    meta.update(device_type="cuda", device=props.name, gpu={
        "name": props.name,
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "nvidia_smi": _nvidia_smi(),
    })
    return meta


# --------------------------------------------------------------------------- the plan


def _installed_here(repo: Path) -> bool:
    """Is ``vlfast`` (with its mapped ``vlfast.kernels``) importable from this checkout?"""
    try:
        spec = importlib.util.find_spec("vlfast.kernels")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return Path(spec.origin).resolve().is_relative_to(repo.resolve())


def _pip_install(python: str, repo: Path) -> list[str]:
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
            "--disable-pip-version-check", "-e", str(repo)]


def _pytest_cmd(python: str, paths: list[str], meta: dict[str, Any]) -> list[str]:
    cmd = [python, "-m", "pytest", *paths, "-m", TEST_MARKERS, "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "vlfast.bench.gpu_check"]
    cmd += [f"--ignore={p}" for p in TEST_IGNORE]
    if meta.get("pytest_xdist"):
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if meta.get("pytest_timeout"):
        cmd += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    return cmd


def _bench_cmd(python: str, out: Path, run: BenchRun) -> list[str]:
    cmd = [python, "-m", "vlfast.bench.gpu_check", "_bench-run", "--module", run.module]
    for c in run.cases:
        cmd += ["--case", c]
    return cmd + ["--", "--device", "cuda", "--out", str(out), "--no-plot"]


def build_plan(args: argparse.Namespace, repo: Path, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Phases with their commands and budgets (nothing is run)."""
    py = args.python
    setup: list[Phase] = []
    install = args.install
    if install == "auto":
        install = "skip" if _installed_here(repo) else "native"
    native_env = {"VLFAST_CUDA_ARCHS": os.environ.get("VLFAST_CUDA_ARCHS", "90"),
                  "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))}
    if install == "native":
        setup.append(Phase("install-native", _pip_install(py, repo), INSTALL_NATIVE_S, env=native_env))
        setup.append(Phase("install-pure (only if install-native fails)", _pip_install(py, repo), INSTALL_PURE_S,
                           env={"VLFAST_NO_NATIVE": "1"}))
    elif install == "pure":
        setup.append(Phase("install-pure", _pip_install(py, repo), INSTALL_PURE_S, env={"VLFAST_NO_NATIVE": "1"}))
    setup.append(Phase("vlfast-info", [py, "-m", "vlfast", "info"], INFO_S, unset=["TRITON_INTERPRET"]))
    tests = Phase("tests", _pytest_cmd(py, args.tests, meta), TESTS_BUDGET_S, unset=["TRITON_INTERPRET"],
                  env={OUTCOMES_ENV: str(out / OUTCOMES_NAME)})
    runs = [r for r in BENCH_RUNS if not args.bench or r.name in args.bench]
    bench = [Phase(f"bench:{r.name}", _bench_cmd(py, out, r), r.budget_s, unset=["TRITON_INTERPRET"]) for r in runs]
    return {"install_mode": install, "setup": setup, "tests": None if args.no_tests else tests,
            "bench": [] if args.no_bench else bench, "bench_runs": [] if args.no_bench else runs,
            "total_budget_s": args.total_budget, "bench_min_s": BENCH_MIN_S, "reserve_s": RESERVE_S, "out": str(out)}


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"gpu-check plan: total budget {plan['total_budget_s']} s (each phase killed at its limit; "
             f"{plan['reserve_s']} s kept for the summary), results in {plan['out']}"]
    lines.append(f"  setup (install mode: {plan['install_mode']}):")
    lines += [f"    [{p.budget_s:>4.0f} s] {p.name}: {p.shell()}" for p in plan["setup"]]
    t = plan["tests"]
    if t is not None:
        lines.append(f"  tests: at most {t.budget_s:.0f} s, cut so that the benchmarks keep {plan['bench_min_s']} s")
        lines.append(f"    {t.shell()}")
    else:
        lines.append("  tests: not planned (--no-tests)")
    lines.append("  bench (priority order; a run is skipped once less time is left than its budget):")
    lines += [f"    [{p.budget_s:>4.0f} s] {p.name}: {p.shell()}" for p in plan["bench"]] or ["    none (--no-bench)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


class Log:
    """Writes to the log file and to stdout, flushed, from several threads."""

    def __init__(self, path: Path, echo: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._echo = echo
        self._lock = threading.Lock()

    def __call__(self, text: str = "", always: bool = False) -> None:
        self.write(text + "\n", always)

    def write(self, text: str, always: bool = False) -> None:
        with self._lock:
            self._f.write(text)
            self._f.flush()
            if self._echo or always:
                sys.stdout.write(text)
                sys.stdout.flush()

    def close(self) -> None:
        self._f.close()


def _child_env(phase: Phase) -> dict[str, str]:
    env = dict(os.environ)
    for k in phase.unset:
        env.pop(k, None)
    env.update(phase.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_phase(phase: Phase, timeout: float, repo: Path, log: Log) -> deque:
    """Run ``phase`` under ``timeout`` seconds, its output into the log; fills status, rc, wall_s.
    Returns the last lines of its output."""
    tail: deque = deque(maxlen=2000)
    log(f"\n=== {phase.name} (limit {timeout:.0f} s): {phase.shell()}")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(phase.cmd, cwd=repo, env=_child_env(phase), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        phase.status, phase.reason, phase.wall_s = "failed", f"could not start: {exc}", 0.0
        log(f"=== {phase.name}: {phase.reason}")
        return tail

    def pump():
        for line in proc.stdout:
            log.write(line)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        phase.rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        phase.status, phase.reason = "timeout", f"killed at its {timeout:.0f} s limit"
    reader.join(timeout=10)
    phase.wall_s = round(time.monotonic() - t0, 1)
    if phase.status != "timeout":
        phase.status = "ok" if phase.rc == 0 else "failed"
        if phase.rc != 0:
            phase.reason = f"exit code {phase.rc}"
    log(f"=== {phase.name}: {phase.status} in {phase.wall_s} s" + (f" ({phase.reason})" if phase.reason else ""))
    return tail


# --------------------------------------------------------------------------- pytest outcomes (plugin)

_plugin_path: list[str] = []


def pytest_configure(config) -> None:
    """Plugin hook: record outcomes into ``$VLFAST_GPU_CHECK_OUTCOMES`` (controller process only)."""
    path = os.environ.get(OUTCOMES_ENV)
    _plugin_path.clear()
    if path and not hasattr(config, "workerinput"):  # xdist workers forward their reports
        _plugin_path.append(path)


def pytest_unconfigure(config) -> None:
    _plugin_path.clear()


def classify_report(report) -> str | None:
    """The counted outcome of one test report, as pytest's summary counts them."""
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            return "xpassed" if xfail else "passed"
        if report.skipped:
            return "xfailed" if xfail else "skipped"
        return "failed"
    if report.failed:
        return "error"
    if report.when == "setup" and report.skipped:
        return "skipped"
    return None


def pytest_runtest_logreport(report) -> None:
    if not _plugin_path:
        return
    outcome = classify_report(report)
    if outcome is None:
        return
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
            "duration_s": round(float(getattr(report, "duration", 0.0)), 3)}
    with open(_plugin_path[0], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


OUTCOME_KINDS = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def read_outcomes(path: Path) -> dict[str, Any]:
    counts = dict.fromkeys(OUTCOME_KINDS, 0)
    failures, slowest = [], []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
            if row["outcome"] in ("failed", "error"):
                failures.append(f"{row['nodeid']} ({row['outcome']} in {row['when']})")
            slowest.append((row.get("duration_s", 0.0), row["nodeid"]))
    slowest.sort(reverse=True)
    return {**counts, "reported": sum(counts.values()), "failures": failures,
            "slowest": [f"{d:.1f}s {n}" for d, n in slowest[:10]]}


# --------------------------------------------------------------------------- one benchmark run (driver)


def bench_run_main(argv: list[str]) -> int:
    """``_bench-run --module M [--case NAME ...] -- HARNESS-ARGS``: ``vlfast bench`` with only module
    ``M`` loaded and only the named cases built; cases after the last one named are never built."""
    ap = argparse.ArgumentParser(prog="python -m vlfast.bench.gpu_check _bench-run")
    ap.add_argument("--module", required=True, help="benchmark module (bench/<name>.py, or a dotted name)")
    ap.add_argument("--case", action="append", default=[], help="exact case name (repeatable; none: all)")
    ap.add_argument("harness_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    rest = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args

    from vlfast.bench import harness  # noqa: PLC0415  (installed by now; the check imports it here only)

    harness.MODULES = [args.module]
    failures = harness.load_modules()
    if not failures and args.case:
        wanted = set(args.case)
        registry = harness._REGISTRY  # noqa: SLF001  (the harness offers no lazy case filter)
        for op, fns in registry.items():
            registry[op] = [_only_cases(fn, wanted) for fn in fns]
    return harness.main(rest)


def _only_cases(fn, wanted: set[str]):
    def cases(device, quick):
        left = set(wanted)
        gen = iter(fn(device, quick))
        try:
            for case in gen:
                if case.name in left:
                    left.discard(case.name)
                    yield case
                del case
                if not left:
                    return
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    cases.__module__ = getattr(fn, "__module__", None)
    cases.__qualname__ = getattr(fn, "__qualname__", "cases")
    return cases


# --------------------------------------------------------------------------- results


def _jsonl_sizes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in out.glob("*.jsonl") if p.name != OUTCOMES_NAME}


def _new_rows(out: Path, before: dict[Path, int], commit: dict[str, Any]) -> tuple[list[str], list[dict]]:
    """Rows appended since ``before``; commit "unknown" in them is filled in from ``commit`` (the
    file is rewritten). Returns (files, rows)."""
    files, rows = [], []
    for path, size in _jsonl_sizes(out).items():
        start = before.get(path, 0)
        if size <= start:
            continue
        data = path.read_bytes()
        head, new = data[:start], data[start:].decode("utf-8", errors="replace")
        fixed, changed = [], False
        for line in new.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                fixed.append(line)
                continue
            if row.get("git_commit") in (None, "unknown") and commit.get("commit") not in (None, "unknown"):
                row["git_commit"], row["git_commit_source"], changed = commit["commit"], commit["source"], True
                line = json.dumps(row)
            rows.append(row)
            fixed.append(line)
        if changed:
            path.write_bytes(head + ("\n".join(fixed) + "\n").encode("utf-8"))
        files.append(str(path))
    return files, rows


def _goal_status(t: dict[str, Any]) -> str:
    if t.get("value") is None:
        return "NOT MEASURED"
    return "met" if t.get("met") else "MISSED"


def _goal_text(t: dict[str, Any]) -> str:
    v = t.get("value")
    if t.get("metric") == "extra_ratio":
        got = "-" if v is None else f"{100 * v:.1f}%"
        want = f"<= {100 * t['maximum']:.0f}% of {t.get('baseline')}'s {t.get('key')}"
    elif t.get("metric") == "speedup":
        got = "-" if v is None else f"x{v:.2f}"
        want = f"x{t['minimum']:.2f} vs {t.get('baseline')}"
    else:
        got = "-" if v is None else f"{100 * v:.0f}%"
        want = f"{100 * t['minimum']:.0f}%"
    return f"{t['op']} / {t['case']}: {t['description']} (measured {got}, goal {want})"


def summarize_bench_rows(rows: list[dict]) -> dict[str, Any]:
    status = {}
    for r in rows:
        status[r.get("status", "?")] = status.get(r.get("status", "?"), 0) + 1
    targets = rows[-1].get("targets", []) if rows else []
    goals = [{**t, "status": _goal_status(t), "text": _goal_text(t)} for t in targets]
    errors = [f"{r.get('op')} / {r.get('case')} / {r.get('provider')}: "
              + ((r.get("error") or "").strip().splitlines() or [""])[-1] for r in rows if r.get("status") == "error"]
    return {"rows": status, "goals": goals, "errors": errors}


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _phase_dict(p: Phase) -> dict[str, Any]:
    d = asdict(p)
    d["command"] = p.shell()
    return d


def format_summary(summary: dict[str, Any]) -> str:
    m = summary["metadata"]
    lines = ["", "=" * 78, f"gpu-check summary{' (DRY RUN: no GPU phase ran)' if summary['dry_run'] else ''}",
             f"device {m.get('device')} ({m.get('device_type')}); torch {m.get('torch_version')} "
             f"(CUDA {m.get('torch_cuda')}), triton {m.get('triton_version')}, python {m.get('python_version')}, "
             f"vlfast {m.get('vlfast_version')}, commit {m.get('git_commit')} ({m.get('git_source') or 'no source'}), "
             f"{m.get('date')}"]
    for p in summary["phases"]:
        lines.append(f"  {p['name']:<44} {p['status']:<8} {'' if p['wall_s'] is None else str(p['wall_s']) + ' s'}"
                     + (f"  ({p['reason']})" if p.get("reason") else ""))
    t = summary["tests"]
    if t.get("passed") is None:
        lines.append(f"tests: not run ({t.get('status')})")
    else:
        lines.append(f"tests ({t['status']}): {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                     f"{t['skipped']} skipped, {t['xfailed']} xfailed, {t['xpassed']} xpassed")
        lines += [f"  FAILED {f}" for f in t.get("failures", [])[:30]]
    b = summary["bench"]
    lines.append("benchmark goals:")
    goals = b.get("goals", [])
    lines += [f"  [{g['status']}] {g['text']}" for g in goals] or ["  none measured"]
    for r in b.get("runs", []):
        if r["status"] != "ok":
            lines.append(f"  [NOT MEASURED] run {r['name']} ({', '.join(r['cases']) or 'all cases'}): {r['status']}"
                         + (f", {r['reason']}" if r.get("reason") else ""))
    lines.append(f"files: {', '.join(summary['files'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m vlfast.bench.gpu_check",
        description="One-call GPU check: install vlfast, run the GPU test subset and the CUDA benchmarks "
                    "under one time budget, write a summary (see the module docstring).")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and write the summary with this machine's metadata; run no GPU phase")
    ap.add_argument("--out", metavar="DIR", help="results folder (default: $OUT if set, else bench/results; "
                    "with --dry-run: $OUT if set, else build/gpu-check-dry-run)")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, metavar="S",
                    help=f"seconds for the whole check (default {TOTAL_BUDGET_S})")
    ap.add_argument("--install", choices=["auto", "native", "pure", "skip"], default="auto",
                    help="auto: install (native, then pure-Python fallback) unless this checkout is importable")
    ap.add_argument("--tests", nargs="+", default=list(TEST_PATHS), metavar="PATH", help="test paths")
    ap.add_argument("--no-tests", action="store_true", help="skip the test phase")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark phase")
    ap.add_argument("--bench", nargs="+", metavar="RUN", choices=[r.name for r in BENCH_RUNS],
                    help="only these benchmark runs (names: " + ", ".join(r.name for r in BENCH_RUNS) + ")")
    ap.add_argument("--commit", help="the commit to record (default: $VLFAST_COMMIT, git, a COMMIT file)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for every phase (default: this one)")
    ap.add_argument("--quiet", action="store_true", help="log to the file only, print the summary")
    args = ap.parse_args(argv)
    if args.total_budget <= RESERVE_S:
        ap.error(f"--total-budget must exceed {RESERVE_S} s")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bench-run"]:
        return bench_run_main(argv[1:])
    try:
        args = _parse(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    t_start = time.monotonic()
    deadline = t_start + args.total_budget
    repo = find_repo()

    meta = collect_metadata(repo, args.commit)
    if not meta.get("cuda_available") and not args.dry_run:
        why = meta.get("torch_error") or (f"torch {meta.get('torch_version')} (CUDA build {meta.get('torch_cuda')}) "
                                          "sees no CUDA device: torch.cuda.is_available() is False")
        print(f"gpu-check: refusing to run without a GPU: {why}.\n"
              "Run `python -m vlfast.bench.gpu_check --dry-run` (or `make gpu-check GPU_CHECK_ARGS=--dry-run`) "
              "to see the plan without running it.", file=sys.stderr)
        return 2

    env_out = os.environ.get("OUT")
    default_out = (repo / "build" / "gpu-check-dry-run") if args.dry_run else (repo / "bench" / "results")
    out = Path(args.out or env_out or default_out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_NAME, echo=not args.quiet)
    plan = build_plan(args, repo, out, meta)
    log(f"gpu-check {'dry run ' if args.dry_run else ''}started {meta['date']} on {meta['device']} "
        f"(torch {meta.get('torch_version')}, triton {meta.get('triton_version')}, python {meta['python_version']}, "
        f"commit {meta['git_commit']} from {meta['git_source'] or 'nowhere'})")
    log(format_plan(plan))

    phases: list[Phase] = []
    tests_info: dict[str, Any] = {"status": "not run", "passed": None}
    runs_info: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    files = {str(out / LOG_NAME), str(out / SUMMARY_NAME)}
    not_run = "dry run: no GPU phase runs" if args.dry_run else None

    def left() -> float:
        return deadline - time.monotonic() - RESERVE_S

    # ---- setup
    setup_ok = True
    for p in plan["setup"]:
        phases.append(p)
        if not_run:
            p.reason = not_run
            continue
        if p.name.startswith("install-pure (only if"):
            if phases[-2].status == "ok":
                p.status, p.reason = "skipped", "install-native succeeded"
                continue
            p.name = "install-pure"
            log("install-native failed: installing without the native extension (VLFAST_NO_NATIVE=1); "
                "the native backend is unavailable in this check")
        run_phase(p, min(p.budget_s, left()), repo, log)
        if p.name.startswith("install-") and p.status == "ok":
            meta["install"] = "native" if p.name == "install-native" else "pure (VLFAST_NO_NATIVE=1)"
    installs = [p for p in plan["setup"] if p.name.startswith("install-")]
    if not not_run and installs and not any(p.status == "ok" for p in installs):
        setup_ok = False
    if plan["install_mode"] == "skip":
        meta["install"] = "skipped: this checkout is already importable as vlfast"

    # ---- tests
    t = plan["tests"]
    if t is not None:
        phases.append(t)
        if not_run:
            t.reason = not_run
            tests_info = {"status": not_run, "passed": None}
        elif not setup_ok:
            t.status, t.reason = "skipped", "vlfast could not be installed"
            tests_info = {"status": t.reason, "passed": None}
        else:
            outcomes = out / OUTCOMES_NAME
            if outcomes.exists():
                outcomes.unlink()
            reserve = BENCH_MIN_S if plan["bench"] else 0
            limit = min(t.budget_s, left() - reserve)
            if limit < 20:
                t.status, t.reason = "skipped", f"only {left():.0f} s left"
                tests_info = {"status": t.reason, "passed": None}
            else:
                tail = run_phase(t, limit, repo, log)
                tests_info = {"status": t.status if t.status != "failed" else "failures", **read_outcomes(outcomes)}
                if t.status == "timeout":
                    tests_info["note"] = "cut at the time limit: the counts are the tests reported before it"
                tests_info["pytest_summary_line"] = next(
                    (ln.strip() for ln in reversed(tail) if re.search(r"\d+ (passed|failed)", ln)), None)
                files.add(str(outcomes))
    else:
        tests_info = {"status": "not planned (--no-tests)", "passed": None}

    # ---- bench
    for p, run in zip(plan["bench"], plan["bench_runs"]):
        phases.append(p)
        info: dict[str, Any] = {"name": run.name, "op": run.op, "cases": list(run.cases), "budget_s": run.budget_s}
        if not_run:
            p.reason = not_run
        elif not setup_ok:
            p.status, p.reason = "skipped", "vlfast could not be installed"
        elif left() < run.budget_s:
            p.status, p.reason = "skipped", f"time budget: {max(0.0, left()):.0f} s left, run needs {run.budget_s} s"
            log(f"=== {p.name}: skipped ({p.reason})")
        else:
            before = _jsonl_sizes(out)
            run_phase(p, run.budget_s, repo, log)
            new_files, rows = _new_rows(out, before, {"commit": meta["git_commit"], "source": meta["git_source"]})
            files.update(new_files)
            info.update(summarize_bench_rows(rows))
            goals += info["goals"]
            if p.status == "timeout":
                p.reason = (p.reason or "") + "; the harness writes its rows at the end, so this run left none"
        info.update(status=p.status, reason=p.reason, wall_s=p.wall_s)
        runs_info.append(info)

    # a failed native build that the pure-Python install replaced is logged, not a failure of the check
    fallback_ok = any(p.name == "install-pure" and p.status == "ok" for p in phases)
    counted = [p for p in phases if p.status != "not run" and not (p.name == "install-native" and fallback_ok)]
    ok = bool(not args.dry_run and setup_ok and all(p.status in ("ok", "skipped") for p in counted)
              and not (tests_info.get("failed") or tests_info.get("error")))
    summary = {
        "kind": "vlfast-gpu-check", "schema": 1, "dry_run": bool(args.dry_run), "ok": ok,
        "duration_s": round(time.monotonic() - t_start, 1),
        "metadata": meta,
        "budgets": {"total_s": args.total_budget, "setup_s": SETUP_BUDGET_S, "tests_s": TESTS_BUDGET_S,
                    "bench_min_s": BENCH_MIN_S, "reserve_s": RESERVE_S, "per_test_s": PER_TEST_TIMEOUT_S,
                    "bench_runs": {r.name: r.budget_s for r in BENCH_RUNS}},
        "phases": [_phase_dict(p) for p in phases],
        "tests": tests_info,
        "bench": {"runs": runs_info, "goals": goals,
                  "counts": {s: sum(g["status"] == s for g in goals) for s in ("met", "MISSED", "NOT MEASURED")}},
        "files": sorted(files),
    }
    write_summary(out / SUMMARY_NAME, summary)
    log(format_summary(summary), always=True)
    log.close()
    if args.dry_run:
        return 0
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: bench/ (attention.py, models.py...) must not shadow top-level names
    sys.exit(main())
