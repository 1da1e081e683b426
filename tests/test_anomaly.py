import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset

from medssl3d.anomaly import anomaly_maps_for, load_afire, write_anomaly_maps
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.data.presets import CT_PRESET, build_preset
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.afire import build_afire
from medssl3d.transforms.alignment import alignment_transforms
from medssl3d.transforms.lesions import abnormal_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (64, 64, 64)
LESION_BOX = (slice(16, 48), slice(16, 48), slice(16, 32))
"""On the aligned grid: 2 x 2 x 1 whole tokens in the middle of the body."""
LESION_STRENGTH = 0.4
# Small and fast: ViT-tiny on 64^3, a one-block decoder, restoration weighted up, constant lr without clipping,
# so that 30 steps on one lesioned volume teach the decoder what to put where the lesion is.
MODEL = {
    "backbone_size": "tiny",
    "img_size": SHAPE[0],
    "num_prototypes": 16,
    "decoder_dim": 96,
    "decoder_depth": 1,
    "decoder_heads": 4,
    "restoration_weight": 10.0,
}
STEPS = 30
LR = 2e-3
# Measured: restoration-error AUC about 0.97 for the model trained to remove the lesion, about 0.5 for the
# control trained to restore the lesioned volume (which keeps it). Demand 0.9, and a lead of 0.2 over the control.
MIN_AUC = 0.9
MIN_LEAD = 0.2


def _auc(scores, positive):
    """Voxel-level ROC AUC (Mann-Whitney U over ranks; ties count half)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    pos = torch.as_tensor(positive).flatten()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    mean_rank = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks) / counts
    ranks = mean_rank[inverse]
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper():
    assert _auc([0.1, 0.2, 0.9, 0.8], torch.tensor([False, False, True, True])) == 1.0
    assert _auc([1.0, 1.0], torch.tensor([True, False])) == 0.5


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An oblique, off-centre CT phantom (file), and its aligned volume with a bright box lesion (training sample)."""
    root = tmp_path_factory.mktemp("afire")
    ph = make_phantom(shape=SHAPE, seed=1, rotation_deg=(0.0, 0.0, 10.0), origin=(5.0, -3.0, 2.0))
    path = write_nifti(ph.image, ph.affine, root / "case.nii.gz")
    volume = build_preset(CT_PRESET, keys=("image",))({"image": str(path)})
    clean = alignment_transforms(size=SHAPE[0], foreground_threshold=CT_PRESET.foreground_threshold)(volume)["image"]
    clean = clean.as_tensor()
    lesioned = clean.clone()
    lesioned[(slice(None), *LESION_BOX)] = (lesioned[(slice(None), *LESION_BOX)] + LESION_STRENGTH).clamp(0.0, 1.0)
    lesion_map = lesioned - clean
    sample = {
        "image": clean,
        "image_lesioned": lesioned,
        "image_lesion_map": lesion_map,
        "image_abnormal": abnormal_tokens(lesion_map),
    }
    return {"root": root, "phantom": ph, "path": path, "sample": sample}


def _train(case, name, sample):
    torch.manual_seed(0)
    out_dir = case["root"] / name
    trainer = Pretrainer(
        build_afire(**MODEL),
        Dataset([sample] * STEPS),
        max_steps=STEPS,
        batch_size=1,
        lr=LR,
        min_lr=LR,
        warmup_steps=0,
        clip_grad=None,
        out_dir=str(out_dir),
        tensorboard=False,
        log_every=STEPS,
        resume=None,
    )
    history = trainer.run()["loss_history"]
    assert len(history) == STEPS and all(np.isfinite(history))
    return out_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def checkpoints(case):
    sample = case["sample"]
    assert int(sample["image_abnormal"].sum()) == 4
    # The control learns to restore the lesioned volume, i.e. to keep the lesion.
    control = dict(sample, image=sample["image_lesioned"])
    return {"removal": _train(case, "removal", sample), "control": _train(case, "control", control)}


def test_the_restoration_error_flags_the_lesion_that_training_removed(checkpoints, case):
    sample = case["sample"]
    lesion = sample["image_lesion_map"][0] > 0
    body = sample["image"][0] > 0
    aucs = {}
    for name, checkpoint in checkpoints.items():
        maps = anomaly_maps_for(load_afire(checkpoint), sample["image_lesioned"])
        error = maps["restoration_error"][0]
        aucs[name] = _auc(error[body], lesion[body])
    assert aucs["removal"] > MIN_AUC, aucs
    assert aucs["removal"] > aucs["control"] + MIN_LEAD, aucs


def test_maps_are_written_on_the_input_grid(checkpoints, case, tmp_path):
    written = write_anomaly_maps(checkpoints["removal"], case["path"], tmp_path, modality="ct")
    assert set(written) == {"restoration_error", "token_distance"}
    assert written["restoration_error"].name == "case_restoration_error.nii.gz"
    for name, file in written.items():  # the oblique, off-centre input grid, voxel for voxel
        nii = nib.load(str(file))
        heat = np.asarray(nii.dataobj, dtype=np.float32)
        assert heat.shape == SHAPE, name
        np.testing.assert_allclose(nii.affine, case["phantom"].affine, atol=1e-4)
        assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() > 0, name


def test_wrong_method_or_modality_raises(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="modality"):
        write_anomaly_maps(checkpoints["removal"], tmp_path / "x.nii.gz", tmp_path, modality="pet")
    ckpt = torch.load(checkpoints["removal"], weights_only=True)
    ckpt["method"] = "swin_ssl"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="swin_ssl"):
        write_anomaly_maps(tmp_path / "other.pt", tmp_path / "x.nii.gz", tmp_path, modality="ct")
