"""The Alice bundle builds its views from the method's settings: every view field set as ``method#<field>`` reaches
the transforms and the provider, and the last-layer freeze is one epoch whatever the world size."""

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medssl3d.transforms.feature_match import FeatureProvider
from medssl3d.transforms.masking import RandBlockMaskd
from medssl3d.transforms.paired_crops import RandCorrespondingCropsd

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = Path(__file__).resolve().parents[2] / "bundles" / "alice" / "configs" / "train.json"
# no registration template (it would read the datalist), a small network
BASE = {"registration_template": None, "backbone_size": "tiny", "method#proj_dim": 32, "method#head_hidden_dim": 32,
        "method#head_bottleneck_dim": 16, "method#out_dim": 32, "method#casa_ffn_dim": 32}
VIEW_OVERRIDES = {
    "method#correspondence": "body_box",
    "method#roi_size": [32, 32, 64],
    "method#match_threshold": 0.25,
    "method#max_tries": 7,
    "method#foreground_threshold": 0.3,
    "method#mask_ratio": 0.5,
    "method#mask_block_size": 8,
    "method#mask_mode": "column",
    "method#mask_column_axis": 1,
    "method#view_keys": ["q", "k"],
    "method#masked_postfix": "_m",
    "method#mask_postfix": "_msk",
}


def _parse(**overrides):
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({**BASE, **overrides})
    return parser


def _views(parser):
    method = parser.get_parsed_content("method")
    crops, masks = parser.get_parsed_content("train#preprocessing").transforms[:2]
    assert isinstance(crops, RandCorrespondingCropsd) and isinstance(masks, RandBlockMaskd)
    assert crops.provider is method.provider  # the method hands the teacher to the provider the views use
    return method, crops, masks


def test_every_method_view_setting_reaches_the_transforms_and_the_provider():
    method, crops, masks = _views(_parse(**VIEW_OVERRIDES))
    cfg = method.config
    assert (cfg.correspondence, cfg.mask_mode, cfg.roi_size) == ("body_box", "column", (32, 32, 64))
    assert crops.roi == (32, 32, 64) and crops.view_keys == ("q", "k")
    assert (crops.threshold, crops.max_tries, crops.foreground_threshold) == (0.25, 7, 0.3)
    assert crops.provider.name == "body_box"
    assert crops.provider.crop_size == (32, 32, 64) and crops.provider.foreground_threshold == 0.3
    masker = masks.masker
    assert (masker.ratio, masker.block_size, masker.mode, masker.column_axis) == (0.5, 8, "column", 1)
    assert list(masks.keys) == ["q", "k"] and (masks.output_postfix, masks.mask_postfix) == ("_m", "_msk")


def test_bundle_level_ids_feed_the_method_and_the_feature_provider():
    method, crops, masks = _views(_parse(correspondence="feature", roi_size=[32, 32, 32], foreground_threshold=0.2))
    assert method.config.roi_size == crops.roi == (32, 32, 32)
    assert isinstance(crops.provider, FeatureProvider)
    assert crops.provider.foreground_threshold == crops.provider.fallback.foreground_threshold == 0.2
    assert crops.provider.fallback.crop_size == (32, 32, 32)
    # the defaults are the method's
    assert (crops.threshold, crops.max_tries, masks.masker.mode, masks.masker.ratio) == (0.7, 100, "block", 0.75)


def test_last_layers_are_frozen_for_one_epoch_counted_per_process():
    config = _parse().get_parsed_content("train#trainer#config", instantiate=False)
    assert config["freeze_last_layer_epochs"] == 1 and "freeze_last_layer_steps" not in config
