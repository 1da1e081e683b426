"""Shared fixtures: synthetic phantoms and cases written to disk (NIfTI, DICOM, nnU-Net dataset folders)."""

import json

import pytest
import torch

from medssl3d.data.phantoms import make_phantom, write_case, write_nifti

# Small enough that a DICOM series (one file per slice along the last axis) writes and reads fast.
CASE_SHAPE = (48, 48, 32)


@pytest.fixture
def phantom_ct():
    """CT phantom, 64^3 at 1.5 mm, HU values."""
    return make_phantom(shape=(64, 64, 64), spacing=(1.5, 1.5, 1.5), modality="ct", seed=0)


@pytest.fixture
def phantom_mri():
    """MRI (T1-like) phantom, 64^3 at 1 mm, with a bias field."""
    return make_phantom(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0), modality="mri", seed=0)


def _case_factory(root, fmt):
    def make(name="case", phantom=None, *, with_label=True, **write_kwargs):
        """Write ``phantom`` (default: a CASE_SHAPE CT phantom) under ``root``; returns {"image", "label"}."""
        phantom = make_phantom(shape=CASE_SHAPE) if phantom is None else phantom
        return write_case(root, name, phantom, fmt, with_label, **write_kwargs)

    return make


@pytest.fixture
def nifti_case(tmp_path):
    """Factory: ``nifti_case(name="case", phantom=None, with_label=True)`` -> {"image", "label"}."""
    return _case_factory(tmp_path, "nifti")


@pytest.fixture
def dicom_case(tmp_path):
    """Factory: ``dicom_case(name="case", phantom=None, with_label=True, **write_dicom_series kwargs)``
    -> {"image": series folder, "label": .nii.gz}."""
    return _case_factory(tmp_path, "dicom")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's training tests, restored afterwards.

    On a shared 2-core machine a second thread mostly spin-waits; tests that train use
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def nnunet_dataset(tmp_path):
    """Factory: a tiny nnU-Net v2 dataset folder of 2-class phantoms (0 background, 1 liver); returns its path.

    ``nnunet_dataset(train=("a", "b", "c"), test=("t",), channels=("CT",), unmatched=("ghost",), **dataset_json)``
    writes ``imagesTr/<case>_<XXXX>.nii.gz`` for each channel, ``labelsTr/<case>.nii.gz`` for the training cases
    and the ``unmatched`` ones (label files without an image), ``imagesTs/`` and ``dataset.json`` (keyword
    arguments replace its fields; ``None`` drops one, e.g. ``channel_names=None, modality={...}`` for nnU-Net v1).
    """

    def make(name="Dataset001_Phantom", *, train=("a", "b", "c"), test=("t",), channels=("CT",), unmatched=("ghost",),
             **dataset_json):
        root = tmp_path / name
        phantom = make_phantom(shape=(24, 24, 24), seed=0, deform=False)
        label = (phantom.label == 3).astype(phantom.label.dtype)  # 3 is the phantom's liver
        for folder, cases in (("imagesTr", train), ("imagesTs", test)):
            for case in cases:
                for channel in range(len(channels)):
                    write_nifti(phantom.image, phantom.affine, root / folder / f"{case}_{channel:04d}.nii.gz")
        for case in (*train, *unmatched):
            write_nifti(label, phantom.affine, root / "labelsTr" / f"{case}.nii.gz")
        description = {
            "name": name, "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, "liver": 1}, "numTraining": len(train), "file_ending": ".nii.gz",
            **dataset_json,
        }
        (root / "dataset.json").write_text(json.dumps({k: v for k, v in description.items() if v is not None}))
        return root

    return make
