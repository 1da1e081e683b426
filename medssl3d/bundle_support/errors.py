"""Bad input behind MONAI's wrappers: the one sentence a user needs, for the CLI and for ``monai.bundle run``.

MONAI's config machinery re-raises whatever a component raised as ``RuntimeError("Failed to instantiate
component ...")`` or ``RuntimeError("Failed to evaluate ConfigExpression ...")``, and its transforms as
``RuntimeError("applying transform ...")``, each ``from`` the original error. Bad input in medssl3d is a
``ValueError`` (:class:`~medssl3d.data.errors.InputError` names the file), so the sentence a user can act on
is the innermost cause of a chain of such wrappers.
"""

from __future__ import annotations

import sys
from types import TracebackType

#: Marks the hook installed by :func:`report_user_errors_last`, so a second call does not wrap it again.
_HOOK_MARK = "_medssl3d_reports_user_errors"


def user_error(error: BaseException) -> ValueError | None:
    """The bad-input error behind ``error``, or ``None`` when ``error`` is something else (a bug).

    Follows ``__cause__`` through ``RuntimeError`` wrappers (MONAI's) to the innermost error; that is the
    answer when it is a ``ValueError``.

    Args:
        error: the error that reached the caller.
    """
    seen: set[int] = set()
    while isinstance(error, RuntimeError) and error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error if isinstance(error, ValueError) else None


def report_user_errors_last() -> None:
    """Make an uncaught bad-input error end the process's output with its one sentence (``monai.bundle run``).

    Wraps ``sys.excepthook``: the traceback is printed exactly as before (nothing is swallowed), then, when the
    error is a MONAI wrapper around a ``ValueError``, ``<ErrorType>: <sentence>`` follows as the last line.
    A bundle calls this in its ``initialize`` section; calling it again changes nothing.
    """
    previous = sys.excepthook
    if getattr(previous, _HOOK_MARK, False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, error, traceback)
        cause = user_error(error)
        if cause is not None and cause is not error:
            print(f"{type(cause).__name__}: {cause}", file=sys.stderr)

    setattr(hook, _HOOK_MARK, True)
    sys.excepthook = hook
