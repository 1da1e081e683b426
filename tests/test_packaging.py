"""A built wheel carries every package, bundle and preset, and a non-editable install runs from anywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from medssl3d.data.phantoms import make_phantom, write_nifti

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: What a wheel is built from (the rest of the checkout is not packaged).
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "medssl3d", "bundles", "configs")
#: Bundle files that must ship (relative to bundles/).
BUNDLE_FILES = ("*/LICENSE", "*/configs/*.json", "*/configs/*.conf", "*/docs/*.md")


def _checkout_files() -> list[str]:
    """Tracked and not-ignored files under SOURCES (what a fresh clone with the work in progress holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SOURCES],
        capture_output=True, encoding="utf-8", cwd=ROOT, check=True,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (no build isolation: nothing is downloaded)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "src"
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(work / "dist"), str(source)],
        capture_output=True, encoding="utf-8", timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = (work / "dist").glob("medssl3d-*.whl")
    return built


def test_wheel_holds_every_package_bundle_file_and_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "medssl3d").rglob("__init__.py")]
    bundle_files = sorted({p.relative_to(ROOT).as_posix() for g in BUNDLE_FILES for p in (ROOT / "bundles").glob(g)})
    presets = [p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")]
    bundles = sorted(p.parent.parent.name for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
    assert {"segmentation", "swin_ssl", "alice", "afire", "dira", "ace"} <= set(bundles)
    assert all(any(f.startswith(f"bundles/{b}/configs/") for f in bundle_files) for b in bundles)
    missing = [f for f in (*packages, *(f"medssl3d/{f}" for f in (*bundle_files, *presets))) if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if "/smoke/" in n or "/runs/" in n or n.endswith(".pt")]


def test_wheel_installs_and_runs_a_dry_run_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, encoding="utf-8", check=True).stdout.strip())
    # the dependencies (torch, MONAI, ...) come from this environment; medssl3d only from the wheel
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, encoding="utf-8", timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    phantom = make_phantom(shape=(32, 32, 32), seed=0)
    write_nifti(phantom.image, phantom.affine, elsewhere / "scans" / "a.nii.gz")
    done = subprocess.run(
        [str(venv / "bin" / "medssl3d"), "pretrain", "swin_ssl", "--data", "scans", "--preset", "tiny", "--dry-run"],
        capture_output=True, encoding="utf-8", cwd=elsewhere, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    installed = site / "medssl3d"
    assert f"bundle:    {installed / 'bundles' / 'swin_ssl'}" in done.stdout  # the packaged bundle, not the checkout
    assert re.search(r'\n  backbone_size +"tiny"\n', done.stdout)  # the preset, read from the packaged configs/
    located = subprocess.run([str(python), "-c", "import medssl3d; print(medssl3d.__file__)"],
                             capture_output=True, encoding="utf-8", cwd=elsewhere, check=True).stdout.strip()
    assert Path(located).parent == installed
