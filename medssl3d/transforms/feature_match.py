"""Feature correspondence provider: match points with the EMA teacher's dense features after a warm-up.

``docs/methods.md`` (section "Alice"), view step 3, ``feature``: the original matches points with
a separately pretrained anatomical-embedding network; this toolkit has no external weights, so it
uses its own EMA teacher once the teacher has trained for ``warmup_steps``. Before that (and whenever no
teacher snapshot is present) a fallback provider answers (``body_box`` by default).

How the transform gets the teacher. The provider object is shared by the view transform and
the method: the method calls :meth:`FeatureProvider.update_teacher` on every training step, and
the provider keeps a CPU snapshot of the teacher encoder, refreshed every ``refresh_every``
steps once the warm-up is over. With ``num_workers=0`` the snapshot is used at the next
sample. With ``num_workers > 0`` each worker holds the copy of the provider it received when
the loader's workers started: the engine creates a new loader iterator every epoch and,
without ``persistent_workers``, new workers with it, so **workers see the snapshot of the start
of the epoch** (the matching lags by at most one epoch, and starts one epoch after the warm-up).
Do not set ``persistent_workers=True`` with this provider, or the workers keep the fallback
forever. The snapshot runs on the CPU in the workers (CUDA cannot be used in forked workers).

Matching. Each volume is encoded once per pair (the retry loop reuses it): at the training
spacing when ``max_side`` is None, else resized so that its longest side is at most ``max_side``
voxels (cheaper; a coarser grid than the crops the teacher trains on). It is zero-padded to a
multiple of the encoder's stride. At two scales (encoder stages, strides 8 and 16 by default)
each volume's feature map is **centred**: the mean feature of the volume's foreground cells (cells
at least half above ``foreground_threshold``) is subtracted before the L2 normalisation. Raw
transformer features share a large common component (their cosine is above 0.9 between almost
any two cells), which makes a plain cosine score near 1 everywhere; after centring, the cosine
measures what distinguishes a cell from the rest of its volume. The descriptor of ``p`` in Q is
compared with every cell of K; the coarser similarity map is repeated onto the finer grid (each fine
cell takes the coarse cell that contains it), the two are averaged and the best cell inside K gives
``p'``; the score is that average similarity, clipped to ``[0, 1]``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl3d.transforms.correspondence import (
    DEFAULT_FOREGROUND_THRESHOLD,
    BodyBoxProvider,
    CorrespondenceProvider,
    Volume,
)

logger = logging.getLogger(__name__)

__all__ = ["FeatureProvider", "centred_features"]

DEFAULT_WARMUP_STEPS = 1000
"""Optimizer steps before the teacher's features are trusted (before: the fallback provider)."""
DEFAULT_REFRESH_EVERY = 100
"""Steps between teacher snapshots after the warm-up."""
DEFAULT_MAX_SIDE = 128
"""Volumes are resized so their longest side has at most this many voxels before encoding (None: not resized)."""
DEFAULT_SCALES = (2, 3)
"""SwinBackbone feature maps used: strides 8 and 16 (finest first)."""
DEFAULT_PAD_MULTIPLE = 32
"""Swin's bottleneck stride: encoder inputs are padded to a multiple of it."""
FOREGROUND_CELL_FRACTION = 0.5
"""A feature cell is foreground (enters the volume's mean feature) when this fraction of its voxels is."""


def centred_features(features: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Subtract the mean feature of the foreground cells, then L2-normalise every cell.

    Args:
        features: one volume's feature map ``(C, d, h, w)``.
        foreground: ``(d, h, w)`` bool, the cells whose mean enters the centre (all cells when none is set).

    Returns:
        ``(C, d, h, w)`` with unit-norm cells (float32).
    """
    features = features.float()
    cells = features[:, foreground] if bool(foreground.any()) else features.flatten(1)
    return F.normalize(features - cells.mean(dim=1)[:, None, None, None], dim=0)


class FeatureProvider(CorrespondenceProvider):
    """Cosine argmax of the teacher's centred, L2-normalised dense features, averaged over two scales.

    Args:
        fallback: provider used before the warm-up (default: :class:`BodyBoxProvider`).
        warmup_steps: steps before the first teacher snapshot is taken.
        refresh_every: steps between snapshots afterwards.
        max_side: longest side (voxels) of a volume when it is encoded; None encodes at the training spacing.
        scales: indices into the encoder's ``BackboneOutput.features`` (two scales).
        pad_multiple: encoder inputs are zero-padded to a multiple of this.
        foreground_threshold: intensity above which a voxel is body (the cells that define a volume's centre).

    Raises:
        ValueError: an empty ``scales``, or a non-positive ``max_side`` / ``refresh_every`` / ``pad_multiple``.
    """

    name = "feature"

    def __init__(
        self,
        fallback: CorrespondenceProvider | None = None,
        *,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
        max_side: int | None = DEFAULT_MAX_SIDE,
        scales: Sequence[int] = DEFAULT_SCALES,
        pad_multiple: int = DEFAULT_PAD_MULTIPLE,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
    ) -> None:
        if not scales:
            raise ValueError("scales must name at least one feature map")
        if (max_side is not None and max_side < 1) or refresh_every < 1 or pad_multiple < 1:
            raise ValueError(
                f"max_side, refresh_every and pad_multiple must be >= 1, got {max_side}, {refresh_every}, "
                f"{pad_multiple}"
            )
        self.fallback = fallback if fallback is not None else BodyBoxProvider(foreground_threshold)
        self.warmup_steps = warmup_steps
        self.refresh_every = refresh_every
        self.max_side = max_side
        self.scales = tuple(int(s) for s in scales)
        self.pad_multiple = pad_multiple
        self.foreground_threshold = foreground_threshold
        self.encoder: nn.Module | None = None
        self.snapshot_step: int | None = None
        self._memo: tuple | None = None

    def __getstate__(self) -> dict:
        # Workers get the snapshot but not the remembered features of the main process.
        return {**self.__dict__, "_memo": None}

    @property
    def active(self) -> bool:
        """True when a teacher snapshot is present (matching uses features, not the fallback)."""
        return self.encoder is not None

    def update_teacher(self, encoder: nn.Module, step: int) -> bool:
        """Take a CPU snapshot of ``encoder`` when the warm-up is over and the last one is old enough.

        Called by the method on every training step (cheap when nothing is due).

        Args:
            encoder: the teacher backbone (``forward(x) -> BackboneOutput``).
            step: the current optimizer step.

        Returns:
            True if a new snapshot was taken.
        """
        if step < self.warmup_steps:
            return False
        if self.snapshot_step is not None and step - self.snapshot_step < self.refresh_every:
            return False
        snapshot = copy.deepcopy(encoder).cpu().eval()
        for p in snapshot.parameters():
            p.requires_grad_(False)
        self.encoder, self.snapshot_step, self._memo = snapshot, step, None
        logger.info("feature correspondence: teacher snapshot at step %d", step)
        return True

    @torch.no_grad()
    def dense_features(self, volume: Volume) -> tuple[list[torch.Tensor], np.ndarray, list[int]]:
        """Centred, L2-normalised teacher features of ``volume`` at each scale (see :func:`centred_features`).

        Returns:
            Per scale ``(C, d, h, w)`` maps; the voxel size of one resized voxel in original voxels (3,);
            per scale the stride of the map relative to the resized volume.
        """
        if self.encoder is None:
            raise RuntimeError("no teacher snapshot yet: call update_teacher() after the warm-up")
        x = torch.from_numpy(volume.array)[None, None]
        shape = np.asarray(volume.shape)
        scale = 1.0 if self.max_side is None else min(1.0, self.max_side / shape.max())
        size = np.maximum(np.round(shape * scale).astype(int), 1)
        if tuple(size) != tuple(shape):
            x = F.interpolate(x, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
        pad = [(-int(s)) % self.pad_multiple for s in size]
        x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])
        body = (x > self.foreground_threshold).float()
        # padding is never body, even when the threshold is below the fill value
        body[..., int(size[0]):, :, :] = 0
        body[..., int(size[1]):, :] = 0
        body[..., int(size[2]):] = 0
        device = next(self.encoder.parameters()).device
        out = self.encoder(x.to(device))
        feats, strides = [], []
        for s in self.scales:
            f = out.features[s][0].cpu()
            stride = x.shape[2] // f.shape[1]
            foreground = F.avg_pool3d(body, stride)[0, 0] >= FOREGROUND_CELL_FRACTION
            feats.append(centred_features(f, foreground))
            strides.append(stride)
        return feats, shape / size, strides

    def _pair(self, vol_q: Volume, vol_k: Volume) -> tuple:
        if self._memo is None or self._memo[0] is not vol_q or self._memo[1] is not vol_k:
            self._memo = (vol_q, vol_k, self.dense_features(vol_q), self.dense_features(vol_k))
        return self._memo[2], self._memo[3]

    def similarity(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Similarity of ``p``'s descriptor to every cell of K, averaged over the scales, on the finest grid.

        Cells whose centre lies in K's zero padding get -1.

        Returns:
            The map ``(d, h, w)`` and the voxel size of one of its cells in K's voxels (3,).

        Raises:
            RuntimeError: before the first teacher snapshot.
        """
        (feats_q, zoom_q, strides), (feats_k, zoom_k, _) = self._pair(vol_q, vol_k)
        # cell centres: original voxel = (cell + 0.5) * stride * zoom - 0.5
        fine = int(np.argmin(strides))
        grid = feats_k[fine].shape[1:]
        sims = []
        for fq, fk, stride in zip(feats_q, feats_k, strides, strict=True):
            cell = np.round((np.asarray(p) + 0.5) / (zoom_q * stride) - 0.5).astype(int)
            cell = np.clip(cell, 0, np.asarray(fq.shape[1:]) - 1)
            desc = fq[:, cell[0], cell[1], cell[2]]
            sim = torch.einsum("c,cdhw->dhw", desc, fk)[None, None]
            sims.append(F.interpolate(sim, size=grid, mode="nearest")[0, 0])
        sim = torch.stack(sims).mean(0)
        n_valid = np.asarray(vol_k.shape) / zoom_k / strides[fine]
        valid = torch.ones(tuple(grid), dtype=torch.bool)
        for axis, n in enumerate(n_valid):
            centres = torch.arange(grid[axis], dtype=torch.float64) + 0.5
            valid &= (centres <= n).reshape([-1 if a == axis else 1 for a in range(3)])
        return sim.masked_fill(~valid, -1.0), strides[fine] * zoom_k

    def score(self, vol_q: Volume, vol_k: Volume, p: np.ndarray, p_k: np.ndarray) -> float:
        """The score the provider gives the pair ``(p, p_k)``: the similarity at ``p_k``'s cell, clipped to [0, 1]."""
        sim, cell_size = self.similarity(vol_q, vol_k, p)
        cell = np.clip(np.round((np.asarray(p_k) + 0.5) / cell_size - 0.5).astype(int), 0, np.asarray(sim.shape) - 1)
        return float(np.clip(sim[tuple(cell)].item(), 0.0, 1.0))

    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Match ``p`` by teacher features, or ask the fallback before the warm-up."""
        if self.encoder is None:
            return self.fallback(vol_q, vol_k, p)
        sim, cell_size = self.similarity(vol_q, vol_k, p)
        best = np.unravel_index(int(torch.argmax(sim)), tuple(sim.shape))
        p_k = (np.asarray(best) + 0.5) * cell_size - 0.5
        return p_k, float(np.clip(sim[best].item(), 0.0, 1.0))
