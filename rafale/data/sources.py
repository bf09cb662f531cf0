"""Where documents come from: local files, a `save_to_disk` folder, a hub dataset, or the synthetic corpus.

`load_documents` returns a DatasetDict with a "train" and a "validation" split of raw documents;
`source_fingerprint` describes the source cheaply (paths, sizes, mtimes; no reading) so that the cache can tell
whether it changed. Local files:

- `.txt`: documents are separated by one or more blank lines (lines that are empty or hold only whitespace);
  each document is stripped of leading and trailing whitespace. Its column is "text".
- `.jsonl` / `.json` / `.parquet`: read by the `datasets` builder of that format; `text_column` names the column.
- Text files (`.txt`, `.jsonl`, `.json`) must be UTF-8: a file that is not is an error naming the file and the
  offset of the first bad byte, never silently repaired, so that the same file always gives the same tokens.
- A folder uses the files of one supported kind below it; as on the hub, files named like `validation*`,
  `valid*`, `val*` or `dev*` (and `train*`) form the splits. A glob's files are all training documents.
"""

from __future__ import annotations

import codecs
import glob
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rafale.config import SYNTHETIC_PREFIX, DataSettings
from rafale.errors import RafaleError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset, DatasetDict

KEY = "data.config.dataset_path"
# The `datasets` builder that reads each kind of file; `.txt` files are read by `_text_documents`.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": None}
TEXT_FORMATS = {".txt", ".jsonl", ".json"}
# The splits a source's files may form.
SPLITS = ("train", "validation", "test")
# The bundled corpora: stories (text) and sentiment (text and a "negative" / "positive" label).
SYNTHETIC_CORPORA = ("stories", "sentiment")


def is_synthetic(settings: DataSettings) -> bool:
    return settings.dataset_path.startswith(SYNTHETIC_PREFIX)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def is_local(text: str) -> bool:
    """A path rather than a hub name (a missing `data.txt` is a missing file, not a dataset on the hub)."""
    return (os.path.isabs(text) or os.path.exists(text) or glob.has_magic(text)
            or Path(text).suffix.lower() in BUILDERS)


def source_fingerprint(settings: DataSettings) -> dict[str, Any]:
    """What identifies the source without reading it: for local sources, every file's path, size and mtime."""
    path = settings.dataset_path
    if is_synthetic(settings):
        return {"synthetic": path, "documents": settings.synthetic_documents, "seed": settings.synthetic_seed}
    if not is_local(path):
        return {"hub": path}
    folder = Path(path)
    if folder.is_dir() and is_saved_dataset(folder):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    else:
        # Test files too: a task may read them (SFT scores its held-out answers on them).
        files = [file for split_files in local_files(path, SPLITS).values() for file in split_files]
    return {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def check_source(settings: DataSettings, synthetic_corpora: tuple[str, ...] = SYNTHETIC_CORPORA) -> None:
    """What can be told about the source without reading it, when the run file is read: a known synthetic corpus,
    and a local folder that holds data files (or is a saved dataset)."""
    path = settings.dataset_path
    if path.startswith(SYNTHETIC_PREFIX):
        corpus = path[len(SYNTHETIC_PREFIX):]
        if corpus not in synthetic_corpora:
            raise RafaleError(f"{KEY}: unknown synthetic corpus {corpus!r} for this task; valid: "
                              + ", ".join(SYNTHETIC_PREFIX + c for c in synthetic_corpora))
        return
    folder = Path(path)
    if settings.is_prepared or not folder.is_dir() or is_saved_dataset(folder):
        return
    if not any(file.suffix.lower() in BUILDERS for file in folder.rglob("*") if file.is_file()):
        raise RafaleError(f"{KEY}: no data files ({', '.join(BUILDERS)}) in {folder}")


def local_files(path: str, splits: tuple[str, ...] = ("train", "validation")) -> dict[str, list[Path]]:
    """The supported files of a file, folder or glob, by split ("train", maybe "validation")."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    source = Path(path)
    if source.is_file():
        by_split = {"train": [source]}
    elif source.is_dir():
        patterns = get_data_patterns(str(source))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(source))
        by_split = {str(split): [Path(f) for f in files] for split, files in resolved.items()}
    else:
        by_split = {"train": [Path(f) for f in sorted(glob.glob(path, recursive=True)) if os.path.isfile(f)]}
    by_split = {split: sorted(f for f in files if f.suffix.lower() in BUILDERS)
                for split, files in by_split.items() if split in splits}
    if not by_split.get("train"):
        if source.is_file():
            raise RafaleError(f"{KEY}: {source}: unsupported file type; use {', '.join(BUILDERS)}")
        if not source.exists() and not glob.has_magic(path):
            raise RafaleError(f"{KEY}: no such file or folder: {source}")
        raise RafaleError(f"{KEY}: no training files ({', '.join(BUILDERS)}) in {path}")
    kinds = {f.suffix.lower() for files in by_split.values() for f in files}
    if len({BUILDERS[kind] for kind in kinds}) > 1:
        raise RafaleError(f"{KEY}: {path} mixes {', '.join(sorted(kinds))} files; use one kind")
    return by_split


def check_text(file: Path) -> bool:
    """Whether the file holds anything but whitespace; a RafaleError naming the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(file, "rb") as stream:
        while True:
            chunk = stream.read(1 << 20)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # The decoder may hold back up to 3 bytes of an unfinished character from the previous chunk.
                pending = len(error.object) - len(chunk)
                at = offset - pending + error.start
                raise RafaleError(f"{KEY}: {file}: not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                                  f"at offset {at})") from None
            has_text = has_text or bool(text.strip())
            if not chunk:
                return has_text
            offset += len(chunk)


def _text_documents(files: list[str]) -> Iterator[dict[str, str]]:
    """Documents of .txt files: runs of lines separated by blank lines, stripped."""
    for file in files:
        lines: list[str] = []
        with open(file, encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield {"text": "".join(lines).strip()}
                    lines = []
        if lines:
            yield {"text": "".join(lines).strip()}


def _load_files(by_split: dict[str, list[Path]], source: str, work_dir: Path) -> DatasetDict:
    import datasets

    # Files without documents are left out: some readers fail on them.
    by_split = {split: [f for f in files if (check_text(f) if f.suffix.lower() in TEXT_FORMATS
                                             else f.stat().st_size > 0)]
                for split, files in by_split.items()}
    by_split = {split: files for split, files in by_split.items() if files}
    if "train" not in by_split:
        raise RafaleError(f"{KEY}: no documents in {source}")
    builder = BUILDERS[by_split["train"][0].suffix.lower()]
    data_files = {split: [str(f) for f in files] for split, files in by_split.items()}
    try:
        if builder is None:
            features = datasets.Features({"text": datasets.Value("string")})
            return datasets.DatasetDict({
                split: datasets.Dataset.from_generator(_text_documents, features=features, cache_dir=str(work_dir),
                                                       gen_kwargs={"files": files}, split=datasets.NamedSplit(split))
                for split, files in data_files.items()})
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=str(work_dir))
    except Exception as error:  # a malformed file surfaces as any of several pyarrow / datasets errors
        cause = error.__cause__ or error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise RafaleError(f"{KEY}: could not read {source}: {first_line}") from None


def _load_hub(name: str) -> DatasetDict:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, gated dataset: all say the same to the user
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RafaleError(f"{KEY}: could not load hub dataset {name!r}: {first_line}") from None
    return loaded


def _synthetic(settings: DataSettings) -> DatasetDict:
    import datasets

    from rafale.data.sentiment import generate_sentiment
    from rafale.data.synthetic import generate_stories

    corpus = settings.dataset_path[len(SYNTHETIC_PREFIX):]
    if corpus not in SYNTHETIC_CORPORA:
        raise RafaleError(f"{KEY}: unknown synthetic corpus {corpus!r}; valid: "
                          + ", ".join(SYNTHETIC_PREFIX + c for c in SYNTHETIC_CORPORA))
    if corpus == "sentiment":
        texts, labels = generate_sentiment(settings.synthetic_documents, settings.synthetic_seed)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "label": labels})})
    stories = generate_stories(settings.synthetic_documents, settings.synthetic_seed)
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories})})


def load_raw(settings: DataSettings, work_dir: Path) -> DatasetDict:
    import datasets

    path = settings.dataset_path
    if is_synthetic(settings):
        return _synthetic(settings)
    if not is_local(path):
        return _load_hub(path)
    folder = Path(path)
    if folder.is_dir() and is_saved_dataset(folder):
        loaded = datasets.load_from_disk(str(folder))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return _load_files(local_files(path), path, work_dir)


def load_documents(settings: DataSettings, work_dir: Path, extra_columns: dict[str, str] | None = None
                   ) -> DatasetDict:
    """The source's documents as "train" and "validation" splits holding only the text column, and the
    `extra_columns` a pipeline needs (column -> the data.config key that names it, for errors).

    The source's own "validation" split is used where it has one; otherwise `validation_fraction` of the
    documents is carved from train: at random (with `split_seed`) when `shuffle_dataset`, else from its end.
    Intermediate files go to `work_dir`, never beside the source.
    """

    raw = load_raw(settings, work_dir)
    source = settings.dataset_path
    if "train" not in raw:
        raise RafaleError(f"{KEY}: {source} has no 'train' split; splits: {', '.join(raw)}")
    column = settings.text_column
    wanted = {column: "text_column", **(extra_columns or {})}
    splits = {}
    for split in ("train", "validation"):
        if split not in raw:
            continue
        names = raw[split].column_names
        for name, key in wanted.items():
            if name not in names:
                raise RafaleError(f"data.config.{key}: column {name!r} not in {source}; columns: {', '.join(names)}")
        kind = getattr(raw[split].features[column], "dtype", "a nested value")
        if kind not in ("string", "large_string"):
            raise RafaleError(f"data.config.text_column: column {column!r} of {source} holds {kind}, not text")
        dataset = raw[split].select_columns(list(wanted))
        # Empty and whitespace-only documents (and missing values) would only add stray EOS tokens.
        kept = kept_rows(dataset, lambda rows: [bool(text and not text.isspace()) for text in rows[column]])
        splits[split] = reordered(dataset, shuffled_order(kept, settings), work_dir / f"{split}-documents.arrow")
    return with_validation(splits, settings, "document")


# Rows read, checked or copied at a time when documents are filtered and reordered.
BLOCK_ROWS = 4096


def kept_rows(dataset: Dataset, keep: Callable[[dict[str, list]], list[bool]]) -> np.ndarray:
    """The indices of the rows that `keep` (given a block of rows, by column) keeps, in order."""
    import numpy as np

    blocks = [np.flatnonzero(keep(dataset[start:start + BLOCK_ROWS])) + start
              for start in range(0, len(dataset), BLOCK_ROWS)]
    return np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)


def shuffled_order(rows: np.ndarray, settings: DataSettings) -> np.ndarray:
    """The rows in the order of `split_seed` where `shuffle_dataset` (the order `datasets`' own `shuffle(seed=...)`
    gives), else as they are."""
    import numpy as np

    if not settings.shuffle_dataset or len(rows) == 0:
        return rows
    return rows[np.random.default_rng(settings.split_seed).permutation(len(rows))]


def shuffled(dataset: Dataset, settings: DataSettings, work_dir: Path, split: str) -> Dataset:
    """The rows in the order of `split_seed` where `shuffle_dataset`, written to `work_dir`."""
    import numpy as np

    if not settings.shuffle_dataset:
        return dataset
    return reordered(dataset, shuffled_order(np.arange(len(dataset)), settings), work_dir / f"{split}-shuffled.arrow")


def reordered(dataset: Dataset, order: np.ndarray, file: Path) -> Dataset:
    """The rows of `dataset` at `order`, copied a block at a time into the Arrow file `file` and read back
    memory-mapped. `datasets`' filter, shuffle and select instead keep an indices mapping, built from a Python list
    of every index (about 120 bytes a row); here only `order` is held (8 bytes a row), and the documents are then
    read in order."""
    import datasets
    import pyarrow as pa

    schema = dataset.features.arrow_schema
    rows = dataset.with_format("arrow")
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(order), BLOCK_ROWS):
            # One record batch per block: the gather returns a piece per row.
            block = rows[order[start:start + BLOCK_ROWS].tolist()].combine_chunks()
            writer.write_table(block.replace_schema_metadata(schema.metadata))
    return datasets.Dataset.from_file(str(file))


def with_validation(splits: dict, settings: DataSettings, what: str) -> DatasetDict:
    """The splits, with `validation_fraction` of train carved off its end when the source has no validation split
    (the documents were shuffled before, where `shuffle_dataset`)."""
    import datasets

    train, source = splits["train"], settings.dataset_path
    if len(train) == 0:
        raise RafaleError(f"{KEY}: no {what}s in {source}")
    if "validation" not in splits:
        if len(train) < 2:
            raise RafaleError(f"{KEY}: {source} has 1 {what}; a validation split needs at least 2")
        # The end of the (shuffled) documents: at least one of them, and at least one left to train on.
        cut = len(train) - min(math.ceil(settings.validation_fraction * len(train)), len(train) - 1)
        # Contiguous ranges of a dataset without an indices mapping: slices of its file, nothing copied.
        splits = {**splits, "train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))}
    return datasets.DatasetDict(splits)
