"""Build a Decathlon-style datalist from a folder tree: any tree of images, or an nnU-Net dataset folder.

:func:`scan_folder_report` walks the folder (:mod:`medssl3d.data.nnunet` reads the nnU-Net / Decathlon
layout), pairs images with label maps, reports the label maps that belong to no image, and splits the
labelled cases into training and validation (:func:`split_cases`). The datalist format itself, and its
writing and loading, live in :mod:`medssl3d.data.datalist`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from medssl3d.data.datalist import IMAGE_KEY, LABEL_KEY, SERIES_UID_KEY, SPLITS, SUBJECT_KEY
from medssl3d.data.errors import InputError
from medssl3d.data.nnunet import MAX_LISTED, is_nnunet_root, scan_nnunet

logger = logging.getLogger(__name__)

#: File name endings read as volumes (longest first so ".nii.gz" wins over ".gz"-less ".nii").
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Preferred ending when looking for a label beside an image (then the image's own, then the rest).
DEFAULT_LABEL_EXT = ".nii.gz"
#: Stem endings of label maps stored beside their images (``case_seg.nii.gz`` for ``case.nii.gz``).
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_segmentation", "_gt")
#: Sibling folder pairs (image folder -> label folder) for the Decathlon / "images + labels" layouts.
LABEL_FOLDER_PAIRS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels"))
#: Images under a folder of this name are held-out test cases (the ``test`` split, never pretrained on).
TEST_FOLDERS = ("imagesTs",)
#: A DICOM Part 10 file has a 128-byte preamble followed by these four bytes.
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128


def _volume_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def _find_label(
    image: Path, stem: str, ext: str, label_suffixes: Sequence[str], label_folders: Sequence
) -> Path | None:
    """The label of ``image``: ``<stem><suffix><ext>`` beside it (suffixes in order), else in a label folder."""
    for suffix in label_suffixes:
        for cand_ext in dict.fromkeys((DEFAULT_LABEL_EXT, ext, *VOLUME_SUFFIXES)):
            cand = image.with_name(f"{stem}{suffix}{cand_ext}")
            if cand.is_file():
                return cand
    for image_dir, label_dir in label_folders:
        if image.parent.name == image_dir:
            cand = image.parent.parent / label_dir / image.name
            if cand.is_file():
                return cand
    return None


def _dicom_series(folder: Path) -> tuple[str, ...]:
    # GDCM groups the files of a folder by SeriesInstanceUID; sort so the datalist is reproducible.
    return tuple(sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))))


def _case_key(case: Mapping) -> tuple[str, str]:
    return case[IMAGE_KEY], case.get(SERIES_UID_KEY, "")


def _split_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_cases(cases: Sequence[dict], *, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split cases into training and validation, deterministically by ``seed``.

    Each case gets a rank from a hash of (seed, image path, series UID), and the ``round(val_fraction * n)``
    lowest ranks go to validation (at least one and at most ``n - 1`` when ``val_fraction > 0`` and
    ``n >= 2``). The split therefore depends neither on the order of ``cases`` nor on the file system,
    and adding a case moves at most one existing case from validation to training.

    Args:
        cases: datalist entries with an ``"image"`` key.
        val_fraction: fraction of cases for validation, in ``[0, 1)``.
        seed: any integer; a different seed gives a different split.

    Returns:
        ``(training, validation)``, each sorted by image path.

    Raises:
        ValueError: if ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(cases)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(cases, key=lambda c: _split_rank(seed, "|".join(_case_key(c))))
    return sorted(ranked[n_val:], key=_case_key), sorted(ranked[:n_val], key=_case_key)


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_folder_report` found: the datalist, and what a user should know about it.

    Args:
        datalist: the Decathlon-style datalist (what :func:`scan_folder` returns).
        unmatched_labels: label files that belong to no image (paths as the datalist writes them).
        notes: facts about the listing worth reading (e.g. the one channel listed of a multi-channel dataset).
    """

    datalist: dict
    unmatched_labels: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """Case counts per split, then the classes, the notes and the unmatched label files, one per line."""
        lines = [", ".join(f"{len(self.datalist[s])} {s}" for s in SPLITS if s in self.datalist)]
        labels = self.datalist.get("labels")
        if labels:
            lines.append("classes: " + ", ".join(f"{v} {n}" for v, n in labels.items()))
        lines += self.notes
        if self.unmatched_labels:
            shown = self.unmatched_labels[:MAX_LISTED]
            more = len(self.unmatched_labels) - len(shown)
            lines.append(
                f"{len(self.unmatched_labels)} label file(s) match no image: {', '.join(shown)}"
                + (f" and {more} more" if more else "")
            )
        return "\n".join(lines)


def _strip_volume_suffix(path: str) -> str:
    ext = _volume_suffix(path)
    return path[: -len(ext)] if ext else path


def _subjects(found: Sequence[tuple[str, str]]) -> list[str]:
    """The subject of each ``(name, image path)``: the name where no other image has it, else the path."""
    images_by_name: dict[str, set[str]] = {}
    for name, image in found:
        images_by_name.setdefault(name, set()).add(image)
    return [name if len(images_by_name[name]) == 1 else _strip_volume_suffix(image) for name, image in found]


def _assemble(
    name: str,
    modality: dict,
    labels: dict,
    cases: Sequence[tuple[str, dict]],
    *,
    val_fraction: float,
    seed: int,
    unmatched: Sequence[str],
    notes: Sequence[str],
) -> FolderScan:
    """The datalist of ``(kind, entry)`` cases, kind ``"labelled"``, ``"unlabeled"`` or ``"test"``."""
    by_kind: dict[str, list[dict]] = {"labelled": [], "unlabeled": [], "test": []}
    for kind, entry in cases:
        by_kind[kind].append(entry)
    training, validation = split_cases(by_kind["labelled"], val_fraction=val_fraction, seed=seed)
    datalist = {"name": name, "modality": modality, **({"labels": labels} if labels else {})}
    datalist.update(
        training=training,
        validation=validation,
        unlabeled=sorted(by_kind["unlabeled"], key=_case_key),
        test=sorted(by_kind["test"], key=_case_key),
    )
    return FolderScan(datalist, tuple(unmatched), tuple(notes))


def scan_folder_report(
    root: str | os.PathLike,
    *,
    label_suffixes: str | Sequence[str] = LABEL_SUFFIXES,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_folders: Sequence[tuple[str, str]] = LABEL_FOLDER_PAIRS,
    relative_to: str | os.PathLike | None = None,
    name: str | None = None,
    modality: str = "unknown",
    channel: int = 0,
) -> FolderScan:
    """Walk a folder tree and build a Decathlon-style datalist of every case in it.

    An nnU-Net or Decathlon dataset folder (``imagesTr/`` and its ``dataset.json``; see
    :mod:`medssl3d.data.nnunet`) is read as that layout: cases by their ``_XXXX`` channel files (the
    ``channel`` file listed), ``labelsTr/<case>``, ``imagesTs/`` as the ``test`` split, and the
    dataset's ``labels`` (as class value -> name), ``channel_names`` / ``modality`` and ``name``.
    Any other folder is walked as follows.

    What counts as a case:
        * a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file;
        * a DICOM series: a folder holding DICOM files (found by the ``DICM`` magic at byte 128), grouped
          into series by SimpleITK/GDCM. A folder with one series gives one entry ``{"image": folder}``;
          a folder with several gives one entry per series, each with its ``"series_uid"``.

    How labels are found (first match wins):
        1. ``<stem><suffix>.<ext>`` beside the image, for each of ``label_suffixes`` in order (default
           ``case_seg.nii.gz`` for ``case.nii.gz``, and ``patient7_seg.nii.gz`` beside the DICOM folder
           ``patient7/``);
        2. a file with the image's own name in a sibling label folder: ``images/x.nii.gz`` ->
           ``labels/x.nii.gz``, ``imagesTr/x.nii.gz`` -> ``labelsTr/x.nii.gz`` (``label_folders``).

        Files whose stem ends in a label suffix and everything under a label folder are label maps,
        never images; those that belong to no image are returned in ``unmatched_labels`` and logged.
        A folder holding several DICOM series gets no label (which series it would belong to is
        ambiguous); its entries are unlabeled.

    Where cases go:
        Images under an ``imagesTs`` folder go to ``"test"`` (held out: pretraining never reads them).
        Other labelled cases are split into ``"training"`` and ``"validation"`` by :func:`split_cases`
        (deterministic for a given ``seed``); cases without a label go to ``"unlabeled"``, so every
        ``"training"`` / ``"validation"`` entry has a ``"label"``. Every entry has a ``"subject"``: the
        file (or DICOM folder) name without ending, or, where several cases share that name, the path
        without ending.

    Args:
        root: the folder to scan (recursively; hidden files and folders are skipped).
        label_suffixes: suffix(es) of a label's stem, e.g. ``"_seg"`` or ``("_seg", "_label")``.
        val_fraction: fraction of labelled cases for validation, in ``[0, 1)``.
        seed: seed of the train/validation split.
        label_folders: ``(image_folder_name, label_folder_name)`` pairs for rule 2; empty to disable it.
        relative_to: folder the paths are written relative to; defaults to ``root``, i.e. the datalist
            is meant to be written as ``root/dataset.json``. Paths use ``/`` on every platform.
        name: the datalist's ``"name"``; defaults to the dataset's name or the folder name of ``root``.
        modality: stored as ``{"0": modality}`` (Decathlon's per-channel modality map) unless an nnU-Net
            dataset.json names its channels.
        channel: nnU-Net layout: the channel file (``_XXXX``) listed for each case.

    Returns:
        The datalist ``{"name", "modality", ["labels",] "training", "validation", "unlabeled", "test"}``
        (each list sorted by path), the unmatched label files and notes.

    Raises:
        InputError: if ``root`` is not a folder or holds no readable case, or its dataset.json is bad.
        DatalistError: nnU-Net layout: files without a channel suffix or cases without ``channel``, all listed.
        ValueError: if ``val_fraction`` is outside ``[0, 1)`` or a label suffix is empty.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    label_suffixes = (label_suffixes,) if isinstance(label_suffixes, str) else tuple(label_suffixes)
    if not label_suffixes or not all(label_suffixes):
        raise ValueError(f"label_suffixes must be non-empty strings, got {label_suffixes!r}")
    base = Path(relative_to).expanduser().resolve() if relative_to is not None else root

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, base)).as_posix()

    options = {"name": name, "modality": modality, "val_fraction": val_fraction, "seed": seed}
    if is_nnunet_root(root):
        result = _scan_nnunet_folder(root, rel, channel=channel, **options)
    else:
        result = _scan_tree(root, rel, label_suffixes, label_folders, **options)
    counts = ", ".join(f"{len(v)} {k}" for k, v in result.datalist.items() if k in SPLITS)
    logger.info("%s: %s", root, counts)
    return result


def _scan_nnunet_folder(
    root: Path,
    rel: Callable[[Path], str],
    *,
    channel: int,
    name: str | None,
    modality: str,
    val_fraction: float,
    seed: int,
) -> FolderScan:
    """:func:`scan_folder_report` for an nnU-Net / Decathlon dataset folder."""
    scan = scan_nnunet(root, channel=channel, modality=modality)
    cases = []
    for case in scan.cases:
        entry = {IMAGE_KEY: rel(case.image), SUBJECT_KEY: case.subject}
        if case.label is not None:
            entry[LABEL_KEY] = rel(case.label)
        kind = "test" if case.split == "test" else "labelled" if case.label is not None else "unlabeled"
        cases.append((kind, entry))
    return _assemble(
        name if name is not None else scan.name,
        scan.modality,
        scan.labels,
        cases,
        val_fraction=val_fraction,
        seed=seed,
        unmatched=[rel(p) for p in scan.unmatched_labels],
        notes=scan.notes,
    )


def _scan_tree(
    root: Path,
    rel: Callable[[Path], str],
    label_suffixes: tuple[str, ...],
    label_folders: Sequence[tuple[str, str]],
    *,
    name: str | None,
    modality: str,
    val_fraction: float,
    seed: int,
) -> FolderScan:
    """:func:`scan_folder_report` for any folder that is not an nnU-Net dataset."""
    label_dir_names = {label_dir for _, label_dir in label_folders}
    found: list[tuple[str, str, dict]] = []  # (kind, name, entry)
    label_files: set[Path] = set()
    matched: set[Path] = set()

    def add(image: Path, case_name: str, label: Path | None, **extra) -> None:
        entry = {IMAGE_KEY: rel(image), **extra}
        if label is not None:
            matched.add(label)
            entry[LABEL_KEY] = rel(label)
        held_out = not set(TEST_FOLDERS).isdisjoint(image.relative_to(root).parts[:-1])
        found.append(("test" if held_out else "labelled" if label is not None else "unlabeled", case_name, entry))

    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk visit folders in a reproducible order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        in_label_folder = not label_dir_names.isdisjoint(folder.relative_to(root).parts)
        has_dicom = False
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            ext = _volume_suffix(fname)
            if ext is None:
                has_dicom = has_dicom or (not in_label_folder and _is_dicom_file(folder / fname))
                continue
            stem = fname[: -len(ext)]
            if in_label_folder or stem.endswith(label_suffixes):
                label_files.add(folder / fname)
                continue
            add(folder / fname, stem, _find_label(folder / fname, stem, ext, label_suffixes, label_folders))
        if not has_dicom:
            continue
        series = _dicom_series(folder)
        if not series:
            logger.warning("%s: holds DICOM files but no image series; skipped", folder)
        elif len(series) == 1:
            label = None if folder == root else _find_label(folder, folder.name, "", label_suffixes, ())
            add(folder, folder.name, label)
        else:
            for uid in series:
                add(folder, folder.name, None, **{SERIES_UID_KEY: uid})

    if not found:
        raise InputError(root, f"no images found (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM series)")
    unmatched = sorted(rel(p) for p in label_files - matched)
    notes = []
    if unmatched:
        logger.warning("%s: %d label file(s) match no image: %s", root, len(unmatched), ", ".join(unmatched))
        if (root / "imagesTr").is_dir():
            notes.append("an nnU-Net folder needs its dataset.json to pair imagesTr/<case>_0000 with labelsTr/<case>")
            logger.warning("%s: %s", root, notes[-1])
    subjects = _subjects([(case_name, entry[IMAGE_KEY]) for _, case_name, entry in found])
    cases = [(kind, {**entry, SUBJECT_KEY: s}) for (kind, _, entry), s in zip(found, subjects, strict=True)]
    return _assemble(
        name if name is not None else root.name,
        {"0": modality},
        {},
        cases,
        val_fraction=val_fraction,
        seed=seed,
        unmatched=unmatched,
        notes=notes,
    )


def scan_folder(root: str | os.PathLike, **options) -> dict:
    """The datalist of :func:`scan_folder_report` (same arguments), without the report.

    Returns:
        ``{"name", "modality", ["labels",] "training", "validation", "unlabeled", "test"}``.
    """
    return scan_folder_report(root, **options).datalist
