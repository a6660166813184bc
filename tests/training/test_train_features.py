"""Training features of ``vlfast train``: warmup + cosine schedule, weight-decay exclusions, gradient clipping,
caption truncation warnings."""

import json
import math
import os

import pytest
import torch
from torch import nn

from vlfast import models
from vlfast.cli import main
from vlfast.training.optim import lr_at, no_decay_names, param_groups
from vlfast.training.engine import TorchEngine


def test_lr_schedule_values():
    kw = dict(lr=1.0, total_steps=10, warmup_steps=4)
    assert [lr_at(s, **kw) for s in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(7, **kw) == 1.0  # constant after warmup
    cos = [lr_at(s, schedule="cosine", min_lr=0.1, **kw) for s in range(4, 11)]
    assert cos[0] == 1.0 and abs(cos[-1] - 0.1) < 1e-12
    assert all(a > b for a, b in zip(cos, cos[1:]))
    t = (7 - 4) / 6
    assert abs(lr_at(7, schedule="cosine", min_lr=0.1, **kw) - (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))) < 1e-12
    for bad in (dict(schedule="linear"), dict(min_lr=2.0)):
        with pytest.raises(ValueError):
            lr_at(5, **{**kw, **bad})
    with pytest.raises(ValueError, match="step"):
        lr_at(11, **kw)


def test_weight_decay_exclusions_match_open_clip_and_timm_rules():
    clip = models.create("clip_micro")
    skip = no_decay_names(clip)
    names = dict(clip.named_parameters())
    # open_clip's rule: p.ndim < 2 or 'bn'/'ln'/'bias' in name or 'logit_scale' in name
    for n, p in names.items():
        if p.ndim < 2 or "logit_scale" in n or n.endswith(".bias") or ".ln_" in n or n.startswith("ln_"):
            assert n in skip, n
    assert "positional_embedding" in skip and "token_embedding.weight" in skip
    decayed = [n for n in names if n not in skip]
    assert decayed and all(names[n].ndim >= 2 for n in decayed)
    vit = models.create("vit_micro")
    vskip = no_decay_names(vit)
    assert {"pos_embed", "cls_token"} <= vskip and "patch_embed.proj.weight" not in vskip
    groups = param_groups(vit, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters()))
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(vit, -1.0)


def test_no_weight_decay_hook_and_frozen_params():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.special = nn.Parameter(torch.randn(3, 3))
            self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)

        def no_weight_decay(self):
            return {"special"}

    groups = param_groups(M(), 0.05)
    assert [len(g["params"]) for g in groups] == [1, 2]  # lin.weight | lin.bias, special; frozen left out


def test_grad_clip_limits_the_update():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    eng = TorchEngine(model, lr=1.0, grad_clip=0.5, weight_decay=0.0)
    (model(torch.randn(4, 8)) * 100).sum().backward()
    before = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert before > 0.5
    grads = []
    orig = eng.optimizer.step
    eng.optimizer.step = lambda *a, **k: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))\
        or orig(*a, **k)
    eng.step()
    assert abs(float(grads[0].norm()) - 0.5) < 1e-5


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_warmup_cosine_lr_logged(tmp_path):
    out = str(tmp_path / "r")
    assert main(["train", "--model", "vit_micro", "--steps", "6", "--batch-size", "2", "--out", out, "--no-progress",
                 "--lr", "0.01", "--warmup-steps", "2", "--schedule", "cosine", "--min-lr", "0.001",
                 "--weight-decay", "0.1", "--grad-clip", "1.0"]) == 0
    lrs = [r["lr"] for r in _records(out)]
    want = [lr_at(s, lr=0.01, total_steps=6, warmup_steps=2, schedule="cosine", min_lr=0.001) for s in range(1, 7)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_cli_rejects_min_lr_above_lr(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "vit_micro", "--lr", "0.001", "--min-lr", "0.01", "--out", str(tmp_path)])
    assert "--min-lr" in capsys.readouterr().err


def test_truncated_captions_warned_and_counted(tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "data"
    d.mkdir()
    rows = ["image,caption"]
    for i, cap in enumerate(["six", "a photo of the digit six, written by hand on white paper", "two"]):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(d / f"{i}.png")
        rows.append(f"{i}.png,{cap}")
    (d / "data.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "r")
    assert main(["train", "--model", "clip_micro", "--data", f"csv:{d / 'data.csv'}", "--steps", "2",
                 "--batch-size", "3", "--out", out, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("captions are longer than the model's context") == 1, err
    assert [r["truncated_captions"] for r in _records(out)] == [1, 2]


def test_log_every_writes_every_step_with_the_same_losses(tmp_path):
    runs = {}
    for every in (1, 4):
        out = str(tmp_path / f"r{every}")
        assert main(["train", "--model", "vit_micro", "--steps", "6", "--batch-size", "2", "--out", out,
                     "--no-progress", "--log-every", str(every), "--save-every", "3"]) == 0
        runs[every] = _records(out)
    assert [r["step"] for r in runs[4]] == list(range(1, 7))
    assert [r["loss"] for r in runs[4]] == [r["loss"] for r in runs[1]]
    # a window's samples/s is its average: steps 1-3 (flushed by the step-3 checkpoint) share one value
    assert len({r["samples_per_s"] for r in runs[4][:3]}) == 1


def test_rank_zero_filter(monkeypatch):
    import logging

    from vlfast.training.metrics import RankZeroFilter

    f = RankZeroFilter()
    rec = logging.LogRecord("vlfast.train", logging.WARNING, __file__, 1, "m", (), None)
    monkeypatch.setenv("RANK", "1")
    assert not f.filter(rec)
    rec.all_ranks = True
    assert f.filter(rec)
    monkeypatch.setenv("RANK", "0")
    assert f.filter(logging.LogRecord("vlfast.train", logging.INFO, __file__, 1, "m", (), None))


def test_grad_checkpointing_same_gradients_and_recomputes():
    from vlfast.training.activation import checkpoint_blocks

    torch.manual_seed(0)
    ref = models.create("albef_micro")
    ckp = models.create("albef_micro")
    ckp.load_state_dict(ref.state_dict())
    n = checkpoint_blocks(ckp)
    assert n > 0 and checkpoint_blocks(ckp) == 0  # wrapped once
    assert list(ckp.state_dict()) == list(ref.state_dict())
    calls = []
    # a submodule's pre-hook: it runs again when its block is recomputed in the backward (post-hooks
    # may not: the recomputation stops once the tensors the backward needs are rebuilt)
    ckp.visual_encoder.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    batch = ref.synthetic_batch(4, generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (ref, ckp):
        torch.manual_seed(3)
        out = m(**batch)
        out["loss"].backward()
        losses.append(out["loss"].detach())
    assert torch.equal(losses[0], losses[1])
    assert len(calls) == 2  # the forward, and the recomputation in the backward
    for (name, a), b in zip(ref.named_parameters(), ckp.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_cli_grad_checkpointing_and_bad_flags(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--model", "clip_micro", "--steps", "2", "--batch-size", "2", "--out", out,
                 "--no-progress", "--grad-checkpointing"]) == 0
    assert "activation checkpointing on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "clip_micro", "--eval-every", "2", "--out", out])
    assert "--eval-data" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compile(tmp_path):
    out = str(tmp_path / "r")
    assert main(["train", "--model", "vit_micro", "--steps", "2", "--batch-size", "2", "--out", out,
                 "--no-progress", "--compile"]) == 0
    assert len(_records(out)) == 2


def test_eval_every_logs_metrics(tmp_path):
    from PIL import Image

    d = tmp_path / "data"
    d.mkdir()
    rows = ["image,caption,label"]
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 200 - 30 * i, 90)).save(d / f"{i}.png")
        rows.append(f"{i}.png,picture {i},{i % 2}")
    (d / "data.csv").write_text("\n".join(rows) + "\n")
    (d / "classes.txt").write_text("cat\ndog\n")
    out = str(tmp_path / "r")
    spec = f"csv:{d / 'data.csv'}"
    assert main(["train", "--model", "clip_micro", "--data", spec, "--steps", "4", "--batch-size", "2", "--out", out,
                 "--no-progress", "--eval-data", spec, "--eval-every", "2", "--eval-task", "zeroshot",
                 "--classnames", str(d / "classes.txt")]) == 0
    evals = [r for r in _records(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval"]["task"] == "zeroshot" and 0 <= r["eval"]["top1"] <= 1 for r in evals)
    assert len([r for r in _records(out) if "loss" in r]) == 4


@pytest.mark.parametrize("name", ["clip_micro", "vit_micro"])
def test_accumulation_equals_the_whole_batch(name):
    from vlfast.training.trainer import _compute_loss, accumulate

    torch.manual_seed(0)
    a = models.create(name)
    b = models.create(name)
    b.load_state_dict(a.state_dict())
    batch = a.synthetic_batch(8, generator=torch.Generator().manual_seed(2))
    ea, eb = TorchEngine(a, lr=1e-3), TorchEngine(b, lr=1e-3)
    loss_a = _compute_loss(a, a(**batch), batch)
    ea.backward(loss_a)
    loss_b = accumulate(eb, b, b, batch, 4)
    assert torch.allclose(loss_a.detach(), loss_b, rtol=1e-5, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
            continue
        tol = 1e-5 * float(pa.grad.abs().max()) + 1e-8
        assert float((pa.grad - pb.grad).abs().max()) <= tol, n


def test_cli_accumulation_matches_and_refuses_unsupported(tmp_path, capsys):
    outs = {}
    for k in (1, 2):
        out = str(tmp_path / f"k{k}")
        assert main(["train", "--model", "clip_micro", "--steps", "3", "--batch-size", "4", "--out", out,
                     "--no-progress", "--lr", "1e-3", "--accum-steps", str(k)]) == 0
        outs[k] = [r["loss"] for r in _records(out)]
    assert outs[2] == pytest.approx(outs[1], rel=1e-4)
    capsys.readouterr()
    assert main(["train", "--model", "albef_micro", "--steps", "1", "--batch-size", "4", "--out",
                 str(tmp_path / "albef"), "--no-progress", "--accum-steps", "2"]) == 2
    assert "--accum-steps" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["train", "--model", "vit_micro", "--steps", "1", "--batch-size", "3", "--out",
                 str(tmp_path / "v"), "--no-progress", "--accum-steps", "2"]) == 2
