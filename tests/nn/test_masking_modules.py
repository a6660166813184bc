"""MAE masking modules (vlfast.nn.RandomMasking, vlfast.nn.UnshuffleTokens): fused=False is MAE's
eager code from vlfast.reference.masking, fused=True the ops, with the same noise draw."""

import pytest
import torch

import vlfast.nn.masking as vm
from vlfast.nn import RandomMasking, UnshuffleTokens
from vlfast.reference import random_masking_reference, unshuffle_tokens_reference


def test_random_masking_fused_flag(count_calls):
    x = torch.randn(3, 16, 8, requires_grad=True)
    pos = torch.randn(1, 16, 8, requires_grad=True)
    op, ref = count_calls(vm, "random_masking"), count_calls(vm, "random_masking_reference")
    m = RandomMasking(0.75)
    torch.manual_seed(3)
    fused = m(x, pos)
    m.fused = False
    torch.manual_seed(3)
    eager = m(x, pos)
    assert (len(op), len(ref)) == (1, 1)
    torch.manual_seed(3)
    want = random_masking_reference(x, 0.75, torch.rand(3, 16), pos)
    for f, e, w in zip(fused, eager, want):  # the same noise draw: the same selection, exactly
        assert torch.equal(e, w) and torch.equal(f, e)
    # a precomputed mask always takes the op
    mask = torch.stack([torch.randperm(16) < 12 for _ in range(3)])
    kept, mask_out, _ = m(x, mask=mask)
    assert len(op) == 2 and kept.shape == (3, 4, 8) and torch.equal(mask_out, mask.float())
    assert "fused=False" in repr(m)
    assert RandomMasking(0.5, fused=False).fused is False
    with pytest.raises(TypeError, match="fused"):
        RandomMasking(0.5, fused=0)


def test_unshuffle_tokens_fused_flag(count_calls):
    x_kept = torch.randn(2, 5, 8, requires_grad=True)
    ids_restore = torch.stack([torch.randperm(12) for _ in range(2)])
    token = torch.randn(1, 1, 8, requires_grad=True)
    op, ref = count_calls(vm, "unshuffle_tokens"), count_calls(vm, "unshuffle_tokens_reference")
    m = UnshuffleTokens()
    fused = m(x_kept, ids_restore, token)
    m.fused = False
    eager = m(x_kept, ids_restore, token)
    assert (len(op), len(ref)) == (1, 1)
    assert torch.equal(eager, unshuffle_tokens_reference(x_kept, ids_restore, token))
    assert torch.equal(fused, eager) and fused.shape == (2, 12, 8)
    g = torch.randn_like(fused)
    gf = torch.autograd.grad(fused, (x_kept, token), g)
    ge = torch.autograd.grad(eager, (x_kept, token), g)
    for a, b in zip(gf, ge):
        torch.testing.assert_close(a, b)
    assert UnshuffleTokens(fused=False).fused is False and "fused=True" in repr(UnshuffleTokens())
    with pytest.raises(TypeError, match="fused"):
        UnshuffleTokens(fused="no")
