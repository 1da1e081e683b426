"""Run a bundle's configs in this process, as ``python -m monai.bundle run`` would, with overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def run_workflow(
    bundle: str | os.PathLike, configs: Sequence[str], workflow_type: str, overrides: Mapping[str, Any],
    *, apply_logging: bool = False,
) -> list[Any]:
    """Initialise, run and finalise ``configs`` of ``bundle`` (``configs/<name>.json``) with ``overrides``.

    Args:
        bundle: the bundle folder.
        configs: config names, later ones overriding earlier ones (e.g. ``["train", "evaluate"]``).
        workflow_type: ``"train"`` or ``"infer"``.
        overrides: ``{bundle id: value}``.
        apply_logging: apply the bundle's ``logging.conf`` (it sends INFO to stdout); off, the caller's logging
            set-up stays as it is.

    Returns:
        The results of the ``run`` section.
    """
    from monai.bundle import ConfigWorkflow

    bundle = Path(bundle)
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f"{name}.json") for name in configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf") if apply_logging else False,
        workflow_type=workflow_type,
        **{"bundle_root": str(bundle), **overrides},
    )
    workflow.initialize()
    results = workflow.run()
    workflow.finalize()
    return results
