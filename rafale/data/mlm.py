"""The MLM pipeline: documents -> rows of token ids framed by the tokenizer's special tokens ([CLS] ... [SEP]).

Two ways to make rows (`data.config.mlm_truncate`):

- "chunk" (default): every document is followed by the separator ([SEP], </s>), the split's documents are
  concatenated and cut into blocks of `max_sequence_length` minus the frame, as the causal pipeline does, and
  each block is framed: [CLS] block [SEP]. No token is thrown away but the tail (`tail`).
- "truncate": one row per document, [CLS] document [SEP], cut to `max_sequence_length`; the collator pads.

Masking is not done here but in the collator, batch by batch, so that every epoch masks differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rafale.config import DataSettings
from rafale.data.causal import chunk, tokenize
from rafale.data.tokenizer import mask_token_id, truncating_copy, wrapping_ids
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer


def prepare(documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: DataSettings,
            work: Path) -> tuple[dict[str, Dataset], dict[str, dict[str, int]], dict[str, Any]]:
    """(rows per split, their summary, what meta.json should add: nothing here). `eos_id` ([SEP], </s>) ends
    each document in "chunk" mode."""
    mask_token_id(tokenizer, settings.tokenizer_path or "the trained tokenizer")
    prefix, suffix = wrapping_ids(tokenizer)
    length = settings.max_sequence_length
    if length <= len(prefix) + len(suffix):
        raise RafaleError(f"data.config.max_sequence_length: {length} leaves no room inside the "
                          f"{len(prefix) + len(suffix)} special tokens around each row")
    splits, summary = {}, {}
    for split, docs in documents.items():
        if settings.mlm_truncate == "chunk":
            tokens = tokenize(docs, settings.text_column, tokenizer, eos_id, settings.num_processes,
                              work / f"{split}.arrow")
            inner = settings.model_copy(update={"max_sequence_length": length - len(prefix) - len(suffix)})
            blocks, _ = chunk(tokens, inner, split)
            rows = _frame(blocks, settings.input_id_key, prefix, suffix, work / f"{split}-framed.arrow")
        else:
            rows = _truncated(docs, settings, truncating_copy(tokenizer, length), work / f"{split}-rows.arrow")
        splits[split] = rows
        summary[split] = {"documents": len(docs), "tokens": _count_tokens(rows, settings.input_id_key),
                          "blocks": len(rows)}
    return splits, summary, {}


def _features(column: str):
    import datasets

    return datasets.Features({column: datasets.Sequence(datasets.Value("int32"))})


def _frame(blocks: Dataset, column: str, prefix: list[int], suffix: list[int], cache_file: Path) -> Dataset:
    def frame(rows: list[list[int]]) -> dict[str, list[list[int]]]:
        return {column: [prefix + row + suffix for row in rows]}

    return blocks.map(frame, input_columns=[column], batched=True, features=_features(column),
                      cache_file_name=str(cache_file), desc="Framing blocks")


def _truncated(docs: Dataset, settings: DataSettings, tokenizer: Tokenizer, cache_file: Path) -> Dataset:
    column = settings.input_id_key

    def encode(texts: list[str]) -> dict[str, list[list[int]]]:
        return {column: [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]}

    return docs.map(encode, input_columns=[settings.text_column], batched=True, remove_columns=docs.column_names,
                    num_proc=settings.num_processes if settings.num_processes > 1 else None,
                    features=_features(column), cache_file_name=str(cache_file), desc="Tokenizing")


def _count_tokens(rows: Dataset, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(rows.data.column(column))).as_py() or 0)
