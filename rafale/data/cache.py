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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from rafale.config import DataSettings, RunFile, cache_root
from rafale.data.sources import is_saved_dataset, source_fingerprint
from rafale.data.tokenizer import (
    find_tokenizer_file,
    load_tokenizer,
    special_token_ids,
    tokenizer_identity,
    tokenizer_name,
    train_tokenizer,
    trained_name,
)
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

    from rafale.tasks.base import Task

# Bump when the pipeline's output changes for the same settings, so that old folders are not reused.
PIPELINE_VERSION = 2  # 2: preference data carries the chat template its export writes
META = "meta.json"
TOKENIZER = "tokenizer.json"


@dataclass
class PreparedData:
    """A prepared dataset: blocks of token ids per split, and the tokenizer that made them."""

    path: Path
    splits: DatasetDict
    tokenizer: Tokenizer
    tokenizer_file: Path
    eos_token_id: int
    pad_token_id: int
    # Per split: documents, tokens in blocks (without padding) and blocks (and what else the task counts);
    # documents is None for a folder that rafale did not prepare.
    summary: dict[str, dict[str, Optional[int]]]
    reused: bool
    # The task that made the rows (rafale/tasks/), and what it wrote into meta.json (class names, a template).
    task: str = "causal_lm"
    meta: dict[str, Any] = field(default_factory=dict)


def cache_key(config: RunFile) -> dict[str, Any]:
    """Every setting that shapes the tokens, and what identifies the source and the tokenizer."""
    settings, task = config.data.config, config.task
    key = {
        "version": PIPELINE_VERSION,
        "pipeline": config.data.pipeline,
        "source": settings.dataset_path,
        "source_fingerprint": source_fingerprint(settings),
        "tokenizer": tokenizer_identity(settings, task.tokenizer_kind),
        "max_sequence_length": settings.max_sequence_length,
        "shuffle_dataset": settings.shuffle_dataset,
        "validation_fraction": settings.validation_fraction,
        "split_seed": settings.split_seed,
        "input_id_key": settings.input_id_key,
    }
    if hasattr(settings, "text_column"):  # in the key from the start, for the tasks that read one text column
        key["text_column"] = settings.text_column
    return {**key, **task.cache_key(settings)}


def cache_folder(config: RunFile, key: dict[str, Any]) -> Path:
    settings = config.data.config
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    tokenizer = tokenizer_name(settings, config.task.tokenizer_kind)
    return cache_root() / "data" / f"{settings.name}_{tokenizer}_len{settings.max_sequence_length}_{digest}"


def prepare_data(config: RunFile) -> PreparedData:
    """Reuse the cached blocks for this run file's data settings, or build them (once, even across processes)."""
    _quiet_datasets()
    settings, task = config.data.config, config.task
    if settings.is_prepared:
        return _load(Path(settings.dataset_path), settings, reused=True, task=task)
    key = cache_key(config)
    folder = cache_folder(config, key)
    if (folder / META).is_file():
        return _load(folder, settings, reused=True, task=task)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock"), folder):
        # Another process may have built it while this one waited.
        if (folder / META).is_file():
            return _load(folder, settings, reused=True, task=task)
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
    return _load(folder, settings, reused=False, task=task)


def _quiet_datasets() -> None:
    """datasets' progress bars and notices stay out of the console: rafale prints its own summary."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def ready_file(config: RunFile) -> Path:
    """The file whose presence says that this run file's prepared data is complete: what other processes wait for."""
    settings = config.data.config
    if settings.is_prepared:
        return Path(settings.dataset_path)
    return cache_folder(config, cache_key(config)) / META


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

    settings, task = config.data.config, config.task
    work = partial / "work"
    work.mkdir(parents=True)
    documents = task.load_documents(settings, work)
    if settings.tokenizer_path is None:
        readable = f"{settings.name}_{trained_name(settings.vocab_size, task.tokenizer_kind)}"
        tokenizer = train_tokenizer(documents["train"], task.tokenizer_text_column(settings), settings.vocab_size,
                                    readable, task.tokenizer_kind)
    else:
        tokenizer = load_tokenizer(settings.tokenizer_path)
    eos_id, _ = special_token_ids(tokenizer, settings, settings.tokenizer_path or "the trained tokenizer")
    splits, summary, extra_meta = task.prepare(documents, tokenizer, eos_id, settings, work)
    datasets.DatasetDict(splits).save_to_disk(str(partial))
    tokenizer.save(str(partial / TOKENIZER))
    shutil.rmtree(work)
    meta = {"summary": summary, "settings": key, **extra_meta, "tokenizer": {
        "name": tokenizer_name(settings, task.tokenizer_kind), "vocab_size": tokenizer.get_vocab_size(),
        "eos_token_id": eos_id}}
    # Written last: its presence is what marks the folder complete.
    (partial / META).write_text(json.dumps(meta, indent=2) + "\n")


def _load(folder: Path, settings: DataSettings, reused: bool, task: Task) -> PreparedData:
    """A prepared folder: one that rafale built, or (`is_prepared`) a DatasetDict saved with save_to_disk."""
    import datasets

    where = f"data.config.dataset_path: {folder}"
    if not folder.is_dir() or not is_saved_dataset(folder):
        raise RafaleError(f"{where}: not a dataset saved with save_to_disk (data.config.is_prepared is true)")
    splits = datasets.load_from_disk(str(folder))
    if not isinstance(splits, datasets.DatasetDict) or not {"train", "validation"} <= set(splits):
        names = ", ".join(splits) if isinstance(splits, datasets.DatasetDict) else "none (a single Dataset)"
        raise RafaleError(f"{where}: needs 'train' and 'validation' splits; splits: {names}")
    needed = {settings.input_id_key: "input_id_key", **task.required_columns}
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
    extra_meta = {name: value for name, value in meta.items() if name not in ("summary", "settings", "tokenizer")}
    prepared = PreparedData(path=folder, splits=splits, tokenizer=tokenizer, tokenizer_file=tokenizer_file,
                            eos_token_id=eos_id, pad_token_id=pad_id, summary=summary, reused=reused,
                            task=task.name, meta=extra_meta)
    task.finish_loading(prepared)
    return prepared


def _count(split: Dataset, column: str) -> dict[str, Optional[int]]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(split.data.column(column))
    return {"documents": None, "tokens": int(pc.sum(lengths).as_py() or 0), "blocks": len(split)}


def format_summary(prepared: PreparedData) -> str:
    """A few lines for DATA=1: per split documents, tokens and blocks (and what else the task counts); where the
    data is; built or reused."""
    from rafale.tasks import new_task

    lines = [f"data: {prepared.path} ({'reused' if prepared.reused else 'built'})"]
    for split, counts in prepared.summary.items():
        documents = "?" if counts["documents"] is None else f"{counts['documents']:,}"
        more = "".join(f", {value:,} {name}" for name, value in counts.items()
                       if name not in ("documents", "tokens", "blocks"))
        lines.append(f"  {split:<10} {documents:>12} documents {counts['tokens']:>14,} tokens "
                     f"{counts['blocks']:>10,} blocks{more}")
    lines.append(f"  tokenizer  {prepared.tokenizer_file} (vocabulary {prepared.tokenizer.get_vocab_size():,}, "
                 f"eos {prepared.eos_token_id}, pad {prepared.pad_token_id})")
    lines.extend(new_task(prepared.task).summary_lines(prepared))
    return "\n".join(lines)
