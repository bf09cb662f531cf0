"""Padding, shared by every task's collator: rows of token ids -> `input_ids`, `attention_mask`, `labels`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from rafale.data.packing import DOCUMENT_IDS
from rafale.models.loss import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def pad_rows(rows: Sequence[dict[str, Any]], pad_token_id: int, max_length: int, pad_to_max: bool = True,
             input_id_key: str = "input_ids", label_key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Right-pad the rows with `pad_token_id` to `max_length` (`pad_to_max`) or to the batch's longest row, cutting
    longer rows to `max_length`. `attention_mask` is 1 on real tokens; `labels` is the rows' `label_key` column
    (the input ids themselves when None), IGNORE_INDEX on padding, so padding never counts in the loss. Packed rows'
    `document_ids` (data/packing.py) come along, 0 on padding."""
    import torch

    ids = [torch.as_tensor(row[input_id_key], dtype=torch.long)[:max_length] for row in rows]
    width = max_length if pad_to_max else max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    if label_key is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    else:
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            row_labels = torch.as_tensor(row[label_key], dtype=torch.long)[:max_length]
            labels[i, : len(row_labels)] = row_labels
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if DOCUMENT_IDS in rows[0]:
        documents = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(rows):
            row_documents = torch.as_tensor(row[DOCUMENT_IDS], dtype=torch.long)[:max_length]
            documents[i, : len(row_documents)] = row_documents
        batch[DOCUMENT_IDS] = documents
    return batch


class PaddingCollator:
    """`pad_rows` as a DataLoader's collate_fn."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool = True, input_id_key: str = "input_ids",
                 label_key: Optional[str] = None):
        self.pad_token_id, self.max_length, self.pad_to_max = pad_token_id, max_length, pad_to_max
        self.input_id_key, self.label_key = input_id_key, label_key

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_rows(rows, self.pad_token_id, self.max_length, self.pad_to_max, self.input_id_key, self.label_key)
