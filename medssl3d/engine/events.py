"""Events of the pretraining loop and the protocol of the handlers that listen to them.

The engine's loop is not an ignite engine, but its handlers look like MONAI's: an object with
``attach(trainer)`` that registers callbacks with ``trainer.add_event_handler(event, fn)``; the
trainer then calls ``fn(trainer)`` at that event. A bundle lists handlers in JSON::

    "trainer": {"_target_": "medssl3d.engine.trainer.Pretrainer", ...,
                "handlers": [{"_target_": "medssl3d.engine.probe.SegmentationProbe", ...}]}
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol


class Events(str, enum.Enum):
    """Where :meth:`Pretrainer.run <medssl3d.engine.trainer.Pretrainer.run>` calls handlers, on every rank.

    Attributes:
        STARTED: each ``run()`` call, after set-up and resume, before its first step.
        ITERATION_COMPLETED: after each optimizer step and EMA update; ``trainer.step`` counts the steps
            done. Handlers may call ``trainer.log_scalars`` here; the scalars join that step's record.
        COMPLETED: when a ``run()`` call ends normally (also at ``until_step``), after its last checkpoint.
    """

    STARTED = "started"
    ITERATION_COMPLETED = "iteration_completed"
    COMPLETED = "completed"


class EventSource(Protocol):
    """What a handler needs of the trainer to register itself (:class:`medssl3d.engine.trainer.Pretrainer` is one)."""

    def add_event_handler(self, event: Events | str, handler: Callable[[Any], None]) -> None:
        """Call ``handler(trainer)`` at ``event``."""


class Handler(Protocol):
    """Anything with ``attach(trainer)``, e.g. :class:`medssl3d.engine.probe.SegmentationProbe`."""

    def attach(self, trainer: EventSource) -> None:
        """Register callbacks with ``trainer.add_event_handler``."""
