"""The wiring every pretraining bundle shares: the engine with the run's description and the online probe.

A pretraining bundle's ``train.json`` names its method, views and engine settings; its ``train#trainer``
is built here, so that the checkpoint's ``run_info`` and the probe are attached the same way in every
bundle::

    "trainer": {"_target_": "medssl3d.bundle_support.pretrain_run.pretrainer", "method": "@method",
                "dataset": "@train#dataset", "probe": "@train#probe", "export_target": "@export_target",
                "backbone_size": "@backbone_size", "roi_size": "@roi_size", "preset": "@preset",
                "device": "@device", "max_epochs": 100, "config": {...}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from medssl3d.data.presets import PresetConfig
from medssl3d.engine.config import TrainConfig
from medssl3d.engine.events import Handler
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.base import SSLMethod
from medssl3d.transfer.encoder_info import encoder_run_info

__all__ = ["pretrainer"]


def pretrainer(
    method: SSLMethod,
    dataset: Dataset,
    *,
    config: TrainConfig | dict[str, Any],
    export_target: str,
    backbone_size: str,
    roi_size: Sequence[int],
    preset: PresetConfig,
    probe: Handler | None = None,
    describe_encoder: bool = True,
    device: str | torch.device | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
) -> Pretrainer:
    """The :class:`~medssl3d.engine.trainer.Pretrainer` of a pretraining bundle.

    Args:
        method: the bundle's method.
        dataset: the pretraining samples (``train#dataset``).
        config: the engine settings (``train#trainer#config``).
        export_target: the MONAI network the encoder is exported for (``"swinunetr"``, ``"unetr"``, ...).
        backbone_size: the encoder's size (``"tiny"``, ``"small"``, ``"base"``).
        roi_size: the pretraining crop, one side per spatial axis.
        preset: the data preset the volumes went through.
        probe: the online segmentation probe (``train#probe``), or None (a disabled probe).
        describe_encoder: keep the encoder's description
            (:func:`~medssl3d.transfer.encoder_info.encoder_run_info` and the method's settings) in every
            checkpoint as ``run_info``; False where it describes no such encoder (DiRA's BasicUNet).
        device: training device (None: the engine's default).
        max_epochs: epochs of the run (``train#trainer#max_epochs``).
        max_steps: optimizer steps of the run (``train#trainer#max_steps``); wins over ``max_epochs``.

    Raises:
        ValueError: an unknown ``export_target`` or ``backbone_size`` (with ``describe_encoder``), or
            what :class:`~medssl3d.engine.trainer.Pretrainer` rejects.
    """
    run_info = None
    if describe_encoder:
        run_info = encoder_run_info(
            method=method.name, export_target=export_target, backbone_size=backbone_size, roi_size=roi_size,
            preset=preset,
        )
        run_info = dict(run_info, method_config=dataclasses.asdict(method.config))
    return Pretrainer(
        method, dataset, config=config, max_epochs=max_epochs, max_steps=max_steps, device=device,
        handlers=[probe], run_info=run_info,
    )
