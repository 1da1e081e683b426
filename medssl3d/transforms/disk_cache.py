"""An on-disk cache for a deterministic dict transform, so that each case goes through it once.

AFiRe's alignment (crop to the foreground box, anti-aliased resize of the full-resolution volume, optionally
a registration) depends on nothing random, yet a pretraining dataset reruns it on every access;
:class:`DiskCachedd` stores its output per case and reads it back afterwards, bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medssl3d.data.atomic_files import atomic_torch_save

logger = logging.getLogger(__name__)

__all__ = ["DiskCachedd", "content_fingerprint"]

CACHE_FORMAT = "1"
"""Part of every cache key: bump it when what is stored changes."""
SAMPLE_STRIDE = 4099
"""Every this many-th voxel (a prime stride) enters the content fingerprint of a case."""


def content_fingerprint(value: torch.Tensor) -> bytes:
    """Source file, shape, dtype, affine and a strided sample of the voxels of one volume."""
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    parts = [str(tuple(tensor.shape)), str(tensor.dtype)]
    if isinstance(value, MetaTensor):
        parts += [
            str(value.meta.get("filename_or_obj", "")),
            np.asarray(value.affine, dtype=np.float64).tobytes().hex(),
        ]
    sample = tensor.detach().reshape(-1)[::SAMPLE_STRIDE].cpu().contiguous().numpy()
    return "|".join(parts).encode() + sample.tobytes()


class DiskCachedd(MapTransform):
    """Apply a deterministic dict ``transform`` to ``keys`` once per case; read its output from disk afterwards.

    A case is identified by its inputs under ``keys`` (source file name, shape, dtype, affine and a strided
    sample of the voxels) and by ``settings``, a description of the transform's configuration; a change to
    either gives a new cache entry. Entries are written atomically, so concurrent ``DataLoader`` workers
    and ``torchrun`` ranks can share ``cache_dir``; an unreadable entry is recomputed. The outputs under
    ``keys`` replace the inputs; other keys pass through. Not invertible: cached outputs carry the applied
    operations of another process, so use the uncached transform where an inverse is needed.

    Args:
        keys: the keys the transform reads and writes (all must be present).
        transform: a deterministic transform of dicts (no random step).
        cache_dir: folder of the entries (created).
        settings: text that changes whenever the transform's configuration does.

    Raises:
        ValueError: ``keys`` is empty.
    """

    def __init__(self, keys: KeysCollection, transform: Callable, cache_dir: str | os.PathLike, settings: str):
        MapTransform.__init__(self, keys)
        if not self.keys:
            raise ValueError("DiskCachedd needs at least one key")
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.settings = settings

    def entry(self, data: Mapping[Hashable, torch.Tensor]) -> Path:
        """The cache file of the case in ``data``."""
        digest = hashlib.sha256(f"{CACHE_FORMAT}|{self.settings}".encode())
        for key in self.keys:
            digest.update(str(key).encode() + b"|" + content_fingerprint(data[key]))
        return self.cache_dir / f"{digest.hexdigest()}.pt"

    def _load(self, path: Path) -> dict | None:
        try:
            # Our own entries, holding MetaTensors (pickled): MONAI's PersistentDataset reads its cache the same way.
            return torch.load(path, weights_only=False)
        except FileNotFoundError:
            return None
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
            logger.warning("cannot read cache entry %s (%s); recomputing it", path, err)
            return None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """The transform's outputs under ``keys``, from the cache when the case is there."""
        d = dict(data)
        path = self.entry(d)
        outputs = self._load(path)
        if outputs is None:
            result = self.transform({key: d[key] for key in self.keys})
            outputs = {key: result[key] for key in self.keys}
            atomic_torch_save(outputs, path)
        d.update(outputs)
        return d
