import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl3d.networks.compose import pixel_shuffle_3d, unfold_2x2x2
from medssl3d.transforms.grid_crops import (
    RandGridCropPair,
    RandGridCropPaird,
    matched_cells,
    overlap_masks,
)

N, C = 4, 4  # 4 tokens per axis, cells of 4 voxels: 16^3 crops, 32^3 large crops before pooling
SHAPE = (48, 52, 44)


def _ramp(shape):
    """(3, *shape): every voxel holds its own index along each of the three spatial axes."""
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _tokens(crop, size):
    """Mean coordinates of each token of side ``size``: (3, n, n, n)."""
    return F.avg_pool3d(crop[None], size)[0]


def _draws(seeds=range(12)):
    volume = _ramp(SHAPE)
    t = RandGridCropPaird(keys="image", n=N, cell_size=C)
    for seed in seeds:
        t.set_random_state(seed=seed)
        yield t({"image": volume})


def test_geometry_invariants():
    for out in _draws(range(30)):
        d = out["grid_offset"]
        assert (d % 2 == 0).all()
        # overlap per axis [max(0, d), min(2n, d + n)) holds at least 2 cells
        overlap = torch.minimum(torch.full_like(d, 2 * N), d + N) - torch.clamp(d, min=0)
        assert (overlap >= 2).all()
        assert torch.equal(out["small_corner"] - out["large_corner"], d * C)
        assert out["image_small"].shape == out["image_large"].shape == (3, N * C, N * C, N * C)
        # both crops lie inside the volume (it is large enough that nothing is padded)
        for corner, side in ((out["small_corner"], N * C), (out["large_corner"], 2 * N * C)):
            assert (corner >= 0).all() and all(int(c) + side <= s for c, s in zip(corner, SHAPE, strict=True))
        small_mask, large_mask = out["small_mask"], out["large_mask"]
        assert int(small_mask.sum()) == int(overlap.prod())
        assert int(large_mask.sum()) == int((overlap // 2).prod())
        assert torch.equal(small_mask.flatten(), out["decompose_index"] >= 0)
        assert torch.equal(large_mask.flatten(), out["compose_index"] >= 0)


def test_small_crop_holds_the_voxels_of_its_corner():
    for out in _draws(range(3)):
        corner = out["small_corner"].float().view(3, 1, 1, 1)
        torch.testing.assert_close(out["image_small"], _ramp((N * C,) * 3) + corner)


def test_composition_matches_cover_the_same_voxels_on_a_coordinate_ramp():
    # Large token i and the 2x2x2 block of small tokens composed into cell compose_index[i] see the same voxels:
    # the pooled large crop over token i equals the small crop's block, pooled by 2, voxel for voxel.
    checked = 0
    for out in _draws():
        small, large = out["image_small"], out["image_large"]
        small_tokens = _tokens(small, C)  # (3, n, n, n)
        composed = unfold_2x2x2(small_tokens[None])[0].view(8, 3, N // 2, N // 2, N // 2)
        large_tokens = _tokens(large, C)
        side = 2 * C
        for i, j in enumerate(out["compose_index"].tolist()):
            if j < 0:
                continue
            iz, iy, ix = np.unravel_index(i, (N,) * 3)
            jz, jy, jx = np.unravel_index(j, (N // 2,) * 3)
            block = small[:, jz * side : (jz + 1) * side, jy * side : (jy + 1) * side, jx * side : (jx + 1) * side]
            token = large[:, iz * C : (iz + 1) * C, iy * C : (iy + 1) * C, ix * C : (ix + 1) * C]
            torch.testing.assert_close(F.avg_pool3d(block[None], 2)[0], token)
            # through the composition operator's unfold: the 8 block members average to the large token, and
            # member (dz, dy, dx) sits at the large token's centre + ((dz, dy, dx) - 1/2) cells
            torch.testing.assert_close(composed[:, :, jz, jy, jx].mean(0), large_tokens[:, iz, iy, ix])
            for member in range(8):
                sub = torch.tensor(np.unravel_index(member, (2, 2, 2)), dtype=torch.float32)
                torch.testing.assert_close(
                    composed[member, :, jz, jy, jx], large_tokens[:, iz, iy, ix] + (sub - 0.5) * C
                )
            checked += 1
        # the matching is one to one: no composed cell has two large tokens
        partners = [j for j in out["compose_index"].tolist() if j >= 0]
        assert len(partners) == len(set(partners))
    assert checked > 0


def test_decomposition_matches_cover_the_same_voxels_on_a_coordinate_ramp():
    # Small token s and decomposed sub-cell decompose_index[s] of the large crop see the same voxels.
    checked = 0
    half = C // 2  # one cell of the pooled large crop
    for out in _draws():
        small, large = out["image_small"], out["image_large"]
        small_tokens = _tokens(small, C)
        large_tokens = _tokens(large, C)  # (3, n, n, n)
        # An exact decomposition of each large token into its 8 sub-cells, in the operator's channel order,
        # placed by the 3D pixel shuffle into the (2n)^3 grid.
        members = []
        for member in range(8):
            sub = torch.tensor(np.unravel_index(member, (2, 2, 2)), dtype=torch.float32).view(3, 1, 1, 1)
            members.append(large_tokens + (sub - 0.5) * C)
        decomposed = pixel_shuffle_3d(torch.cat(members)[None])[0]  # (3, 2n, 2n, 2n)
        for s, k in enumerate(out["decompose_index"].tolist()):
            if k < 0:
                continue
            sz, sy, sx = np.unravel_index(s, (N,) * 3)
            kz, ky, kx = np.unravel_index(k, (2 * N,) * 3)
            token = small[:, sz * C : (sz + 1) * C, sy * C : (sy + 1) * C, sx * C : (sx + 1) * C]
            cell = large[:, kz * half : (kz + 1) * half, ky * half : (ky + 1) * half, kx * half : (kx + 1) * half]
            torch.testing.assert_close(F.avg_pool3d(token[None], 2)[0], cell)
            torch.testing.assert_close(decomposed[:, kz, ky, kx], small_tokens[:, sz, sy, sx])
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    ("n", "min_overlap", "offsets"),
    [
        (N, 2, {-2, 0, 2, 4, 6}),
        (N, 3, {0, 2, 4}),  # overlaps are even: 3 cells round up to 4
        (6, 4, {-2, 0, 2, 4, 6, 8}),  # the high_overlap preset: >= 4 of 6 cells (the official 2x design: >= 10 of 14)
    ],
)
def test_every_allowed_offset_is_drawn_on_a_large_volume(n, min_overlap, offsets):
    t = RandGridCropPair(n=n, cell_size=C, min_overlap=min_overlap)
    t.set_random_state(seed=0)
    seen = set()
    for _ in range(300):
        t.randomize((200, 200, 200))
        seen.update(t.geometry.offset)
    # even d in [min_overlap - n, 2n - min_overlap]
    assert seen == offsets


def test_small_volume_is_padded_and_crops_nest():
    volume = _ramp((64, 40, 64)) + 1.0  # padding (0) is distinguishable from every voxel (>= 1)
    t = RandGridCropPair(n=4, cell_size=16)
    t.set_random_state(seed=1)
    for _ in range(3):
        small, large = t(volume)
        geo = t.geometry
        assert small.shape == large.shape == (3, 64, 64, 64)
        assert all(0 <= d <= 4 for d in geo.offset)  # only nested crops fit in the padded 128^3
        assert geo.large_corner == (-32, -44, -32)
        inside = small[0] > 0
        want = _ramp((64,) * 3) + torch.tensor(geo.small_corner, dtype=torch.float32).view(3, 1, 1, 1) + 1.0
        torch.testing.assert_close(small[:, inside], want[:, inside])
        assert inside.any() and not inside.all()


def test_dict_twin_cuts_every_key_alike_and_is_repeatable():
    volume = _ramp(SHAPE)
    t = RandGridCropPaird(keys=("a", "b"), n=N, cell_size=C)
    t.set_random_state(seed=3)
    first = t({"a": volume, "b": volume * 2})
    torch.testing.assert_close(first["b_small"], 2 * first["a_small"])
    torch.testing.assert_close(first["b_large"], 2 * first["a_large"])
    t.set_random_state(seed=3)
    again = t({"a": volume, "b": volume * 2})
    assert torch.equal(first["grid_offset"], again["grid_offset"])
    assert torch.equal(first["large_corner"], again["large_corner"])
    with pytest.raises(ValueError, match="spatial shapes"):
        t({"a": volume, "b": volume[:, :40]})


def test_batched_masks_agree_with_per_sample_geometry():
    offsets = torch.tensor([[-2, 0, 6], [4, 2, -2]])
    small, large = overlap_masks(offsets, N)
    assert small.shape == large.shape == (2, N, N, N)
    # first axis (R) of sample 0: d = -2 -> small tokens 2, 3 and large token 0 are in the overlap
    assert small[0, :, 0, 0].tolist() == [False, False, True, True]
    assert large[0, :, 0, 3].tolist() == [True, False, False, False]  # last axis (S): d = 6 -> large token 3 only
    assert not large[0, :, 0, :3].any()
    centres, valid = matched_cells(offsets, N, "compose")
    assert centres.shape == (2, N**3, 3) and valid.shape == (2, N**3)


@pytest.mark.parametrize("kwargs", [{"n": 3}, {"n": 0}, {"cell_size": 3}, {"min_overlap": 0}, {"min_overlap": 5}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        RandGridCropPair(**{"n": 4, "cell_size": 4, **kwargs})


def test_odd_offsets_and_bad_directions_raise():
    with pytest.raises(ValueError, match="even"):
        matched_cells(torch.tensor([[1, 0, 0]]), 4, "compose")
    with pytest.raises(ValueError, match="direction"):
        matched_cells(torch.tensor([[0, 0, 0]]), 4, "sideways")
