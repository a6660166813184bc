"""The kernel launchers' contract, apart from numerics: bad input raises TypeError / ValueError naming
the argument (also under ``python -O``, which strips ``assert``), and the tile tables cover every
kernel with data that the launchers can read on GPUs and in the interpreter."""

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vlfast.kernels as kernels  # noqa: E402  (a core module: a broken import fails, never skips)
from vlfast.kernels import _common  # noqa: E402
from vlfast.kernels import attention as A  # noqa: E402
from vlfast.kernels import contrastive as C  # noqa: E402
from vlfast.kernels import ema as E  # noqa: E402
from vlfast.kernels import masking as M  # noqa: E402

KERNELS_DIR = Path(A.__file__).resolve().parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- bad input
def bad_calls():
    """``(id, call, exception type, argument the message must name)`` for every launcher."""
    dev = DEVICE
    q = torch.randn(2, 3, 5, 16, device=dev)
    k = torch.randn(2, 3, 7, 16, device=dev)
    out, lse = torch.zeros_like(q), torch.zeros(2, 3, 5, device=dev)
    fwd, bwd = A.attention_forward, A.attention_backward

    def mask(**kw):
        args = dict(dropout_p=0.1, seed=1, offset=0, device=dev)
        args.update(kw)
        return lambda: A.dropout_mask(2, 3, 5, 7, **args)

    f = torch.randn(4, 8, device=dev)
    g = torch.randn(6, 8, device=dev)
    lse_fwd, lse_bwd = C.contrastive_loss_lse_forward, C.contrastive_loss_lse_backward
    sig_fwd, sig_bwd = C.siglip_rows_forward, C.siglip_rows_backward
    vec = torch.zeros(4, device=dev)
    return [
        ("attn-q-not-tensor", lambda: fwd(q.tolist(), k, k, scale=1.0), TypeError, "q"),
        ("attn-q-3d", lambda: fwd(q[0], k, k, scale=1.0), ValueError, "q"),
        ("attn-q-int", lambda: fwd(q.long(), k, k, scale=1.0), TypeError, "q"),
        ("attn-k-dtype", lambda: fwd(q, k.half(), k, scale=1.0), TypeError, "k"),
        ("attn-v-shape", lambda: fwd(q, k, k[:, :, :6], scale=1.0), ValueError, "v"),
        ("attn-k-heads", lambda: fwd(q, k[:, :2], k[:, :2], scale=1.0), ValueError, "k"),
        ("attn-head-dim", lambda: fwd(*(torch.zeros(1, 1, 2, 264, device=dev),) * 3, scale=1.0),
         ValueError, "head dim"),
        ("attn-last-stride", lambda: fwd(q.transpose(2, 3)[..., :5, :5], k[..., :5], k[..., :5], scale=1.0),
         ValueError, "q"),
        ("attn-kpm-dtype", lambda: fwd(q, k, k, key_padding_mask=torch.zeros(2, 7, device=dev), scale=1.0),
         TypeError, "key_padding_mask"),
        ("attn-kpm-shape", lambda: fwd(q, k, k, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device=dev),
                                       scale=1.0), ValueError, "key_padding_mask"),
        ("attn-bias-shape", lambda: fwd(q, k, k, bias=torch.zeros(1, 3, 5, 7, device=dev), scale=1.0),
         ValueError, "bias"),
        ("attn-causal-type", lambda: fwd(q, k, k, causal="yes", scale=1.0), TypeError, "causal"),
        ("attn-scale-type", lambda: fwd(q, k, k, scale="x"), TypeError, "scale"),
        ("attn-dropout-one", lambda: fwd(q, k, k, scale=1.0, dropout_p=1.0), ValueError, "dropout_p"),
        ("attn-seed-float", lambda: fwd(q, k, k, scale=1.0, dropout_p=0.1, seed=1.5), TypeError, "seed"),
        ("attn-offset-negative", lambda: fwd(q, k, k, scale=1.0, offset=-1), ValueError, "offset"),
        ("bwd-lse-dtype", lambda: bwd(out, q, k, k, out, lse.double(), scale=1.0), TypeError, "lse"),
        ("bwd-lse-shape", lambda: bwd(out, q, k, k, out, lse[:, :, :4], scale=1.0), ValueError, "lse"),
        ("bwd-do-shape", lambda: bwd(out[:, :, :4], q, k, k, out, lse, scale=1.0), ValueError, "do"),
        ("bwd-out-dtype", lambda: bwd(out, q, k, k, out.half(), lse, scale=1.0), TypeError, "out"),
        ("bwd-grad-shape-3d", lambda: bwd(out, q, k, k, out, lse, scale=1.0, bias_grad_shape=(2, 3, 5)),
         ValueError, "bias_grad_shape"),
        ("bwd-grad-shape-broadcast", lambda: bwd(out, q, k, k, out, lse, scale=1.0, bias_grad_shape=(2, 2, 5, 7)),
         ValueError, "bias_grad_shape"),
        ("bwd-grad-shape-type", lambda: bwd(out, q, k, k, out, lse, scale=1.0, bias_grad_shape=4),
         TypeError, "bias_grad_shape"),
        ("bwd-deterministic-type", lambda: bwd(out, q, k, k, out, lse, scale=1.0, deterministic=1),
         TypeError, "deterministic"),
        ("mask-B-negative", lambda: A.dropout_mask(-1, 3, 5, 7, dropout_p=0.1, seed=1, offset=0, device=dev),
         ValueError, "B"),
        ("mask-Nk-float", lambda: A.dropout_mask(2, 3, 5, 7.0, dropout_p=0.1, seed=1, offset=0, device=dev),
         TypeError, "Nk"),
        ("mask-p-range", mask(dropout_p=1.5), ValueError, "dropout_p"),
        ("mask-p-type", mask(dropout_p=None), TypeError, "dropout_p"),
        ("mask-seed-type", mask(seed="1"), TypeError, "seed"),
        ("mask-seed-range", mask(seed=2 ** 64), ValueError, "seed"),
        ("mask-offset-range", mask(offset=2 ** 63 - 10), ValueError, "offset"),
        ("mask-device-type", mask(device=3.0), TypeError, "device"),
        ("mask-device-value", mask(device="no-such-device"), ValueError, "device"),
        ("lse-q-1d", lambda: lse_fwd(f[0], g, 1.0), ValueError, "q"),
        ("lse-k-dtype", lambda: lse_fwd(f, g.half(), 1.0), TypeError, "k"),
        ("lse-k-dim", lambda: lse_fwd(f, g[:, :4], 1.0), ValueError, "k"),
        ("lse-scale-type", lambda: lse_fwd(f, g, None), TypeError, "scale"),
        ("lse-sq-alone", lambda: lse_fwd(f, g, 1.0, sq=f), ValueError, "sk"),
        ("lse-soft-rows", lambda: lse_fwd(f, g, 1.0, sq=f[:3], sk=g), ValueError, "sq"),
        ("lse-soft-scale-type", lambda: lse_fwd(f, g, 1.0, f, g, soft_scale="2"), TypeError, "soft_scale"),
        ("lse-bwd-soft-missing", lambda: lse_bwd(f, g, 1.0, vec, vec, f, g, 1.0, None, vec), ValueError, "soft_lse"),
        ("lse-bwd-lse-length", lambda: lse_bwd(f, g, 1.0, vec[:3], vec), ValueError, "lse"),
        ("lse-bwd-g-type", lambda: lse_bwd(f, g, 1.0, vec, [0.0] * 4), TypeError, "g_lse"),
        ("siglip-y-dim", lambda: sig_fwd(f, g[:, :3], 1.0, 0.0), ValueError, "y"),
        ("siglip-bias-type", lambda: sig_fwd(f, g, 1.0, "0"), TypeError, "bias"),
        ("siglip-pos-type", lambda: sig_fwd(f, g, 1.0, 0.0, 1.0), TypeError, "pos_offset"),
        ("siglip-bwd-g-length", lambda: sig_bwd(f, g, 1.0, 0.0, vec[:2]), ValueError, "g_row"),
    ]


def run_bad_calls():
    """Every bad call, with its expected exception; returns the failures as text (empty: all good)."""
    failures = []
    for name, call, exc_type, arg in bad_calls():
        try:
            call()
        except exc_type as exc:
            if arg not in str(exc):
                failures.append(f"{name}: {exc_type.__name__} does not name {arg!r}: {exc}")
        except Exception as exc:  # noqa: BLE001  (reported: the wrong exception type is the failure)
            failures.append(f"{name}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: no exception")
    return failures


def test_bad_input_raises_type_or_value_error():
    assert run_bad_calls() == []


def test_bad_input_under_python_O():
    """``python -O`` drops asserts: the checks must still raise the same TypeError / ValueError."""
    script = (
        "import importlib.util, sys\n"
        "assert False, 'asserts are on'  # stripped by -O\n"
        f"spec = importlib.util.spec_from_file_location('launchers', {str(Path(__file__).resolve())!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "bad = mod.run_bad_calls()\n"
        "print('\\n'.join(bad) if bad else f'OK {sys.flags.optimize}')\n"
    )
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "OK 1", res.stdout[-3000:]


def test_no_assert_statements_in_kernel_modules():
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not lines, f"{path.name}: assert at lines {lines} (python -O strips it; raise instead)"


# ----------------------------------------------------------------------------- tile tables
MODULES = (A, C, E, M)


def _kernel_names(module):
    return {n for n in vars(module) if n.startswith("_") and n.endswith("_kernel") and callable(getattr(module, n))}


def test_tile_tables_cover_every_kernel():
    tables = kernels.tile_tables()
    assert set(tables) == {"attention", "contrastive", "ema", "masking"}
    for module in MODULES:
        table = module.TILES
        assert tables[table.name] is table
        sized = [k for ks in table.kernels.values() for k in ks]
        assert len(sized) == len(set(sized)), f"{table.name}: a kernel is sized by two kinds"
        assert set(sized) == _kernel_names(module), f"{table.name}: kernels without a tile row"
        for kind in table.kernels:
            assert any(r[0] == kind for r in table.rows), f"{table.name}: no row for {kind}"


# what each launcher looks up: (kind, dtypes, queries)
_HALF = (torch.float32, torch.float16, torch.bfloat16)
LOOKUPS = {
    "attention": [(kind, _HALF, [dict(BLOCK_D=A._block_d(d)) for d in range(1, A.MAX_HEAD_DIM + 1)])
                  for kind in ("fwd", "bwd_kv", "bwd_q")]
                 + [("bwd_preprocess", _HALF, [{}]), ("dropout_mask", (None,), [{}])],
    "contrastive": [(kind, _HALF, [dict(soft=False), dict(soft=True)]) for kind in ("fwd", "bwd")]
                   + [("combine", (None,), [dict(soft=False)])],
    "ema": [("multi_tensor", (None,), [{}])],
    "masking": [(kind, (None,), [{}]) for kind in ("rank", "gather", "unshuffle")],
}
NEEDED = {  # the values each kind's launcher reads
    ("attention", "fwd"): ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    ("attention", "bwd_kv"): ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    ("attention", "bwd_q"): ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
    ("attention", "bwd_preprocess"): ("BLOCK_M",),
    ("attention", "dropout_mask"): ("BLOCK_M", "BLOCK_N"),
    ("contrastive", "fwd"): ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"),
    ("contrastive", "bwd"): ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"),
    ("contrastive", "combine"): ("BLOCK_M", "num_warps"),
    ("ema", "multi_tensor"): ("BLOCK", "CHUNK"),
    ("masking", "rank"): ("BLOCK_J", "BLOCK_K"),
    ("masking", "gather"): ("BLOCK_D_CAP",),
    ("masking", "unshuffle"): ("BLOCK_D_CAP",),
}


@pytest.mark.parametrize("interpreter", ["0", "1"], ids=["gpu-rows", "interpreter"])
def test_tile_lookups_complete(monkeypatch, interpreter):
    """Every kind a launcher asks for gets every value it reads, for every dtype and head dim,
    from the GPU rows and with the interpreter's entries (host-side only: nothing is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    tables = kernels.tile_tables()
    assert set(LOOKUPS) == set(tables)
    for name, lookups in LOOKUPS.items():
        assert {kind for kind, _, _ in lookups} == set(tables[name].kernels)
        for kind, dtypes, queries in lookups:
            for dtype in dtypes:
                for query in queries:
                    tiles = tables[name].lookup(kind, dtype, **query)
                    for col in NEEDED[(name, kind)]:
                        v = tiles[col]
                        assert isinstance(v, int) and v >= 1, (name, kind, dtype, query, col, v)
                        if col.startswith("BLOCK"):
                            assert v & (v - 1) == 0, (name, kind, col, v)


def test_interpreter_tiles_in_one_place(monkeypatch):
    """The interpreter's entries (``_common.INTERPRETER_TILES``) are what lookups return there."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    queries = {"attention": dict(BLOCK_D=64), "contrastive": dict(soft=False)}
    for name, kinds in _common.INTERPRETER_TILES.items():
        table = kernels.tile_tables()[name]
        for kind, vals in kinds.items():
            got = table.lookup(kind, torch.float16, **queries[name])
            assert {k: got[k] for k in vals} == vals


def test_override_tiles_nests_restores_and_checks():
    table = A.TILES
    base = table.lookup("fwd", torch.float32, BLOCK_D=32)
    with _common.override_tiles("attention", fwd=dict(BLOCK_M=64)):
        assert table.lookup("fwd", torch.float32, BLOCK_D=32)["BLOCK_M"] == 64
        with _common.override_tiles("attention", fwd=dict(BLOCK_N=128)):
            t = table.lookup("fwd", torch.float32, BLOCK_D=32)
            assert (t["BLOCK_M"], t["BLOCK_N"]) == (64, 128)
        assert table.lookup("fwd", torch.float32, BLOCK_D=32)["BLOCK_N"] == base["BLOCK_N"]
    assert table.lookup("fwd", torch.float32, BLOCK_D=32) == base
    with pytest.raises(ValueError, match="no-such"):
        with _common.override_tiles("no-such", fwd=dict(BLOCK_M=16)):
            pass
    with pytest.raises(ValueError, match="kind"):
        with _common.override_tiles("attention", forward=dict(BLOCK_M=16)):
            pass
    with pytest.raises(ValueError, match="BLOCK_Q"):
        with _common.override_tiles("attention", fwd=dict(BLOCK_Q=16)):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with _common.override_tiles("attention", fwd=dict(BLOCK_M=24)):
            pass
    assert table.lookup("fwd", torch.float32, BLOCK_D=32) == base


def test_info_prints_tile_tables():
    from vlfast import cli

    buf = io.StringIO()
    assert cli.info(out=buf) == 0
    text = buf.getvalue()
    assert "kernel tile tables" in text
    for name, table in kernels.tile_tables().items():
        assert f"  {name}:" in text
        assert table.format()[0] in text


def test_constants_defined_once():
    """LOG2E's literal lives in kernels/_common.py only (kernels use LOG2E / LOG2E_C)."""
    literal = "1.4426950408889634"
    hits = [p.name for p in KERNELS_DIR.glob("*.py") if literal in p.read_text()]
    assert hits == ["_common.py"]
    assert _common.LOG2E == float(literal) and _common.LOG2E_C.value == _common.LOG2E


def test_info_without_triton_says_so(monkeypatch):
    from vlfast import cli

    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    lines = []
    cli._print_tile_tables(lines.append, False)
    assert lines == ["kernel tile tables: unavailable (triton is not installed)"]
