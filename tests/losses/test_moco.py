import math

import pytest
import torch
import torch.nn.functional as F

from medssl3d.losses.moco import MoCoLoss


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
    assert set(state) == {"queue", "queue_ptr"}
    other = MoCoLoss(dim=4, queue_size=8)
    other.load_state_dict(state)
    assert torch.equal(other.queue, loss.queue) and int(other.queue_ptr) == 3


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
