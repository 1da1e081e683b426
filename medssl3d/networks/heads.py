"""Projection heads on backbone tokens: the DINO-style prototype head and a plain MLP projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["DINOHead", "ProjectionHead"]

DINO_HIDDEN_DIM = 2048
DINO_BOTTLENECK_DIM = 256
DINO_OUT_DIM = 65536
DINO_N_LAYERS = 3
DINO_INIT_STD = 0.02
"""Truncated-normal std of the MLP weights (as in DINO)."""
L2_EPS = 1e-6
"""Guards the L2 normalisation of the bottleneck against all-zero features."""

PROJ_HIDDEN_DIM = 2048
PROJ_OUT_DIM = 512
PROJ_N_LAYERS = 2


class _ZeroGrad(torch.autograd.Function):
    """Identity with a zero gradient.

    The parameter still gets a (zero) gradient, so DDP and gradient accumulation see it every
    step, yet an optimizer starting from zero state leaves it unchanged.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return torch.zeros_like(grad)


def dino_mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int) -> nn.Sequential:
    """DINO's projection trunk: ``n_layers`` linear layers ``in → hidden → … → out`` with GELU between them.

    Linear weights are drawn from a truncated normal (std ``DINO_INIT_STD``), biases start at zero.
    """
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < n_layers - 1:
            layers.append(nn.GELU())
    mlp = nn.Sequential(*layers)
    mlp.apply(_init_linear)
    return mlp


class DINOHead(nn.Module):
    """DINO-style head (docs/methods.md, "Shared pieces"): MLP, L2 normalisation, weight-normalised prototypes.

    ``in_dim -> hidden -> ... -> bottleneck`` (``n_layers`` linear layers, GELU between them),
    then ``z / ||z||``, then a linear layer to ``out_dim`` prototypes whose rows are L2
    normalised in the forward pass. That is weight normalisation with its norm ``g`` fixed at
    1 (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021).

    Args:
        in_dim: input channels ``C``.
        out_dim: number of prototypes ``K``.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width before the prototype layer.
        n_layers: linear layers in the MLP (at least 1).

    Attributes:
        freeze_last_layer: when True the prototype layer receives zero gradient (DINO freezes
            it during the first epoch); the engine or method toggles it.

    Raises:
        ValueError: for ``n_layers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = DINO_OUT_DIM,
        hidden_dim: int = DINO_HIDDEN_DIM,
        bottleneck_dim: int = DINO_BOTTLENECK_DIM,
        n_layers: int = DINO_N_LAYERS,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead n_layers must be >= 1, got {n_layers}")
        self.mlp = dino_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.freeze_last_layer = False

    def prototypes(self) -> Tensor:
        """The effective prototype matrix ``(K, bottleneck_dim)`` with unit-norm rows."""
        return F.normalize(self.last_layer.weight, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Map features to prototype scores.

        Args:
            x: ``(..., in_dim)``, e.g. ``(B, C)`` or tokens ``(B, N, C)``.

        Returns:
            ``(..., out_dim)`` logits (cosine similarities to the prototypes).
        """
        z = F.normalize(self.mlp(x), dim=-1, eps=L2_EPS)
        weight = self.last_layer.weight
        if self.freeze_last_layer:
            weight = _ZeroGrad.apply(weight)
        return F.linear(z, F.normalize(weight, dim=1))


class ProjectionHead(nn.Module):
    """MLP projector ``Linear -> BatchNorm -> ReLU`` (x ``n_layers - 1``) then ``Linear``.

    Used for contrastive (NT-Xent) projections, e.g. the Swin UNETR SSL baseline's 512-d head.

    Args:
        in_dim: input channels ``C``.
        out_dim: output channels.
        hidden_dim: width of the hidden layers.
        n_layers: linear layers (1 gives a single ``Linear``).
        batch_norm: BatchNorm1d after each hidden linear layer (needs more than one row in training).

    Raises:
        ValueError: for ``n_layers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = PROJ_OUT_DIM,
        hidden_dim: int = PROJ_HIDDEN_DIM,
        n_layers: int = PROJ_N_LAYERS,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"ProjectionHead n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            # the bias is redundant before BatchNorm
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-1], out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project features.

        Args:
            x: ``(B, C)`` or tokens ``(B, N, C)``; BatchNorm statistics run over all rows.

        Returns:
            ``(B, out_dim)`` or ``(B, N, out_dim)``.
        """
        lead = x.shape[:-1]
        y = self.mlp(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=DINO_INIT_STD)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
