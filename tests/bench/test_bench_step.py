"""bench step: the measuring helpers on known answers, the reference recipe, and one minimal run."""

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention

from medssl3d.bench import step
from medssl3d.bench.measure import PeakMemory, count_flops, matmul_flops, matmul_peak_gflops, time_call
from medssl3d.bench.reference import (
    CONTRAST_DIM,
    ReferenceRecipe,
    build_reference,
    synthetic_views,
)
from medssl3d.bench.step import REFERENCE, StepSuite, run
from medssl3d.bench.suite import load_suite
from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.networks.window_attention import FusedWindowAttention

pytestmark = pytest.mark.usefixtures("one_thread")

# The smallest crop the Swin recipe takes: sides divisible by 32 and two bottleneck tokens.
ROI = (64, 32, 32)
SMALL_FEATURES = 3  # the narrowest SwinViT (one channel per head at the first stage)
ROW_FIELDS = (
    "params_m", "step_s", "step_spread", "gflop_per_step", "gflop_per_s", "peak_fraction",
    "peak_memory_mib", "bare_s", "overhead", "vs_baseline", "vs_reference",
)


def test_matmul_flops_known_answer():
    n = 48
    a = torch.randn(n, n, requires_grad=True)
    b = torch.randn(n, n)
    assert matmul_flops(n) == 2 * n**3
    assert count_flops(lambda: a @ b) == 2 * n**3
    # backward computes dA = dC @ B^T only (B needs no gradient): one more matmul
    assert count_flops(lambda: (a @ b).sum().backward()) == 2 * 2 * n**3


def test_cpu_flash_attention_is_counted():
    b, h, n, d = 2, 3, 49, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    flops = count_flops(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v))
    assert flops == 2 * (2 * b * h * n * n * d)  # scores q kᵀ, then p v


def test_matmul_peak_is_positive_and_finite():
    peak = matmul_peak_gflops("cpu", torch.float32, n=128, warmup=1, repeats=3)
    assert math.isfinite(peak) and peak > 0


def test_time_call_counts_warmup_and_repeats():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times) == 3
    assert timing.median >= 0 and timing.spread >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_peak_memory_sees_an_allocation():
    n_bytes = 256 * 2**20
    with PeakMemory("cpu") as empty:
        pass
    with PeakMemory("cpu") as full:
        x = torch.ones(n_bytes // 4)  # every page written: resident
    del x
    assert full.peak_mib >= empty.peak_mib + 0.9 * n_bytes / 2**20


def test_synthetic_views_are_rotated_copies_of_one_volume():
    views = synthetic_views((32, 32, 32), batch_size=2, seed=1)
    for v in ("view1", "view2"):
        assert views[v].shape == views[f"{v}_cutout"].shape == (2, 1, 32, 32, 32)
        assert views[f"{v}_rot"].dtype == torch.long and views[f"{v}_rot"].shape == (2,)
        assert not torch.equal(views[v], views[f"{v}_cutout"])
    for b in range(2):
        unrotated = [
            torch.rot90(views[v][b], -int(views[f"{v}_rot"][b]), dims=(2, 3)) for v in ("view1", "view2")
        ]
        torch.testing.assert_close(unrotated[0], unrotated[1])


def test_reference_network_shapes():
    model = build_reference(SMALL_FEATURES, ROI)
    rot, emb, rec = model(torch.rand(2, 1, *ROI))
    assert rot.shape == (2, 4) and emb.shape == (2, CONTRAST_DIM) and rec.shape == (2, 1, *ROI)


@pytest.mark.parametrize("roi", [(32, 32, 32), (48, 64, 64), (64, 64)])
def test_reference_rejects_crops_it_cannot_take(roi):
    with pytest.raises(ValueError, match="roi"):
        build_reference(SMALL_FEATURES, roi)


def test_reference_overfits_one_batch():
    torch.manual_seed(0)
    recipe = ReferenceRecipe(SMALL_FEATURES, ROI, lr=2e-3)
    views = synthetic_views(ROI, batch_size=1, seed=0)
    losses = [recipe.step(views) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_suites_load():
    smoke = load_suite(StepSuite, "step", "smoke")
    full = load_suite(StepSuite, "step", "full")
    assert smoke.size == "tiny" and smoke.repeats >= 5 and smoke.reference
    assert full.size == "base" and full.precision == "bf16"
    assert set(smoke.methods) == set(full.methods) == {"swin_ssl", "alice", "afire", "dira", "ace"}
    with pytest.raises(ValueError, match="unknown methods"):
        load_suite(StepSuite, "step", "smoke", ["methods=[nope]"])


def test_run_writes_a_finite_record(tmp_path):
    out = tmp_path / "step.json"
    path, table = run("smoke", out, ["roi=[64,32,32]", "methods=[swin_ssl]", "warmup=0", "repeats=1", "finetune=false"])
    assert path == out
    record = json.loads(out.read_text())
    assert record["kind"] == "step" and record["config"]["roi"] == list(ROI)
    rows = record["results"]
    assert [r["name"] for r in rows] == ["swin_ssl", REFERENCE]
    for row in rows:
        for field in ROW_FIELDS:
            assert math.isfinite(row[field]), (row["name"], field)
        assert row["gflop_per_step"] > 0 and row["step_s"] > 0
    baseline, reference = rows
    assert baseline["vs_baseline"] == 1.0 and reference["vs_reference"] == 1.0
    assert "swin_ssl" in table and REFERENCE in table


def test_compiled_run_reports_its_compilation(tmp_path):
    out = tmp_path / "step.json"
    _, table = run("smoke", out, ["roi=[64,32,32]", "methods=[swin_ssl]", "warmup=0", "repeats=1", "bare=false",
                                  "compile_backend=eager", "finetune=false"])
    method, reference = json.loads(out.read_text())["results"]
    assert method["first_step_s"] > 0 and method["compile_s"] == method["first_step_s"] - method["step_s"]
    assert "gflop_per_step" not in method  # not counted on a compiled step
    assert reference["gflop_per_step"] > 0 and "compile_s" not in reference  # the reference stays plain PyTorch
    assert "compile (s)" in table and "compiled (eager)" in table


@pytest.fixture
def phantoms(tmp_path):
    return write_smoke_datalist(
        tmp_path / "data", n_train=2, n_val=0, shape=(40, 40, 40), spacing=step.PHANTOM_SPACING, seed=0
    )


@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_override_reaches_the_measured_method(fused, phantoms, tmp_path):
    suite = load_suite(StepSuite, "step", "smoke", [f"fused_attention={str(fused).lower()}"])
    bundle = step._bundle_workflow("dira", step.SIZES["tiny"], ROI, suite, 1, Path(phantoms), tmp_path / "work")
    kinds = {type(m) for m in bundle.parser.get_parsed_content("method").modules() if isinstance(m, WindowAttention)}
    assert kinds == {FusedWindowAttention if fused else WindowAttention}


def test_afire_views_are_its_bundles_with_the_alignment_cache(phantoms, tmp_path):
    suite = load_suite(StepSuite, "step", "smoke")
    work = tmp_path / "work"
    bundle = step._bundle_workflow("afire", step.SIZES["tiny"], (32, 32, 32), suite, 1, Path(phantoms), work)
    (sample,) = step._draw_samples(bundle.parser.get_parsed_content("train#dataset"), 1, seed=0)
    assert sample["image"].shape == sample["image_lesioned"].shape == (1, 32, 32, 32)
    assert len(list((work / "cache" / "alignment").glob("*.pt"))) == 1  # the bundle's on-disk alignment cache


def test_finetune_rows_time_the_segmentation_step_fused_and_monai(tmp_path):
    out = tmp_path / "step.json"
    _, table = run("smoke", out, ["roi=[64,32,32]", "methods=[]", "reference=false", "warmup=0", "repeats=1",
                                  "bare=false"])
    fused, monai = json.loads(out.read_text())["results"]
    assert (fused["name"], monai["name"]) == (step.FINETUNE, step.FINETUNE_MONAI)
    assert fused["params_m"] == monai["params_m"] and fused["gflop_per_step"] > 0
    assert fused["vs_monai"] == fused["step_s"] / monai["step_s"] and "vs_monai" not in monai
    assert "vs_baseline" not in fused and "÷ MONAI" in table


@pytest.mark.parametrize("fused", [True, False])
def test_finetune_subject_is_the_bundles_network_with_the_attention_asked_for(fused, tmp_path):
    suite = load_suite(StepSuite, "step", "smoke")
    subject = step._finetune_subject(step.SIZES["tiny"], ROI, 1, fused, suite, torch.device("cpu"), tmp_path)
    kinds = {type(m) for m in subject.bare_module.modules() if isinstance(m, WindowAttention)}
    assert kinds == {FusedWindowAttention if fused else WindowAttention}
    assert subject.bare_module.patch_embed.proj.weight.shape[0] == 12  # tiny: feature_size 12
    subject.step()
