"""The DiRA bundle: method settings reach the views, small batches are refused, and the two stages run back to back."""

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.transforms.genesis import RandBezierIntensityd

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dira"


def _parser(smoke_dir: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f"{n}.json") for n in ("train", "smoke")])
    parser.update({"bundle_root": str(BUNDLE), "smoke_dir": str(smoke_dir), **overrides})
    return parser


def _leaves(transform):
    """Every transform inside nested Compose / OneOf, and those containers themselves."""
    yield transform
    for t in getattr(transform, "transforms", ()):
        yield from _leaves(t)


@pytest.mark.parametrize("distortion", ["genesis", "exclusive"])
def test_the_distortion_setting_reaches_the_method_and_the_views(tmp_path, distortion):
    parser = _parser(tmp_path, distortion=distortion)
    assert parser.get_parsed_content("method").config.distortion == distortion
    leaves = list(_leaves(parser.get_parsed_content("train#preprocessing")))
    exclusive = [t for t in leaves if type(t).__name__ == "OneOf" and len(t.transforms) == 4]
    has_bezier = any(isinstance(t, RandBezierIntensityd) for t in leaves)
    if distortion == "exclusive":  # one mix per view, official DiRA's probabilities, no intensity remap
        assert len(exclusive) == 2 and not has_bezier
        for mix in exclusive:
            np.testing.assert_allclose(mix.weights, [0.30, 0.05, 0.30, 0.35])
    else:
        assert exclusive == [] and has_bezier


def test_samples_carry_their_volume_id(tmp_path):
    dataset = _parser(tmp_path).get_parsed_content("train#dataset")
    ids = [int(dataset[i]["volume_id"]) for i in range(len(dataset))]
    assert len(dataset) > 1 and len(set(ids)) == len(ids)  # one id per volume
    assert int(dataset[0]["volume_id"]) == ids[0]  # and the same at every access


@pytest.mark.parametrize(("variant", "message"), [("barlow", "batch_size x world_size = 2 x 1 = 2"),
                                                  ("simsiam", "2 x batch_size = 2 x 2 = 4 rows")])
def test_a_batch_too_small_for_the_variant_is_refused_when_the_method_is_built(tmp_path, variant, message):
    parser = _parser(tmp_path, variant=variant)
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("method")
    assert isinstance(err.value.__cause__, ValueError) and message in str(err.value.__cause__)
    assert "min_standardise_batch = 16" in str(err.value.__cause__)
    parser = _parser(tmp_path, variant=variant, **{"method_def#min_standardise_batch": 2})
    assert parser.get_parsed_content("method").config.variant == variant


def _workflow(smoke_dir: Path, stage: str, max_steps: int) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f"{n}.json") for n in ("train", "smoke")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        smoke_dir=str(smoke_dir),
        stage=stage,
        **{"train#trainer#max_steps": max_steps, "train#trainer#config#batch_size": 1},
    )
    wf.initialize()
    assert wf.check_properties() == []
    return wf


@pytest.mark.slow
def test_dir_then_dira_starts_from_dir_weights_and_resumes_discriminator_and_queue(tmp_path):
    # Stage 1: dir (no discriminator), written to runs/.
    wf = _workflow(tmp_path, "dir", max_steps=1)
    wf.run()
    wf.finalize()
    dir_ckpt = load_checkpoint(tmp_path / "runs" / "checkpoints" / "last.pt")
    assert dir_ckpt["step"] == 1 and dir_ckpt["auxiliary"] == {}
    assert not any(k.startswith("discriminator.") for k in dir_ckpt["model"])

    # Stage 2: dira, a new run in runs/dira/ that starts from the dir weights (queue included).
    wf = _workflow(tmp_path, "dira", max_steps=2)
    method = wf.parser.get_parsed_content("method")
    state = method.state_dict()
    for key, value in dir_ckpt["model"].items():
        assert torch.equal(state[key], value), key
    trainer = wf.parser.get_parsed_content("train#trainer")
    first = trainer.run(until_step=1)
    trainer.close()
    assert first["start_step"] == 0 and first["resumed_from"] is None
    ckpt_path = tmp_path / "runs" / "dira" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["step"] == 1 and set(ckpt["auxiliary"]) == {"discriminator"}
    assert ckpt["auxiliary"]["discriminator"]["state"]  # Adam moments of the discriminator
    for key in ("moco_loss.queue", "moco_loss.queue_ptr", "discriminator.model.0.weight"):
        assert key in ckpt["model"]
    assert not torch.equal(ckpt["model"]["moco_loss.queue"], dir_ckpt["model"]["moco_loss.queue"])

    # A fresh process of the same stage: the engine restores discriminator, queue and their optimizer.
    wf = _workflow(tmp_path, "dira", max_steps=2)
    method = wf.parser.get_parsed_content("method")
    trainer = wf.parser.get_parsed_content("train#trainer")
    resumed = trainer.run(until_step=1)  # prepares and resumes exactly, takes no step
    assert resumed["resumed_from"] == str(ckpt_path) and resumed["step"] == 1
    state = method.state_dict()
    for key, value in ckpt["model"].items():
        assert torch.equal(state[key], value), key
    adam = trainer.aux_optimizers["discriminator"].state_dict()
    saved = ckpt["auxiliary"]["discriminator"]
    assert all(torch.equal(adam["state"][i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    trainer.close()
