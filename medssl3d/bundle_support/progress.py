"""Progress of an ignite engine (trainer or evaluator) as log lines with rate and ETA."""

from __future__ import annotations

import datetime
import logging
import math
import time

from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

logger = logging.getLogger(__name__)

#: Without an explicit interval, a run logs about this many progress lines.
DEFAULT_LINES = 50


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``"?"`` when unknown)."""
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class ProgressLogger:
    """Log ``<name> epoch e/E iteration i/N (p%) | r it/s | ETA h:mm:ss`` every ``interval`` iterations (rank 0).

    The rate is the mean since the engine started iterating in this process, so a resumed run (its
    iteration counter restored by a checkpoint loader) reports the rate of its own iterations and the
    time left to the end of the whole run. The last iteration is always logged.

    Args:
        name: what the lines call the engine, e.g. ``"training"``.
        interval: iterations between lines; ``None``: about ``DEFAULT_LINES`` lines per run.

    Raises:
        ValueError: ``interval`` < 1.
    """

    def __init__(self, name: str = "progress", interval: int | None = None) -> None:
        if interval is not None and interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.name = name
        self.interval = interval
        self._t0: float | None = None
        self._first = 0

    def attach(self, engine: Engine) -> None:
        """Register with ``engine`` (rank 0 only; other ranks log nothing)."""
        if idist.get_rank() != 0:
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._mark_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._t0 = None

    def _mark_start(self, engine: Engine) -> None:
        if self._t0 is None:
            self._t0, self._first = time.perf_counter(), engine.state.iteration - 1

    def __call__(self, engine: Engine) -> None:
        """Log a line when the iteration is due."""
        state = engine.state
        total = state.max_epochs * state.epoch_length
        every = self.interval or max(1, total // DEFAULT_LINES)
        if state.iteration % every and state.iteration != total:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (state.iteration - self._first) / elapsed if elapsed > 0 else 0.0
        eta = (total - state.iteration) / rate if rate > 0 else math.inf
        logger.info(
            "%s epoch %d/%d iteration %d/%d (%.0f%%) | %.2f it/s | ETA %s",
            self.name, state.epoch, state.max_epochs, state.iteration, total,
            100.0 * state.iteration / max(total, 1), rate, format_eta(eta),
        )
