"""The shared wiring of the pretraining bundles: every bundle's trainer gets the online probe when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medssl3d.engine.probe import SegmentationProbe
from medssl3d.engine.trainer import Pretrainer

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
PRETRAIN_BUNDLES = sorted({p.parent.parent.name for p in BUNDLES.glob("*/configs/train.json")} - {"segmentation"})


def _trainer_and_probe(bundle: str, tmp_path: Path, **overrides) -> tuple[Pretrainer, SegmentationProbe | None]:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in ("train", "smoke")])
    parser.update({"bundle_root": str(BUNDLES / bundle), "smoke_dir": str(tmp_path), **overrides})
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#probe")


@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_every_pretraining_bundle_attaches_the_probe_when_enabled(bundle, tmp_path, monkeypatch):
    attached = []
    attach = SegmentationProbe.attach

    def recorded_attach(self, trainer):
        attached.append((self, trainer))
        attach(self, trainer)

    monkeypatch.setattr(SegmentationProbe, "attach", recorded_attach)
    trainer, probe = _trainer_and_probe(bundle, tmp_path / "on", probe_enabled=True, probe_every_n_steps=3)
    assert isinstance(probe, SegmentationProbe) and probe.every_n_steps == 3
    assert attached == [(probe, trainer)]
    trainer, probe = _trainer_and_probe(bundle, tmp_path / "off")
    assert probe is None and len(attached) == 1  # off by default
