"""DICOM series folders: finding a series, checking its slice geometry, reading it into a SimpleITK image.

Slices are sorted along the normal of their orientation and stacked on the uniform grid that runs from
the first to the last slice (the grid SimpleITK's ``ImageSeriesReader`` uses). A series is stacked as it
is when no slice lies further than ``POSITION_ATOL`` = 0.2 mm from its place on that grid, so a volume is
never misplaced by more than 0.2 mm; deviations above 1 % of the spacing (``UNIFORM_RTOL``, more than
decimal-string rounding) are logged (INFO) with their maximum.

Why 0.2 mm: scanners write ImagePositionPatient as decimal strings computed from the planned geometry.
Rounding each LPS coordinate to 0.1 mm moves an oblique slice by up to 0.05 * (|n_x| + |n_y| + |n_z|)
<= 0.087 mm along the normal, and real oblique MR series have gaps about 0.1 mm (1.5 %) off uniform. The
first and last slices that span the grid carry the same error, so a slice up to 0.1 mm off its true
place is up to 0.2 mm off the grid. For comparison, dicom2nifti (``validate_slice_increment``) refuses a
series when a slice-to-slice increment differs from the first by more than 0.1 mm + 5 % per coordinate
(``numpy.allclose(rtol=0.05, atol=0.1)``); ITK/SimpleITK's ``ImageSeriesReader`` refuses nothing: it
stacks every series on the first-to-last grid and only warns when a gap differs from that spacing by
more than ``SpacingWarningRelThreshold`` (1e-4 of it), missing slices included.

Refused with an :class:`~medssl3d.data.errors.InputError` naming the folder: a gap over 1.5x the median
spacing (missing slices), slices sharing a position, and a slice further off the grid than
``POSITION_ATOL`` (non-uniform spacing) unless the caller asks to resample onto a uniform grid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

MISSING_SLICE_FACTOR = 1.5  # a gap this many times the median slice spacing means missing slices
POSITION_ATOL = 0.2  # mm; farthest a slice may lie from the first-to-last grid to be stacked as is (module doc)
UNIFORM_RTOL = 0.01  # deviations within 1% of the spacing are decimal-string rounding: accepted without a log
DUPLICATE_ATOL = 1e-3  # mm; slices closer than this share a position
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MODALITY_TAG = "0008|0060"
DESCRIPTION_TAG = "0008|103e"
PIXEL_DTYPES = {
    sitk.sitkUInt8: "uint8",
    sitk.sitkInt8: "int8",
    sitk.sitkUInt16: "uint16",
    sitk.sitkInt16: "int16",
    sitk.sitkUInt32: "uint32",
    sitk.sitkInt32: "int32",
    sitk.sitkUInt64: "uint64",
    sitk.sitkInt64: "int64",
    sitk.sitkFloat32: "float32",
    sitk.sitkFloat64: "float64",
}


@dataclass
class DicomSeries:
    """One DICOM series as found on disk, sorted along the slice normal.

    Attributes:
        folder: the series folder.
        series_uid: SeriesInstanceUID.
        files: slice files in spatial order (increasing position along the slice normal).
        positions: (N,) slice positions along the normal, mm.
        origin: ImagePositionPatient of the first slice (LPS, mm).
        direction: (3, 3) LPS direction cosines (columns: row direction, column direction, normal).
        pixel_spacing: in-plane spacing (between columns, between rows), mm.
        size: in-plane size (columns, rows).
        dtype: pixel type SimpleITK returns (after rescale slope/intercept).
        modality: Modality tag ("" if absent).
        description: SeriesDescription ("" if absent).
    """

    folder: Path
    series_uid: str
    files: tuple[str, ...]
    positions: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]
    dtype: str
    modality: str
    description: str

    @property
    def gaps(self) -> np.ndarray:
        """(N - 1,) distances between consecutive slices, mm."""
        return np.diff(self.positions)

    @property
    def grid_deviations(self) -> np.ndarray:
        """(N,) signed distance of each slice from its place on the first-to-last uniform grid, mm."""
        return self.positions - (self.positions[0] + self.slice_spacing() * np.arange(len(self.files)))

    @property
    def is_uniform(self) -> bool:
        """Whether every slice lies within ``POSITION_ATOL`` of the first-to-last uniform grid."""
        return bool(np.all(np.abs(self.grid_deviations) <= POSITION_ATOL))

    def slice_spacing(self) -> float:
        """Spacing of the grid from the first to the last slice (the mean gap), mm; 1.0 for one slice."""
        if len(self.files) < 2:
            return 1.0
        return float((self.positions[-1] - self.positions[0]) / (len(self.files) - 1))

    def resample_grid(self, resample_spacing: float | None = None) -> tuple[float, int]:
        """(spacing, number of slices) of the uniform grid from the first slice that resampling fills.

        Args:
            resample_spacing: slice spacing of the grid, mm; default the median gap.
        """
        spacing = float(np.median(self.gaps)) if resample_spacing is None else float(resample_spacing)
        return spacing, int(np.floor((self.positions[-1] - self.positions[0]) / spacing + UNIFORM_RTOL)) + 1

    def affine(self, slice_spacing: float | None = None) -> np.ndarray:
        """(4, 4) RAS affine of the stacked series (optionally with another slice spacing)."""
        spacing = (*self.pixel_spacing, self.slice_spacing() if slice_spacing is None else slice_spacing)
        lps = np.eye(4)
        lps[:3, :3] = self.direction @ np.diag(spacing)
        lps[:3, 3] = self.origin
        return RAS_FROM_LPS @ lps


def _meta(reader: sitk.ImageFileReader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def list_series(folder: str | os.PathLike) -> tuple[str, ...]:
    """SeriesInstanceUIDs of the DICOM series in ``folder`` (GDCM series discovery, not recursive)."""
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def scan_dicom_series(
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_nonuniform_spacing: bool = False,
) -> DicomSeries:
    """Find one series in a folder and read its slice headers (no pixel data).

    Args:
        folder: a folder of DICOM files.
        series_uid: the series to use when the folder holds several.
        allow_nonuniform_spacing: accept slices further than ``POSITION_ATOL`` (0.2 mm) from the uniform
            grid (the caller resamples).

    Returns:
        The series, sorted along its slice normal. A series whose slices lie off the uniform grid by more
        than decimal-string rounding (1 % of the spacing) but within ``POSITION_ATOL`` is accepted, logged
        (INFO) with the largest deviation.

    Raises:
        InputError: naming the folder, when it holds no series, several series and no ``series_uid`` (the
            UIDs are listed), not the requested series, slices with mixed orientation or duplicate
            positions, missing slices (a gap over 1.5x the median spacing), or non-uniform spacing (a slice
            further than ``POSITION_ATOL`` from the uniform grid) without ``allow_nonuniform_spacing``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "DICOM series folder not found")
    uids = list_series(folder)
    if not uids:
        raise InputError(folder, "no DICOM series found in this folder (subfolders are not searched)")
    if series_uid is None:
        if len(uids) > 1:
            listed = ", ".join(uids)
            raise InputError(folder, f"{len(uids)} DICOM series found; choose one with series_uid: {listed}")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(folder, f"series {series_uid} not found; the folder holds: {', '.join(uids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)

    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOff()
    origins, directions = [], []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise InputError(name, f"corrupt DICOM file ({str(err).strip().splitlines()[-1]})") from err
        origins.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
    # In-plane size, spacing and tags come from the last file read; the series reader rejects slices that
    # disagree on them, and orientation is checked here because it sets the geometry.
    direction = np.asarray(directions[0], dtype=float).reshape(3, 3)
    if not np.allclose(np.asarray(directions, dtype=float), np.asarray(directions[0]), atol=DUPLICATE_ATOL):
        raise InputError(folder, f"series {series_uid}: slices have different orientations")
    origins = np.asarray(origins, dtype=float)
    normal = np.cross(direction[:, 0], direction[:, 1])
    direction[:, 2] = normal
    positions = origins @ normal
    order = np.argsort(positions, kind="stable")
    positions, origins = positions[order], origins[order]
    files = tuple(files[i] for i in order)
    series = DicomSeries(
        folder=folder,
        series_uid=series_uid,
        files=files,
        positions=positions,
        origin=origins[0],
        direction=direction,
        pixel_spacing=tuple(float(s) for s in reader.GetSpacing()[:2]),
        size=tuple(int(s) for s in reader.GetSize()[:2]),
        dtype=PIXEL_DTYPES.get(reader.GetPixelID(), sitk.GetPixelIDValueAsString(reader.GetPixelID())),
        modality=_meta(reader, MODALITY_TAG),
        description=_meta(reader, DESCRIPTION_TAG),
    )
    _check_spacing(series, allow_nonuniform_spacing)
    return series


def _check_spacing(series: DicomSeries, allow_nonuniform_spacing: bool) -> None:
    if len(series.files) < 2:
        return
    gaps = series.gaps
    where = f"series {series.series_uid}"
    if np.any(gaps < DUPLICATE_ATOL):
        k = int(np.argmin(gaps))
        raise InputError(
            series.folder,
            f"{where}: slices {Path(series.files[k]).name} and {Path(series.files[k + 1]).name} share the "
            f"position {series.positions[k]:.4g} mm (duplicate slices, or several acquisitions in a series)",
        )
    median = float(np.median(gaps))
    k = int(np.argmax(gaps))
    if gaps[k] > MISSING_SLICE_FACTOR * median:
        n_missing = round(gaps[k] / median) - 1
        raise InputError(
            series.folder,
            f"{where}: missing slice(s): gap of {gaps[k]:.4g} mm between {Path(series.files[k]).name} and "
            f"{Path(series.files[k + 1]).name} (positions {series.positions[k]:.4g} and "
            f"{series.positions[k + 1]:.4g} mm), about {n_missing} slice(s) missing at the median spacing "
            f"of {median:.4g} mm",
        )
    deviations = np.abs(series.grid_deviations)
    k = int(np.argmax(deviations))
    spacing = series.slice_spacing()
    if deviations[k] > POSITION_ATOL:
        if allow_nonuniform_spacing:
            return
        raise InputError(
            series.folder,
            f"{where}: non-uniform slice spacing: {Path(series.files[k]).name} lies {deviations[k]:.3g} mm off "
            f"the uniform grid at {spacing:.4g} mm from the first to the last slice (tolerance {POSITION_ATOL} "
            f"mm; gaps from {gaps.min():.4g} to {gaps.max():.4g} mm); pass allow_nonuniform_spacing=True to "
            "resample onto a uniform grid",
        )
    if deviations[k] > UNIFORM_RTOL * spacing:
        logger.info(
            "%s: %s: slice positions lie up to %.3g mm (%s) off a uniform grid at %.4g mm, within the "
            "tolerance of %g mm; stacked on that grid",
            series.folder,
            where,
            deviations[k],
            Path(series.files[k]).name,
            spacing,
            POSITION_ATOL,
        )


def _resample_slices(array: np.ndarray, positions: np.ndarray, spacing: float, n_out: int) -> np.ndarray:
    """Linearly interpolate the last axis from ``positions`` onto ``n_out`` slices at ``spacing`` from the first."""
    targets = positions[0] + spacing * np.arange(n_out)
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    weight = ((targets - positions[upper - 1]) / (positions[upper] - positions[upper - 1])).astype(np.float32)
    return array[..., upper - 1] * (1 - weight) + array[..., upper] * weight


def read_dicom_series(
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_nonuniform_spacing: bool = False,
    resample_spacing: float | None = None,
) -> sitk.Image:
    """Read a DICOM series into a SimpleITK image with the geometry taken from the slice headers.

    Args:
        folder: series folder.
        series_uid: series to read when the folder holds several.
        allow_nonuniform_spacing: resample series with varying slice gaps onto a uniform grid (logged).
        resample_spacing: slice spacing (mm) of that grid; default the median gap.

    Returns:
        A 3D image; metadata keys "series_uid", "modality", "description".

    Raises:
        InputError: see :func:`scan_dicom_series`; also for unreadable pixel data.
    """
    series = scan_dicom_series(folder, series_uid=series_uid, allow_nonuniform_spacing=allow_nonuniform_spacing)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    reader.SetSpacingWarningRelThreshold(np.inf)  # checked by scan_dicom_series, handled below
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(folder, f"cannot read the pixel data of series {series.series_uid} ({err})") from err
    if series.is_uniform:
        affine = series.affine()
    else:
        spacing, n_out = series.resample_grid(resample_spacing)
        array = _resample_slices(sitk.GetArrayFromImage(image).T.astype(np.float32), series.positions, spacing, n_out)
        logger.info(
            "%s: series %s has non-uniform slice spacing (gaps %.4g-%.4g mm); resampled %d slices onto a "
            "uniform grid of %d slices at %.4g mm",
            folder,
            series.series_uid,
            series.gaps.min(),
            series.gaps.max(),
            len(series.files),
            array.shape[-1],
            spacing,
        )
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
        affine = series.affine(spacing)
    lps = RAS_FROM_LPS @ affine
    spacing3 = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing3.tolist())
    image.SetDirection((lps[:3, :3] / spacing3).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetMetaData("series_uid", series.series_uid)
    image.SetMetaData("modality", series.modality)
    image.SetMetaData("description", series.description)
    return image
