"""MONAI model-zoo checks for every bundle in bundles/: files, offline metadata schema, network shapes, TorchScript.

What the model zoo's CI (``ci/verify_bundle.py``) runs on a bundle, offline and at tiny sizes: the files a
bundle ships, ``verify_metadata`` against the vendored schema, ``verify_net_in_out`` for the bundle that serves
a model, and ``ckpt_export --use_trace True`` whose TorchScript must compute what the eager network computes.

TorchScript of a pretraining bundle: its product is the encoder it exports for MONAI (``encoder_<target>.pt``),
so the traced network is that encoder as MONAI builds it, a feature extractor that needs only MONAI to load:
``SwinUNETR(...).swinViT`` (5 multi-scale maps) for ``swinunetr`` and ``UNETR(...).vit`` (tokens and hidden
states) for ``unetr``. The method module itself (student, teacher, heads, losses; ``forward(batch, step)``) is
a training object, not a network to deploy, and cannot be traced.
"""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.networks.nets import UNETR, SwinUNETR

from medssl3d.bundle_support.verify import INFERENCE_CONFIG, verify_bundle
from medssl3d.networks.backbones import BACKBONE_SIZES, EXPORT_TARGETS
from medssl3d.transfer.export import load_pretrained

# tracing Swin's shape arithmetic warns that the trace is valid for the traced input shape only, as intended
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
BUNDLES = sorted(p.parent.parent.name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))
# a bundle that serves a model (MONAI Label, inference) has inference.json; the others are pretraining bundles
SERVING = [b for b in BUNDLES if (BUNDLES_DIR / b / INFERENCE_CONFIG).is_file()]
PRETRAINING = [b for b in BUNDLES if b not in SERVING]
SEGMENTATION = "segmentation"

MODEL_ZOO_FILES = ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE")
ENTRY_CONFIGS = ("configs/train.json", "configs/inference.json")
SERVING_FILES = ("configs/inference.json", "configs/evaluate.json")

# Segmentation network at the smoke size. SwinUNETR's smallest input is 64^3 (metadata "32*n", n=2): its
# instance norm at the 1/32 bottleneck needs more than one voxel.
SEG_FEATURES = 12
SEG_N = 2
SEG_INPUT = (1, 1, 64, 64, 64)
SEG_UNETR = {"arch": "unetr", "roi_size": [64, 64, 64], "feature_size": 16, "vit_hidden_size": 192,
             "vit_mlp_dim": 768, "vit_num_heads": 3}

# MONAI's swinViT alone has no instance norm, so 32^3 is enough; UNETR's ViT takes exactly its img_size.
SWIN_ENCODER_INPUT = (1, 1, 32, 32, 32)
ENCODER_NET_ID = "encoder_net"
_VIT = "medssl3d.networks.backbones.BACKBONE_SIZES['vit'][@backbone_size]"
ENCODER_NETS = {
    "swinunetr": (
        "$monai.networks.nets.SwinUNETR(in_channels=1, out_channels=1, "
        "feature_size=medssl3d.networks.backbones.BACKBONE_SIZES['swin'][@backbone_size].feature_size).swinViT"
    ),
    "unetr": (
        "$monai.networks.nets.UNETR(in_channels=1, out_channels=1, img_size=@roi_size, "
        f"hidden_size={_VIT}.hidden_size, mlp_dim={_VIT}.mlp_dim, num_heads={_VIT}.num_heads).vit"
    ),
}


def bundle_configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES_DIR / bundle / "configs" / f"{n}.json") for n in names]


def meta_file(bundle: str) -> str:
    return str(BUNDLES_DIR / bundle / "configs" / "metadata.json")


def copy_bundle(bundle: str, dest: Path) -> Path:
    return Path(shutil.copytree(BUNDLES_DIR / bundle, dest / bundle,
                                ignore=shutil.ignore_patterns("smoke", "models", "runs", "eval", "__pycache__")))


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a network output (a tensor, or nested lists / tuples of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for part in output for t in tensors(part)]


def assert_same_outputs(actual, expected) -> None:
    actual, expected = tensors(actual), tensors(expected)
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_discovers_serving_and_pretraining_bundles():
    assert SEGMENTATION in SERVING
    assert len(PRETRAINING) >= 1 and "swin_ssl" in PRETRAINING


# ---------------------------------------------------------------------------------------------------------
# files and metadata
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_ships_model_zoo_files(bundle):
    root = BUNDLES_DIR / bundle
    required = MODEL_ZOO_FILES + (SERVING_FILES if bundle in SERVING else ())
    assert [name for name in required if not (root / name).is_file()] == []
    assert any((root / name).is_file() for name in ENTRY_CONFIGS)
    assert (root / "docs" / "README.md").read_text().strip() and (root / "LICENSE").read_text().strip()
    logging_conf = configparser.ConfigParser()
    logging_conf.read(root / "configs" / "logging.conf")
    assert logging_conf.get("loggers", "keys").strip() == "root" and logging_conf.has_section("logger_root")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_valid_against_vendored_schema_offline(bundle):
    meta = json.loads(Path(meta_file(bundle)).read_text())
    assert meta["version"] in meta["changelog"]
    assert verify_bundle(BUNDLES_DIR / bundle, check_network=False) == []


def _drop_evaluate(root: Path) -> str:
    (root / "configs" / "evaluate.json").unlink()
    return "evaluate.json: missing"


def _version_without_changelog(root: Path) -> str:
    path = root / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["version"] = "9.9.9"
    path.write_text(json.dumps(meta))
    return "version 9.9.9 has no changelog entry"


def _logging_handler_without_section(root: Path) -> str:
    path = root / "configs" / "logging.conf"
    path.write_text(path.read_text().replace("[handler_consoleHandler]", "[handler_renamed]"))
    return "no [handler_consoleHandler] section"


def _schema_violation(root: Path) -> str:
    path = root / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["network_data_format"]["inputs"]["image"]["dtype"] = "float33"
    path.write_text(json.dumps(meta))
    return "float33"


@pytest.mark.parametrize(
    "bundle, breaks",
    [(SEGMENTATION, _drop_evaluate), ("swin_ssl", _version_without_changelog),
     ("swin_ssl", _logging_handler_without_section), ("swin_ssl", _schema_violation)],
)
def test_verify_bundle_reports_each_model_zoo_rule(tmp_path, bundle, breaks):
    root = copy_bundle(bundle, tmp_path)
    assert verify_bundle(root, check_network=False) == []
    expected = breaks(root)
    problems = verify_bundle(root, check_network=False)
    assert len(problems) == 1 and expected in problems[0], problems


# ---------------------------------------------------------------------------------------------------------
# segmentation: network shapes and TorchScript
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{"feature_size": SEG_FEATURES}, SEG_UNETR], ids=["swinunetr", "unetr"])
def test_segmentation_network_matches_metadata_shapes(overrides):
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta_file(SEGMENTATION),
        config_file=bundle_configs(SEGMENTATION, "inference"),
        device="cpu",
        n=SEG_N,
        bundle_root=str(BUNDLES_DIR / SEGMENTATION),
        **overrides,
    )


def test_segmentation_torchscript_export_matches_eager(tmp_path):
    root = BUNDLES_DIR / SEGMENTATION
    parser = ConfigParser()
    parser.read_config(bundle_configs(SEGMENTATION, "inference"))
    parser.update({"bundle_root": str(root), "feature_size": SEG_FEATURES})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")

    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=meta_file(SEGMENTATION),
        config_file=bundle_configs(SEGMENTATION, "inference"),
        use_trace=True,
        input_shape=list(SEG_INPUT),
        # the outputs are compared below, on another input than the one traced
        converter_kwargs={"check_trace": False},
        bundle_root=str(root),
        feature_size=SEG_FEATURES,
    )
    extra = {"metadata.json": "", "inference.json": ""}
    traced = torch.jit.load(tmp_path / "model.ts", _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    channels = json.loads(Path(meta_file(SEGMENTATION)).read_text())["network_data_format"]["outputs"]["pred"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == channels["channel_def"]
    assert "network_def" in json.loads(extra["inference.json"])

    x = torch.rand(SEG_INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
        actual = traced(x)
    assert actual.shape == (1, channels["num_channels"], *SEG_INPUT[2:])
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# pretraining bundles: the exported encoder as TorchScript
# ---------------------------------------------------------------------------------------------------------
def reference_encoder(target: str, backbone_size: str, roi_size, weights) -> torch.nn.Module:
    """The encoder as a MONAI user gets it: the target network built by MONAI, the exported weights loaded."""
    if target == "swinunetr":
        net = SwinUNETR(in_channels=1, out_channels=1, feature_size=BACKBONE_SIZES["swin"][backbone_size].feature_size)
    else:
        vit = BACKBONE_SIZES["vit"][backbone_size]
        net = UNETR(in_channels=1, out_channels=1, img_size=roi_size, hidden_size=vit.hidden_size,
                    mlp_dim=vit.mlp_dim, num_heads=vit.num_heads)
    report = load_pretrained(net, weights)
    assert report.encoder_matched == report.encoder_total > 0
    return (net.swinViT if target == "swinunetr" else net.vit).eval()


@pytest.mark.parametrize("bundle", PRETRAINING)
def test_pretraining_encoder_torchscript_export_matches_eager(bundle, tmp_path):
    configs = bundle_configs(bundle, "train", "smoke")
    ids = {"bundle_root": str(BUNDLES_DIR / bundle), "smoke_dir": str(tmp_path / "smoke")}
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(ids)
    target, backbone_size, roi_size = (parser.get_parsed_content(k) for k in ("export_target", "backbone_size",
                                                                                "roi_size"))
    assert target in ENCODER_NETS, f"{bundle}: no TorchScript encoder defined for export target {target!r}"
    torch.manual_seed(0)
    exported = parser.get_parsed_content("method").export_state_dict(target)  # what the bundle's `export` saves
    prefix = EXPORT_TARGETS[target].encoder_prefix
    encoder = {k[len(prefix):]: v for k, v in exported.items() if k.startswith(prefix)}
    torch.save(encoder, tmp_path / "model.pt")

    input_shape = SWIN_ENCODER_INPUT if target == "swinunetr" else (1, 1, *roi_size)
    ckpt_export(
        net_id=ENCODER_NET_ID,
        filepath=str(tmp_path / "encoder.ts"),
        ckpt_file=str(tmp_path / "model.pt"),  # loaded with strict=True: the keys must be exactly the encoder's
        meta_file=meta_file(bundle),
        config_file=configs,
        use_trace=True,
        input_shape=list(input_shape),
        converter_kwargs={"check_trace": False},
        **{ENCODER_NET_ID: ENCODER_NETS[target], **ids},
    )
    traced = torch.jit.load(tmp_path / "encoder.ts")

    reference = reference_encoder(target, backbone_size, roi_size, exported)
    x = torch.rand(input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_outputs(traced(x), reference(x))
