import math

import pytest
import torch
import torch.nn.functional as F

from medssl3d.losses.ntxent import NTXentLoss


def _plain_ntxent(z1, z2, t):
    # Loop form of the Swin UNETR pretraining code's Contrast loss.
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        num = torch.exp(z[i] @ z[pos] / t)
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        total = total - torch.log(num / den)
    return total / n


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_identical_orthogonal_embeddings_known_value(batch):
    # Each view's positive has similarity 1, its 2(B-1) negatives 0:
    # loss = log(1 + 2 (B - 1) exp(-1 / t)); for B = 2, t = 0.5: log(1 + 2 e^-2) = 0.23954...
    z = torch.eye(batch, 8)
    expected = math.log(1 + 2 * (batch - 1) * math.exp(-1 / 0.5))
    assert NTXentLoss(temperature=0.5)(z, z.clone()).item() == pytest.approx(expected, rel=1e-6)


def test_matches_plain_loop_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    loss = NTXentLoss(temperature=0.3)
    torch.testing.assert_close(loss(z1, z2), _plain_ntxent(z1, z2, 0.3))
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))


def test_scale_invariant_and_aligned_pairs_score_lower():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 8, generator=g)
    loss = NTXentLoss()
    torch.testing.assert_close(loss(z1, z1 + 0.01), loss(3 * z1, 3 * (z1 + 0.01)))
    assert loss(z1, z1) < loss(z1, z1[torch.tensor([1, 2, 3, 0])])


def test_gradient_flows_to_both_views():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(3, 8, generator=g, requires_grad=True)
    z2 = torch.randn(3, 8, generator=g, requires_grad=True)
    NTXentLoss()(z1, z2).backward()
    for z in (z1, z2):
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gather_flag_without_process_group_is_local():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.testing.assert_close(NTXentLoss(gather_distributed=True)(z1, z2), NTXentLoss()(z1, z2))


def test_bad_input_raises():
    with pytest.raises(ValueError):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError):
        NTXentLoss()(torch.zeros(2, 4), torch.zeros(3, 4))


def _gathered_loss_worker(rank, world, init_file, z1, z2, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = slice(rank * (len(z1) // world), (rank + 1) * (len(z1) // world))
        local1 = z1[shard].clone().requires_grad_(True)
        loss = NTXentLoss(temperature=0.5, gather_distributed=True)(local1, z2[shard])
        loss.backward()
        results[rank] = (loss.item(), local1.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_match_the_full_batch(tmp_path):
    # Two gloo ranks with two pairs each: the mean of their losses is the loss of all four pairs.
    mp = torch.multiprocessing.get_context("spawn")
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    with mp.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _gathered_loss_worker,
            args=(2, str(tmp_path / "store"), z1, z2, results),
            nprocs=2,
            start_method="spawn",
        )
        results = dict(results)
    z1 = z1.clone().requires_grad_(True)
    full = NTXentLoss(temperature=0.5)(z1, z2)
    full.backward()
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # The gather's backward sums both ranks' gradients; DDP then averages over the 2 ranks.
    grads = torch.cat([results[0][1], results[1][1]]) / 2
    torch.testing.assert_close(grads, z1.grad)
