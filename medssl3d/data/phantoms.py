"""Procedural 3D phantoms with labelled anatomy-like structures, and writers for NIfTI, DICOM and ITK files.

A phantom is a torso-like volume: a body ellipsoid with a subcutaneous fat rim, two abdominal organs
("liver", "spleen"), a bone tube ("spine") with a cortical shell, and a fluid-filled region. Each subject
gets a seeded smooth deformation and organ jitter, so phantoms differ the way subjects do, and tests get
known labels without any download.

Arrays are indexed in the order NIfTI stores them (the order MONAI's ``NibabelReader`` returns); the
``affine`` maps those indices to RAS world millimetres. With the default (unrotated) affine, array axis 0
runs to the subject's right, axis 1 to anterior and axis 2 to superior.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

DEFAULT_SHAPE = (64, 64, 64)
DEFAULT_SPACING = (1.5, 1.5, 1.5)

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "body",
    2: "fat",
    3: "liver",
    4: "spleen",
    5: "spine",
    6: "fluid",
}

# Tissue intensities: CT in Hounsfield units, MRI in arbitrary T1-like units (fat bright, fluid dark).
CT_VALUES: dict[str, float] = {
    "air": -1000.0,
    "body": 40.0,
    "fat": -100.0,
    "liver": 60.0,
    "spleen": 45.0,
    "cortical_bone": 900.0,
    "marrow": 450.0,
    "fluid": 8.0,
}
MRI_VALUES: dict[str, float] = {
    "air": 0.0,
    "body": 400.0,
    "fat": 900.0,
    "liver": 520.0,
    "spleen": 330.0,
    "cortical_bone": 60.0,
    "marrow": 650.0,
    "fluid": 150.0,
}
CT_NOISE_HU = 8.0
MRI_NOISE = 15.0
CT_HU_RANGE = (-1024.0, 3071.0)
MRI_BIAS_STRENGTH = 0.4

# Anatomy in normalised coordinates: every array axis spans [-1, 1], so shapes from 32^3 up keep all labels.
BODY_SEMI_AXES = (0.76, 0.58, 1.25)  # the torso fills the field of view along axis 2, with air around it
FAT_THICKNESS = 0.08
LIVER = ((0.33, 0.1, 0.3), (0.3, 0.26, 0.32))  # (centre, semi-axes)
SPLEEN = ((-0.4, -0.1, 0.38), (0.14, 0.18, 0.24))
FLUID = ((0.0, 0.12, -0.55), (0.23, 0.2, 0.22))
SPINE_CENTRE = (0.0, -0.37)  # (axis 0, axis 1); the tube runs along axis 2
SPINE_RADIUS = 0.13
CORTEX_THICKNESS = 0.05

# Per-subject variation.
DEFORM_GRID = 4  # control points per axis of the random displacement field
DEFORM_AMPLITUDE = 0.08  # peak displacement, normalised units (4% of the field of view)
ORGAN_SCALE_JITTER = 0.1  # semi-axes scaled by up to +-10%
ORGAN_SHIFT_JITTER = 0.05
BIAS_GRID = 3

# DICOM writing.
CT_RESCALE_INTERCEPT = -1024.0
INT16_STORED_MAX = 32767
DS_FORMAT = ".10g"  # DICOM decimal strings hold at most 16 characters
UID_ROOT = "2.25."  # UUID-derived UIDs (DICOM PS3.5 B.2) need no registered root
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Phantom:
    """A synthetic volume with its labels.

    Attributes:
        image: intensities, shape (D, H, W), float32 (CT in HU, rounded to integers as scanners store them).
        label: structure labels, shape (D, H, W), uint8; keys of ``label_names``.
        affine: (4, 4) voxel-to-RAS-world matrix in mm, as nibabel uses it.
        label_names: label value -> structure name; 0 is "background".
        modality: "ct" or "mri".
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABEL_NAMES))
    modality: str = "ct"

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def windowed(self, low: float = -200.0, high: float = 300.0) -> np.ndarray:
        """The image clipped to ``[low, high]`` and min-max scaled to [0, 1], ``(D, H, W)`` float32.

        A quick stand-in for a preset's intensity scaling when a test feeds a phantom straight to a method.
        """
        image = np.clip(self.image, low, high)
        return (image - image.min()) / (image.max() - image.min())


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about the world x, then y, then z axes (degrees), as a (3, 3) matrix."""
    rx, ry, rz = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def make_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    origin: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """RAS affine for a grid; centred on the world origin unless ``origin`` (world mm of voxel 0) is given."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(rotation_deg) @ np.diag(np.asarray(spacing, dtype=float))
    if origin is None:
        affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    else:
        affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: int, channels: int) -> np.ndarray:
    """Random values on a coarse grid, trilinearly upsampled: (channels, *shape) in [-1, 1]."""
    coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, channels, grid, grid, grid)))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()


def _ellipsoid(coords: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Implicit ellipsoid: < 1 inside. ``coords`` is (3, D, H, W)."""
    c = np.asarray(centre, dtype=float)[:, None, None, None]
    s = np.asarray(semi_axes, dtype=float)[:, None, None, None]
    return (((coords - c) / s) ** 2).sum(axis=0)


def _jitter(rng: np.random.Generator, centre, semi_axes, active: bool):
    if not active:
        return centre, semi_axes
    centre = np.asarray(centre) + rng.uniform(-ORGAN_SHIFT_JITTER, ORGAN_SHIFT_JITTER, 3)
    semi_axes = np.asarray(semi_axes) * (1 + rng.uniform(-ORGAN_SCALE_JITTER, ORGAN_SCALE_JITTER, 3))
    return centre, semi_axes


def make_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    modality: str = "ct",
    seed: int = 0,
    deform: bool = True,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    origin: tuple[float, float, float] | None = None,
    *,
    bias_field: bool = True,
) -> Phantom:
    """Build a torso-like phantom.

    Args:
        shape: array shape (D, H, W); all structures are present from 16^3 up.
        spacing: voxel size in mm along each array axis.
        modality: "ct" (HU: air -1000, fat about -100, soft tissue 30-60, bone 400-1000, integer valued)
            or "mri" (positive T1-like units, Rician-like background noise).
        seed: subject seed; the same seed gives the same phantom, different seeds different subjects.
        deform: apply a random smooth deformation and organ jitter (per subject); without it only the
            noise (and bias field) depends on the seed.
        rotation_deg: rotation of the grid in world space (x, y, z, degrees), giving an oblique affine.
            It changes only the affine, not the voxels.
        origin: world (RAS, mm) position of voxel (0, 0, 0); default centres the volume on the origin.
        bias_field: for MRI, multiply by a smooth random bias field (exp of up to +-0.4).

    Returns:
        A :class:`Phantom` with image and label of shape ``shape``.

    Raises:
        ValueError: for an unknown modality or a shape that is not 3D.
    """
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes >= 2, got {shape}")
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    if deform:
        coords = coords + DEFORM_AMPLITUDE * _smooth_field(rng, shape, DEFORM_GRID, 3)

    body = _ellipsoid(coords, (0, 0, 0), BODY_SEMI_AXES) < 1
    inner = np.asarray(BODY_SEMI_AXES) - FAT_THICKNESS
    soft = _ellipsoid(coords, (0, 0, 0), inner) < 1
    label = np.zeros(shape, dtype=np.uint8)
    label[body] = 2
    label[soft] = 1
    for value, (centre, semi) in ((3, LIVER), (4, SPLEEN), (6, FLUID)):
        centre, semi = _jitter(rng, centre, semi, deform)
        label[(_ellipsoid(coords, centre, semi) < 1) & soft] = value
    radius = np.hypot(coords[0] - SPINE_CENTRE[0], coords[1] - SPINE_CENTRE[1])
    spine = (radius < SPINE_RADIUS) & soft
    label[spine] = 5

    values = CT_VALUES if modality == "ct" else MRI_VALUES
    image = np.full(shape, values["air"], dtype=np.float64)
    for value, name in ((1, "body"), (2, "fat"), (3, "liver"), (4, "spleen"), (6, "fluid")):
        image[label == value] = values[name]
    image[spine] = values["cortical_bone"]
    image[spine & (radius < SPINE_RADIUS - CORTEX_THICKNESS)] = values["marrow"]

    if modality == "ct":
        image = image + rng.normal(0.0, CT_NOISE_HU, shape)
        image = np.clip(np.round(image), *CT_HU_RANGE)
    else:
        if bias_field:
            image = image * np.exp(MRI_BIAS_STRENGTH * _smooth_field(rng, shape, BIAS_GRID, 1)[0])
        # Magnitude images: noise on both quadrature channels keeps the background positive (Rician).
        image = np.hypot(image + rng.normal(0.0, MRI_NOISE, shape), rng.normal(0.0, MRI_NOISE, shape))
    affine = make_affine(shape, spacing, rotation_deg, origin)
    return Phantom(image.astype(np.float32), label, affine, dict(LABEL_NAMES), modality)


def _prepare(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an array (D, H, W) with its RAS affine as NIfTI-1 (qform and sform both set, code "scanner")."""
    path = _prepare(path)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def sitk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction (row-major 3x3, LPS), origin (LPS)) of a RAS affine, as SimpleITK wants them."""
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(direction.flatten().tolist()), tuple(lps[:3, 3].tolist())


def to_sitk_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image whose index (i, j, k) holds ``array[i, j, k]``, placed by the RAS ``affine``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).T))
    spacing, direction, origin = sitk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def write_itk_image(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an array (D, H, W) with its RAS affine as NRRD / MetaImage (.nrrd, .nhdr, .mha, .mhd)."""
    path = _prepare(path)
    if not str(path).lower().endswith(ITK_SUFFIXES):
        raise ValueError(f"path must end with one of {ITK_SUFFIXES}, got {path}")
    sitk.WriteImage(to_sitk_image(array, affine), str(path), True)
    return path


def new_uid() -> str:
    """A fresh, globally unique DICOM UID."""
    return f"{UID_ROOT}{uuid.uuid4().int}"


def _ds(values) -> str:
    return "\\".join(format(float(v), DS_FORMAT) for v in np.atleast_1d(values))


def _rescale(array: np.ndarray, rescale: bool) -> tuple[float, float]:
    """(slope, intercept) mapping int16 stored values to ``array``'s values."""
    lo, hi = float(array.min()), float(array.max())
    integer = bool(np.all(np.round(array) == array))
    if not rescale:
        if not integer or lo < -INT16_STORED_MAX - 1 or hi > INT16_STORED_MAX:
            raise ValueError(
                f"rescale=False needs int16-valued data, got range [{lo}, {hi}] (integer={integer})"
            )
        return 1.0, 0.0
    if integer and lo >= CT_RESCALE_INTERCEPT and hi - CT_RESCALE_INTERCEPT <= INT16_STORED_MAX:
        return 1.0, CT_RESCALE_INTERCEPT
    if integer and hi - lo <= INT16_STORED_MAX:
        return 1.0, lo
    slope = float(format((hi - lo) / INT16_STORED_MAX if hi > lo else 1.0, DS_FORMAT))
    return slope, lo


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str = "CT",
    rescale: bool = True,
    spacing_jitter: float | None = None,
    drop_slices: tuple[int, ...] | list[int] = (),
    seed: int = 0,
    description: str = "medssl3d phantom",
    file_prefix: str = "slice",
) -> Path:
    """Write an array (D, H, W) as a DICOM series, one file per index of the last axis.

    Files hold int16 pixels with RescaleSlope/RescaleIntercept, ImagePositionPatient and
    ImageOrientationPatient in LPS (converted from the RAS ``affine``, oblique directions included),
    SliceThickness, PixelSpacing, InstanceNumber, Modality and Series/Study/SOP instance UIDs, so that
    GDCM's series discovery and SimpleITK's ``ImageSeriesReader`` read the volume back.

    Args:
        array: volume (D, H, W); slices are ``array[:, :, k]``.
        affine: (4, 4) RAS affine of ``array``.
        folder: output folder (created); files are named ``<file_prefix>_0000.dcm``...
        series_uid: SeriesInstanceUID; a fresh UID when None.
        study_uid: StudyInstanceUID; a fresh UID when None.
        modality: "CT"/"ct" or "MR"/"mri".
        rescale: choose slope/intercept to fit the value range into int16 (integer data with slope 1, so
            CT round-trips exactly); False stores the values as they are (they must be int16 integers).
        spacing_jitter: for bad-input tests: move each slice position by up to this fraction of the
            slice spacing (uniform, seeded), giving non-uniform spacing. Must be < 0.5; above 0.25 a gap
            may exceed 1.5x the median, which readers take for missing slices.
        drop_slices: for bad-input tests: slice indices not written (missing slices).
        seed: seed of the spacing jitter.
        description: SeriesDescription.
        file_prefix: file name prefix (several series can then share a folder).

    Returns:
        The folder.

    Raises:
        ValueError: for an array that is not 3D, an unknown modality or a jitter >= 0.5.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (D, H, W), got shape {array.shape}")
    modality = {"ct": "CT", "mri": "MR", "mr": "MR"}.get(modality.lower())
    if modality is None:
        raise ValueError("modality must be CT or MR")
    if spacing_jitter is not None and not 0 <= spacing_jitter < 0.5:
        raise ValueError(f"spacing_jitter must be in [0, 0.5), got {spacing_jitter}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or new_uid()
    study_uid = study_uid or new_uid()
    frame_uid = new_uid()
    slope, intercept = _rescale(array, rescale)

    spacing, direction, origin = sitk_geometry(affine)
    cosines = np.asarray(direction).reshape(3, 3)
    n_slices = array.shape[2]
    offsets = np.arange(n_slices, dtype=float)
    if spacing_jitter:
        offsets = offsets + np.random.default_rng(seed).uniform(-spacing_jitter, spacing_jitter, n_slices)
    shared = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0016": SOP_CLASS[modality],
        "0008|0060": modality,
        "0008|103e": description,
        "0010|0010": "PHANTOM",
        "0010|0020": "PHANTOM",
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": "1",
        "0020|0052": frame_uid,
        "0020|0037": _ds(np.concatenate([cosines[:, 0], cosines[:, 1]])),
        "0018|0050": _ds(spacing[2]),
        "0028|1052": _ds(intercept),
        "0028|1053": _ds(slope),
        # Stored pixels: 16-bit signed; GDCM applies the inverse rescale to the float buffer it is given.
        "0028|0100": "16",
        "0028|0101": "16",
        "0028|0102": "15",
        "0028|0103": "1",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    dropped = {int(k) % n_slices for k in drop_slices}
    for k in range(n_slices):
        if k in dropped:
            continue
        # Build each slice from numpy: SimpleITK's 3D->2D extraction fails on some oblique directions.
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, k].T.astype(np.float32)))
        image.SetSpacing(spacing[:2])
        for tag, value in shared.items():
            image.SetMetaData(tag, value)
        position = np.asarray(origin) + offsets[k] * spacing[2] * cosines[:, 2]
        image.SetMetaData("0020|0032", _ds(position))
        image.SetMetaData("0020|1041", _ds(position @ cosines[:, 2]))
        image.SetMetaData("0020|0013", str(k + 1))
        image.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"{file_prefix}_{k:04d}.dcm"))
        writer.Execute(image)
    return folder


def write_case(
    root: str | os.PathLike,
    name: str,
    phantom: Phantom,
    fmt: str = "nifti",
    with_label: bool = True,
    **dicom_kwargs,
) -> dict[str, str]:
    """Write one phantom as a case of a dataset.

    Args:
        root: dataset folder.
        name: case name.
        phantom: the phantom to write.
        fmt: "nifti" (``<root>/<name>.nii.gz``), "dicom" (a series folder ``<root>/<name>/``),
            "nrrd" or "mha" (``<root>/<name>.nrrd`` / ``.mha``).
        with_label: also write the label as NIfTI, ``<root>/<name>_seg.nii.gz``.
        dicom_kwargs: passed to :func:`write_dicom_series` (e.g. ``series_uid``, ``drop_slices``).

    Returns:
        ``{"image": path}`` plus ``"label"`` when written; paths as strings.

    Raises:
        ValueError: for an unknown ``fmt``.
    """
    root = Path(root)
    if fmt == "nifti":
        image = write_nifti(phantom.image, phantom.affine, root / f"{name}.nii.gz")
    elif fmt == "dicom":
        modality = dicom_kwargs.pop("modality", phantom.modality)
        image = write_dicom_series(
            phantom.image, phantom.affine, root / name, modality=modality, **dicom_kwargs
        )
    elif fmt in ("nrrd", "mha"):
        image = write_itk_image(phantom.image, phantom.affine, root / f"{name}.{fmt}")
    else:
        raise ValueError(f"fmt must be 'nifti', 'dicom', 'nrrd' or 'mha', got {fmt!r}")
    case = {"image": str(image)}
    if with_label:
        case["label"] = str(write_nifti(phantom.label, phantom.affine, root / f"{name}_seg.nii.gz"))
    return case
