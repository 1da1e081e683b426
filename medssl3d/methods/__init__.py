"""Self-supervised methods, one module each, on the :class:`~medssl3d.methods.base.SSLMethod` base.

``METHODS`` maps a method name (the name its checkpoints and bundle carry) to its builder, written as
``"module:function"`` and imported on first use, so that importing one method does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

from medssl3d.methods.base import SSLMethod, StepInfo

METHODS: dict[str, str] = {
    "ace": "medssl3d.methods.ace:build_ace",
    "afire": "medssl3d.methods.afire:build_afire",
    "alice": "medssl3d.methods.alice:build_alice",
    "dira": "medssl3d.methods.dira:build_dira",
    "swin_ssl": "medssl3d.methods.swin_ssl:build_swin_ssl",
}


def build_method(name: str, **config: Any) -> SSLMethod:
    """Build the method registered as ``name`` from its config fields.

    Raises:
        ValueError: ``name`` is not a registered method.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    module, function = METHODS[name].split(":")
    return getattr(importlib.import_module(module), function)(**config)


__all__ = ["METHODS", "SSLMethod", "StepInfo", "build_method"]
