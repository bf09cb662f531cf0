"""Evaluation of trained models: perplexity and the byte-level figures over documents (`rafale eval`)."""

from rafale.evaluate.perplexity import Perplexity, evaluate_folder, evaluate_perplexity, rolling_windows

__all__ = ["Perplexity", "evaluate_folder", "evaluate_perplexity", "rolling_windows"]
