"""``bench step``: training-step efficiency of every method and of the reference recipe (benchmarks.md §1).

For each method of the suite, at one named size, the real toolkit step (a
:class:`~medssl3d.engine.trainer.Pretrainer` step: forward, backward, clipping, AdamW, auxiliary
optimizers, EMA) is timed on views drawn once, up front, from phantom volumes through the CT data
preset. The method, its views and its engine settings are its pretraining bundle's, as
``medssl3d pretrain <method> --preset <size>`` builds them, with only the size's backbone and crop, the
folders, the batch, the precision and ``fused_attention`` set by the suite. Beside the median step time a
row holds the step's FLOPs, the achieved rate and its fraction of a dense-matmul peak measured in
this process, the peak memory, and three ratios measured in the same run: against the baseline
(``swin_ssl``), against a bare forward+backward of the method's own backbone on the same inputs
(the method's overhead), and against the unoptimised reference recipe (:mod:`medssl3d.bench.reference`).
With ``finetune``, two more rows time the segmentation bundle's fine-tuning step (its SwinUNETR at the
size, DiceCE loss and AdamW) with the fused window attention and with MONAI's, on the same weights and
crop; the first holds the ratio of the two (``÷ MONAI``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from medssl3d.bench import record
from medssl3d.bench.finetune import SEGMENTATION_BUNDLE
from medssl3d.bench.measure import PeakMemory, count_flops, matmul_peak_gflops, release_memory, time_call
from medssl3d.bench.reference import ReferenceRecipe, check_reference_roi
from medssl3d.bench.suite import load_suite
from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.data.presets import CT_PRESET
from medssl3d.engine.loader import to_device
from medssl3d.engine.trainer import Pretrainer
from medssl3d.jobs.pretrain import PretrainRequest, pretrain_job
from medssl3d.methods import METHODS
from medssl3d.networks.backbones import BACKBONE_SIZES, Backbone, BackboneOutput, ViTBackbone

logger = logging.getLogger(__name__)

__all__ = ["BASELINE", "REFERENCE", "SIZES", "BenchSize", "StepSuite", "run"]

KIND = "step"
BASELINE = "swin_ssl"
REFERENCE = "reference"
FINETUNE = "finetune"
FINETUNE_MONAI = "finetune (MONAI attention)"
#: Classes of the fine-tuning step (background and one structure): the network's head is a 1x1x1 convolution,
#: so the step costs about the same for any number of classes.
FINETUNE_LABELS = {"0": "background", "1": "structure"}
METHOD_ORDER = ("swin_ssl", "alice", "afire", "dira", "ace")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
PHANTOM_MARGIN = 1.25  # phantom side relative to the crop, so crops are drawn from a larger body
PHANTOM_CASES = 2  # two volumes: ALICE pairs a volume with another one
PHANTOM_SPACING = (CT_PRESET.spacing[0],) * 3  # the preset keeps the phantom's grid
BENCH_TOTAL_STEPS = 1000  # schedule length: the timed steps sit at its start, past no warm-up
BENCH_CKPT_EVERY = 10**9  # the timed steps never write a checkpoint
GIGA = 1e9
COLUMNS = (
    ("name", "method", "s"),
    ("backbone", "backbone", "s"),
    ("params_m", "params (M)", ".1f"),
    ("step_s", "step (s)", ".3f"),
    ("gflop_per_step", "GFLOP/step", ".1f"),
    ("gflop_per_s", "GFLOP/s", ".1f"),
    ("peak_fraction", "of peak", ".1%"),
    ("peak_memory_mib", "peak mem (MiB)", ".0f"),
    ("vs_baseline", "÷ baseline", ".2f"),
    ("overhead", "÷ bare fwd+bwd", ".2f"),
    ("vs_reference", "÷ reference", ".2f"),
    ("vs_monai", "÷ MONAI", ".2f"),
)
COMPILE_COLUMN = ("compile_s", "compile (s)", ".1f")


@dataclass(frozen=True)
class BenchSize:
    """One named benchmark size (benchmarks.md §1).

    Attributes:
        swin: SwinBackbone size of the Swin methods and the reference.
        vit: ViTBackbone size of the ViT methods (AFiRe).
        roi: crop side (D, H, W).
        batch_cpu: batch size on a CPU.
        batch_gpu: batch size on a GPU.
        method_preset: preset of ``configs/methods/<method>.yaml`` the other fields start from.
    """

    swin: str
    vit: str
    roi: tuple[int, int, int]
    batch_cpu: int
    batch_gpu: int
    method_preset: str


SIZES = {
    "tiny": BenchSize(swin="tiny", vit="small", roi=(64, 64, 64), batch_cpu=1, batch_gpu=1, method_preset="tiny"),
    "base": BenchSize(swin="base", vit="base", roi=(96, 96, 96), batch_cpu=1, batch_gpu=2, method_preset="base"),
}


@dataclass(frozen=True)
class StepSuite:
    """A ``bench step`` suite (a preset of ``configs/bench/step.yaml``).

    Attributes:
        size: "tiny" or "base" (:data:`SIZES`).
        methods: registered method names to measure.
        reference: also measure the reference recipe.
        roi: crop side (D, H, W); None: the size's.
        batch_size: samples per step; None: the size's for the device.
        precision: "fp32" or "bf16" (autocast).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        warmup: untimed steps before the timed ones.
        repeats: timed steps (the median is reported).
        bare: also time a bare forward+backward of each backbone (the overhead ratio).
        flops: count the FLOPs of a step (one extra step under the FLOP counter).
        correspondence: ALICE's pairing of views (any provider times the same; registration only costs set-up).
        fused_attention: the Swin methods' fused window attention (the bundles' ``fused_attention``); false
            runs MONAI's. The reference recipe is MONAI's either way.
        finetune: also time the segmentation bundle's fine-tuning step, fused and with MONAI's attention.
        seed: seed of the phantoms and of the view generation.
        compile_backend: ``torch.compile`` each method's student backbone with this backend (the engine's
            ``compile_backend``; None: plain PyTorch). The first step's time and the compilation it paid
            (``compile_s``: first step minus the median) are reported; FLOPs are not counted on a compiled step.
    """

    size: str = "tiny"
    methods: tuple[str, ...] = METHOD_ORDER
    reference: bool = True
    roi: tuple[int, ...] | None = None
    batch_size: int | None = None
    precision: str = "fp32"
    device: str = "auto"
    warmup: int = 1
    repeats: int = 5
    bare: bool = True
    flops: bool = True
    correspondence: str = "body_box"
    fused_attention: bool = True
    finetune: bool = True
    seed: int = 0
    compile_backend: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.roi is not None:
            object.__setattr__(self, "roi", tuple(int(s) for s in self.roi))
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
        if not self.methods and not self.reference and not self.finetune:
            raise ValueError("nothing to measure: no methods, reference=false and finetune=false")
        if self.roi is not None and (len(self.roi) != 3 or min(self.roi) < 1):
            raise ValueError(f"roi must be 3 positive sides, got {self.roi}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")


@dataclass
class _Measured:
    """One row's subject: its training step and the backbone behind it."""

    name: str
    backbone: str
    params: int
    step: Callable[[], object]
    bare_module: nn.Module


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available (use device=auto or cpu)")
    return torch.device(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------- methods
def _bundle_workflow(
    name: str, size: BenchSize, roi: tuple[int, int, int], suite: StepSuite, batch_size: int, datalist: Path,
    work: Path,
):
    """The method's bundle as ``medssl3d pretrain <name> --preset <size preset>`` runs it, initialised, unparsed.

    Set by the suite: the size's backbone and crop, the batch, ``fused_attention`` (Swin bundles) and ALICE's
    ``correspondence``; the data is ``datalist`` through the CT preset, every file goes under ``work``. The
    method, its views (``train#dataset``) and its engine settings (``train#trainer#config``) are then the
    bundle's own, so the benchmark measures what a run does.

    Raises:
        ValueError: the crop does not suit the method.
    """
    job = pretrain_job(
        PretrainRequest(method=name, data=str(datalist), out=str(work / name), preset=size.method_preset),
        datalist,
        distributed=False,
    )
    ids = job.resolve(["export_target", "token_stride", "correspondence", "fused_attention"])
    vit = ids["export_target"] == ViTBackbone.export_target
    overrides: dict[str, Any] = {
        "cache_dir": str(work / "cache"),
        "modality": CT_PRESET.modality,
        "preset": CT_PRESET,
        "backbone_size": size.vit if vit else size.swin,
        "train#trainer#config#batch_size": batch_size,
    }
    if name == "ace":  # the bundle derives its crop: grid_n cells of token_stride voxels
        stride = ids["token_stride"]
        if len(set(roi)) != 1 or roi[0] % stride:
            raise ValueError(f"ace needs a cubic roi with sides divisible by {stride}, got {roi}")
        overrides["grid_n"] = roi[0] // stride
    else:
        overrides["roi_size"] = list(roi)
    if "correspondence" in ids:
        overrides["correspondence"] = suite.correspondence
    if "fused_attention" in ids:
        overrides["fused_attention"] = suite.fused_attention
    workflow = dataclasses.replace(job, overrides={**job.overrides, **overrides}).workflow()
    workflow.initialize()
    return workflow


def _draw_samples(dataset: Dataset, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """``batch_size`` samples of ``dataset``, cycling through its volumes, from a seeded view generation."""
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
    return [dataset[i % len(dataset)] for i in range(batch_size)]


def _student_backbone(method: nn.Module) -> nn.Module:
    for module in method.student.modules():
        if isinstance(module, Backbone):
            return module
    raise ValueError(f"{type(method).__name__}.student holds no Backbone")


def _engine_step(
    method: nn.Module, samples: list[dict[str, Any]], batch: dict[str, Any], train_config: dict[str, Any],
    suite: StepSuite, device: torch.device, out_dir: Path,
) -> Callable[[], float]:
    """A function taking one real engine step (``Pretrainer.train_step``) on ``batch`` (on ``device``) per call.

    The engine runs the bundle's ``train_config`` (clipping, EMA, freezes) with the suite's precision and seed.
    """
    config = {
        **train_config, "max_steps": BENCH_TOTAL_STEPS, "batch_size": len(samples), "num_workers": 0,
        "precision": suite.precision, "out_dir": str(out_dir), "resume": None, "tensorboard": False,
        "ckpt_every": BENCH_CKPT_EVERY, "log_every": BENCH_CKPT_EVERY, "seed": suite.seed,
        "compile_backend": suite.compile_backend,
    }
    # The engine sets its loader up from the samples; the timed steps bypass it, their views are drawn.
    trainer = Pretrainer(method, samples, config=config, device=device)
    trainer.prepare()

    def step() -> float:
        loss, _ = trainer.train_step([batch])
        trainer.step += 1
        return loss

    return step


def _finetune_subject(
    size: BenchSize, roi: tuple[int, int, int], batch_size: int, fused: bool, suite: StepSuite, device: torch.device,
    work: Path,
) -> _Measured:
    """The segmentation bundle's fine-tuning step on a seeded synthetic crop: its network, loss and optimizer.

    The bundle's ``train.json`` builds them with the size's ``backbone_size``, the crop and ``fused_attention``;
    the weights depend only on the seed, so the fused and the MONAI rows start from the same network.
    """
    parser = ConfigParser()
    parser.read_config(str(SEGMENTATION_BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(work), "label_names": FINETUNE_LABELS, "backbone_size": size.swin,
                   "roi_size": list(roi), "fused_attention": fused, "device": device})
    torch.manual_seed(suite.seed)
    network = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    generator = torch.Generator().manual_seed(suite.seed)
    image = torch.randn(batch_size, 1, *roi, generator=generator).to(device)
    label = (image > 0).long()
    dtype = PRECISION_DTYPES[suite.precision]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = loss_fn(network(image), label)
        loss.backward()
        optimizer.step()

    name = FINETUNE if fused else FINETUNE_MONAI
    return _Measured(name, f"SwinUNETR {size.swin}", _n_params(network), step, network.swinViT)


def _bottleneck(out: Any) -> Tensor:
    """The deepest output of a backbone call: BackboneOutput tokens, the last of a list, or the tensor."""
    if isinstance(out, BackboneOutput):
        return out.tokens
    if isinstance(out, (list, tuple)):
        return out[-1]
    return out


def _bare_step(
    module: nn.Module, inputs: list[Tensor], device: torch.device, dtype: torch.dtype | None
) -> Callable[[], None]:
    """Forward+backward of ``module`` alone on each of ``inputs``, the deepest output's mean as the loss."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = sum(_bottleneck(module(x)).float().mean() for x in inputs)
        loss.backward()

    return step


class _InputRecorder:
    """Records the inputs a module's forward gets while gradients are on (the student's, not a teacher's)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[Tensor] = []
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
            self.inputs.append(args[0].detach())

    def close(self) -> list[Tensor]:
        self._handle.remove()
        return self.inputs


def _measure(subject: _Measured, suite: StepSuite, device: torch.device, peak_gflops: float) -> dict[str, Any]:
    """Time (and count) one subject's step; the ratios are added once every row is measured."""
    dtype = PRECISION_DTYPES[suite.precision]
    logger.info("bench step: %s (%s)", subject.name, subject.backbone)
    row: dict[str, Any] = {"name": subject.name, "backbone": subject.backbone, "params_m": subject.params / 1e6}
    # The first step is untimed (the first of the warm-up): it counts the FLOPs and records the backbone's inputs.
    recorder = _InputRecorder(subject.bare_module)
    compiled = bool(suite.compile_backend) and subject.name != REFERENCE  # the reference stays plain PyTorch
    flops = suite.flops and not compiled
    if flops:
        row["gflop_per_step"] = count_flops(subject.step) / GIGA
    else:
        row["first_step_s"] = time_call(subject.step, device=device, warmup=0, repeats=1).median
    inputs = recorder.close()
    with PeakMemory(device) as memory:
        timing = time_call(subject.step, device=device, warmup=max(suite.warmup - 1, 0), repeats=suite.repeats)
    row.update(step_s=timing.median, step_spread=timing.spread, peak_memory_mib=memory.peak_mib)
    if compiled:
        row["compile_s"] = row["first_step_s"] - timing.median
    if flops:
        row["gflop_per_s"] = row["gflop_per_step"] / timing.median
        row["peak_fraction"] = row["gflop_per_s"] / peak_gflops
    if suite.bare and inputs:
        bare = _bare_step(subject.bare_module, inputs, device, dtype)
        row["bare_s"] = time_call(bare, device=device, warmup=suite.warmup, repeats=suite.repeats).median
        row["overhead"] = timing.median / row["bare_s"]
        subject.bare_module.zero_grad(set_to_none=True)
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_name = {r["name"]: r["step_s"] for r in rows}
    for row in rows:
        if row["name"] in (FINETUNE, FINETUNE_MONAI):
            continue  # another step: not comparable with the pretraining ones
        if BASELINE in by_name:
            row["vs_baseline"] = row["step_s"] / by_name[BASELINE]
        if REFERENCE in by_name:
            row["vs_reference"] = row["step_s"] / by_name[REFERENCE]
    if FINETUNE in by_name and FINETUNE_MONAI in by_name:
        next(r for r in rows if r["name"] == FINETUNE)["vs_monai"] = by_name[FINETUNE] / by_name[FINETUNE_MONAI]


# ----------------------------------------------------------------------------------- run
def run(
    suite: str = "smoke", output: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[Path, str]:
    """Measure the training step of every method of a suite and of the reference recipe.

    Args:
        suite: a preset of ``configs/bench/step.yaml`` ("smoke", "full") or ``path.yaml:preset``.
        output: the JSON record to write (default: ``outputs/bench/step-<suite>-<time>.json``).
        overrides: ``key=value`` overrides of :class:`StepSuite` fields, e.g. ``methods=[swin_ssl]``.

    Returns:
        The record's path and a Markdown table with one row per method and one for the reference.

    Raises:
        ValueError: a bad suite, override, or a crop a measured method cannot take.
    """
    cfg = load_suite(StepSuite, KIND, suite, overrides)
    size = SIZES[cfg.size]
    device = _resolve_device(cfg.device)
    dtype = PRECISION_DTYPES[cfg.precision]
    roi = tuple(cfg.roi) if cfg.roi is not None else size.roi
    batch_size = cfg.batch_size or (size.batch_gpu if device.type == "cuda" else size.batch_cpu)
    if cfg.reference:
        check_reference_roi(roi)
    peak = matmul_peak_gflops(device, dtype or torch.float32)
    logger.info("bench step: %s, roi %s, batch %d, %s on %s; matmul peak %.1f GFLOP/s",
                cfg.size, roi, batch_size, cfg.precision, device, peak)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medssl3d-bench-step-") as tmp:
        work = Path(tmp)
        side = int(max(roi) * PHANTOM_MARGIN)
        datalist = write_smoke_datalist(
            work / "data", n_train=PHANTOM_CASES, n_val=0, shape=(side,) * 3, spacing=PHANTOM_SPACING, seed=cfg.seed
        )

        names = [m for m in METHOD_ORDER if m in cfg.methods] + [m for m in cfg.methods if m not in METHOD_ORDER]
        baseline_batch = None
        for name in names:
            bundle = _bundle_workflow(name, size, roi, cfg, batch_size, datalist, work).parser
            method = bundle.get_parsed_content("method")
            samples = _draw_samples(bundle.get_parsed_content("train#dataset"), batch_size, cfg.seed)
            batch = to_device(default_collate(samples), device)
            if name == BASELINE:
                baseline_batch = batch
            train_config = bundle.get_parsed_content("train#trainer#config")
            step = _engine_step(method, samples, batch, train_config, cfg, device, work / "runs" / name)
            subject = _Measured(name, method.backbone_name, _n_params(method), step, _student_backbone(method))
            rows.append(_measure(subject, cfg, device, peak))
            del bundle, method, samples, batch, step, subject
            release_memory(device)
        if cfg.reference:
            if baseline_batch is None:  # the baseline's views, without building its model
                bundle = _bundle_workflow(BASELINE, size, roi, cfg, batch_size, datalist, work).parser
                samples = _draw_samples(bundle.get_parsed_content("train#dataset"), batch_size, cfg.seed)
                baseline_batch = to_device(default_collate(samples), device)
            feature_size = BACKBONE_SIZES["swin"][size.swin].feature_size
            recipe = ReferenceRecipe(feature_size, roi, device=device, autocast_dtype=dtype)
            views = baseline_batch
            subject = _Measured(
                REFERENCE, f"swin-{size.swin} (MONAI SwinTransformer)", _n_params(recipe.model),
                lambda: recipe.step(views), recipe.model.swinViT,
            )
            rows.append(_measure(subject, cfg, device, peak))
            del recipe, views, subject
            release_memory(device)
        if cfg.finetune:
            for fused in (True, False):
                subject = _finetune_subject(size, roi, batch_size, fused, cfg, device, work / "finetune")
                rows.append(_measure(subject, cfg, device, peak))
                del subject
                release_memory(device)
    _add_ratios(rows)
    config = {
        **dataclasses.asdict(cfg),
        "roi": list(roi),
        "batch_size": batch_size,
        "device": str(device),
        "matmul_peak_gflops": peak,
    }
    path = record.write_record(output or record.default_output(KIND, suite), KIND, suite, config, rows)
    caption = (
        f"{cfg.size}: crops {'x'.join(map(str, roi))}, batch {batch_size}, {cfg.precision} on {device} "
        f"({torch.get_num_threads()} threads); dense matmul peak {peak:.0f} GFLOP/s; "
        f"median of {cfg.repeats} steps after {cfg.warmup} warm-up; Swin window attention "
        f"{'fused' if cfg.fused_attention else 'MONAI'}"
        f"{f'; student backbones compiled ({cfg.compile_backend})' if cfg.compile_backend else ''}."
    )
    columns = (*COLUMNS, COMPILE_COLUMN) if cfg.compile_backend else COLUMNS
    return path, record.format_table(rows, columns) + "\n\n" + caption
