import math

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl3d.bundle_support.finetune import MIN_LR_FRACTION, encoder_decoder_groups, finetune_schedule


def _swin():
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3)


def test_groups_split_encoder_from_decoder_with_the_encoder_rate():
    net = _swin()
    decoder, encoder = encoder_decoder_groups(net, 1e-3, 1e-5, encoder_lr_scale=0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(names[id(p)].startswith("swinViT.") for p in encoder["params"])
    assert not any(names[id(p)].startswith("swinViT.") for p in decoder["params"])
    assert len(encoder["params"]) + len(decoder["params"]) == len(names)
    assert (decoder["lr"], encoder["lr"]) == (1e-3, pytest.approx(1e-4))
    wrapped = torch.nn.Module()
    wrapped.module = net  # the names a DDP wrapper gives
    assert len(encoder_decoder_groups(wrapped, 1e-3, 0.0)[1]["params"]) == len(encoder["params"])


@pytest.mark.parametrize(("lr", "scale", "message"), [(0.0, 1.0, "learning_rate"), (1e-3, 0.0, "encoder_lr_scale")])
def test_groups_refuse_bad_rates(lr, scale, message):
    with pytest.raises(ValueError, match=message):
        encoder_decoder_groups(_swin(), lr, 0.0, scale)
    with pytest.raises(ValueError, match="swinViT"):
        encoder_decoder_groups(torch.nn.Linear(2, 2), 1e-3, 0.0)


def _rates(optimizer, scheduler, steps):
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_warms_up_decays_and_freezes_the_encoder_first():
    net = _swin()
    opt = torch.optim.AdamW(encoder_decoder_groups(net, 1.0, 0.0, encoder_lr_scale=0.5))
    sched = finetune_schedule(opt, max_epochs=4, iterations_per_epoch=5, warmup_epochs=1, freeze_encoder_epochs=1)
    rates = _rates(opt, sched, 20)
    decoder = [r[0] for r in rates]
    encoder = [r[1] for r in rates]
    # decoder: linear warm-up over 5 iterations from 0, then cosine from 1 to MIN_LR_FRACTION over the other 15
    assert decoder[:5] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    cos = [MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t / 15)) for t in range(15)]
    assert decoder[5:] == pytest.approx(cos)
    # encoder: 0 for the frozen epoch, then its own warm-up to 0.5 and a cosine over the remaining 10
    assert encoder[:5] == [0.0] * 5
    assert encoder[5:10] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    cos_enc = [0.5 * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t / 10)))
               for t in range(10)]
    assert encoder[10:] == pytest.approx(cos_enc)


def test_frozen_encoder_is_not_updated_and_the_decoder_is():
    net = _swin()
    opt = torch.optim.AdamW(encoder_decoder_groups(net, 1e-2, 1e-2))
    sched = finetune_schedule(opt, max_epochs=3, iterations_per_epoch=2, freeze_encoder_epochs=1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(1, 1, 64, 64, 64)
    for step in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        sched.step()
        changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        encoder_changed = any(n.startswith("swinViT.") for n in changed)
        assert encoder_changed == (step >= 2), step
        assert any(not n.startswith("swinViT.") for n in changed)


def test_schedule_refuses_a_freeze_without_encoder_group_or_as_long_as_the_run():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    with pytest.raises(ValueError, match="encoder"):
        finetune_schedule(opt, max_epochs=3, iterations_per_epoch=2, freeze_encoder_epochs=1)
    with pytest.raises(ValueError, match="freeze_encoder_epochs=3"):
        finetune_schedule(opt, max_epochs=3, iterations_per_epoch=2, freeze_encoder_epochs=3)
    plain = finetune_schedule(opt, max_epochs=2, iterations_per_epoch=2)
    assert plain.get_last_lr() == [1.0]
