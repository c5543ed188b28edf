"""recur: pretraining recurrent large language models.

Subpackages: recur.kernels (the recurrences), recur.modeling, recur.data, recur.train, recur.eval.
Importing recur is cheap and needs no GPU: heavy libraries (fla, triton, deepspeed) load on first use.
"""
from pathlib import Path

__version__ = "0.1.0"

RECIPES_DIR = Path(__file__).parent / "recipes"
SLURM_DIR = Path(__file__).parent / "slurm"

from . import modeling  # noqa: E402,F401  registers the model families with transformers' Auto classes
