"""Every pretraining bundle selects a method preset with ``method_preset``; explicit ids win; the run records it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.jobs.bundles import read_configs
from medssl3d.jobs.pretrain import preset_overrides
from medssl3d.methods.presets import changed_fields, method_config_class, resolve_method_config

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
#: A preset other than ``base`` for each pretraining bundle.
PRESETS = {
    "ace": "high_overlap", "afire": "code", "alice": "original", "dira": "official", "swin_ssl": "no_paste_cutout"
}


def parser_for(bundle: str, **overrides) -> ConfigParser:
    parser = read_configs(BUNDLES / bundle, ("train",))
    parser.update(overrides)
    return parser


def test_every_pretraining_bundle_is_covered():
    assert {p.parent.parent.name for p in BUNDLES.glob("*/configs/train.json")} - {"segmentation"} == set(PRESETS)


@pytest.mark.parametrize("bundle", sorted(PRESETS))
def test_base_is_the_dataclass_defaults(bundle):
    parser = parser_for(bundle)
    assert parser.get("method_preset") == "base"
    assert parser.get_parsed_content("method_preset_config") == method_config_class(bundle)()


@pytest.mark.parametrize("bundle", sorted(PRESETS))
def test_method_preset_gives_the_presets_config_and_explicit_ids_win(bundle):
    preset = PRESETS[bundle]
    explicit = {"backbone_size": "tiny"}
    data_free = {}
    if bundle == "alice":  # no registration: its template would be read from the datalist
        explicit["correspondence"] = "same_volume"
        data_free["registration_template"] = None
    parser = parser_for(bundle, method_preset=preset, **explicit, **data_free)
    if bundle == "alice":
        explicit["foreground_threshold"] = parser.get_parsed_content("foreground_threshold")  # the data preset's
    expected = resolve_method_config(bundle, preset)
    assert changed_fields(expected) and not set(changed_fields(expected)) & set(explicit)
    assert parser.get_parsed_content("method").config == dataclasses.replace(expected, **explicit)


def test_pretrain_preset_option_is_the_bundle_id():
    assert preset_overrides("alice", "original") == {"method_preset": "original"}
    with pytest.raises(ValueError, match="'huge'"):
        preset_overrides("alice", "huge")


@pytest.mark.slow
def test_the_checkpoint_and_the_log_hold_the_resolved_config(tmp_path, caplog):
    bundle = BUNDLES / "swin_ssl"
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f"{name}.json") for name in ("train", "smoke")],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle),
        smoke_dir=str(tmp_path),
        method_preset="no_paste_cutout",
        **{"train#trainer#max_steps": 1, "train#trainer#config#batch_size": 1},
    )
    with caplog.at_level(logging.INFO, logger="medssl3d.methods.presets"):
        wf.initialize()
        wf.run()
        wf.finalize()
    config = wf.parser.get_parsed_content("method").config
    assert (config.paste_cutout, config.backbone_size) == (False, "tiny")  # the preset's, the smoke overlay's
    ckpt = load_checkpoint(tmp_path / "runs" / "checkpoints" / "last.pt")
    assert ckpt["run_info"]["method_config"] == dataclasses.asdict(config)
    logged = [r.getMessage() for r in caplog.records if r.name == "medssl3d.methods.presets"]
    assert "swin_ssl: paste_cutout = False" in logged and "swin_ssl: backbone_size = 'tiny'" in logged
