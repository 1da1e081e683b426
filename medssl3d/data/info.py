"""What the toolkit sees in an input: geometry and intensity summary, as a JSON-serialisable dict.

Backs ``medssl3d info PATH [--json]``.
"""

from __future__ import annotations

import os

import numpy as np

from medssl3d.data.dicom import list_series
from medssl3d.data.readers import detect_format, load_array, read_header

PERCENTILES = (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)


def _intensity(array: np.ndarray) -> dict:
    finite = np.isfinite(array)
    values = np.asarray(array[finite], dtype=np.float64)
    n_nonfinite = int(finite.size - finite.sum())
    if values.size == 0:
        return {
            "min": None,
            "max": None,
            "mean": None,
            "std": None,
            "percentiles": {},
            "n_nonfinite": n_nonfinite,
        }
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "percentiles": {
            f"p{q:g}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)
        },
        "n_nonfinite": n_nonfinite,
    }


def describe(path: str | os.PathLike, *, series_uid: str | None = None) -> dict:
    """Describe a NIfTI / NRRD / MetaImage file or a DICOM series folder.

    Args:
        path: the input.
        series_uid: series to describe when a DICOM folder holds several.

    Returns:
        A dict of plain Python values (``json.dumps`` works): ``path``, ``format`` (nifti / dicom / nrrd /
        mha), ``shape`` (spatial, as loaded), ``ndim``, ``n_volumes``, ``spacing`` (mm), ``orientation``
        (axis codes of the RAS affine, e.g. "RAS"), ``direction`` (3x3 LPS cosines, as SimpleITK shows them),
        ``origin`` (LPS, mm), ``affine`` (4x4 RAS), ``dtype``, ``series_uid``, ``series_in_folder`` (DICOM),
        and ``intensity`` (min, max, mean, std, percentiles and the count of NaN/inf voxels, which the
        statistics leave out). 2D and 4D inputs are described too (statistics over all volumes).

    Raises:
        InputError: naming the input, when it is missing, unsupported or unreadable, or a DICOM folder
            holds several series and ``series_uid`` is not given.
    """
    fmt = detect_format(path)
    header = read_header(path, series_uid=series_uid)
    array, _ = load_array(path, series_uid=header.series_uid)
    return {
        "path": str(path),
        "format": fmt,
        "shape": [int(s) for s in header.shape],
        "ndim": int(header.ndim),
        "n_volumes": int(header.n_volumes),
        "spacing": [float(s) for s in header.spacing],
        "orientation": header.orientation,
        "direction": np.asarray(header.direction, dtype=float).tolist(),
        "origin": [float(v) for v in header.origin],
        "affine": np.asarray(header.affine, dtype=float).tolist(),
        "dtype": header.dtype,
        "series_uid": header.series_uid,
        "series_in_folder": list(list_series(path)) if fmt == "dicom" else None,
        "intensity": _intensity(np.asarray(array)),
    }
