"""The ``medssl3d`` jobs (pretrain, finetune, evaluate, predict) as thin layers over the MONAI bundles.

Each job turns a few options into overrides of one bundle's configs and runs it in this process through
MONAI's ``ConfigWorkflow``, as ``python -m monai.bundle run`` would; ``--dry-run`` prints those overrides
and the bundle ids they resolve to instead. :mod:`medssl3d.jobs.bundles` finds the bundles (in the installed
package, or beside it in a checkout) and runs them.
"""
