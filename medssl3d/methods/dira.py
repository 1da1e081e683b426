"""DiRA-3D: discriminative, restorative and adversarial learning in one encoder–decoder.

The reference is ``docs/methods.md`` (section "DiRA-3D"). Haghighi et al., "DiRA: Discriminative,
Restorative, and Adversarial Learning for Self-supervised Medical Image Analysis", CVPR 2022
(published in 2D; this is the 3D port). Two crops of one volume are distorted
(:mod:`medssl3d.transforms.genesis`: the Models-Genesis chain by default, official DiRA's exclusive
mix as the ``distortion`` option); one encoder–decoder (SwinUNETR layout, or MONAI's BasicUNet
preset) sees both distorted views as one batch and

- discriminates them from the mean-pooled bottleneck through a projector: ``moco`` (momentum key
  encoder and a queue of keys, InfoNCE, symmetrised over the two views: query of view 1 against
  the key of view 2 and the reverse; queued keys of the query's own volume are not negatives),
  ``barlow`` (Barlow Twins) or ``simsiam`` (predictor, stop-gradient, negative cosine);
- restores the undistorted crops (sigmoid output, MSE);
- in stage ``dira``, fools a 3D PatchGAN discriminator (least squares), which the engine trains
  with its own Adam as an auxiliary objective on the detached restorations.

``L = 1·L_dis + 10·L_res + 0.001·L_adv``. Stage ``dir`` (the default) has no discriminator; stage
``dira`` starts from a ``dir`` checkpoint with :func:`init_from_checkpoint`. The momentum encoder
is updated in ``forward`` with ``moco_momentum``, once per optimizer step (on the step's first
micro-batch, before its keys are computed, as MoCo does), so the engine's EMA schedule does not
apply to it. Volumes are (B, C, X, Y, Z): after the presets' ``Orientationd("RAS")`` the spatial
axes run left→right, posterior→anterior and inferior→superior.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medssl3d.engine.checkpoint import check_compatible, load_checkpoint
from medssl3d.losses.barlow import DEFAULT_LAMBDA, BarlowTwinsLoss
from medssl3d.losses.lsgan import LSGANLoss
from medssl3d.losses.moco import DEFAULT_QUEUE_SIZE, DEFAULT_TEMPERATURE, MoCoLoss
from medssl3d.methods import presets
from medssl3d.methods.base import Auxiliary, SSLMethod, StepInfo, make_teacher
from medssl3d.networks.backbones import Backbone, SwinBackbone
from medssl3d.networks.patchgan import (
    DEFAULT_BASE_CHANNELS,
    DEFAULT_NUM_LAYERS,
    PATCHGAN_VARIANTS,
    PatchDiscriminator3D,
)
from medssl3d.networks.unet3d import DEFAULT_UNET_FEATURES, UNetBackbone
from medssl3d.transforms.dira_views import DISTORTED_POSTFIX, dira_transforms
from medssl3d.transforms.genesis import DISTORTIONS
from medssl3d.transforms.views import VIEW_KEYS
from medssl3d.transforms.volume_id import DEFAULT_VOLUME_KEY

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
    "check_standardisation_batch",
    "config_from_yaml",
    "dira_transforms",
    "init_from_checkpoint",
]

STAGES = ("dir", "dira")
VARIANTS = ("moco", "barlow", "simsiam")
NETWORKS = ("swin", "unet")
NUM_VIEWS = 2
DISCRIMINATOR = "discriminator"  # attribute, auxiliary-objective and state-dict prefix of the adversary
# Fewest rows a standardisation over the batch (BatchNorm in the barlow / simsiam projectors, Barlow
# Twins' per-feature standardisation) may run over. At 2 rows every standardised value is ±1 (Barlow's
# |C_ij| are all ≈ 1); chance correlations of unrelated features shrink like 1/sqrt(rows), about 0.25
# at 16. A floor against degenerate statistics, not a recommendation: the originals use 256 or more.
DEFAULT_MIN_STANDARDISE_BATCH = 16


@dataclass(frozen=True)
class DiraConfig:
    """Hyper-parameters of :class:`DiRA` (defaults: ``docs/methods.md``, section "DiRA-3D", at Swin ``base`` size).

    Attributes:
        stage: "dir" (discriminative + restorative warm-up, the default) or "dira" (adversary on; start
            it from a ``dir`` checkpoint with :func:`init_from_checkpoint`).
        variant: discriminative branch, "moco", "barlow" or "simsiam".
        network: encoder–decoder, "swin" (SwinUNETR layout) or "unet" (MONAI BasicUNet).
        backbone_size: Swin size, "tiny" / "small" / "base" (feature_size 12 / 24 / 48).
        unet_features: BasicUNet widths (network "unet").
        in_channels: input (and restored) channels.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        fused_attention: swap in the fused Swin window attention (network "swin"; same weights and results as MONAI's).
        proj_hidden_dim: hidden width of the projector's layers.
        moco_dim: MoCo embedding width (MoCo v2's 128).
        moco_queue_size: MoCo queue length K.
        moco_temperature: MoCo InfoNCE temperature.
        moco_momentum: momentum of the key encoder's update.
        barlow_dim: Barlow Twins embedding width.
        barlow_lambda: Barlow Twins off-diagonal weight.
        simsiam_dim: SimSiam embedding width.
        simsiam_pred_dim: SimSiam predictor bottleneck width.
        gather_distributed: under DDP, MoCo enqueues every rank's keys (and volume ids) and Barlow Twins
            correlates over the global batch (only when a process group is initialised).
        min_standardise_batch: fewest rows the ``barlow`` / ``simsiam`` standardisations may run over
            (see :func:`check_standardisation_batch`); ``moco`` has none.
        dis_weight: weight of the discriminative loss.
        res_weight: weight of the restoration MSE.
        adv_weight: weight of the generator's adversarial loss (stage "dira").
        disc_channels: width of the PatchGAN's first layer.
        disc_layers: stride-2 convolutions of the PatchGAN.
        disc_lr: the discriminator's Adam learning rate.
        disc_betas: the discriminator's Adam betas.
        disc_clip_grad: gradient-norm clip of the discriminator (None: off).
        disc_variant: the PatchGAN's kernel and initialisation, "pix2pix" (kernel 4, PyTorch's default
            init) or "official" (official DiRA's kernel 3 and N(0, 0.02) weights).
        distortion: the distortion mix of the views (passed to :func:`dira_transforms` through
            :meth:`view_kwargs`): "genesis" (the Models-Genesis chain) or "exclusive" (official DiRA's
            one-of in-painting 0.30, out-painting 0.05, local shuffling 0.30, none 0.35).
        view_keys: batch keys of the two undistorted views (the restoration targets).
        input_postfix: ``view_key + input_postfix`` is the distorted view fed to the network.
        volume_key: batch key of the source volumes' ids (B,) (written by :func:`dira_transforms`);
            the MoCo queue never uses keys of a query's own volume as negatives. None: no ids, every
            queued key is a negative (MoCo's own behaviour).
    """

    stage: str = "dir"
    variant: str = "moco"
    network: str = "swin"
    backbone_size: str = "base"
    unet_features: tuple[int, ...] = DEFAULT_UNET_FEATURES
    in_channels: int = 1
    use_checkpoint: bool = False
    fused_attention: bool = True
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
    min_standardise_batch: int = DEFAULT_MIN_STANDARDISE_BATCH
    dis_weight: float = 1.0
    res_weight: float = 10.0
    adv_weight: float = 0.001
    disc_channels: int = DEFAULT_BASE_CHANNELS
    disc_layers: int = DEFAULT_NUM_LAYERS
    disc_lr: float = 2e-4
    disc_betas: tuple[float, float] = (0.5, 0.999)
    disc_clip_grad: float | None = None
    disc_variant: str = "pix2pix"
    distortion: str = "genesis"
    view_keys: tuple[str, ...] = VIEW_KEYS
    input_postfix: str = DISTORTED_POSTFIX
    volume_key: str | None = DEFAULT_VOLUME_KEY

    def __post_init__(self) -> None:
        # YAML / JSON give lists: store tuples so the config stays hashable.
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        object.__setattr__(self, "unet_features", tuple(int(f) for f in self.unet_features))
        object.__setattr__(self, "disc_betas", tuple(float(b) for b in self.disc_betas))
        for name, allowed in (("stage", STAGES), ("variant", VARIANTS), ("network", NETWORKS),
                              ("disc_variant", tuple(PATCHGAN_VARIANTS)), ("distortion", tuple(DISTORTIONS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.view_keys) != NUM_VIEWS or len(set(self.view_keys)) != NUM_VIEWS:
            raise ValueError(f"view_keys must be {NUM_VIEWS} different keys, got {self.view_keys}")
        if not self.input_postfix:
            raise ValueError("input_postfix must be non-empty, otherwise the restoration target is overwritten")
        if self.volume_key is not None and (not self.volume_key or self.volume_key in self.view_keys):
            raise ValueError(f"volume_key must be None or a key other than the views', got {self.volume_key!r}")
        for name in ("in_channels", "proj_hidden_dim", "moco_dim", "moco_queue_size", "barlow_dim",
                     "simsiam_dim", "simsiam_pred_dim", "disc_channels", "disc_layers", "min_standardise_batch"):
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

    def view_kwargs(self) -> dict[str, Any]:
        """The fields :func:`dira_transforms` must agree on, as its keyword arguments (a bundle passes them)."""
        return {"view_keys": self.view_keys, "input_postfix": self.input_postfix, "distortion": self.distortion,
                "volume_key": self.volume_key}


def check_standardisation_batch(config: DiraConfig, batch_size: int, world_size: int = 1) -> None:
    """Refuse a batch too small for the standardisations of the ``barlow`` and ``simsiam`` variants.

    Two standardisations run over the batch, and each needs ``config.min_standardise_batch`` rows:

    - the BatchNorm layers of the ``barlow`` / ``simsiam`` projectors, over the 2 × ``batch_size``
      rows (both views) of one process: they are not synchronised across processes;
    - Barlow Twins' per-feature standardisation, over ``batch_size`` × ``world_size`` crop pairs
      (every rank's embeddings are gathered with ``gather_distributed``; ``world_size`` counts as 1
      without it).

    Gradient accumulation does not help: both are computed per micro-batch. ``moco`` passes always.

    Args:
        config: the method's hyper-parameters.
        batch_size: crop pairs per process and micro-batch.
        world_size: number of processes.

    Raises:
        ValueError: fewer rows than ``min_standardise_batch`` (the message names the setting to raise).
    """
    if config.variant == "moco":
        return
    least = config.min_standardise_batch
    world = world_size if config.gather_distributed else 1
    pairs = batch_size * world
    if config.variant == "barlow" and pairs < least:
        raise ValueError(
            f"dira variant 'barlow' standardises each feature over batch_size x world_size = {batch_size} x {world} "
            f"= {pairs} crop pairs, fewer than min_standardise_batch = {least}; raise the batch size or the "
            "number of processes (with gather_distributed on); gradient accumulation does not help"
        )
    rows = NUM_VIEWS * batch_size
    if rows < least:
        raise ValueError(
            f"dira variant {config.variant!r}: its projector's BatchNorm normalises over {NUM_VIEWS} x batch_size = "
            f"{NUM_VIEWS} x {batch_size} = {rows} rows of one process (not synchronised across processes), fewer "
            f"than min_standardise_batch = {least}; set the per-process batch_size to at least "
            f"{math.ceil(least / NUM_VIEWS)} (or use variant 'moco')"
        )


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> DiraConfig:
    """Read a preset of ``configs/methods/dira.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(DiraConfig, path, preset, **overrides)


def _backbone(cfg: DiraConfig, with_decoder: bool) -> Backbone:
    if cfg.network == "swin":
        return SwinBackbone(size=cfg.backbone_size, in_channels=cfg.in_channels, with_decoder=with_decoder,
                            use_checkpoint=cfg.use_checkpoint, fused_attention=cfg.fused_attention)
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
            x: distorted views (B, C, X, Y, Z), sides divisible by 32 (Swin) or 16 (U-Net).

        Returns:
            ``embedding`` (B, E) from the mean-pooled bottleneck, ``restoration`` (B, C, X, Y, Z) in
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
        """Keys (B, moco_dim) of ``x`` (B, C, X, Y, Z)."""
        return self.projector(self.backbone(x).tokens.mean(dim=1))


# ------------------------------------------------------------------------------------------ method
class DiRA(SSLMethod):
    """DiRA-3D (discriminative + restorative [+ adversarial]).

    The batch (from :func:`dira_transforms`) holds, for both view keys ``v``, the undistorted view
    ``v`` (B, C, X, Y, Z) (the restoration target) and its distorted copy ``v + "_distorted"`` (the
    input). Both views run through the student as one batch of 2B.

    Args:
        config: hyper-parameters; the defaults are ``docs/methods.md`` (section "DiRA-3D").
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
            PatchDiscriminator3D.from_variant(cfg.disc_variant, cfg.in_channels, cfg.disc_channels, cfg.disc_layers)
            if cfg.stage == "dira" else None
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

    def teacher_momentum(self, engine_momentum: float) -> float | None:
        """``moco_momentum`` for the key encoder (constant, whatever the engine's schedule); ``None`` without one."""
        return self.config.moco_momentum if self.teacher is not None else None

    def default_export_source(self) -> str:
        """The student: MoCo hands over its query encoder.

        The key encoder only trails it: at ``moco_momentum`` 0.999 it still holds 82 % of its start after 200 steps.
        """
        return "student"

    # ---------------------------------------------------------------- losses
    def _discriminative(self, inputs: Tensor, out: dict[str, Tensor], ids: Tensor | None, step: StepInfo) -> Tensor:
        z1, z2 = out["embedding"].chunk(NUM_VIEWS)
        variant = self.config.variant
        if variant == "barlow":
            return self.barlow_loss(z1, z2)
        if variant == "simsiam":
            p1, p2 = out["prediction"].chunk(NUM_VIEWS)
            cos = F.cosine_similarity
            return -0.5 * (cos(p1, z2.detach(), dim=1).mean() + cos(p2, z1.detach(), dim=1).mean())
        with torch.no_grad():
            if self.training and step.micro_batch == 0:  # once per optimizer step, before the keys
                self.momentum_update()
            k1, k2 = self.teacher(inputs).chunk(NUM_VIEWS)
        loss = 0.5 * (self.moco_loss(z1, k2, ids) + self.moco_loss(z2, k1, ids))
        if self.training:
            self.moco_loss.enqueue(torch.cat([k1, k2]), None if ids is None else torch.cat([ids, ids]))
        return loss

    def _volume_ids(self, batch: dict[str, Any], batch_size: int) -> Tensor | None:
        key = self.config.volume_key
        if key is None or self.config.variant != "moco":
            return None
        ids = torch.as_tensor(batch[key]).reshape(-1)
        if ids.shape[0] != batch_size:
            raise ValueError(f"batch[{key!r}] must hold one volume id per sample ({batch_size}), got {ids.shape[0]}")
        return ids

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute the weighted total.

        Args:
            batch: ``{v: (B, C, X, Y, Z), v + input_postfix: (B, C, X, Y, Z)}`` for both view keys ``v``,
                and (``moco`` with a ``volume_key``) ``{volume_key: (B,)}`` source-volume ids.
            step: ``micro_batch`` 0 moves the momentum encoder (once per optimizer step).

        Returns:
            ``{"loss", "parts": {"dis", "res"[, "adv"]}, "fake": restorations, "real": targets}``
            (parts unweighted and detached; ``fake`` / ``real`` (2B, C, X, Y, Z) detached, for the
            discriminator's step).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
            ValueError: a batch too small for the variant (:func:`check_standardisation_batch`).
        """
        cfg = self.config
        try:
            inputs = torch.cat([batch[f"{v}{cfg.input_postfix}"] for v in cfg.view_keys])
            targets = torch.cat([batch[v] for v in cfg.view_keys])
            ids = self._volume_ids(batch, inputs.shape[0] // NUM_VIEWS)
        except KeyError as e:
            raise KeyError(f"dira batch lacks {e}; it has {sorted(batch)}") from e
        distributed = dist.is_available() and dist.is_initialized()
        check_standardisation_batch(cfg, inputs.shape[0] // NUM_VIEWS, dist.get_world_size() if distributed else 1)
        out = self.run_student(inputs)
        restored = out["restoration"]
        dis = self._discriminative(inputs, out, ids, step)
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


def build_dira(
    *, batch_size: int | None = None, world_size: int = 1, preset: str = presets.BASE_PRESET, **cfg: Any
) -> DiRA:
    """Build :class:`DiRA` from a preset and :class:`DiraConfig` fields (a bundle's ``_target_``).

    Args:
        batch_size: the loader's per-process batch size; when given, it is checked against the variant
            at once (:func:`check_standardisation_batch`), not at the first step.
        world_size: number of processes the run will have (torchrun's ``WORLD_SIZE``).
        preset: a preset of ``configs/methods/dira.yaml``, e.g. ``"official"`` (``"base"``: the defaults).
        **cfg: :class:`DiraConfig` fields; they win over the preset.

    Raises:
        ValueError: an unknown preset or field, a bad value, or a batch too small for the variant.
    """
    config = presets.resolve_method_config(DiRA.name, preset, **cfg)
    presets.log_method_config(DiRA.name, preset, config)
    if batch_size is not None:
        check_standardisation_batch(config, batch_size, world_size)
    return DiRA(config)


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
