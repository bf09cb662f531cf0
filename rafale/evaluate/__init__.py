"""Evaluation of trained models: perplexity and the byte-level figures over documents (`rafale eval --data`), and
lm-evaluation-harness tasks through rafale's models (`rafale eval --tasks`, harness.py: an optional install)."""

import importlib.util

from rafale.errors import RafaleError
from rafale.evaluate.perplexity import Perplexity, evaluate_folder, evaluate_perplexity, rolling_windows

__all__ = ["Perplexity", "evaluate_folder", "evaluate_perplexity", "require_lm_eval", "rolling_windows"]


def require_lm_eval() -> None:
    """One line naming the install when lm-evaluation-harness is missing, before any model is loaded."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RafaleError('lm-evaluation-harness is not installed: pip install "rafale[eval]"')
