import numpy as np
import pytest
import torch

from medssl3d.transforms.masking import RandBlockMask, RandBlockMaskd


def _blocks(mask, block):
    d, h, w = (s // block for s in mask.shape)
    return mask.reshape(d, block, h, block, w, block).transpose(0, 2, 4, 1, 3, 5).reshape(d, h, w, -1)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.0, 1.0])
def test_blocks_cover_the_asked_ratio_and_are_whole(ratio):
    masker = RandBlockMask(ratio=ratio, block_size=16)
    masker.set_random_state(seed=0)
    masker.randomize((64, 64, 64))
    per_block = _blocks(masker.mask, 16)
    assert (per_block.all(-1) | ~per_block.any(-1)).all()  # all-or-nothing
    assert per_block.all(-1).sum() == round(ratio * 64)
    assert masker.block_mask.shape == (4, 4, 4) and masker.block_mask.sum() == round(ratio * 64)


def test_columns_span_the_whole_axis():
    masker = RandBlockMask(ratio=0.75, block_size=16, mode="column", column_axis=2)
    masker.set_random_state(seed=1)
    masker.randomize((64, 32, 48))
    m = masker.mask
    assert (m == m[:, :, :1]).all()  # constant along the column axis
    assert masker.block_mask.shape == (4, 2) and masker.block_mask.sum() == 6
    assert m.mean() == pytest.approx(6 / 8)


def test_partial_blocks_count_as_blocks():
    masker = RandBlockMask(ratio=0.5, block_size=16)
    masker.set_random_state(seed=2)
    masker.randomize((40, 32, 32))  # 3 x 2 x 2 blocks, the last row 8 voxels thick
    assert masker.block_mask.sum() == 6 and masker.mask.shape == (40, 32, 32)


def test_masked_voxels_are_zero_in_the_student_input_only():
    image = torch.rand(1, 32, 32, 32) + 0.5
    data = {"view_q": image.clone(), "view_k": image.clone()}
    out = RandBlockMaskd(["view_q", "view_k"], ratio=0.75, block_size=16).set_random_state(seed=0)(data)
    for v in ("view_q", "view_k"):
        mask = out[f"{v}_mask"].bool()
        assert mask.shape == (1, 32, 32, 32) and mask.float().mean() == 0.75
        assert (out[f"{v}_masked"][mask] == 0).all()
        assert torch.equal(out[f"{v}_masked"][~mask], image[~mask])
        assert torch.equal(out[v], image)  # the teacher's crop is untouched
    assert not torch.equal(out["view_q_mask"], out["view_k_mask"])  # one draw per view


def test_seeding_repeats_the_draw_and_bad_arguments_raise():
    a = RandBlockMask(block_size=8).set_random_state(seed=5)
    b = RandBlockMask(block_size=8).set_random_state(seed=5)
    a.randomize((32, 32, 32))
    b.randomize((32, 32, 32))
    np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="ratio"):
        RandBlockMask(ratio=1.5)
    with pytest.raises(ValueError, match="mode"):
        RandBlockMask(mode="random")
