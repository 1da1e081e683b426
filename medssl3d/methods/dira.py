"""DiRA-3D: discriminative, restorative and adversarial learning in one encoder–decoder (methods.md §3).

Haghighi et al., "DiRA: Discriminative, Restorative, and Adversarial Learning for Self-supervised
Medical Image Analysis", CVPR 2022 (published in 2D; this is the 3D port). Two crops of one
volume are distorted with the Models-Genesis chain (:mod:`medssl3d.transforms.genesis`); one
encoder–decoder (SwinUNETR layout, or MONAI's BasicUNet preset) sees both distorted views as one
batch and

- discriminates them from the mean-pooled bottleneck through a projector: ``moco`` (momentum key
  encoder and a queue of keys, InfoNCE, symmetrised over the two views), ``barlow`` (Barlow Twins)
  or ``simsiam`` (predictor, stop-gradient, negative cosine);
- restores the undistorted crops (sigmoid output, MSE);
- in stage ``dira``, fools a 3D PatchGAN discriminator (least squares), which the engine trains
  with its own Adam as an auxiliary objective on the detached restorations.

``L = 1·L_dis + 10·L_res + 0.001·L_adv``. Stage ``dir`` has no discriminator; stage ``dira`` starts
from a ``dir`` checkpoint with :func:`init_from_checkpoint`. The momentum encoder is updated in
``forward`` (before its keys are computed, as MoCo does) with ``moco_momentum``, so the engine's
EMA schedule does not apply to it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
    SpatialPadd,
)
from torch import Tensor, nn

from medssl3d.engine.checkpoint import check_compatible, load_checkpoint
from medssl3d.losses.barlow import DEFAULT_LAMBDA, BarlowTwinsLoss
from medssl3d.losses.lsgan import LSGANLoss
from medssl3d.losses.moco import DEFAULT_QUEUE_SIZE, DEFAULT_TEMPERATURE, MoCoLoss
from medssl3d.methods import presets
from medssl3d.methods.base import Auxiliary, SSLMethod, StepInfo, make_teacher
from medssl3d.networks.backbones import Backbone, SwinBackbone
from medssl3d.networks.patchgan import DEFAULT_BASE_CHANNELS, DEFAULT_NUM_LAYERS, PatchDiscriminator3D
from medssl3d.networks.unet3d import DEFAULT_UNET_FEATURES, UNetBackbone
from medssl3d.transforms.genesis import (
    DEFAULT_BEZIER_PROB,
    DEFAULT_INPAINT_RATE,
    DEFAULT_PAINT_PROB,
    DEFAULT_SHUFFLE_PROB,
    genesis_distortions,
)
from medssl3d.transforms.views import (
    DEFAULT_INTENSITY_PROB,
    DEFAULT_SCALE_FACTOR,
    DEFAULT_SHIFT_OFFSET,
    VIEW_KEYS,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DISTORTED_POSTFIX",
    "NETWORKS",
    "STAGES",
    "VARIANTS",
    "DiRA",
    "DiraConfig",
    "DiraKeyEncoder",
    "DiraStudent",
    "build_dira",
    "config_from_yaml",
    "dira_transforms",
    "init_from_checkpoint",
]

STAGES = ("dir", "dira")
VARIANTS = ("moco", "barlow", "simsiam")
NETWORKS = ("swin", "unet")
DISTORTED_POSTFIX = "_distorted"  # batch key of a view's distorted copy: "view1_distorted"
NUM_VIEWS = 2
DISCRIMINATOR = "discriminator"  # attribute, auxiliary-objective and state-dict prefix of the adversary
DEFAULT_DIRA_ROI = (96, 96, 96)
DEFAULT_SCALE_RANGE = (0.75, 1.25)  # crop side before resizing to the roi, per axis, relative to the roi
DEFAULT_FLIP_PROB = 0.5
DEFAULT_FLIP_AXES = (0, 1, 2)


@dataclass(frozen=True)
class DiraConfig:
    """Hyper-parameters of :class:`DiRA` (defaults: methods.md §3 at Swin ``base`` size).

    Attributes:
        stage: "dir" (discriminative + restorative warm-up) or "dira" (adversary on).
        variant: discriminative branch, "moco", "barlow" or "simsiam".
        network: encoder–decoder, "swin" (SwinUNETR layout) or "unet" (MONAI BasicUNet).
        backbone_size: Swin size, "tiny" / "small" / "base" (feature_size 12 / 24 / 48).
        unet_features: BasicUNet widths (network "unet").
        in_channels: input (and restored) channels.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        proj_hidden_dim: hidden width of the projector's layers.
        moco_dim: MoCo embedding width (MoCo v2's 128).
        moco_queue_size: MoCo queue length K.
        moco_temperature: MoCo InfoNCE temperature.
        moco_momentum: momentum of the key encoder's update.
        barlow_dim: Barlow Twins embedding width.
        barlow_lambda: Barlow Twins off-diagonal weight.
        simsiam_dim: SimSiam embedding width.
        simsiam_pred_dim: SimSiam predictor bottleneck width.
        gather_distributed: under DDP, MoCo enqueues every rank's keys and Barlow Twins correlates
            over the global batch (only when a process group is initialised).
        dis_weight: weight of the discriminative loss.
        res_weight: weight of the restoration MSE.
        adv_weight: weight of the generator's adversarial loss (stage "dira").
        disc_channels: width of the PatchGAN's first layer.
        disc_layers: stride-2 convolutions of the PatchGAN.
        disc_lr: the discriminator's Adam learning rate.
        disc_betas: the discriminator's Adam betas.
        disc_clip_grad: gradient-norm clip of the discriminator (None: off).
        view_keys: batch keys of the two undistorted views (the restoration targets).
        input_postfix: ``view_key + input_postfix`` is the distorted view fed to the network.
    """

    stage: str = "dira"
    variant: str = "moco"
    network: str = "swin"
    backbone_size: str = "base"
    unet_features: tuple[int, ...] = DEFAULT_UNET_FEATURES
    in_channels: int = 1
    use_checkpoint: bool = False
    proj_hidden_dim: int = 2048
    moco_dim: int = 128
    moco_queue_size: int = DEFAULT_QUEUE_SIZE
    moco_temperature: float = DEFAULT_TEMPERATURE
    moco_momentum: float = 0.999
    barlow_dim: int = 2048
    barlow_lambda: float = DEFAULT_LAMBDA
    simsiam_dim: int = 2048
    simsiam_pred_dim: int = 512
    gather_distributed: bool = True
    dis_weight: float = 1.0
    res_weight: float = 10.0
    adv_weight: float = 0.001
    disc_channels: int = DEFAULT_BASE_CHANNELS
    disc_layers: int = DEFAULT_NUM_LAYERS
    disc_lr: float = 2e-4
    disc_betas: tuple[float, float] = (0.5, 0.999)
    disc_clip_grad: float | None = None
    view_keys: tuple[str, ...] = VIEW_KEYS
    input_postfix: str = DISTORTED_POSTFIX

    def __post_init__(self) -> None:
        # YAML / JSON give lists: store tuples so the config stays hashable.
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        object.__setattr__(self, "unet_features", tuple(int(f) for f in self.unet_features))
        object.__setattr__(self, "disc_betas", tuple(float(b) for b in self.disc_betas))
        for name, allowed in (("stage", STAGES), ("variant", VARIANTS), ("network", NETWORKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.view_keys) != NUM_VIEWS or len(set(self.view_keys)) != NUM_VIEWS:
            raise ValueError(f"view_keys must be {NUM_VIEWS} different keys, got {self.view_keys}")
        if not self.input_postfix:
            raise ValueError("input_postfix must be non-empty, otherwise the restoration target is overwritten")
        for name in ("in_channels", "proj_hidden_dim", "moco_dim", "moco_queue_size", "barlow_dim",
                     "simsiam_dim", "simsiam_pred_dim", "disc_channels", "disc_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("moco_temperature", "disc_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("dis_weight", "res_weight", "adv_weight", "barlow_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.moco_momentum <= 1.0:
            raise ValueError(f"moco_momentum must be in [0, 1], got {self.moco_momentum}")
        if len(self.disc_betas) != 2:
            raise ValueError(f"disc_betas must be a pair, got {self.disc_betas}")


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> DiraConfig:
    """Read a preset of ``configs/methods/dira.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(DiraConfig, path, preset, **overrides)


def _backbone(cfg: DiraConfig, with_decoder: bool) -> Backbone:
    if cfg.network == "swin":
        return SwinBackbone(size=cfg.backbone_size, in_channels=cfg.in_channels, with_decoder=with_decoder,
                            use_checkpoint=cfg.use_checkpoint)
    return UNetBackbone(features=cfg.unet_features, in_channels=cfg.in_channels, with_decoder=with_decoder)


def _bn_mlp(widths: Sequence[int], *, last_bn: bool) -> nn.Sequential:
    """Linear (no bias) → BatchNorm → ReLU between widths; a plain last Linear, or a last BN (no affine)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def _projector(cfg: DiraConfig, in_dim: int) -> nn.Sequential:
    """MoCo v2's 2-layer MLP, Barlow Twins' 3-layer BN MLP, or SimSiam's 3-layer BN MLP ending in BN."""
    hidden = cfg.proj_hidden_dim
    if cfg.variant == "moco":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.moco_dim))
    if cfg.variant == "barlow":
        return _bn_mlp((in_dim, hidden, hidden, cfg.barlow_dim), last_bn=False)
    return _bn_mlp((in_dim, hidden, hidden, cfg.simsiam_dim), last_bn=True)


class DiraStudent(nn.Module):
    """The encoder–decoder with its restoration conv, projector and (SimSiam) predictor.

    Args:
        config: the method's hyper-parameters.
    """

    def __init__(self, config: DiraConfig) -> None:
        super().__init__()
        self.backbone = _backbone(config, with_decoder=True)
        self.restore = nn.Conv3d(self.backbone.decoder_channels, config.in_channels, kernel_size=1)
        self.projector = _projector(config, self.backbone.embed_dim)
        self.predictor = (
            _bn_mlp((config.simsiam_dim, config.simsiam_pred_dim, config.simsiam_dim), last_bn=False)
            if config.variant == "simsiam" else None
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Encode, project and restore.

        Args:
            x: distorted views (B, C, D, H, W), sides divisible by 32 (Swin) or 16 (U-Net).

        Returns:
            ``embedding`` (B, E) from the mean-pooled bottleneck, ``restoration`` (B, C, D, H, W) in
            (0, 1), and for SimSiam ``prediction`` (B, E).
        """
        out = self.backbone(x)
        embedding = self.projector(out.tokens.mean(dim=1))
        result = {"embedding": embedding, "restoration": torch.sigmoid(self.restore(self.backbone.decode(x, out)))}
        if self.predictor is not None:
            result["prediction"] = self.predictor(embedding)
        return result


class DiraKeyEncoder(nn.Module):
    """MoCo's momentum encoder: the student's encoder (no decoder) and projector, same parameter names."""

    def __init__(self, config: DiraConfig) -> None:
        super().__init__()
        self.backbone = _backbone(config, with_decoder=False)
        self.projector = _projector(config, self.backbone.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Keys (B, moco_dim) of ``x`` (B, C, D, H, W)."""
        return self.projector(self.backbone(x).tokens.mean(dim=1))


# ------------------------------------------------------------------------------------------ method
class DiRA(SSLMethod):
    """DiRA-3D (discriminative + restorative [+ adversarial]).

    The batch (from :func:`dira_transforms`) holds, for both view keys ``v``, the undistorted view
    ``v`` (B, C, D, H, W) (the restoration target) and its distorted copy ``v + "_distorted"`` (the
    input). Both views run through the student as one batch of 2B.

    Args:
        config: hyper-parameters; the defaults are methods.md §3.
    """

    name = "dira"

    def __init__(self, config: DiraConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config if config is not None else DiraConfig()
        self.backbone_name = (
            f"swin-{cfg.backbone_size}" if cfg.network == "swin"
            else "unet-" + "-".join(str(f) for f in cfg.unet_features)
        )
        self.student = DiraStudent(cfg)
        self.restoration_loss = nn.MSELoss()
        if cfg.variant == "moco":
            self.teacher = make_teacher(DiraKeyEncoder(cfg))
            self._copy_into_teacher()
            self.moco_loss = MoCoLoss(cfg.moco_dim, cfg.moco_queue_size, cfg.moco_temperature,
                                      gather_distributed=cfg.gather_distributed)
        elif cfg.variant == "barlow":
            self.barlow_loss = BarlowTwinsLoss(cfg.barlow_lambda, gather_distributed=cfg.gather_distributed)
        self.discriminator = (
            PatchDiscriminator3D(cfg.in_channels, cfg.disc_channels, cfg.disc_layers) if cfg.stage == "dira" else None
        )
        self.adversarial_loss = LSGANLoss()

    # ---------------------------------------------------------------- momentum encoder
    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        student = dict(self.student.named_parameters())
        names = [n for n, _ in self.teacher.named_parameters()]
        return [p for _, p in self.teacher.named_parameters()], [student[n] for n in names]

    @torch.no_grad()
    def _copy_into_teacher(self) -> None:
        teacher, student = self._pairs()
        torch._foreach_copy_(teacher, [s.detach() for s in student])

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Key encoder ← m · key encoder + (1 − m) · student encoder and projector (MoCo)."""
        teacher, student = self._pairs()
        torch._foreach_lerp_(teacher, [s.detach() for s in student], 1.0 - self.config.moco_momentum)
        student_buffers = dict(self.student.named_buffers())
        for name, buf in self.teacher.named_buffers():
            buf.copy_(student_buffers[name])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """None: the key encoder is updated in :meth:`forward` with ``moco_momentum``, not by the engine."""
        return []

    # ---------------------------------------------------------------- losses
    def _discriminative(self, inputs: Tensor, out: dict[str, Tensor]) -> Tensor:
        z1, z2 = out["embedding"].chunk(NUM_VIEWS)
        variant = self.config.variant
        if variant == "barlow":
            return self.barlow_loss(z1, z2)
        if variant == "simsiam":
            p1, p2 = out["prediction"].chunk(NUM_VIEWS)
            cos = F.cosine_similarity
            return -0.5 * (cos(p1, z2.detach(), dim=1).mean() + cos(p2, z1.detach(), dim=1).mean())
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k1, k2 = self.teacher(inputs).chunk(NUM_VIEWS)
        loss = 0.5 * (self.moco_loss(z1, k2) + self.moco_loss(z2, k1))
        if self.training:
            self.moco_loss.enqueue(torch.cat([k1, k2]))
        return loss

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute the weighted total.

        Args:
            batch: ``{v: (B, C, D, H, W), v + input_postfix: (B, C, D, H, W)}`` for both view keys ``v``.
            step: unused (no schedule in this method).

        Returns:
            ``{"loss", "parts": {"dis", "res"[, "adv"]}, "fake": restorations, "real": targets}``
            (parts unweighted and detached; ``fake`` / ``real`` (2B, C, D, H, W) detached, for the
            discriminator's step).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
        """
        cfg = self.config
        try:
            inputs = torch.cat([batch[f"{v}{cfg.input_postfix}"] for v in cfg.view_keys])
            targets = torch.cat([batch[v] for v in cfg.view_keys])
        except KeyError as e:
            raise KeyError(f"dira batch lacks {e}; it has {sorted(batch)}") from e
        out = self.run_student(inputs)
        restored = out["restoration"]
        dis = self._discriminative(inputs, out)
        res = self.restoration_loss(restored, targets)
        loss = cfg.dis_weight * dis + cfg.res_weight * res
        parts = {"dis": dis.detach(), "res": res.detach()}
        if self.discriminator is not None:
            # The engine freezes the discriminator's parameters here: this term trains the generator only.
            adv = self.adversarial_loss(self.discriminator(restored), True)
            loss = loss + cfg.adv_weight * adv
            parts["adv"] = adv.detach()
        return {"loss": loss, "parts": parts, "fake": restored.detach(), "real": targets.detach()}

    def discriminator_loss(self, batch: dict[str, Any], outputs: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """The discriminator's least-squares loss on the detached restorations and targets of ``outputs``."""
        real = self.discriminator(outputs["real"])
        fake = self.discriminator(outputs["fake"])
        return {
            "loss": self.adversarial_loss.discriminator(real, fake),
            "parts": {"real_score": real.detach().mean(), "fake_score": fake.detach().mean()},
        }

    def auxiliary_objectives(self) -> list[Auxiliary]:
        """The PatchGAN discriminator with its own Adam (stage "dira"); none in stage "dir"."""
        if self.discriminator is None:
            return []
        cfg = self.config
        return [
            Auxiliary(
                name=DISCRIMINATOR,
                module=self.discriminator,
                make_optimizer=functools.partial(torch.optim.Adam, lr=cfg.disc_lr, betas=cfg.disc_betas),
                loss=self.discriminator_loss,
                clip_grad=cfg.disc_clip_grad,
            )
        ]


def build_dira(**cfg: Any) -> DiRA:
    """Build :class:`DiRA` from :class:`DiraConfig` fields (a bundle's ``_target_``).

    Raises:
        ValueError: an unknown field or a bad value.
    """
    return DiRA(presets.config_from_kwargs(DiraConfig, **cfg))


def init_from_checkpoint(method: DiRA, path: str | os.PathLike | None) -> DiRA:
    """Start a stage from another stage's weights (``dira`` from ``dir``); a new schedule, not a resume.

    Loads the checkpoint's model state (student, momentum encoder, queue; the discriminator too
    when the checkpoint has one). Only the discriminator may be missing from the checkpoint; any
    other difference (another variant, network or size) is an error. Optimizer, step and RNG
    states are not taken: the engine starts a new run (and its own ``resume`` wins when that run
    already has a checkpoint).

    Args:
        method: the freshly built method.
        path: an engine checkpoint; empty or None leaves ``method`` as built.

    Returns:
        ``method`` itself, for chaining in configs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unreadable checkpoint, another method or backbone, or mismatched weights.
    """
    if not path:
        return method
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, method.name, method.backbone_name, path)
    own, source = method.state_dict(), ckpt["model"]
    unexpected = sorted(k for k in source if k not in own)
    mismatched = sorted(k for k in source if k in own and own[k].shape != source[k].shape)
    missing = sorted(k for k in own if k not in source and not k.startswith(f"{DISCRIMINATOR}."))
    if unexpected or mismatched or missing:
        raise ValueError(
            f"cannot start from {path}: its weights differ from this run's (another variant or network?): "
            f"unexpected {unexpected[:3]}, missing {missing[:3]}, other shapes {mismatched[:3]}"
        )
    method.load_state_dict(source, strict=False)
    logger.info("initialised %s (%s) from %s (step %s); discriminator %s", method.name, method.backbone_name,
                path, ckpt.get("step"), "loaded" if any(k.startswith(DISCRIMINATOR) for k in source) else "fresh")
    return method


# ------------------------------------------------------------------------------------------ views
def dira_transforms(
    roi: Sequence[int] = DEFAULT_DIRA_ROI,
    *,
    source_key: str = "image",
    view_keys: Sequence[str] = VIEW_KEYS,
    input_postfix: str = DISTORTED_POSTFIX,
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
    flip_prob: float = DEFAULT_FLIP_PROB,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    intensity_prob: float = DEFAULT_INTENSITY_PROB,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    shift_offset: float = DEFAULT_SHIFT_OFFSET,
    bezier_prob: float = DEFAULT_BEZIER_PROB,
    shuffle_prob: float = DEFAULT_SHUFFLE_PROB,
    paint_prob: float = DEFAULT_PAINT_PROB,
    inpaint_rate: float = DEFAULT_INPAINT_RATE,
) -> Compose:
    """View generation of :class:`DiRA`, from a loaded, preprocessed volume to a training sample.

    For each view: a random crop whose sides are ``U(scale_range) * roi`` (per axis), resized to
    ``roi`` (trilinear), random flips; this is the restoration target ``v``. Its copy
    ``v + input_postfix`` then gets intensity jitter (scale and shift) and the Models-Genesis
    distortions (:func:`~medssl3d.transforms.genesis.genesis_distortions`). The source is dropped
    and MetaTensors become plain tensors.

    Args:
        roi: view size (D, H, W).
        source_key: key of the volume (1, D, H, W), intensities in [0, 1] (a data preset's output).
        view_keys: the two view keys.
        input_postfix: suffix of the distorted views' keys.
        scale_range: (low, high) crop side relative to ``roi`` before the resize.
        flip_prob: probability of flipping along each of ``flip_axes``.
        flip_axes: spatial axes that may be flipped.
        intensity_prob: probability of each of the scale and shift jitters.
        scale_factor: intensities multiplied by ``1 + U(-scale_factor, scale_factor)``.
        shift_offset: intensities shifted by ``U(-shift_offset, shift_offset)``.
        bezier_prob: probability of the Bézier remap.
        shuffle_prob: probability of the local shuffling.
        paint_prob: probability of painting (in- or out-).
        inpaint_rate: share of in-painting among paintings.

    Returns:
        A ``Compose`` giving ``{v: (1, *roi), v + input_postfix: (1, *roi)}`` for each view key ``v``.

    Raises:
        ValueError: a bad ``roi`` or ``scale_range``.
    """
    roi = tuple(int(s) for s in roi)
    lo, hi = (float(s) for s in scale_range)
    if not roi or min(roi) < 1:
        raise ValueError(f"roi must be positive sizes, got {roi}")
    if not 0.0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    smallest = tuple(max(1, int(lo * s)) for s in roi)
    largest = tuple(max(1, int(round(hi * s))) for s in roi)
    per_view: list = []
    for v in view_keys:
        distorted = f"{v}{input_postfix}"
        per_view += [
            RandSpatialCropd(keys=v, roi_size=smallest, max_roi_size=largest, random_size=True),
            Resized(keys=v, spatial_size=roi, mode="trilinear"),
            *(RandFlipd(keys=v, prob=flip_prob, spatial_axis=axis) for axis in flip_axes),
            CopyItemsd(keys=v, names=distorted),
            RandScaleIntensityd(keys=distorted, factors=scale_factor, prob=intensity_prob),
            RandShiftIntensityd(keys=distorted, offsets=shift_offset, prob=intensity_prob),
            genesis_distortions(distorted, bezier_prob=bezier_prob, shuffle_prob=shuffle_prob,
                                paint_prob=paint_prob, inpaint_rate=inpaint_rate),
        ]
    keys = [k for v in view_keys for k in (v, f"{v}{input_postfix}")]
    return Compose(
        [
            SpatialPadd(keys=source_key, spatial_size=largest),
            CopyItemsd(keys=source_key, times=len(view_keys), names=list(view_keys)),
            *per_view,
            DeleteItemsd(keys=source_key),
            EnsureTyped(keys=keys, track_meta=False, dtype=torch.float32),
        ]
    )
