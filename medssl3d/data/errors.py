"""Errors raised for bad input: every message names the offending file and the problem."""

from __future__ import annotations

import os


class InputError(ValueError):
    """A file, folder or datalist entry that the toolkit cannot use.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DatalistError(ValueError):
    """A datalist with one or more bad entries; ``problems`` lists every one found.

    Args:
        source: the datalist file (or a description of the in-memory list).
        problems: one :class:`InputError` (or message) per bad entry.
    """

    def __init__(self, source: str | os.PathLike, problems: list):
        self.source = str(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s) found:\n{lines}")
