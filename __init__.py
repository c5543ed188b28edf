"""recur: pretraining recurrent large language models.

Subpackages: recur.kernels (the recurrences), recur.modeling, recur.data, recur.train, recur.eval.
Importing recur needs no GPU and does not load fla or deepspeed; it registers the model families
with transformers' Auto classes.
"""
if __name__ != "recur":
    # The repository root is this package. A tool that imports the root folder by path under its
    # folder name (pytest collecting the checkout) gets the installed `recur`, not a second copy
    # whose classes would re-register over the real ones.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("recur")
else:
    from pathlib import Path

    __version__ = "0.1.0"

    RECIPES_DIR = Path(__file__).parent / "recipes"
    SLURM_DIR = Path(__file__).parent / "slurm"

    from . import modeling  # noqa: F401  registers the model families with transformers' Auto classes
