"""wina: a compiler for activation-sparse language models."""

__version__ = "0.1.0"
