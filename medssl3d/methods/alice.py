"""Alice: anatomical invariance modelling and semantic alignment, in 3D (``docs/methods.md``, section "Alice").

Jiang et al., "Anatomical Invariance Modeling and Semantic Alignment for Self-supervised Learning in
3D Medical Image Analysis", ICCV 2023. Two *different* volumes are cropped around corresponding
points (Q and K, see :mod:`medssl3d.transforms.paired_crops`) and block-masked. The student, a full
SwinUNETR encoder-decoder, sees the masked crops; its EMA teacher sees the clean ones. Three losses:

- L1 (inter-volume, crossed): DINO cross-entropy between the teacher's global ``cls`` of one view and
  the student's of the other;
- L2 (intra-volume, CASA): the student's encoder tokens attend to its own decoder tokens (``S_v``) and,
  through CASA' under no gradient, to the teacher's tokens (``T_v``); DINO cross-entropy per token;
- L3: MSE reconstruction of the masked voxels (or of all voxels).

CASA variants: ``paper`` (default) - ``T_v`` attends to the teacher *encoder* tokens with an EMA copy of
CASA; ``code`` (the official code) - the same CASA weights and the teacher *decoder* tokens. Where CASA
sits (``casa_input``): ``tokens`` (default) - on the projected tokens, its output then goes through the
DINO head; ``logits`` (the official code) - on the head's prototype logits, its output used directly as
logits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import Compose, DeleteItemsd, EnsureTyped
from torch import Tensor, nn

from medssl3d.engine.schedules import linear_warmup
from medssl3d.losses.dino import DEFAULT_CENTER_MOMENTUM, DEFAULT_STUDENT_TEMP, DEFAULT_TEACHER_TEMP, DINOLoss
from medssl3d.methods import presets
from medssl3d.methods.base import SSLMethod, StepInfo, make_teacher
from medssl3d.networks.backbones import SwinBackbone
from medssl3d.networks.casa import CASA, DEFAULT_DIM, DEFAULT_DROPOUT, DEFAULT_FFN_DIM, DEFAULT_HEADS
from medssl3d.networks.heads import DINO_BOTTLENECK_DIM, DINO_HIDDEN_DIM, DINO_N_LAYERS, L2_EPS, DINOHead
from medssl3d.transforms.correspondence import DEFAULT_CROP, DEFAULT_FOREGROUND_THRESHOLD, CorrespondenceProvider
from medssl3d.transforms.masking import DEFAULT_BLOCK_SIZE, DEFAULT_COLUMN_AXIS, DEFAULT_MASK_RATIO, RandBlockMaskd
from medssl3d.transforms.paired_crops import (
    DEFAULT_MAX_TRIES,
    DEFAULT_THRESHOLD,
    PAIR_VIEW_KEYS,
    PARTNER_POSTFIX,
    PROVIDER_NAMES,
    STATS_PREFIX,
    RandCorrespondingCropsd,
)

__all__ = [
    "CASA_INPUTS",
    "CASA_VARIANTS",
    "Alice",
    "AliceConfig",
    "AliceStudent",
    "alice_transforms",
    "build_alice",
    "config_from_yaml",
    "prototype_logits",
]

CASA_VARIANTS = ("paper", "code")
CASA_INPUTS = ("tokens", "logits")
NUM_VIEWS = 2
OUT_DIM = 512
"""Prototypes K of the cls and patch last layers."""
TEACHER_TEMP_FINAL = 0.07
TEACHER_TEMP_WARMUP_EPOCHS = 30
MASKED_POSTFIX = "_masked"
MASK_POSTFIX = "_mask"
VIEW_FIELDS = (
    "roi_size",
    "correspondence",
    "match_threshold",
    "max_tries",
    "foreground_threshold",
    "mask_ratio",
    "mask_block_size",
    "mask_mode",
    "mask_column_axis",
    "view_keys",
    "masked_postfix",
    "mask_postfix",
)
"""AliceConfig fields that configure the views (:func:`alice_transforms`), not the network."""


@dataclass(frozen=True)
class AliceConfig:
    """Every number of ``docs/methods.md``, section "Alice" (defaults: the paper's, Swin ``base``, 96³ crops).

    Attributes:
        backbone_size: SwinBackbone size, "tiny" / "small" / "base".
        in_channels: input (and reconstructed) channels.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        fused_attention: swap in the fused Swin window attention (same weights and results as MONAI's).
        proj_dim: common width of the projected encoder and decoder tokens (= CASA width).
        head_hidden_dim: hidden width of the shared DINO MLP.
        head_bottleneck_dim: bottleneck width before the prototypes.
        head_layers: linear layers of the MLP.
        out_dim: prototypes K (cls and patch last layers).
        casa_variant: "paper" (teacher encoder tokens, EMA CASA') or "code" (teacher decoder tokens, shared CASA).
        casa_input: "tokens" (CASA on the projected tokens, width ``proj_dim``, output through the DINO head)
            or "logits" (the official code: CASA on the head's patch logits, width ``out_dim``, output used
            directly as logits).
        casa_heads: attention heads of CASA.
        casa_ffn_dim: CASA feed-forward width.
        casa_dropout: CASA dropout.
        inter_weight: λ1, weight of the crossed cls loss L1.
        intra_weight: λ2, weight of the CASA token loss L2.
        recon_weight: λ3, weight of the reconstruction loss L3 (the original code: 10).
        recon_masked_only: L3 over masked voxels only (False: all voxels).
        student_temp: τs.
        teacher_temp: τt at the start of the warm-up.
        teacher_temp_final: τt after the warm-up.
        teacher_temp_warmup_epochs: epochs of the linear τt warm-up.
        center_momentum: momentum of the teacher centres.
        roi_size: crop side in voxels along the array axes (after RAS: left→right, posterior→anterior,
            inferior→superior).
        correspondence: provider name: "same_volume", "body_box", "registration" or "feature".
        match_threshold: a pair is accepted at this score.
        max_tries: points drawn before the best pair is used.
        foreground_threshold: scaled intensity above which a point may be drawn (CT: HU > -125).
        mask_ratio: fraction of masked blocks.
        mask_block_size: block side in voxels.
        mask_mode: "block" (3D blocks) or "column" (whole columns, the original code).
        mask_column_axis: array axis of the columns (2: inferior→superior after RAS, as the official z columns).
        view_keys: batch keys of the Q and K crops.
        masked_postfix: suffix of the masked crops (student inputs).
        mask_postfix: suffix of the voxel masks.
    """

    backbone_size: str = "base"
    in_channels: int = 1
    use_checkpoint: bool = False
    fused_attention: bool = True
    proj_dim: int = DEFAULT_DIM
    head_hidden_dim: int = DINO_HIDDEN_DIM
    head_bottleneck_dim: int = DINO_BOTTLENECK_DIM
    head_layers: int = DINO_N_LAYERS
    out_dim: int = OUT_DIM
    casa_variant: str = "paper"
    casa_input: str = "tokens"
    casa_heads: int = DEFAULT_HEADS
    casa_ffn_dim: int = DEFAULT_FFN_DIM
    casa_dropout: float = DEFAULT_DROPOUT
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    recon_weight: float = 1.0
    recon_masked_only: bool = True
    student_temp: float = DEFAULT_STUDENT_TEMP
    teacher_temp: float = DEFAULT_TEACHER_TEMP
    teacher_temp_final: float = TEACHER_TEMP_FINAL
    teacher_temp_warmup_epochs: int = TEACHER_TEMP_WARMUP_EPOCHS
    center_momentum: float = DEFAULT_CENTER_MOMENTUM
    roi_size: tuple[int, int, int] = DEFAULT_CROP
    correspondence: str = "registration"
    match_threshold: float = DEFAULT_THRESHOLD
    max_tries: int = DEFAULT_MAX_TRIES
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD
    mask_ratio: float = DEFAULT_MASK_RATIO
    mask_block_size: int = DEFAULT_BLOCK_SIZE
    mask_mode: str = "block"
    mask_column_axis: int = DEFAULT_COLUMN_AXIS
    view_keys: tuple[str, str] = PAIR_VIEW_KEYS
    masked_postfix: str = MASKED_POSTFIX
    mask_postfix: str = MASK_POSTFIX

    def __post_init__(self) -> None:
        # YAML / JSON give lists: store tuples so the config stays hashable.
        object.__setattr__(self, "roi_size", tuple(int(s) for s in self.roi_size))
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        if self.casa_variant not in CASA_VARIANTS:
            raise ValueError(f"casa_variant must be one of {CASA_VARIANTS}, got {self.casa_variant!r}")
        if self.casa_input not in CASA_INPUTS:
            raise ValueError(f"casa_input must be one of {CASA_INPUTS}, got {self.casa_input!r}")
        for name in ("use_checkpoint", "fused_attention", "recon_masked_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.correspondence not in PROVIDER_NAMES:
            raise ValueError(f"correspondence must be one of {PROVIDER_NAMES}, got {self.correspondence!r}")
        if len(self.view_keys) != NUM_VIEWS or len(set(self.view_keys)) != NUM_VIEWS:
            raise ValueError(f"view_keys must be {NUM_VIEWS} different keys, got {self.view_keys}")
        for name in ("in_channels", "proj_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                     "out_dim", "casa_heads", "casa_ffn_dim", "max_tries", "mask_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inter_weight", "intra_weight", "recon_weight", "teacher_temp_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("student_temp", "teacher_temp", "teacher_temp_final"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("match_threshold", "mask_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive sizes, got {self.roi_size}")

    def view_kwargs(self) -> dict[str, Any]:
        """The view fields as :func:`alice_transforms` keyword arguments (``correspondence`` excluded)."""
        values = asdict(self)
        return {name: values[name] for name in VIEW_FIELDS if name != "correspondence"}


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> AliceConfig:
    """Read a preset of ``configs/methods/alice.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(AliceConfig, path, preset, **overrides)


def _tokens(fmap: Tensor) -> Tensor:
    return fmap.flatten(2).transpose(1, 2)


def prototype_logits(mlp: nn.Module, prototypes: Tensor, x: Tensor) -> Tensor:
    """DINO head scores ``normalize(mlp(x)) · normalize(prototypes)ᵀ``: ``(..., C) -> (..., K)``.

    The MLP runs in the ambient (autocast) precision; the L2 normalisations and the cosines to the
    prototypes run in float32 with autocast off. In bf16 a cosine has a resolution of about 0.004,
    half a logit at the official teacher temperature 0.008.

    Args:
        mlp: the head's MLP ``C -> bottleneck``.
        prototypes: the last layer's weight ``(K, bottleneck)`` (rows normalised here).
        x: features ``(..., C)``.
    """
    z = mlp(x)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1, eps=L2_EPS)
        return F.linear(z, F.normalize(prototypes.float(), dim=1))


class AliceStudent(nn.Module):
    """SwinUNETR encoder-decoder with reconstruction, token projections, DINO head and CASA.

    Args:
        config: the method's hyper-parameters.
    """

    def __init__(self, config: AliceConfig) -> None:
        super().__init__()
        self.casa_on_logits = config.casa_input == "logits"
        self.backbone = SwinBackbone(
            size=config.backbone_size, in_channels=config.in_channels, with_decoder=True,
            use_checkpoint=config.use_checkpoint, fused_attention=config.fused_attention,
        )
        f = self.backbone.feature_size
        self.recon = nn.Conv3d(f, config.in_channels, kernel_size=1)
        self.enc_proj = nn.Linear(self.backbone.embed_dim, config.proj_dim)
        # the first decoder stage (decoder5) has 8 f channels
        self.dec_proj = nn.Linear(self.backbone.feature_channels[3], config.proj_dim)
        self.head = DINOHead(
            config.proj_dim, out_dim=config.out_dim, hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim, n_layers=config.head_layers,
        )
        self.patch_last_layer = nn.Linear(config.head_bottleneck_dim, config.out_dim, bias=False)
        casa_dim = config.out_dim if self.casa_on_logits else config.proj_dim
        self.casa = CASA(casa_dim, config.casa_heads, config.casa_ffn_dim, config.casa_dropout)

    def cls_logits(self, features: Tensor) -> Tensor:
        """The shared MLP, then the cls prototypes: ``(B, C) -> (B, K)``."""
        return prototype_logits(self.head.mlp, self.head.last_layer.weight, features)

    def patch_logits(self, tokens: Tensor) -> Tensor:
        """The shared MLP, then the patch prototypes: ``(B, N, C) -> (B, N, K)``."""
        return prototype_logits(self.head.mlp, self.patch_last_layer.weight, tokens)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the student on masked crops.

        Args:
            x: ``(B, C, D, H, W)``, sides divisible by 32.

        Returns:
            ``cls`` logits ``(B, K)``; ``patch``: the logits of ``S = CASA(enc, dec)`` ``(B, N, K)`` (N bottleneck
            tokens); ``query``: CASA's query, shared with CASA' (the projected encoder tokens ``(B, N, proj_dim)``,
            or their patch logits ``(B, N, K)`` when CASA runs on logits); ``recon`` ``(B, C, D, H, W)``.
        """
        out = self.backbone(x)
        stages = self.backbone.decode_stages(x, out)
        first, last = stages[0], stages[-1]
        enc = self.enc_proj(out.tokens)
        dec = self.dec_proj(_tokens(first))
        if self.casa_on_logits:
            query = self.patch_logits(enc)
            patch = self.casa(query, self.patch_logits(dec))
        else:
            query, patch = enc, self.patch_logits(self.casa(enc, dec))
        return {"cls": self.cls_logits(enc.mean(dim=1)), "patch": patch, "query": query, "recon": self.recon(last)}


class Alice(SSLMethod):
    """Alice pretraining (crossed cls distillation + CASA token distillation + masked reconstruction).

    The batch (from :func:`alice_transforms`) holds, for both view keys ``v`` (Q and K): the clean crop
    ``v`` (B, C, D, H, W) (teacher input and reconstruction target), the masked crop ``v + "_masked"``
    (student input) and the voxel mask ``v + "_mask"``; optionally the pair statistics
    ``pair_score`` / ``pair_accepted`` (B,), logged as parts.

    Args:
        config: hyper-parameters; the defaults are the paper's.
        provider: the correspondence provider of the views; a provider with ``update_teacher``
            (the feature provider) receives the teacher encoder on every training step.
    """

    name = "alice"

    def __init__(self, config: AliceConfig | None = None, provider: CorrespondenceProvider | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AliceConfig()
        self.backbone_name = f"swin-{self.config.backbone_size}"
        self.provider = provider
        self.student = AliceStudent(self.config)
        s = self.student
        parts = {"backbone": s.backbone, "enc_proj": s.enc_proj, "dec_proj": s.dec_proj, "head": s.head}
        if self.config.casa_variant == "paper":
            parts["casa"] = s.casa
        self.teacher = make_teacher(nn.ModuleDict(parts))
        self.cls_loss = DINOLoss(self.config.out_dim, self.config.student_temp, self.config.center_momentum)
        self.patch_loss = DINOLoss(
            self.config.out_dim, self.config.student_temp, self.config.center_momentum, cross_views=False
        )

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Backbone (with decoder), projections, head and, in the paper variant, CASA -> CASA'."""
        return [(getattr(self.student, name), module) for name, module in self.teacher.items()]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The cls and patch prototypes (frozen during the engine's last-layer freeze, one epoch in the bundle)."""
        return [self.student.head.last_layer.weight, self.student.patch_last_layer.weight]

    def teacher_temperature(self, step: StepInfo) -> float:
        """τt: linear from ``teacher_temp`` to ``teacher_temp_final`` over the warm-up epochs."""
        cfg = self.config
        return linear_warmup(step.epoch, cfg.teacher_temp_warmup_epochs, cfg.teacher_temp, cfg.teacher_temp_final)

    @torch.no_grad()
    def _teacher(self, x: Tensor, query: Tensor) -> dict[str, Tensor]:
        """Teacher ``cls`` logits ``(B, K)`` and ``T = CASA'(query, teacher context)`` logits ``(B, N, K)``.

        The teacher head has one last layer (its cls prototypes) for both, as the official code's
        ``shared_head_teacher``.
        """
        t = self.teacher
        out = t["backbone"](x)
        enc = t["enc_proj"](out.tokens)
        if self.config.casa_variant == "paper":
            context, casa = enc, t["casa"]
        else:
            (first,) = t["backbone"].decode_stages(x, out, num_stages=1)
            context, casa = t["dec_proj"](_tokens(first)), self.student.casa
        head = t["head"]
        if self.student.casa_on_logits:
            patch = casa(query, prototype_logits(head.mlp, head.last_layer.weight, context))
        else:
            patch = prototype_logits(head.mlp, head.last_layer.weight, casa(query, context))
        return {"cls": prototype_logits(head.mlp, head.last_layer.weight, enc.mean(dim=1)), "patch": patch}

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute ``λ1·L1 + λ2·L2 + λ3·L3``.

        Args:
            batch: clean crops, masked crops and masks of both view keys (see the class docstring).
            step: where training stands (τt schedule; the feature provider's warm-up; the teacher centres
                and the provider's teacher snapshot move on the first micro-batch of a step only).

        Returns:
            ``{"loss", "parts": {"inter", "intra", "recon", "teacher_temp"[, "pair_accept", "pair_score"]}}``
            (parts detached, unweighted).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
        """
        cfg = self.config
        first_micro_batch = step.micro_batch == 0
        if self.training and first_micro_batch and hasattr(self.provider, "update_teacher"):
            self.provider.update_teacher(self.teacher["backbone"], step.step)
        try:
            clean = torch.cat([batch[v] for v in cfg.view_keys])
            masked = torch.cat([batch[f"{v}{cfg.masked_postfix}"] for v in cfg.view_keys])
            mask = torch.cat([batch[f"{v}{cfg.mask_postfix}"] for v in cfg.view_keys])
        except KeyError as e:
            raise KeyError(f"alice batch lacks {e}; it has {sorted(batch)}") from e
        s = self.run_student(masked)
        t = self._teacher(clean, s["query"].detach())
        tau = self.teacher_temperature(step)
        # the centres move once per optimizer step (on its first micro-batch), as without accumulation
        inter = self.cls_loss(list(s["cls"].chunk(NUM_VIEWS)), list(t["cls"].chunk(NUM_VIEWS)), tau, first_micro_batch)
        intra = self.patch_loss(s["patch"], t["patch"], tau, first_micro_batch)
        err = (s["recon"] - clean).pow(2)
        if cfg.recon_masked_only:
            weight = mask.to(err.dtype).expand_as(err)
            recon = (err * weight).sum() / weight.sum().clamp_min(1.0)
        else:
            recon = err.mean()
        loss = cfg.inter_weight * inter + cfg.intra_weight * intra + cfg.recon_weight * recon
        parts = {
            "inter": inter.detach(),
            "intra": intra.detach(),
            "recon": recon.detach(),
            "teacher_temp": torch.tensor(tau, device=loss.device),
        }
        for name, key in (("pair_accept", "accepted"), ("pair_score", "score")):
            if f"{STATS_PREFIX}{key}" in batch:
                parts[name] = torch.as_tensor(batch[f"{STATS_PREFIX}{key}"]).detach().float().mean()
        return {"loss": loss, "parts": parts}


def build_alice(
    provider: CorrespondenceProvider | None = None, *, preset: str = presets.BASE_PRESET, **cfg: Any
) -> Alice:
    """Build :class:`Alice` from a preset and :class:`AliceConfig` fields (a bundle's ``_target_``).

    Args:
        provider: the views' correspondence provider (the feature provider needs the method's teacher).
        preset: a preset of ``configs/methods/alice.yaml``, e.g. ``"original"`` (``"base"``: the defaults).
        **cfg: AliceConfig fields; they win over the preset.

    Raises:
        ValueError: an unknown preset or field, or a bad value.
    """
    config = presets.resolve_method_config(Alice.name, preset, **cfg)
    presets.log_method_config(Alice.name, preset, config)
    return Alice(config, provider=provider)


def alice_transforms(
    provider: CorrespondenceProvider,
    *,
    roi_size: Sequence[int] = DEFAULT_CROP,
    match_threshold: float = DEFAULT_THRESHOLD,
    max_tries: int = DEFAULT_MAX_TRIES,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
    mask_ratio: float = DEFAULT_MASK_RATIO,
    mask_block_size: int = DEFAULT_BLOCK_SIZE,
    mask_mode: str = "block",
    mask_column_axis: int = DEFAULT_COLUMN_AXIS,
    view_keys: Sequence[str] = PAIR_VIEW_KEYS,
    masked_postfix: str = MASKED_POSTFIX,
    mask_postfix: str = MASK_POSTFIX,
    source_key: str = "image",
    keep_points: bool = False,
) -> Compose:
    """View generation of :class:`Alice`, from preprocessed Q (and K) volumes to a training sample.

    Spacing and windowing are the data preset's (one spacing for every volume); this adds the
    corresponding crops (:class:`~medssl3d.transforms.paired_crops.RandCorrespondingCropsd`) and the
    block masks (:class:`~medssl3d.transforms.masking.RandBlockMaskd`), then drops the volumes so that
    samples of different sizes collate.

    Args:
        provider: the correspondence provider (see :func:`~medssl3d.transforms.paired_crops.build_provider`).
        roi_size: crop side (D, H, W), divisible by 32.
        match_threshold: accept a pair at this score.
        max_tries: points drawn before the best pair is used.
        foreground_threshold: scaled intensity above which a query point may be drawn.
        mask_ratio: fraction of masked blocks.
        mask_block_size: block side.
        mask_mode: "block" or "column".
        mask_column_axis: column axis.
        view_keys: Q and K crop keys.
        masked_postfix: suffix of the masked crops.
        mask_postfix: suffix of the masks.
        source_key: key of the query volume ``(1, D, H, W)``; the key volume is ``source_key + "_k"``.
        keep_points: keep the matched points (``pair_point_q`` / ``pair_point_k``).

    Returns:
        A ``Compose`` giving, for each view key ``v``: ``v`` (1, *roi), ``v + masked_postfix`` (1, *roi),
        ``v + mask_postfix`` (1, *roi); and ``pair_score``, ``pair_accepted``, ``pair_tries``.
    """
    views = list(view_keys)
    partner = f"{source_key}{PARTNER_POSTFIX}"
    return Compose(
        [
            RandCorrespondingCropsd(
                provider, roi_size, query_key=source_key, key_key=partner, view_keys=views,
                threshold=match_threshold, max_tries=max_tries, foreground_threshold=foreground_threshold,
                keep_points=keep_points,
            ),
            RandBlockMaskd(
                views, output_postfix=masked_postfix, mask_postfix=mask_postfix, ratio=mask_ratio,
                block_size=mask_block_size, mode=mask_mode, column_axis=mask_column_axis,
            ),
            DeleteItemsd(keys=[source_key, partner]),
            EnsureTyped(keys=views + [f"{v}{masked_postfix}" for v in views], track_meta=False),
        ]
    )
