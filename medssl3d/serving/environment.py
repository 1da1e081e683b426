"""The MONAI Label 0.8.5 environment: its own virtual environment, built once and cached.

MONAI Label pins what the toolkit's environment cannot share (numpy < 2, ``pydicom < 3``, a
torchvision of the same build as torch), so it lives in a separate venv. PyPI's torchvision 0.28.0
only works against PyPI's own torch 2.13.0 build (against a local CPU wheel it fails with
``torchvision::nms does not exist``), so the install ignores pip configuration that points at
local wheels. medssl3d itself is not installed there: the server gets it on ``PYTHONPATH``, so one
cached environment serves every checkout.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from medssl3d.data.sample import atomic_write_json, sample_cache_dir

logger = logging.getLogger(__name__)

MONAILABEL_VERSION = "0.8.5"
ENV_VAR = "MEDSSL3D_LABEL_VENV"
#: Installed first, alone: the torch / torchvision pair and the build tools that sam2's sdist
#: (a MONAI Label dependency) needs without build isolation, which would fetch another torch.
BASE_REQUIREMENTS = ("torch==2.13.0", "torchvision==0.28.0", "numpy<2", "setuptools", "wheel")
#: MONAI Label with the pins that work beside monai 1.6.1, and what the bundle's own code imports.
LABEL_REQUIREMENTS = (
    f"monailabel=={MONAILABEL_VERSION}",
    "monai==1.6.1",
    "pydicom<3",
    "dicomweb-client<0.60",
    "pynetdicom<3",
    "nibabel",
    "SimpleITK",
    "einops",
    "omegaconf",
    "pytorch-ignite",
    "tqdm",
)
MARKER = "medssl3d-environment.json"
#: pip settings that would steer the install to local wheels or mirrors instead of PyPI.
_PIP_STEERING = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT")
_CHECK = (
    "import monailabel, monai, torch, torchvision; print(monailabel.__version__, monai.__version__, torch.__version__)"
)


def default_venv() -> Path:
    """``$MEDSSL3D_LABEL_VENV``, else ``<sample-data cache>/monailabel-0.8.5``."""
    return Path(os.environ.get(ENV_VAR) or sample_cache_dir() / f"monailabel-{MONAILABEL_VERSION}").expanduser()


def venv_python(root: Path) -> Path:
    """The interpreter of the virtual environment at ``root``."""
    return root / "bin" / "python"


def monailabel_command(root: Path) -> Path:
    """The ``monailabel`` console script of the environment at ``root``."""
    return root / "bin" / "monailabel"


def _requirements() -> list[str]:
    return [*BASE_REQUIREMENTS, *LABEL_REQUIREMENTS]


def is_ready(root: Path) -> bool:
    """True when ``root`` holds a finished environment built for the current requirement list."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirements") == _requirements() and venv_python(root).exists()


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PIP_STEERING}
    # No pip configuration file either: a site's find-links / extra-index-url would bring the local CPU torch.
    env["PIP_CONFIG_FILE"] = os.devnull
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def _pip(root: Path, args: list[str], log) -> None:
    cmd = [str(venv_python(root)), "-m", "pip", "install", "--no-cache-dir", "--progress-bar", "off", *args]
    logger.info("%s", " ".join(cmd))
    result = subprocess.run(cmd, env=_pip_env(), stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip failed with exit status {result.returncode}; see {log.name}")


def ensure_environment(root: str | os.PathLike | None = None, *, rebuild: bool = False) -> Path:
    """Build the MONAI Label environment at ``root`` unless a finished one is there.

    Building downloads about 7.5 GB from PyPI (PyPI's torch 2.13.0 with its CUDA libraries; it runs
    on a CPU too) and takes a few minutes on a fast link. Concurrent callers wait on a lock, and the
    environment only counts as built once its imports work (a marker file is then written), so an
    interrupted build is redone, not used.

    Args:
        root: the environment folder (default :func:`default_venv`).
        rebuild: delete and rebuild even a finished environment.

    Returns:
        ``root``.

    Raises:
        RuntimeError: pip or the import check failed (the message names the log file).
    """
    root = Path(root).expanduser() if root else default_venv()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(root) and not rebuild:
            return root
        if root.exists():
            shutil.rmtree(root)
        logger.info("building the MONAI Label %s environment in %s (about 7.5 GB, once)", MONAILABEL_VERSION, root)
        venv.EnvBuilder(with_pip=True).create(root)
        log_path = root / "install.log"
        with open(log_path, "w") as log:
            _pip(root, list(BASE_REQUIREMENTS), log)
            _pip(root, ["--no-build-isolation", *BASE_REQUIREMENTS[:2], *LABEL_REQUIREMENTS], log)
        check = subprocess.run([str(venv_python(root)), "-c", _CHECK], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"the MONAI Label environment in {root} does not import: {check.stderr.strip()[-2000:]}")
        versions = check.stdout.split()
        atomic_write_json(
            root / MARKER,
            {"requirements": _requirements(), "monailabel": versions[0], "monai": versions[1], "torch": versions[2],
             "python": sys.version.split()[0]},
        )
        logger.info("MONAI Label environment ready: %s", " ".join(versions))
    return root
