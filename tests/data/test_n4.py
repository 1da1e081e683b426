import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond

N = 32


def _biased_sphere():
    """Two-tissue sphere times a smooth bias along the last axis; returns (biased, tissue mask)."""
    z, y, x = np.mgrid[:N, :N, :N].astype(np.float32)
    r = np.sqrt((z - N / 2) ** 2 + (y - N / 2) ** 2 + (x - N / 2) ** 2)
    clean = np.where(r < 12, 100.0, 0.0).astype(np.float32)
    clean[r < 6] = 60.0
    bias = np.exp(0.4 * (x - N / 2) / (N / 2))
    return (clean * bias).astype(np.float32), (r >= 7) & (r < 12)


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_n4_removes_a_multiplicative_bias():
    biased, tissue = _biased_sphere()
    img = MetaTensor(torch.from_numpy(biased)[None], affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = N4BiasFieldCorrection(shrink_factor=2, iterations=(20, 20))(img)
    assert isinstance(out, MetaTensor) and out.shape == img.shape and out.dtype == torch.float32
    assert torch.equal(out.affine, img.affine)
    before, after = _cv(biased[tissue]), _cv(out[0].numpy()[tissue])
    assert before > 0.1 and after < 0.25 * before


def test_n4_dict_version_touches_only_its_keys():
    biased, _ = _biased_sphere()
    data = {"image": biased[None].copy(), "label": (biased[None] > 0).astype(np.float32)}
    out = N4BiasFieldCorrectiond("image", shrink_factor=2, iterations=(5,))(data)
    assert isinstance(out["image"], np.ndarray) and not np.allclose(out["image"], biased[None])
    assert out["label"] is data["label"]


def test_n4_leaves_an_empty_volume_alone():
    zeros = np.zeros((1, N, N, N), dtype=np.float32)
    np.testing.assert_array_equal(N4BiasFieldCorrection()(zeros), zeros)


@pytest.mark.parametrize("kwargs", [{"shrink_factor": 0}, {"iterations": ()}, {"iterations": (10, 0)}])
def test_n4_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        N4BiasFieldCorrection(**kwargs)
