import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.phantoms import make_phantom
from medssl3d.methods.afire import afire_transforms
from medssl3d.transforms.disk_cache import DiskCachedd


def _case(name, shape=(48, 48, 56), scale=1.0):
    phantom = make_phantom(shape=shape, spacing=(2.0,) * 3, seed=0)
    image = np.clip((phantom.image + 125.0) / 350.0, 0, 1).astype(np.float32) * scale
    affine = torch.as_tensor(phantom.affine)
    return MetaTensor(torch.from_numpy(image)[None], affine=affine, meta={"filename_or_obj": name})


def _views(pipeline, volume, seeds):
    out = []
    for seed in seeds:
        pipeline.set_random_state(seed)
        out.append(pipeline({"image": volume}))
    return out


def test_cached_alignment_gives_the_same_views_bit_for_bit(tmp_path):
    volume = _case("a.nii.gz")
    plain = _views(afire_transforms(32), volume, (0, 1))
    cached_pipeline = afire_transforms(32, alignment_cache_dir=tmp_path)
    missed = _views(cached_pipeline, volume, (0, 1))  # the first call fills the cache, the second reads it
    hit = _views(afire_transforms(32, alignment_cache_dir=tmp_path), volume, (0, 1))  # a new run, warm cache
    assert len(list(tmp_path.glob("*.pt"))) == 1
    for views in (missed, hit):
        for expected, got in zip(plain, views, strict=True):
            assert set(got) == set(expected)
            for key in expected:
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key
    assert not torch.equal(plain[0]["image_lesioned"], plain[1]["image_lesioned"])  # the seeds differ after all


def test_a_changed_case_or_setting_is_a_new_entry_and_a_broken_entry_is_recomputed(tmp_path, caplog):
    calls = []

    def halve(d):
        calls.append(1)
        return {"image": d["image"] / 2}

    cache = DiskCachedd("image", halve, tmp_path, settings="halve")
    a = _case("a.nii.gz")
    torch.testing.assert_close(cache({"image": a, "other": 1})["image"], a / 2)
    cache({"image": a})
    assert len(calls) == 1 and cache({"image": a, "other": 1})["other"] == 1
    cache({"image": _case("a.nii.gz", scale=0.5)})  # same file name, other intensities (a changed preset)
    DiskCachedd("image", halve, tmp_path, settings="other")({"image": a})
    assert len(calls) == 3 and len(list(tmp_path.glob("*.pt"))) == 3
    cache.entry({"image": a}).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="medssl3d.transforms.disk_cache"):
        torch.testing.assert_close(cache({"image": a})["image"], a / 2)
    assert len(calls) == 4 and "recomputing" in caplog.text
    with pytest.raises(ValueError, match="key"):
        DiskCachedd([], halve, tmp_path, settings="")


def test_the_extent_check_runs_on_cached_cases_too(tmp_path, caplog):
    chest, body = _case("chest.nii.gz", (48, 48, 48)), _case("body.nii.gz", (48, 48, 96))
    afire_transforms(32, alignment_cache_dir=tmp_path)({"image": chest})
    afire_transforms(32, alignment_cache_dir=tmp_path)({"image": body})
    caplog.clear()
    warm = afire_transforms(32, alignment_cache_dir=tmp_path)  # a new run: both cases come from the cache
    with caplog.at_level(logging.WARNING, logger="medssl3d.transforms.alignment"):
        warm({"image": chest}), warm({"image": body})
    assert len(caplog.records) == 1 and "body.nii.gz" in caplog.records[0].getMessage()
