"""The MONAI Label 0.8.5 environment: its own virtual environment, built once and cached.

MONAI Label pins what the toolkit's environment cannot share (numpy < 2, ``pydicom < 3``, a
torchvision of the same build as torch), so it lives in a separate venv. PyPI's torchvision 0.28.0
only works against PyPI's own torch 2.13.0 build (against a local CPU wheel it fails with
``torchvision::nms does not exist``), so the install steers around a local CPU build of torch: it keeps
the user's pip settings (index and mirror URLs, trusted hosts, certificates, proxies) and drops only the
``find-links`` entries that hold a CPU torch wheel (:func:`install_environment`). medssl3d itself is not
installed there: the server gets it on ``PYTHONPATH`` where a bundle imports it, so one cached environment
serves every checkout.
"""

from __future__ import annotations

import ast
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import venv
from collections.abc import Callable, Mapping, Sequence
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
#: The two ``pip install`` runs of the environment, in order.
LABEL_INSTALLS = (BASE_REQUIREMENTS, ("--no-build-isolation", *BASE_REQUIREMENTS[:2], *LABEL_REQUIREMENTS))
MARKER = "medssl3d-environment.json"
#: A CPU build of torch, e.g. ``torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl``.
CPU_TORCH_WHEEL = re.compile(r"^torch-[^-]+\+cpu[^-]*-.+\.whl$")
#: The sections of pip's configuration that ``pip install`` reads, each overriding the ones before it.
PIP_SECTIONS = ("global", "install", ":env:")
_LABEL_CHECK = (
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


def holds_local_cpu_torch(link: str) -> bool:
    """True when a pip ``find-links`` entry is a local CPU torch wheel or a local folder holding one.

    Remote pages (``https://...``) are the user's mirrors and never count.
    """
    parsed = urllib.parse.urlparse(link)
    if parsed.scheme not in ("", "file"):
        return False
    path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else link)
    if path.is_dir():
        return any(CPU_TORCH_WHEEL.match(p.name) for p in path.iterdir())
    return CPU_TORCH_WHEEL.match(path.name) is not None


def parse_pip_config(listing: str) -> dict[str, str]:
    """The settings ``pip install`` uses, from the output of ``pip config list``.

    Args:
        listing: lines ``<section>.<name>=<Python repr of the value>``, e.g. ``global.index-url='https://...'``
            or ``:env:.find-links='/opt/wheels'`` (a ``PIP_*`` variable).

    Returns:
        Setting name -> value, ``:env:`` over ``install`` over ``global`` (other sections are other commands').
    """
    sections: dict[str, dict[str, str]] = {section: {} for section in PIP_SECTIONS}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in sections:
            sections[section][name] = str(ast.literal_eval(value))
    return {name: value for section in PIP_SECTIONS for name, value in sections[section].items()}


def install_environment(
    environ: Mapping[str, str], pip_settings: Mapping[str, str], drop_link: Callable[[str], bool]
) -> dict[str, str]:
    """The process environment of the environment's ``pip install``: the user's pip settings, minus some links.

    Every setting of ``pip_settings`` (index-url, extra-index-url, trusted-host, cert, proxy, constraint...)
    becomes its ``PIP_*`` variable, except ``find-links`` entries for which ``drop_link`` is true; pip's
    configuration files are then not read again (``PIP_CONFIG_FILE`` is the null device), so a dropped link
    cannot come back from them.

    Args:
        environ: the current environment; its ``PIP_*`` variables are replaced by ``pip_settings``.
        pip_settings: the effective settings (:func:`parse_pip_config`; they include the ``PIP_*`` variables).
        drop_link: which ``find-links`` entries to drop (:func:`holds_local_cpu_torch`).

    Returns:
        The environment for ``subprocess``.
    """
    env = {k: v for k, v in environ.items() if not k.startswith("PIP_")}
    for name, value in pip_settings.items():
        if name == "config-file":
            continue
        if name == "find-links":
            value = " ".join(link for link in value.split() if not drop_link(link))
            if not value:
                continue
        env["PIP_" + name.upper().replace("-", "_")] = value
    env["PIP_CONFIG_FILE"] = os.devnull
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def pip_settings(python: str | os.PathLike) -> dict[str, str]:
    """The pip settings the interpreter ``python`` sees (``python -m pip config list``, parsed).

    Raises:
        RuntimeError: pip cannot list its configuration.
    """
    result = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{python} -m pip config list failed: {result.stderr.strip()[-2000:]}")
    return parse_pip_config(result.stdout)


def is_ready(root: Path, installs: Sequence[Sequence[str]] = LABEL_INSTALLS) -> bool:
    """True when ``root`` holds a finished environment built by ``installs``."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("installs") == [list(i) for i in installs] and venv_python(root).exists()


def ensure_venv(
    root: str | os.PathLike,
    installs: Sequence[Sequence[str]],
    *,
    check: str,
    steer_pip: Callable[[Path], Mapping[str, str]] | None = None,
    rebuild: bool = False,
) -> Path:
    """Build a virtual environment at ``root`` by ``pip install`` runs, unless a finished one is there.

    Concurrent callers wait on a lock beside ``root``; the environment only counts as built once ``check``
    runs in it (a marker file then records ``installs`` and what ``check`` printed), so an interrupted or
    outdated build is redone, not used.

    Args:
        root: the environment folder.
        installs: the arguments of each ``pip install`` run, in order.
        check: Python code that must run in the finished environment (e.g. its imports).
        steer_pip: the environment for pip, given the new environment's root; ``None``: this process's own
            (the user's pip configuration as it is).
        rebuild: delete and rebuild even a finished environment.

    Returns:
        ``root``.

    Raises:
        RuntimeError: pip or ``check`` failed (the message names the install log).
    """
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(root, installs) and not rebuild:
            return root
        if root.exists():
            shutil.rmtree(root)
        venv.EnvBuilder(with_pip=True).create(root)
        env = dict(steer_pip(root)) if steer_pip else None
        log_path = root / "install.log"
        with open(log_path, "w") as log:
            for args in installs:
                cmd = [str(venv_python(root)), "-m", "pip", "install", "--no-cache-dir", "--progress-bar", "off",
                       *args]
                logger.info("%s", " ".join(cmd))
                result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"pip failed with exit status {result.returncode}; see {log_path}")
        done = subprocess.run([str(venv_python(root)), "-c", check], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the environment in {root} does not work: {done.stderr.strip()[-2000:]}")
        atomic_write_json(
            root / MARKER,
            {"installs": [list(i) for i in installs], "check": done.stdout.strip(), "python": sys.version.split()[0]},
        )
    return root


def _steer_around_local_cpu_torch(root: Path) -> dict[str, str]:
    return install_environment(os.environ, pip_settings(venv_python(root)), holds_local_cpu_torch)


def ensure_environment(root: str | os.PathLike | None = None, *, rebuild: bool = False) -> Path:
    """Build the MONAI Label environment at ``root`` unless a finished one is there.

    Building downloads about 7.5 GB (PyPI's torch 2.13.0 with its CUDA libraries; it runs on a CPU too),
    from PyPI or the user's configured index / mirrors, and takes a few minutes on a fast link; see
    :func:`ensure_venv` for the lock and the marker.

    Args:
        root: the environment folder (default :func:`default_venv`).
        rebuild: delete and rebuild even a finished environment.

    Returns:
        ``root``.

    Raises:
        RuntimeError: pip or the import check failed (the message names the log file).
    """
    root = Path(root).expanduser() if root else default_venv()
    if not is_ready(root) or rebuild:
        logger.info("building the MONAI Label %s environment in %s (about 7.5 GB, once)", MONAILABEL_VERSION, root)
    ensure_venv(root, LABEL_INSTALLS, check=_LABEL_CHECK, steer_pip=_steer_around_local_cpu_torch, rebuild=rebuild)
    logger.info("MONAI Label environment ready: %s", json.loads((root / MARKER).read_text())["check"])
    return root
