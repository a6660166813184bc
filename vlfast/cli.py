"""The ``vlfast`` command: ``vlfast info``, ``vlfast bench``, ``vlfast train`` and ``vlfast eval``."""

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import List, Optional


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_packages() -> dict:
    """Optional accelerators vlfast can use: ``{name: version or reason it is unusable}``.

    Detection looks for the modules without importing them (importing DeepSpeed
    or xformers is slow); NVIDIA apex is not on the package registry, so it counts
    as present only with its compiled ``amp_C`` multi-tensor extension.
    """
    out = {}
    for name in ("xformers", "deepspeed"):
        v = _version(name)
        out[name] = v if v and importlib.util.find_spec(name) else "not installed"
    if importlib.util.find_spec("apex") is None:
        out["apex"] = "not installed (build it from NVIDIA's repository; it is not on the package registry)"
    elif importlib.util.find_spec("amp_C") is None:
        out["apex"] = "installed without its CUDA extensions (amp_C missing)"
    else:
        out["apex"] = _version("apex") or "installed"
    return out


def info(out=None, kernels: bool = False, only: Optional[str] = None) -> int:
    """Print versions, devices, backends and tile tables; with ``kernels``, also the sm_90a compile gate's
    table (``vlfast.kernels.gate``, cases matching the regex ``only``) and return its exit status."""
    import torch

    import vlfast
    from vlfast import _backend, _native

    out = sys.stdout if out is None else out

    def p(*a):
        print(*a, file=out)

    p(f"vlfast {vlfast.__version__}  ({os.path.dirname(vlfast.__file__)})")
    p(f"python {platform.python_version()}  torch {torch.__version__}  triton {_version('triton') or 'not installed'}"
      f"  numpy {_version('numpy') or 'not installed'}")
    for name, v in optional_packages().items():
        p(f"{name}: {v}")
    p(f"cpu: {platform.machine()}  {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            p(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), torch CUDA {torch.version.cuda}")
        devices.append("cuda")
    else:
        p(f"cuda: not available (torch CUDA build: {torch.version.cuda or 'no'})")
    p(f"TRITON_INTERPRET: {'on' if _backend.triton_interpret() else 'off'}")
    C = _native.load()
    if C is None:
        p(f"native extension vlfast._C: unavailable: {_native.error()}")
    else:
        details = ", ".join(f"{k}={v}" for k, v in C.build_info().items())
        p(f"native extension vlfast._C: loaded ({details})")
    p("")
    p("backends per op (auto choice first; others: why not):")
    for dev in devices:
        for op, chosen, avail in vlfast.backend_report(dev):
            p(f"  {op} [{dev}]: {chosen}")
            for b, reason in avail.items():
                p(f"      {b:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    p("")
    _print_tile_tables(p, _backend.triton_interpret())
    if not kernels:
        return 0
    p("")
    if importlib.util.find_spec("triton") is None:
        p("kernel compile gate: unavailable (triton is not installed)")
        return 1
    from vlfast.kernels import gate

    return gate.main(["--only", only] if only else [], out=out)


def _print_tile_tables(p, interpreting: bool) -> None:
    """The Triton kernels' tile tables (vlfast.kernels.tile_tables), or why they cannot be shown."""
    if importlib.util.find_spec("triton") is None:
        p("kernel tile tables: unavailable (triton is not installed)")
        return
    try:
        from vlfast.kernels import tile_tables

        tables = tile_tables()
    except ImportError as exc:  # a broken triton install: report it, the rest of info is printed
        p(f"kernel tile tables: unavailable (importing the kernels failed: {type(exc).__name__}: {exc})")
        return
    now = "the interpreter lines apply (TRITON_INTERPRET=1)" if interpreting else "the GPU rows apply"
    p(f"kernel tile tables (first matching row wins; {now}):")
    for name, table in tables.items():
        p(f"  {name}:")
        for line in table.format():
            p(f"    {line}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlfast", description="Fused training kernels for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info_p = sub.add_parser("info", help="versions, devices, and which backend serves each op")
    info_p.add_argument("--kernels", action="store_true",
                        help="also compile every Triton kernel for sm_90a and print the compile gate's table")
    info_p.add_argument("--only", help="with --kernels: only the gate cases whose label matches this regex")
    sub.add_parser("bench", help="run the benchmark harness (vlfast bench --help)", add_help=False)
    sub.add_parser("train", help="train a model (vlfast train --help)", add_help=False)
    sub.add_parser("eval", help="evaluate a checkpoint: zeroshot, retrieval, knn (vlfast eval --help)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info(kernels=args.kernels, only=args.only)
    if args.command == "bench":
        from vlfast.bench.harness import main as bench_main

        return bench_main(rest)
    if args.command == "train":
        from vlfast.training.trainer import main as train_main

        return train_main(rest)
    if args.command == "eval":
        from vlfast.training.evaluate import main as eval_main

        return eval_main(rest)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
