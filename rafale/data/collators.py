"""Batches for training: the collator that pads blocks, and the dataloaders that feed Composer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from rafale.config import DataSettings

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from rafale.data.cache import PreparedData

# Labels with this value are ignored by torch's cross-entropy, so padding never counts in the loss.
IGNORE_INDEX = -100


class CausalLMCollator:
    """Rows of token ids -> `input_ids`, `attention_mask` (1 real, 0 pad) and `labels` (-100 at padding).

    Labels are the input ids themselves: the model shifts them by one, as in transformers. Rows are padded on
    the right with `pad_token_id` to `max_length` (`pad_to_max`) or to the batch's longest row; a row longer
    than `max_length` is cut to it.
    """

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool = True,
                 input_id_key: str = "input_ids"):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_max = pad_to_max
        self.input_id_key = input_id_key

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        ids = [torch.as_tensor(row[self.input_id_key], dtype=torch.long)[: self.max_length] for row in rows]
        width = self.max_length if self.pad_to_max else max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_dataloaders(prepared: PreparedData, settings: DataSettings, seed: int) -> tuple[DataLoader, DataLoader]:
    """(train, eval) loaders over the prepared blocks, sharded across ranks by Composer's distributed sampler."""
    import torch
    from composer.utils import dist
    from torch.utils.data import DataLoader

    collator = CausalLMCollator(prepared.pad_token_id, settings.max_sequence_length, settings.pad_inputs,
                                settings.input_id_key)

    def loader(split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        # The torch format reads a whole batch of rows in one query (Dataset.__getitems__).
        dataset = prepared.splits[split].with_format("torch")
        # drop_last in the sampler trims the training set so that every rank gets as many unique blocks;
        # evaluation keeps every block (a rank may see one twice).
        sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                          pin_memory=torch.cuda.is_available())

    return (loader("train", settings.train_batch_size, settings.shuffle_train, drop_last=True),
            loader("validation", settings.eval_batch_size, shuffle=False, drop_last=False))
