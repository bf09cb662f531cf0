"""The classification pipeline: (text, optional second text, label) -> token ids cut to length, and a class id.

Labels may be names or integers, and become class ids by a mapping that depends only on the data, so a
rebuilt dataset and the exported model agree on it:

- a `datasets.ClassLabel` column (IMDB, GLUE): its ids, and its names;
- integers: the integers themselves (class i is named "i"), as many classes as the largest one plus one;
- names (strings): the sorted names of all splits, numbered from 0.

The names by class id go into meta.json and, at export, into the model's config.json (`id2label`).
Each row is [CLS] text [SEP] (or [CLS] text [SEP] pair [SEP] with segment ids) cut to `max_sequence_length`,
the longer text first; padding belongs to the collator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rafale.config import DataSettings
from rafale.data.tokenizer import truncating_copy
from rafale.errors import RafaleError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

KEY = "data.config.label_column"
# The class id of each row in the prepared dataset, and the segment ids of sentence pairs.
LABELS = "labels"
TOKEN_TYPES = "token_type_ids"


def extra_columns(settings: DataSettings) -> dict[str, str]:
    """The source columns this pipeline reads besides the text, and the key that names each (for errors)."""
    columns = {settings.label_column: "label_column"}
    if settings.text_pair_column:
        columns[settings.text_pair_column] = "text_pair_column"
    return columns


def label_names(documents: DatasetDict, column: str) -> list[str]:
    """The class names by id, from the label column of every split (see the module's docstring)."""
    import datasets
    import pyarrow.compute as pc

    feature = documents["train"].features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = [pc.unique(documents[split].data.column(column)) for split in documents]
    if any(value.null_count for value in values):
        raise RafaleError(f"{KEY}: column {column!r} has rows without a label")
    kind = getattr(feature, "dtype", "a nested value")
    if kind.startswith(("int", "uint")):
        largest = max(pc.max(value).as_py() for value in values)
        smallest = min(pc.min(value).as_py() for value in values)
        if smallest < 0:
            raise RafaleError(f"{KEY}: label {smallest} is not a class (integer labels start at 0)")
        return [str(i) for i in range(largest + 1)]
    if kind in ("string", "large_string"):
        return sorted({name for value in values for name in value.to_pylist()})
    raise RafaleError(f"{KEY}: column {column!r} holds {kind}; labels are names or integers")


def prepare(documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: DataSettings,
            work: Path) -> tuple[dict[str, Dataset], dict[str, dict[str, int]], dict[str, Any]]:
    """(rows per split, their summary, {"labels": class names by id} for meta.json). The post-processor puts
    the special tokens in, so `eos_id` is not needed."""
    import datasets
    import pyarrow.compute as pc

    names = label_names(documents, settings.label_column)
    if len(names) < 2:
        raise RafaleError(f"{KEY}: the data has a single class ({names[0]!r}); classification needs two or more")
    class_ids = {name: i for i, name in enumerate(names)}
    truncating = truncating_copy(tokenizer, settings.max_sequence_length)
    label_column, pair_column = settings.label_column, settings.text_pair_column
    is_class_label = isinstance(documents["train"].features[label_column], datasets.ClassLabel)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = batch[settings.text_column]
        inputs = list(zip(texts, batch[pair_column])) if pair_column else texts
        encodings = truncating.encode_batch_fast(inputs, add_special_tokens=True)
        labels = batch[label_column]
        rows = {settings.input_id_key: [encoding.ids for encoding in encodings],
                LABELS: labels if is_class_label else [class_ids[str(label)] for label in labels]}
        if pair_column:
            rows[TOKEN_TYPES] = [encoding.type_ids for encoding in encodings]
        return rows

    features = {settings.input_id_key: datasets.Sequence(datasets.Value("int32")), LABELS: datasets.Value("int64")}
    if pair_column:
        features[TOKEN_TYPES] = datasets.Sequence(datasets.Value("int8"))
    splits, summary = {}, {}
    for split, docs in documents.items():
        rows = docs.map(encode, batched=True, remove_columns=docs.column_names,
                        num_proc=settings.num_processes if settings.num_processes > 1 else None,
                        features=datasets.Features(features), cache_file_name=str(work / f"{split}.arrow"),
                        desc="Tokenizing")
        tokens = int(pc.sum(pc.list_value_length(rows.data.column(settings.input_id_key))).as_py() or 0)
        splits[split] = rows
        summary[split] = {"documents": len(docs), "tokens": tokens, "blocks": len(rows)}
    return splits, summary, {"labels": names}
