"""The sm_90a compile gate (vlfast.kernels.gate): its rules, its capture, and planted regressions.

The gate needs Triton's compiler, not its interpreter (which this suite runs the kernels in), so
every test that compiles runs it in a subprocess without TRITON_INTERPRET, with a fresh result
cache: the planted regressions are really compiled.  Compiling for sm_90a needs no GPU.
"""

import os
import types
import subprocess
import sys

import pytest

from vlfast.kernels import gate

pytest.importorskip("triton")

ATTN_BF16_D64 = "^attention bf16 N=197 D=64 H=12 plain$"


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLFAST_GATE_CACHE"] = str(tmp_path / "gate-cache")
    return env


def _gate(tmp_path, *args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "vlfast.kernels.gate", "--jobs", "2", *args], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _python(tmp_path, code, timeout=300):
    """stdout of ``python -c code`` outside the interpreter (the gate's own cache under tmp_path);
    fails the test on a non-zero exit."""
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _launch(dtype="bf16"):
    return gate.Launch("_k", None, {}, ["case"], dtype, dtype in ("bf16", "fp16"))


def _result(**kw):
    r = dict(regs=128, stack=0, spill_stores=0, spill_loads=0, shared=64 * 1024, num_warps=8, sass=1000,
             hgmma=8, hmma=0, dots=0, wgmma_dots=2, seconds=1.0)
    r.update(kw)
    return r


# ----------------------------------------------------------------------------- rules (no compile)
def test_rules_pass_a_clean_wgmma_kernel():
    assert gate.verdicts(_launch(), _result()) == []
    assert gate.mma_kind(_result()) == "wgmma"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rules_fail_half_spill_and_mma_sync(dtype):
    (v,) = gate.verdicts(_launch(dtype), _result(spill_stores=8, spill_loads=8))
    assert v.startswith("half-spill") and dtype in v
    (v,) = gate.verdicts(_launch(dtype), _result(hgmma=0, hmma=48, dots=3, wgmma_dots=0))
    assert v.startswith("half-wgmma") and "mma.sync" in v
    (v,) = gate.verdicts(_launch(dtype), _result(hgmma=4, hmma=16, dots=1, wgmma_dots=1))
    assert v.startswith("half-wgmma") and "wgmma+mma.sync" in v


def test_rules_smem_compile_and_fp32_budget():
    (v,) = gate.verdicts(_launch(), _result(shared=gate.SMEM_LIMIT + 1))
    assert v.startswith("smem")
    assert gate.verdicts(_launch(), {"error": "PTXASError: boom"}) == ["compile: PTXASError: boom"]
    fp32 = _result(hgmma=0, dots=2, wgmma_dots=0)
    assert gate.mma_kind(fp32) == "fma"
    assert gate.verdicts(_launch("fp32"), fp32) == []                    # fp32 FMA dots are allowed
    assert gate.verdicts(_launch("fp32"), dict(fp32, spill_stores=gate.FP32_SPILL_BUDGET)) == []
    (v,) = gate.verdicts(_launch("fp32"), dict(fp32, spill_stores=gate.FP32_SPILL_BUDGET + 4))
    assert v.startswith("fp32-spill")
    assert gate.verdicts(_launch("fp32"), _result(hgmma=0, wgmma_dots=0)) == []   # no dot at all
    assert gate.mma_kind(_result(hgmma=0, wgmma_dots=0)) == "-"


def test_ctas_per_sm():
    assert gate.ctas_per_sm(255, 8, 64 * 1024) == 1           # registers: 8 warps x 256 x 32 = 65536
    assert gate.ctas_per_sm(128, 8, 64 * 1024) == 2           # registers (shared memory would allow 3)
    assert gate.ctas_per_sm(128, 4, 100 * 1024) == 2          # shared memory
    assert gate.ctas_per_sm(32, 4, 0) == 16                   # threads
    assert gate.ctas_per_sm(16, 1, 0) == 32                   # the block limit


def test_tile_override_parsing():
    assert gate._parse_tiles(["attention.fwd.BLOCK_M=32,BLOCK_N=32", "attention.bwd_q.num_warps=4"]) == {
        "attention": {"fwd": {"BLOCK_M": 32, "BLOCK_N": 32}, "bwd_q": {"num_warps": 4}}}
    with pytest.raises(ValueError, match="TABLE.KIND.COL=VALUE"):
        gate._parse_tiles(["attention:fwd"])


def test_case_lists():
    full, ci = gate.cases(True), gate.cases(False)
    labels = [c.label for c in full]
    assert len(set(labels)) == len(labels)
    assert {c.label for c in ci} < set(labels)
    for op in ("attention", "contrastive", "masking", "ema"):
        assert any(c.op == op for c in ci)
    # the documented shapes of issue 13 are in the full list
    for D in (40, 64, 72, 80, 96, 128, 256):
        for N in (197, 257, 577, 1024, 4096):
            assert f"attention bf16 N={N} D={D} H={gate.ATTN_HEADS[D]} dropout" in labels


# ----------------------------------------------------------------------------- capture (no compile)
def test_capture_reaches_every_kernel(tmp_path):
    # every @triton.jit kernel named by a tile table is launched by the CI tier's cases
    code = (
        "from vlfast.kernels import gate, tile_tables\n"
        "launches, n = gate.collect(gate.cases(False))\n"
        "names = {l.kernel for l in launches}\n"
        "want = {k for t in tile_tables().values() for ks in t.kernels.values() for k in ks}\n"
        "assert want <= names, want - names\n"
        "assert all(l.compile['num_warps'] for l in launches)\n"
        "print(len(launches), n)\n")
    stdout = _python(tmp_path, code)
    distinct, calls = map(int, stdout.split())
    assert 0 < distinct < calls


def test_capture_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with gate.capture([]):
            pass


# ----------------------------------------------------------------------------- compiled
def test_gate_passes_a_small_subset(tmp_path):
    rc, out = _gate(tmp_path, "--only", ATTN_BF16_D64 + "|^ema |^masking bf16 B=256 L=196 D=768$")
    assert rc == 0, out
    assert "gate passed" in out
    rows = [line for line in out.splitlines() if line.startswith("_attn_")]
    assert len(rows) == 4 and all(line.rstrip().endswith("ok") for line in rows), rows
    assert sum(" wgmma " in line for line in rows) == 3             # fwd, dk/dv, dq; the preprocess has no dot
    assert any(line.startswith("_ema_multi_tensor_kernel") for line in out.splitlines())


def test_planted_32_row_bf16_tile_fails(tmp_path):
    rc, out = _gate(tmp_path, "--only", ATTN_BF16_D64, "--tiles", "attention.fwd.BLOCK_M=32,BLOCK_N=32")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL ")]
    assert fails and all("_attn_fwd_kernel" in f and "BLOCK_M=32" in f for f in fails), out
    assert any("half-wgmma" in f and "mma.sync" in f for f in fails), fails


def test_planted_spilling_bf16_tile_fails(tmp_path):
    # a 128 x 128 score tile at D = 128 on 4 warps: more live fp32 values than 255 registers hold
    rc, out = _gate(tmp_path, "--only", "^attention bf16 N=197 D=128 H=16 plain$",
                    "--tiles", "attention.fwd.BLOCK_M=128,BLOCK_N=128,num_warps=4")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL ")]
    assert any("_attn_fwd_kernel" in f and "half-spill" in f for f in fails), out


def test_vlfast_info_kernels_prints_the_gate_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlfast", "info", "--kernels", "--only", "^ema "], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vlfast sm_90a compile gate" in r.stdout and "_ema_multi_tensor_kernel" in r.stdout
    assert "gate passed" in r.stdout


@pytest.mark.slow
def test_ci_gate_passes(tmp_path):
    # the whole CI tier (a few minutes on 2 cores); the default result cache is used, as in CI
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "vlfast.kernels.gate", "--quiet"], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_bias_gradient_atomics_are_relaxed(tmp_path):
    # the broadcast bias gradient is accumulated with atomics in the dq kernel: no memory fence
    rc, out = _gate(tmp_path, "--only", "^attention bf16 N=197 D=64 H=12 bias$")
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("_attn_bwd_dq_kernel")]
    assert rows and all(line.rstrip().endswith("ok") for line in rows), out


def test_fence_rule():
    launch = types.SimpleNamespace(half=True, dtype="bf16")
    clean = dict(spill_stores=0, spill_loads=0, shared=1024, dots=0, hmma=0, hgmma=4, wgmma_dots=2, membar=0)
    assert gate.verdicts(launch, clean) == []
    assert any(v.startswith("fence:") for v in gate.verdicts(launch, {**clean, "membar": 3}))


def test_default_atomics_fence_and_relaxed_ones_do_not(tmp_path):
    # the rule's premise, on a tiny kernel compiled for sm_90a: acq_rel atomics carry GPU-scope
    # fences, relaxed ones none (in a subprocess: the suite's TRITON_INTERPRET makes jit functions
    # interpreted)
    code = "import json; from vlfast.kernels import gate; print(json.dumps(gate.atomic_fence_counts()))"
    stdout = _python(tmp_path, code)
    counts = __import__("json").loads(stdout.strip().splitlines()[-1])
    assert counts["acq_rel"] > 0 and counts["relaxed"] == 0, counts


# ----------------------------------------------------------------------------- dropout's cost (compiled)
# Compiles the bf16 D=64 N=197 forward without and with dropout, the dropout backward kernels and the
# mask kernel for sm_90a and reports, per kernel, the SASS instruction count, the Philox multiplies in
# the SASS and the score elements per thread of one tile (BLOCK_M * BLOCK_N / (32 * num_warps)).
_DROPOUT_SASS = r"""
import json, re
import triton
from triton.compiler import ASTSource
from vlfast.kernels import gate

# Philox4x32 round constant A = 0xD2511F53: each of the 10 rounds of a call takes the high word of
# one product by A (IMAD.HI.U32, or IMAD.WIDE.U32 giving both words); cuobjdump prints it signed
A_HI = re.compile(r"^IMAD\.(HI|WIDE)\.U32$")
A_IMM = re.compile(r"(-0x2daee0ad|0xd2511f53)\b", re.I)
want = r"^attention bf16 N=197 D=64 H=12 (plain|dropout)$|^dropout_mask "
sel = [c for c in gate.cases(False) if re.search(want, c.label)]
launches, _ = gate.collect(sel)
out = []
for l in launches:
    c = l.constexprs
    dropout = bool(c.get("DROPOUT")) or l.kernel == "_dropout_mask_kernel"
    if "preprocess" in l.kernel or not (dropout or l.kernel == "_attn_fwd_kernel"):
        continue
    req = l.compile
    k = triton.compile(ASTSource(l.fn, req["signature"], req["constants"], req["configs"][0]),
                       target=gate.TARGET, options=gate._options(req))
    instrs = gate._SASS_INSTR.findall(gate._sass(k.asm["cubin"]))
    philox_hi = sum(1 for i in instrs if A_HI.match(gate._opcode(i)) and A_IMM.search(i))
    out.append(dict(kernel=l.kernel, dropout=dropout, sass=len(instrs), philox_hi=philox_hi,
                    elems=c["BLOCK_M"] * c["BLOCK_N"] // (32 * req["num_warps"])))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def dropout_sass(tmp_path_factory):
    stdout = _python(tmp_path_factory.mktemp("drop"), _DROPOUT_SASS, timeout=600)
    return {(row["kernel"], row["dropout"]): row for row in __import__("json").loads(stdout.strip().splitlines()[-1])}


def test_dropout_forward_sass_at_most_1_6x_plain(dropout_sass):
    # issue 13: the bf16 D=64 forward with dropout costs at most 1.6x the plain forward's SASS
    plain, drop = dropout_sass[("_attn_fwd_kernel", False)], dropout_sass[("_attn_fwd_kernel", True)]
    assert drop["sass"] <= 1.6 * plain["sass"], (drop["sass"], plain["sass"], drop["sass"] / plain["sass"])


@pytest.mark.parametrize("kernel", ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                                    "_dropout_mask_kernel"])
def test_dropout_draws_one_philox_per_8_elements(dropout_sass, kernel):
    # Philox calls per thread and tile = (high-word products by the round constant A) / 10 rounds,
    # counted in the SASS: the key loop's body appears once, so this is per iteration.  A full
    # Philox per element (the former tl.rand mask: 144 products, 9 per call as only one word was
    # used, for the forward's 16 elements per thread) fails here, and so would a mask layout that
    # makes the threads sharing a Philox counter each compute it (4x the calls).
    row = dropout_sass[(kernel, True)]
    calls = row["philox_hi"] / 10
    assert row["elems"] >= 8 * calls, f"{calls:g} Philox calls for {row['elems']} elements per thread: {row}"
    # the count reads whole Philox calls (all four words used: 10 products each); no RNG without dropout
    assert row["philox_hi"] > 0 and row["philox_hi"] % 10 == 0, row
    assert dropout_sass[("_attn_fwd_kernel", False)]["philox_hi"] == 0



# ----------------------------------------------------------------------------- TF32 (fp32 opt-in)
def _tf32_launch(**kw):
    return gate.Launch("_k", None, {}, ["case tf32"], "fp32", False, tf32=True, **kw)


def test_tf32_rules_are_the_half_ones():
    # an fp32 launch with TF32 dots is a tensor-core dot: wgmma only, spills within the TF32 budget
    assert gate.verdicts(_tf32_launch(), _result()) == []
    budget = gate.TF32_SPILL_BUDGET
    assert gate.verdicts(_tf32_launch(), _result(spill_stores=budget, spill_loads=budget)) == []
    (v,) = gate.verdicts(_tf32_launch(), _result(spill_stores=budget + 4, spill_loads=budget + 4))
    assert v.startswith("tf32-spill") and "TF32" in v
    (v,) = gate.verdicts(_tf32_launch(), _result(hgmma=0, hmma=24, dots=2, wgmma_dots=0))
    assert v.startswith("tf32-wgmma") and "mma.sync" in v
    (v,) = gate.verdicts(_tf32_launch(), _result(hgmma=0, dots=2, wgmma_dots=0))        # FMA: not TF32 at all
    assert v.startswith("tf32-wgmma") and "fma" in v
    # an IEEE fp32 launch: FMA or mma.sync dots are allowed, spills up to its own budget; a bf16 one
    # may not spill at all
    assert gate.verdicts(_launch("fp32"), _result(hgmma=0, hmma=24, dots=2, wgmma_dots=0)) == []
    spill = gate.FP32_SPILL_BUDGET
    assert gate.verdicts(_launch("fp32"), _result(hgmma=0, dots=2, wgmma_dots=0, spill_stores=spill)) == []
    (v,) = gate.verdicts(_launch("bf16"), _result(spill_stores=4, spill_loads=4))
    assert v.startswith("half-spill")


def test_tf32_case_lists():
    full, ci = gate.cases(True), gate.cases(False)
    tf32_ci = sorted(c.label for c in ci if c.tf32)
    want = sorted([f"attention fp32 N=197 D={D} H={gate.ATTN_HEADS[D]} {v} tf32" for D in gate.CI_ATTN_D
                   for v in ("plain", "dropout")] + [f"contrastive fp32 N={gate.CON_N} D=768 hard tf32"])
    assert tf32_ci == want
    assert all(c.dtype == "fp32" and not c.half and c.label.endswith(" tf32") for c in full if c.tf32)
    assert not any(c.label.endswith(" tf32") for c in full if not c.tf32)


def test_tf32_cases_launch_tf32_dots(tmp_path):
    # capture only (no compile): the tf32 cases' kernels with a dot get DOT_PREC="tf32" and are judged
    # as TF32 launches; the same shapes without the switch are IEEE; the precision is restored after
    code = (
        "import torch\n"
        "from vlfast.kernels import gate\n"
        "sel = [c for c in gate.cases(False) if c.label.startswith(('attention fp32 N=197 D=64 H=12 plain',\n"
        "                                                            'contrastive fp32 N=32768 D=768 hard'))]\n"
        "launches, _ = gate.collect(sel)\n"
        "assert torch.get_float32_matmul_precision() == 'highest'\n"
        "for l in launches:\n"
        "    prec = l.constexprs.get('DOT_PREC')\n"
        "    tf32 = any(c.endswith(' tf32') for c in l.cases)\n"
        "    print(l.kernel, prec, l.tf32, tf32)\n")
    stdout = _python(tmp_path, code)
    rows = [line.split() for line in stdout.splitlines()]
    dots = [row for row in rows if row[1] != "None"]
    assert {row[0] for row in dots} >= {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                                        "_lse_fwd_kernel", "_grad_tile_kernel"}, rows
    for kernel, prec, launch_tf32, from_tf32_case in dots:
        assert prec == ("tf32" if from_tf32_case == "True" else "ieee"), (kernel, prec, from_tf32_case)
        assert launch_tf32 == from_tf32_case, (kernel, launch_tf32)
    assert all(row[2] == "False" for row in rows if row[1] == "None")     # no dot: not a TF32 launch


def test_tf32_attention_compiles_to_wgmma_without_spill(tmp_path):
    rc, out = _gate(tmp_path, "--only", "^attention fp32 N=197 D=64 H=12 (plain|dropout) tf32$")
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"))]
    assert len(rows) == 6 and all(" wgmma " in line and line.rstrip().endswith("ok") for line in rows), out


def test_planted_32_row_tf32_tile_fails(tmp_path):
    # TF32 is held to the half rules: a 32-row forward tile (mma.sync, not wgmma) fails the gate
    rc, out = _gate(tmp_path, "--only", "^attention fp32 N=197 D=64 H=12 plain tf32$",
                    "--tiles", "attention.fwd.BLOCK_M=32,BLOCK_N=32")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL ")]
    assert fails and all("_attn_fwd_kernel" in f for f in fails), out
    assert any("tf32-wgmma" in f for f in fails), fails


# ----------------------------------------------------------------------------- stride alignment
def test_head_dims_40_72_load_rows_128_bits_wide(tmp_path):
    # rows of 40 / 72 elements (strides multiples of 8, not 16): attention._aligned lets the compiler
    # vectorize the q / k / v / do tile loads; before it, every one was a 16-bit LDG per element
    # (_attn_fwd_kernel bf16 D=72: 64 LDG.E.U16, no cp.async; _attn_bwd_dq_kernel: 144)
    rc, out = _gate(tmp_path, "--only", "^attention (bf16|fp32) N=197 D=(40|72) H=16 plain$")
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("_attn_")]
    assert len(rows) >= 12, out
    assert all(row[-2] == "0" for row in rows), [(row[0], row[-2]) for row in rows]


def test_contrastive_d257_reads_aligned_rows(tmp_path):
    # D = 257 features reach the kernels as zero-padded rows of 272 (contrastive._kernel_pair): no
    # 16-bit loads (before: _lse_fwd_kernel 24 and 222 registers, _grad_tile_kernel 64)
    rc, out = _gate(tmp_path, "--only", "^contrastive bf16 N=32768 D=257 hard$")
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith(("_lse_fwd", "_grad_tile"))]
    assert len(rows) >= 2 and all(row[-2] == "0" for row in rows), out
    assert all("D=272" in " ".join(row) for row in rows), out
