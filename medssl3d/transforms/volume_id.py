"""A stable integer id of the volume a sample was cut from, written into the sample.

DiRA's MoCo queue uses it to keep a volume's own earlier keys out of its negatives (see
:class:`medssl3d.losses.moco.MoCoLoss`). The id must be the same in every process and every run,
so it is a 63-bit BLAKE2b hash of a name, never Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

__all__ = ["DEFAULT_VOLUME_KEY", "VolumeIdd", "volume_id"]

DEFAULT_VOLUME_KEY = "volume_id"
ID_BYTES = 8


def volume_id(name: str) -> int:
    """A non-negative 63-bit integer from ``name`` (BLAKE2b), the same in every process and run."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=ID_BYTES).digest()
    return int.from_bytes(digest, "big") >> 1


class VolumeIdd(MapTransform):
    """Put the id of the sample's source volume under ``id_key`` as a 0-d int64 tensor (collated to (B,)).

    The id comes from, in this order: a value already under ``id_key`` (a datalist field: a
    non-negative integer is kept, a string such as a patient id is hashed, so that several scans of
    one patient share an id), or the source volume's file name (``filename_or_obj`` in the meta
    data of the MetaTensor under ``source_key``, as MONAI's loaders set it), hashed.

    Args:
        source_key: key of the loaded volume (a MetaTensor).
        id_key: key the id is written to.

    Raises:
        ValueError: (when called) a negative integer id, or neither an id nor a source file name.
    """

    def __init__(self, source_key: str = "image", id_key: str = DEFAULT_VOLUME_KEY) -> None:
        super().__init__(keys=source_key)
        self.source_key = source_key
        self.id_key = id_key

    def _id(self, data: Mapping[Hashable, object]) -> int:
        given = data.get(self.id_key)
        if isinstance(given, torch.Tensor) and given.numel() == 1:
            given = given.item()
        if isinstance(given, str):
            return volume_id(given)
        if isinstance(given, numbers.Integral):
            if given < 0:
                raise ValueError(f"{self.id_key!r} must be a non-negative integer or a name, got {given}")
            return int(given)
        source = data.get(self.source_key)
        name = source.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(source, MetaTensor) else None
        if not name:
            raise ValueError(
                f"no volume id: the sample has no {self.id_key!r} and its {self.source_key!r} carries no "
                f"file name ({ImageMetaKey.FILENAME_OR_OBJ!r} meta data); load it with MONAI or set {self.id_key!r}"
            )
        return volume_id(str(name))

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        """Return a copy of ``data`` with the id under ``id_key``."""
        d = dict(data)
        d[self.id_key] = torch.tensor(self._id(d), dtype=torch.long)
        return d
