import pytest
import torch

from medssl3d.networks.mask_decoder import MaskTokenDecoder


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return MaskTokenDecoder(in_dim=8, grid_size=(2, 2, 2), patch_size=4, out_channels=1, dim=12, depth=1, num_heads=2)


def test_abnormal_tokens_are_replaced_by_their_positions_mask_token(decoder):
    torch.manual_seed(1)
    tokens = torch.randn(2, 8, 8)
    abnormal = torch.zeros(2, 8, dtype=torch.bool)
    abnormal[0, [2, 5]] = True
    abnormal[1, 7] = True
    with torch.no_grad():
        out = decoder(tokens, abnormal)
        assert out.shape == (2, 1, 8, 8, 8)
        # What an abnormal token held never reaches the output...
        noisy = torch.where(abnormal[..., None], torch.randn(2, 8, 8) * 10, tokens)
        assert torch.equal(decoder(noisy, abnormal), out)
        # ...while a normal token does, and so does the mask token of an abnormal position only.
        moved = tokens.clone()
        moved[0, 3] += 1.0
        assert not torch.allclose(decoder(moved, abnormal)[0], out[0])
        decoder.mask_token[0, 5] += 1.0
        shifted = decoder(tokens, abnormal)
        assert not torch.allclose(shifted[0], out[0]) and torch.equal(shifted[1], out[1])
        # No mask: every token is read as it is.
        assert torch.equal(decoder(tokens, torch.zeros_like(abnormal)), decoder(tokens))
