"""A MONAI Label ``monaibundle`` app folder holding one fine-tuned bundle and, where it needs it, medssl3d's code.

Layout written under ``app_dir``::

    main.py, lib/ ...          MONAI Label's monaibundle sample app (copied from the environment)
    model/<name>/              the bundle (configs, models/model.pt, docs); /train rewrites its model.pt
    python/medssl3d/           the medssl3d package the bundle's configs import, pinned with the app; absent for
                               a bundle of MONAI components only (``medssl3d export-bundle``), which the
                               server runs without medssl3d
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import medssl3d
from medssl3d.bundle_support.resume import EPOCH_GLOB, FINAL_NAME
from medssl3d.bundle_support.weights import WeightsReport, check_bundle_weights
from medssl3d.data.errors import InputError
from medssl3d.serving.export_bundle import medssl3d_references

logger = logging.getLogger(__name__)

SAMPLE_APP = Path("monailabel") / "sample-apps" / "monaibundle"
MODEL_DIR = "model"
CODE_DIR = "python"
#: Run outputs of a bundle that do not belong in a served copy; the training run's full-state checkpoints among
#: them (MONAI Label's /train fine-tunes the served model.pt afresh instead of resuming the original run).
BUNDLE_IGNORE = ("smoke", "runs", "eval", "__pycache__", "*.pyc", FINAL_NAME, EPOCH_GLOB)


@dataclass(frozen=True)
class PreparedApp:
    """Where a prepared app lives and what it serves.

    Attributes:
        app_dir: the app folder.
        model_name: the model's name in MONAI Label.
        bundle_dir: the served copy of the bundle.
        python_path: the folder holding the app's medssl3d copy, for the server's ``PYTHONPATH``; ``None`` for a
            bundle of MONAI components only.
        weights: ``models/model.pt`` against the bundle's network.
    """

    app_dir: Path
    model_name: str
    bundle_dir: Path
    python_path: Path | None
    weights: WeightsReport


def prepare_app(
    bundle: str | os.PathLike, app_dir: str | os.PathLike, env_root: str | os.PathLike, model_name: str | None = None
) -> PreparedApp:
    """Check the bundle's weights, then write the app folder (replacing an older copy of the same bundle).

    medssl3d's code is copied into the app only when the bundle's configs import it
    (:func:`~medssl3d.serving.export_bundle.medssl3d_references`).

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
    references = medssl3d_references(bundle)
    if not references:
        logger.info("%s: MONAI components only; served without medssl3d", bundle)
        return PreparedApp(app_dir=app, model_name=name, bundle_dir=served, python_path=None, weights=weights)
    logger.info("%s imports medssl3d (%s): copying it onto the server's PYTHONPATH", bundle, references[0])
    shutil.copytree(Path(medssl3d.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return PreparedApp(app_dir=app, model_name=name, bundle_dir=served, python_path=app / CODE_DIR, weights=weights)
