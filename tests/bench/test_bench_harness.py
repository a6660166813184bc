"""Tests of the benchmark harness (``vlfast.bench.harness``) and the EMA benchmark."""

import datetime
import importlib
import importlib.util
import json
import math
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _import_harness():
    try:
        return importlib.import_module("vlfast.bench.harness")
    except ModuleNotFoundError as exc:
        if exc.name != "vlfast.bench":
            raise
    # vlfast imports, but its bench subpackage is not installed (setup.py maps the
    # top-level bench/ folder to vlfast.bench): load it from this source tree.
    import vlfast

    bench_dir = REPO / "bench"
    warnings.warn(f"vlfast.bench is not installed; loading it from {bench_dir}", stacklevel=2)
    spec = importlib.util.spec_from_file_location(
        "vlfast.bench", bench_dir / "__init__.py", submodule_search_locations=[str(bench_dir)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vlfast.bench"] = mod
    spec.loader.exec_module(mod)
    vlfast.bench = mod
    return importlib.import_module("vlfast.bench.harness")


harness = _import_harness()
Result = harness.Result

META_FIELDS = [
    "device", "device_type", "cpu_count", "torch_threads", "torch_version", "triton_version",
    "vlfast_version", "git_commit", "git_dirty", "timestamp", "copy_gbps", "quick",
]
ROW_FIELDS = [
    "op", "case", "shape", "dtype", "provider", "status", "ms", "speedups", "gbps", "frac_copy_bw", "tflops",
]


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(out: Path):
    files = sorted(out.glob("*.jsonl"))
    assert len(files) == 1, f"expected one jsonl in {out}, found {files}"
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


@pytest.mark.slow  # a benchmark run
def test_quick_ema_run(tmp_path, capsys):
    # the ema op's cases ("vit_tiny fp32-ema/...": "ema" alone also matches zero's "EMA update FSDP2" cases)
    rc = harness.main(["--quick", "--out", str(tmp_path), "--filter", "fp32-ema"])
    cap = capsys.readouterr()
    assert rc == 0, f"harness returned {rc}\nstdout:\n{cap.out}\nstderr:\n{cap.err}"

    rows = _rows(tmp_path)
    assert rows
    for r in rows:
        missing = [k for k in META_FIELDS + ROW_FIELDS if k not in r]
        assert not missing, f"row lacks {missing}: {r}"
        assert r["status"] in ("ok", "unavailable"), r
        assert r["op"] == "ema"
        assert isinstance(r["device"], str) and r["device"]
        assert r["torch_threads"] >= 1 and r["cpu_count"] >= 1
        assert isinstance(r["git_commit"], str) and r["git_commit"]
        assert r["git_dirty"] in (True, False, None)
        assert r["quick"] is True
        assert datetime.datetime.fromisoformat(r["timestamp"]).tzinfo is not None
        if r["status"] == "unavailable":
            assert r["error"], f"unavailable provider without a reason: {r}"

    ok = [r for r in rows if r["status"] == "ok"]
    cases = {r["case"] for r in ok}
    assert {"vit_tiny fp32-ema/bf16-params", "vit_tiny fp32-ema/fp32-params"} <= cases
    for case in cases:
        by_provider = {r["provider"]: r for r in ok if r["case"] == case}
        assert {"loop", "foreach_lerp", "vlfast"} <= set(by_provider), by_provider.keys()
        for prov, r in by_provider.items():
            assert r["ms"] > 0 and math.isfinite(r["ms"])
            expected = {b for b in ("loop", "foreach_lerp") if b != prov}
            assert set(r["speedups"]) == expected, (prov, r["speedups"])
            for b, s in r["speedups"].items():
                assert isinstance(s, float) and s > 0 and math.isfinite(s)
                assert s == pytest.approx(by_provider[b]["ms"] / r["ms"], rel=1e-6)
            # memory-bound figures: bytes / time, and their share of the copy bandwidth
            assert r["bytes_moved"] > 0
            assert r["gbps"] == pytest.approx(r["bytes_moved"] / (r["ms"] * 1e-3) / 1e9, rel=1e-6)
            assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / r["copy_gbps"], rel=1e-6)
            assert r["tflops"] is None

    # the table went to stdout
    assert "provider" in cap.out and "%copy-BW" in cap.out and "vs loop" in cap.out
    assert "vit_tiny fp32-ema/bf16-params" in cap.out

    # the launch-plan account (vlfast.kernels.plan): printed and written beside the jsonl
    assert "launch plan on an H200" in cap.out and "issued/useful" in cap.out
    plan = json.loads(next(tmp_path.glob("*-plan.json")).read_text())
    assert plan["git_commit"] == rows[0]["git_commit"]
    ops = {(a["op"], a["phase"]) for a in plan["launch_plan"]}
    assert {("attention", "fwd"), ("attention", "bwd"), ("infonce", "bwd"), ("siglip", "fwd")} <= ops
    for a in plan["launch_plan"]:
        assert a["issued"] >= a["useful"] > 0 and a["bytes"] >= a["min_bytes"] > 0, a

    pngs = list(tmp_path.glob("*.png"))
    if _have_matplotlib():
        assert len(pngs) == 1, pngs
        assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not pngs
        assert "matplotlib" in cap.err and "warning" in cap.err.lower()


def test_plot_without_matplotlib_warns(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    results = [
        Result("op", "c", "s", "d", "base", "ok", role="baseline", ms=2.0),
        Result("op", "c", "s", "d", "fast", "ok", role="candidate", ms=1.0),
    ]
    harness.compute_speedups(results, ["base"])
    assert harness.write_plot(results, tmp_path / "x.png", "title") is None
    assert not (tmp_path / "x.png").exists()
    err = capsys.readouterr().err
    assert "warning" in err.lower() and "matplotlib" in err


@pytest.mark.skipif(not _have_matplotlib(), reason="matplotlib not installed (the harness warns instead)")
def test_plot_writes_png(tmp_path):
    results = [
        Result("op", "c", "s", "d", "base", "ok", role="baseline", ms=2.0),
        Result("op", "c", "s", "d", "fast", "ok", role="candidate", ms=1.0),
    ]
    harness.compute_speedups(results, ["base"])
    path = harness.write_plot(results, tmp_path / "x.png", "title")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


def test_speedups_and_table_format():
    results = [
        Result("ema", "vit_b16 fp32", "152 tensors", "fp32", "loop", "ok", role="baseline", ms=10.0,
               gbps=100.0, frac_copy_bw=0.5, bytes_moved=10**9),
        Result("ema", "vit_b16 fp32", "152 tensors", "fp32", "foreach_lerp", "ok", role="baseline", ms=4.0),
        Result("ema", "vit_b16 fp32", "152 tensors", "fp32", "vlfast", "ok", role="candidate", ms=2.5),
        Result("ema", "vit_b16 fp32", "152 tensors", "fp32", "vlfast[triton]", "unavailable", role="candidate",
               error="RuntimeError: Triton needs CUDA"),
        Result("ema", "vit_b16 fp32", "152 tensors", "fp32", "vlfast[native]", "error", role="candidate",
               error="Traceback (most recent call last):\n  ...\nValueError: kaput"),
    ]
    harness.compute_speedups(results, ["loop", "foreach_lerp"])
    assert results[0].speedups == {"foreach_lerp": pytest.approx(4.0 / 10.0)}
    assert results[1].speedups == {"loop": pytest.approx(10.0 / 4.0)}
    assert results[2].speedups == {"loop": pytest.approx(4.0), "foreach_lerp": pytest.approx(1.6)}
    assert results[3].speedups == {} and results[4].speedups == {}

    table = harness.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    header = lines[0].split()
    assert header[:4] == ["op", "case", "shape", "provider"]
    assert "time (ms)" in lines[0] and "speedup" in lines[0] and "GB/s" in lines[0] and "%copy-BW" in lines[0]
    assert "TFLOP/s" not in lines[0]  # no row has flops
    assert set(lines[1].replace(" ", "")) == {"-"}
    vl = next(l for l in lines if " vlfast " in l)
    assert "2.500" in vl and "x4.00 vs loop" in vl and "x1.60 vs foreach_lerp" in vl
    loop = next(l for l in lines if " loop " in l)
    assert "10.000" in loop and "100.0" in loop and "50.0%" in loop and "x0.40 vs foreach_lerp" in loop
    assert "unavailable" in lines[5] and "Triton needs CUDA" in lines[5]
    assert "ERROR" in lines[6] and "ValueError: kaput" in lines[6]
    # columns line up: "provider" starts at the same offset on every line
    col = lines[0].index("provider")
    assert all(l[col:].split()[0] in ("provider", "loop", "foreach_lerp", "vlfast", "vlfast[triton]",
                                      "vlfast[native]") or set(l[col:].split()[0]) == {"-"} for l in lines)

    flops_rows = [Result("mm", "c", "s", "bf16", "torch", "ok", ms=1.0, tflops=123.456)]
    t2 = harness.format_table(flops_rows)
    assert "TFLOP/s" in t2.splitlines()[0] and "123.46" in t2


def _write_pkg(tmp_path, files):
    pkg = f"vlfast_bench_testpkg_{uuid.uuid4().hex[:8]}"
    d = tmp_path / "src" / pkg
    d.mkdir(parents=True)
    (d / "__init__.py").write_text("")
    for name, text in files.items():
        (d / f"{name}.py").write_text(textwrap.dedent(text))
    return pkg, tmp_path / "src"


GOOD_MODULE = """
    from {harness} import Case, register

    @register("dummyop")
    def cases(device, quick):
        data = list(range(2000))
        yield Case(
            op="dummyop", name="tiny sum", shape="2000", dtype="int",
            providers={{"slow": lambda: sum(data) + sum(data), "fast": lambda: sum(data)}},
            baselines=["slow"], candidates=["fast", "missing_backend"], bytes_moved=16000, flops=2000,
            unavailable={{"missing_backend": "RuntimeError: not built"}},
        )
"""


def test_module_import_error_is_reported(tmp_path, monkeypatch, capsys):
    pkg, src = _write_pkg(tmp_path, {
        "good": GOOD_MODULE.format(harness=harness.__name__),
        "broken": "raise RuntimeError('boom at import of the benchmark module')\n",
    })
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.setattr(harness, "_REGISTRY", {})
    monkeypatch.setattr(harness, "MODULES", [f"{pkg}.good", f"{pkg}.broken"])
    out = tmp_path / "out"
    rc = harness.main(["--quick", "--out", str(out), "--no-plot"])
    cap = capsys.readouterr()
    assert rc != 0
    assert f"{pkg}.broken" in cap.err and "boom at import of the benchmark module" in cap.err
    # the good module still ran; the failure is a row of the table and of the jsonl
    rows = _rows(out)
    err = [r for r in rows if r["status"] == "error"]
    assert len(err) == 1 and "boom at import" in err[0]["error"] and pkg in err[0]["case"]
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"slow", "fast"}
    assert ok["fast"]["speedups"]["slow"] == pytest.approx(ok["slow"]["ms"] / ok["fast"]["ms"], rel=1e-6)
    assert ok["fast"]["tflops"] == pytest.approx(2000 / (ok["fast"]["ms"] * 1e-3) / 1e12, rel=1e-6)
    unavail = [r for r in rows if r["status"] == "unavailable"]
    assert [r["provider"] for r in unavail] == ["missing_backend"] and unavail[0]["error"] == "RuntimeError: not built"
    assert "ERROR" in cap.out and "TFLOP/s" in cap.out and "unavailable" in cap.out
    assert not list(out.glob("*.png"))  # --no-plot


def test_failing_provider_and_case_builder_are_errors(tmp_path, monkeypatch, capsys):
    pkg, src = _write_pkg(tmp_path, {"mod": f"""
        from {harness.__name__} import Case, register

        def _fail():
            raise ValueError("provider exploded")

        @register("failop")
        def cases(device, quick):
            yield Case(op="failop", name="case one", shape="-", dtype="-",
                       providers={{"base": lambda: None, "bad": _fail}}, baselines=["base"], candidates=["bad"])

        @register("failbuild")
        def cases2(device, quick):
            raise MemoryError("cannot build the case")
            yield
    """})
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.setattr(harness, "_REGISTRY", {})
    monkeypatch.setattr(harness, "MODULES", [f"{pkg}.mod"])
    rc = harness.main(["--quick", "--out", str(tmp_path / "out"), "--no-plot"])
    cap = capsys.readouterr()
    assert rc != 0
    assert "case one" in cap.err and "provider exploded" in cap.err
    assert "cannot build the case" in cap.err
    rows = _rows(tmp_path / "out")
    assert {(r["op"], r["provider"], r["status"]) for r in rows} == {
        ("failop", "base", "ok"), ("failop", "bad", "error"), ("failbuild", "-", "error")}


@pytest.mark.slow  # listing builds every case (~15 s)
def test_list_and_filter(capsys, tmp_path):
    assert harness.main(["--list", "--quick", "--filter", "ema"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny fp32-ema/bf16-params" in out and "foreach_lerp" in out and "vlfast" in out
    assert harness.main(["--quick", "--filter", "no-such-op-xyz", "--out", str(tmp_path)]) != 0
    assert "no benchmark case matches" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert harness.main(["--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "cuda" in capsys.readouterr().err


def test_vit_shapes_match_timm_counts():
    ema = importlib.import_module(harness.__name__.rsplit(".", 1)[0] + ".ema")
    for model, n in {"vit_s16": 22_050_664, "vit_b16": 86_567_656, "vit_l16": 304_326_632}.items():
        shapes = ema.vit_param_shapes(model)
        assert sum(math.prod(s) for _, s in shapes) == n
        assert len(shapes) == 4 + 12 * ema.VIT_CONFIGS[model][1] + 4


def test_default_out_dir():
    here = Path(harness.__file__).resolve().parent
    if harness._source_checkout() is not None:
        assert harness.default_out_dir() == here / "results"
    else:
        assert harness.default_out_dir() == Path.cwd() / "vlfast-bench-results"


@pytest.mark.slow  # a benchmark run
def test_ema_unavailable_backend_is_a_row(tmp_path, monkeypatch, capsys):
    # On CPU, triton runs only under TRITON_INTERPRET=1: asking for it must give an
    # "unavailable" row with the op's reason, not an error and not a silent gap.
    if harness._resolve_device("auto").type != "cpu":
        pytest.skip("checks the CPU path (on CUDA every backend may be available)")
    ema = importlib.import_module(harness.__name__.rsplit(".", 1)[0] + ".ema")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(ema.BACKENDS, "cpu", ["native", "triton"])
    rc = harness.main(["--quick", "--out", str(tmp_path), "--filter", "fp32-params", "--no-plot"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = [r for r in _rows(tmp_path) if r["provider"] == "vlfast[triton]"]
    assert len(rows) == 1 and rows[0]["status"] == "unavailable" and rows[0]["role"] == "candidate"
    assert "RuntimeError" in rows[0]["error"]
    assert "vlfast[triton]" in cap.out and "unavailable" in cap.out


def test_targets_are_checked_on_measured_ratios():
    import torch

    from vlfast.bench.harness import Result, Target, check_targets, format_targets

    r = Result(op="ema", case="c", shape="-", dtype="-", provider="vlfast", status="ok", ms=1.0,
               speedups={"loop": 2.5, "foreach_lerp": 0.9}, frac_copy_bw=0.5)
    targets = [Target("2x loop", "vlfast", baseline="loop", minimum=2.0, device="cpu"),
               Target("1x foreach", "vlfast", baseline="foreach_lerp", minimum=1.0, device="cpu"),
               Target("gpu only", "vlfast", baseline="loop", minimum=1.0, device="cuda"),
               Target("H200 only", "vlfast", metric="frac_copy_bw", minimum=0.85, device_name="H200"),
               Target("missing provider", "vlfast[triton]", baseline="loop", minimum=1.0)]
    checks = check_targets([(("ema", "c", targets), [r])], torch.device("cpu"), "Some CPU")
    got = {c["description"]: c["met"] for c in checks}
    assert got == {"2x loop": True, "1x foreach": False, "missing provider": None}
    text = format_targets(checks)
    assert "[met]" in text and "[MISSED]" in text and "[NOT MEASURED]" in text


def test_self_timed_providers(tmp_path, monkeypatch, capsys):
    # providers that measure themselves (e.g. ranks in subprocesses): their Measured is the row;
    # speedups, items/s and targets use it; a failing or ill-typed one is an error row
    pkg, src = _write_pkg(tmp_path, {"mod": f"""
        from {harness.__name__} import Case, Measured, SelfTimed, Target, register

        def _boom():
            raise RuntimeError("rank 1 exited with code 1")

        @register("selftimed")
        def cases(device, quick):
            yield Case(op="selftimed", name="ranks", shape="-", dtype="-", items=8,
                       providers={{"base": SelfTimed(lambda: Measured(ms=40.0, runs=5)),
                                   "fast": SelfTimed(lambda: Measured(ms=5.0, runs=7, extra={{"ranks": 2.0}})),
                                   "bad": SelfTimed(_boom), "wrong": SelfTimed(lambda: 3.0)}},
                       baselines=["base"], candidates=["fast", "bad", "wrong"],
                       targets=[Target("5x base", "fast", baseline="base", minimum=5.0)])
    """})
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.setattr(harness, "_REGISTRY", {})
    monkeypatch.setattr(harness, "MODULES", [f"{pkg}.mod"])
    assert harness.main(["--list", "--quick"]) == 0
    assert "base, fast, bad, wrong" in capsys.readouterr().out
    rc = harness.main(["--quick", "--out", str(tmp_path / "out"), "--no-plot"])
    cap = capsys.readouterr()
    assert rc != 0  # the two broken providers
    rows = {r["provider"]: r for r in _rows(tmp_path / "out")}
    assert rows["base"]["ms"] == 40.0 and rows["base"]["runs"] == 5 and rows["base"]["status"] == "ok"
    assert rows["fast"]["ms"] == 5.0 and rows["fast"]["runs"] == 7
    assert rows["fast"]["speedups"] == {"base": pytest.approx(8.0)}
    assert rows["fast"]["extra"] == {"ranks": 2.0, "items/s": pytest.approx(8 / 5e-3)}
    assert rows["bad"]["status"] == "error" and "rank 1 exited" in rows["bad"]["error"]
    assert rows["wrong"]["status"] == "error" and "not Measured" in rows["wrong"]["error"]
    assert "[met] selftimed / ranks: 5x base (measured x8.00" in cap.out


def test_quick_dropin_run(tmp_path, capsys):
    # the drop-in case patches a real timm model and times both providers side by side
    rc = harness.main(["--quick", "--out", str(tmp_path), "--filter", "dropin", "--no-plot"])
    cap = capsys.readouterr()
    assert rc == 0, f"harness returned {rc}\nstdout:\n{cap.out}\nstderr:\n{cap.err}"
    ok = [r for r in _rows(tmp_path) if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"dropin"}
    (case,) = {r["case"] for r in ok}
    assert case.startswith("timm vit_base_patch16_224 train step (2 timm Attention)"), case
    by_provider = {r["provider"]: r for r in ok}
    assert set(by_provider) == {"unpatched", "vlfast.patch"}
    assert set(by_provider["vlfast.patch"]["speedups"]) == {"unpatched"}
    assert all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in ok)


def test_quick_data_pipeline_run(tmp_path, capsys):
    # the pipeline case decodes real JPEGs with 0, 1 and 2 workers beside the step they feed
    rc = harness.main(["--quick", "--out", str(tmp_path), "--filter", "data", "--no-plot"])
    cap = capsys.readouterr()
    assert rc == 0, f"harness returned {rc}\nstdout:\n{cap.out}\nstderr:\n{cap.err}"
    ok = [r for r in _rows(tmp_path) if r["status"] == "ok" and r["op"] == "data"]
    providers = {r["provider"] for r in ok}
    assert {"0 workers", "1 worker", "2 workers", "train step", "step fed by 0 workers",
            "step fed by 2 workers"} <= providers, providers
    assert all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in ok)
    assert "truncated" not in cap.err
