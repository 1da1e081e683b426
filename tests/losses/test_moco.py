import math

import pytest
import torch
import torch.nn.functional as F

from medssl3d.losses.moco import EMPTY_ID, MoCoLoss


def test_enqueue_writes_fifo_and_wraps_around():
    loss = MoCoLoss(dim=2, queue_size=5)
    keys = F.normalize(torch.tensor([[1.0, float(i)] for i in range(7)]), dim=1)
    loss.enqueue(keys[:3])
    assert loss.queue.shape == (5, 2) and int(loss.queue_ptr) == 3
    torch.testing.assert_close(loss.queue[:3], keys[:3])
    loss.enqueue(keys[3:7])  # 4 more: slots 3, 4, then 0, 1 (the oldest) are overwritten
    assert loss.queue.shape == (5, 2) and int(loss.queue_ptr) == 2
    torch.testing.assert_close(loss.queue, keys[[5, 6, 2, 3, 4]])
    many = F.normalize(torch.randn(12, 2), dim=1)
    loss.enqueue(many)  # more than K: only the newest K kept, the oldest of them at the pointer
    assert loss.queue.shape == (5, 2) and int(loss.queue_ptr) == 2
    torch.testing.assert_close(loss.queue[[2, 3, 4, 0, 1]], many[7:])


def test_queue_and_pointer_are_saved_in_the_state_dict():
    loss = MoCoLoss(dim=4, queue_size=8)
    loss.enqueue(torch.randn(3, 4))
    state = loss.state_dict()
    assert set(state) == {"queue", "queue_ids", "queue_ptr"}
    other = MoCoLoss(dim=4, queue_size=8)
    other.load_state_dict(state)
    assert torch.equal(other.queue, loss.queue) and int(other.queue_ptr) == 3
    assert torch.equal(other.queue_ids, loss.queue_ids)


def test_infonce_known_answer_and_queue_unchanged():
    loss = MoCoLoss(dim=2, queue_size=3, temperature=0.5)
    loss.queue.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    k = torch.tensor([[2.0, 0.0]])  # normalised inside
    before = loss.queue.clone()
    value = loss(q, k)
    # logits / t: positive 1/0.5 = 2, negatives 0, -2, 0
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2) + 1))
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(loss.queue, before)
    loss.enqueue(k)  # writing the queue before backward must not break the graph
    value.backward()
    assert q.grad is not None


def test_keys_get_no_gradient():
    loss = MoCoLoss(dim=3, queue_size=4)
    q, k = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    loss(q, k).backward()
    assert q.grad is not None and k.grad is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        MoCoLoss(dim=2, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MoCoLoss(dim=2, queue_size=3)(torch.randn(2, 3), torch.randn(2, 3))


def test_volume_ids_are_queued_beside_their_keys_fifo():
    loss = MoCoLoss(dim=2, queue_size=4)
    assert loss.queue_ids.tolist() == [EMPTY_ID] * 4  # the initial random keys belong to no volume
    loss.enqueue(torch.randn(3, 2), torch.tensor([7, 8, 9]))
    loss.enqueue(torch.randn(2, 2), torch.tensor([1, 2]))  # slot 3, then slot 0 (the oldest)
    assert loss.queue_ids.tolist() == [2, 8, 9, 1] and int(loss.queue_ptr) == 1
    loss.enqueue(torch.randn(1, 2))  # no ids: the entry is of no volume
    assert loss.queue_ids.tolist() == [2, EMPTY_ID, 9, 1]


def test_own_volume_negatives_are_masked_known_answer():
    loss = MoCoLoss(dim=2, queue_size=3, temperature=0.5)
    loss.queue.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    loss.queue_ids.copy_(torch.tensor([4, 6, 4]))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    k = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    value = loss(q, k, ids=torch.tensor([4, 6]))
    # query 0 (volume 4): positive 2, only negative 1 (logit -2) counts; query 1 (volume 6): positive 2,
    # negatives 0 (logit 2) and 2 (logit -2) count, 1 (its own volume) does not
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(-2)))
    second = -math.log(math.exp(2) / (math.exp(2) + math.exp(2) + math.exp(-2)))
    assert value.item() == pytest.approx((first + second) / 2, rel=1e-6)
    unmasked = loss(q, k)
    assert unmasked.item() > value.item()
    value.backward()
    assert torch.isfinite(q.grad).all()


def test_every_negative_of_the_own_volume_leaves_only_the_positive():
    loss = MoCoLoss(dim=2, queue_size=2, temperature=0.2)
    loss.queue_ids.fill_(3)
    q = torch.randn(1, 2, requires_grad=True)
    value = loss(q, torch.randn(1, 2), ids=torch.tensor([3]))
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-7) and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="one volume id per query"):
        loss(q, torch.randn(1, 2), ids=torch.tensor([3, 4]))


def _enqueue_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss = MoCoLoss(dim=2, queue_size=6, gather_distributed=True)
        keys = torch.tensor([[1.0, float(rank)], [1.0, 10.0 + rank]])
        loss.enqueue(keys, torch.tensor([100 + rank, 200 + rank]))
        results[rank] = (loss.queue[:4].clone(), loss.queue_ids.clone(), int(loss.queue_ptr))
    finally:
        dist.destroy_process_group()


def test_keys_and_ids_of_every_rank_are_queued_in_rank_order(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    with mp.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _enqueue_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, start_method="spawn"
        )
        results = dict(results)
    expected = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 10.0], [1.0, 1.0], [1.0, 11.0]]), dim=1)
    for rank in (0, 1):
        queue, ids, ptr = results[rank]
        torch.testing.assert_close(queue, expected)
        assert ids.tolist() == [100, 200, 101, 201, EMPTY_ID, EMPTY_ID] and ptr == 4
