"""The swin_ssl bundle hands every setting it names to the method, the views and the data preset."""

import dataclasses
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl3d.data.presets import CT_PRESET, MRI_PRESET
from medssl3d.methods.swin_ssl import SwinSSLConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "swin_ssl"
VIEWS = ("view1", "view2")


def _parser(*overlays, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f"{n}.json") for n in ("train", *overlays)])
    parser.update({"backbone_size": "tiny", **overrides})
    return parser


def test_method_gets_the_bundle_settings():
    assert _parser().get_parsed_content("method").config == SwinSSLConfig(backbone_size="tiny")
    changed = _parser("multi_gpu_train", paste_cutout=False).get_parsed_content("method").config
    assert changed == SwinSSLConfig(backbone_size="tiny", gather_distributed=True, paste_cutout=False)


@pytest.mark.parametrize("independent", [False, True])
def test_views_follow_independent_crops(independent):
    parser = _parser(independent_crops=independent, roi_size=[16, 16, 16])
    views = parser.get_parsed_content("train#preprocessing")
    views.set_random_state(seed=0)
    volume = torch.arange(24 * 24 * 24, dtype=torch.float32).reshape(1, 24, 24, 24)
    same = []
    for _ in range(3):
        s = views({"image": volume})
        assert s["view1"].shape == (1, 16, 16, 16)  # the bundle's roi_size
        unrotated = [torch.rot90(s[v], -int(s[f"{v}_rot"]), dims=(2, 3)) for v in VIEWS]
        same.append(torch.equal(*unrotated))
    assert all(same) if not independent else not all(same)


def test_default_window_is_the_ct_preset_and_the_overlay_widens_it():
    assert _parser().get_parsed_content("preset") == CT_PRESET
    assert _parser(modality="mri").get_parsed_content("preset") == MRI_PRESET
    wide = _parser("wide_hu_window").get_parsed_content("preset")
    assert wide == dataclasses.replace(CT_PRESET, a_min=-1000.0, a_max=1000.0)
    # The pretraining data and the probe read that preset.
    for key in ("train#dataset#preset", "train#probe#preset"):
        assert _parser("wide_hu_window").get_parsed_content(key) == wide
