"""Fixtures shared by the timm and open_clip integration tests."""

import pytest

import vlfast.integrations.timm as vtimm
import vlfast.nn.attention as vattn


@pytest.fixture
def spy(monkeypatch):
    """Every call of vlfast.ops.attention from vlfast.nn and the timm / open_clip wrappers: a dict of its arguments."""
    calls = []

    def install(module):
        real = module.attention

        def recording(q, k, v, **kw):
            calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=kw.get("causal", False),
                              kpm=kw.get("key_padding_mask"), bias=kw.get("attn_bias"), backend=kw.get("backend")))
            return real(q, k, v, **kw)

        monkeypatch.setattr(module, "attention", recording)

    install(vattn)  # vlfast.nn.MultiheadAttention / Attention
    install(vtimm)  # the timm and open_clip wrappers
    return calls
