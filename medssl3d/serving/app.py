"""A MONAI Label ``monaibundle`` app folder holding one fine-tuned bundle and the medssl3d code it imports.

Layout written under ``app_dir``::

    main.py, lib/ ...          MONAI Label's monaibundle sample app (copied from the environment)
    model/<name>/              the bundle (configs, models/model.pt, docs); /train rewrites its model.pt
    python/medssl3d/           the medssl3d package the bundle's configs import, pinned with the app
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import medssl3d
from medssl3d.bundle_support.weights import WeightsReport, check_bundle_weights
from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

SAMPLE_APP = Path("monailabel") / "sample-apps" / "monaibundle"
MODEL_DIR = "model"
CODE_DIR = "python"
#: Run outputs of a bundle that do not belong in a served copy.
BUNDLE_IGNORE = ("smoke", "runs", "eval", "__pycache__", "*.pyc")


@dataclass(frozen=True)
class PreparedApp:
    """Where a prepared app lives and what it serves."""

    app_dir: Path
    model_name: str
    bundle_dir: Path
    python_path: Path
    weights: WeightsReport


def prepare_app(
    bundle: str | os.PathLike, app_dir: str | os.PathLike, env_root: str | os.PathLike, model_name: str | None = None
) -> PreparedApp:
    """Check the bundle's weights, then write the app folder (replacing an older copy of the same bundle).

    Args:
        bundle: a fine-tuned segmentation bundle (``configs/``, ``models/model.pt``).
        app_dir: the app folder to write.
        env_root: the MONAI Label environment (see :mod:`medssl3d.serving.environment`), source of the app.
        model_name: the name the server gives the model (default: the bundle folder's name).

    Returns:
        The prepared app.

    Raises:
        InputError: the bundle is not a folder with ``configs/inference.json``, or its ``model.pt`` does
            not match its network (with the count of matched tensors).
        FileNotFoundError: the environment has no monaibundle sample app.
    """
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "inference.json").is_file():
        raise InputError(bundle, "not a bundle folder with configs/inference.json")
    weights = check_bundle_weights(bundle)
    logger.info("%s: models/model.pt %s", bundle, weights.summary())
    source = Path(env_root) / SAMPLE_APP
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: the MONAI Label environment has no monaibundle sample app")
    name = model_name or bundle.name
    app = Path(app_dir).resolve()
    shutil.copytree(source, app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    served = app / MODEL_DIR / name
    if served.exists():
        shutil.rmtree(served)
    shutil.copytree(bundle, served, ignore=shutil.ignore_patterns(*BUNDLE_IGNORE))
    code = app / CODE_DIR / "medssl3d"
    if code.exists():
        shutil.rmtree(code)
    shutil.copytree(Path(medssl3d.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return PreparedApp(app_dir=app, model_name=name, bundle_dir=served, python_path=app / CODE_DIR, weights=weights)
