"""Build script for vlfast.

The native extension ``vlfast._C`` (pybind11 + C++17, OpenMP, optional CUDA;
no torch headers) is built with CMake + Ninja from ``CMakeLists.txt``.

Install (no build isolation: the build uses the pybind11/cmake/ninja of the
current environment and, in auto mode, imports torch to detect CUDA):

    pip install --no-build-isolation -e .      # editable
    pip install --no-build-isolation .         # regular

Environment:
    VLFAST_CUDA=1|0|auto   compile the CUDA kernels (auto: nvcc found and
                           torch.version.cuda is not None). Default auto.
    VLFAST_CUDA_ARCHS      CUDA architectures, default "80;90".
    VLFAST_NO_NATIVE=1     build no extension at all (pure-Python install).
    VLFAST_BUILD_TYPE      CMake build type, default Release.
    CMAKE_BUILD_PARALLEL_LEVEL  build jobs, default os.cpu_count().
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
NO_NATIVE_MARKER = ROOT / "vlfast" / "_no_native.txt"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    for var in ("CUDACXX",):
        v = os.environ.get(var)
        if v and Path(v).is_file():
            return v
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _torch_cuda_version() -> str | None:
    try:
        import torch  # noqa: PLC0415  (only in auto mode)
    except Exception:  # torch missing or broken: no CUDA build in auto mode
        return None
    return getattr(torch.version, "cuda", None)


def _cuda_decision() -> tuple[bool, str | None, str]:
    """(enabled, nvcc path, reason)."""
    mode = os.environ.get("VLFAST_CUDA", "auto").strip().lower() or "auto"
    if mode in ("0", "false", "no", "off"):
        return False, None, "VLFAST_CUDA=0"
    nvcc = _find_nvcc()
    if mode in ("1", "true", "yes", "on"):
        if nvcc is None:
            raise RuntimeError("VLFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or CUDACXX)")
        return True, nvcc, "VLFAST_CUDA=1"
    if mode != "auto":
        raise RuntimeError(f"VLFAST_CUDA must be 0, 1 or auto, got {mode!r}")
    if nvcc is None:
        return False, None, "auto: nvcc not found"
    tcuda = _torch_cuda_version()
    if tcuda is None:
        return False, nvcc, "auto: torch is not a CUDA build"
    return True, nvcc, f"auto: nvcc found, torch CUDA {tcuda}"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str | os.PathLike = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if shutil.which("cmake") is None:
            raise RuntimeError("vlfast: building the native extension requires cmake (>= 3.18)")
        import pybind11  # build requirement

        ext_fullpath = Path(self.get_ext_fullpath(ext.name)).resolve()
        extdir = ext_fullpath.parent
        extdir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        use_cuda, nvcc, why = _cuda_decision()
        archs = os.environ.get("VLFAST_CUDA_ARCHS", "80;90").replace(",", ";")
        build_type = os.environ.get("VLFAST_BUILD_TYPE", "Release")
        print(f"vlfast: CUDA {'on' if use_cuda else 'off'} ({why})", file=sys.stderr)

        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DVLFAST_OUTPUT_DIR={extdir}",
            f"-DVLFAST_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVLFAST_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if use_cuda:
            cmake_args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DVLFAST_CUDA_ARCHS={archs}"]
        generator = []
        if "CMAKE_GENERATOR" not in os.environ and shutil.which("ninja"):
            generator = ["-G", "Ninja"]
        if "CMAKE_ARGS" in os.environ:  # conventional extra arguments
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        # Always configure fresh (like `cmake --fresh`): cached values from an earlier
        # build (CMAKE_ARGS, CUDA on/off, another generator) must not leak into this one.
        # Object files stay, so ninja still rebuilds only what changed.
        cache = build_temp / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()
        try:
            subprocess.run(
                ["cmake", "-S", ext.sourcedir, "-B", str(build_temp), *generator, *cmake_args],
                check=True,
            )
            subprocess.run(
                ["cmake", "--build", str(build_temp), "--parallel", jobs], check=True
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                "vlfast: building the native extension vlfast._C failed "
                f"(command {exc.cmd!r} exited with {exc.returncode}); see the output above. "
                "Set VLFAST_NO_NATIVE=1 to install without it, or VLFAST_CUDA=0 to skip CUDA."
            ) from exc
        if not ext_fullpath.exists():
            raise RuntimeError(f"vlfast: cmake did not produce {ext_fullpath}")


def _packages() -> list[str]:
    pkgs = ["vlfast"] + [f"vlfast.{p}" for p in find_packages(where="vlfast")]
    for folder, prefix in (("kernels", "vlfast.kernels"), ("bench", "vlfast.bench")):
        if (ROOT / folder).is_dir():
            pkgs.append(prefix)
            pkgs += [f"{prefix}.{p}" for p in find_packages(where=folder)]
    return pkgs


if _truthy("VLFAST_NO_NATIVE"):
    ext_modules: list[Extension] = []
    NO_NATIVE_MARKER.write_text(
        "vlfast was installed with VLFAST_NO_NATIVE=1: the native extension vlfast._C was not built.\n"
    )
    print(
        "vlfast: VLFAST_NO_NATIVE is set -> NOT building the native extension vlfast._C; "
        "native kernels will be unavailable (vlfast._native.error() explains).",
        file=sys.stderr,
    )
else:
    ext_modules = [CMakeExtension("vlfast._C", sourcedir=ROOT)]
    if NO_NATIVE_MARKER.exists():
        NO_NATIVE_MARKER.unlink()

# The project's metadata (name, version, dependencies, extras, the `vlfast` command) is in
# pyproject.toml's [project] table; the version is written once, in vlfast/__init__.py.
setup(
    packages=_packages(),
    package_dir={"vlfast.kernels": "kernels", "vlfast.bench": "bench"},
    package_data={"vlfast": ["_no_native.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
