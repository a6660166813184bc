"""What real data can feed: a model whose batches need more than images / text / class labels is refused."""

import pytest
import torch
from torch import nn

from vlfast.training.data import DataError, ModelSpec


class _Model(nn.Module):
    def __init__(self, **extra):
        super().__init__()
        self.extra = extra

    def synthetic_batch(self, batch_size, *, device=None, generator=None):
        return {"images": torch.rand(batch_size, 3, 8, 8, generator=generator), **self.extra}


def test_plain_image_model_spec():
    spec = ModelSpec(_Model(labels=torch.tensor([1])))
    assert spec.image_size == (8, 8) and spec.in_chans == 3 and spec.has_labels and not spec.takes_text


def test_unknown_batch_entries_refused():
    with pytest.raises(DataError, match=r"\['bool_masked_pos'\].*synthetic data"):
        ModelSpec(_Model(bool_masked_pos=torch.zeros(1, 4, dtype=torch.bool)))


def test_per_token_labels_refused():
    with pytest.raises(DataError, match=r"per-token labels of shape \(16,\)"):
        ModelSpec(_Model(labels=torch.zeros(1, 16, dtype=torch.long)))
