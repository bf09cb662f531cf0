"""The prepared-data cache: one folder per combination of settings and source, built once, reused after.

A folder `<cache>/data/{name}_{tokenizer}_len{L}_{hash8}` holds the blocks (`DatasetDict.save_to_disk`, loaded
memory-mapped), the tokenizer.json that made them, and `meta.json`. The hash covers every setting that changes
the tokens and the source's fingerprint (paths, sizes and mtimes of its files), not batch sizes, process counts
or shuffling of the training blocks. A folder is built under a temporary name, `meta.json` is written last, and
only then is it renamed into place, so a build killed midway is never reused; the next build removes its
remains. Processes that want the same folder at once take turns through a lock file beside it: one builds,
the others wait and reuse its work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from rafale.config import DataSettings, RunFile, cache_root
from rafale.data import classification
from rafale.data.sources import is_saved_dataset, load_documents, source_fingerprint
from rafale.data.tokenizer import (
    find_tokenizer_file,
    load_tokenizer,
    special_token_ids,
    tokenizer_identity,
    tokenizer_name,
    train_tokenizer,
    trained_kind,
    trained_name,
)
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

# Bump when the pipeline's output changes for the same settings, so that old folders are not reused.
PIPELINE_VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.json"
# Settings that shape one pipeline's rows only: in the key of that pipeline alone, so that the others' folders
# keep their names.
PIPELINE_SETTINGS = {"mlm": ("mlm_truncate",), "classification": ("label_column", "text_pair_column")}


@dataclass
class PreparedData:
    """A prepared dataset: blocks of token ids per split, and the tokenizer that made them."""

    path: Path
    splits: DatasetDict
    tokenizer: Tokenizer
    tokenizer_file: Path
    eos_token_id: int
    pad_token_id: int
    # Per split: documents, tokens in blocks (without padding) and blocks; documents is None for a folder that
    # rafale did not prepare.
    summary: dict[str, dict[str, Optional[int]]]
    reused: bool
    # The pipeline that made the rows (config.py's PIPELINES), and for classification the class names by id.
    pipeline: str = "causal_lm"
    labels: Optional[list[str]] = None


def cache_key(config: RunFile) -> dict[str, Any]:
    """Every setting that shapes the tokens, and what identifies the source and the tokenizer."""
    settings = config.data.config
    return {
        "version": PIPELINE_VERSION,
        "pipeline": config.data.pipeline,
        "source": settings.dataset_path,
        "source_fingerprint": source_fingerprint(settings),
        "text_column": settings.text_column,
        "tokenizer": tokenizer_identity(settings, config.data.pipeline),
        "max_sequence_length": settings.max_sequence_length,
        "tail": settings.tail,
        "shuffle_dataset": settings.shuffle_dataset,
        "validation_fraction": settings.validation_fraction,
        "split_seed": settings.split_seed,
        "input_id_key": settings.input_id_key,
        **{name: getattr(settings, name) for name in PIPELINE_SETTINGS.get(config.data.pipeline, ())},
    }


def cache_folder(settings: DataSettings, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{settings.name}_{tokenizer_name(settings, key['pipeline'])}_len{settings.max_sequence_length}_{digest}"
    return cache_root() / "data" / name


def prepare_data(config: RunFile) -> PreparedData:
    """Reuse the cached blocks for this run file's data settings, or build them (once, even across processes)."""
    settings = config.data.config
    if settings.is_prepared:
        return _load(Path(settings.dataset_path), settings, reused=True, pipeline=config.data.pipeline)
    key = cache_key(config)
    folder = cache_folder(settings, key)
    if (folder / META).is_file():
        return _load(folder, settings, reused=True, pipeline=config.data.pipeline)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock"), folder):
        # Another process may have built it while this one waited.
        if (folder / META).is_file():
            return _load(folder, settings, reused=True, pipeline=config.data.pipeline)
        # Holding the lock, any partial folder is left over from a build that died.
        for stale in [folder, *folder.parent.glob(f".{folder.name}.partial-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        try:
            _build(config, key, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.rename(partial, folder)
    return _load(folder, settings, reused=False, pipeline=config.data.pipeline)


def ready_file(config: RunFile) -> Path:
    """The file whose presence says that this run file's prepared data is complete: what other processes wait for."""
    settings = config.data.config
    if settings.is_prepared:
        return Path(settings.dataset_path)
    return cache_folder(settings, cache_key(config)) / META


@contextmanager
def _exclusive(lock_file: Path, folder: Path) -> Iterator[None]:
    with open(lock_file, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rafale: waiting for another process to finish building {folder}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing, or with the process


def _build(config: RunFile, key: dict[str, Any], partial: Path) -> None:
    import datasets

    from rafale.data import causal, classification, mlm

    settings = config.data.config
    pipeline = config.data.pipeline
    work = partial / "work"
    work.mkdir(parents=True)
    extra_columns = classification.extra_columns(settings) if pipeline == "classification" else None
    documents = load_documents(settings, work, extra_columns)
    if settings.tokenizer_path is None:
        readable = f"{settings.name}_{trained_name(settings.vocab_size, pipeline)}"
        tokenizer = train_tokenizer(documents["train"], settings.text_column, settings.vocab_size, readable,
                                    trained_kind(pipeline))
    else:
        tokenizer = load_tokenizer(settings.tokenizer_path)
    eos_id, _ = special_token_ids(tokenizer, settings, settings.tokenizer_path or "the trained tokenizer")
    module = {"causal_lm": causal, "mlm": mlm, "classification": classification}[pipeline]
    splits, summary, extra_meta = module.prepare(documents, tokenizer, eos_id, settings, work)
    datasets.DatasetDict(splits).save_to_disk(str(partial))
    tokenizer.save(str(partial / TOKENIZER))
    shutil.rmtree(work)
    meta = {"summary": summary, "settings": key, **extra_meta, "tokenizer": {
        "name": tokenizer_name(settings, pipeline), "vocab_size": tokenizer.get_vocab_size(), "eos_token_id": eos_id}}
    # Written last: its presence is what marks the folder complete.
    (partial / META).write_text(json.dumps(meta, indent=2) + "\n")


def _load(folder: Path, settings: DataSettings, reused: bool, pipeline: str) -> PreparedData:
    """A prepared folder: one that rafale built, or (`is_prepared`) a DatasetDict saved with save_to_disk."""
    import datasets

    where = f"data.config.dataset_path: {folder}"
    if not folder.is_dir() or not is_saved_dataset(folder):
        raise RafaleError(f"{where}: not a dataset saved with save_to_disk (data.config.is_prepared is true)")
    splits = datasets.load_from_disk(str(folder))
    if not isinstance(splits, datasets.DatasetDict) or not {"train", "validation"} <= set(splits):
        names = ", ".join(splits) if isinstance(splits, datasets.DatasetDict) else "none (a single Dataset)"
        raise RafaleError(f"{where}: needs 'train' and 'validation' splits; splits: {names}")
    needed = {settings.input_id_key: "input_id_key"}
    if pipeline == "classification":
        needed[classification.LABELS] = "label_column"
    for split in ("train", "validation"):
        for column, key in needed.items():
            if column not in splits[split].column_names:
                raise RafaleError(f"data.config.{key}: column {column!r} not in {folder} ({split}); "
                                  f"columns: {', '.join(splits[split].column_names)}")
    tokenizer_file = folder / TOKENIZER
    if not tokenizer_file.is_file():
        # A folder prepared elsewhere: its tokenizer must be a local file, which training and export ship.
        tokenizer_file = find_tokenizer_file(settings.tokenizer_path) if settings.tokenizer_path else None
        if tokenizer_file is None:
            raise RafaleError(f"{where}: has no {TOKENIZER}; set data.config.tokenizer_path to a local one")
    tokenizer = load_tokenizer(str(tokenizer_file))
    eos_id, pad_id = special_token_ids(tokenizer, settings, str(tokenizer_file))
    meta_file = folder / META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta:
        summary = meta["summary"]
    else:
        summary = {split: _count(splits[split], settings.input_id_key) for split in ("train", "validation")}
    labels = None
    if pipeline == "classification":
        # A folder prepared elsewhere has integer class ids and no names: class i is named "i".
        labels = meta.get("labels") or [str(i) for i in range(max(max(splits[s][classification.LABELS])
                                                                   for s in ("train", "validation")) + 1)]
    return PreparedData(path=folder, splits=splits, tokenizer=tokenizer, tokenizer_file=tokenizer_file,
                        eos_token_id=eos_id, pad_token_id=pad_id, summary=summary, reused=reused,
                        pipeline=pipeline, labels=labels)


def _count(split: Dataset, column: str) -> dict[str, Optional[int]]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(split.data.column(column))
    return {"documents": None, "tokens": int(pc.sum(lengths).as_py() or 0), "blocks": len(split)}


def format_summary(prepared: PreparedData) -> str:
    """A few lines for DATA=1: per split documents, tokens and blocks; where the data is; built or reused."""
    lines = [f"data: {prepared.path} ({'reused' if prepared.reused else 'built'})"]
    for split, counts in prepared.summary.items():
        documents = "?" if counts["documents"] is None else f"{counts['documents']:,}"
        lines.append(f"  {split:<10} {documents:>12} documents {counts['tokens']:>14,} tokens "
                     f"{counts['blocks']:>10,} blocks")
    lines.append(f"  tokenizer  {prepared.tokenizer_file} (vocabulary {prepared.tokenizer.get_vocab_size():,}, "
                 f"eos {prepared.eos_token_id}, pad {prepared.pad_token_id})")
    if prepared.labels is not None:
        lines.append(f"  labels     {', '.join(f'{i}: {name}' for i, name in enumerate(prepared.labels))}")
    return "\n".join(lines)
