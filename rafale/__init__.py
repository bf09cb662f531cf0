"""rafale: a simple, opinionated CLI for training small transformer language models."""

__version__ = "0.2.0"
