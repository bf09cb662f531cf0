"""Concatenate and chunk: documents -> token ids with an EOS after each -> one stream per split -> blocks.

What the causal LM and the MLM (in its "chunk" mode) make their rows with. Blocks are cut from the whole split's
stream at once (not per `map` batch or per process), so they are the same whatever `num_processes` is, and
joined back together they are exactly the stream. The last partial block is dropped (`tail: drop`) or kept as a
shorter row (`tail: pad`) that the collator pads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rafale.config import DataSettings
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset
    from tokenizers import Tokenizer

# The column that holds each document's token ids between tokenizing and chunking.
TOKENS = "tokens"


def tokenize(documents: Dataset, column: str, tokenizer: Tokenizer, eos_id: int, num_processes: int,
             cache_file: Path) -> Dataset:
    """One row of int32 token ids per document, EOS appended; written to `cache_file` (and its shards)."""
    import datasets
    import pyarrow as pa

    def encode(texts: list[str]) -> pa.Table:
        # No special tokens: a BERT-style tokenizer would wrap every document in [CLS] ... [SEP].
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        # An Arrow table, not Python lists: datasets writes it as is, without converting row by row.
        ids = pa.array([encoding.ids + [eos_id] for encoding in encodings], type=pa.list_(pa.int32()))
        return pa.table({TOKENS: ids})

    return documents.map(encode, input_columns=[column], batched=True, remove_columns=documents.column_names,
                         num_proc=num_processes if num_processes > 1 else None,
                         features=datasets.Features({TOKENS: datasets.Sequence(datasets.Value("int32"))}),
                         cache_file_name=str(cache_file), desc="Tokenizing")


def chunk(tokens: Dataset, settings: DataSettings, split: str) -> tuple[Dataset, int]:
    """(blocks of `max_sequence_length` ids in column `input_id_key`, number of tokens in them)."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.table import InMemoryTable

    length = settings.max_sequence_length
    # flatten() honours each chunk's offsets, so the stream is exactly the documents' ids in order.
    stream = pa.concat_arrays([piece.flatten() for piece in tokens.data.column(TOKENS).chunks])
    total = len(stream)
    kept = total if settings.tail == "pad" else total - total % length
    if kept == 0:
        raise RafaleError(f"data.config.max_sequence_length: the {split} split has {total} tokens, fewer than one "
                          f"block of {length}; lower max_sequence_length, add data or set data.config.tail: pad")
    starts = np.arange(0, kept, length, dtype=np.int64)
    offsets = pa.array(np.append(starts, kept))
    # Large lists: a split may hold more than 2**31 tokens.
    blocks = pa.LargeListArray.from_arrays(offsets, stream.slice(0, kept))
    return datasets.Dataset(InMemoryTable(pa.table({settings.input_id_key: blocks}))), kept
