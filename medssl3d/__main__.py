"""``python -m medssl3d``: the ``medssl3d`` command where only the interpreter is on the path (e.g. ``torchrun -m``)."""

import sys

from medssl3d.cli import main

sys.exit(main())
