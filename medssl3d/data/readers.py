"""Reading volumes: a SimpleITK reader for MONAI, a loader for mixed datalists, cheap header reading.

The SimpleITK reader handles DICOM series folders, NRRD and MetaImage files.

Array axis order and affine follow MONAI's ``NibabelReader``: SimpleITK's ``GetArrayFromImage`` gives
(k, j, i), so arrays are transposed to (i, j, k) (MONAI's ``ITKReader`` with ``reverse_indexing=False``),
and the LPS geometry of SimpleITK/DICOM is turned into a RAS affine. A volume written as NIfTI and as a
DICOM series therefore loads voxel for voxel equal, with the same affine.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.config import KeysCollection
from monai.data import ImageReader, NibabelReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medssl3d.data.dicom import (
    DUPLICATE_ATOL,
    PIXEL_DTYPES,
    RAS_FROM_LPS,
    DicomSeries,
    list_series,
    read_dicom_series,
    scan_dicom_series,
)
from medssl3d.data.errors import InputError
from medssl3d.data.validation import select_volume

# The DICOM-series names live in medssl3d.data.dicom and stay importable from here.
__all__ = [
    "META_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "SUPPORTED",
    "DicomSeries",
    "LoadVolumed",
    "SITKReader",
    "VolumeHeader",
    "VolumeReader",
    "affine_from_sitk",
    "detect_format",
    "list_series",
    "load_array",
    "read_dicom_series",
    "read_header",
    "scan_dicom_series",
    "volume_loader",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
GZIP_CHUNK = 1 << 20
GZIP_ISIZE_MODULUS = 1 << 32


def detect_format(path: str | os.PathLike) -> str:
    """Format of an input: "nifti", "dicom" (a folder), "nrrd" or "mha" (MetaImage .mha/.mhd).

    Raises:
        InputError: when the path does not exist or has an unsupported suffix.
    """
    path = Path(path)
    if path.is_dir():
        return "dicom"
    if not path.exists():
        raise InputError(path, "file or folder not found")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if name.endswith(META_SUFFIXES):
        return "mha"
    if name.endswith(".dcm"):
        raise InputError(path, "a single DICOM file; pass the folder that holds the series")
    raise InputError(path, f"unsupported format; expected {SUPPORTED}")


def affine_from_sitk(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """(4, 4) RAS affine of a SimpleITK image (or a reader after ``ReadImageInformation``), first 3 axes."""
    dim = image.GetDimension()
    n = min(dim, 3)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:n, :n]
    lps = np.eye(4)
    lps[:n, :n] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=float)[:n])
    lps[:n, 3] = np.asarray(image.GetOrigin(), dtype=float)[:n]
    return RAS_FROM_LPS @ lps


class SITKReader(ImageReader):
    """MONAI image reader for DICOM series folders and NRRD / MetaImage files, through SimpleITK.

    Arrays come out as MONAI's ``NibabelReader`` gives them for the same volume stored as NIfTI: index
    order (i, j, k) (SimpleITK's (k, j, i) reversed) and a RAS ``affine`` (SimpleITK's LPS converted).

    Args:
        series_uid: series to read from folders holding several (else several series is an error).
        allow_nonuniform_spacing: resample DICOM series with varying slice gaps onto a uniform grid instead
            of raising.
        resample_spacing: slice spacing (mm) of that grid; default the median gap.
        channel_dim: channel axis of the data, as in MONAI readers (None: none, or last for vector images).
    """

    def __init__(
        self,
        series_uid: str | None = None,
        allow_nonuniform_spacing: bool = False,
        resample_spacing: float | None = None,
        channel_dim: int | None = None,
    ):
        super().__init__()
        self.series_uid = series_uid
        self.allow_nonuniform_spacing = allow_nonuniform_spacing
        self.resample_spacing = resample_spacing
        self.channel_dim = channel_dim

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True when every name is a folder (DICOM series) or an NRRD / MetaImage file."""
        suffixes = NRRD_SUFFIXES + META_SUFFIXES
        return all(Path(f).is_dir() or str(f).lower().endswith(suffixes) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> sitk.Image | list[sitk.Image]:
        """Read one or several inputs (folders are DICOM series) into SimpleITK images.

        Raises:
            InputError: naming the input, when it is missing, unreadable or an invalid DICOM series.
        """
        images = [self._read_one(Path(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def _read_one(self, path: Path) -> sitk.Image:
        if path.is_dir():
            return read_dicom_series(
                path,
                series_uid=self.series_uid,
                allow_nonuniform_spacing=self.allow_nonuniform_spacing,
                resample_spacing=self.resample_spacing,
            )
        if not path.exists():
            raise InputError(path, "file not found")
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise InputError(path, _corrupt_itk(err)) from err

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Array (i, j, k[, c]) and meta data (affine, original_affine, spatial_shape, spacing, space...).

        Several images are stacked on a new first (channel) axis; their grids must agree.
        """
        images = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays, metas = zip(*(self._get_one(i) for i in images), strict=True)
        meta = dict(metas[0])
        for other in metas[1:]:
            if other[MetaKeys.SPATIAL_SHAPE].tolist() != meta[
                MetaKeys.SPATIAL_SHAPE
            ].tolist() or not np.allclose(other[MetaKeys.AFFINE], meta[MetaKeys.AFFINE], atol=DUPLICATE_ATOL):
                raise ValueError("images stacked as channels must share shape and affine")
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays), meta

    def _get_one(self, image: sitk.Image) -> tuple[np.ndarray, dict]:
        array = sitk.GetArrayFromImage(image)
        # (k, j, i) -> (i, j, k); vector pixels stay on the last axis.
        array = array.T if image.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array.T, 0, -1)
        spatial_shape = np.asarray(image.GetSize()[: min(image.GetDimension(), 3)])
        affine = affine_from_sitk(image)
        meta = {
            "spacing": np.asarray(image.GetSpacing(), dtype=float),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: spatial_shape,
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        for key in ("series_uid", "modality"):
            if image.HasMetaDataKey(key):
                meta[key] = image.GetMetaData(key)
        if self.channel_dim is None:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if array.ndim == len(spatial_shape) else -1
        else:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
        return array, meta


def _corrupt_nifti(err: Exception) -> str:
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"corrupt or truncated NIfTI file ({type(err).__name__}: {message})"


def _corrupt_itk(err: Exception) -> str:
    return f"corrupt or truncated file, SimpleITK cannot read it ({_last_line(err)})"


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass
class _Loaded:
    path: str
    backend: str  # "nifti" or "sitk"
    obj: object


class VolumeReader(ImageReader):
    """One MONAI reader for every supported input.

    NIfTI goes through ``NibabelReader``, the rest through :class:`SITKReader`; errors become
    :class:`InputError` naming the file, and 2D/4D inputs are caught.

    Args:
        allow_4d_index: volume to take from 4D inputs (logged); None makes 4D input an error.
        reader_kwargs: passed to :class:`SITKReader` (``series_uid``, ``allow_nonuniform_spacing``,
            ``resample_spacing``).
    """

    def __init__(self, allow_4d_index: int | None = None, **reader_kwargs):
        super().__init__()
        self.allow_4d_index = allow_4d_index
        self.nifti = NibabelReader()
        self.sitk = SITKReader(**reader_kwargs)

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True when every name is a NIfTI file or something :class:`SITKReader` reads."""
        return all(
            str(f).lower().endswith(NIFTI_SUFFIXES) or self.sitk.verify_suffix(f)
            for f in ensure_tuple(filename)
        )

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> _Loaded | list[_Loaded]:
        """Open each input (headers only for NIfTI; voxels are read in :meth:`get_data`).

        Raises:
            InputError: naming the input, when missing, of unsupported format or unreadable.
        """
        loaded = [self._read_one(str(name)) for name in ensure_tuple(data)]
        return loaded if len(loaded) > 1 else loaded[0]

    def _read_one(self, path: str) -> _Loaded:
        fmt = detect_format(path)
        if fmt != "nifti":
            return _Loaded(path, "sitk", self.sitk.read(path))
        try:
            return _Loaded(path, "nifti", self.nifti.read(path))
        except Exception as err:
            raise InputError(path, _corrupt_nifti(err)) from err

    def get_data(self, img: _Loaded | Sequence[_Loaded]) -> tuple[np.ndarray, dict]:
        """Array (i, j, k) (channels first when several inputs) and meta data, as MONAI readers return.

        Raises:
            InputError: naming the file, for corrupt/truncated voxel data or inputs that are not 3D.
        """
        items = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays, metas = zip(*(self._get_one(i) for i in items), strict=True)
        if len(arrays) == 1:
            return arrays[0], metas[0]
        for item, meta in zip(items[1:], metas[1:], strict=True):
            if meta[MetaKeys.SPATIAL_SHAPE].tolist() != metas[0][MetaKeys.SPATIAL_SHAPE].tolist():
                raise InputError(item.path, f"shape differs from {items[0].path}, with which it is stacked")
        meta = dict(metas[0])
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays), meta

    def get_raw_data(self, item: _Loaded) -> tuple[np.ndarray, dict]:
        """Array as stored, (i, j, k[, t]), and meta data of one input, without the 3D check.

        Raises:
            InputError: naming the file, for corrupt or truncated voxel data.
        """
        if item.backend == "sitk":
            return self.sitk.get_data(item.obj)
        self.nifti.filenames = (item.path,)
        try:
            return self.nifti.get_data(item.obj)
        except (EOFError, OSError, ValueError, zlib.error) as err:
            raise InputError(item.path, _corrupt_nifti(err)) from err

    def _get_one(self, item: _Loaded) -> tuple[np.ndarray, dict]:
        array, meta = self.get_raw_data(item)
        volume = select_volume(array, item.path, allow_4d_index=self.allow_4d_index)
        if volume.ndim != array.ndim:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")
            meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(volume.shape)
        return np.asarray(volume), meta


def load_array(path: str | os.PathLike, **reader_kwargs) -> tuple[np.ndarray, dict]:
    """Read any supported input as stored, (i, j, k[, t]), with MONAI-style meta data; no 3D check.

    Args:
        path: file or DICOM folder.
        reader_kwargs: for :class:`SITKReader` (``series_uid``, ``allow_nonuniform_spacing``...).

    Raises:
        InputError: naming the file, for missing, unsupported, corrupt or truncated inputs.
    """
    reader = VolumeReader(**reader_kwargs)
    return reader.get_raw_data(reader.read(path))


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that reads every input with :class:`VolumeReader`.

    Reader errors reach the user as :class:`InputError`: MONAI's fallback over its registered readers
    would bury them in a generic ``RuntimeError``.

    Args:
        keys: keys of the inputs (NIfTI files, DICOM folders, NRRD / MetaImage files, mixed freely).
        volume_reader: the reader.
        kwargs: passed to ``LoadImaged`` (``image_only``, ``ensure_channel_first``, ``dtype``...).
    """

    def __init__(self, keys: KeysCollection, volume_reader: VolumeReader, **kwargs):
        super().__init__(keys, reader=volume_reader, **kwargs)
        self.volume_reader = volume_reader

    def __call__(self, data, reader: ImageReader | None = None):
        """Load every key of ``data`` (with ``reader`` if given, else the volume reader)."""
        return super().__call__(data, reader or self.volume_reader)


def volume_loader(
    keys: KeysCollection,
    *,
    image_only: bool = True,
    ensure_channel_first: bool = True,
    allow_4d_index: int | None = None,
    dtype=np.float32,
    allow_missing_keys: bool = False,
    **reader_kwargs,
) -> LoadImaged:
    """A ``LoadImaged`` for NIfTI, DICOM series folders and NRRD / MetaImage files mixed in one datalist.

    Args:
        keys: keys to load.
        image_only: return MetaTensors only (no separate meta dict).
        ensure_channel_first: add the channel axis: (1, D, H, W).
        allow_4d_index: volume to take from 4D inputs (logged); None makes them an error.
        dtype: output dtype.
        allow_missing_keys: skip absent keys.
        reader_kwargs: for :class:`SITKReader`: ``series_uid``, ``allow_nonuniform_spacing``,
            ``resample_spacing``.

    Returns:
        A :class:`LoadVolumed` (a ``LoadImaged``) raising :class:`InputError` naming the file for missing,
        unsupported, corrupt or truncated inputs, invalid DICOM series and 2D/4D images.
    """
    return LoadVolumed(
        keys,
        VolumeReader(allow_4d_index=allow_4d_index, **reader_kwargs),
        image_only=image_only,
        ensure_channel_first=ensure_channel_first,
        dtype=dtype,
        allow_missing_keys=allow_missing_keys,
    )


@dataclass
class VolumeHeader:
    """What a file's header says, without reading voxels where avoidable.

    Attributes:
        path: the file or DICOM folder.
        shape: spatial shape as loaded (array axes i, j, k).
        spacing: voxel size along those axes, mm.
        affine: (4, 4) RAS affine, as loaded.
        orientation: axis codes of the affine, e.g. "RAS".
        direction: (3, 3) LPS direction cosines, as SimpleITK reports them.
        origin: world position of the first voxel, LPS (mm), as SimpleITK reports it.
        n_volumes: number of volumes (the product of dimensions beyond the third).
        ndim: number of dimensions, trailing singleton dimensions beyond the third dropped.
        dtype: stored voxel type (DICOM: after rescale, as SimpleITK returns it).
        series_uid: DICOM SeriesInstanceUID, else None.
    """

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    orientation: str
    direction: np.ndarray
    origin: tuple[float, ...]
    n_volumes: int
    ndim: int
    dtype: str
    series_uid: str | None = None


def _header(path, full_shape, affine, spacing, dtype, series_uid=None) -> VolumeHeader:
    full_shape = tuple(int(s) for s in full_shape)
    while len(full_shape) > 3 and full_shape[-1] == 1:
        full_shape = full_shape[:-1]
    affine = np.asarray(affine, dtype=float)
    lps = RAS_FROM_LPS @ affine
    norms = np.linalg.norm(lps[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    return VolumeHeader(
        path=str(path),
        shape=full_shape[:3],
        spacing=tuple(float(s) for s in spacing),
        affine=affine,
        orientation="".join(nib.aff2axcodes(affine)),
        direction=lps[:3, :3] / norms,
        origin=tuple(float(v) for v in lps[:3, 3]),
        n_volumes=int(np.prod(full_shape[3:], dtype=int)),
        ndim=len(full_shape),
        dtype=str(dtype),
        series_uid=series_uid,
    )


def _short_nifti(expected: int, found: int) -> str:
    return f"corrupt or truncated NIfTI file (the header promises {expected} bytes, the file holds {found})"


def _check_nifti_size(path: Path, img: nib.Nifti1Image) -> None:
    """Detect truncation cheaply: compare the data size the header promises with what the file holds."""
    header = img.header
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(
        header.get_data_dtype().itemsize
    )
    if not str(path).lower().endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise InputError(path, _short_nifti(expected, size))
        return
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == expected % GZIP_ISIZE_MODULUS:
        return
    # The gzip trailer disagrees (truncation, or a multi-member file): decompress to be sure.
    try:
        total = 0
        with gzip.open(path, "rb") as f:
            while chunk := f.read(GZIP_CHUNK):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(path, _corrupt_nifti(err)) from err
    if total < expected:
        raise InputError(path, _short_nifti(expected, total))


def _nifti_header(path: Path) -> VolumeHeader:
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise InputError(path, _corrupt_nifti(err)) from err
    _check_nifti_size(path, img)
    zooms = img.header.get_zooms()[:3]
    return _header(path, img.shape, img.affine, zooms, img.get_data_dtype())


def _itk_header(path: Path) -> VolumeHeader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(path, _corrupt_itk(err)) from err
    size = list(reader.GetSize())
    if reader.GetNumberOfComponents() > 1:
        size.append(reader.GetNumberOfComponents())
    dtype = PIXEL_DTYPES.get(reader.GetPixelID(), sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    return _header(path, size, affine_from_sitk(reader), reader.GetSpacing()[:3], dtype)


def read_header(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_nonuniform_spacing: bool = False,
    resample_spacing: float | None = None,
) -> VolumeHeader:
    """Read what a NIfTI / NRRD / MetaImage file or a DICOM series folder says about its volume.

    Voxels are not read: NIfTI through nibabel's header (plus a size check against truncation), files
    through SimpleITK's ``ReadImageInformation``, DICOM folders through their per-slice headers.

    Args:
        path: file or DICOM folder.
        series_uid: series to use when a folder holds several.
        allow_nonuniform_spacing: report a non-uniform DICOM series as its resampled grid instead of raising.
        resample_spacing: slice spacing of that grid; default the median gap.

    Returns:
        The :class:`VolumeHeader` of the volume as :func:`volume_loader` would load it.

    Raises:
        InputError: naming the file, for missing, unsupported, corrupt or truncated inputs, several series
            without ``series_uid``, missing slices or non-uniform slice spacing.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "nifti":
        return _nifti_header(path)
    if fmt != "dicom":
        return _itk_header(path)
    series = scan_dicom_series(path, series_uid=series_uid, allow_nonuniform_spacing=allow_nonuniform_spacing)
    n_slices = len(series.files)
    slice_spacing = None
    if not series.is_uniform:
        slice_spacing, n_slices = series.resample_grid(resample_spacing)
    affine = series.affine(slice_spacing)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return _header(path, (*series.size, n_slices), affine, spacing, series.dtype, series.series_uid)
