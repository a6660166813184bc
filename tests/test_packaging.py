"""Packaging and the top-level import.

* one version, written in vlfast/__init__.py, read by setuptools and equal to the installed metadata;
* pyproject.toml declares what the Makefile installs (the DeepSpeed pins exactly), and keeps
  matplotlib, tqdm, pillow and DeepSpeed out of the hard requirements;
* ``import vlfast`` is cheap and lazy (no torch, Triton, DeepSpeed or matplotlib), every public
  name resolves on first access, and the optional extras are imported only where used;
* a checkout that was never installed fails at ``import vlfast`` with the fix in the message.

Imports run in fresh interpreters (subprocess): this process has imported vlfast already.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import vlfast

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *flags: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _json_of(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    """The PEP 503 normalized project name of a requirement string ("Foo_Bar>=1; ..." -> "foo-bar")."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def _makefile_pip_installs() -> list:
    """The requirement arguments of each `pip install` command in the Makefile (continuation lines joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if "-m pip install" not in line or line.lstrip().startswith("#"):
            continue
        args = [tok.strip("'\"") for tok in line.split("-m pip install", 1)[1].split()]
        commands.append([a for a in args if not a.startswith(("-", "$(")) and a != "."])
    return commands


# ---------------------------------------------------------------- the version, written once
def test_version_is_the_installed_distributions():
    # an editable install records the version at install time: after a bump, `make install` rewrites it
    assert vlfast.__version__ == importlib.metadata.version("vlfast")


def test_version_is_written_once(pyproject):
    project = pyproject["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vlfast.__version__"}
    # a string literal, so that setuptools reads it without importing vlfast (which needs an install)
    tree = ast.parse((ROOT / "vlfast" / "__init__.py").read_text())
    literals = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
                and isinstance(node.value, ast.Constant)]
    assert literals == [vlfast.__version__]
    # setup.py passes no metadata: pyproject's [project] table is the one place
    setup_tree = ast.parse((ROOT / "setup.py").read_text())
    (call,) = [n for n in ast.walk(setup_tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    metadata = {"name", "version", "description", "python_requires", "install_requires", "extras_require",
                "entry_points", "license", "author", "url"}
    assert metadata.isdisjoint(k.arg for k in call.keywords)


# ---------------------------------------------------------------- dependencies and extras
def test_hard_requirements_are_torch_numpy_and_triton_on_linux_only(pyproject):
    deps = pyproject["project"]["dependencies"]
    assert sorted(_name(d) for d in deps) == ["numpy", "torch", "triton"]
    (triton,) = [d for d in deps if _name(d) == "triton"]
    assert re.search(r";\s*sys_platform\s*==\s*['\"]linux['\"]\s*$", triton), triton
    extras = pyproject["project"]["optional-dependencies"]
    assert {"bench", "data", "deepspeed", "integrations", "dev"} <= set(extras)
    assert sorted(_name(r) for r in extras["bench"]) == ["matplotlib", "tqdm"]
    assert [_name(r) for r in extras["data"]] == ["pillow", "safetensors"]
    assert sorted(_name(r) for r in extras["integrations"]) == ["open-clip-torch", "timm", "torchvision",
                                                                "transformers"]
    assert all("==" in r for r in extras["deepspeed"]), extras["deepspeed"]
    assert pyproject["project"]["scripts"] == {"vlfast": "vlfast.cli:main"}


def test_makefile_installs_only_what_pyproject_declares(pyproject):
    project = pyproject["project"]
    declared = [*project["dependencies"], *pyproject["build-system"]["requires"],
                *(r for reqs in project["optional-dependencies"].values() for r in reqs)]
    declared_names = {_name(r) for r in declared}
    commands = _makefile_pip_installs()
    installed = [r for reqs in commands for r in reqs]
    for req in installed:
        if _name(req) == "torch":  # TORCH_SPEC: pinned by the Makefile for the CPU wheel, a floor in pyproject
            continue
        assert _name(req) in declared_names, f"the Makefile installs {req}, which pyproject.toml does not declare"
        if "==" in req:  # a pin is written the same in both
            assert req in declared, f"the Makefile pins {req}; pyproject.toml says " + \
                ", ".join(r for r in declared if _name(r) == _name(req))
    # the deepspeed extra is exactly what the Makefile's DeepSpeed step installs
    (ds_step,) = [reqs for reqs in commands if any(_name(r) == "deepspeed" for r in reqs)]
    assert sorted(ds_step) == sorted(project["optional-dependencies"]["deepspeed"])


def test_installed_console_script():
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "vlfast"]
    assert ep.value == "vlfast.cli:main"
    assert callable(ep.load())


# ---------------------------------------------------------------- import vlfast: cheap and lazy
_HEAVY = ("torch", "triton", "deepspeed", "matplotlib", "tqdm", "PIL")


def test_import_vlfast_is_cheap_and_imports_no_submodule():
    code = ("import sys, time, json\n"
            "t = time.perf_counter()\n"
            "import vlfast\n"
            "dt = time.perf_counter() - t\n"
            f"print(json.dumps(dict(seconds=dt, heavy=[m for m in {_HEAVY!r} if m in sys.modules],\n"
            "                       submodules=sorted(m for m in sys.modules if m.startswith('vlfast.')))))")
    runs = [_json_of(_python(code, cwd=ROOT)) for _ in range(3)]
    for r in runs:
        assert r["heavy"] == [] and r["submodules"] == [], r
    best = min(r["seconds"] for r in runs)
    assert best < 1.0, f"import vlfast took {best:.3f} s (best of 3)"


def test_public_names_resolve_lazily_without_deepspeed_or_matplotlib():
    code = """
import json, sys
import vlfast

assert sorted(vlfast.__all__) == sorted([*vlfast._SUBMODULES, *vlfast._FUNCTIONS, "__version__"]), vlfast.__all__
assert set(vlfast.__all__) <= set(dir(vlfast)), set(vlfast.__all__) - set(dir(vlfast))
for name in vlfast._SUBMODULES:
    module = getattr(vlfast, name)
    assert module.__name__ == "vlfast." + name, (name, module)
from vlfast import distributed, models, training
assert (vlfast.models, vlfast.training, vlfast.distributed) == (models, training, distributed)
assert callable(vlfast.patch), vlfast.patch
reasons = vlfast.available_backends("ema_update_", "cpu")
assert reasons["torch"] is None, reasons
ops = [row[0] for row in vlfast.backend_report("cpu")]
try:
    vlfast.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("vlfast.no_such_name resolved")
print(json.dumps(dict(ops=ops, loaded=[m for m in ("deepspeed", "matplotlib") if m in sys.modules])))
"""
    r = _json_of(_python(code, cwd=ROOT))
    assert {"attention", "contrastive_loss", "ema_update_", "random_masking", "unshuffle_tokens"} <= set(r["ops"])
    assert r["loaded"] == [], "importing vlfast's packages must not import DeepSpeed or matplotlib"


def test_optional_extras_are_imported_only_where_used():
    # the bench harness, the CLI, the trainer and the data loaders import matplotlib, tqdm, pillow
    # and DeepSpeed inside the functions that use them (tqdm is left out: torch imports it when installed)
    code = ("import json, sys\n"
            "import vlfast.bench.harness, vlfast.cli, vlfast.training.data, vlfast.training.trainer\n"
            "print(json.dumps([m for m in ('matplotlib', 'PIL', 'deepspeed') if m in sys.modules]))")
    assert _json_of(_python(code, cwd=ROOT)) == []


# ---------------------------------------------------------------- a checkout that was never installed
def test_checkout_without_install_names_the_fix(tmp_path):
    # -S: no site, so no .pth file and no editable-install finder: the checkout's vlfast/ first on sys.path,
    # site-packages (torch and the rest) after it, and vlfast not installed
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            "import vlfast")
    proc = _python(code, "-I", "-S", cwd=tmp_path)
    assert proc.returncode != 0
    assert ("ImportError: vlfast is not installed: run `make install` or `pip install --no-build-isolation -e .`"
            in proc.stderr), proc.stderr


def test_installed_checkout_finds_its_kernels_from_the_checkout_root():
    # running from the checkout's root (as make and pytest do) puts its vlfast/ first on sys.path: the
    # editable install's mapping of kernels/ (`make install`) still resolves vlfast.kernels, so the check
    # above does not fire
    code = "import importlib.util, json, vlfast; print(json.dumps(importlib.util.find_spec('vlfast.kernels').origin))"
    origin = Path(_json_of(_python(code, cwd=ROOT)))
    assert origin.name == "__init__.py" and origin.parent.name == "kernels", origin
