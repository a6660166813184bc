"""vlfast.ops.mask_generators: block_masking (BEiT) and tube_masking (VideoMAE)."""

import pytest
import torch

from vlfast.ops.mask_generators import block_masking, tube_masking
from vlfast.testing import DEVICES

RATIOS = [0.0, 0.1, 0.4, 0.5, 0.75, 0.9, 0.99]
GRIDS = [1, (1, 7), 14, (14, 7), 16, 32]


def _hw(grid):
    return (grid, grid) if isinstance(grid, int) else grid


def _expected_masked(L, ratio):
    return L - int(L * (1 - ratio))  # kept count == MAE's len_keep


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _masked_neighbours(mask, H, W):
    """Mean number of masked 4-neighbours over masked patches, for a (B, H*W) mask."""
    m = mask.view(-1, H, W).float()
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    return ((nb * m).sum() / m.sum()).item()


# ----------------------------------------------------------------------------- block_masking

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_block_exact_counts(grid, ratio):
    H, W = _hw(grid)
    mask = block_masking(16, grid, ratio, generator=_gen(1))
    assert mask.shape == (16, H * W)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    assert (mask.sum(1) == _expected_masked(H * W, ratio)).all()


@pytest.mark.parametrize("kwargs", [dict(min_num_patches=1), dict(min_num_patches=4, max_num_patches=8),
                                    dict(min_aspect=0.5, max_aspect=4.0), dict(min_aspect=1.0),
                                    dict(min_num_patches=200)])
def test_block_exact_counts_options(kwargs):
    for grid, ratio in [((14, 14), 0.4), ((14, 7), 0.75), ((7, 20), 0.6)]:
        mask = block_masking(8, grid, ratio, generator=_gen(2), **kwargs)
        assert (mask.sum(1) == _expected_masked(grid[0] * grid[1], ratio)).all(), (grid, ratio, kwargs)


def test_block_large_grid_terminates():
    for ratio in (0.05, 0.5, 0.99, 0.999):
        mask = block_masking(4, 64, ratio, generator=_gen(3))
        assert (mask.sum(1) == _expected_masked(64 * 64, ratio)).all()
    mask = block_masking(4, (1, 64), 0.9, generator=_gen(3))
    assert (mask.sum(1) == _expected_masked(64, 0.9)).all()


def test_block_clustered():
    H = W = 14
    block = block_masking(64, (H, W), 0.4, generator=_gen(4))
    n = int(block[0].sum())
    uniform = torch.zeros(64, H * W, dtype=torch.bool)
    uniform.scatter_(1, torch.rand(64, H * W, generator=_gen(5)).argsort(1)[:, :n], True)
    s_block, s_uniform = _masked_neighbours(block, H, W), _masked_neighbours(uniform, H, W)
    # uniform: ~ 4 * 0.4 less the border, about 1.5; rectangles: close to 4 less the block boundary
    assert s_uniform < 1.8
    assert s_block > 2.8 and s_block > s_uniform + 1.0, (s_block, s_uniform)


def test_block_row_major_layout():
    # Target 12 with min_num_patches=12 and aspect fixed at h/w = 3/4 forces one 3x4
    # rectangle (h = round(sqrt(12 * 0.75)) = 3 rows, w = round(sqrt(12 / 0.75)) = 4 columns).
    H, W = 6, 10
    assert _expected_masked(H * W, 0.2) == 12
    mask = block_masking(16, (H, W), 0.2, min_num_patches=12, min_aspect=0.75, max_aspect=0.75,
                         generator=_gen(6))
    for row in mask.view(16, H, W):  # flat index i * W + j -> (i, j)
        i, j = row.nonzero().unbind(1)
        assert i.max() - i.min() == 2 and j.max() - j.min() == 3 and len(i) == 12


def test_block_reproducible_and_varied():
    a = block_masking(8, 14, 0.4, generator=_gen(7))
    b = block_masking(8, 14, 0.4, generator=_gen(7))
    c = block_masking(8, 14, 0.4, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8  # rows differ
    torch.manual_seed(123)
    d = block_masking(4, 14, 0.4)
    torch.manual_seed(123)
    e = block_masking(4, 14, 0.4)
    assert torch.equal(d, e)


def test_block_edge_cases():
    assert block_masking(0, 14, 0.4).shape == (0, 196)
    assert not block_masking(3, 14, 0.0).any()
    assert block_masking(2, 1, 0.5).all()  # 1 - int(1 * 0.5) = 1 masked
    assert block_masking(2, (3, 5), 0.4, max_num_patches=None).shape == (2, 15)


@pytest.mark.parametrize("device", DEVICES)
def test_device(device):
    m = block_masking(2, 14, 0.5, device=device, generator=_gen(0))
    t = tube_masking(2, 4, 14, 0.9, device=device, generator=_gen(0))
    assert m.device.type == device and t.device.type == device
    assert m.dtype == torch.bool and t.dtype == torch.bool
    assert torch.equal(m.cpu(), block_masking(2, 14, 0.5, generator=_gen(0)))
    m2 = block_masking(2, 14, 0.5, device=torch.device(device), generator=_gen(0))
    assert torch.equal(m2.cpu(), m.cpu())


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((-1, 14, 0.4), {}, ValueError, "batch_size"),
    ((2.0, 14, 0.4), {}, TypeError, "batch_size"),
    ((True, 14, 0.4), {}, TypeError, "batch_size"),
    ((2, 0, 0.4), {}, ValueError, "grid"),
    ((2, (14, 0), 0.4), {}, ValueError, "grid"),
    ((2, (14, 7, 2), 0.4), {}, ValueError, "grid"),
    ((2, 14.0, 0.4), {}, TypeError, "grid"),
    ((2, (14, 7.5), 0.4), {}, TypeError, "grid"),
    ((2, 14, 1.0), {}, ValueError, "mask_ratio"),
    ((2, 14, -0.1), {}, ValueError, "mask_ratio"),
    ((2, 14, float("nan")), {}, ValueError, "mask_ratio"),
    ((2, 14, "0.5"), {}, TypeError, "mask_ratio"),
    ((2, 14, 0.4), dict(min_num_patches=0), ValueError, "min_num_patches"),
    ((2, 14, 0.4), dict(max_num_patches=4), ValueError, "max_num_patches"),
    ((2, 14, 0.4), dict(min_aspect=0.0), ValueError, "min_aspect"),
    ((2, 14, 0.4), dict(min_aspect=-1.0), ValueError, "min_aspect"),
    ((2, 14, 0.4), dict(min_aspect=0.5, max_aspect=0.4), ValueError, "max_aspect"),
    ((2, 14, 0.4), dict(generator=0), TypeError, "generator"),
])
def test_block_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        block_masking(*args, **kwargs)


# ----------------------------------------------------------------------------- tube_masking

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_tube_counts_and_frames(grid, ratio):
    H, W = _hw(grid)
    T = 4
    mask = tube_masking(8, T, grid, ratio, generator=_gen(1))
    assert mask.shape == (8, T * H * W) and mask.dtype == torch.bool
    per_frame = mask.view(8, T, H * W)
    assert (per_frame == per_frame[:, :1]).all()  # same spatial mask on every frame
    assert (per_frame.sum(2) == _expected_masked(H * W, ratio)).all()
    assert (mask.sum(1) == T * _expected_masked(H * W, ratio)).all()


def test_tube_reproducible_and_random():
    a = tube_masking(16, 8, 14, 0.9, generator=_gen(7))
    assert torch.equal(a, tube_masking(16, 8, 14, 0.9, generator=_gen(7)))
    assert not torch.equal(a, tube_masking(16, 8, 14, 0.9, generator=_gen(8)))
    assert len({tuple(r.tolist()) for r in a}) == 16
    # uniform over positions: every position masked about 90% of the time over many samples
    freq = tube_masking(2000, 1, 14, 0.9, generator=_gen(9)).float().mean(0)
    assert (freq - 0.9).abs().max() < 0.05
    assert tube_masking(0, 2, 14, 0.5).shape == (0, 392)
    assert tube_masking(1, 1, (2, 3), 0.0).sum() == 0


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((-1, 4, 14, 0.4), {}, ValueError, "batch_size"),
    ((2, 0, 14, 0.4), {}, ValueError, "frames"),
    ((2, 2.5, 14, 0.4), {}, TypeError, "frames"),
    ((2, 4, (0, 14), 0.4), {}, ValueError, "grid"),
    ((2, 4, 14, 1.0), {}, ValueError, "mask_ratio"),
    ((2, 4, 14, 0.4), dict(generator="seed"), TypeError, "generator"),
])
def test_tube_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tube_masking(*args, **kwargs)
