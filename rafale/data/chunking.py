"""Concatenate and chunk: documents -> token ids with an EOS after each -> one stream per split -> blocks.

What the causal LM and the MLM (in its "chunk" mode) make their rows with. Blocks are cut from the whole split's
stream (not per `map` batch or per process), so they are the same whatever `num_processes` or
`build_shard_documents` is, and joined back together they are exactly the stream. The last partial block is
dropped (`tail: drop`) or kept as a shorter row (`tail: pad`) that the collator pads.

The stream is never held whole: `build_shard_documents` documents at a time are tokenized (with several
`num_processes`, datasets' `map` tokenizes `SHARDS_PER_CALL` shards per process at a time into Arrow files read
back memory-mapped, a shard at a time), their ids appended to the tokens left over from the shard before, every
full block written to an Arrow file, and what is left (less than a block) carried into the next shard. Memory
follows that setting, not the corpus; datasets then reads the file memory-mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from rafale.config import DataSettings
from rafale.data.progress import BuildProgress
from rafale.errors import RafaleError

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, Features
    from tokenizers import Tokenizer

# The column that holds each document's token ids between tokenizing and chunking or packing.
TOKENS = "tokens"
# With several processes, one `map` call tokenizes this many shards per process: each call starts a pool of
# processes (about half a second under load), so a call gets enough work to hide that. The progress line moves
# once per call.
SHARDS_PER_CALL = 16


def mapped_pieces(documents: Dataset, encode: Callable, settings: DataSettings, features: Features, cache_file: Path,
                  input_columns: Optional[list[str]] = None) -> Iterator[Dataset]:
    """`documents` through `encode` (a batched `map`, in `num_processes` processes), a piece at a time: each
    piece's rows, in the documents' order, written to Arrow files named after `cache_file` and read back
    memory-mapped. With several processes a piece is `SHARDS_PER_CALL` shards per process, else one shard."""
    processes = settings.num_processes
    size = settings.build_shard_documents * (SHARDS_PER_CALL * processes if processes > 1 else 1)
    # An empty split still gives one (empty) piece, with the features.
    for start in range(0, max(len(documents), 1), size):
        piece = documents.select(range(start, min(start + size, len(documents))))
        yield piece.map(encode, input_columns=input_columns, batched=True, remove_columns=piece.column_names,
                        num_proc=processes if processes > 1 else None, features=features,
                        cache_file_name=str(cache_file.with_name(f"{cache_file.stem}-{start}.arrow")),
                        desc="Tokenizing")


def mapped(documents: Dataset, encode: Callable, settings: DataSettings, features: Features, cache_file: Path,
           what: str, input_columns: Optional[list[str]] = None) -> Dataset:
    """All the pieces of `mapped_pieces` as one memory-mapped Dataset, with a progress line that counts the
    documents and the tokens of the features' first column."""
    import datasets
    import pyarrow.compute as pc

    progress = BuildProgress(what, len(documents))
    pieces = []
    for piece in mapped_pieces(documents, encode, settings, features, cache_file, input_columns):
        pieces.append(piece)
        tokens = pc.sum(pc.list_value_length(piece.data.column(next(iter(features))))).as_py() or 0
        progress.update(len(piece), tokens)
    progress.close()
    return datasets.concatenate_datasets(pieces)


def _encode(tokenizer: Tokenizer, texts: list[str], eos_id: int):
    """Each text's token ids with EOS appended, as an Arrow list array of int32."""
    import pyarrow as pa

    # No special tokens: a BERT-style tokenizer would wrap every document in [CLS] ... [SEP].
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    # An Arrow array, not Python lists: written and flattened as is, without converting row by row.
    return pa.array([encoding.ids + [eos_id] for encoding in encodings], type=pa.list_(pa.int32()))


def chunk(documents: Dataset, column: str, tokenizer: Tokenizer, eos_id: int, settings: DataSettings, split: str,
          blocks_file: Path, frame: tuple[Sequence[int], Sequence[int]] = ((), ())) -> tuple[Dataset, int]:
    """(blocks of `max_sequence_length` ids in column `input_id_key`, number of tokens in them), written to
    `blocks_file` shard by shard. `frame`: ids put before and after every block (an encoder's [CLS] and [SEP]),
    not counted in the tokens; the blocks are then Arrow lists, else large lists (a split may hold more than 2**31
    tokens)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    length, (prefix, suffix) = settings.max_sequence_length, frame
    framed = bool(prefix or suffix)
    schema = pa.schema({settings.input_id_key: pa.list_(pa.int32()) if framed else pa.large_list(pa.int32())})
    progress = BuildProgress(f"tokenizing and chunking {split}", len(documents))
    carry, kept = np.empty(0, dtype=np.int32), 0
    with pa.OSFile(str(blocks_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        def write(blocks: np.ndarray) -> None:
            """Blocks as rows of a [rows, tokens] array: framed, and written as one record batch."""
            rows = len(blocks)
            if framed:
                blocks = np.hstack([np.tile(np.asarray(prefix, np.int32), (rows, 1)), blocks,
                                    np.tile(np.asarray(suffix, np.int32), (rows, 1))])
            width = blocks.shape[1]
            offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32 if framed else np.int64))
            array_type = pa.ListArray if framed else pa.LargeListArray
            writer.write_batch(pa.record_batch([array_type.from_arrays(offsets, pa.array(blocks.ravel()))],
                                               schema=schema))

        for shard in tokenized_shards(documents, column, tokenizer, eos_id, settings,
                                      blocks_file.with_name(f"{blocks_file.stem}-tokens.arrow")):
            # flatten() honours the array's offsets, so the stream is exactly the documents' ids in order.
            ids = shard.flatten().to_numpy()
            stream = np.concatenate([carry, ids])
            full = len(stream) - len(stream) % length
            if full:
                write(stream[:full].reshape(-1, length))
            carry, kept = stream[full:], kept + full
            progress.update(len(shard), len(ids))
        progress.close()
        if settings.tail == "pad" and len(carry):
            write(carry.reshape(1, -1))
            kept += len(carry)
    if kept == 0:
        raise RafaleError(f"data.config.max_sequence_length: the {split} split has {len(carry)} tokens, fewer than "
                          f"one block of {length}; lower max_sequence_length, add data or set data.config.tail: pad")
    return datasets.Dataset.from_file(str(blocks_file)), kept


def tokenized_shards(documents: Dataset, column: str, tokenizer: Tokenizer, eos_id: int, settings: DataSettings,
                     tokens_file: Path) -> Iterator[pa.ListArray]:
    """Each shard's documents as token ids with an EOS after each (an Arrow list array, a document a row), shard
    after shard in the documents' order."""
    import datasets
    import pyarrow as pa

    size = settings.build_shard_documents
    if settings.num_processes == 1:
        for start in range(0, len(documents), size):
            yield _encode(tokenizer, documents[start:start + size][column], eos_id)
        return
    # Several processes: datasets' own map tokenizes a piece of many shards into Arrow files, read back
    # memory-mapped a shard at a time (a process pool of rafale's own hung in a forked worker, on a lock the
    # parent's threads held when it forked).
    features = datasets.Features({TOKENS: datasets.Sequence(datasets.Value("int32"))})
    for piece in mapped_pieces(documents, lambda texts: pa.table({TOKENS: _encode(tokenizer, texts, eos_id)}),
                               settings, features, tokens_file, [column]):
        tokens = piece.data.column(TOKENS)
        for start in range(0, len(tokens), size):
            shard = tokens.slice(start, size)
            yield shard.chunks[0] if shard.num_chunks == 1 else pa.concat_arrays(shard.chunks)
