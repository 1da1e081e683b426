"""The data a job reads: a datalist JSON as given, or one built from a folder (nnU-Net raw datasets included)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

#: Where a job writes the datalist it builds from a folder, inside its output folder.
DATALIST_NAME = "datalist.json"


def datalist_for(
    data: str | os.PathLike, out_dir: str | os.PathLike, *, modality: str | None = None, write: bool = True
) -> Path:
    """The datalist a bundle should read for ``data``.

    A ``.json`` file is taken as a Decathlon-style datalist (the bundle checks its entries). A folder is
    scanned with :func:`medssl3d.data.folder_scan.scan_folder` (NIfTI/NRRD/MHA files, DICOM series, labels
    beside images or in ``labels*`` folders; an nnU-Net raw dataset by its layout) into
    ``<out_dir>/datalist.json``, paths relative to that file.

    Args:
        data: a datalist JSON or a folder.
        out_dir: the job's output folder.
        modality: written into a scanned datalist's ``modality`` (``None``: ``"unknown"``).
        write: write the scanned datalist (``False`` for a dry run: the folder is still scanned and checked).

    Returns:
        The JSON file to pass as the bundle's ``datalist``.

    Raises:
        InputError: ``data`` does not exist, is a file other than ``.json``, or a folder without scans.
    """
    from medssl3d.data.datalist import write_datalist
    from medssl3d.data.folder_scan import scan_folder

    source = Path(data).expanduser().resolve()
    if source.is_file():
        if source.suffix.lower() != ".json":
            raise InputError(source, "not a datalist .json, a folder of scans or an nnU-Net dataset folder")
        return source
    if not source.exists():
        raise InputError(source, "not found")
    target = Path(out_dir).expanduser().resolve() / DATALIST_NAME
    datalist = scan_folder(source, relative_to=target.parent, modality=modality or "unknown")
    if write:
        write_datalist(datalist, target)
        logger.info("wrote %s from %s", target, source)
    return target
