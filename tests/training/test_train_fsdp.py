"""``vlfast train --fsdp``: PyTorch FSDP2 on 2 CPU gloo ranks (``--nproc 2``) vs the single-process run of the
same command without ``--fsdp``: per-step losses, shard-local EMA and momentum encoders, sharded (DCP)
checkpoints with exact resume, DCP loads that run no code, bad input."""

import os
import pickle

import pytest
import torch

from _train_run import _losses, _run, kill_and_resume  # the same subprocess runner and log reader as the ZeRO tests


def _load(out, step, name):
    return torch.load(os.path.join(out, "checkpoints", f"step_{step}", name), map_location="cpu")


def _rel_diff(a, b, init):
    from test_train_zero import _rel_diff as rel

    return rel(a, b, init)


def _max_rel_loss_diff(got, ref):
    got, ref = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((got - ref).abs() / ref.abs()).max().item()


def _init_state(model):
    import vlfast.models as M
    from vlfast.training.trainer import _seed_all

    _seed_all(0)
    return M.create(model).state_dict()


@pytest.mark.distributed
def test_fsdp_clip_matches_single_process(tmp_path):
    """clip_micro (negatives gathered over the ranks) with --ema: losses, EMA and weights == one process."""
    common = ("--model", "clip_micro", "--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--ema", "0.9")
    single, fsdp = str(tmp_path / "single"), str(tmp_path / "fsdp")
    r = _run(*common, "--out", single)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run(*common, "--out", fsdp, "--nproc", "2", "--fsdp")
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(_losses(fsdp)) == 4
    assert _max_rel_loss_diff(_losses(fsdp), _losses(single)) < 1e-4, (_losses(fsdp), _losses(single))
    ckpt = os.path.join(fsdp, "checkpoints", "step_4")
    assert {"dcp", "model.pt", "ema.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(ckpt))
    init = _init_state("clip_micro")
    w1, w2 = _load(single, 4, "model.pt"), _load(fsdp, 4, "model.pt")
    assert set(w1) == set(w2) == set(init) and all(w1[k].shape == w2[k].shape for k in w1)
    diff, moved = _rel_diff(w2, w1, init)
    assert moved > 1e-2 and diff < 1e-3 * moved, ("weights", diff, moved)
    e1, e2 = _load(single, 4, "ema.pt"), _load(fsdp, 4, "ema.pt")
    assert set(e1) == set(e2) == {"module." + k for k in init}
    diff, moved = _rel_diff(e2, e1, {"module." + k: v for k, v in init.items()})
    assert moved > 1e-2 and diff < 1e-3 * moved, ("EMA", diff, moved)


@pytest.mark.distributed
def test_fsdp_albef_ema_momentum_and_resume(tmp_path):
    """albef_micro --ema on 2 ranks: losses, the EMA and the momentum encoders (shard-local updates) equal
    one process's; a run saved at step 2 and resumed to step 4 equals the uninterrupted one bit for bit."""
    common = ("--model", "albef_micro", "--batch-size", "8", "--lr", "1e-3", "--ema", "0.9")
    dist = ("--nproc", "2", "--fsdp")
    single, full, part = str(tmp_path / "single"), str(tmp_path / "full"), str(tmp_path / "part")
    for out, extra in ((single, ("--steps", "4")), (full, ("--steps", "4", *dist)), (part, ("--steps", "2", *dist))):
        r = _run(*common, "--out", out, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
    assert _max_rel_loss_diff(_losses(full), _losses(single)) < 1e-4, (_losses(full), _losses(single))
    init = _init_state("albef_micro")
    e1, e2 = _load(single, 4, "ema.pt"), _load(full, 4, "ema.pt")
    assert set(e1) == set(e2) == {"module." + k for k in init}
    diff, moved = _rel_diff(e2, e1, {"module." + k: v for k, v in init.items()})
    assert moved > 1e-2 and diff < 1e-3 * moved, ("EMA", diff, moved)
    w1, w2 = _load(single, 4, "model.pt"), _load(full, 4, "model.pt")
    momentum = [k for k in init if "_m." in k]
    assert len(momentum) > 50 and set(w1) == set(w2) == set(init)
    diff, moved = _rel_diff({k: w2[k] for k in momentum}, w1, init)
    assert moved > 1e-3 and diff < 1e-3 * moved, ("momentum encoders", diff, moved)

    r = _run(*common, "--out", part, "--steps", "4", "--resume", *dist)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    assert _losses(part) == _losses(full)
    for name in ("model.pt", "ema.pt"):
        a, b = _load(full, 4, name), _load(part, 4, name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.distributed
def test_fsdp_moco_runs_with_per_rank_batchnorm(tmp_path):
    """moco_v3_micro: its BatchNorm heads use per-rank batch statistics (as under --zero, documented), so the
    losses differ from one process's; the shard-local momentum update moves the momentum encoder."""
    out = str(tmp_path / "m")
    r = _run("--model", "moco_v3_micro", "--steps", "2", "--batch-size", "8", "--lr", "1e-2", "--out", out,
             "--nproc", "2", "--fsdp")
    assert r.returncode == 0, r.stderr[-4000:]
    assert all(torch.isfinite(torch.tensor(_losses(out))))
    init = _init_state("moco_v3_micro")
    w = _load(out, 2, "model.pt")
    assert set(w) == set(init)
    keys = [k for k in init if k.startswith("momentum_encoder.") and init[k].is_floating_point()]
    assert keys and max((w[k] - init[k]).abs().max().item() for k in keys) > 1e-5


class _Planted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_fsdp_dcp_load_runs_no_code(tmp_path):
    """A crafted DCP .metadata (a pickle that would run a command) is refused on --resume with one error line."""
    out = str(tmp_path / "o")
    common = ("--model", "clip_micro", "--batch-size", "4", "--out", out, "--fsdp")
    r = _run(*common, "--steps", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    marker = tmp_path / "pwned"
    meta = os.path.join(out, "checkpoints", "step_1", "dcp", ".metadata")
    assert os.path.isfile(meta)
    with open(meta, "wb") as f:
        pickle.dump(_Planted(str(marker)), f)
    r = _run(*common, "--steps", "2", "--resume")
    assert r.returncode == 2, r.stderr[-4000:]
    assert "refusing to load" in r.stderr and "Traceback" not in r.stderr, r.stderr[-4000:]
    assert len([x for x in r.stderr.splitlines() if "error:" in x]) == 1
    assert not marker.exists()


@pytest.mark.parametrize("args,match", [
    (("--fsdp", "--zero", "1"), "exclusive"),
    (("--nproc", "3", "--fsdp"), "not divisible"),
])
def test_bad_fsdp_args(tmp_path, args, match):
    r = _run("--model", "clip_micro", "--steps", "1", "--batch-size", "8", "--out", str(tmp_path / "o"), *args,
             timeout=60)
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if "error:" in x]) == 1


@pytest.mark.distributed
def test_fsdp_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL of the launcher and both FSDP2 ranks once a checkpoint exists (a torn DCP folder left
    beside it): the resumed run logs exactly the uninterrupted run's losses."""
    kill_and_resume(tmp_path, ("--fsdp",), torn="dcp")


@pytest.mark.distributed
def test_accumulation_on_two_ranks_matches_the_whole_batch(tmp_path):
    """--accum-steps 2 on 2 ranks under ZeRO-2, ZeRO-3 and FSDP2 (clip_micro: open_clip's feature-cache
    scheme, negatives gathered over the ranks; vit_micro: a per-sample loss) == one process on the
    whole batch, step by step; DeepSpeed's own accumulation is used (its micro batch and gas in the config)."""
    for model in ("clip_micro", "vit_micro"):
        common = ("--model", model, "--steps", "3", "--batch-size", "8", "--lr", "1e-3")
        ref = str(tmp_path / f"{model}-single")
        r = _run(*common, "--out", ref)
        assert r.returncode == 0, r.stderr[-4000:]
        engines = {"zero2": ("--zero", "2"), "zero3": ("--zero", "3"), "fsdp": ("--fsdp",)}
        if model == "vit_micro":
            engines = {"zero2": ("--zero", "2"), "fsdp": ("--fsdp",)}
        for name, engine in engines.items():
            out = str(tmp_path / f"{model}-{name}")
            r = _run(*common, "--out", out, "--nproc", "2", *engine, "--accum-steps", "2")
            assert r.returncode == 0, f"{model} {name}:\n{r.stderr[-4000:]}"
            assert _max_rel_loss_diff(_losses(out), _losses(ref)) < 1e-4, (model, name, _losses(out), _losses(ref))
        if model == "clip_micro":
            cfg = torch.load(os.path.join(tmp_path, f"{model}-zero2", "checkpoints", "step_3", "deepspeed",
                                          "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
            ds = cfg["ds_config"]
            assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2, ds
