"""The DiRA bundle's two stages back to back through ConfigWorkflow at smoke size, and the dira stage's resume."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from medssl3d.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dira"


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
