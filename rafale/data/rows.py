"""Rows written to an Arrow file a batch at a time as a build makes them, then read back memory-mapped: a split's
rows are never all in memory, whatever its size.

The file is the Arrow stream that `datasets` writes and reads (`Dataset.from_file`), with the features in its
schema, so the rows and their features are those `Dataset.from_dict` would give.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, Features

# Rows held before they are written as one record batch.
BATCH_ROWS = 1000


class RowWriter:
    """Appends rows (dicts of the features' columns) to `file`; `finish` returns them as a memory-mapped Dataset.
    Used as a context manager, the file is closed however the block ends."""

    def __init__(self, file: Path, features: Features, batch_rows: int = BATCH_ROWS):
        import pyarrow as pa

        self.file, self.batch_rows = file, batch_rows
        self.schema = features.arrow_schema
        self.pending: dict[str, list] = {name: [] for name in self.schema.names}
        self.rows = 0
        self.sink = pa.OSFile(str(file), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self.pending.items():
            values.append(row[name])
        self.rows += 1
        if len(self.pending[self.schema.names[0]]) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.pending[self.schema.names[0]]:
            return
        self.writer.write_batch(pa.record_batch(
            [pa.array(self.pending[name], type=self.schema.field(name).type) for name in self.schema.names],
            schema=self.schema))
        self.pending = {name: [] for name in self.schema.names}

    def close(self) -> None:
        if not self.sink.closed:
            self.writer.close()
            self.sink.close()

    def finish(self) -> Dataset:
        import datasets

        self.flush()
        self.close()
        return datasets.Dataset.from_file(str(self.file))
