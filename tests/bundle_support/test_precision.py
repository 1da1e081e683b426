"""The bundles' default precision: bf16 only where the GPU has it natively, fp16 on other GPUs, fp32 on a CPU."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medssl3d.bundle_support.precision import default_precision

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
PRETRAINING = ("ace", "afire", "alice", "dira", "swin_ssl")
TARGET = "medssl3d.bundle_support.precision.default_precision"


@pytest.mark.parametrize(
    ("cuda", "native_bf16", "expected"), [(False, False, "fp32"), (True, False, "fp16"), (True, True, "bf16")]
)
def test_default_precision(monkeypatch, cuda, native_bf16, expected):
    asked = {}

    def bf16(including_emulation=True):
        asked["emulation"] = including_emulation
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert default_precision() == expected
    assert asked == ({"emulation": False} if cuda else {})


@pytest.mark.parametrize("bundle", PRETRAINING)
def test_pretraining_bundles_take_the_default_and_expose_grad_checkpointing(bundle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    assert parser.get_parsed_content("train#trainer#config#precision") == "fp16"
    assert parser.get_parsed_content("train#trainer#config#grad_checkpointing") is False
    parser["grad_checkpointing"] = True  # the top-level id a user overrides (--grad_checkpointing true)
    assert parser.get_parsed_content("train#trainer#config#grad_checkpointing", lazy=False) is True


def test_segmentation_amp_follows_the_default():
    config = json.loads((BUNDLES / "segmentation" / "configs" / "train.json").read_text())
    assert config["precision"] == {"_target_": TARGET} and config["amp"] == "$@precision != 'fp32'"
    assert config["network_def"]["use_checkpoint"] == "@use_checkpoint"
