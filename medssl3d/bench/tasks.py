"""Labelled tasks for the transfer benchmark: what to fine-tune on, what to test on, what may be pretrained on.

Tasks come from the real sample scans (:func:`medssl3d.data.sample.fetch_sample_data`) or, for tests and
plumbing checks, from synthetic MRI phantoms:

- ``brain_extraction``: brain masks of T1 heads; the labelled *volumes* are the training heads, the test head
  is another subject (the sample datalist's ``test`` split).
- ``chest_ct``: seven merged organ classes of one contrast chest CT cut into slabs along the inferior→superior
  axis; the labelled *volumes* are the two training slabs, the test slab lies between them (4 slices apart),
  and only the training slabs may be pretrained on. Its pretraining pool is the CT scans, the others' the MRI.
- ``tissue`` (grey / white matter of MNI152) and ``aal_regions`` (merged AAL regions of Colin27): one subject
  each, split spatially into two hemispheres: the labelled *crops* are cut from one, the other is the test.
- ``phantom``: labelled phantom volumes, one more phantom as the test.

A task's test subjects never enter its pretraining pool (the sample datalists' ``exclude_from_pretraining``).
Images that are cut (hemispheres, crops) are intensity-normalised once on the whole volume before cutting, so
that a crop and the test hemisphere share one intensity mapping; they are fine-tuned with a fixed window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.data.atomic_files import atomic_write_json
from medssl3d.data.presets import MRI_LOWER_PERCENTILE, MRI_UPPER_PERCENTILE, PresetConfig, preset_for
from medssl3d.data.sample import fetch_sample_data

logger = logging.getLogger(__name__)

SOURCES = ("sample", "phantoms")
VOLUME_TASKS = ("brain_extraction", "chest_ct")
SPLIT_TASKS = ("tissue", "aal_regions")
PHANTOM_TASK = "phantom"
TASKS = (*VOLUME_TASKS, *SPLIT_TASKS, PHANTOM_TASK)
UNIT_VOLUME = "volume"
UNIT_CROP = "crop"
#: Modality of each sample task's scans (its preset, and the pretraining pool it draws from).
TASK_MODALITY = {"brain_extraction": "MRI", "chest_ct": "CT", "tissue": "MRI", "aal_regions": "MRI",
                 "phantom": "MRI"}
#: Modality of the data benchmark's pretraining images.
SAMPLE_MODALITY = "MRI"
#: Labelled phantoms of the phantom task (one more is its test case).
PHANTOM_TRAIN = 2
PHANTOM_SHAPE = (48, 48, 48)
PHANTOM_SPACING = (3.0, 3.0, 3.0)
#: Array axis a single subject is split along (after reorientation to RAS: left | right).
SPLIT_AXIS = 0
NORMALISED_MIN = 0.0
NORMALISED_MAX = 1.0


@dataclass(frozen=True)
class Task:
    """One labelled task.

    Attributes:
        name: task name (one of :data:`TASKS`).
        unit: ``"volume"`` (k labelled volumes are drawn from ``labelled``) or ``"crop"`` (k labelled crops are
            cut from the single region in ``labelled``).
        label_names: ``{"0": "background", "1": ...}`` as in a bundle's ``channel_def``.
        labelled: datalist entries (``image``, ``label``, ``case``; absolute paths) to draw training data from.
        test: held-out entries, never trained or pretrained on.
        pretrain: unlabelled entries (``image``, ``subject``) the task allows pretraining on.
        normalised: the labelled and test images were intensity-normalised when written (see module docs).
        modality: ``"mri"`` or ``"ct"``: the preset of pretraining, fine-tuning and testing.
    """

    name: str
    unit: str
    label_names: dict[str, str]
    labelled: tuple[dict, ...]
    test: tuple[dict, ...]
    pretrain: tuple[dict, ...]
    normalised: bool = False
    modality: str = "mri"

    @property
    def max_k(self) -> int | None:
        """The most labelled units a run can have (``None``: crops, as many as asked)."""
        return len(self.labelled) if self.unit == UNIT_VOLUME else None

    @property
    def class_names(self) -> list[str]:
        """Foreground class names in label order (what Dice is reported for)."""
        return [self.label_names[k] for k in sorted(self.label_names, key=int) if int(k) != 0]


def check_source(source: str) -> None:
    """Raise ``ValueError`` naming ``source`` unless it is one of :data:`SOURCES`."""
    if source not in SOURCES:
        raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")


def pretraining_images(source: str, root: str | os.PathLike) -> list[dict]:
    """Every unlabelled MRI image of a source (the data benchmark's input; no task holds anything out).

    Args:
        source: ``"sample"`` (the real scans, fetched if needed) or ``"phantoms"`` (written under ``root``).
        root: folder for the phantoms.
    """
    check_source(source)
    if source == "phantoms":
        task = load_task(PHANTOM_TASK, source=source, root=root)
        return [*task.pretrain, *({"image": e["image"], "subject": e["case"]} for e in task.test)]
    return [e for e in fetch_sample_data(progress=False).pretrain_pool() if e["modality"] == SAMPLE_MODALITY]


def load_task(name: str, *, source: str, root: str | os.PathLike) -> Task:
    """Build task ``name`` from ``source``, writing any derived files (hemispheres, phantoms) under ``root``.

    Raises:
        ValueError: an unknown task, or a task the source does not offer (``phantom`` needs ``"phantoms"``).
        KeyError: the sample data lacks the task (e.g. ``aal_regions`` without the Debian part).
    """
    check_source(source)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {TASKS}")
    if (name == PHANTOM_TASK) != (source == "phantoms"):
        raise ValueError(f"task {name!r} is not offered by data source {source!r}")
    root = Path(root)
    if name == PHANTOM_TASK:
        return _phantom_task(root / "phantoms")
    data = fetch_sample_data(progress=False)
    if name not in data.datalists:
        raise KeyError(f"the sample data has no {name!r} task: {data.skipped.get(name, 'unknown task')}")
    path = data.datalists[name]
    datalist = json.loads(path.read_text())
    modality = TASK_MODALITY[name]
    pretrain = tuple(e for e in data.pretrain_pool(exclude_task=name) if e["modality"] == modality)
    labels = {str(k): v for k, v in datalist["labels"].items()}
    if name in VOLUME_TASKS:
        return Task(name, UNIT_VOLUME, labels, tuple(_absolute(path, e) for e in datalist["training"]),
                    tuple(_absolute(path, e) for e in datalist["test"]), pretrain, modality=modality.lower())
    (subject,) = [_absolute(path, e) for e in datalist["training"]]
    train, test = split_subject(subject, root / "tasks" / name)
    return Task(name, UNIT_CROP, labels, (train,), (test,), pretrain, normalised=True, modality=modality.lower())


def _absolute(datalist: Path, entry: dict) -> dict:
    return {"case": entry["case"], **{k: str((datalist.parent / entry[k]).resolve()) for k in ("image", "label")}}


def _phantom_task(root: Path) -> Task:
    path = Path(write_smoke_datalist(
        root, n_train=PHANTOM_TRAIN, n_val=1, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, modality="mri",
    ))
    datalist = json.loads(path.read_text())

    def entry(e: dict) -> dict:
        return {"case": Path(e["image"]).name.split(".")[0], **{k: str(path.parent / e[k]) for k in ("image", "label")}}

    labelled = tuple(entry(e) for e in datalist["training"])
    return Task(
        PHANTOM_TASK, UNIT_VOLUME, {str(k): v for k, v in datalist["labels"].items()}, labelled,
        tuple(entry(e) for e in datalist["validation"]),
        tuple({"image": e["image"], "subject": e["case"]} for e in labelled),
    )


def normalise(image: np.ndarray) -> np.ndarray:
    """The MRI preset's percentile scaling computed on the whole volume: ``[p_low, p_high] -> [0, 1]``, clipped."""
    low, high = np.percentile(image, (MRI_LOWER_PERCENTILE, MRI_UPPER_PERCENTILE))
    scaled = (image - low) / max(float(high - low), np.finfo(np.float32).eps)
    return np.clip(scaled, NORMALISED_MIN, NORMALISED_MAX).astype(np.float32)


def _load_canonical(entry: dict) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    image = nib.as_closest_canonical(nib.load(entry["image"]))
    label = nib.as_closest_canonical(nib.load(entry["label"]))
    if image.shape[:3] != label.shape[:3] or not np.allclose(image.affine, label.affine, atol=1e-3):
        raise ValueError(f"{entry['label']}: not on the grid of {entry['image']}")
    return image, label


def _write_pair(image: nib.Nifti1Image, label: nib.Nifti1Image, stem: Path, case: str) -> dict:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"image": stem.with_name(stem.name + "_image.nii.gz"), "label": stem.with_name(stem.name + "_label.nii.gz")}
    nib.save(image, paths["image"])
    nib.save(label, paths["label"])
    return {"case": case, **{k: str(v) for k, v in paths.items()}}


def split_subject(entry: dict, out_dir: str | os.PathLike) -> tuple[dict, dict]:
    """Split one labelled subject into two hemispheres (training | test), each intensity-normalised.

    The cut is at the middle of the labelled box along the left-right axis (:data:`SPLIT_AXIS` after
    reorientation to RAS), so both halves hold every bilateral structure.

    Args:
        entry: ``{"image", "label", "case"}`` with absolute paths.
        out_dir: where ``<case>_train_*.nii.gz`` and ``<case>_test_*.nii.gz`` are written (reused if present).

    Returns:
        ``(training half, test half)`` datalist entries.
    """
    out_dir = Path(out_dir)
    stems = {part: out_dir / f"{entry['case']}_{part}" for part in ("train", "test")}
    entries = {part: {"case": f"{entry['case']}_{part}", "image": str(s) + "_image.nii.gz",
                      "label": str(s) + "_label.nii.gz"} for part, s in stems.items()}
    if all(Path(e[k]).is_file() for e in entries.values() for k in ("image", "label")):
        return entries["train"], entries["test"]
    image, label = _load_canonical(entry)
    labels = np.asarray(label.dataobj).astype(np.uint8)
    along = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != SPLIT_AXIS)))
    if along.size < 2:
        raise ValueError(f"{entry['label']}: too few labelled voxels to split")
    cut = int(along[0] + along[-1] + 1) // 2
    normalised = nib.Nifti1Image(normalise(np.asarray(image.dataobj, dtype=np.float32)), image.affine)
    whole = nib.Nifti1Image(labels, label.affine)
    halves = {"train": slice(0, cut), "test": slice(cut, labels.shape[SPLIT_AXIS])}
    for part, cut_slice in halves.items():
        index = tuple(cut_slice if a == SPLIT_AXIS else slice(None) for a in range(3))
        _write_pair(normalised.slicer[index], whole.slicer[index], stems[part], entries[part]["case"])
    logger.info("split %s at voxel %d along axis %d into %s", entry["case"], cut, SPLIT_AXIS, out_dir)
    return entries["train"], entries["test"]


def crop_centres(label: np.ndarray, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` labelled voxels drawn with ``seed``, nested: the first ``k`` are the same for every ``count >= k``.

    Raises:
        ValueError: the label map has no foreground.
    """
    foreground = np.argwhere(label > 0)
    if not len(foreground):
        raise ValueError("no labelled voxel to centre a crop on")
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in foreground[rng.integers(len(foreground))]) for _ in range(count)]


def training_units(task: Task, k: int, seed: int, out_dir: str | os.PathLike, crop_mm: float) -> list[dict]:
    """The ``k`` labelled volumes or crops of one run; nested in ``k`` for a seed (k=2 holds k=1's unit).

    Args:
        task: the task.
        k: labelled volumes (volume tasks) or crops (crop tasks).
        seed: chooses which volumes (over any ``n`` consecutive seeds from a multiple of ``n``, each of the ``n``
            volumes comes first once), or where the crops lie.
        out_dir: where crops are written (``seed<seed>/crop<i>_*.nii.gz``, reused if present).
        crop_mm: side of a cubic crop in mm (crop tasks).

    Raises:
        ValueError: ``k`` < 1, or more volumes than the task has.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if task.unit == UNIT_VOLUME:
        if k > len(task.labelled):
            raise ValueError(f"task {task.name!r} has {len(task.labelled)} labelled volumes, k={k} asked")
        # seeds n*b .. n*b + n-1 share one shuffled order, each starting at another volume: over n seeds every
        # volume is the single labelled one once, and k=2 always holds k=1's volume
        n = len(task.labelled)
        order = np.roll(np.random.default_rng(seed // n).permutation(n), -(seed % n))
        return [task.labelled[i] for i in order[:k]]
    (region,) = task.labelled
    folder = Path(out_dir) / f"seed{seed}"
    stems = [folder / f"crop{i}" for i in range(k)]
    units = [{"case": f"{region['case']}_s{seed}_crop{i}", "image": str(s) + "_image.nii.gz",
              "label": str(s) + "_label.nii.gz"} for i, s in enumerate(stems)]
    if all(Path(u[key]).is_file() for u in units for key in ("image", "label")):
        return units
    image, label = _load_canonical(region)
    labels = np.asarray(label.dataobj)
    spacing = nib.affines.voxel_sizes(image.affine)
    side = [int(min(n, max(1, round(crop_mm / s)))) for n, s in zip(labels.shape, spacing, strict=True)]
    for unit, stem, centre in zip(units, stems, crop_centres(labels, k, seed), strict=True):
        start = [int(np.clip(c - w // 2, 0, n - w)) for c, w, n in zip(centre, side, labels.shape, strict=True)]
        index = tuple(slice(a, a + w) for a, w in zip(start, side, strict=True))
        _write_pair(image.slicer[index], label.slicer[index], stem, unit["case"])
    return units


def finetune_preset(task: Task, spacing_mm: float) -> PresetConfig:
    """The fine-tuning / test preprocessing: the task's preset at ``spacing_mm``.

    Images normalised when they were cut (crop tasks) get a fixed window instead of per-volume scaling.
    """
    preset = preset_for(task.modality, float(spacing_mm))
    if task.normalised:
        preset = dataclasses.replace(preset, scaling="window", a_min=NORMALISED_MIN, a_max=NORMALISED_MAX)
    return preset


def pretraining_preset(spacing_mm: float | None, modality: str = "mri") -> PresetConfig:
    """The pretraining preprocessing: the modality's preset at ``spacing_mm`` (``None``: the preset's own)."""
    return preset_for(modality, None if spacing_mm is None else float(spacing_mm))


def write_datalist(path: str | os.PathLike, splits: dict[str, Sequence[dict]], **fields) -> Path:
    """Write a Decathlon-style datalist ``{**fields, split: entries}`` and return its path."""
    return atomic_write_json(path, {**fields, **{k: list(v) for k, v in splits.items()}})
