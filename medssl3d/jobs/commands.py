"""The ``pretrain``, ``finetune``, ``evaluate`` and ``predict`` sub-commands of ``medssl3d`` (argument parsing).

Each handler builds its job from the arguments and runs it; the jobs import MONAI only when they run, so
``medssl3d --help`` stays fast. Bad input raises ``ValueError`` naming the file or setting, which the
``medssl3d`` command prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]
OVERRIDES_HELP = "a bundle override, JSON value (repeatable), e.g. --set train#trainer#config#batch_size=4"


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from medssl3d.jobs.pretrain import PretrainRequest, run_pretrain

    request = PretrainRequest(
        method=args.method, data=args.data, out=args.out, modality=args.modality, size=args.size, roi=args.roi,
        steps=args.steps, preset=args.preset, gpus=args.gpus, overrides=tuple(args.overrides),
    )
    return run_pretrain(request, dry_run=args.dry_run)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from medssl3d.jobs.finetune import FinetuneRequest, run_finetune

    request = FinetuneRequest(
        data=args.data, pretrained=args.pretrained, out=args.out, epochs=args.epochs, modality=args.modality,
        size=args.size, overrides=tuple(args.overrides),
    )
    return run_finetune(request, dry_run=args.dry_run)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medssl3d.jobs.evaluate import run_evaluate

    return run_evaluate(args.run, data=args.data, split=args.split, tolerance_mm=args.tolerance_mm,
                        overrides=tuple(args.overrides), dry_run=args.dry_run)


def _cmd_predict(args: argparse.Namespace) -> int:
    from medssl3d.jobs.predict import run_predict

    return run_predict(args.run, args.inputs, args.output, overrides=tuple(args.overrides), dry_run=args.dry_run)


def register(add: AddCommand) -> None:
    """Add the job sub-commands through the ``medssl3d`` parser's ``add(name, handler, help)``."""
    p = add("pretrain", _cmd_pretrain,
            "Pretrain an encoder with a method's bundle; the same command again resumes.")
    p.add_argument("method", help="swin_ssl, alice, afire, dira or ace")
    p.add_argument("--data", required=True,
                   help="a folder of scans (NIfTI/NRRD/MHA, DICOM series), an nnU-Net raw dataset or a datalist JSON")
    p.add_argument("--out", default=None, help="run folder (default outputs/<method>)")
    p.add_argument("--modality", choices=("ct", "mri"), default=None, help="data preset (default: the bundle's, ct)")
    p.add_argument("--size", choices=("tiny", "small", "base"), default=None,
                   help="encoder size (default: the preset's or the bundle's)")
    p.add_argument("--roi", type=int, default=None, help="cubic crop side in voxels (default: the bundle's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the whole run (default: the bundle's)")
    p.add_argument("--preset", default=None, help="a method preset of configs/methods/<method>.yaml, e.g. tiny")
    p.add_argument("--gpus", type=int, default=1, help="processes under torchrun (one per GPU; gloo on a CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved bundle config and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE", help=OVERRIDES_HELP)

    p = add("finetune", _cmd_finetune,
            "Fine-tune the segmentation bundle (SwinUNETR/UNETR) from an encoder; the same command again resumes.")
    p.add_argument("--data", required=True,
                   help="a labelled folder, an nnU-Net raw dataset or a datalist JSON (training/validation splits)")
    p.add_argument("--pretrained", required=True,
                   help="an exported encoder (models/encoder_*.pt of a pretraining run), or 'none' for scratch")
    p.add_argument("--out", required=True, help="run folder (models/, eval/, run.json)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the whole run (default: the bundle's)")
    p.add_argument("--modality", choices=("ct", "mri"), default=None,
                   help="data preset (default: the encoder's, else ct)")
    p.add_argument("--size", choices=("tiny", "small", "base"), default=None,
                   help="encoder size, as pretraining names it (default: the encoder's, else base)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved bundle config and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE", help=OVERRIDES_HELP)

    p = add("evaluate", _cmd_evaluate,
            "Dice, HD95 and surface Dice per class of a fine-tuned run on a split (table + JSON/CSV in the run).")
    p.add_argument("run", help="a run folder of medssl3d finetune")
    p.add_argument("--data", default=None, help="folder or datalist JSON (default: the run's datalist)")
    p.add_argument("--split", default="test", help="datalist split to evaluate (default test)")
    p.add_argument("--tolerance-mm", type=float, default=None,
                   help="surface Dice tolerance in mm, every class (default: the bundle's, 2 mm)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved bundle config and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE", help=OVERRIDES_HELP)

    p = add("predict", _cmd_predict, "Segment volumes with a fine-tuned run: NIfTI label maps on each input's grid.")
    p.add_argument("run", help="a run folder of medssl3d finetune")
    p.add_argument("inputs", nargs="+", help="volumes (NIfTI/NRRD/MHA), DICOM series folders or folders of volumes")
    p.add_argument("-o", "--output", required=True, help="folder for <name>_pred.nii.gz")
    p.add_argument("--dry-run", action="store_true", help="print the resolved bundle config and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE", help=OVERRIDES_HELP)
