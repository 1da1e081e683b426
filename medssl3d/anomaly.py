"""Anomaly heatmaps of a trained AFiRe model, written as NIfTI on the input volume's own grid.

See ``docs/methods.md`` (section "AFiRe-3D").

The volume goes through the data preset (orientation, spacing, intensity scaling, foreground crop)
and AFiRe's alignment (foreground crop, resize to the model's grid), exactly as in pretraining.
On that grid two maps are computed: the voxel restoration error ``|x - restore(x)|`` smoothed
by a Gaussian, where each token is restored with its mask token from its neighbours
(:meth:`~medssl3d.methods.afire.Afire.anomaly_maps`: what the anomaly-removal objective trains), and
the per-token distance to the position's prototype mean, spread over each token's patch. Every
preprocessing step is a MONAI ``InvertibleTransform``, so ``Compose.inverse`` (resize back, un-crop
with zeros, resample to the input spacing, reorient) puts each map on the input's voxel grid with the
input's affine: the heatmaps overlay the input voxel for voxel.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, GaussianSmooth

from medssl3d.data.phantoms import write_nifti
from medssl3d.data.presets import CT_PRESET, MRI_PRESET, PresetConfig, build_preset
from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.methods.afire import Afire, config_from_checkpoint
from medssl3d.transforms.alignment import CROP_MARGIN, alignment_transforms

logger = logging.getLogger(__name__)

__all__ = ["MAP_NAMES", "anomaly_maps_for", "load_afire", "write_anomaly_maps"]

PRESETS = {"ct": CT_PRESET, "mri": MRI_PRESET}
SMOOTHING_SIGMA = 1.0
"""Gaussian sigma (voxels of the aligned grid) applied to the voxel restoration error."""
MAP_NAMES = ("restoration_error", "token_distance")
NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def load_afire(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> Afire:
    """Rebuild a trained :class:`~medssl3d.methods.afire.Afire` from an engine checkpoint, in eval mode.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint was not written by the afire method.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("method") != Afire.name:
        raise ValueError(f"{checkpoint}: written by method {ckpt.get('method')!r}, not {Afire.name!r}")
    method = Afire(config_from_checkpoint(ckpt["model"]))
    method.load_state_dict(ckpt["model"])
    return method.to(device).eval()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@torch.no_grad()
def anomaly_maps_for(
    method: Afire, image: torch.Tensor, smoothing_sigma: float = SMOOTHING_SIGMA
) -> dict[str, torch.Tensor]:
    """Both heatmaps of one aligned volume.

    Args:
        method: a trained AFiRe method.
        image: ``(C, *img_size)`` on the aligned grid, intensities in [0, 1].
        smoothing_sigma: Gaussian sigma (voxels) of the restoration error (0: none).

    Returns:
        ``{"restoration_error": (1, *img_size), "token_distance": (1, *img_size)}``; the restoration
        error is averaged over channels, the token distance is constant over each token's patch.
    """
    cfg = method.config
    device = next(method.parameters()).device
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None]
    maps = method.anomaly_maps(x)
    error = (x - maps["restoration"]).abs().mean(dim=1)
    if smoothing_sigma > 0:
        error = GaussianSmooth(sigma=smoothing_sigma)(error)
    p = cfg.patch_size
    tokens = maps["token_distance"].reshape(1, *cfg.grid_size)
    spread = tokens.repeat_interleave(p, 1).repeat_interleave(p, 2).repeat_interleave(p, 3)
    return {"restoration_error": error.cpu(), "token_distance": spread.cpu()}


def write_anomaly_maps(
    checkpoint: str | os.PathLike,
    volume_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    modality: str = "mri",
    preset: PresetConfig | None = None,
    template: str | os.PathLike | None = None,
    foreground_threshold: float | None = None,
    margin: int = CROP_MARGIN,
    smoothing_sigma: float = SMOOTHING_SIGMA,
    device: str | torch.device = "cpu",
) -> dict[str, Path]:
    """Write the voxel restoration error and the token prototype distance of one volume as NIfTI.

    The preprocessing must match pretraining: the same preset (by ``modality`` or given), the same
    alignment crop threshold (by default the preset's, as the afire bundle uses), ``margin`` and ``template``.

    Args:
        checkpoint: an afire pretraining checkpoint (``runs/checkpoints/last.pt``).
        volume_path: a NIfTI / NRRD / MHA file or a DICOM series folder.
        out_dir: output folder (created).
        modality: ``"ct"`` or ``"mri"`` (picks the preset when ``preset`` is None).
        preset: the data preset used in pretraining (overrides ``modality``).
        template: the registration template used in pretraining, if any.
        foreground_threshold: alignment crop threshold used in pretraining (None: the preset's).
        margin: alignment crop margin used in pretraining.
        smoothing_sigma: Gaussian sigma (aligned-grid voxels) of the restoration error.
        device: where the model runs.

    Returns:
        ``{"restoration_error": path, "token_distance": path}``, files
        ``<out_dir>/<volume stem>_<map>.nii.gz`` with the input's shape and affine.

    Raises:
        ValueError: an unknown modality or a checkpoint of another method.
        InputError: the volume cannot be read or is invalid (from the preset's loader and checks).
    """
    if preset is None:
        if modality not in PRESETS:
            raise ValueError(f"modality must be one of {sorted(PRESETS)}, got {modality!r}")
        preset = PRESETS[modality]
    method = load_afire(checkpoint, device)
    cfg = method.config
    pipeline = Compose(
        [
            build_preset(preset, keys=(cfg.image_key,)),
            alignment_transforms(
                (cfg.image_key,),
                cfg.img_size,
                foreground_threshold=preset.foreground_threshold
                if foreground_threshold is None
                else foreground_threshold,
                margin=margin,
                template=template,
                extent_tolerance=None,
            ),
        ]
    )
    volume_path = Path(volume_path)
    image = pipeline({cfg.image_key: str(volume_path)})[cfg.image_key]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, heat in anomaly_maps_for(method, image.as_tensor(), smoothing_sigma).items():
        # Deep copies: MONAI's inverses pop entries from the recorded operations' dicts.
        aligned = MetaTensor(
            heat, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
        )
        on_input = pipeline.inverse({cfg.image_key: aligned})[cfg.image_key]
        path = out_dir / f"{_stem(volume_path)}_{name}.nii.gz"
        written[name] = write_nifti(on_input[0].numpy().astype("float32"), on_input.affine.numpy(), path)
        logger.info("wrote %s (%s)", path, name)
    return written
