"""Where the bundles and YAML presets are, and one bundle run in this process as the ``medssl3d`` jobs run it.

The bundles (``bundles/<name>``) and the presets (``configs/``) ship inside the installed package as
``medssl3d/bundles`` and ``medssl3d/configs`` (``setup.cfg`` maps the top-level folders there); in a source
checkout or an editable install they are the top-level folders beside the package. :func:`resource_dir` is
the one place that knows this.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from medssl3d.bundle_support.errors import user_error
from medssl3d.data.errors import DatalistError, InputError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
RESOURCES = ("bundles", "configs")
METADATA = "metadata.json"
ID_SEP = "#"


def resource_dir(name: str) -> Path:
    """``bundles`` or ``configs``: inside the installed package, else the checkout's top-level folder.

    Raises:
        ValueError: ``name`` is not a resource.
        InputError: neither folder exists (a package built without its data files).
    """
    if name not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {name!r}")
    for folder in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if folder.is_dir():
            return folder
    raise InputError(PACKAGE_DIR / name, "not found: this medssl3d installation lacks its bundles and configs")


def bundle_dir(name: str) -> Path:
    """The folder of bundle ``name`` (e.g. ``"swin_ssl"``, ``"segmentation"``).

    Raises:
        ValueError: there is no such bundle (the known ones are listed).
    """
    root = resource_dir("bundles")
    path = root / name
    if not (path / "configs" / METADATA).is_file():
        known = sorted(p.parent.parent.name for p in root.glob(f"*/configs/{METADATA}"))
        raise ValueError(f"no bundle {name!r} in {root}; the bundles are {known}")
    return path


def method_preset_file(method: str) -> Path:
    """``configs/methods/<method>.yaml``: the YAML presets of a pretraining method's typed config."""
    return resource_dir("configs") / "methods" / f"{method}.yaml"


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["id=value", ...]`` from the command line as bundle overrides; values are JSON when they parse as JSON.

    ``roi_size=[64,64,64]`` gives a list, ``lr=1e-4`` a float, ``modality=mri`` the string ``"mri"``.

    Raises:
        ValueError: an item without ``=`` or with an empty id.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not of the form id=value (e.g. train#trainer#config#lr=1e-4)")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise bad input as the error a user can act on, in one line where it is one problem.

    A ``ValueError`` that MONAI wrapped in ``RuntimeError`` layers comes out as itself; a
    :class:`~medssl3d.data.errors.DatalistError` listing a single problem comes out as that problem (it names
    the file).
    """
    try:
        yield
    except (RuntimeError, DatalistError) as err:
        cause = user_error(err)
        if cause is None:
            raise
        if isinstance(cause, DatalistError) and len(cause.problems) == 1:
            raise ValueError(str(cause.problems[0])) from None
        if cause is err:
            raise
        raise cause from None


def read_configs(bundle: Path, configs: Sequence[str]):
    """A MONAI ``ConfigParser`` holding ``configs`` of ``bundle`` merged in order (no overrides, not parsed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{name}.json") for name in configs])
    return parser


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


class Ran(NamedTuple):
    """A finished bundle run: the ``run`` section's results and the workflow (its parsed objects stay resolved)."""

    results: list[Any]
    workflow: Any


@dataclass(frozen=True)
class BundleJob:
    """One run of a bundle: its configs, the job's overrides and the user's ``id=value`` overrides.

    Attributes:
        bundle: the bundle folder.
        configs: config names under ``configs/``, later ones overriding earlier ones.
        workflow_type: ``"train"`` or ``"infer"``.
        overrides: what the job sets (``{bundle id: value}``).
        user_overrides: ``id=value`` pairs from the command line; they win, and each must name an existing id
            (or a new key of an existing section).
        shown: ids whose resolved values ``--dry-run`` prints (only cheap ones without side effects).
        shown_defaults: ``{id: defaults}`` for shown ids holding a settings dict that names only what it changes
            (a pretraining bundle's engine settings): ``--dry-run`` prints the dict over its defaults.
    """

    bundle: Path
    configs: tuple[str, ...]
    workflow_type: str
    overrides: Mapping[str, Any]
    user_overrides: Mapping[str, Any] = field(default_factory=dict)
    shown: tuple[str, ...] = ()
    shown_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def workflow(self):
        """The bundle as a MONAI ``ConfigWorkflow`` with every override applied (not yet initialised).

        Raises:
            ValueError: a user override names an id that the configs do not have.
        """
        from monai.bundle import ConfigWorkflow

        parser = read_configs(self.bundle, self.configs)
        for key in self.user_overrides:
            parent = key.rpartition(ID_SEP)[0]
            if key not in parser and (not parent or not isinstance(parser.get(parent), dict)):
                names = " + ".join(f"{c}.json" for c in self.configs)
                raise ValueError(f"{key}: no such id in {self.bundle / 'configs'} ({names})")
        return ConfigWorkflow(
            config_file=[str(self.bundle / "configs" / f"{name}.json") for name in self.configs],
            meta_file=str(self.bundle / "configs" / METADATA),
            logging_file=False,
            workflow_type=self.workflow_type,
            **{"bundle_root": str(self.bundle), **self.overrides, **self.user_overrides},
        )

    def resolve(self, ids: Sequence[str]) -> dict[str, Any]:
        """The values ``ids`` resolve to with every override applied (ids the configs lack are left out).

        Only for ids that are cheap to resolve and free of side effects: nothing is initialised or run.
        """
        with user_errors():
            workflow = self.workflow()
            workflow.parser.parse(reset=True)
            return {key: workflow.parser.get_parsed_content(key) for key in ids if key in workflow.parser}

    def describe(self) -> str:
        """What ``--dry-run`` prints: the bundle, its configs, the overrides and the resolved values of ``shown``."""
        resolved = self.resolve(self.shown)
        for key, defaults in self.shown_defaults.items():
            if key in resolved:
                resolved[key] = {**defaults, **resolved[key]}
        overlay = {**self.overrides, **self.user_overrides}
        width = max((len(k) for k in resolved), default=0)
        lines = [
            f"bundle:    {self.bundle}",
            f"configs:   {', '.join(f'{c}.json' for c in self.configs)} ({self.workflow_type} workflow)",
            "overrides (a JSON overlay on the configs):",
            json.dumps(overlay, indent=2, default=repr),
            "resolved ids:",
            *(f"  {key:<{width}}  {_show(value)}" for key, value in resolved.items()),
        ]
        return "\n".join(lines)

    def run(self) -> Ran:
        """Initialise, run and finalise the workflow in this process."""
        with user_errors():
            workflow = self.workflow()
            workflow.initialize()
            results = workflow.run()
            workflow.finalize()
        return Ran(results, workflow)


def progress_handlers(parser, handlers_id: str, name: str) -> dict[str, list]:
    """An override putting a :class:`~medssl3d.bundle_support.progress.ProgressLogger` first in ``handlers_id``.

    Args:
        parser: the bundle's configs (:func:`read_configs`).
        handlers_id: a list of handlers in the configs, e.g. ``"train#handlers"``.
        name: what the progress lines call the engine.
    """
    progress = {"_target_": "medssl3d.bundle_support.progress.ProgressLogger", "name": name}
    return {handlers_id: [progress, *parser.get(handlers_id)]}
