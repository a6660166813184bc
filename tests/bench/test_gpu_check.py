"""The one-call GPU check (vlfast.bench.gpu_check): what can be run without a GPU.

The plan (phases, budgets, commands), the refusal without CUDA, the dry run's summary with this
machine's real metadata, the commit fallbacks, the benchmark driver that builds only the named
cases (on a small stand-in benchmark module, on the CPU), the pytest outcome log and the kill at a
phase's time limit. Nothing here runs a GPU phase, and no GPU figure is made up.
"""

import ast
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vlfast.bench import gpu_check as gc

REPO = Path(__file__).resolve().parents[2]


def _git_head():
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def test_module_level_imports_are_stdlib_only():
    # `python3 bench/gpu_check.py` runs before vlfast is installed (on the GPU image): nothing else at import
    tree = ast.parse((REPO / "bench" / "gpu_check.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names - {"__future__"} <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_budgets_fit_in_eight_minutes():
    assert gc.TOTAL_BUDGET_S <= 8 * 60 - 20  # room for the interpreter's start and the summary
    assert gc.SETUP_BUDGET_S + gc.TESTS_BUDGET_S + gc.BENCH_MIN_S + gc.RESERVE_S <= gc.TOTAL_BUDGET_S
    names = [r.name for r in gc.BENCH_RUNS]
    assert len(names) == len(set(names))
    # the top-priority runs fit in the benchmark phase's guaranteed time
    assert sum(r.budget_s for r in gc.BENCH_RUNS[:3]) <= gc.BENCH_MIN_S
    assert max(r.budget_s for r in gc.BENCH_RUNS) <= gc.TOTAL_BUDGET_S - gc.SETUP_BUDGET_S - gc.TESTS_BUDGET_S


def test_bench_runs_name_real_cuda_cases():
    # the driver matches exact case names: they must be the harness's CUDA case names
    from vlfast.bench import attention, models

    src = (REPO / "bench" / "contrastive.py").read_text()
    sizes = re.search(r'device\.type == "cuda":\s*\n\s*sizes, D, dtype = \[([\d, ]+)\]', src)
    assert sizes, "bench/contrastive.py's CUDA sizes line changed: update BENCH_RUNS and this test"
    known = {
        "attention": {f"{n} fwd+bwd" for n in attention.CUDA_CASES},
        "models": {f"{n} train step" for n, _ in models.CUDA_CASES},
        "contrastive": {f"infonce N={int(n)} fwd+bwd" for n in sizes.group(1).split(",")},
    }
    for run in gc.BENCH_RUNS:
        assert (REPO / "bench" / f"{run.module}.py").is_file()
        if run.cases:
            assert set(run.cases) <= known[run.op], (run.name, set(run.cases) - known[run.op])
    covered = {c for r in gc.BENCH_RUNS for c in r.cases}
    assert known["attention"] <= covered and known["contrastive"] <= covered  # every README size is planned


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    assert gc.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to run without a GPU" in err and "--dry-run" in err and "is_available() is False" in err
    assert not list(tmp_path.iterdir())  # nothing written, nothing run


def test_bad_arguments_exit_2(capsys):
    assert gc.main(["--bench", "no-such-run"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_dry_run_plan_and_summary(tmp_path, capsys):
    rc = gc.main(["--dry-run", "--out", str(tmp_path), "--install", "native", "--commit", "cafe1234"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / gc.SUMMARY_NAME).read_text())
    assert (tmp_path / gc.LOG_NAME).read_text().strip()
    assert summary["dry_run"] is True and summary["ok"] is False

    # the plan: every phase with its exact command, in order
    phases = summary["phases"]
    names = [p["name"] for p in phases]
    assert names[:3] == ["install-native", "install-pure (only if install-native fails)", "vlfast-info"]
    assert names[3] == "tests" and names[4:] == [f"bench:{r.name}" for r in gc.BENCH_RUNS]
    cmds = {p["name"]: p["command"] for p in phases}
    assert "pip install --no-build-isolation --no-deps --no-index" in cmds["install-native"]
    assert "VLFAST_NO_NATIVE=1" in cmds["install-pure (only if install-native fails)"]
    assert "VLFAST_CUDA_ARCHS=" in cmds["install-native"]
    assert "-m pytest tests/kernels tests/ops -m 'not distributed'" in cmds["tests"]
    assert "env -u TRITON_INTERPRET" in cmds["tests"] and "--ignore=tests/kernels/test_gate.py" in cmds["tests"]
    assert "-p vlfast.bench.gpu_check" in cmds["tests"]
    assert "_bench-run --module attention --case 'vit_b16 fwd+bwd' -- --device cuda" in cmds["bench:attention-vit_b16"]
    for p in phases:
        assert p["status"] == "not run" and p["reason"].startswith("dry run") and p["wall_s"] is None
        assert p["command"] in printed

    # no GPU number anywhere: tests and goals are "not run", not zero
    assert summary["tests"]["passed"] is None and "dry run" in summary["tests"]["status"]
    assert summary["bench"]["goals"] == [] and summary["bench"]["counts"] == {"met": 0, "MISSED": 0, "NOT MEASURED": 0}
    assert all(r["status"] == "not run" for r in summary["bench"]["runs"])
    assert "DRY RUN" in printed and "[NOT MEASURED] run ema" in printed

    # the metadata is this machine's
    m = summary["metadata"]
    assert m["torch_version"] == torch.__version__ and m["torch_cuda"] == torch.version.cuda
    assert m["python_version"] == platform.python_version() and m["python_executable"] == sys.executable
    assert m["triton_version"] == gc._dist_version("triton")
    assert m["vlfast_version"] == importlib.metadata.version("vlfast")
    assert m["git_commit"] == "cafe1234" and m["git_source"] == "--commit"
    assert m["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert m["device_type"] == "cpu" and m["gpu"] is None and m["device"] == m["host_cpu"]
    assert re.match(r"\d{4}-\d\d-\d\dT", m["date"])
    assert summary["budgets"]["total_s"] == gc.TOTAL_BUDGET_S


def test_resolve_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("VLFAST_COMMIT", raising=False)
    assert gc.resolve_commit(tmp_path) == {"commit": "unknown", "source": None, "dirty": None}
    (tmp_path / "COMMIT").write_text("0123abcd  (copied without .git)\n")
    assert gc.resolve_commit(tmp_path)["commit"] == "0123abcd"
    assert gc.resolve_commit(tmp_path)["source"] == "COMMIT file"
    monkeypatch.setenv("VLFAST_COMMIT", "feedbeef")
    assert gc.resolve_commit(tmp_path) == {"commit": "feedbeef", "source": "$VLFAST_COMMIT", "dirty": None}
    assert gc.resolve_commit(tmp_path, "abc")["source"] == "--commit"
    monkeypatch.delenv("VLFAST_COMMIT")
    head = _git_head()
    if head is not None and (REPO / ".git").exists():
        got = gc.resolve_commit(REPO)
        assert got["commit"] == head and got["source"] == "git" and got["dirty"] in (True, False)


_FAKE_BENCH = '''
import os
from vlfast.bench.harness import Case, Target, register

@register("fakeop")
def cases(device, quick):
    for name in ("case a", "case b", "case c"):
        with open(os.environ["GC_BUILT"], "a") as f:
            f.write(name + "\\n")
        yield Case(op="fakeop", name=name, shape="-", dtype="fp32",
                   providers={"base": lambda: None, "fast": lambda: None}, baselines=["base"],
                   candidates=["fast"], targets=[Target("no slower", "fast", baseline="base", minimum=0.0)])
'''


def test_full_check_on_a_stand_in(tmp_path, monkeypatch, capsys):
    """The whole non-dry path (phases, deadline, outcome log, driver, summary) on the CPU: the GPU is a
    stand-in (metadata says CUDA), the benchmark is a small fake module run with --device cpu --quick."""
    pkg = tmp_path / "gcfake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cases.py").write_text(textwrap.dedent(_FAKE_BENCH))
    (tmp_path / "test_tiny.py").write_text("import pytest\n\ndef test_ok(): pass\n\n"
                                           "def test_skipped(): pytest.skip('here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GC_BUILT", str(tmp_path / "built.txt"))
    real = gc.collect_metadata
    monkeypatch.setattr(gc, "collect_metadata", lambda repo, commit=None: {**real(repo, commit),
                                                                           "cuda_available": True})
    monkeypatch.setattr(gc, "BENCH_RUNS", (gc.BenchRun("fake", "fakeop", "gcfake.cases", ("case b",), 90),
                                           gc.BenchRun("too-long", "fakeop", "gcfake.cases", (), 10_000)))
    monkeypatch.setattr(gc, "BENCH_MIN_S", 30)

    cuda_cmd = gc._bench_cmd

    def cpu_cmd(python, out, run):
        return cuda_cmd(python, out, run)[:-6] + ["--", "--device", "cpu", "--quick", "--out", str(out),
                                                       "--no-plot"]

    monkeypatch.setattr(gc, "_bench_cmd", cpu_cmd)
    out = tmp_path / "out"
    rc = gc.main(["--out", str(out), "--install", "skip", "--total-budget", "300", "--quiet",
                  "--tests", str(tmp_path / "test_tiny.py")])
    printed = capsys.readouterr().out
    summary = json.loads((out / gc.SUMMARY_NAME).read_text())
    assert rc == 0, printed
    assert summary["ok"] is True and summary["dry_run"] is False
    assert [(p["name"], p["status"]) for p in summary["phases"]] == [
        ("vlfast-info", "ok"), ("tests", "ok"), ("bench:fake", "ok"), ("bench:too-long", "skipped")]
    t = summary["tests"]
    assert (t["passed"], t["skipped"], t["failed"], t["error"]) == (1, 1, 0, 0)
    assert "1 passed" in t["pytest_summary_line"]
    assert (tmp_path / "built.txt").read_text().split("\n")[:-1] == ["case a", "case b"]  # "case c" never built
    fake, too_long = summary["bench"]["runs"]
    assert fake["rows"] == {"ok": 2} and [g["status"] for g in fake["goals"]] == ["met"]
    assert too_long["status"] == "skipped" and "time budget" in too_long["reason"]
    assert summary["bench"]["counts"] == {"met": 1, "MISSED": 0, "NOT MEASURED": 0}
    jsonl = [f for f in summary["files"] if f.endswith(".jsonl") and gc.OUTCOMES_NAME not in f]
    assert len(jsonl) == 1
    rows = [json.loads(line) for line in Path(jsonl[0]).read_text().splitlines()]
    assert {r["case"] for r in rows} == {"case b"} and all(r["git_commit"] for r in rows)
    assert "[met] fakeop / case b: no slower" in printed and "[NOT MEASURED] run too-long" in printed


def test_new_rows_fill_an_unknown_commit(tmp_path):
    path = tmp_path / "cuda-x.jsonl"
    path.write_text(json.dumps({"case": "old", "git_commit": "unknown"}) + "\n")
    before = gc._jsonl_sizes(tmp_path)
    with open(path, "a") as f:
        f.write(json.dumps({"case": "new", "git_commit": "unknown", "targets": []}) + "\n")
    files, rows = gc._new_rows(tmp_path, before, {"commit": "0123abcd", "source": "COMMIT file"})
    assert files == [str(path)] and [r["case"] for r in rows] == ["new"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"case": "old", "git_commit": "unknown"}  # rows of earlier runs are left alone
    assert lines[1]["git_commit"] == "0123abcd" and lines[1]["git_commit_source"] == "COMMIT file"


def test_goal_status_from_harness_targets():
    t = dict(kind="target", op="ema", case="vit_l16", description="d", candidate="vlfast", baseline="loop",
             minimum=1.2, maximum=None, key=None)
    rows = [{"status": "ok"}, {"status": "error", "op": "ema", "case": "c", "provider": "p", "error": "x\nBoom",
                               "targets": [{**t, "metric": "speedup", "value": 1.5, "met": True},
                                           {**t, "metric": "speedup", "value": 1.1, "met": False},
                                           {**t, "metric": "frac_copy_bw", "value": None, "met": None}]}]
    got = gc.summarize_bench_rows(rows)
    assert [g["status"] for g in got["goals"]] == ["met", "MISSED", "NOT MEASURED"]
    assert got["rows"] == {"ok": 1, "error": 1} and got["errors"] == ["ema / c / p: Boom"]


def test_pytest_outcomes_plugin(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("setup fails")

        def test_pass(): pass
        def test_fail(): assert False
        def test_skip(): pytest.skip("no")
        @pytest.mark.xfail(reason="known")
        def test_xfail(): assert False
        def test_error(broken): pass
    """))
    log = tmp_path / "outcomes.jsonl"
    env = dict(os.environ, **{gc.OUTCOMES_ENV: str(log)})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "vlfast.bench.gpu_check",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_sample.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    got = gc.read_outcomes(log)
    assert {k: got[k] for k in gc.OUTCOME_KINDS} == dict(passed=1, failed=1, error=1, skipped=1, xfailed=1, xpassed=0)
    assert sorted(f.split("::")[1] for f in got["failures"]) == ["test_error (error in setup)",
                                                                 "test_fail (failed in call)"]


def test_run_phase_kills_the_process_group_at_its_limit(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    phase = gc.Phase("sleeper", [sys.executable, "-c", code], budget_s=2.5)
    log = gc.Log(tmp_path / "log.txt", echo=False)
    tail = gc.run_phase(phase, 2.5, tmp_path, log)
    log.close()
    assert phase.status == "timeout" and phase.rc is None and phase.wall_s < 30
    assert "started" in "".join(tail) and "sleeper: timeout" in (tmp_path / "log.txt").read_text()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # the grandchild got the signal too (the group's)
        time.sleep(0.1)
    assert not _alive(pid), f"grandchild {pid} outlived the phase's kill"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped
