"""Sequence classification: an encoder's head scores each row's classes.

Rows: (text, optional second text, label) -> token ids cut to length, and a class id.

Labels may be names or integers, and become class ids by a mapping that depends only on the data, so a
rebuilt dataset and the exported model agree on it:

- a `datasets.ClassLabel` column (IMDB, GLUE): its ids, and its names;
- integers: the integers themselves (class i is named "i"), as many classes as the largest one plus one;
- names (strings): the sorted names of all splits, numbered from 0.

The names by class id go into meta.json and, at export, into the model's config.json (`id2label`).
Each row is [CLS] text [SEP] (or [CLS] text [SEP] pair [SEP] with segment ids) cut to `max_sequence_length`,
the longer text first; padding belongs to the collator. Loss: cross-entropy on the [batch, classes] logits. Eval:
accuracy and the F1 score averaged over classes (macro), which an unbalanced set cannot flatter; they are printed
at the end of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from rafale.config import RunFile, TextSettings
from rafale.data.tokenizer import truncating_copy
from rafale.errors import RafaleError
from rafale.tasks.base import EncoderTask, Prepared, Say

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData

KEY = "data.config.label_column"
# The class id of each row in the prepared dataset, and the segment ids of sentence pairs.
LABELS = "labels"
TOKEN_TYPES = "token_type_ids"


class ClassificationSettings(TextSettings):
    """`data.config` of the classification task."""

    # The column of labels (names or integers), and an optional second text (sentence pairs).
    label_column: str = "label"
    text_pair_column: Optional[str] = None


class Classification(EncoderTask):
    Settings = ClassificationSettings
    encoder_mode = "cls"
    cache_settings = ("label_column", "text_pair_column")
    required_columns = {LABELS: "label_column"}
    metric_names = {"MulticlassAccuracy": "accuracy", "MulticlassF1Score": "F1"}

    def source_columns(self, settings: ClassificationSettings) -> dict[str, str]:
        columns = {**super().source_columns(settings), settings.label_column: "label_column"}
        if settings.text_pair_column:
            columns[settings.text_pair_column] = "text_pair_column"
        return columns

    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: ClassificationSettings,
                work: Path) -> Prepared:
        return prepare(documents, tokenizer, eos_id, settings, work)

    def finish_loading(self, prepared: PreparedData) -> None:
        # A folder prepared elsewhere has integer class ids and no names: class i is named "i".
        if "labels" not in prepared.meta:
            splits = prepared.splits
            largest = max(max(splits[split][LABELS]) for split in ("train", "validation"))
            prepared.meta["labels"] = [str(i) for i in range(largest + 1)]

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        return [f"  labels     {', '.join(f'{i}: {name}' for i, name in enumerate(prepared.meta['labels']))}"]

    def collator(self, prepared: PreparedData, settings: ClassificationSettings, seed: int):
        return ClassificationCollator(prepared.pad_token_id, settings.max_sequence_length, settings.pad_inputs,
                                      settings.input_id_key)

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        """The classification head, with the data's class names."""
        names, classes = list(prepared.meta["labels"]), config.model.n_classes
        # Class i named "i" (integer labels): classes the data lacks are named the same way. Named classes must
        # match.
        if names == [str(i) for i in range(len(names))] and len(names) < classes:
            names += [str(i) for i in range(len(names), classes)]
        if len(names) != classes:
            raise RafaleError(f"{config.source}: model.n_classes: {classes}, but the data has {len(names)} classes "
                              f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        return {**super().model_overrides(config, prepared), "head": "classification", "num_labels": classes,
                "id2label": dict(enumerate(names))}

    def metrics(self, model: torch.nn.Module) -> dict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        classes = model.config.num_labels
        return {"MulticlassAccuracy": MulticlassAccuracy(classes, average="micro"),
                "MulticlassF1Score": MulticlassF1Score(classes, average="macro")}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(model(**self.model_inputs(model, batch)).float(), batch["labels"])

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch))

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.float(), batch["labels"])

    def loss_tokens(self, batch: dict) -> int:
        # One label per row.
        return len(batch["labels"])

    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """The final validation scores."""
        if eval_metrics:  # none when a finished run is started again
            say(f"validation: accuracy {eval_metrics['MulticlassAccuracy']:.4f}  "
                f"F1 {eval_metrics['MulticlassF1Score']:.4f}")


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


def prepare(documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: ClassificationSettings,
            work: Path) -> Prepared:
    """(rows per split, their summary, {"labels": class names by id} for meta.json). The post-processor puts
    the special tokens in, so `eos_id` is not needed."""
    import datasets
    import pyarrow.compute as pc

    from rafale.data.chunking import mapped

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
        rows = mapped(docs, encode, settings, datasets.Features(features), work / f"{split}.arrow",
                      f"tokenizing {split}")
        tokens = int(pc.sum(pc.list_value_length(rows.data.column(settings.input_id_key))).as_py() or 0)
        splits[split] = rows
        summary[split] = {"documents": len(docs), "tokens": tokens, "blocks": len(rows)}
    return splits, summary, {"labels": names}


class ClassificationCollator:
    """Rows of token ids and a class id -> padded `input_ids`, `attention_mask`, `labels` [batch] (and padded
    `token_type_ids` for sentence pairs)."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool = True, input_id_key: str = "input_ids"):
        from rafale.data.collate import PaddingCollator

        self.pad = PaddingCollator(pad_token_id, max_length, pad_to_max, input_id_key)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch = self.pad(rows)
        batch["labels"] = torch.as_tensor([int(row["labels"]) for row in rows], dtype=torch.long)
        if "token_type_ids" in rows[0]:
            token_types = torch.zeros_like(batch["input_ids"])
            for i, row in enumerate(rows):
                types = torch.as_tensor(row["token_type_ids"], dtype=torch.long)[: token_types.shape[1]]
                token_types[i, : len(types)] = types
            batch["token_type_ids"] = token_types
        return batch
