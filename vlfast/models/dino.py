"""DINO: self-distillation with no labels (Caron et al., 2021, "Emerging Properties in
Self-Supervised Vision Transformers", arXiv:2104.14294), as facebookresearch/dino builds it
(``main_dino.py``: ``DINOLoss``, ``DataAugmentationDINO``, ``train_one_epoch``;
``vision_transformer.py``: ``DINOHead``; ``utils.py``: ``MultiCropWrapper``, ``cosine_scheduler``).

* ``student``: :class:`MultiCropWrapper` of ``backbone`` (:class:`vlfast.models.layers.VisionTransformer`
  with timm's names, ``num_classes=0``, ``dynamic_img_size=True``: the class token of the last
  norm) and ``head`` (:class:`DINOHead`: ``mlp.0/2/4`` with GELU, L2 normalisation, weight-normed
  ``last_layer`` with ``weight_g`` fixed to 1).  Crops of one size go through the backbone
  together, local crops with the position embedding resampled to their grid (bicubic,
  timm's :func:`~vlfast.models.layers.resample_abs_pos_embed`).
* ``teacher``: :class:`vlfast.nn.MomentumEncoder` of the student (backbone and head), updated
  with momentum ``m(t)`` on DINO's cosine schedule from ``momentum_teacher`` (0.996) to 1
  (:func:`vlfast.schedules.cosine_momentum` over :meth:`DINO.set_total_steps` steps): fused,
  one :func:`vlfast.ops.ema_update_` pass; eager, DINO's per-parameter loop.
* ``dino_loss``: :class:`DINOLoss`, centering (``center`` buffer, EMA 0.9 of the teacher's batch
  mean, all-reduced over ranks) and sharpening (teacher temperature with a linear warm-up).

Loss, for ``n_g = 2`` global crops and ``n`` crops in all (``2 + local_crops_number``), with
``t_a`` the teacher's output on global crop ``a`` and ``s_b`` the student's on crop ``b``:

.. math:: L = \\frac{1}{n_g (n - 1)} \\sum_{a < n_g} \\sum_{b \\ne a}
          \\frac{1}{B} \\sum_i -\\operatorname{softmax}\\big((t_{a,i} - c) / \\tau_t\\big)
          \\cdot \\log\\operatorname{softmax}\\big(s_{b,i} / \\tau_s\\big)

with ``tau_s = 0.1`` and ``tau_t`` the teacher temperature; then ``c <- 0.9 c + 0.1 mean(t)``.

**Batches.** ``forward(images)`` takes a batch of images (B, C, H, W) of any size (the
trainer's ``images`` from ``csv:`` / ``wds:`` data, or :meth:`DINO.synthetic_batch`) and makes
the crops on the images' device (:func:`multi_crop`: random resized crops, scale (0.4, 1) for
the two global crops and (0.05, 0.4) for the local ones, aspect ratio (3/4, 4/3), bicubic
``grid_sample``, horizontal flip with probability 0.5; torch only, no PIL).  Its random draws
come from ``generator`` when given, else from a generator seeded with
``(crop_seed, global_step, rank)``, so a resumed run crops exactly as an uninterrupted one.
DINO's colour jitter, grey-scale, Gaussian blur and solarisation are not applied (do them in
a data pipeline and pass ``global_crops`` / ``local_crops``: :meth:`DINO.forward` accepts
precomputed crops too).

**Schedules and state.** The persistent buffer ``global_step`` (int64) counts training forwards
(= optimizer steps); it selects the teacher temperature, the momentum and the crops, and is
saved with the model, so a resume is exact.  ``set_total_steps(n)`` (the vlfast trainer calls
it with the run's ``--steps``) sets the length of the momentum schedule; without it the
momentum stays at ``momentum_teacher``.  DINO updates the teacher right after the optimizer
step with ``m(it)``; here the forward of step ``t >= 1`` first applies the update of step
``t - 1`` with ``m(t - 1)`` (as MoCo v3 and ALBEF do), which is the same sequence of teacher
weights (the student does not change in between; at ``t = 0`` the teacher is the student's copy).
``freeze_last_layer_steps``: DINO's ``freeze_last_layer`` in steps (the student's
``last_layer`` gets no gradient, ``None``, while ``global_step`` is below it; DINO's default
is one epoch, ours 0).

**State dict** (DINO's checkpoint names): ``student.backbone.*`` (timm's ViT keys),
``student.head.mlp.{0,2,4}.*``, ``student.head.last_layer.weight_g`` (out_dim, 1) /
``weight_v`` (out_dim, bottleneck), ``teacher.backbone.*``, ``teacher.head.*`` (the
MomentumEncoder's ``module.`` level dropped, accepted on load), ``dino_loss.center``
(1, out_dim), ``global_step``.  :func:`convert_dino_checkpoint` maps a ``main_dino.py``
checkpoint (``{"student": ..., "teacher": ..., "dino_loss": ...}``, with DDP's ``module.``)
to it; a backbone checkpoint (timm's ``vit_small_patch16_224`` with ``num_classes=0``, DINO's
``dino_deitsmall16_pretrain.pth``) loads strictly into ``model.student.backbone``; then call
:meth:`DINO.sync_teacher`.

Not reproduced: the student's stochastic depth (DINO's ``drop_path_rate`` 0.1), gradient
clipping and the lr / weight-decay schedules (the trainer's).

==================  =====  =====  =====  =======  ========================================
name                width  depth  heads  out_dim  student parameters (trainable)
==================  =====  =====  =====  =======  ========================================
``dino_vit_small``  384    12     6      65536    44,017,792 (43,952,256: ``weight_g`` fixed)
``dino_micro``      64     2      4      64       (32x32 global / 16x16 local crops, patch 8)
==================  =====  =====  =====  =======  ========================================

``dino_vit_small``: backbone 21,665,664 (timm's ViT-S/16 without head) + DINOHead 22,352,128;
the teacher holds as many again (frozen).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import register_configs
from .. import _validation as check
from ..comm import all_reduce_sum_no_grad, world_info
from ..nn.ema import MomentumEncoder
from ..schedules import cosine_momentum
from .layers import VisionTransformer, flatten_momentum_keys
from .vit import synthetic_images

__all__ = ["DINO", "DINOHead", "DINOLoss", "MultiCropWrapper", "WeightNormLinear", "multi_crop",
           "convert_dino_checkpoint"]


# ----------------------------------------------------------------------------------------- head
class WeightNormLinear(nn.Module):
    """``torch.nn.utils.weight_norm(nn.Linear(in_features, out_features, bias=False))`` with its
    parameter names: ``weight_v`` (out, in) and ``weight_g`` (out, 1); the weight is
    ``weight_g * weight_v / ||weight_v||`` (row norms, weight norm's ``dim=0``).  A plain module
    (no forward pre-hook), so it deep-copies, meta-initialises and loads DINO's checkpoints as is.

    ``forward(x, detach=False)``: x (..., in) -> (..., out); ``detach=True`` runs on detached
    weights (no gradient reaches them: DINO's ``cancel_gradients_last_layer``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        lin = nn.Linear(in_features, out_features, bias=False)  # nn.Linear's init of v, as DINO's
        # weight_norm registers weight_g, then weight_v
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # DINO: weight_g.data.fill_(1)
        self.weight_v = nn.Parameter(lin.weight.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        v, g = (self.weight_v.detach(), self.weight_g.detach()) if detach else (self.weight_v, self.weight_g)
        return F.linear(x, v * (g / v.norm(dim=1, keepdim=True)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """DINO's projection head (``vision_transformer.py`` ``DINOHead``), its names and init.

    ``mlp``: Linear(in_dim, hidden) -> [BN] -> GELU -> (Linear(hidden, hidden) -> [BN] -> GELU) x
    (nlayers - 2) -> Linear(hidden, bottleneck) (truncated-normal std 0.02 weights, zero biases);
    then L2 normalisation and ``last_layer`` (:class:`WeightNormLinear` bottleneck -> out_dim,
    ``weight_g`` = 1, frozen when ``norm_last_layer``).

    ``forward(x, freeze_last_layer=False)``: x (B, in_dim) -> (B, out_dim) logits (fp32 for fp32 x).
    Parameters: ``in*hidden + hidden + (nlayers-2)*(hidden^2 + hidden) + hidden*bottleneck +
    bottleneck + bottleneck*out_dim + out_dim`` (22,352,128 for ViT-S: 384, 2048, 256, 65536).
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x, detach=freeze_last_layer)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MultiCropWrapper(nn.Module):
    """DINO's ``MultiCropWrapper``: ``forward(crops)`` runs ``backbone`` once per run of
    consecutive crops of one size (their batches concatenated), then ``head`` once on all the
    class-token features: a list of (B, C, H_i, W_i) -> (len(crops) * B, out_dim), crop-major."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor], freeze_last_layer: bool = False) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats), freeze_last_layer=freeze_last_layer)


# ----------------------------------------------------------------------------------------- loss
class DINOLoss(nn.Module):
    """DINO's cross-entropy between the centred, sharpened teacher and the student (``DINOLoss``).

    ``forward(student_output, teacher_output, teacher_temp, update_center=True)``:
    ``student_output`` (ncrops * B, K) crop-major, ``teacher_output`` (2 * B, K) for the two
    global crops; returns the scalar loss of the module docstring, computed in (at least) float32, and
    (``update_center``) moves ``center`` (1, K) towards the teacher's batch mean, all-reduced
    over the data-parallel ranks (:func:`vlfast.comm.all_reduce_sum_no_grad`) as DINO's
    ``update_center``.

    ``fused=False`` is DINO's double loop over (teacher crop, student crop) pairs, one
    ``log_softmax`` and one (B, K) product per pair; ``fused=True`` computes every crop's
    ``log_softmax`` in one call and uses ``sum_{b != a} log p_b = S - log p_a`` with
    ``S = sum_b log p_b``: two (B, K) products in all instead of ``2 (ncrops - 1)``.
    Same value up to rounding.  Torch ops in both (no vlfast kernel for this loss).
    ``return_entropy=True`` returns ``(loss, H)`` with ``H`` the teacher targets' mean entropy
    (detached): ``loss = H + mean KL(teacher || student)`` over the pairs (DINO's collapse monitor).
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global: int = 2, fused: bool = True):
        super().__init__()
        self.out_dim = check.positive_int("out_dim", out_dim)
        self.n_global = check.positive_int("n_global", n_global)
        self.ncrops = check.integer("ncrops", ncrops, minimum=max(2, self.n_global))
        self.student_temp = check.positive_real("student_temp", student_temp)
        self.center_momentum = check.unit_interval("center_momentum", center_momentum)
        self.fused = check.flag("fused", fused)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float,
                update_center: bool = True, return_entropy: bool = False):
        check.tensor("student_output", student_output, ndim=2, dtypes=check.FLOATING)
        check.tensor("teacher_output", teacher_output, ndim=2, dtypes=check.FLOATING)
        temp = check.positive_real("teacher_temp", teacher_temp)
        K = self.out_dim
        if student_output.shape[1] != K or teacher_output.shape[1] != K:
            raise ValueError(f"student_output and teacher_output must have {K} columns (out_dim), got "
                             f"{tuple(student_output.shape)} and {tuple(teacher_output.shape)}")
        if teacher_output.shape[0] % self.n_global:
            raise ValueError(f"teacher_output must have {self.n_global} * B rows (the global crops), got "
                             f"{teacher_output.shape[0]}")
        B = teacher_output.shape[0] // self.n_global
        if student_output.shape[0] != self.ncrops * B:
            raise ValueError(f"student_output must have ncrops * B = {self.ncrops} * {B} rows, got "
                             f"{student_output.shape[0]}")
        wide = torch.promote_types(torch.promote_types(student_output.dtype, teacher_output.dtype), torch.float32)
        t = teacher_output.detach().to(wide)
        q = F.softmax((t - self.center) / temp, dim=-1)
        s = student_output.to(wide) / self.student_temp
        n_terms = self.n_global * (self.ncrops - 1)
        if self.fused:
            logp = F.log_softmax(s, dim=-1).view(self.ncrops, B, K)
            q = q.view(self.n_global, B, K)
            others = logp.sum(0, keepdim=True) - logp[:self.n_global]  # sum over b != a of log p_b
            loss = -(q * others).sum(-1).mean(-1).sum() / n_terms
        else:  # main_dino.py DINOLoss.forward
            student_out = s.chunk(self.ncrops)
            teacher_out = q.chunk(self.n_global)
            loss = 0
            for iq, qa in enumerate(teacher_out):
                for v in range(len(student_out)):
                    if v == iq:
                        continue
                    loss = loss + torch.sum(-qa * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            loss = loss / n_terms
        if update_center:
            self.update_center(t)
        if return_entropy:  # mean entropy of the centred, sharpened teacher targets (detached)
            entropy = -(q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum(-1).mean()
            return loss, entropy.detach()
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean over every rank's rows of teacher_output``."""
        world = world_info()[1]
        total = all_reduce_sum_no_grad(teacher_output.to(self.center.dtype).sum(dim=0, keepdim=True))
        batch_center = total / (teacher_output.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def teacher_temperature(step: int, warmup_teacher_temp: float, teacher_temp: float, warmup_steps: int) -> float:
    """DINO's teacher temperature schedule (``DINOLoss.teacher_temp_schedule``) in steps:
    ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_steps)[step]`` during the warm-up,
    ``teacher_temp`` afterwards."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(warmup_teacher_temp)
        return warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * step / (warmup_steps - 1)
    return float(teacher_temp)


# ----------------------------------------------------------------------------------------- multi-crop
def _size(name: str, value) -> Tuple[int, int]:
    hw = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(hw) != 2:
        raise ValueError(f"{name} must be an int or (H, W), got {value!r}")
    return tuple(check.positive_int(name, v) for v in hw)


def _scale(name: str, value) -> Tuple[float, float]:
    lo, hi = (check.real(name, v, allow_tensor=False) for v in value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(value)}")
    return lo, hi


def random_resized_crop(images: torch.Tensor, size, scale: Tuple[float, float],
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), *, flip_p: float = 0.5,
                        generator: Optional[torch.Generator] = None, mode: str = "bicubic") -> torch.Tensor:
    """One random resized crop (torchvision's ``RandomResizedCrop`` box sampling) plus a random
    horizontal flip per image, for a whole batch in one ``grid_sample``.

    images (B, C, H, W) floating -> (B, C, size[0], size[1]).  Per image: up to 10 draws of an area
    fraction ``U(scale)`` and a log-uniform aspect ratio in ``ratio``; the first box that fits is
    kept (the whole image when none does), at a uniform position; boxes are continuous (not
    rounded to pixels).  The box is resampled with ``mode`` (``"bicubic"`` as DINO's, or
    ``"bilinear"``) and border padding, and mirrored with probability ``flip_p``.  Random draws:
    ``generator`` (on its device) or torch's default generator."""
    B, _, H, W = images.shape
    src = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(B, 10, 2, device=src, generator=generator, dtype=torch.float64)
    pos = torch.rand(B, 3, device=src, generator=generator, dtype=torch.float64)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    fits = (w <= W) & (h <= H)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    anyfit = fits.any(dim=1)
    w = torch.where(anyfit, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], W))
    h = torch.where(anyfit, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], H))
    x0 = pos[:, 0] * (W - w)
    y0 = pos[:, 1] * (H - h)
    sign = torch.where(pos[:, 2] < flip_p, -1.0, 1.0).to(pos.dtype)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=src)
    theta[:, 0, 0] = sign * w / W
    theta[:, 0, 2] = 2 * (x0 + w / 2) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = 2 * (y0 + h / 2) / H - 1
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    theta = theta.to(device=images.device, dtype=dtype)
    grid = F.affine_grid(theta, [B, images.shape[1], size[0], size[1]], align_corners=False)
    out = F.grid_sample(images.to(dtype), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def multi_crop(images: torch.Tensor, global_size, local_size, local_crops_number: int, *,
               global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
               generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """DINO's multi-crop geometry (``DataAugmentationDINO``: ``RandomResizedCrop`` + horizontal
    flip, no colour / blur / solarisation): 2 global crops (B, C, *global_size) and
    ``local_crops_number`` local crops (B, C, *local_size) of a batch of images (B, C, H, W);
    see :func:`random_resized_crop`."""
    images = check.tensor("images", images, ndim=4, dtypes=check.FLOATING, shape_doc="(B, C, H, W)")
    gs, ls = _size("global_size", global_size), _size("local_size", local_size)
    n_local = check.integer("local_crops_number", local_crops_number, minimum=0)
    g_scale, l_scale = _scale("global_crops_scale", global_crops_scale), _scale("local_crops_scale", local_crops_scale)
    crops = [random_resized_crop(images, gs, g_scale, generator=generator) for _ in range(2)]
    crops += [random_resized_crop(images, ls, l_scale, generator=generator) for _ in range(n_local)]
    return crops


# ----------------------------------------------------------------------------------------- model
class DINO(nn.Module):
    """DINO self-distillation (see the module docstring).

    ``forward(images=None, *, global_crops=None, local_crops=None, generator=None)`` ->
    ``{"loss", "teacher_entropy", "kl"}`` (0-dim; the last two detached: the mean entropy ``H`` of
    the teacher's targets and ``loss - H``, the mean KL divergence from teacher to student, the
    part the student controls; centering drives ``H`` up towards ``log(out_dim)``, sharpening down):

    * ``images`` (B, C, H, W) floating, any H, W: crops made by :func:`multi_crop` on the images'
      device (``generator`` or the seeded per-step generator);
    * or precomputed ``global_crops`` (2 tensors (B, C, Hg, Wg), a list or a (2, B, C, Hg, Wg)
      tensor) and ``local_crops`` (tensors (B, C, Hl, Wl), possibly none; sizes divisible by the
      patch size).

    In training mode the forward first updates the teacher (:meth:`momentum_update`), then runs
    the teacher on the global crops and the student on all, computes :class:`DINOLoss` at the
    step's teacher temperature, updates the center and increments ``global_step``.  In eval mode
    nothing is updated (the loss uses the current step's temperature).
    """

    def __init__(self, img_size=224, local_size=96, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, out_dim: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3, use_bn_in_head: bool = False,
                 norm_last_layer: bool = True, local_crops_number: int = 8, global_crops_scale=(0.4, 1.0),
                 local_crops_scale=(0.05, 0.4), momentum_teacher: float = 0.996, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, freeze_last_layer_steps: int = 0, total_steps: Optional[int] = None,
                 crop_seed: int = 0):
        super().__init__()
        self.config = dict(img_size=img_size, local_size=local_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers,
                           use_bn_in_head=use_bn_in_head, norm_last_layer=norm_last_layer,
                           local_crops_number=local_crops_number, global_crops_scale=tuple(global_crops_scale),
                           local_crops_scale=tuple(local_crops_scale), momentum_teacher=momentum_teacher,
                           warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                           warmup_teacher_temp_steps=warmup_teacher_temp_steps, student_temp=student_temp,
                           center_momentum=center_momentum, freeze_last_layer_steps=freeze_last_layer_steps,
                           total_steps=total_steps, crop_seed=crop_seed)
        self.img_size = _size("img_size", img_size)
        self.local_size = _size("local_size", local_size)
        self.local_crops_number = check.integer("local_crops_number", local_crops_number, minimum=0)
        self.global_crops_scale = _scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _scale("local_crops_scale", local_crops_scale)
        self.momentum_teacher = check.decay(momentum_teacher, "momentum_teacher")
        self.warmup_teacher_temp = check.positive_real("warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp = check.positive_real("teacher_temp", teacher_temp)
        self.warmup_teacher_temp_steps = check.integer("warmup_teacher_temp_steps", warmup_teacher_temp_steps, 0)
        self.freeze_last_layer_steps = check.integer("freeze_last_layer_steps", freeze_last_layer_steps, 0)
        self.crop_seed = check.integer("crop_seed", crop_seed, 0)
        self.total_steps: Optional[int] = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        backbone = VisionTransformer(img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                                     embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                     dynamic_img_size=True)
        head = DINOHead(embed_dim, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer, nlayers=nlayers,
                        hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        self.student = MultiCropWrapper(backbone, head)
        self.teacher = MomentumEncoder(self.student, self.momentum_teacher)
        self.dino_loss = DINOLoss(out_dim, 2 + self.local_crops_number, student_temp, center_momentum)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.int64))
        self._step_cache: Optional[int] = None
        flatten_momentum_keys(self, "teacher")
        self.register_load_state_dict_post_hook(_forget_step)

    # ------------------------------------------------------------------ schedules
    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps: the momentum goes from ``momentum_teacher`` at
        step 0 to 1 at ``total_steps`` (DINO's ``cosine_scheduler(momentum_teacher, 1, epochs,
        niter_per_ep)`` with ``epochs * niter_per_ep = total_steps``)."""
        self.total_steps = check.positive_int("total_steps", total_steps)

    @property
    def step(self) -> int:
        """``global_step`` as a Python int (read from the buffer once, then kept in step)."""
        if self._step_cache is None:
            self._step_cache = int(self.global_step)
        return self._step_cache

    def momentum_at(self, step: int) -> float:
        """The teacher momentum after optimizer step ``step`` (DINO's ``momentum_schedule[it]``)."""
        if self.total_steps is None:
            return self.momentum_teacher
        return cosine_momentum(step, self.total_steps, self.momentum_teacher, 1.0)

    def teacher_temp_at(self, step: int) -> float:
        """The teacher temperature at ``step`` (linear warm-up over ``warmup_teacher_temp_steps``)."""
        return teacher_temperature(step, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_steps)

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Copy the student's weights into the teacher (DINO: ``teacher.load_state_dict(student.state_dict())``),
        e.g. after loading pretrained weights into ``student``."""
        for pt, ps in zip(self.teacher.module.parameters(), self.student.parameters()):
            pt.copy_(ps)

    def momentum_update(self, *args, **kwargs) -> None:
        """The forward's teacher update (training mode only): at ``global_step = t >= 1`` the
        update of step ``t - 1``, ``teacher <- m(t - 1) teacher + (1 - m(t - 1)) student``.
        Takes (and ignores) the forward's arguments (see
        :func:`vlfast.distributed.zero.hoist_momentum_updates`)."""
        if self.training and self.step > 0:
            self.teacher.update(self.student, self.momentum_at(self.step - 1))

    # ------------------------------------------------------------------ crops
    def _step_generator(self, device: torch.device) -> torch.Generator:
        rank = world_info()[0]
        seed = ((self.crop_seed * 1_000_003 + self.step) * 65_537 + rank) % (2 ** 63)
        return torch.Generator(device=device).manual_seed(seed)

    def make_crops(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """The multi-crop of ``images`` (see :func:`multi_crop`) with this model's sizes and scales."""
        images = check.tensor("images", images, ndim=4, dtypes=check.FLOATING, shape_doc="(B, C, H, W)")
        c = self.student.backbone.patch_embed.in_chans
        if images.shape[1] != c:
            raise ValueError(f"images must have {c} channels, got {images.shape[1]}")
        if generator is None:
            generator = self._step_generator(images.device)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return multi_crop(images, self.img_size, self.local_size, self.local_crops_number,
                          global_crops_scale=self.global_crops_scale, local_crops_scale=self.local_crops_scale,
                          generator=generator)

    def _given_crops(self, global_crops, local_crops) -> List[torch.Tensor]:
        def as_list(name, x):
            if x is None:
                return []
            if isinstance(x, torch.Tensor):
                if x.dim() != 5:
                    raise ValueError(f"{name} must be a (n, B, C, H, W) tensor or a sequence of (B, C, H, W) "
                                     f"tensors, got shape {tuple(x.shape)}")
                return list(x.unbind(0))
            if not isinstance(x, (list, tuple)):
                raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")
            return list(x)

        g, loc = as_list("global_crops", global_crops), as_list("local_crops", local_crops)
        if len(g) != 2:
            raise ValueError(f"global_crops must hold 2 crops (DINO's two global views), got {len(g)}")
        if len(loc) != self.local_crops_number:
            raise ValueError(f"local_crops must hold local_crops_number = {self.local_crops_number} crops, "
                             f"got {len(loc)}")
        c = self.student.backbone.patch_embed.in_chans
        for name, group in (("global_crops", g), ("local_crops", loc)):
            for i, t in enumerate(group):
                check.tensor(f"{name}[{i}]", t, ndim=4, dtypes=check.FLOATING, shape_doc="(B, C, H, W)")
                if t.shape != group[0].shape:
                    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, unlike {name}[0] "
                                     f"{tuple(group[0].shape)}: crops of one kind share a size")
                if t.shape[1] != c:
                    raise ValueError(f"{name}[{i}] must have {c} channels, got {t.shape[1]}")
        if loc and loc[0].shape[0] != g[0].shape[0]:
            raise ValueError(f"local_crops have batch {loc[0].shape[0]} but global_crops {g[0].shape[0]}")
        return g + loc

    # ------------------------------------------------------------------ forward
    def forward(self, images: Optional[torch.Tensor] = None, *, global_crops=None, local_crops=None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        if (images is None) == (global_crops is None):
            raise ValueError("pass either images (crops made here) or global_crops (and local_crops), not both")
        if images is None and generator is not None:
            raise ValueError("generator draws the crops of images; precomputed crops take none")
        if images is None:
            crops = self._given_crops(global_crops, local_crops)
        else:
            crops = self.make_crops(images, generator)
        if not getattr(self, "_momentum_hoisted", False):  # else done by a pre-forward hook
            self.momentum_update()
        step = self.step
        teacher_output = self.teacher(crops[:2])
        freeze = self.training and step < self.freeze_last_layer_steps
        student_output = self.student(crops, freeze_last_layer=freeze)
        loss, entropy = self.dino_loss(student_output, teacher_output, self.teacher_temp_at(step),
                                       update_center=self.training, return_entropy=True)
        if self.training:
            self.global_step.add_(1)
            self._step_cache = step + 1
        return {"loss": loss, "teacher_entropy": entropy, "kl": loss.detach() - entropy}

    def synthetic_batch(self, batch_size: int, *, device=None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"images": (B, C, H, W) float32}`` at the global crop size: smooth random images
        (a low-frequency field plus a little noise, :func:`vlfast.models.vit.synthetic_images`),
        whose crops share content, so the student can learn to match the teacher across crops."""
        pe = self.student.backbone.patch_embed
        return {"images": synthetic_images(batch_size, pe.in_chans, self.img_size, device=device,
                                           generator=generator)}


# ----------------------------------------------------------------------------------------- state dict


def _forget_step(module, incompatible_keys):
    module._step_cache = None  # re-read global_step after a load


def convert_dino_checkpoint(checkpoint: dict, global_step: int = 0) -> Dict[str, torch.Tensor]:
    """A ``main_dino.py`` checkpoint (``{"student", "teacher", "dino_loss", ...}``; DDP's
    ``module.`` prefix allowed) -> this model's state dict (``global_step`` given, as DINO
    saves epochs, not steps).  Load it with ``model.load_state_dict(sd)`` (strict)."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    missing = [k for k in ("student", "teacher", "dino_loss") if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing} (a main_dino.py checkpoint has student, teacher, dino_loss)")
    out: Dict[str, torch.Tensor] = {}
    for part in ("student", "teacher"):
        for k, v in checkpoint[part].items():
            out[f"{part}.{k[len('module.'):] if k.startswith('module.') else k}"] = v
    out["dino_loss.center"] = checkpoint["dino_loss"]["center"]
    out["global_step"] = torch.tensor(check.integer("global_step", global_step, 0), dtype=torch.int64)
    return out


_CONFIGS = {
    "dino_vit_small": dict(),
    "dino_micro": dict(img_size=32, local_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=4, out_dim=64,
                       hidden_dim=128, bottleneck_dim=32, local_crops_number=2),
}


register_configs(_CONFIGS, DINO, "DINO")
