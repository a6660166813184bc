"""vlfast.models.set_fused reaches every vlfast.nn module: each has a ``fused`` flag."""

import pytest
import torch
from torch import nn

import vlfast.nn
from vlfast.models import create, list_models, set_fused

# vlfast.nn modules without an eager/fused switch (EMA averages weights on one op and has no
# eager baseline in the models)
NO_SWITCH = {"EMA"}


def _one_of_each():
    return {
        "Attention": vlfast.nn.Attention(16, num_heads=2),
        "CrossAttention": vlfast.nn.CrossAttention(16, num_heads=2, kv_dim=8),
        "MultiheadAttention": vlfast.nn.MultiheadAttention(16, 2),
        "MoCoV3Loss": vlfast.nn.MoCoV3Loss(),
        "ClipLoss": vlfast.nn.ClipLoss(),
        "SigLipLoss": vlfast.nn.SigLipLoss(),
        "MoCoQueueLoss": vlfast.nn.MoCoQueueLoss(8, queue_size=16),
        "ITCLoss": vlfast.nn.ITCLoss(8, queue_size=16),
        "NTXentLoss": vlfast.nn.NTXentLoss(),
        "RandomMasking": vlfast.nn.RandomMasking(0.5),
        "UnshuffleTokens": vlfast.nn.UnshuffleTokens(),
        "MomentumEncoder": vlfast.nn.MomentumEncoder(nn.Linear(4, 4)),
    }


def test_set_fused_flips_every_nn_module():
    modules = _one_of_each()
    exported = {n for n in vlfast.nn.__all__
                if isinstance(getattr(vlfast.nn, n), type) and issubclass(getattr(vlfast.nn, n), nn.Module)}
    assert exported - NO_SWITCH == set(modules), "a vlfast.nn module without a case here (or a fused flag)"
    for name, m in modules.items():
        assert m.fused is True, name
    holder = nn.ModuleDict(modules)
    assert set_fused(holder, False) is holder
    assert all(m.fused is False for m in modules.values())
    set_fused(holder, True)
    assert all(m.fused is True for m in modules.values())
    with pytest.raises(TypeError, match="flag"):
        set_fused(holder, 0)


def test_fused_constructor_argument_of_every_nn_module():
    """``fused=False`` at construction equals ``set_fused(module, False)`` (MomentumEncoder: attribute only)."""
    built = {
        "Attention": vlfast.nn.Attention(16, num_heads=2, fused=False),
        "CrossAttention": vlfast.nn.CrossAttention(16, num_heads=2, fused=False),
        "MultiheadAttention": vlfast.nn.MultiheadAttention(16, 2, fused=False),
        "MoCoV3Loss": vlfast.nn.MoCoV3Loss(fused=False),
        "ClipLoss": vlfast.nn.ClipLoss(fused=False),
        "SigLipLoss": vlfast.nn.SigLipLoss(fused=False),
        "MoCoQueueLoss": vlfast.nn.MoCoQueueLoss(8, queue_size=16, fused=False),
        "ITCLoss": vlfast.nn.ITCLoss(8, queue_size=16, fused=False),
        "NTXentLoss": vlfast.nn.NTXentLoss(fused=False),
        "RandomMasking": vlfast.nn.RandomMasking(0.5, fused=False),
        "UnshuffleTokens": vlfast.nn.UnshuffleTokens(fused=False),
    }
    assert set(built) == set(_one_of_each()) - {"MomentumEncoder"}
    assert all(m.fused is False for m in built.values())


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_micro")])
def test_create_fused_false_reaches_every_flag(name):
    torch.manual_seed(0)
    m = create(name, fused=False)
    flagged = [x for x in m.modules() if isinstance(getattr(x, "fused", None), bool)]
    assert flagged and all(x.fused is False for x in flagged)
    # no model keeps a wrapper that only adds the switch: every flagged module is a vlfast.nn one
    # (or a model part with its own eager variant: ViLT's MLM head, BEiT's attention with timm's
    # q_bias/v_bias layout and relative position bias, DINO's loss as DINO's double loop)
    kinds = {type(x).__module__ for x in flagged}
    assert kinds <= {"vlfast.nn.attention", "vlfast.nn.contrastive", "vlfast.nn.masking", "vlfast.nn.ema",
                     "vlfast.models.clip", "vlfast.models.vilt", "vlfast.models.beit", "vlfast.models.dino"}, kinds
