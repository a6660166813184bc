"""SimCLR with a ViT backbone (Chen, Kornblith, Norouzi and Hinton, 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", arXiv:2002.05709) and SimCLR v2's projection
head (Chen et al., 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
arXiv:2006.10029), as google-research/simclr builds them (``tf2/model.py``, ``tf2/objective.py``).

* ``backbone``: :class:`vlfast.models.layers.VisionTransformer` with ``num_classes=0`` (timm's
  names: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.*``, ``norm``; the
  representation ``h`` is the normalized class token).  SimCLR used ResNets; the ViT-S/16
  backbone makes the model timm-loadable (``timm.create_model("vit_small_patch16_224",
  num_classes=0).state_dict()`` loads strictly into ``backbone``).
* ``projector``: SimCLR v2's ``ProjectionHead`` (``proj_head_mode="nonlinear"``,
  ``num_proj_layers=3``, ``proj_out_dim=128``): three ``LinearLayer(use_bn=True)``, i.e.
  ``Linear`` without bias (std 0.01 init) followed by BatchNorm (eps 1e-5, decay 0.9); the
  hidden layers are ``width -> width`` with a BN that centers and a ReLU, the last
  ``width -> 128`` with a BN without centering (gamma, no beta: ``center=use_bias=False``)
  and no ReLU.  Indices: ``projector.{0, 3, 6}`` Linear, ``projector.{1, 4, 7}`` BN.
* ``criterion``: :class:`vlfast.nn.NTXentLoss` (fused :func:`vlfast.ops.contrastive_loss`
  with ``exclude_diagonal=True``, or the eager :func:`vlfast.reference.ntxent_loss_reference`)
  at temperature 0.1 (google-research/simclr's default).

Both views go through the backbone and projector as one batch of 2N (SimCLR concatenates the
views before the network, so BatchNorm sees all 2N).

==========================  =====  =====  =====  ============  ==========
name                        width  depth  heads  projector     parameters
==========================  =====  =====  =====  ============  ==========
``simclr_vit_small``        384    12     6      384-384-128   22,011,392
``simclr_micro``            64     2      4      64-64-32      (32x32 images, patch 8)
==========================  =====  =====  =====  ============  ==========

``simclr_vit_small`` = timm's ViT-S/16 without head (21,665,664) + projector (345,728).
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import register_configs
from .. import _validation as check
from ..nn.contrastive import NTXentLoss
from .layers import VisionTransformer
from .vit import synthetic_images

__all__ = ["SimCLR", "BatchNorm1dNoCenter", "build_projection_head"]


class BatchNorm1dNoCenter(nn.BatchNorm1d):
    """BatchNorm1d with a scale (``weight``, gamma) and no shift (no ``bias``, beta): TF's
    ``BatchNormalization(center=False, scale=True)``, SimCLR v2's last projection BN."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, device=device, dtype=dtype)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)


def build_projection_head(in_dim: int, out_dim: int = 128, num_layers: int = 3,
                          hidden_dim: Optional[int] = None) -> nn.Sequential:
    """SimCLR v2's ``ProjectionHead`` (google-research/simclr ``tf2/model.py``), nonlinear mode.

    Layer j < num_layers - 1: ``Linear(d, hidden_dim, bias=False) -> BatchNorm1d -> ReLU``
    (hidden_dim = in_dim, SimCLR's ``num_classes=lambda input_shape: input_shape[-1]``); the
    last: ``Linear(hidden_dim, out_dim, bias=False) -> BatchNorm1dNoCenter`` (no ReLU).
    Linear weights ~ N(0, 0.01^2) (``RandomNormal(stddev=0.01)``).
    """
    num_layers = check.positive_int("num_layers", num_layers)
    hidden_dim = in_dim if hidden_dim is None else check.positive_int("hidden_dim", hidden_dim)
    layers = []
    d = in_dim
    for j in range(num_layers):
        last = j == num_layers - 1
        d_out = out_dim if last else hidden_dim
        lin = nn.Linear(d, d_out, bias=False)
        nn.init.normal_(lin.weight, std=0.01)
        layers.append(lin)
        if last:
            layers.append(BatchNorm1dNoCenter(d_out))
        else:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        d = d_out
    return nn.Sequential(*layers)


class SimCLR(nn.Module):
    """SimCLR (v1 objective, v2 projection head) on a timm-named ViT.

    ``forward(x1, x2)`` -> ``{"loss", "ntxent"}`` (both the NT-Xent loss, 0-dim fp32 when fused):
    x1, x2 (N, in_chans, H, W) are two augmented views of N images (one shape, one dtype);
    ``h = backbone(cat([x1, x2]))`` (2N, width), ``z = projector(h)`` (2N, proj_dim), and
    ``criterion(z[:N], z[N:])``: NT-Xent over the 2N views at ``temperature`` (each view's
    positive is the other view of its image, its negatives the other 2N - 2 views).
    ``encode(images)`` -> ``h`` (B, width), the representation used downstream.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, proj_dim: int = 128,
                 proj_hidden_dim: Optional[int] = None, num_proj_layers: int = 3, temperature: float = 0.1):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, proj_dim=proj_dim,
                           proj_hidden_dim=proj_hidden_dim, num_proj_layers=num_proj_layers,
                           temperature=temperature)
        self.backbone = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          num_classes=0, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                          mlp_ratio=mlp_ratio)
        self.projector = build_projection_head(embed_dim, check.positive_int("proj_dim", proj_dim),
                                               num_proj_layers, proj_hidden_dim)
        self.criterion = NTXentLoss(temperature)

    @property
    def temperature(self) -> float:
        return self.criterion.temperature

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The representation ``h`` (B, width): the backbone's normalized class token."""
        return self.backbone(images)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Dict[str, torch.Tensor]:
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"x1 and x2 must be tensors, got {type(x).__name__} for {name}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point image tensor, got {x.dtype}")
        if x1.shape != x2.shape or x1.dtype != x2.dtype:
            raise ValueError(f"x1 and x2 must be two views of one batch with the same shape and dtype, got "
                             f"{tuple(x1.shape)} {x1.dtype} and {tuple(x2.shape)} {x2.dtype}")
        n = x1.shape[0] if x1.dim() > 0 else 0
        z = self.projector(self.backbone(torch.cat([x1, x2], 0)))
        loss = self.criterion(z[:n], z[n:])
        return {"loss": loss, "ntxent": loss.detach()}

    def synthetic_batch(self, batch_size: int, *, device=None, num_classes: int = 8,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"x1", "x2"}`` (B, C, H, W) float32: two augmented views of class-structured images.

        Each image is a smooth random field plus a fixed low-frequency pattern of one of
        ``num_classes`` classes (fixed across calls); view 1 = image scaled by a random
        per-sample contrast in [0.8, 1.2] plus noise, view 2 = the horizontally flipped image
        plus noise (what the trainer's real-data path does: an image and its flip).  Views of
        one image resemble each other more than those of others, so NT-Xent can fall.
        """
        pe = self.backbone.patch_embed
        num_classes = check.positive_int("num_classes", num_classes)
        img = synthetic_images(batch_size, pe.in_chans, pe.img_size, generator=generator, noise=0.0)
        src = img.device
        labels = torch.randint(0, num_classes, (batch_size,), device=src, generator=generator)
        protos = torch.randn(num_classes, pe.in_chans, 4, 4, generator=torch.Generator().manual_seed(4321))
        img = img + F.interpolate(protos[labels.cpu()], size=pe.img_size, mode="bilinear",
                                  align_corners=False).to(src)
        contrast = 0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, device=src, generator=generator)
        x1 = img * contrast + 0.1 * torch.randn(img.shape, device=src, generator=generator)
        x2 = img.flip(-1) + 0.1 * torch.randn(img.shape, device=src, generator=generator)
        dev = device if device is not None else src
        return {"x1": x1.to(dev), "x2": x2.to(dev)}


_CONFIGS = {
    "simclr_vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "simclr_micro": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, proj_dim=32),
}


register_configs(_CONFIGS, SimCLR, "SimCLR")
