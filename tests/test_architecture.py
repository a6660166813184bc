"""The package's import graph: one-way layers and no import cycle, lazy (function-level) imports included.

The graph is read from the source with :mod:`ast` (every ``import`` statement anywhere in a
module, and ``importlib.import_module("...")`` with a literal name), so an import hidden in a
function, the usual way to postpone a cycle, counts like any other.  Importing ``a.b.c``
from outside ``a.b`` also runs ``a/__init__`` and ``a/b/__init__``: those edges are added too.
"""

import ast
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set


REPO = Path(__file__).resolve().parents[1]
ROOT = "vlfast"

# Where each installed package's sources live in the checkout (setup.py's package_dir).
SOURCE_DIRS = {"vlfast": REPO / "vlfast", "vlfast.kernels": REPO / "kernels", "vlfast.bench": REPO / "bench"}

# Layers from the bottom: a module may import its own layer (without a cycle) and layers below.
LAYERS = [
    ("vlfast._validation", "vlfast._backend", "vlfast._native", "vlfast._C", "vlfast.kernels"),
    ("vlfast.comm",),
    ("vlfast.reference",),
    ("vlfast.ops",),
    ("vlfast.sharding",),
    ("vlfast.nn", "vlfast.schedules"),
    ("vlfast.models",),
    ("vlfast.integrations", "vlfast.distributed"),
    ("vlfast.training",),
    ("vlfast.cli", "vlfast.__main__", "vlfast.bench", "vlfast.testing"),
]


def module_files(source_dirs: Dict[str, Path]) -> Dict[str, Path]:
    """``{module name: file}`` for every .py file of the packages."""
    out = {}
    for pkg, folder in source_dirs.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg] + parts)
            if any(name.startswith(p + ".") for p in source_dirs if p != pkg and p.startswith(pkg + ".")):
                continue  # e.g. vlfast/kernels/ does not exist, but never list a mapped folder twice
            out[name] = f
    return out


def _resolve(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    edges = set()
    own_ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            anc = ".".join(parts[:i])
            # the root package's __init__ imports nothing eagerly (tested in test_packaging);
            # a package's own ancestors are already being imported
            if anc in known and anc != ROOT and anc not in own_ancestors:
                edges.add(anc)
    edges.discard(module)
    return edges


def import_graph(source_dirs: Dict[str, Path] = SOURCE_DIRS) -> Dict[str, Set[str]]:
    files = module_files(source_dirs)
    return {m: imports_of(m, f, set(files)) for m, f in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise KeyError(module)


def test_every_module_has_a_layer():
    graph = import_graph()
    assert len(graph) > 40, sorted(graph)  # the scan found the package
    missing = [m for m in graph if m != ROOT and not _has_layer(m)]
    assert not missing, f"modules outside every layer of LAYERS: {missing}"


def _has_layer(m):
    try:
        layer_of(m)
        return True
    except KeyError:
        return False


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                    for m, targets in graph.items() if m != ROOT
                    for t in targets if layer_of(t) > layer_of(m))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_module_getattr_below_the_root():
    # `vlfast/__init__.py` resolves its submodules lazily through an explicit table; anywhere else a
    # module-level __getattr__ is the trick that hid the nn.ema <-> distributed.zero cycle
    offenders = []
    for m, f in module_files(SOURCE_DIRS).items():
        if m == ROOT:
            continue
        tree = ast.parse(f.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            offenders.append(m)
    assert not offenders


def _write_package(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return {"pkg": tmp_path / "pkg"}


def test_planted_lazy_cycle_is_found(tmp_path):
    dirs = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": """
            def f():
                from ..high import b  # postponed, still a cycle
                return b
        """,
        "high/__init__.py": "",
        "high/b.py": "from ..low.a import f\n",
    })
    graph = import_graph(dirs)
    assert "pkg.high.b" in graph["pkg.low.a"] and "pkg.low.a" in graph["pkg.high.b"]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"pkg.low.a", "pkg.high.b"} <= set(cycle)


def test_planted_cycle_through_a_package_init_is_found(tmp_path):
    dirs = _write_package(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "from .x import y\n",
        "ops/x.py": "import importlib\ny = 1\ndef g():\n    return importlib.import_module('pkg.dist.z')\n",
        "dist/__init__.py": "",
        "dist/z.py": "from ..ops.x import y\n",  # runs pkg/ops/__init__ -> pkg.ops.x -> pkg.dist.z
    })
    graph = import_graph(dirs)
    assert "pkg.ops" in graph["pkg.dist.z"]
    assert find_cycle(graph) is not None


def test_sibling_imports_inside_a_package_are_not_cycles(tmp_path):
    dirs = _write_package(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "from .a import f\nfrom .b import g\n",
        "ops/a.py": "def f():\n    return 1\n",
        "ops/b.py": "from .a import f\ndef g():\n    return f()\n",
    })
    assert find_cycle(import_graph(dirs)) is None


LAYER_PACKAGES = ["vlfast.comm", "vlfast.ops", "vlfast.sharding", "vlfast.nn", "vlfast.models", "vlfast.distributed",
                  "vlfast.integrations", "vlfast.training"]


def test_each_layer_imports_on_its_own():
    # a fresh interpreter imports each layer first: nothing works only by import order
    import subprocess
    import sys

    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd="/") for m in LAYER_PACKAGES}
    failed = {}
    for m, p in procs.items():
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            failed[m] = err[-2000:]
    assert not failed, failed
