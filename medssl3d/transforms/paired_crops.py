"""Paired crops of two volumes around corresponding points, and the dataset that pairs volumes.

``docs/methods.md`` (section "Alice"), view steps 2-4. A point ``p`` is drawn in the query volume's foreground, a
correspondence provider maps it to ``p'`` in the key volume with a score; while the score is
below ``threshold`` a new ``p`` is drawn, up to ``max_tries`` times, after which the best pair
seen is used. Crops of ``roi_size`` voxels are cut around ``p`` and ``p'`` (padded where they
leave the volume); both volumes come from one preset, so they share the voxel spacing and the
two crops cover the same physical extent.

The key volume is a second case of the dataset: :class:`PairedDataset` adds it to each item
(drawn by :class:`RandPartnerd` through ``self.R``, so the engine's per-sample seeding makes
the pairing reproducible); the ``same_volume`` provider needs none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable, apply_transform
from torch.utils.data import Dataset

from medssl3d.transforms.correspondence import (
    DEFAULT_CROP,
    DEFAULT_FOREGROUND_THRESHOLD,
    BodyBoxProvider,
    CorrespondenceProvider,
    SameVolumeProvider,
    Volume,
    extract_patch,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PAIR_VIEW_KEYS",
    "PROVIDER_NAMES",
    "PairedDataset",
    "RandCorrespondingCropsd",
    "RandPartnerd",
    "build_provider",
    "crop_around",
    "sample_foreground_point",
]

PAIR_VIEW_KEYS = ("view_q", "view_k")
"""Batch keys of the query and key crops."""
PARTNER_POSTFIX = "_k"
"""``image`` -> ``image_k``: the key volume's item key."""
INDEX_KEY = "pair_index"
DEFAULT_THRESHOLD = 0.7
DEFAULT_MAX_TRIES = 100
STATS_PREFIX = "pair_"
"""Items get ``pair_score``, ``pair_accepted`` and ``pair_tries`` (logged by the method)."""
PROVIDER_NAMES = ("same_volume", "body_box", "registration", "feature")


def sample_foreground_point(
    foreground: np.ndarray, rng: np.random.RandomState, shape: Sequence[int]
) -> np.ndarray:
    """A uniformly drawn foreground voxel.

    Args:
        foreground: flat indices of the foreground voxels (empty: any voxel).
        rng: the random state (a transform's ``self.R``).
        shape: the volume's spatial shape.

    Returns:
        Voxel position (3,) float64.
    """
    if foreground.size:
        flat = foreground[rng.randint(foreground.size)]
    else:
        flat = rng.randint(int(np.prod(shape)))
    return np.asarray(np.unravel_index(flat, tuple(shape)), dtype=np.float64)


def crop_around(image: torch.Tensor, center: np.ndarray, roi: Sequence[int], fill: float) -> torch.Tensor:
    """``roi`` crop of ``image`` ``(C, *spatial)`` around ``center``, padded with ``fill``; the affine follows."""
    patch, start = extract_patch(image.as_tensor() if isinstance(image, MetaTensor) else image, center, roi, 1, fill)
    if not isinstance(image, MetaTensor):
        return patch
    affine = image.affine.clone().to(torch.float64)
    affine[:3, 3] += affine[:3, :3] @ torch.as_tensor(start, dtype=torch.float64)
    return MetaTensor(patch, affine=affine, meta={k: v for k, v in image.meta.items() if k != "affine"})


class RandCorrespondingCropsd(Randomizable, MapTransform):
    """Crop the query and key volumes around corresponding points (the retry loop of ``docs/methods.md``, "Alice").

    Args:
        provider: the correspondence provider; randomised providers (``Randomizable``) are seeded
            with this transform.
        roi_size: crop side in voxels along the three array axes (after RAS: left→right, posterior→anterior,
            inferior→superior).
        query_key: item key of the query volume ``(1, D, H, W)``.
        key_key: item key of the key volume; ignored (the query is used) when the provider does not
            need a key volume.
        view_keys: output keys of the query and key crops.
        threshold: a pair is accepted when its score is at least this.
        max_tries: points drawn before the best pair seen is used.
        foreground_threshold: intensity above which a query voxel may be drawn.
        fill: crop value outside the volume (the presets' background, 0).
        stats_prefix: prefix of the ``score`` / ``accepted`` / ``tries`` item keys.
        keep_points: also store ``pair_point_q`` / ``pair_point_k`` (3,) float (for checks).

    Raises:
        ValueError: a threshold outside [0, 1], ``max_tries < 1`` or a bad ``roi_size``.
    """

    def __init__(
        self,
        provider: CorrespondenceProvider,
        roi_size: Sequence[int] = DEFAULT_CROP,
        *,
        query_key: str = "image",
        key_key: str = "image" + PARTNER_POSTFIX,
        view_keys: Sequence[str] = PAIR_VIEW_KEYS,
        threshold: float = DEFAULT_THRESHOLD,
        max_tries: int = DEFAULT_MAX_TRIES,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
        fill: float = 0.0,
        stats_prefix: str = STATS_PREFIX,
        keep_points: bool = False,
    ) -> None:
        MapTransform.__init__(self, [query_key])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.roi = tuple(int(s) for s in roi_size)
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ValueError(f"roi_size must be 3 positive sizes, got {roi_size}")
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must be two keys (query, key), got {view_keys}")
        self.provider = provider
        self.query_key, self.key_key = query_key, key_key
        self.view_keys = tuple(view_keys)
        self.threshold, self.max_tries = threshold, max_tries
        self.foreground_threshold, self.fill = foreground_threshold, fill
        self.stats_prefix, self.keep_points = stats_prefix, keep_points

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and a randomised provider."""
        super().set_random_state(seed, state)
        if isinstance(self.provider, Randomizable):
            self.provider.set_random_state(seed=self.R.randint(np.iinfo(np.int32).max))
        return self

    def randomize(self, data: Any = None) -> None:  # noqa: D102 - draws happen inside match()
        pass

    def match(self, vol_q: Volume, vol_k: Volume) -> tuple[np.ndarray, np.ndarray, float, bool, int]:
        """Draw foreground points until a pair scores ``threshold`` (or ``max_tries`` pass).

        Returns:
            ``(p, p', score, accepted, tries)`` of the accepted pair, else of the best-scoring one.
        """
        foreground = np.flatnonzero(vol_q.array > self.foreground_threshold)
        best = None
        for tries in range(1, self.max_tries + 1):
            p = sample_foreground_point(foreground, self.R, vol_q.shape)
            p_k, score = self.provider(vol_q, vol_k, p)
            if best is None or score > best[2]:
                best = (p, np.asarray(p_k, dtype=np.float64), float(score))
            if score >= self.threshold:
                return p, best[1], float(score), True, tries
        return best[0], best[1], best[2], False, self.max_tries

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the two crops and the pair's statistics to the item."""
        d = dict(data)
        image_q = d[self.query_key]
        image_k = d[self.key_key] if self.provider.needs_key_volume else image_q
        vol_q = Volume.from_image(image_q)
        vol_k = vol_q if image_k is image_q else Volume.from_image(image_k)
        p, p_k, score, accepted, tries = self.match(vol_q, vol_k)
        d[self.view_keys[0]] = crop_around(image_q, p, self.roi, self.fill)
        d[self.view_keys[1]] = crop_around(image_k, p_k, self.roi, self.fill)
        d[f"{self.stats_prefix}score"] = torch.tensor(score, dtype=torch.float32)
        d[f"{self.stats_prefix}accepted"] = torch.tensor(float(accepted))
        d[f"{self.stats_prefix}tries"] = torch.tensor(tries)
        if self.keep_points:
            d[f"{self.stats_prefix}point_q"] = torch.as_tensor(p)
            d[f"{self.stats_prefix}point_k"] = torch.as_tensor(p_k)
        return d


class RandPartnerd(Randomizable, MapTransform):
    """Add a second, different case of ``source`` as the key volume: ``key + partner_postfix``.

    The item must carry its own index under ``index_key`` (as :class:`PairedDataset` adds it); the
    partner is drawn uniformly among the other indices (itself when ``source`` has one item).

    Args:
        source: indexable items (dicts) holding ``keys``, e.g. the preset-cached dataset.
        keys: keys copied from the partner.
        partner_postfix: suffix of the partner's keys.
        index_key: item key of the item's own index (removed).
    """

    def __init__(
        self,
        source: Sequence[Mapping],
        keys: KeysCollection = "image",
        partner_postfix: str = PARTNER_POSTFIX,
        index_key: str = INDEX_KEY,
    ) -> None:
        MapTransform.__init__(self, keys)
        if not partner_postfix:
            raise ValueError("partner_postfix must be non-empty")
        self.source = source
        self.partner_postfix = partner_postfix
        self.index_key = index_key
        self._partner = 0

    def randomize(self, index: int) -> None:
        """Draw a partner index different from ``index``."""
        n = len(self.source)
        if n < 2:
            self._partner = index
            return
        j = self.R.randint(n - 1)
        self._partner = j + 1 if j >= index else j

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Copy ``keys`` of a random other item under ``key + partner_postfix``."""
        d = dict(data)
        self.randomize(int(d.pop(self.index_key)))
        partner = self.source[self._partner]
        for key in self.key_iterator(d):
            d[f"{key}{self.partner_postfix}"] = partner[key]
        return d


class PairedDataset(Dataset):
    """Items of ``data`` with a second case as the key volume, then the view transform.

    ``transform`` is ``Compose([RandPartnerd(data), views])`` (or the views alone with
    ``pair=False``), exposed as :attr:`transform` so that the engine's per-sample seeding
    (``SeededDataset``) covers the pairing too.

    Args:
        data: indexable items ``{"image": (1, D, H, W), ...}`` (e.g. the preset-cached dataset).
        transform: the view generation (e.g. :func:`~medssl3d.methods.alice.alice_transforms`).
        pair: draw a partner (False for the ``same_volume`` provider).
        keys: keys copied from the partner.
    """

    def __init__(
        self, data: Sequence[Mapping], transform: Callable, *, pair: bool = True, keys: KeysCollection = "image"
    ) -> None:
        if len(data) < 1:
            raise ValueError("PairedDataset needs at least one item")
        if pair and len(data) < 2:
            logger.warning("only one volume: every pair is the volume with itself")
        self.data = data
        self.pair = pair
        self.transform = Compose([RandPartnerd(data, keys), transform]) if pair else Compose([transform])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        """The item ``index`` with its partner, through the view transform."""
        item = dict(self.data[index])
        if self.pair:
            item[INDEX_KEY] = index
        return apply_transform(self.transform, item)


def build_provider(
    name: str,
    *,
    roi_size: Sequence[int] = DEFAULT_CROP,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
    template: Any = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> CorrespondenceProvider:
    """Build a provider by name with the arguments the views share (a bundle's one switch).

    Args:
        name: one of :data:`PROVIDER_NAMES`.
        roi_size: crop side (the NCC / overlap scores use it).
        foreground_threshold: body threshold (the body_box box, the voxels the NCC scores count, the feature
            provider's centre cells and its body_box fallback).
        template: registration template (a ``(1, D, H, W)`` image or :class:`Volume`); required for
            ``registration``.
        cache_dir: registration cache folder.
        **kwargs: further arguments of the chosen provider's constructor.

    Raises:
        ValueError: an unknown name, or ``registration`` without a template.
    """
    from medssl3d.transforms.feature_match import FeatureProvider
    from medssl3d.transforms.registration import RegistrationProvider

    roi = tuple(int(s) for s in roi_size)
    if name == "same_volume":
        return SameVolumeProvider(crop_size=roi, **kwargs)
    if name == "body_box":
        return BodyBoxProvider(foreground_threshold=foreground_threshold, crop_size=roi, **kwargs)
    if name == "registration":
        if template is None:
            raise ValueError("the registration provider needs a template volume")
        return RegistrationProvider(
            template, crop_size=roi, cache_dir=cache_dir, foreground_threshold=foreground_threshold, **kwargs
        )
    if name == "feature":
        fallback = BodyBoxProvider(foreground_threshold=foreground_threshold, crop_size=roi)
        return FeatureProvider(fallback, foreground_threshold=foreground_threshold, **kwargs)
    raise ValueError(f"unknown correspondence provider {name!r}; expected one of {PROVIDER_NAMES}")
