"""ACE-3D: anatomically consistent embedding by composition and decomposition.

See ``docs/methods.md`` (section "ACE-3D"). After Zhou et al., "Learning Anatomically Consistent Embedding
for Chest Radiography", BMVC 2023, ported to volumes. Two grid-aligned crops
(:mod:`medssl3d.transforms.grid_crops`): a small one of ``n³`` cells at native resolution and a large one of
``(2n)³`` cells pooled ×2, so both are ``n c`` voxels and give ``n³`` tokens, and every 2×2×2 block of
small tokens lies under one large token. Student and EMA teacher are backbone + DINO head + dense head;
the student also has a composition (2×2×2 features → one) and a decomposition (one feature → 2×2×2)
operator (:mod:`medssl3d.networks.compose`). As in the official code, the dense head runs on the backbone
tokens of both networks, and the student's composition / decomposition act on its dense-head output.

Losses (all correspondences come from the crops' cell offset ``d``, by arithmetic):

- global: DINO cross-entropy crossed between the crops, ``½[H(t_small, s_large) + H(t_large, s_small)]``,
  on the backbone's last feature map mean-pooled over the overlap;
- composition: ``⟨teacher large dense token i, composed student feature j⟩ / 0.07`` against a 3³ Gaussian
  (σ 1, peak 1) around ``j = i − d/2``, α-balanced BCE (α 0.9); rows of tokens outside the overlap are 0;
- decomposition: ``⟨teacher small dense token s, decomposed student feature k⟩ / 0.07`` against a 5³
  Gaussian around ``k = s + d``, α 0.99;
- total ``0.1 · global + 0.5 · (composition + decomposition)``.

Feature maps. The dense losses use the map at ``token_stride`` (the cell size ``c``): Swin's stride-16
stage (``features[3]``, the default) or its stride-32 bottleneck; ViT's patch tokens (stride 16). The
global term uses the backbone's last map (Swin's stride-32 bottleneck, ViT's patch tokens), so every
Swin stage, ``layers4`` included, is trained and the exported encoder holds no untrained stage, while
the dense geometry stays at stride 16: ``n`` = 4-6 tokens per axis at 64³-96³ crops (at stride 32 a 64³
crop has 2³ tokens, one composed feature, and 96³ none: ``n`` must be even). A bottleneck token covers
2×2×2 stride-16 tokens and is weighted in the overlap mean by the share of them inside the overlap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch import Tensor, nn

from medssl3d.engine.schedules import linear_warmup
from medssl3d.losses.balanced_bce import BalancedBCEWithLogitsLoss
from medssl3d.losses.dino import DINOLoss
from medssl3d.methods import presets
from medssl3d.methods.base import SSLMethod, StepInfo, make_teacher
from medssl3d.networks.backbones import Backbone, SwinBackbone, ViTBackbone
from medssl3d.networks.compose import Composition, Decomposition, DenseHead
from medssl3d.networks.heads import DINOHead
from medssl3d.transforms.grid_crops import (
    COMPOSE,
    DECOMPOSE,
    DEFAULT_CELL_SIZE,
    DEFAULT_GRID_N,
    DEFAULT_MIN_OVERLAP,
    RandGridCropPaird,
    grid_side,
    matched_cells,
    overlap_masks,
)
from medssl3d.transforms.views import DEFAULT_INTENSITY_PROB, DEFAULT_SCALE_FACTOR, DEFAULT_SHIFT_OFFSET

__all__ = [
    "Ace",
    "AceConfig",
    "AceEncoder",
    "AceStudent",
    "ace_transforms",
    "build_ace",
    "config_from_yaml",
    "correspondence_targets",
]

SMALL_POSTFIX = "_small"
LARGE_POSTFIX = "_large"
TOKEN_STRIDES = {"swin": (16, 32), "vit": (16,)}
"""Feature maps ACE can use: Swin's stride-16 stage or bottleneck; ViT's patch tokens."""
NUM_CROPS = 2
DEFAULT_NOISE_PROB = 0.1
DEFAULT_NOISE_STD = 0.02  # on intensities in [0, 1]


@dataclass(frozen=True)
class AceConfig:
    """Hyper-parameters of :class:`Ace` (defaults: ``docs/methods.md``, section "ACE-3D", on a Swin-base backbone).

    Attributes:
        backbone: "swin" or "vit".
        backbone_size: "tiny" / "small" / "base".
        in_channels: input channels.
        token_stride: cell size ``c`` in voxels = stride of the token map of the dense losses: Swin 16
            (``features[3]``) or 32 (bottleneck); ViT 16 (its patch size).
        grid_n: tokens per axis of each crop ``n`` (even); crops are ``n · token_stride`` voxels.
        min_overlap: cells of overlap per axis between the crops, at least; the bundle passes it to
            :func:`ace_transforms` (the ``high_overlap`` preset's 4 of 6 cells is close to the official
            >= 10 of 14, about 0.7 n).
        out_dim: DINO prototypes ``K`` (65536; the ``k8192`` preset uses 8192).
        dino_hidden_dim: DINO head hidden width.
        dino_bottleneck_dim: DINO head width before the prototypes.
        dense_hidden_dim: dense head hidden width.
        dense_out_dim: dense head output width ``E``, also the width of composition / decomposition.
        student_temp: ``τs`` of the global loss.
        teacher_temp: ``τt`` of the global loss after the warm-up.
        teacher_temp_start: ``τt`` at step 0.
        teacher_temp_warmup: fraction of the run over which ``τt`` goes linearly from start to final.
        center_momentum: DINO centre momentum.
        dense_temp: temperature of the dense similarity logits.
        comp_alpha: α of the composition BCE.
        decomp_alpha: α of the decomposition BCE.
        comp_kernel: side of the composition target's Gaussian kernel (odd).
        comp_sigma: its σ in cells.
        decomp_kernel: side of the decomposition target's Gaussian kernel (odd).
        decomp_sigma: its σ in cells.
        global_weight: weight of the global DINO loss.
        local_weight: weight of the sum of the composition and decomposition losses.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        fused_attention: swap in the fused Swin window attention (backbone "swin"; same weights and results as MONAI's).
        small_key: batch key of the small crops ``(B, C, n c, n c, n c)``, spatial axes (R, A, S).
        large_key: batch key of the pooled large crops.
        offset_key: batch key of the cell offsets ``(B, 3)``.
    """

    backbone: str = "swin"
    backbone_size: str = "base"
    in_channels: int = 1
    token_stride: int = DEFAULT_CELL_SIZE
    grid_n: int = DEFAULT_GRID_N
    min_overlap: int = DEFAULT_MIN_OVERLAP
    out_dim: int = 65536
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dense_hidden_dim: int = 2048
    dense_out_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_start: float = 0.04
    teacher_temp_warmup: float = 0.0
    center_momentum: float = 0.9
    dense_temp: float = 0.07
    comp_alpha: float = 0.9
    decomp_alpha: float = 0.99
    comp_kernel: int = 3
    comp_sigma: float = 1.0
    decomp_kernel: int = 5
    decomp_sigma: float = 1.0
    global_weight: float = 0.1
    local_weight: float = 0.5
    use_checkpoint: bool = False
    fused_attention: bool = True
    small_key: str = "image" + SMALL_POSTFIX
    large_key: str = "image" + LARGE_POSTFIX
    offset_key: str = "grid_offset"

    def __post_init__(self) -> None:
        if self.backbone not in TOKEN_STRIDES:
            raise ValueError(f"backbone must be one of {sorted(TOKEN_STRIDES)}, got {self.backbone!r}")
        if self.token_stride not in TOKEN_STRIDES[self.backbone]:
            raise ValueError(
                f"token_stride {self.token_stride} not available on {self.backbone}; "
                f"choose one of {TOKEN_STRIDES[self.backbone]}"
            )
        if self.grid_n < 2 or self.grid_n % 2:
            raise ValueError(f"grid_n must be even and >= 2, got {self.grid_n}")
        if not 1 <= self.min_overlap <= self.grid_n:
            raise ValueError(f"min_overlap must be in 1..grid_n={self.grid_n}, got {self.min_overlap}")
        for name in ("in_channels", "out_dim", "dino_hidden_dim", "dino_bottleneck_dim", "dense_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dense_out_dim < 1:
            raise ValueError(f"dense_out_dim must be >= 1, got {self.dense_out_dim}")
        for name in ("student_temp", "teacher_temp", "teacher_temp_start", "dense_temp", "comp_sigma", "decomp_sigma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("teacher_temp_warmup", "center_momentum", "comp_alpha", "decomp_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("comp_kernel", "decomp_kernel"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd and >= 1, got {getattr(self, name)}")
        for name in ("global_weight", "local_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def crop_size(self) -> int:
        """Voxels per side of both network inputs, ``grid_n · token_stride``."""
        return self.grid_n * self.token_stride


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> AceConfig:
    """Read a preset of ``configs/methods/ace.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(AceConfig, path, preset, **overrides)


def correspondence_targets(offset: Tensor, n: int, direction: str, kernel: int, sigma: float) -> Tensor:
    """Gaussian targets of the dense losses: one truncated 3D Gaussian (peak 1) per row, 0 outside the overlap.

    Row ``r`` is a token of one crop (teacher side), column ``m`` a cell of the other crop's composed
    (``"compose"``, ``(n/2)³``) or decomposed (``"decompose"``, ``(2n)³``) grid. The value is
    ``Π_axis exp(−(m − μ_r)² / 2σ²)`` for ``|m − μ_r| <= kernel // 2`` on every axis, where ``μ_r`` is the
    matched cell (:func:`~medssl3d.transforms.grid_crops.matched_cells`); the kernel is cut at the grid
    edge, not renormalised. Rows of tokens outside the overlap are all zero.

    Args:
        offset: ``(B, 3)`` even cell offsets ``d``.
        n: tokens per axis.
        direction: "compose" or "decompose".
        kernel: odd kernel side.
        sigma: Gaussian σ in cells.

    Returns:
        ``(B, n³, side³)`` float targets.
    """
    centres, valid = matched_cells(offset, n, direction)
    side = grid_side(n, direction)
    coords = torch.arange(side, device=centres.device)
    diff = (coords.view(1, 1, 1, side) - centres.unsqueeze(-1)).float()  # (B, R, 3, side)
    weights = torch.exp(-(diff**2) / (2 * sigma**2)) * (diff.abs() <= kernel // 2)
    w0, w1, w2 = weights.unbind(dim=2)  # per axis, (R, A, S)
    bumps = w0[..., :, None, None] * w1[..., None, :, None] * w2[..., None, None, :]
    return bumps.flatten(2) * valid.unsqueeze(-1)


def _build_backbone(cfg: AceConfig) -> Backbone:
    if cfg.backbone == "swin":
        return SwinBackbone(size=cfg.backbone_size, in_channels=cfg.in_channels, use_checkpoint=cfg.use_checkpoint,
                            fused_attention=cfg.fused_attention)
    return ViTBackbone(
        size=cfg.backbone_size,
        img_size=(cfg.crop_size,) * 3,
        in_channels=cfg.in_channels,
        patch_size=cfg.token_stride,
    )


def _overlap_mean(fmap: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``fmap (B, C, m, m, m)`` over the overlap ``mask (B, n, n, n)`` of stride-``token_stride`` tokens.

    ``n / m`` is 1 (the map is the token map) or 2 (a bottleneck token covers 2×2×2 tokens): each position
    of ``fmap`` is weighted by the share of its tokens inside the overlap.

    Returns:
        ``(B, C)``.
    """
    ratio = mask.shape[-1] // fmap.shape[-1]
    weights = F.avg_pool3d(mask[:, None].to(fmap.dtype), ratio).flatten(1)
    return torch.einsum("bcn,bn->bc", fmap.flatten(2), weights) / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)


def _tokens(fmap: Tensor) -> Tensor:
    """``(B, E, D, H, W)`` -> ``(B, D·H·W, E)`` in raster order of the last three axes."""
    return fmap.flatten(2).transpose(1, 2)


class AceEncoder(nn.Module):
    """Backbone + DINO head + dense head; the EMA teacher is one.

    Args:
        backbone: the backbone (its forward returns a :class:`~medssl3d.networks.backbones.BackboneOutput`).
        dino_head: DINO head on the overlap-pooled map at ``global_stride``.
        dense_head: per-token projection of the map at ``token_stride``.
        token_stride: stride of the token map of the dense losses.
        global_stride: stride of the map of the global loss (``token_stride`` or twice it).
    """

    def __init__(
        self, backbone: nn.Module, dino_head: nn.Module, dense_head: nn.Module, token_stride: int, global_stride: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.dense_head = dense_head
        self.token_stride = token_stride
        self.global_stride = global_stride

    def encode(self, small: Tensor, large: Tensor, small_mask: Tensor, large_mask: Tensor) -> tuple[Tensor, Tensor]:
        """DINO logits ``(2B, K)`` and dense maps ``(2B, E, n, n, n)`` of both crops, small crops first."""
        # Both crops have one size, so one backbone call on 2B samples (no layer of the backbone mixes samples).
        out = self.backbone(torch.cat([small, large]))
        tokens = out.features[out.strides.index(self.token_stride)]
        global_map = out.features[out.strides.index(self.global_stride)]
        pooled = _overlap_mean(global_map, torch.cat([small_mask, large_mask]))
        return self.dino_head(pooled), self.dense_head(tokens)

    def forward(self, small: Tensor, large: Tensor, small_mask: Tensor, large_mask: Tensor) -> dict[str, Tensor]:
        """Encode both crops (teacher side).

        Args:
            small: small crops ``(B, C_in, n c, n c, n c)``.
            large: pooled large crops, same shape.
            small_mask: ``(B, n, n, n)`` small tokens in the overlap.
            large_mask: ``(B, n, n, n)`` large tokens in the overlap.

        Returns:
            ``global`` ``(2B, K)`` DINO logits of the overlap-pooled maps, small crops first;
            ``dense`` ``(2B, E, n, n, n)`` unit-norm dense features, small crops first.
        """
        logits, dense = self.encode(small, large, small_mask, large_mask)
        return {"global": logits, "dense": dense}


class AceStudent(AceEncoder):
    """:class:`AceEncoder` plus the composition and decomposition operators on its dense features.

    Args:
        backbone: the backbone.
        dino_head: DINO head on the overlap-pooled map at ``global_stride``.
        dense_head: per-token projection of the map at ``token_stride``.
        composition: 2×2×2 dense features -> one (:class:`~medssl3d.networks.compose.Composition`).
        decomposition: one dense feature -> 2×2×2 (:class:`~medssl3d.networks.compose.Decomposition`).
        token_stride: stride of the token map of the dense losses.
        global_stride: stride of the map of the global loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: nn.Module,
        dense_head: nn.Module,
        composition: nn.Module,
        decomposition: nn.Module,
        token_stride: int,
        global_stride: int,
    ) -> None:
        super().__init__(backbone, dino_head, dense_head, token_stride, global_stride)
        self.composition = composition
        self.decomposition = decomposition

    def forward(self, small: Tensor, large: Tensor, small_mask: Tensor, large_mask: Tensor) -> dict[str, Tensor]:
        """Encode both crops, compose the small crop's dense features and decompose the large one's.

        Args:
            small: small crops ``(B, C_in, n c, n c, n c)``.
            large: pooled large crops, same shape.
            small_mask: ``(B, n, n, n)`` small tokens in the overlap.
            large_mask: ``(B, n, n, n)`` large tokens in the overlap.

        Returns:
            ``global`` ``(2B, K)`` (small crops first); ``composed`` ``(B, E, n/2, n/2, n/2)`` and
            ``decomposed`` ``(B, E, 2n, 2n, 2n)``.
        """
        logits, dense = self.encode(small, large, small_mask, large_mask)
        dense_small, dense_large = dense.chunk(NUM_CROPS)
        return {
            "global": logits,
            "composed": self.composition(dense_small),
            "decomposed": self.decomposition(dense_large),
        }


class Ace(SSLMethod):
    """ACE-3D: global DINO + composition + decomposition on grid-aligned two-scale crops.

    See ``docs/methods.md`` (section "ACE-3D").

    The batch (from :func:`ace_transforms`) holds the small crops, the pooled large crops and their cell
    offsets; overlap masks and correspondences are recomputed from the offsets, so they cannot disagree.

    Args:
        config: hyper-parameters; the defaults are those of ``docs/methods.md``.
    """

    name = "ace"

    def __init__(self, config: AceConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config if config is not None else AceConfig()
        self.backbone_name = f"{cfg.backbone}-{cfg.backbone_size}"
        backbone = _build_backbone(cfg)
        if isinstance(backbone, SwinBackbone):
            token_dim = backbone.feature_channels[backbone.strides.index(cfg.token_stride)]
        else:
            token_dim = backbone.embed_dim
        # the global term reads the last (bottleneck) map, so that every stage of the backbone is trained
        global_stride = backbone.patch_stride
        dino_head = DINOHead(
            backbone.embed_dim,
            out_dim=cfg.out_dim,
            hidden_dim=cfg.dino_hidden_dim,
            bottleneck_dim=cfg.dino_bottleneck_dim,
        )
        dense_head = DenseHead(token_dim, hidden_dim=cfg.dense_hidden_dim, out_dim=cfg.dense_out_dim)
        self.student = AceStudent(
            backbone,
            dino_head,
            dense_head,
            Composition(cfg.dense_out_dim),
            Decomposition(cfg.dense_out_dim),
            cfg.token_stride,
            global_stride,
        )
        self.teacher = make_teacher(AceEncoder(backbone, dino_head, dense_head, cfg.token_stride, global_stride))
        self.global_loss = DINOLoss(cfg.out_dim, student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
        self.comp_loss = BalancedBCEWithLogitsLoss(cfg.comp_alpha)
        self.decomp_loss = BalancedBCEWithLogitsLoss(cfg.decomp_alpha)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Backbone, DINO head and dense head; the composition operators have no teacher copy."""
        s, t = self.student, self.teacher
        return [(s.backbone, t.backbone), (s.dino_head, t.dino_head), (s.dense_head, t.dense_head)]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student's DINO prototypes (frozen by the engine's ``freeze_last_layer_steps`` / ``_epochs``)."""
        return [self.student.dino_head.last_layer.weight]

    def teacher_temp(self, step: StepInfo) -> float:
        """``τt`` at ``step``: linear warm-up over ``teacher_temp_warmup`` of the run, then constant."""
        cfg = self.config
        warmup = round(cfg.teacher_temp_warmup * step.total_steps)
        return linear_warmup(step.step, warmup, cfg.teacher_temp_start, cfg.teacher_temp)

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute ``global_weight · global + local_weight · (comp + decomp)``.

        Args:
            batch: ``{small_key: (B, C, n c, n c, n c), large_key: (B, C, n c, n c, n c), offset_key: (B, 3)}``;
                spatial axes (R, A, S), offsets in cells along them.
            step: where training stands (teacher-temperature warm-up).

        Returns:
            ``{"loss": scalar, "parts": {"global", "comp", "decomp"}}`` (parts detached, unweighted).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
            ValueError: crops of the wrong size.
        """
        cfg, n = self.config, self.config.grid_n
        try:
            small, large = batch[cfg.small_key], batch[cfg.large_key]
            offset = torch.as_tensor(batch[cfg.offset_key]).to(small.device)
        except KeyError as e:
            raise KeyError(f"ace batch lacks {e}; it has {sorted(batch)}") from e
        expected = (cfg.crop_size,) * 3
        if tuple(small.shape[2:]) != expected or small.shape != large.shape:
            raise ValueError(
                f"ace crops must both be (B, C, *{expected}), got {tuple(small.shape)} and {tuple(large.shape)}"
            )
        small_mask, large_mask = overlap_masks(offset, n)
        out = self.run_student(small, large, small_mask, large_mask)
        with torch.no_grad():
            target = self.teacher(small, large, small_mask, large_mask)

        global_loss = self.global_loss(
            out["global"].chunk(NUM_CROPS), target["global"].chunk(NUM_CROPS), teacher_temp=self.teacher_temp(step)
        )
        teacher_small, teacher_large = _tokens(target["dense"]).chunk(NUM_CROPS)
        comp_logits = torch.einsum("bie,bje->bij", teacher_large, _tokens(out["composed"])) / cfg.dense_temp
        comp_target = correspondence_targets(offset, n, COMPOSE, cfg.comp_kernel, cfg.comp_sigma)
        comp = self.comp_loss(comp_logits, comp_target)
        decomp_logits = torch.einsum("bse,bke->bsk", teacher_small, _tokens(out["decomposed"])) / cfg.dense_temp
        decomp_target = correspondence_targets(offset, n, DECOMPOSE, cfg.decomp_kernel, cfg.decomp_sigma)
        decomp = self.decomp_loss(decomp_logits, decomp_target)

        loss = cfg.global_weight * global_loss + cfg.local_weight * (comp + decomp)
        return {
            "loss": loss,
            "parts": {"global": global_loss.detach(), "comp": comp.detach(), "decomp": decomp.detach()},
        }


def build_ace(*, preset: str = presets.BASE_PRESET, **cfg: Any) -> Ace:
    """Build :class:`Ace` from a preset and :class:`AceConfig` fields (a bundle's ``_target_``).

    Args:
        preset: a preset of ``configs/methods/ace.yaml``, e.g. ``"high_overlap"`` (``"base"``: the defaults).
        **cfg: AceConfig fields; they win over the preset.

    Raises:
        ValueError: an unknown preset or field, or a bad value.
    """
    config = presets.resolve_method_config(Ace.name, preset, **cfg)
    presets.log_method_config(Ace.name, preset, config)
    return Ace(config)


def ace_transforms(
    grid_n: int = DEFAULT_GRID_N,
    token_stride: int = DEFAULT_CELL_SIZE,
    *,
    source_key: str = "image",
    min_overlap: int = DEFAULT_MIN_OVERLAP,
    pad_value: float = 0.0,
    intensity_prob: float = DEFAULT_INTENSITY_PROB,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    shift_offset: float = DEFAULT_SHIFT_OFFSET,
    noise_prob: float = DEFAULT_NOISE_PROB,
    noise_std: float = DEFAULT_NOISE_STD,
) -> Compose:
    """View generation of :class:`Ace`: a grid-aligned crop pair, then photometric jitter per crop.

    Augmentations are photometric only (intensity scale, shift, Gaussian noise, drawn independently per
    crop): a flip or rotation would break the arithmetic correspondences.

    Args:
        grid_n: tokens per axis ``n`` (even); must equal the method's ``grid_n``.
        token_stride: cell size ``c``; must equal the method's ``token_stride``.
        source_key: key of the preprocessed volume ``(1, D, H, W)``, intensities in [0, 1].
        min_overlap: cells of overlap per axis, at least.
        pad_value: fill of volumes smaller than the large crop (``2 n c`` voxels per side).
        intensity_prob: probability of each of the scale and shift jitters.
        scale_factor: intensities multiplied by ``1 + U(−scale_factor, scale_factor)``.
        shift_offset: intensities shifted by ``U(−shift_offset, shift_offset)``.
        noise_prob: probability of additive Gaussian noise.
        noise_std: its standard deviation.

    Returns:
        A ``Compose`` giving ``{source_key + "_small", source_key + "_large": (1, n c, n c, n c),
        "grid_offset": (3,), "small_mask", "large_mask": (n, n, n), "compose_index", "decompose_index": (n³,),
        "small_corner", "large_corner": (3,)}`` (see :class:`~medssl3d.transforms.grid_crops.RandGridCropPaird`).
    """
    crops = [f"{source_key}{SMALL_POSTFIX}", f"{source_key}{LARGE_POSTFIX}"]
    jitter = []
    for key in crops:
        jitter.append(RandScaleIntensityd(keys=key, factors=scale_factor, prob=intensity_prob))
        jitter.append(RandShiftIntensityd(keys=key, offsets=shift_offset, prob=intensity_prob))
        jitter.append(RandGaussianNoised(keys=key, prob=noise_prob, std=noise_std))
    return Compose(
        [
            RandGridCropPaird(
                keys=source_key,
                n=grid_n,
                cell_size=token_stride,
                min_overlap=min_overlap,
                pad_value=pad_value,
                small_postfix=SMALL_POSTFIX,
                large_postfix=LARGE_POSTFIX,
            ),
            *jitter,
            DeleteItemsd(keys=source_key),
            EnsureTyped(keys=crops, track_meta=False),
        ]
    )
