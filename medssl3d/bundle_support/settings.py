"""Write settings into a bundle's own config files, so the bundle describes the network it ships.

A fine-tuned bundle is used by tools that read only its files (MONAI Label reads ``inference.json`` and
``train.json``, with no overlay), so settings a run passed as overrides (``feature_size``, ``roi_size``,
``modality``, ``spacing_mm``...) must be written into the files next to ``models/model.pt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The config files that define the network, its preprocessing and its training.
DEFINING_CONFIGS = ("train.json", "inference.json", "evaluate.json")
ID_SEPARATOR = "#"


def _set_if_defined(config: dict, path: list[str], value: Any) -> bool:
    node = config
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    if not isinstance(node, dict) or path[-1] not in node:
        return False
    node[path[-1]] = value
    return True


def bake_settings(
    bundle: str | os.PathLike, values: Mapping[str, Any], configs: Iterable[str] = DEFINING_CONFIGS
) -> dict[str, list[str]]:
    """Set config ids (``"feature_size"``, ``"train#trainer#max_epochs"``) in every file that defines them.

    Args:
        bundle: the bundle folder (its ``configs/`` is rewritten in place).
        values: id → JSON value.
        configs: the config file names to update (missing files are skipped).

    Returns:
        File name → the ids set in it.

    Raises:
        ValueError: an id that no file defines (a typo would otherwise be ignored), or a value that is
            not JSON.
    """
    folder = Path(bundle) / "configs"
    written: dict[str, list[str]] = {}
    used: set[str] = set()
    for name in configs:
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        done = [key for key, value in values.items() if _set_if_defined(config, key.split(ID_SEPARATOR), value)]
        if done:
            try:
                text = json.dumps(config, indent=4)
            except TypeError as e:
                raise ValueError(f"bundle settings must be JSON values: {e}") from e
            path.write_text(text + "\n")
            written[name] = done
            used.update(done)
    unknown = sorted(set(values) - used)
    if unknown:
        raise ValueError(f"ids {unknown} are defined in none of {list(configs)} under {folder}")
    return written
