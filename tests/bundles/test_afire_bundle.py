"""The AFiRe bundle's wiring: the first-epoch prototype freeze, the method's settings, the alignment check."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl3d.methods.afire import AfireConfig
from medssl3d.transforms.alignment import ForegroundExtentCheckd, find_spatial_augmentations
from medssl3d.transforms.disk_cache import DiskCachedd

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "afire"


def _parser(tmp_path: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f"{n}.json") for n in ("train", "smoke")])
    parser.update({"bundle_root": str(BUNDLE), "smoke_dir": str(tmp_path), **overrides})
    return parser


def _flatten(transform):
    yield transform
    for child in getattr(transform, "transforms", ()) or ():
        yield from _flatten(child)


def test_method_and_views_take_the_bundle_settings(tmp_path):
    parser = _parser(tmp_path, **{"method#structural": False, "extent_tolerance": 0.1})
    method = parser.get_parsed_content("method")
    assert method.config == AfireConfig(backbone_size="tiny", img_size=64, num_prototypes=32, structural=False)
    views = parser.get_parsed_content("train#preprocessing")
    checks = [t for t in _flatten(views) if isinstance(t, ForegroundExtentCheckd)]
    assert [c.tolerance for c in checks] == [0.1]
    caches = [t for t in _flatten(views) if isinstance(t, DiskCachedd)]
    assert [c.cache_dir for c in caches] == [Path(parser.get_parsed_content("cache_dir")) / "alignment"]
    assert find_spatial_augmentations(views) == []


@pytest.mark.slow
def test_the_trainer_freezes_the_prototype_layers_for_the_first_epoch(tmp_path):
    # No warm-up: the first step moves every trainable parameter but the frozen ones.
    parser = _parser(tmp_path, **{"train#trainer#config#ckpt_every": 1000, "train#trainer#config#warmup_steps": 0})
    method = parser.get_parsed_content("method")
    head = method.student.head
    assert [id(p) for p in method.last_layer_parameters()] == [id(head.weight)]
    assert head.weight.shape == (method.config.num_tokens, method.config.num_prototypes, 256)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.config.freeze_last_layer_epochs == 1
    weight, mlp = head.weight.detach().clone(), [p.detach().clone() for p in head.mlp.parameters()]
    trainer.run(until_step=1)  # the smoke data hold one optimizer step per epoch
    trainer.close()
    assert trainer.frozen_last_layer_steps == trainer.steps_per_epoch == 1
    assert torch.equal(head.weight, weight)
    assert any(not torch.equal(p, q) for p, q in zip(head.mlp.parameters(), mlp, strict=True))
