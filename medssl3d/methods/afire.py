"""AFiRe-3D: token-wise anatomy-guided contrast + anomaly-removal restoration.

See ``docs/methods.md`` (section "AFiRe-3D").

On spatially aligned volumes a ViT student sees the volume with synthetic lesions ``x~`` and an
EMA teacher sees the clean volume ``x``. A spatial-aware head scores every token against its
position's prototypes; per-position prototype means ``C`` (EMA of the teacher's scores) are
balanced by Sinkhorn-Knopp into targets for the categorical term, and an InfoNCE over positions
against the per-position centres (EMA of the teacher's mean features) gives the structural term.
Both ignore tokens hit by a lesion. A decoder, in which lesioned tokens are replaced by learned
per-position mask tokens, restores the clean volume (MSE). Total: ``L_cate + L_stru + L_rec`` (weights 1).

Volumes are (B, C, D, H, W); after the preset's ``Orientationd("RAS")`` D, H, W run left->right,
posterior->anterior and inferior->superior. Tokens are in raster order over the patch grid, last axis fastest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.transforms import Compose, EnsureTyped
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from medssl3d.engine.distributed import all_reduce_mean
from medssl3d.losses.afire import (
    STRUCTURAL_TEMPERATURE,
    STUDENT_TEMPERATURE,
    CategoricalLoss,
    RestorationLoss,
    StructuralLoss,
)
from medssl3d.losses.sinkhorn import DEFAULT_EPSILON, DEFAULT_ITERATIONS, sinkhorn_knopp
from medssl3d.methods import presets
from medssl3d.methods.base import SSLMethod, StepInfo, make_teacher
from medssl3d.networks.backbones import VIT_PATCH_SIZE, ViTBackbone
from medssl3d.networks.mask_decoder import DECODER_DEPTH, DECODER_DIM, DECODER_HEADS, MaskTokenDecoder
from medssl3d.networks.spatial_head import BOTTLENECK_DIM, HIDDEN_DIM, N_LAYERS, NUM_PROTOTYPES, SpatialAwareHead
from medssl3d.transforms.alignment import (
    CROP_MARGIN,
    DEFAULT_SIZE,
    EXTENT_TOLERANCE,
    FOREGROUND_THRESHOLD,
    alignment_transforms,
    check_no_spatial_augmentation,
)
from medssl3d.transforms.lesions import (
    ABNORMAL_POSTFIX,
    EXTENT_FRACTION,
    LESIONED_POSTFIX,
    MAP_POSTFIX,
    MAX_LESIONS,
    MAX_STRENGTH,
    MIN_LESIONS,
    TEXTURE_FRACTION,
    RandSyntheticLesiond,
)

__all__ = [
    "Afire",
    "AfireConfig",
    "AfireStudent",
    "StepEMA",
    "afire_transforms",
    "build_afire",
    "config_from_checkpoint",
    "parity_groups",
    "config_from_yaml",
]

PROTOTYPE_MOMENTUM = 0.75
CENTRE_MOMENTUM = 0.9
EXTRA_STATE_CONFIG = "config"
EXTRA_STATE_KEY = "_extra_state"
"""Where ``nn.Module.state_dict`` puts a top-level module's ``get_extra_state()``."""


@dataclass(frozen=True)
class AfireConfig:
    """Hyper-parameters of :class:`Afire` (defaults: ``docs/methods.md``, section "AFiRe-3D", at ViT-B, 96^3).

    Attributes:
        backbone_size: ViTBackbone size, "tiny" / "small" / "base" (hidden 192 / 384 / 768).
        img_size: the aligned grid (D, H, W); the ViT only takes this size.
        in_channels: input (and restored) channels.
        patch_size: ViT patch side (16 for export to UNETR); a lesion token is a patch with ``m > 0``.
        head_hidden_dim: hidden width of the spatial-aware head's MLP.
        head_bottleneck_dim: width of its normalised feature.
        head_layers: linear layers of its MLP.
        num_prototypes: prototypes per position ``K``.
        prototype_momentum: ``C <- momentum * C + (1 - momentum) * mean_b z^T``.
        sinkhorn_epsilon: Sinkhorn-Knopp temperature on the prototypes.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        student_temperature: softmax temperature of the categorical term.
        structural_temperature: InfoNCE temperature of the structural term.
        structural: compute the structural term (False: it is 0, the official code's objective).
        centre_momentum: ``c <- momentum * c + (1 - momentum) * mean_b z^T`` for the structural centres.
        decoder_dim: restoration decoder width.
        decoder_depth: its transformer blocks.
        decoder_heads: its attention heads.
        lesion_weight: weight of lesion voxels in the restoration MSE (1: plain MSE).
        categorical_weight: weight of ``L_cate``.
        structural_weight: weight of ``L_stru``.
        restoration_weight: weight of ``L_rec``.
        image_key: batch key of the clean volume (the teacher's input and the restoration target).
        lesioned_postfix: ``image_key + lesioned_postfix`` is the student's input.
        map_postfix: ``image_key + map_postfix`` is the lesion map ``m``.
        abnormal_postfix: ``image_key + abnormal_postfix`` is the (B, N) abnormal-token mask.
    """

    backbone_size: str = "base"
    img_size: tuple[int, int, int] = DEFAULT_SIZE
    in_channels: int = 1
    patch_size: int = VIT_PATCH_SIZE
    head_hidden_dim: int = HIDDEN_DIM
    head_bottleneck_dim: int = BOTTLENECK_DIM
    head_layers: int = N_LAYERS
    num_prototypes: int = NUM_PROTOTYPES
    prototype_momentum: float = PROTOTYPE_MOMENTUM
    sinkhorn_epsilon: float = DEFAULT_EPSILON
    sinkhorn_iterations: int = DEFAULT_ITERATIONS
    student_temperature: float = STUDENT_TEMPERATURE
    structural_temperature: float = STRUCTURAL_TEMPERATURE
    structural: bool = True
    centre_momentum: float = CENTRE_MOMENTUM
    decoder_dim: int = DECODER_DIM
    decoder_depth: int = DECODER_DEPTH
    decoder_heads: int = DECODER_HEADS
    lesion_weight: float = 1.0
    categorical_weight: float = 1.0
    structural_weight: float = 1.0
    restoration_weight: float = 1.0
    image_key: str = "image"
    lesioned_postfix: str = LESIONED_POSTFIX
    map_postfix: str = MAP_POSTFIX
    abnormal_postfix: str = ABNORMAL_POSTFIX

    def __post_init__(self) -> None:
        # YAML / JSON give lists (and a bundle may give one int): store a 3-tuple so the config stays hashable.
        size = self.img_size
        size = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "img_size", size)
        if len(size) != 3 or any(s % self.patch_size or s < self.patch_size for s in size):
            raise ValueError(
                f"img_size {size} must be 3 sides, each a positive multiple of patch_size {self.patch_size}"
            )
        for name in (
            "in_channels",
            "head_hidden_dim",
            "head_bottleneck_dim",
            "head_layers",
            "num_prototypes",
            "sinkhorn_iterations",
            "decoder_dim",
            "decoder_depth",
            "decoder_heads",
            "patch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prototype_momentum", "centre_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("sinkhorn_epsilon", "student_temperature", "structural_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lesion_weight", "categorical_weight", "structural_weight", "restoration_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid along the (D, H, W) axes (``img_size / patch_size``)."""
        return tuple(s // self.patch_size for s in self.img_size)

    @property
    def num_tokens(self) -> int:
        """Token positions ``N = prod(img_size / patch_size)`` (216 at 96^3)."""
        g0, g1, g2 = self.grid_size
        return g0 * g1 * g2


def _merge_config(base, overrides: Mapping[str, Any], what: str) -> AfireConfig:
    try:
        merged = OmegaConf.merge(base, dict(overrides))
    except OmegaConfBaseException as e:
        names = ", ".join(f.name for f in fields(AfireConfig))
        raise ValueError(f"bad afire {what} {dict(overrides)}: {e} (fields: {names})") from e
    return OmegaConf.to_object(merged)


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> AfireConfig:
    """Read a preset of ``configs/methods/afire.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(AfireConfig, path, preset, **overrides)


def config_from_checkpoint(model_state: Mapping[str, Any], **overrides: Any) -> AfireConfig:
    """The :class:`AfireConfig` an :class:`Afire` state dict was saved with (its ``_extra_state``).

    Raises:
        ValueError: the state dict holds no AFiRe config.
    """
    extra = model_state.get(EXTRA_STATE_KEY)
    if not isinstance(extra, Mapping) or EXTRA_STATE_CONFIG not in extra:
        raise ValueError("this state dict holds no AFiRe config (was it written by the afire method?)")
    return _merge_config(OmegaConf.structured(AfireConfig(**extra[EXTRA_STATE_CONFIG])), overrides, "override")


def _freeze_unused_cross_attention_norms(module: nn.Module) -> int:
    """Stop gradients to the LayerNorm MONAI's ``TransformerBlock`` builds even without cross-attention.

    It never enters the forward pass; left trainable it would be an unused parameter under DDP.
    Kept (not deleted) so the ViT's keys still match MONAI ``UNETR``'s on export.

    Returns:
        Number of blocks touched.
    """
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock) and not m.with_cross_attention]
    for block in blocks:
        block.norm_cross_attn.requires_grad_(False)
    return len(blocks)


class AfireStudent(nn.Module):
    """ViT encoder, spatial-aware head and mask-token restoration decoder.

    Args:
        config: the method's hyper-parameters.
    """

    def __init__(self, config: AfireConfig) -> None:
        super().__init__()
        self.backbone = ViTBackbone(
            size=config.backbone_size,
            img_size=config.img_size,
            in_channels=config.in_channels,
            patch_size=config.patch_size,
        )
        dim = self.backbone.embed_dim
        self.head = SpatialAwareHead(
            dim,
            config.num_tokens,
            num_prototypes=config.num_prototypes,
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
            n_layers=config.head_layers,
        )
        self.decoder = MaskTokenDecoder(
            dim,
            config.grid_size,
            patch_size=config.patch_size,
            out_channels=config.in_channels,
            dim=config.decoder_dim,
            depth=config.decoder_depth,
            num_heads=config.decoder_heads,
        )
        _freeze_unused_cross_attention_norms(self)

    def forward(self, x: Tensor, abnormal: Tensor | None = None) -> dict[str, Tensor]:
        """Encode, score and restore.

        Args:
            x: ``(B, C, *img_size)`` (the lesioned volume in training).
            abnormal: ``(B, N)`` bool, tokens the decoder replaces by mask tokens (None: none).

        Returns:
            ``scores`` (B, N, K) cosine scores, ``z`` (B, N, d) normalised head features and
            ``reconstruction`` (B, C, *img_size).
        """
        tokens = self.backbone(x).tokens
        scores, z = self.head(tokens)
        return {"scores": scores, "z": z, "reconstruction": self.decoder(tokens, abnormal)}


def parity_groups(grid_size: Sequence[int]) -> Tensor:
    """Tokens split by the parity of their grid index along each axis: no two face neighbours share a group.

    Args:
        grid_size: the token grid (3 sides).

    Returns:
        ``(G, N)`` bool, one row per non-empty group (G = 8 when every side is at least 2); every token
        is in exactly one row; tokens in raster order, last axis fastest.
    """
    axes = [torch.arange(int(g)) % 2 for g in grid_size]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    group = index[:, 0] * 4 + index[:, 1] * 2 + index[:, 2]
    return torch.stack([group == k for k in torch.unique(group)])


class StepEMA(nn.Module):
    """An exponential moving average over optimizer steps that pools the micro-batches of a step.

    After micro-batch ``i`` (``StepInfo.micro_batch``) of an optimizer step the value is
    ``momentum * v + (1 - momentum) * mean(batch means of micro-batches 0..i)``, with ``v`` the value
    before the step, so gradient accumulation changes neither the momentum per optimizer step nor the
    weight of a sample. The first step of training sets the value to the pooled mean. Batch means
    are passed in already all-reduced across ranks.

    Buffers: ``value`` and ``ready`` (checkpointed); the step's start value and running mean (not
    checkpointed: the engine writes checkpoints between optimizer steps).

    Args:
        shape: shape of the value, e.g. (N, K).
        momentum: weight of the previous value, in [0, 1).
    """

    def __init__(self, shape: Sequence[int], momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("value", torch.zeros(*shape))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step_start", torch.zeros(*shape), persistent=False)
        self.register_buffer("step_mean", torch.zeros(*shape), persistent=False)
        self._keep = self.momentum

    @torch.no_grad()
    def update(self, batch_mean: Tensor, micro_batch: int) -> None:
        """Fold in the mean of one micro-batch (``micro_batch`` 0 starts a new optimizer step)."""
        if micro_batch == 0:
            self._keep = self.momentum if bool(self.ready) else 0.0
            self.step_start.copy_(self.value)
            self.step_mean.copy_(batch_mean)
            self.ready.fill_(True)
        else:
            self.step_mean.add_(batch_mean.to(self.step_mean) - self.step_mean, alpha=1.0 / (micro_batch + 1))
        self.value.copy_(self._keep * self.step_start + (1.0 - self._keep) * self.step_mean)


class Afire(SSLMethod):
    """AFiRe-3D pretraining on aligned volumes.

    The batch (from :func:`afire_transforms`) holds the clean volume under ``image_key``
    (B, C, *img_size), the lesioned one under ``image_key + lesioned_postfix``, the lesion map under
    ``image_key + map_postfix`` and the (B, N) abnormal-token mask under ``image_key + abnormal_postfix``.

    State (checkpointed with the method, moved only in training): ``prototype_ema`` holds ``C`` (N, K),
    the EMA of the teacher's per-position mean scores, and ``centre_ema`` the structural centres (N, d),
    the EMA of the teacher's per-position mean features (normalised where used); both are :class:`StepEMA`
    set by the first training step. As EMAs, not batch means, the centres are population means
    at any batch size, not the anchor scan's own teacher features at a batch of one.

    Args:
        config: hyper-parameters; the defaults are ``docs/methods.md`` (section "AFiRe-3D").
    """

    name = "afire"

    def __init__(self, config: AfireConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AfireConfig()
        cfg = self.config
        self.backbone_name = f"vit-{cfg.backbone_size}"
        self.student = AfireStudent(cfg)
        self.teacher = make_teacher(nn.ModuleDict({"backbone": self.student.backbone, "head": self.student.head}))
        self.prototype_ema = StepEMA((cfg.num_tokens, cfg.num_prototypes), cfg.prototype_momentum)
        self.centre_ema = StepEMA((cfg.num_tokens, cfg.head_bottleneck_dim), cfg.centre_momentum)
        self.categorical_loss = CategoricalLoss(cfg.student_temperature)
        self.structural_loss = StructuralLoss(cfg.structural_temperature)
        self.restoration_loss = RestorationLoss(cfg.lesion_weight)

    @property
    def prototypes(self) -> Tensor:
        """``C`` (N, K): the EMA of the teacher's per-position mean scores."""
        return self.prototype_ema.value

    @property
    def centres(self) -> Tensor:
        """The structural centres (N, d): the EMA of the teacher's per-position mean features, unnormalised."""
        return self.centre_ema.value

    def get_extra_state(self) -> dict[str, Any]:
        """The config, saved in the state dict so tools (``medssl3d anomaly-map``) can rebuild the model."""
        return {EXTRA_STATE_CONFIG: dataclasses.asdict(self.config)}

    def set_extra_state(self, state: Any) -> None:
        """Ignore the saved config on load: the running config is authoritative (see :func:`config_from_checkpoint`)."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The teacher follows the student's backbone and head (the decoder has no teacher)."""
        return [(self.student.backbone, self.teacher["backbone"]), (self.student.head, self.teacher["head"])]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The per-position prototype layers (the bundle freezes them for the first epoch)."""
        return [self.student.head.weight]

    @torch.no_grad()
    def _teacher(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.teacher["backbone"](x).tokens
        return self.teacher["head"](tokens)

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute ``L_cate + L_stru + L_rec`` (weighted).

        Args:
            batch: see the class docstring.
            step: ``micro_batch`` pools the micro-batches of one optimizer step into the prototype and
                centre EMAs (no schedule besides the engine's EMA momentum).

        Returns:
            ``{"loss": scalar, "parts": {"cate", "stru", "rec", "abnormal_fraction"}}`` (parts detached, unweighted).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
        """
        cfg = self.config
        key = cfg.image_key
        try:
            clean = batch[key]
            lesioned = batch[f"{key}{cfg.lesioned_postfix}"]
            abnormal = torch.as_tensor(batch[f"{key}{cfg.abnormal_postfix}"], device=clean.device).bool()
        except KeyError as e:
            raise KeyError(f"afire batch lacks {e}; it has {sorted(batch)}") from e
        lesion_map = batch.get(f"{key}{cfg.map_postfix}")
        abnormal = abnormal.reshape(clean.shape[0], -1)
        normal = ~abnormal

        teacher_scores, teacher_z = self._teacher(clean)
        with torch.no_grad():
            if self.training:
                self.prototype_ema.update(all_reduce_mean(teacher_scores.float().mean(dim=0)), step.micro_batch)
                if cfg.structural:
                    self.centre_ema.update(all_reduce_mean(teacher_z.float().mean(dim=0)), step.micro_batch)
            targets = sinkhorn_knopp(self.prototypes, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations)
            centres = F.normalize(self.centres, dim=-1)

        out = self.run_student(lesioned, abnormal)
        cate = self.categorical_loss(out["scores"], targets, normal)
        stru = self.structural_loss(out["z"], centres, normal) if cfg.structural else cate.new_zeros(())
        rec = self.restoration_loss(out["reconstruction"], clean, lesion_map)
        loss = cfg.categorical_weight * cate + cfg.structural_weight * stru + cfg.restoration_weight * rec
        return {
            "loss": loss,
            "parts": {
                "cate": cate.detach(),
                "stru": stru.detach(),
                "rec": rec.detach(),
                "abnormal_fraction": abnormal.float().mean().detach(),
            },
        }

    @torch.no_grad()
    def anomaly_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Masked restoration and per-token prototype distance of volumes on the aligned grid.

        The restoration objective only shapes what the decoder predicts for *masked* tokens (everywhere
        else the clean and lesioned volumes agree), so each token is restored with its mask token: the
        tokens are split into the 8 parity groups of their grid index (:func:`parity_groups`), the decoder
        runs once per group with that group masked, and each patch comes from the pass that masked it,
        restored from its unmasked neighbours. A lesion is thus replaced by the anatomy the model
        expects at that position.

        Args:
            x: ``(B, C, *img_size)`` intensities in [0, 1].

        Returns:
            ``restoration`` (B, C, *img_size): the masked restoration above;
            ``token_distance`` (B, N): ``1 - cos`` between the teacher's scores at each position and
            that position's prototype mean ``C_j`` (0: typical for the position, up to 2).

        Raises:
            RuntimeError: the prototypes were never set (an untrained model).
        """
        if not bool(self.prototype_ema.ready):
            raise RuntimeError("afire prototypes are not set: anomaly maps need a trained model")
        cfg = self.config
        tokens = self.student.backbone(x).tokens
        restoration = torch.zeros_like(x)
        for group in parity_groups(cfg.grid_size).to(x.device):
            restored = self.student.decoder(tokens, group.expand(x.shape[0], -1))
            voxels = group.reshape(cfg.grid_size)
            for axis in range(3):
                voxels = voxels.repeat_interleave(cfg.patch_size, dim=axis)
            restoration = torch.where(voxels, restored.to(restoration), restoration)
        teacher_scores, _ = self._teacher(x)
        distance = 1.0 - F.cosine_similarity(teacher_scores.float(), self.prototypes[None], dim=-1)
        return {"restoration": restoration, "token_distance": distance}


def build_afire(*, preset: str = presets.BASE_PRESET, **cfg: Any) -> Afire:
    """Build :class:`Afire` from a preset and :class:`AfireConfig` fields (a bundle's ``_target_``).

    Args:
        preset: a preset of ``configs/methods/afire.yaml``, e.g. ``"code"`` (``"base"``: the defaults).
        **cfg: AfireConfig fields; they win over the preset.

    Raises:
        ValueError: an unknown preset or field, or a bad value.
    """
    config = presets.resolve_method_config(Afire.name, preset, **cfg)
    presets.log_method_config(Afire.name, preset, config)
    return Afire(config)


def afire_transforms(
    size: Sequence[int] | int = DEFAULT_SIZE,
    *,
    image_key: str = "image",
    foreground_threshold: float = FOREGROUND_THRESHOLD,
    margin: int = CROP_MARGIN,
    template: str | os.PathLike | None = None,
    registration_cache_dir: str | os.PathLike | None = None,
    extent_tolerance: float | None = EXTENT_TOLERANCE,
    alignment_cache_dir: str | os.PathLike | None = None,
    polarity: str = "hyperdense",
    num_lesions: tuple[int, int] = (MIN_LESIONS, MAX_LESIONS),
    extent_fraction: tuple[float, float] = EXTENT_FRACTION,
    texture_fraction: float = TEXTURE_FRACTION,
    max_strength: float = MAX_STRENGTH,
    patch_size: int = VIT_PATCH_SIZE,
    lesioned_postfix: str = LESIONED_POSTFIX,
    map_postfix: str = MAP_POSTFIX,
    abnormal_postfix: str = ABNORMAL_POSTFIX,
) -> Compose:
    """AFiRe's sample generation after a data preset: alignment, then synthetic lesions; no spatial augmentation.

    Args:
        size: the aligned grid (D, H, W) (the ViT's ``img_size``).
        image_key: key of the preset output (1, D, H, W) in [0, 1].
        foreground_threshold: intensity above which a voxel is foreground (alignment crop, lesion centres).
        margin: voxels kept around the foreground box.
        template: register to this template volume first (None: no registration).
        registration_cache_dir: on-disk cache of the registration transforms (each case registered once).
        extent_tolerance: without a template, warn about cases whose foreground box departs from the median
            box by more than this fraction on any axis (None: never); see ``ForegroundExtentCheckd``.
        alignment_cache_dir: keep each case's aligned volume here, so that the (deterministic) alignment runs
            once per case, not once per view; the views are the same bit for bit (None: no cache).
        polarity: "hyperdense" (lesions add) or "hypodense" (they subtract).
        num_lesions: inclusive (min, max) lesion count.
        extent_fraction: range of a lesion's extent per axis as a fraction of the side.
        texture_fraction: texture cube side as a fraction of the side.
        max_strength: lesion strength ``s ~ U(0, max_strength)``.
        patch_size: token patch side of the abnormal-token mask.
        lesioned_postfix: suffix of the lesioned volume's key.
        map_postfix: suffix of the lesion map's key.
        abnormal_postfix: suffix of the abnormal-token mask's key.

    Returns:
        A ``Compose`` giving ``{image_key: (1, *size) clean, image_key + lesioned_postfix: (1, *size),
        image_key + map_postfix: (1, *size), image_key + abnormal_postfix: (N,) bool}`` as plain tensors.
    """
    pipeline = Compose(
        [
            alignment_transforms(
                (image_key,),
                size,
                foreground_threshold=foreground_threshold,
                margin=margin,
                template=template,
                registration_cache_dir=registration_cache_dir,
                extent_tolerance=extent_tolerance,
                cache_dir=alignment_cache_dir,
            ),
            RandSyntheticLesiond(
                image_key,
                lesioned_postfix=lesioned_postfix,
                map_postfix=map_postfix,
                abnormal_postfix=abnormal_postfix,
                num_lesions=num_lesions,
                extent_fraction=extent_fraction,
                texture_fraction=texture_fraction,
                max_strength=max_strength,
                polarity=polarity,
                foreground_threshold=foreground_threshold,
                patch_size=patch_size,
            ),
            EnsureTyped(
                [image_key, f"{image_key}{lesioned_postfix}", f"{image_key}{map_postfix}"],
                dtype=torch.float32,
                track_meta=False,
            ),
        ]
    )
    return check_no_spatial_augmentation(pipeline)
