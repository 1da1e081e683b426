"""Online segmentation probe: is the representation improving, without a full fine-tune?

Every ``every_n_steps`` optimizer steps, :class:`SegmentationProbe` encodes a few labelled volumes with the
method's backbone (the EMA teacher's when the method has one, else the student's), frozen and in eval mode,
fits a per-voxel classifier on the multi-scale features of some of them and logs the Dice of its
predictions on the others (``probe/dice``, ``probe/dice_<class>``), with its own cost (``probe/time_s``,
``probe/time_fraction``). It runs on rank 0 only and leaves training untouched: no gradient, optimizer
state, module mode or random-number stream of the run changes, so a run gives the same losses with and
without it.

The classifier sees the features of every level upsampled (trilinear) to the input grid and concatenated,
the linear probe of dense-representation papers. Its first linear map is split by level and applied
before upsampling, which is the same map (interpolation is linear and keeps constants) at a fraction of
the memory; it is fitted on a few thousand voxels per volume, sampled evenly over the classes, with
full-batch L-BFGS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from torch import Tensor, nn

from medssl3d.engine import distributed as dist_utils
from medssl3d.engine.checkpoint import rng_state, set_rng_state
from medssl3d.engine.events import Events

if TYPE_CHECKING:
    from medssl3d.data.presets import PresetConfig
    from medssl3d.engine.trainer import Pretrainer

logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
SOURCES = ("auto", "teacher", "student")
SCALAR_PREFIX = "probe/"
DEFAULT_EVERY_N_STEPS = 500
DEFAULT_ROI = (96, 96, 96)
DEFAULT_NUM_VAL = 1
DEFAULT_MAX_VOLUMES = 4
DEFAULT_POINTS_PER_VOLUME = 2048
DEFAULT_FIT_ITERATIONS = 100
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_HIDDEN_CHANNELS = 32
DEFAULT_SPLITS = ("training", "validation")
LBFGS_HISTORY = 10
STD_EPS = 1e-6
SPATIAL_DIMS = 3


# --------------------------------------------------------------------------------------
# The classifier.
# --------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """Per-voxel classifier on multi-scale features: linear, or one hidden ReLU layer (``hidden_channels``).

    Each level's features are standardised with statistics of the fitting voxels
    (:meth:`set_normalisation`), so that one weight decay suits every level.

    Args:
        channels: channels ``C_l`` of each feature level.
        num_classes: output classes ``K`` (background included).
        hidden_channels: width of the hidden layer; None: a linear classifier.
        generator: draws the initial weights of the hidden layer (a linear classifier starts at zero).
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        hidden_channels: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        width = num_classes if hidden_channels is None else hidden_channels
        # Parameters are created here and initialised from ``generator``: nn.Linear would draw from the
        # global RNG the training run relies on.
        self.level_weights = nn.ParameterList(nn.Parameter(torch.zeros(width, c)) for c in channels)
        self.bias = nn.Parameter(torch.zeros(width))
        self.out_weight = self.out_bias = None
        if hidden_channels is not None:
            bound = 1.0 / math.sqrt(sum(channels))  # nn.Linear's range for the concatenated features
            for w in self.level_weights:
                nn.init.uniform_(w, -bound, bound, generator=generator)
            self.out_weight = nn.Parameter(torch.empty(num_classes, hidden_channels))
            nn.init.uniform_(self.out_weight, -1 / math.sqrt(hidden_channels), 1 / math.sqrt(hidden_channels),
                             generator=generator)
            self.out_bias = nn.Parameter(torch.zeros(num_classes))
        for i, c in enumerate(channels):
            self.register_buffer(f"mean{i}", torch.zeros(c))
            self.register_buffer(f"std{i}", torch.ones(c))

    def _stats(self, level: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"mean{level}"), getattr(self, f"std{level}")

    def set_normalisation(self, features: Sequence[Tensor]) -> None:
        """Standardise each level with the mean and standard deviation of ``features`` ``[(N, C_l)]``."""
        for level, f in enumerate(features):
            mean, std = self._stats(level)
            mean.copy_(f.mean(0))
            std.copy_(f.std(0, unbiased=False).clamp_min(STD_EPS))

    def _classify(self, hidden: Tensor, channel_dim: int) -> Tensor:
        if self.out_weight is None:
            return hidden
        hidden = torch.relu(hidden).movedim(channel_dim, -1)
        return F.linear(hidden, self.out_weight, self.out_bias).movedim(-1, channel_dim)

    def forward_points(self, features: Sequence[Tensor]) -> Tensor:
        """Logits ``(N, K)`` of voxels whose level features are ``[(N, C_l)]``."""
        hidden = self.bias
        for level, (f, w) in enumerate(zip(features, self.level_weights, strict=True)):
            mean, std = self._stats(level)
            hidden = hidden + F.linear((f - mean) / std, w)
        return self._classify(hidden, channel_dim=1)

    def forward_volume(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, K, *size)`` from feature maps ``[(B, C_l, D_l, H_l, W_l)]`` of a ``size`` input.

        The same map as :meth:`forward_points` at every voxel centre of ``size``.
        """
        hidden = self.bias.view(1, -1, 1, 1, 1)
        for level, (f, w) in enumerate(zip(features, self.level_weights, strict=True)):
            mean, std = (s.view(1, -1, 1, 1, 1) for s in self._stats(level))
            coarse = F.conv3d((f - mean) / std, w[..., None, None, None])
            hidden = hidden + F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=False)
        return self._classify(hidden, channel_dim=1)


def fit_head(
    head: ProbeHead, features: Sequence[Tensor], target: Tensor, *, iterations: int, weight_decay: float
) -> float:
    """Fit ``head`` by cross-entropy plus an L2 penalty on its weights, with full-batch L-BFGS.

    Args:
        head: the classifier (its normalisation set).
        features: ``[(N, C_l)]`` per level.
        target: ``(N,)`` class of each voxel.
        iterations: L-BFGS iterations at most.
        weight_decay: coefficient of the squared weights' sum.

    Returns:
        The final cross-entropy (without the penalty).
    """
    params = list(head.parameters())
    weights = [p for p in params if p.ndim == 2]
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head.forward_points(features), target)
        loss = loss + weight_decay * sum(w.square().sum() for w in weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(F.cross_entropy(head.forward_points(features), target))


# --------------------------------------------------------------------------------------
# Voxels and features.
# --------------------------------------------------------------------------------------
def sample_points(label: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Up to ``n`` voxel indices ``(N, 3)`` along the array axes (R, A, S), split evenly over the classes in ``label``.

    Args:
        label: ``(D, H, W)`` integer classes (on the CPU).
        n: voxels wanted; a class with fewer voxels than its share gives all of them.
        generator: the draw.
    """
    flat = label.flatten()
    classes = torch.unique(flat)
    share = max(n // len(classes), 1)
    chosen = []
    for c in classes:
        where = torch.nonzero(flat == c).squeeze(1)
        chosen.append(where[torch.randperm(len(where), generator=generator)[:share]])
    return torch.stack(torch.unravel_index(torch.cat(chosen), label.shape), dim=1)


def gather_points(feature: Tensor, points: Tensor, size: Sequence[int]) -> Tensor:
    """Features ``(N, C)`` at voxel centres ``points`` ``(N, 3)`` of a ``size`` grid, from a coarser map.

    Trilinear, with the voxel-centre convention and border clamping of
    ``F.interpolate(mode="trilinear", align_corners=False)``, so the result equals that upsampling at
    those voxels.

    Args:
        feature: ``(1, C, D_l, H_l, W_l)``.
        points: ``(N, 3)`` integer indices along the array axes (R, A, S) into ``size``.
        size: the full grid ``(D, H, W)``.
    """
    extent = torch.tensor(tuple(size), dtype=feature.dtype, device=feature.device)
    normalised = (2 * points.to(feature) + 1) / extent - 1
    # grid_sample reads coordinates in (x, y, z) order
    grid = normalised.flip(-1).view(1, -1, 1, 1, SPATIAL_DIMS)
    out = F.grid_sample(feature, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(feature.shape[1], -1).t()


def crop_around_label(image: Tensor, label: Tensor, roi: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Zero-pad to at least ``roi``, then crop ``roi`` centred on the labelled box (kept inside the volume).

    Args:
        image: ``(D, H, W)``.
        label: ``(D, H, W)``; the box of voxels > 0 is centred (the volume's centre when there are none).
        roi: the crop ``(d, h, w)``.

    Returns:
        ``(image, label)`` of shape ``roi``.
    """
    pad = [max(r - s, 0) for r, s in zip(roi, image.shape, strict=True)]
    widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]  # F.pad lists the last axis first
    image, label = F.pad(image, widths), F.pad(label, widths)
    fg = torch.nonzero(label > 0)
    if len(fg):
        centre = (fg.amin(0) + fg.amax(0)) // 2
    else:
        centre = torch.tensor(image.shape) // 2
    starts = [min(max(int(c) - r // 2, 0), s - r) for c, r, s in zip(centre, roi, image.shape, strict=True)]
    box = tuple(slice(b, b + r) for b, r in zip(starts, roi, strict=True))
    return image[box], label[box]


def find_backbone(method: nn.Module, source: str = "auto") -> nn.Module:
    """The backbone the probe encodes with: ``teacher.backbone`` or ``student.backbone``.

    Args:
        method: an :class:`~medssl3d.methods.base.SSLMethod`.
        source: "teacher", "student", or "auto" (the teacher's when the method has one).

    Raises:
        ValueError: for an unknown source, or when the chosen module has no ``backbone``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    order = ("teacher", "student") if source == "auto" else (source,)
    for name in order:
        backbone = getattr(getattr(method, name, None), "backbone", None)
        if isinstance(backbone, nn.Module):
            return backbone
    raise ValueError(f"{type(method).__name__}: no backbone under {' or '.join(f'{n}.backbone' for n in order)}")


@contextlib.contextmanager
def _isolated(module: nn.Module) -> Iterator[None]:
    """Eval mode for ``module`` and its children, and a saved copy of every RNG stream; both restored."""
    modes = [(m, m.training) for m in module.modules()]
    state = rng_state()
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        set_rng_state(state)


def _as_volume(value: Any, what: str) -> Tensor:
    # a plain tensor: MONAI's MetaTensor would carry its metadata through every operation
    volume = value.as_subclass(Tensor) if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    if volume.ndim == SPATIAL_DIMS + 1 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != SPATIAL_DIMS:
        raise ValueError(f"{what}: expected a (D, H, W) or (1, D, H, W) volume, got shape {tuple(volume.shape)}")
    return volume.float()


# --------------------------------------------------------------------------------------
# The handler.
# --------------------------------------------------------------------------------------
class SegmentationProbe:
    """Pretrainer handler: every ``every_n_steps`` steps, fit a light segmentation head on frozen features.

    The volumes are preprocessed (with ``preset`` when given as files), cropped to ``roi_size`` around their
    labels and cached on the first call. Of the volumes used, the first ``len - num_val`` fit the head, the
    last ``num_val`` give the Dice (mean over validation volumes per class, background excluded; a class
    absent from every validation label is not reported). The voxels sampled for fitting and the head's
    initial weights are the same at every call, so the curve follows the representation only.

    Args:
        data: a Decathlon datalist JSON (its entries of ``splits`` that have a ``label_key``), or a
            list of ``{image_key, label_key}`` dicts holding file paths (preprocessed with ``preset``) or
            preprocessed volumes (arrays / tensors ``(D, H, W)`` or ``(1, D, H, W)``, labels as classes).
        every_n_steps: run after every this many optimizer steps.
        num_classes: classes, background included; None: the largest label value + 1.
        roi_size: the crop fed to the backbone ``(D, H, W)`` (Swin: multiples of 32; ViT: its ``img_size``).
        num_val: volumes kept for validation (at least 1, and at least one volume must remain to fit).
        max_volumes: use at most this many volumes: the first ``max_volumes - num_val`` and the last
            ``num_val`` (None: all).
        splits: datalist splits read when ``data`` is a path.
        preset: preprocessing of file paths (e.g. ``medssl3d.data.presets.CT_PRESET``).
        head: "linear" (multinomial logistic regression) or "mlp" (one hidden ReLU layer).
        hidden_channels: width of the "mlp" hidden layer.
        feature_levels: indices of ``BackboneOutput.features`` to use (None: all).
        points_per_volume: voxels sampled per fitting volume.
        fit_iterations: L-BFGS iterations at most.
        weight_decay: L2 penalty on the head's weights.
        source: "auto" (the EMA teacher's backbone when the method has one, else the student's),
            "teacher" or "student".
        class_names: label value -> name, for the ``probe/dice_<name>`` scalars (default: the datalist's
            ``labels`` when ``data`` is a path, else the value).
        device: where the head is fitted and scored, e.g. "cpu" to spare GPU memory (None: the trainer's
            device); the backbone runs where it lives.
        seed: seed of the voxel sample and the head's initial weights.
        image_key: key of the image in ``data``.
        label_key: key of the label in ``data``.

    Raises:
        ValueError: bad arguments, too few volumes, or file paths without ``preset``.
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[Mapping[str, Any]],
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        num_classes: int | None = None,
        roi_size: Sequence[int] | int = DEFAULT_ROI,
        num_val: int = DEFAULT_NUM_VAL,
        max_volumes: int | None = DEFAULT_MAX_VOLUMES,
        splits: Sequence[str] = DEFAULT_SPLITS,
        preset: PresetConfig | None = None,
        head: str = "linear",
        hidden_channels: int = DEFAULT_HIDDEN_CHANNELS,
        feature_levels: Sequence[int] | None = None,
        points_per_volume: int = DEFAULT_POINTS_PER_VOLUME,
        fit_iterations: int = DEFAULT_FIT_ITERATIONS,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        source: str = "auto",
        class_names: Mapping[int | str, str] | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        roi = (roi_size,) * SPATIAL_DIMS if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        if len(roi) != SPATIAL_DIMS or min(roi) < 1:
            raise ValueError(f"roi_size must be {SPATIAL_DIMS} positive ints, got {roi_size!r}")
        for name, value in (("every_n_steps", every_n_steps), ("num_val", num_val),
                            ("points_per_volume", points_per_volume), ("fit_iterations", fit_iterations),
                            ("hidden_channels", hidden_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
        if max_volumes is not None and max_volumes < num_val + 1:
            raise ValueError(f"max_volumes={max_volumes} leaves no volume to fit with num_val={num_val}")
        if isinstance(data, (str, os.PathLike)):
            from medssl3d.data.datalist import load_datalist_report

            # Only the volumes used are read (by the preset, which names a bad file); unlabelled entries are left out.
            entries, unlabelled = load_datalist_report(
                data, splits=tuple(splits), keys=(image_key, label_key), validate=False
            )
            logger.info("probe: %d labelled entries in %s (%d without a %r left out)", len(entries), data,
                        len(unlabelled), label_key)
            if class_names is None:
                class_names = json.loads(Path(data).read_text()).get("labels")
        else:
            entries = [dict(e) for e in data]
        if len(entries) < num_val + 1:
            raise ValueError(f"the probe needs at least {num_val + 1} labelled volumes, got {len(entries)}")
        if max_volumes is not None and len(entries) > max_volumes:
            entries = entries[: max_volumes - num_val] + entries[-num_val:]
        for i, entry in enumerate(entries):
            missing = [k for k in (image_key, label_key) if k not in entry]
            if missing:
                raise ValueError(f"probe volume {i} has no {missing} key(s)")
            if preset is None and any(isinstance(entry[k], (str, os.PathLike)) for k in (image_key, label_key)):
                raise ValueError(f"probe volume {i} holds file paths: pass a preset to preprocess them")
        self.entries = entries
        self.every_n_steps = every_n_steps
        self.num_classes = num_classes
        self.roi_size = roi
        self.num_val = num_val
        self.preset = preset
        self.hidden_channels = hidden_channels if head == "mlp" else None
        self.feature_levels = None if feature_levels is None else tuple(int(i) for i in feature_levels)
        self.points_per_volume = points_per_volume
        self.fit_iterations = fit_iterations
        self.weight_decay = weight_decay
        self.source = source
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.device = None if device is None else torch.device(device)
        self.seed = seed
        self.image_key, self.label_key = image_key, label_key
        self._volumes: list[tuple[Tensor, Tensor]] | None = None
        self._started = time.perf_counter()
        self._total_s = 0.0

    # ------------------------------------------------------------------ data
    def volumes(self) -> list[tuple[Tensor, Tensor]]:
        """The cached ``(image (1, 1, *roi) float, label (*roi) long)`` pairs, built on the first call.

        Raises:
            ValueError: a label value outside ``[0, num_classes)`` or not an integer, or fewer than 2 classes.
        """
        if self._volumes is not None:
            return self._volumes
        t0 = time.perf_counter()
        transform = None
        if self.preset is not None:
            from medssl3d.data.presets import build_preset

            transform = build_preset(self.preset, keys=(self.image_key, self.label_key))
        volumes = []
        for i, entry in enumerate(self.entries):
            if any(isinstance(entry[k], (str, os.PathLike)) for k in (self.image_key, self.label_key)):
                entry = transform(dict(entry))
            image = _as_volume(entry[self.image_key], f"probe volume {i} {self.image_key!r}")
            label = _as_volume(entry[self.label_key], f"probe volume {i} {self.label_key!r}")
            if image.shape != label.shape:
                raise ValueError(f"probe volume {i}: image {tuple(image.shape)} and label {tuple(label.shape)} differ")
            if not torch.equal(label, label.round()) or label.min() < 0:
                raise ValueError(f"probe volume {i}: label values must be non-negative integers")
            image, label = crop_around_label(image, label, self.roi_size)
            volumes.append((image[None, None].contiguous(), label.long().contiguous()))
        top = max(int(label.max()) for _, label in volumes)
        if self.num_classes is None:
            self.num_classes = top + 1
            if self.num_classes < 2:
                raise ValueError("the probe volumes' labels hold background only")
        elif top >= self.num_classes:
            raise ValueError(f"probe label value {top} is outside [0, num_classes={self.num_classes})")
        if not any(int(label.max()) > 0 for _, label in volumes[-self.num_val :]):
            raise ValueError("the probe's validation volumes hold no labelled voxel inside roi_size")
        self._volumes = volumes
        logger.info("probe: %d volumes (%d fit, %d validate) cropped to %s, %d classes, cached in %.1f s",
                    len(volumes), len(volumes) - self.num_val, self.num_val, self.roi_size, self.num_classes,
                    time.perf_counter() - t0)
        return volumes

    # ------------------------------------------------------------------ the probe
    def _encode(
        self, backbone: nn.Module, image: Tensor, autocast: Callable[[], Any], device: torch.device
    ) -> list[Tensor]:
        """Features of ``image`` (encoded where ``backbone`` lives) as float32 on ``device``."""
        first = next(backbone.parameters(), None)
        with torch.no_grad(), autocast():
            features = backbone(image.to(first.device if first is not None else device)).features
        if self.feature_levels is not None:
            bad = [i for i in self.feature_levels if not -len(features) <= i < len(features)]
            if bad:
                raise ValueError(f"feature_levels {bad} out of range: the backbone gives {len(features)} levels")
            features = [features[i] for i in self.feature_levels]
        return [f.to(device, torch.float32) for f in features]

    def evaluate(
        self,
        backbone: nn.Module,
        *,
        device: str | torch.device | None = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> dict[str, float]:
        """Fit a head on ``backbone``'s frozen features and score it on the validation volumes.

        ``backbone`` runs in eval mode without gradients; its modes and every RNG stream are restored.

        Args:
            backbone: maps ``(1, 1, *roi)`` to an object with ``features`` ``[(1, C_l, D_l, H_l, W_l)]``
                (a :class:`~medssl3d.networks.backbones.BackboneOutput`).
            device: where the head is fitted and scored (None: where ``backbone`` lives); the backbone
                runs where its parameters are.
            autocast: context for the backbone's forward (e.g. the trainer's mixed precision).

        Returns:
            ``probe/dice`` (mean over classes), ``probe/dice_<class>`` and ``probe/fit_loss``.
        """
        if device is None:
            first = next(backbone.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        volumes = self.volumes()
        n_fit = len(volumes) - self.num_val
        with _isolated(backbone):
            generator = torch.Generator().manual_seed(self.seed)
            feats, targets = [], []
            for image, label in volumes[:n_fit]:
                levels = self._encode(backbone, image, autocast, device)
                points = sample_points(label, self.points_per_volume, generator)
                feats.append([gather_points(f, points.to(device), self.roi_size) for f in levels])
                targets.append(label[tuple(points.t())])
            feats = [torch.cat(level) for level in zip(*feats, strict=True)]
            target = torch.cat(targets).to(device)
            head = ProbeHead([f.shape[1] for f in feats], self.num_classes, self.hidden_channels,
                             generator=generator).to(device)
            head.set_normalisation(feats)
            fit_loss = fit_head(head, feats, target, iterations=self.fit_iterations, weight_decay=self.weight_decay)
            scores = []
            with torch.no_grad():
                for image, label in volumes[n_fit:]:
                    logits = head.forward_volume(self._encode(backbone, image, autocast, device), self.roi_size)
                    pred = logits.argmax(1, keepdim=True)
                    scores.append(compute_dice(pred, label[None, None].to(device), include_background=False,
                                               num_classes=self.num_classes).cpu())
        per_class = torch.cat(scores).nanmean(0)  # a class absent from a validation label is NaN there
        scalars = {}
        for c, value in enumerate(per_class.tolist(), start=1):
            if math.isfinite(value):
                scalars[f"{SCALAR_PREFIX}dice_{self.class_names.get(c, c)}"] = value
        scalars[f"{SCALAR_PREFIX}dice"] = float(np.mean(list(scalars.values())))
        scalars[f"{SCALAR_PREFIX}fit_loss"] = fit_loss
        return scalars

    # ------------------------------------------------------------------ the handler
    def attach(self, trainer: Pretrainer) -> None:
        """Run after every ``every_n_steps`` steps of ``trainer`` (rank 0 only)."""
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)

    def _on_started(self, trainer: Pretrainer) -> None:
        self._started = time.perf_counter()
        self._total_s = 0.0

    def _on_iteration(self, trainer: Pretrainer) -> None:
        if trainer.step % self.every_n_steps or not dist_utils.is_main_process():
            return
        t0 = time.perf_counter()
        scalars = self.evaluate(
            find_backbone(trainer.method, self.source), device=self.device or trainer.device,
            autocast=trainer.autocast,
        )
        now = time.perf_counter()
        self._total_s += now - t0
        training_s = now - self._started - self._total_s
        scalars[f"{SCALAR_PREFIX}time_s"] = now - t0
        scalars[f"{SCALAR_PREFIX}time_fraction"] = self._total_s / training_s if training_s > 0 else 0.0
        trainer.log_scalars(scalars)
        logger.info("probe at step %d: Dice %.3f in %.1f s (probe time so far: %.1f%% of training time)",
                    trainer.step, scalars[f"{SCALAR_PREFIX}dice"], now - t0,
                    100 * scalars[f"{SCALAR_PREFIX}time_fraction"])


__all__ = ["ProbeHead", "SegmentationProbe", "crop_around_label", "find_backbone", "fit_head",
           "gather_points", "sample_points"]
