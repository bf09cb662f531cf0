"""The datapipe: a source of documents -> tokenizer -> the task's rows of token ids, cached -> dataloaders.

Importing this package is cheap: torch, datasets and tokenizers are imported by the functions that use them.
"""

from rafale.data.cache import PreparedData, format_summary, prepare_data
from rafale.data.loaders import build_dataloaders

__all__ = ["PreparedData", "build_dataloaders", "format_summary", "prepare_data"]
