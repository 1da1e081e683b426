"""Fine-tuning runs (``medssl3d finetune`` run folders) on phantoms, for the serving and export tests."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.jobs.finetune import FinetuneRequest, run_finetune

PYPI_PROBE = "https://pypi.org/simple/monai/"
#: Small enough for a CPU: one validation (which saves models/model.pt) after one epoch.
RUN_DEFAULTS = ("num_workers=0", "num_samples=1", "sw_batch_size=1", "val_interval=1")


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``finetune_run(name, epochs=1, *overrides)`` -> a run folder of ``medssl3d finetune`` on phantoms.

    One labelled phantom trains and another validates (CT, 64^3 at 1.5 mm, the phantom's seven classes);
    ``overrides`` are the command's ``--set`` pairs (``"arch=unetr"``, ``"spacing_mm=3.0"``...).
    """
    root = tmp_path_factory.mktemp("finetune")
    datalist = write_smoke_datalist(root / "data", n_train=1, n_val=1)

    def make(name: str, *overrides: str, epochs: int = 1) -> Path:
        run = root / name
        request = FinetuneRequest(data=datalist, pretrained="none", out=str(run), epochs=epochs,
                                  overrides=(*RUN_DEFAULTS, *overrides))
        assert run_finetune(request) == 0
        return run

    return make


@pytest.fixture(scope="session")
def skip_unless_pypi() -> Callable[[str], None]:
    """``skip_unless_pypi(reason)`` skips with ``reason`` when PyPI cannot be reached, and returns when it can."""

    def check(reason: str) -> None:
        try:
            urllib.request.urlopen(PYPI_PROBE, timeout=30).close()
        except OSError as e:
            pytest.skip(f"{reason} and PyPI cannot be reached: {e}")

    return check
