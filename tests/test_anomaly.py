import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset

from medssl3d.anomaly import write_anomaly_maps
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.data.presets import CT_PRESET, build_preset
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.afire import afire_transforms, build_afire

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (64, 64, 64)
STEPS = 12
LESION_RADIUS = 6
LESION_HU = 150.0
# Measured: voxel AUC of the restoration error 0.97 after 4 to 30 steps; demand 0.9.
MIN_RESTORATION_AUC = 0.9


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
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("afire")
    preset = build_preset(CT_PRESET, keys=("image",))
    t = afire_transforms(SHAPE[0])
    samples = []
    for seed in (1, 2):
        ph = make_phantom(shape=SHAPE, seed=seed)
        volume = preset({"image": str(write_nifti(ph.image, ph.affine, root / f"train{seed}.nii.gz"))})
        for k in range(STEPS // 2):
            t.set_random_state(100 * seed + k)
            samples.append(t(dict(volume)))
    torch.manual_seed(0)
    trainer = Pretrainer(
        build_afire(backbone_size="tiny", img_size=SHAPE[0], num_prototypes=16),
        Dataset(samples),
        max_steps=STEPS,
        batch_size=1,
        lr=5e-4,
        warmup_steps=0,
        out_dir=str(root / "run"),
        tensorboard=False,
        log_every=STEPS,
        resume=None,
    )
    history = trainer.run()["loss_history"]
    assert len(history) == STEPS and all(np.isfinite(history))
    return root / "run" / "checkpoints" / "last.pt"


def test_anomaly_maps_overlay_the_input_and_rank_the_lesion_high(trained_checkpoint, tmp_path):
    # An oblique, off-centre grid: the maps must come back onto it exactly.
    ph = make_phantom(shape=SHAPE, seed=0, rotation_deg=(0.0, 0.0, 10.0), origin=(5.0, -3.0, 2.0))
    image = ph.image.copy()
    body = np.argwhere(ph.label > 0)
    centre = body[len(body) // 2]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    lesion = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= LESION_RADIUS**2
    image[lesion] += LESION_HU
    path = write_nifti(image, ph.affine, tmp_path / "case.nii.gz")

    written = write_anomaly_maps(trained_checkpoint, path, tmp_path / "maps", modality="ct")
    assert set(written) == {"restoration_error", "token_distance"}
    assert written["restoration_error"].name == "case_restoration_error.nii.gz"
    inside = ph.image > CT_PRESET.a_min  # body voxels, lesion included
    for name, file in written.items():
        nii = nib.load(str(file))
        heat = np.asarray(nii.dataobj, dtype=np.float32)
        assert heat.shape == SHAPE, name
        np.testing.assert_allclose(nii.affine, ph.affine, atol=1e-4)
        assert np.isfinite(heat).all() and heat.min() >= 0, name
    error = np.asarray(nib.load(str(written["restoration_error"])).dataobj)
    auc = _auc(torch.from_numpy(error[inside]), torch.from_numpy(lesion[inside]))
    assert auc > MIN_RESTORATION_AUC


def test_wrong_method_or_modality_raises(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="modality"):
        write_anomaly_maps(trained_checkpoint, tmp_path / "x.nii.gz", tmp_path, modality="pet")
    ckpt = torch.load(trained_checkpoint, weights_only=True)
    ckpt["method"] = "swin_ssl"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="swin_ssl"):
        write_anomaly_maps(tmp_path / "other.pt", tmp_path / "x.nii.gz", tmp_path, modality="ct")
