"""Feature correspondence provider: match points with the EMA teacher's dense features after a warm-up.

methods.md §1 step 3, ``feature``: the original matches points with a separately pretrained
anatomical-embedding network; this toolkit has no external weights, so it uses its own EMA
teacher once the teacher has trained for ``warmup_steps``. Before that (and whenever no
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

Matching. Each volume is resized so that its longest side is at most ``max_side`` voxels,
zero-padded to a multiple of the encoder's stride, and encoded once per pair (the retry loop
reuses it). At two scales (encoder stages, strides 8 and 16 by default) the descriptor of ``p``
in Q is compared with every cell of K by cosine similarity; the two similarity maps are averaged
on the finer grid and the best cell gives ``p'``; the score is that average similarity, clipped to
``[0, 1]``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl3d.transforms.correspondence import BodyBoxProvider, CorrespondenceProvider, Volume

logger = logging.getLogger(__name__)

__all__ = ["FeatureProvider"]

DEFAULT_WARMUP_STEPS = 1000
"""Optimizer steps before the teacher's features are trusted (before: the fallback provider)."""
DEFAULT_REFRESH_EVERY = 100
"""Steps between teacher snapshots after the warm-up."""
DEFAULT_MAX_SIDE = 128
"""Volumes are resized so their longest side has at most this many voxels before encoding."""
DEFAULT_SCALES = (2, 3)
"""SwinBackbone feature maps used: strides 8 and 16 (finest first)."""
DEFAULT_PAD_MULTIPLE = 32
"""Swin's bottleneck stride: encoder inputs are padded to a multiple of it."""


class FeatureProvider(CorrespondenceProvider):
    """Cosine argmax of the teacher's L2-normalised dense features, averaged over two scales.

    Args:
        fallback: provider used before the warm-up (default: :class:`BodyBoxProvider`).
        warmup_steps: steps before the first teacher snapshot is taken.
        refresh_every: steps between snapshots afterwards.
        max_side: longest side (voxels) of a volume when it is encoded.
        scales: indices into the encoder's ``BackboneOutput.features`` (two scales).
        pad_multiple: encoder inputs are zero-padded to a multiple of this.

    Raises:
        ValueError: an empty ``scales``, or a non-positive ``max_side`` / ``refresh_every``.
    """

    name = "feature"

    def __init__(
        self,
        fallback: CorrespondenceProvider | None = None,
        *,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
        max_side: int = DEFAULT_MAX_SIDE,
        scales: Sequence[int] = DEFAULT_SCALES,
        pad_multiple: int = DEFAULT_PAD_MULTIPLE,
    ) -> None:
        if not scales:
            raise ValueError("scales must name at least one feature map")
        if max_side < 1 or refresh_every < 1 or pad_multiple < 1:
            raise ValueError(
                f"max_side, refresh_every and pad_multiple must be >= 1, got {max_side}, {refresh_every}, "
                f"{pad_multiple}"
            )
        self.fallback = fallback if fallback is not None else BodyBoxProvider()
        self.warmup_steps = warmup_steps
        self.refresh_every = refresh_every
        self.max_side = max_side
        self.scales = tuple(int(s) for s in scales)
        self.pad_multiple = pad_multiple
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
        """L2-normalised teacher features of ``volume`` at each scale.

        Returns:
            Per scale ``(C, d, h, w)`` maps; the voxel size of one resized voxel in original voxels (3,);
            per scale the stride of the map relative to the resized volume.
        """
        if self.encoder is None:
            raise RuntimeError("no teacher snapshot yet: call update_teacher() after the warm-up")
        x = torch.from_numpy(volume.array)[None, None]
        shape = np.asarray(volume.shape)
        size = np.maximum(np.round(shape * min(1.0, self.max_side / shape.max())).astype(int), 1)
        if tuple(size) != tuple(shape):
            x = F.interpolate(x, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
        pad = [(-int(s)) % self.pad_multiple for s in size]
        x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])
        device = next(self.encoder.parameters()).device
        out = self.encoder(x.to(device))
        feats, strides = [], []
        for s in self.scales:
            f = F.normalize(out.features[s][0].float().cpu(), dim=0)
            feats.append(f)
            strides.append(x.shape[2] // f.shape[1])
        return feats, shape / size, strides

    def _pair(self, vol_q: Volume, vol_k: Volume) -> tuple:
        if self._memo is None or self._memo[0] is not vol_q or self._memo[1] is not vol_k:
            self._memo = (vol_q, vol_k, self.dense_features(vol_q), self.dense_features(vol_k))
        return self._memo[2], self._memo[3]

    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Match ``p`` by teacher features, or ask the fallback before the warm-up."""
        if self.encoder is None:
            return self.fallback(vol_q, vol_k, p)
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
            sims.append(F.interpolate(sim, size=grid, mode="trilinear", align_corners=False)[0, 0])
        sim = torch.stack(sims).mean(0)
        # cells whose centre lies in the zero padding of K are not candidates
        n_valid = np.asarray(vol_k.shape) / zoom_k / strides[fine]
        valid = torch.ones(tuple(grid), dtype=torch.bool)
        for axis, n in enumerate(n_valid):
            centres = torch.arange(grid[axis], dtype=torch.float64) + 0.5
            valid &= (centres <= n).reshape([-1 if a == axis else 1 for a in range(3)])
        sim = sim.masked_fill(~valid, -1.0)
        best = np.unravel_index(int(torch.argmax(sim)), tuple(grid))
        p_k = (np.asarray(best) + 0.5) * strides[fine] * zoom_k - 0.5
        return p_k, float(np.clip(sim[best].item(), 0.0, 1.0))
