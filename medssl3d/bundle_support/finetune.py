"""The fine-tuning recipe of the segmentation bundle: encoder / decoder parameter groups and their schedule.

A pretrained encoder is worth keeping close to where pretraining left it while the new decoder learns: the
encoder group gets ``encoder_lr_scale`` times the decoder's learning rate, can stay frozen (learning rate 0)
for the first ``freeze_encoder_epochs``, and both groups follow a linear warm-up then a cosine decay over
the run's iterations. The schedule is a plain ``LambdaLR`` stepped per iteration by MONAI's
``LrScheduleHandler``; frozen means "not updated", so DDP sees the same parameters in every step.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from medssl3d.engine.schedules import warmup_cosine

__all__ = ["ENCODER_PREFIXES", "encoder_decoder_groups", "finetune_schedule"]

ENCODER_PREFIXES = ("swinViT.", "vit.")
"""Parameter-name prefixes of the pretrained encoder in MONAI ``SwinUNETR`` / ``UNETR`` (what export fills)."""
MIN_LR_FRACTION = 0.01
"""The cosine ends at this fraction of each group's peak learning rate."""


def encoder_decoder_groups(
    network: nn.Module, lr: float, weight_decay: float, encoder_lr_scale: float = 1.0
) -> list[dict]:
    """Two AdamW parameter groups, decoder first: ``[{decoder, lr}, {encoder, lr * encoder_lr_scale}]``.

    Args:
        network: MONAI ``SwinUNETR`` or ``UNETR`` (its encoder is every parameter under ``swinViT.`` / ``vit.``),
            or either wrapped in DDP.
        lr: the decoder's (and the new output head's) peak learning rate.
        weight_decay: AdamW weight decay of both groups.
        encoder_lr_scale: encoder learning rate as a fraction of ``lr`` (1: one rate for the whole network).

    Raises:
        ValueError: ``lr`` or ``encoder_lr_scale`` not positive, or a network with no encoder parameters.
    """
    if lr <= 0:
        raise ValueError(f"learning_rate must be > 0, got {lr}")
    if encoder_lr_scale <= 0:
        raise ValueError(f"encoder_lr_scale must be > 0, got {encoder_lr_scale}")
    encoder, decoder = [], []
    for name, p in network.named_parameters():
        (encoder if name.removeprefix("module.").startswith(ENCODER_PREFIXES) else decoder).append(p)
    if not encoder:
        raise ValueError(f"{type(network).__name__} has no parameters under {ENCODER_PREFIXES}: not a SwinUNETR/UNETR")
    return [
        {"params": decoder, "lr": lr, "weight_decay": weight_decay, "name": "decoder"},
        {"params": encoder, "lr": lr * encoder_lr_scale, "weight_decay": weight_decay, "name": "encoder"},
    ]


def _factor(step: int, *, total: int, warmup: int, start: int) -> float:
    """Fraction of a group's peak rate at iteration ``step``: 0 before ``start``, then warm-up and cosine."""
    if step < start:
        return 0.0
    span = max(total - start, 1)
    return warmup_cosine(step - start, span, min(warmup, span), 1.0, MIN_LR_FRACTION)


def finetune_schedule(
    optimizer: Optimizer,
    *,
    max_epochs: int,
    iterations_per_epoch: int,
    warmup_epochs: float = 0.0,
    freeze_encoder_epochs: int = 0,
) -> LambdaLR:
    """Per-iteration schedule of :func:`encoder_decoder_groups`: warm-up, cosine, optional frozen encoder.

    The decoder warms up linearly over ``warmup_epochs`` from iteration 0 and decays by a cosine to
    ``MIN_LR_FRACTION`` of its peak at the last iteration. The encoder's rate is 0 for the first
    ``freeze_encoder_epochs``, then it warms up over ``warmup_epochs`` and decays to the same end.

    Args:
        optimizer: built from :func:`encoder_decoder_groups` (group 0 decoder, group 1 encoder), or any
            optimizer whose groups all follow the decoder's schedule when there is no frozen warm-up.
        max_epochs: epochs of the run.
        iterations_per_epoch: optimizer steps per epoch (the training loader's length).
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        freeze_encoder_epochs: epochs with the encoder not updated.

    Raises:
        ValueError: a negative length, a freeze as long as the run, or a freeze on an optimizer without the
            encoder group.
    """
    if max_epochs < 1 or iterations_per_epoch < 1:
        raise ValueError(f"max_epochs and iterations_per_epoch must be >= 1, got {max_epochs}, {iterations_per_epoch}")
    if warmup_epochs < 0 or freeze_encoder_epochs < 0:
        raise ValueError(f"warmup_epochs and freeze_encoder_epochs must be >= 0, got {warmup_epochs}, "
                         f"{freeze_encoder_epochs}")
    if freeze_encoder_epochs >= max_epochs:
        raise ValueError(f"freeze_encoder_epochs={freeze_encoder_epochs} leaves no epoch of max_epochs={max_epochs} "
                         "to train the encoder")
    names = [g.get("name") for g in optimizer.param_groups]
    if freeze_encoder_epochs and "encoder" not in names:
        raise ValueError(f"freeze_encoder_epochs needs an 'encoder' parameter group, the optimizer has {names}")
    total = max_epochs * iterations_per_epoch
    warmup = round(warmup_epochs * iterations_per_epoch)
    freeze = freeze_encoder_epochs * iterations_per_epoch
    lambdas = [
        partial(_factor, total=total, warmup=warmup, start=freeze if name == "encoder" else 0) for name in names
    ]
    return LambdaLR(optimizer, lambdas)
