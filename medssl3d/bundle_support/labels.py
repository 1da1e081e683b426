"""The label names of a segmentation bundle, read from its ``metadata.json`` (the one place that defines them).

Configs read them through this function rather than ``@_meta_#...``: MONAI Label parses ``inference.json``
and ``train.json`` without the metadata, so a ``_meta_`` reference would not resolve there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medssl3d.data.errors import InputError

CHANNEL_DEF_PATH = ("network_data_format", "outputs", "pred", "channel_def")


def channel_def(metadata_file: str | os.PathLike) -> dict[str, str]:
    """``network_data_format.outputs.pred.channel_def`` of a bundle's metadata: channel index → label name.

    Raises:
        InputError: the file is missing, not JSON, or has no such mapping (the message names the file).
    """
    path = Path(metadata_file)
    try:
        node = json.loads(path.read_text())
    except OSError as e:
        raise InputError(path, f"cannot read the bundle metadata: {e.strerror}") from e
    except ValueError as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    for key in CHANNEL_DEF_PATH:
        if not isinstance(node, dict) or key not in node:
            raise InputError(path, f"no {'.'.join(CHANNEL_DEF_PATH)} (the bundle's label names)")
        node = node[key]
    if not isinstance(node, dict) or not node:
        raise InputError(path, f"{'.'.join(CHANNEL_DEF_PATH)} must map channel indices to label names")
    return {str(k): str(v) for k, v in node.items()}
