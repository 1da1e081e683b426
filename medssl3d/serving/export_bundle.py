"""``medssl3d export-bundle RUN -o DIR``: a fine-tuning run as a MONAI bundle that any MONAI install serves.

The segmentation bundle's own configs import medssl3d (its readers, presets and network builder), so serving
it needs medssl3d beside MONAI. The exported bundle does not: its ``configs/inference.json`` spells the run's
preset with MONAI transforms (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``,
``ScaleIntensityRanged`` for a CT window or ``ScaleIntensityRangePercentilesd`` for MRI, ``CropForegroundd``)
with the preset's numbers, builds ``monai.networks.nets.SwinUNETR`` / ``UNETR`` with the run's literal
settings, and inverts the prediction to the input's grid (``Invertd``) before ``SaveImaged``. Its ``run``
section is a plain loop (no ignite), so ``python -m monai.bundle run`` works in an environment holding only
torch, monai, nibabel and einops, and MONAI Label's ``monaibundle`` app reads the standard ids (``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``).

Layout written to ``DIR``::

    configs/inference.json   MONAI components only
    configs/metadata.json    class names, the preset (modality, spacing, intensity mapping), versions
    configs/logging.conf
    models/model.pt          the run's best model (a plain state dict)
    large_files.yml          models/model.pt as the MONAI model zoo lists large files (path, url, hash)
    docs/README.md
    LICENSE
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medssl3d
from medssl3d.bundle_support.weights import WeightsReport
from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_KEY = "image"
PRED_KEY = "pred"
HASH_TYPE = "sha256"
MODEL_FILE = Path("models") / "model.pt"
LARGE_FILES = "large_files.yml"
#: The ids of the segmentation bundle's ``inference.json`` the export reads, resolved with the run's settings.
RESOLVED_IDS = (
    "preset", "label_names", "arch", "feature_size", "roi_size", "vit_hidden_size", "vit_mlp_dim", "vit_num_heads",
    "sw_batch_size", "sw_overlap",
)
ARCH_NAMES = {"swinunetr": "SwinUNETR", "unetr": "UNETR"}
#: What a modality is called in the MONAI metadata, and what its voxel values are.
METADATA_MODALITY = {"ct": ("CT", "hounsfield"), "mri": ("MR", "magnitude")}
#: Config files a server parses; ``metadata.json`` may name medssl3d as provenance without importing it.
_PARSED_CONFIGS = ("*.json", "*.yaml", "*.yml", "*.conf")
_METADATA = "metadata.json"


def medssl3d_references(bundle: str | os.PathLike) -> list[str]:
    """Where a bundle's configs need the medssl3d package: ``["inference.json: $import medssl3d", ...]``.

    Expressions (``$...``), ``_target_`` values and ``logging.conf`` lines that mention medssl3d count, and
    so does a ``medssl3d`` entry of ``metadata.json``'s ``required_packages_version``; prose does not.

    Returns:
        One ``"<file>: <text>"`` per reference; empty for a bundle of MONAI components only.
    """
    folder = Path(bundle) / "configs"
    found: list[str] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if isinstance(target, str) and "medssl3d" in target:
                found.append(f"{name}: _target_ {target}")
            for key, value in node.items():
                if key != "_target_":
                    walk(value, name)
        elif isinstance(node, list):
            for value in node:
                walk(value, name)
        elif isinstance(node, str) and node.startswith("$") and "medssl3d" in node:
            found.append(f"{name}: {node}")

    from monai.bundle import ConfigParser

    for pattern in _PARSED_CONFIGS:
        for path in sorted(folder.glob(pattern)):
            if path.suffix == ".conf":
                lines = path.read_text().splitlines()
                found += [f"{path.name}: {line.strip()}" for line in lines if "medssl3d" in line]
            elif path.name == _METADATA:
                packages = json.loads(path.read_text()).get("required_packages_version", {})
                found += [f"{path.name}: required package {p}" for p in packages if "medssl3d" in p.lower()]
            else:
                walk(ConfigParser.load_config_file(str(path)), path.name)
    return found


def preprocessing_transforms(preset) -> list[dict[str, Any]]:
    """The deterministic preprocessing of a :class:`~medssl3d.data.presets.PresetConfig` as MONAI transform configs.

    The image-key steps of :func:`medssl3d.data.presets.build_preset`, number for number: load (NIfTI through
    nibabel, as medssl3d's reader; other formats through whatever reader MONAI has), channel first, reorient,
    resample (bilinear), scale intensities (window or percentiles), crop to the foreground box with its margin.
    medssl3d's input checks (2D/4D volumes, NaN voxels) have no MONAI transform and are left out.

    Raises:
        ValueError: the preset does something MONAI has no transform for (N4 bias correction, 4D selection).
    """
    if preset.n4_bias_correction:
        raise ValueError("the run's preset corrects the bias field with N4 (SimpleITK), which MONAI has no transform "
                         "for; export a run fine-tuned without n4_bias_correction")
    if preset.allow_4d_index is not None:
        raise ValueError(f"the run's preset takes volume {preset.allow_4d_index} of 4D inputs, which MONAI's "
                         "LoadImaged cannot; export a run fine-tuned on 3D volumes")
    key = IMAGE_KEY
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": key, "image_only": True, "dtype": "$numpy.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": key},
        {"_target_": "Orientationd", "keys": key, "axcodes": preset.axcodes,
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Spacingd", "keys": key, "pixdim": list(preset.spacing), "mode": "bilinear"},
    ]
    if preset.scaling == "window":
        transforms.append({"_target_": "ScaleIntensityRanged", "keys": key, "a_min": preset.a_min,
                           "a_max": preset.a_max, "b_min": preset.b_min, "b_max": preset.b_max, "clip": preset.clip})
    else:
        transforms.append({"_target_": "ScaleIntensityRangePercentilesd", "keys": key,
                           "lower": preset.lower_percentile, "upper": preset.upper_percentile,
                           "b_min": preset.b_min, "b_max": preset.b_max, "clip": preset.clip})
    if preset.crop_foreground:
        transforms.append({"_target_": "CropForegroundd", "keys": key, "source_key": key,
                           "select_fn": f"$lambda x: x > {float(preset.foreground_threshold)!r}",
                           "margin": preset.crop_margin, "allow_smaller": True,
                           "start_coord_key": None, "end_coord_key": None})
    transforms.append({"_target_": "EnsureTyped", "keys": key, "dtype": "$torch.float32", "track_meta": True})
    return transforms


def network_config(settings: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """``network_def`` as MONAI's own network with literal settings (what ``build_segmentation_network`` builds).

    Raises:
        ValueError: an ``arch`` other than ``swinunetr`` / ``unetr``.
    """
    arch = settings["arch"]
    common = {"in_channels": 1, "out_channels": int(num_classes), "feature_size": int(settings["feature_size"]),
              "spatial_dims": 3}
    if arch == "swinunetr":
        return {"_target_": "monai.networks.nets.SwinUNETR", **common, "use_checkpoint": False}
    if arch == "unetr":
        return {"_target_": "monai.networks.nets.UNETR", **common, "img_size": [int(r) for r in settings["roi_size"]],
                "hidden_size": int(settings["vit_hidden_size"]), "mlp_dim": int(settings["vit_mlp_dim"]),
                "num_heads": int(settings["vit_num_heads"])}
    raise ValueError(f"arch={arch!r} is not one of ('swinunetr', 'unetr')")


def inference_config(
    preprocessing: list[dict[str, Any]], network: dict[str, Any], *, roi_size, sw_batch_size: int, sw_overlap: float
) -> dict[str, Any]:
    """The exported ``inference.json``: MONAI components, the standard ids, a ``run`` loop without ignite."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data/imagesTs'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "roi_size": [int(r) for r in roi_size],
        "sw_batch_size": int(sw_batch_size),
        "sw_overlap": float(sw_overlap),
        "network_def": network,
        "network": "$@network_def.to(@device)",
        # MONAI Label's request carries `image_path`; keep it out of the transforms and give it back at the end.
        "request_key_stash": [
            {"_target_": "CopyItemsd", "keys": "image_path", "names": "source_path", "allow_missing_keys": True},
            {"_target_": "DeleteItemsd", "keys": "image_path"},
        ],
        "preprocessing": {"_target_": "Compose", "transforms": "$@request_key_stash + @preprocessing_transforms"},
        "preprocessing_transforms": preprocessing,
        "dataset": {"_target_": "Dataset", "data": f"$[{{'{IMAGE_KEY}': i}} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": "@sw_batch_size",
                    "overlap": "@sw_overlap"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": PRED_KEY, "softmax": True},
                {"_target_": "Invertd", "keys": PRED_KEY, "transform": "@preprocessing", "orig_keys": IMAGE_KEY,
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": PRED_KEY, "argmax": True},
                {"_target_": "SaveImaged", "keys": PRED_KEY, "output_dir": "@output_dir", "output_postfix": PRED_KEY,
                 "output_dtype": "$torch.uint8", "resample": False, "separate_folder": False, "print_log": False},
                {"_target_": "CopyItemsd", "keys": "source_path", "names": "image_path", "allow_missing_keys": True},
            ],
        },
        # one batch (one volume) -> its items with the prediction, for the postprocessing
        "predict": (f"$torch.no_grad()(lambda batch: monai.data.decollate_batch("
                    f"{{**batch, '{PRED_KEY}': @inferer(batch['{IMAGE_KEY}'].to(@device), @network)}}))"),
        "initialize": [
            "$@network.load_state_dict(torch.load(@ckpt_dir + '/model.pt', map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$[@postprocessing(item) for batch in @dataloader for item in @predict(batch)]"],
    }


def _preset_line(preset) -> str:
    """E.g. ``RAS, 1.5x1.5x1.5 mm, window -125..225 to [0, 1], cropped to the foreground``."""
    scaling = (f"window {preset.a_min:g}..{preset.a_max:g}" if preset.scaling == "window"
               else f"percentiles {preset.lower_percentile:g}..{preset.upper_percentile:g}")
    crop = ", cropped to the foreground" if preset.crop_foreground else ""
    spacing = "x".join(f"{s:g}" for s in preset.spacing)
    return f"{preset.axcodes}, {spacing} mm, {scaling} to [{preset.b_min:g}, {preset.b_max:g}]{crop}"


def preset_description(preset) -> dict[str, Any]:
    """The preset as the exported metadata states it (modality, orientation, spacing, intensity mapping, crop)."""
    if preset.scaling == "window":
        intensity = {"window": [preset.a_min, preset.a_max], "unit": "HU" if preset.modality == "ct" else "scanner"}
    else:
        intensity = {"percentiles": [preset.lower_percentile, preset.upper_percentile]}
    crop = ({"threshold": preset.foreground_threshold, "margin_voxels": preset.crop_margin}
            if preset.crop_foreground else None)
    return {"modality": METADATA_MODALITY[preset.modality][0], "axcodes": preset.axcodes,
            "spacing_mm": list(preset.spacing), "intensity": {**intensity, "to": [preset.b_min, preset.b_max],
                                                              "clip": preset.clip},
            "crop_foreground": crop}


@dataclass(frozen=True)
class ExportedBundle:
    """What :func:`export_bundle` wrote.

    Attributes:
        path: the bundle folder.
        arch: ``"swinunetr"`` or ``"unetr"``.
        label_names: class value -> name.
        model_hash: the ``sha256`` of ``models/model.pt``.
        url: the ``url`` of ``models/model.pt`` in ``large_files.yml``.
        weights: ``models/model.pt`` against the exported network, counted by name and shape (a full match).
    """

    path: Path
    arch: str
    label_names: dict[str, str]
    model_hash: str
    url: str
    weights: WeightsReport

    def summary(self) -> str:
        """One line for the command's output."""
        return (f"wrote {self.path}: MONAI {self.arch} bundle of MONAI components only, {len(self.label_names)} "
                f"classes, model.pt {self.weights.summary()}")


def _resolve_run(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The segmentation bundle's inference ids resolved with the run's recorded settings, and its model file."""
    from medssl3d.jobs.bundles import bundle_dir, read_configs
    from medssl3d.jobs.finetune import SEGMENTATION, read_run_record, trained_model

    record = read_run_record(run_dir)
    model = trained_model(run_dir)
    bundle = bundle_dir(SEGMENTATION)
    parser = read_configs(bundle, ("inference",))
    parser.update({"bundle_root": str(bundle), **record["settings"]})
    return {key: parser.get_parsed_content(key) for key in RESOLVED_IDS}, model


def _copy_model(source: Path, target: Path) -> None:
    """Copy the run's ``model.pt``, which must be a plain state dict (MONAI's ``CheckpointSaver`` writes one).

    Raises:
        InputError: the file holds something else (a full training checkpoint), which the exported config's
            ``load_state_dict`` and MONAI Label could not load.
    """
    import torch

    loaded = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(source, "is not a plain state dict (name -> tensor); export the run's best model, "
                                 "models/model.pt as fine-tuning saved it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata(template: dict, *, name: str, run_dir: Path, resolved: Mapping[str, Any]) -> dict[str, Any]:
    import einops
    import monai
    import nibabel
    import numpy
    import torch

    preset, labels = resolved["preset"], dict(resolved["label_names"])
    modality, value_format = METADATA_MODALITY[preset.modality]
    shape = (["32*n"] * 3 if resolved["arch"] == "swinunetr" else [int(r) for r in resolved["roi_size"]])
    meta = dict(template)
    meta.update({
        "changelog": {template["version"]: f"exported by medssl3d {medssl3d.__version__} from the fine-tuning run "
                                           f"{run_dir.name}, MONAI components only"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "einops": einops.__version__},
        "name": name,
        "description": (
            f"MONAI {ARCH_NAMES[resolved['arch']]} fine-tuned with medssl3d for {modality} segmentation "
            f"({', '.join(labels.values())}), exported as a bundle of MONAI components only: running or serving it "
            f"needs torch, monai, nibabel and einops, not medssl3d. Preprocessing: {_preset_line(preset)}."
        ),
        "data_source": f"the datalist of medssl3d fine-tuning run {run_dir.name}",
        "image_classes": (f"single channel {modality} volume, scaled to [{preset.b_min:g}, {preset.b_max:g}] by the "
                          "preprocessing in configs/inference.json (see 'preprocessing' below)"),
        "preprocessing": preset_description(preset),
    })
    meta["network_data_format"] = {
        "inputs": {IMAGE_KEY: {**template["network_data_format"]["inputs"][IMAGE_KEY], "modality": modality,
                               "format": value_format, "spatial_shape": shape,
                               "value_range": [preset.b_min, preset.b_max]}},
        "outputs": {PRED_KEY: {**template["network_data_format"]["outputs"][PRED_KEY], "num_channels": len(labels),
                               "spatial_shape": shape, "channel_def": labels}},
    }
    return meta


def _readme(meta: Mapping[str, Any], network: Mapping[str, Any], *, url_is_local: bool) -> str:
    labels = meta["network_data_format"]["outputs"][PRED_KEY]["channel_def"]
    settings = ", ".join(f"{k}={v}" for k, v in network.items() if k != "_target_")
    where = ("the `file://` address of the weights it was exported from on the exporting machine: "
             "`python -m monai.bundle download_large_files --bundle_path .` there verifies the copy (or restores "
             "it), and nowhere else. Publish `models/model.pt` (a release asset, your artifact store) and put its "
             "address in `url` (or export with `--url`) before sharing the bundle without the file"
             if url_is_local else "the address the weights were published at (`--url` of the export)")
    return f"""# {meta['name']}

{meta['description']}

Exported by `medssl3d export-bundle` ({meta['changelog'][meta['version']]}). Research use only, not for
clinical use.

## Network

`{network['_target_']}` ({settings}); weights in `models/model.pt` (a plain state dict, loaded with
`strict=True`).

## Classes

| value | name |
|---|---|
{chr(10).join(f'| {k} | {v} |' for k, v in labels.items())}

## Preprocessing

MONAI transforms in `configs/inference.json` (`preprocessing_transforms`):

```json
{json.dumps(meta['preprocessing'], indent=2)}
```

The prediction is a softmax over a sliding window, inverted to the input's grid (`Invertd`) and written by
`SaveImaged` as `<name>_pred.nii.gz` (uint8 class values) with the input's shape and affine.

## Run

Needs torch, monai ({meta['monai_version']}; `pip install "monai[fire]"` for the `python -m monai.bundle` command
line), nibabel (NIfTI) and einops (MONAI's transformer blocks) only.

```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/imagesTs --output_dir out
python -m monai.bundle run --config_file configs/inference.json --datalist "['/data/a.nii.gz']" --output_dir out
```

## Serve with MONAI Label

Put the folder in a `monaibundle` app's `model/` folder and start the server with `--conf models <folder name>`
(or `medssl3d label-server <this folder>`, which serves it without copying medssl3d).

## Large files

`large_files.yml` lists `models/model.pt` as the MONAI model zoo does (`path`, `url`, `hash_val`,
`hash_type`). `url` is {where}.
"""


def export_bundle(
    run: str | os.PathLike, out: str | os.PathLike, *, url: str | None = None, name: str | None = None
) -> ExportedBundle:
    """Write the MONAI-only bundle of a fine-tuning run (see the module docstring for the layout).

    The folder is written beside ``out`` and renamed into place, so a failed export leaves nothing half-written.

    Args:
        run: a run folder of ``medssl3d finetune`` (``run.json``, ``models/model.pt``).
        out: the bundle folder to create (it must not exist, or be empty).
        url: where ``models/model.pt`` is (or will be) published; ``None``: the ``file://`` address of the
            weights it was exported from.
        name: the bundle's name in its metadata (default: ``<run folder name> segmentation``).

    Returns:
        What was written.

    Raises:
        InputError: not a run folder, no model yet, ``out`` not empty, or ``model.pt`` not the run's network.
        ValueError: the run's preset has a step MONAI cannot express.
    """
    from medssl3d.bundle_support.weights import check_bundle_weights
    from medssl3d.jobs.bundles import bundle_dir
    from medssl3d.jobs.finetune import SEGMENTATION

    run_dir = Path(run).expanduser().resolve()
    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(target, "already exists and is not empty; export to a new folder")
    resolved, model = _resolve_run(run_dir)
    template_dir = bundle_dir(SEGMENTATION)
    labels = {str(k): str(v) for k, v in dict(resolved["label_names"]).items()}
    resolved = {**resolved, "label_names": labels}
    network = network_config(resolved, len(labels))
    inference = inference_config(preprocessing_transforms(resolved["preset"]), network,
                                 roi_size=resolved["roi_size"], sw_batch_size=resolved["sw_batch_size"],
                                 sw_overlap=resolved["sw_overlap"])
    template = json.loads((template_dir / "configs" / _METADATA).read_text())
    meta = _metadata(template, name=name or f"{run_dir.name} segmentation", run_dir=run_dir, resolved=resolved)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "docs").mkdir()
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        (staging / "configs" / _METADATA).write_text(json.dumps(meta, indent=4) + "\n")
        shutil.copyfile(template_dir / "configs" / "logging.conf", staging / "configs" / "logging.conf")
        shutil.copyfile(template_dir / "LICENSE", staging / "LICENSE")
        _copy_model(model, staging / MODEL_FILE)
        link = url or model.as_uri()
        digest = _sha256(staging / MODEL_FILE)
        (staging / LARGE_FILES).write_text(
            "large_files:\n"
            f"  - path: \"{MODEL_FILE.as_posix()}\"\n"
            f"    url: \"{link}\"\n"
            f"    hash_val: \"{digest}\"\n"
            f"    hash_type: \"{HASH_TYPE}\"\n"
        )
        (staging / "docs" / "README.md").write_text(_readme(meta, network, url_is_local=url is None))
        references = medssl3d_references(staging)
        if references:
            raise RuntimeError(f"the exported configs still need medssl3d: {references}")
        report = check_bundle_weights(staging)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: model.pt %s", target, report.summary())
    return ExportedBundle(path=target, arch=resolved["arch"], label_names=labels, model_hash=digest, url=link,
                          weights=report)
