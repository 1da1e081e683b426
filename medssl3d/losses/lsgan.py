"""Least-squares GAN losses (Mao et al., ICCV 2017), as in pix2pix's ``GANLoss('lsgan')``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LSGANLoss"]

REAL_LABEL = 1.0
FAKE_LABEL = 0.0
DISCRIMINATOR_SCALE = 0.5  # pix2pix halves the discriminator loss (real + fake) / 2


class LSGANLoss(nn.Module):
    """Mean squared distance of discriminator outputs to the real or the fake label.

    ``forward(pred, True)`` is the generator's adversarial loss on ``D(fake)`` (and the
    discriminator's real term on ``D(real)``); :meth:`discriminator` gives
    ``½ [mean (D(real) − 1)² + mean D(fake)²]``.

    Args:
        real_label: target of real volumes.
        fake_label: target of restored (generated) volumes.
    """

    def __init__(self, real_label: float = REAL_LABEL, fake_label: float = FAKE_LABEL) -> None:
        super().__init__()
        self.real_label = real_label
        self.fake_label = fake_label

    def forward(self, pred: Tensor, target_is_real: bool) -> Tensor:
        """Squared distance of ``pred`` (any shape, e.g. a PatchGAN grid (B, 1, d, h, w)) to a label.

        Args:
            pred: discriminator outputs.
            target_is_real: compare with ``real_label`` (True) or ``fake_label`` (False).

        Returns:
            The scalar mean.
        """
        label = self.real_label if target_is_real else self.fake_label
        return F.mse_loss(pred, torch.full_like(pred, label))

    def discriminator(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        """The discriminator's loss: ``½ [forward(real_pred, True) + forward(fake_pred, False)]``."""
        return DISCRIMINATOR_SCALE * (self(real_pred, True) + self(fake_pred, False))
