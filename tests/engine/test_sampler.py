import pytest
import torch

from medssl3d.engine.sampler import ResumableSampler, SeededDataset


def test_same_permutation_per_seed_and_epoch_and_new_per_epoch():
    a, b = ResumableSampler(10, seed=3), ResumableSampler(10, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(10))


def test_skip_first_k_resumes_the_same_stream():
    s = ResumableSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(2)
    assert list(s) == full


def test_shards_are_disjoint_and_cover_with_padding():
    shards = [list(ResumableSampler(7, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # one padded repeat
    dropped = [list(ResumableSampler(7, num_replicas=2, rank=r, drop_last=True)) for r in range(2)]
    assert not set(dropped[0]) & set(dropped[1]) and len(dropped[0]) == 3


def test_bad_arguments():
    with pytest.raises(ValueError):
        ResumableSampler(0)
    with pytest.raises(ValueError):
        ResumableSampler(4, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        ResumableSampler(4).set_start(5)


def test_seeded_dataset_reproduces_monai_augmentation_per_epoch_and_index():
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoised

    data = [{"image": torch.zeros(1, 4, 4, 4)} for _ in range(3)]
    ds = SeededDataset(Dataset(data, Compose([RandGaussianNoised("image", prob=1.0)])), seed=5)
    a = ds[(1, 2)]["image"]
    ds[(0, 0)], ds[(3, 1)]  # other draws in between change nothing
    assert torch.equal(ds[(1, 2)]["image"], a)
    assert not torch.equal(ds[(2, 2)]["image"], a)
    assert not torch.equal(ds[(1, 1)]["image"], a)
