"""The reference recipe: Swin UNETR self-supervised pretraining as its authors built it, unoptimised.

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis",
CVPR 2022 (``SSLHead`` with ``upsample="vae"`` and its training loop), rebuilt from MONAI's
``SwinTransformer`` and plain torch layers and deliberately left as written: the two views run
through the network in two separate calls, window attention is MONAI's, every step ends with
a host synchronisation for the loss value. ``bench step`` times every method against this recipe
in the same process (benchmarks.md §1), so that a speed-up of the toolkit is a measured ratio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from medssl3d.losses.ntxent import DEFAULT_TEMPERATURE, NTXentLoss

__all__ = [
    "CONTRAST_DIM",
    "REFERENCE_LR",
    "REFERENCE_WEIGHT_DECAY",
    "ReferenceLoss",
    "ReferenceRecipe",
    "ReferenceSSLHead",
    "build_reference",
    "check_reference_roi",
    "reference_optimizer",
    "reference_step",
    "synthetic_views",
]

# The published architecture (SSLHead / SwinViT of the authors' code).
PATCH_SIZE = 2
WINDOW_SIZE = 7
DEPTHS = (2, 2, 2, 2)
NUM_HEADS = (3, 6, 12, 24)
BOTTLENECK_STRIDE = 32  # patch 2 and four patch-merging halvings
BOTTLENECK_WIDTH = 16  # bottleneck channels in units of feature_size
ROTATION_CLASSES = 4
CONTRAST_DIM = 512
ROTATION_TOKEN = 0
CONTRAST_TOKEN = 1
DECODER_STAGES = 5
UPSAMPLE_FACTOR = 2
# The authors' optimiser defaults (``--lr 4e-4 --decay 0.1``, AdamW).
REFERENCE_LR = 4e-4
REFERENCE_WEIGHT_DECAY = 0.1
VIEW_KEYS = ("view1", "view2")
CUTOUT_POSTFIX = "_cutout"  # same batch keys as medssl3d.methods.swin_ssl, so one batch feeds both
ROTATION_POSTFIX = "_rot"
ROTATION_AXES = (1, 2)  # spatial axes (A, S): the sagittal plane, as medssl3d.transforms.rotation and rot_rand
# Synthetic volumes: smooth noise upsampled from a coarse grid, plus a few cut-out boxes.
SYNTHETIC_COARSE = 4
SYNTHETIC_BOXES = 4
SYNTHETIC_MAX_BOX = 0.25  # box side as a fraction of the axis length


def check_reference_roi(roi: Sequence[int]) -> tuple[int, int, int]:
    """The crop size as a tuple, checked against what the recipe can take.

    Raises:
        ValueError: not three sides, a side not divisible by 32, or fewer than two bottleneck tokens
            (the heads read tokens 0 and 1).
    """
    roi = tuple(int(s) for s in roi)
    if len(roi) != 3 or any(s < BOTTLENECK_STRIDE or s % BOTTLENECK_STRIDE for s in roi):
        raise ValueError(f"roi must be three sides divisible by {BOTTLENECK_STRIDE}, got {roi}")
    tokens = 1
    for s in roi:
        tokens *= s // BOTTLENECK_STRIDE
    if tokens <= CONTRAST_TOKEN:
        raise ValueError(f"roi {roi} gives {tokens} bottleneck token(s); the heads need at least 2 (e.g. 64x32x32)")
    return roi


class ReferenceSSLHead(nn.Module):
    """The authors' ``SSLHead``: SwinViT, linear rotation and contrastive heads, convolutional decoder.

    Args:
        feature_size: SwinViT embedding width ``f`` (12 tiny, 48 base); the bottleneck has ``16 f``.
        in_channels: image channels (input and reconstruction).
    """

    def __init__(self, feature_size: int, in_channels: int = 1) -> None:
        super().__init__()
        if feature_size < 1 or feature_size % NUM_HEADS[0]:
            raise ValueError(f"feature_size must be a positive multiple of {NUM_HEADS[0]}, got {feature_size}")
        dim = BOTTLENECK_WIDTH * feature_size
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(WINDOW_SIZE,) * 3,
            patch_size=(PATCH_SIZE,) * 3,
            depths=DEPTHS,
            num_heads=NUM_HEADS,
            spatial_dims=3,
        )
        self.rotation_head = nn.Linear(dim, ROTATION_CLASSES)
        self.contrastive_head = nn.Linear(dim, CONTRAST_DIM)
        layers: list[nn.Module] = []
        channels = dim
        for stage in range(DECODER_STAGES):
            width = max(dim // UPSAMPLE_FACTOR ** (stage + 1), feature_size)  # 8f, 4f, 2f, f, f
            layers += [
                nn.Conv3d(channels, width, kernel_size=3, stride=1, padding=1),
                nn.InstanceNorm3d(width),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=UPSAMPLE_FACTOR, mode="trilinear", align_corners=False),
            ]
            channels = width
        layers.append(nn.Conv3d(channels, in_channels, kernel_size=1, stride=1))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the network on one view.

        Args:
            x: a cut-out view (B, C, D, H, W), sides divisible by 32.

        Returns:
            Rotation logits (B, 4), contrastive embedding (B, 512), reconstruction (B, C, D, H, W).
        """
        bottleneck = self.swinViT(x.contiguous())[-1]  # (B, 16f, D/32, H/32, W/32)
        tokens = bottleneck.flatten(2).transpose(1, 2)  # (B, N, 16f), raster order
        return (
            self.rotation_head(tokens[:, ROTATION_TOKEN]),
            self.contrastive_head(tokens[:, CONTRAST_TOKEN]),
            self.conv(bottleneck),
        )


class ReferenceLoss(nn.Module):
    """Cross-entropy (rotation) + NT-Xent (τ = 0.5) + L1 restoration, weights 1 : 1 : 1."""

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.rotation = nn.CrossEntropyLoss()
        self.contrast = NTXentLoss(temperature)
        self.recon = nn.L1Loss()

    def forward(
        self,
        rot_logits: Tensor,
        rot_labels: Tensor,
        emb1: Tensor,
        emb2: Tensor,
        recon: Tensor,
        target: Tensor,
    ) -> Tensor:
        """The summed loss.

        Args:
            rot_logits: both views' rotation logits (2B, 4).
            rot_labels: their classes (2B,) long.
            emb1: first views' embeddings (B, 512).
            emb2: second views' embeddings (B, 512).
            recon: both views' reconstructions (2B, C, D, H, W).
            target: both clean rotated views (2B, C, D, H, W).
        """
        return self.rotation(rot_logits, rot_labels) + self.contrast(emb1, emb2) + self.recon(recon, target)


def build_reference(feature_size: int, roi: Sequence[int], in_channels: int = 1) -> ReferenceSSLHead:
    """The reference network for crops of size ``roi``.

    Args:
        feature_size: SwinViT width ``f``.
        roi: crop size (D, H, W) it will be trained on (checked: sides divisible by 32, ≥ 2 tokens).
        in_channels: image channels.

    Raises:
        ValueError: a bad ``feature_size`` or ``roi``.
    """
    check_reference_roi(roi)
    return ReferenceSSLHead(feature_size, in_channels)


def reference_optimizer(
    model: nn.Module, lr: float = REFERENCE_LR, weight_decay: float = REFERENCE_WEIGHT_DECAY
) -> torch.optim.AdamW:
    """AdamW over every parameter, one group, as the authors' loop."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reference_step(
    model: ReferenceSSLHead,
    optimizer: torch.optim.Optimizer,
    views: dict[str, Any],
    *,
    loss_fn: ReferenceLoss | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One training step of the authors' loop: two forward calls, one backward, AdamW, loss to host.

    Args:
        model: from :func:`build_reference`, on the device of ``views``.
        optimizer: from :func:`reference_optimizer`.
        views: ``{v: clean rotated view (B, 1, D, H, W), v + "_cutout": network input (B, 1, D, H, W),
            v + "_rot": rotation class (B,)}`` for ``v`` in ``("view1", "view2")``
            (:func:`synthetic_views`, or a collated :func:`~medssl3d.methods.swin_ssl.swin_ssl_transforms` batch).
        loss_fn: the loss (default: a new :class:`ReferenceLoss`).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` for mixed precision; None for fp32.

    Returns:
        The step's loss.
    """
    loss_fn = ReferenceLoss() if loss_fn is None else loss_fn
    v1, v2 = VIEW_KEYS
    device = views[v1].device
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, autocast_dtype):
        rot1, emb1, rec1 = model(views[v1 + CUTOUT_POSTFIX])
        rot2, emb2, rec2 = model(views[v2 + CUTOUT_POSTFIX])
        labels = torch.cat([torch.as_tensor(views[v + ROTATION_POSTFIX]).reshape(-1) for v in VIEW_KEYS])
        loss = loss_fn(
            torch.cat([rot1, rot2]),
            labels.to(device=device, dtype=torch.long),
            emb1,
            emb2,
            torch.cat([rec1, rec2]),
            torch.cat([views[v1], views[v2]]),
        )
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class ReferenceRecipe:
    """Network, optimiser and loss of the reference recipe, stepped with :meth:`step`.

    Args:
        feature_size: SwinViT width ``f``.
        roi: crop size (D, H, W).
        device: where to train.
        autocast_dtype: mixed-precision dtype, or None for fp32.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        feature_size: int,
        roi: Sequence[int],
        *,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        lr: float = REFERENCE_LR,
        weight_decay: float = REFERENCE_WEIGHT_DECAY,
    ) -> None:
        self.device = torch.device(device)
        self.model = build_reference(feature_size, roi).to(self.device).train()
        self.optimizer = reference_optimizer(self.model, lr, weight_decay)
        self.loss_fn = ReferenceLoss()
        self.autocast_dtype = autocast_dtype

    def step(self, views: dict[str, Any]) -> float:
        """One training step on ``views`` (its view entries moved to the recipe's device); returns the loss."""
        keys = [f"{v}{postfix}" for v in VIEW_KEYS for postfix in ("", CUTOUT_POSTFIX, ROTATION_POSTFIX)]
        views = {k: torch.as_tensor(views[k]).to(self.device) for k in keys}
        return reference_step(
            self.model, self.optimizer, views, loss_fn=self.loss_fn, autocast_dtype=self.autocast_dtype
        )


def synthetic_views(
    roi: Sequence[int],
    batch_size: int = 1,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """A batch of two rotated, cut-out views of smooth random volumes, without any data on disk.

    Each sample's volume is trilinearly upsampled coarse noise in [0, 1]; each view is that volume
    rotated by its own random multiple of 90° in the sagittal (A–S) plane (the class) and, for the network
    input, a few random boxes filled with uniform noise.

    Args:
        roi: view size (D, H, W); H and W must be equal (the rotation plane).
        batch_size: samples B.
        seed: seed of a private generator (the global RNG is untouched).
        device: device of the returned tensors.

    Returns:
        ``{v: (B, 1, *roi), v + "_cutout": (B, 1, *roi), v + "_rot": (B,) long}`` for ``v`` in
        ``("view1", "view2")``.

    Raises:
        ValueError: ``batch_size < 1`` or a non-square rotation plane.
    """
    roi = tuple(int(s) for s in roi)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(roi) != 3 or roi[ROTATION_AXES[0]] != roi[ROTATION_AXES[1]]:
        raise ValueError(f"roi must be (D, H, W) with H == W (the rotation plane), got {roi}")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 1, *(SYNTHETIC_COARSE,) * 3, generator=g)
    volume = F.interpolate(coarse, size=roi, mode="trilinear", align_corners=False)
    out: dict[str, Tensor] = {}
    plane = tuple(a + 1 for a in ROTATION_AXES)  # spatial axes → axes of a (C, D, H, W) sample
    for v in VIEW_KEYS:
        classes = torch.randint(ROTATION_CLASSES, (batch_size,), generator=g)
        clean = torch.stack([torch.rot90(volume[b], int(k), dims=plane) for b, k in enumerate(classes)])
        cut = clean.clone()
        for b in range(batch_size):
            for _ in range(SYNTHETIC_BOXES):
                sides = [max(1, int(s * SYNTHETIC_MAX_BOX * float(torch.rand((), generator=g)))) for s in roi]
                start = [int(torch.randint(s - w + 1, (), generator=g)) for s, w in zip(roi, sides, strict=True)]
                box = tuple(slice(a, a + w) for a, w in zip(start, sides, strict=True))
                cut[(b, slice(None), *box)] = torch.rand(1, *sides, generator=g)
        out[v] = clean.to(device)
        out[v + CUTOUT_POSTFIX] = cut.to(device)
        out[v + ROTATION_POSTFIX] = classes.to(device)
    return out
