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


class MLMCollator:
    """Rows framed by special tokens -> padded `input_ids` with some tokens masked, `attention_mask`, `labels`.

    Each real token that is not special is chosen with `probability` (at least one per batch, so the loss is
    never empty); a chosen token becomes the mask token 80% of the time, a random ordinary token 10%, and stays
    as it is 10%, as in BERT. `labels` holds the original ids of the chosen tokens and -100 elsewhere. The
    random draws are seeded by `seed` and the batch's own ids: the same batch is masked the same way on every
    machine, rank, evaluation and resumed run, while a reshuffled epoch (other batches) is masked afresh.
    """

    def __init__(self, pad_token_id: int, max_length: int, mask_token_id: int, special_ids: Sequence[int],
                 vocab_size: int, probability: float = 0.15, seed: int = 0, pad_to_max: bool = True,
                 input_id_key: str = "input_ids"):
        import torch

        self.pad = CausalLMCollator(pad_token_id, max_length, pad_to_max, input_id_key)
        self.mask_token_id = mask_token_id
        self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)
        self.ordinary_ids = torch.tensor(sorted(set(range(vocab_size)) - set(special_ids)), dtype=torch.long)
        self.probability = probability
        self.seed = seed

    def _generator(self, input_ids: torch.Tensor) -> torch.Generator:
        import hashlib

        import torch

        digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=str(self.seed).encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch = self.pad(rows)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        generator = self._generator(input_ids)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        chosen = (torch.rand(input_ids.shape, generator=generator) < self.probability) & maskable
        if not chosen.any() and maskable.any():
            chosen.view(-1)[maskable.view(-1).nonzero()[0]] = True
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=generator)
        random_ids = self.ordinary_ids[torch.randint(len(self.ordinary_ids), input_ids.shape, generator=generator)]
        masked = input_ids.masked_fill(chosen & (action < 0.8), self.mask_token_id)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


class ClassificationCollator:
    """Rows of token ids and a class id -> padded `input_ids`, `attention_mask`, `labels` [batch] (and padded
    `token_type_ids` for sentence pairs)."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool = True, input_id_key: str = "input_ids"):
        self.pad = CausalLMCollator(pad_token_id, max_length, pad_to_max, input_id_key)

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


def make_collator(prepared: PreparedData, settings: DataSettings, seed: int):
    """The collator of the pipeline that prepared the data."""
    from rafale.data.tokenizer import mask_token_id, special_ids

    padding = dict(pad_to_max=settings.pad_inputs, input_id_key=settings.input_id_key)
    if prepared.pipeline == "mlm":
        tokenizer = prepared.tokenizer
        return MLMCollator(prepared.pad_token_id, settings.max_sequence_length,
                           mask_token_id(tokenizer, str(prepared.tokenizer_file)), special_ids(tokenizer),
                           tokenizer.get_vocab_size(), settings.mlm_probability, seed, **padding)
    if prepared.pipeline == "classification":
        return ClassificationCollator(prepared.pad_token_id, settings.max_sequence_length, **padding)
    return CausalLMCollator(prepared.pad_token_id, settings.max_sequence_length, **padding)


def build_dataloaders(prepared: PreparedData, settings: DataSettings, seed: int) -> tuple[DataLoader, DataLoader]:
    """(train, eval) loaders over the prepared blocks, sharded across ranks by Composer's distributed sampler.

    The run file's batch sizes are global: each of the world's processes loads an equal share of every batch.
    """
    import torch
    from composer.utils import dist
    from torch.utils.data import DataLoader

    # load_run_file checked that the global batch sizes divide among the processes.
    world = dist.get_world_size()
    collator = make_collator(prepared, settings, seed)

    def loader(split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        # The torch format reads a whole batch of rows in one query (Dataset.__getitems__).
        dataset = prepared.splits[split].with_format("torch")
        # drop_last in the sampler trims the training set so that every rank gets as many unique blocks;
        # evaluation keeps every block (a rank may see one twice).
        sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                          pin_memory=torch.cuda.is_available())

    return (loader("train", settings.train_batch_size // world, settings.shuffle_train, drop_last=True),
            loader("validation", settings.eval_batch_size // world, shuffle=False, drop_last=False))
