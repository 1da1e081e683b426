"""Checks that a loaded array is a usable 3D volume, and that a label shares its image's grid.

Every failure raises :class:`~medssl3d.data.errors.InputError` naming the file and the problem, so a
datalist check can list all bad entries and a long run can skip them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

SPATIAL_DIMS = 3
DEFAULT_GRID_ATOL = 1e-3  # mm (and mm per voxel for the direction-times-spacing part of the affine)
FILENAME_KEY = "filename_or_obj"

Array = np.ndarray | torch.Tensor


class GridHeader(Protocol):
    """What :func:`check_same_grid` reads of a header, e.g. a :class:`~medssl3d.data.readers.VolumeHeader`."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray


def _shape(array: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in array.shape)


def select_volume(array: Array, path: str | os.PathLike, *, allow_4d_index: int | None = None) -> Array:
    """Reduce an array as stored in a file to one 3D volume, or say why it is not one.

    Trailing singleton axes beyond the third are dropped (a 4D file holding one volume is 3D).

    Args:
        array: (D, H, W) or, for series of volumes, (D, H, W, T) with the volume axis last as in
            NIfTI and MetaImage files.
        path: the file, named in errors and log lines.
        allow_4d_index: for a 4D array, the index of the volume to take (negative counts from the end);
            None makes 4D input an error.

    Returns:
        The (D, H, W) volume.

    Raises:
        InputError: for a 1D/2D image (fewer than three axes longer than one voxel), a 4D image without
            ``allow_4d_index`` or with one out of range, or more than four dimensions.
    """
    shape = _shape(array)
    while len(shape) > SPATIAL_DIMS and shape[-1] == 1:
        shape = shape[:-1]
    array = array.reshape(shape)
    spatial = shape[:SPATIAL_DIMS]
    extent = sum(s > 1 for s in spatial)
    if len(spatial) < SPATIAL_DIMS or extent < SPATIAL_DIMS:
        raise InputError(path, f"image is {extent}D (shape {shape}); a 3D volume is expected")
    if len(shape) > SPATIAL_DIMS + 1:
        raise InputError(path, f"image is {len(shape)}D (shape {shape}); a 3D volume is expected")
    if len(shape) == SPATIAL_DIMS:
        return array
    n_volumes = shape[-1]
    if allow_4d_index is None:
        raise InputError(
            path,
            f"image is 4D (shape {shape}, {n_volumes} volumes); a 3D volume is expected "
            "(set allow_4d_index to choose one)",
        )
    if not -n_volumes <= allow_4d_index < n_volumes:
        raise InputError(path, f"allow_4d_index={allow_4d_index} is out of range for {n_volumes} volumes")
    index = allow_4d_index % n_volumes
    logger.info(
        "%s: 4D image (shape %s): taking volume index %d of %d volumes", path, shape, index, n_volumes
    )
    return array[..., index]


def check_volume(
    array: Array,
    path: str | os.PathLike,
    *,
    min_shape: Sequence[int] | int | None = None,
    allow_4d_index: int | None = None,
) -> Array:
    """Check that ``array`` is one finite 3D volume at least ``min_shape`` large.

    Args:
        array: (D, H, W), or (D, H, W, T) for a series of volumes (see :func:`select_volume`).
        path: the file, named in errors.
        min_shape: smallest acceptable (D, H, W) (e.g. the crop size), or one int for all axes.
        allow_4d_index: volume to take from a 4D array; None makes 4D input an error.

    Returns:
        The (D, H, W) volume (the selected one for 4D input).

    Raises:
        InputError: for 2D / 4D / higher-dimensional input, NaN or infinite voxels, or a volume smaller
            than ``min_shape``.
    """
    volume = select_volume(array, path, allow_4d_index=allow_4d_index)
    if isinstance(volume, torch.Tensor):
        n_nan, n_inf = int(torch.isnan(volume).sum()), int(torch.isinf(volume).sum())
    else:
        n_nan, n_inf = int(np.isnan(volume).sum()), int(np.isinf(volume).sum())
    if n_nan or n_inf:
        raise InputError(
            path, f"{n_nan} NaN and {n_inf} infinite voxel(s) in a volume of shape {_shape(volume)}"
        )
    if min_shape is not None:
        required = (min_shape,) * SPATIAL_DIMS if isinstance(min_shape, int) else tuple(min_shape)
        if len(required) != SPATIAL_DIMS:
            raise ValueError(f"min_shape must be an int or {SPATIAL_DIMS} ints, got {min_shape}")
        shape = _shape(volume)
        if any(s < r for s, r in zip(shape, required, strict=True)):
            raise InputError(
                path, f"volume of shape {shape} is smaller than the required {required} (crop size)"
            )
    return volume


def check_same_grid(
    image_header: GridHeader, label_header: GridHeader, *, atol: float = DEFAULT_GRID_ATOL
) -> None:
    """Check that a label lies on its image's voxel grid (same shape, same affine within ``atol``).

    Args:
        image_header: header of the image (anything with ``path``, ``shape`` and ``affine``).
        label_header: header of the label.
        atol: largest tolerated absolute difference of affine entries (mm).

    Raises:
        InputError: naming the label file, when shapes differ or the affines differ by more than ``atol``.
    """
    if tuple(label_header.shape) != tuple(image_header.shape):
        raise InputError(
            label_header.path,
            f"label grid differs from its image {image_header.path}: "
            f"shape {tuple(label_header.shape)} vs image shape {tuple(image_header.shape)}",
        )
    diff = float(np.abs(np.asarray(label_header.affine) - np.asarray(image_header.affine)).max())
    if diff > atol:
        raise InputError(
            label_header.path,
            f"label grid differs from its image {image_header.path}: affines differ by up to {diff:.4g} "
            f"(tolerance {atol})",
        )


class ValidateVolumed(MapTransform):
    """Apply :func:`check_volume` to loaded images, naming each file from its meta data.

    Args:
        keys: keys of the loaded (Meta)Tensors.
        min_shape: smallest acceptable spatial shape (D, H, W), e.g. the crop size.
        allow_4d_index: for images with several volumes (channels after ``EnsureChannelFirst``), the one to
            keep; None makes them an error.
        channel_dim: the channel axis (0 after ``EnsureChannelFirst``), or None for (D, H, W) data.
        multichannel: accept several channels (e.g. stacked modalities) and check each as a 3D volume;
            ``allow_4d_index`` is then ignored.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        min_shape: Sequence[int] | int | None = None,
        allow_4d_index: int | None = None,
        channel_dim: int | None = 0,
        multichannel: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.min_shape = min_shape
        self.allow_4d_index = allow_4d_index
        self.channel_dim = channel_dim
        self.multichannel = multichannel

    def _check(self, img: Array, key: Hashable) -> Array:
        path = img.meta.get(FILENAME_KEY, f"<{key}>") if isinstance(img, MetaTensor) else f"<{key}>"
        if self.channel_dim is None:
            volume = check_volume(img, path, min_shape=self.min_shape, allow_4d_index=self.allow_4d_index)
            return img if volume.shape == img.shape else volume
        move = torch.movedim if isinstance(img, torch.Tensor) else np.moveaxis
        channel_last = move(img, self.channel_dim, -1)
        if self.multichannel:
            for c in range(channel_last.shape[-1]):
                check_volume(channel_last[..., c], path, min_shape=self.min_shape)
            return img
        check_volume(channel_last, path, min_shape=self.min_shape, allow_4d_index=self.allow_4d_index)
        n_volumes = img.shape[self.channel_dim]
        if n_volumes == 1:
            return img
        # check_volume accepted several volumes, so allow_4d_index is set: keep that one as the channel.
        index = self.allow_4d_index % n_volumes
        return img[(slice(None),) * self.channel_dim + (slice(index, index + 1),)]

    def __call__(self, data: Mapping) -> dict:
        """Check every key; returns the data with 4D images reduced to the selected volume."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._check(d[key], key)
        return d
