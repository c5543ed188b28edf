"""recur: pretraining recurrent large language models."""

__version__ = "0.1.0"
