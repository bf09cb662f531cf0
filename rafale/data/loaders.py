"""The dataloaders that feed Composer: the prepared rows, batched by the task's collator, sharded across ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rafale.config import DataSettings

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from rafale.data.cache import PreparedData
    from rafale.tasks.base import Task


def build_dataloaders(task: Task, prepared: PreparedData, settings: DataSettings,
                      seed: int) -> tuple[DataLoader, DataLoader]:
    """(train, eval) loaders over the prepared blocks, sharded across ranks by Composer's distributed sampler.

    The run file's batch sizes are global: each of the world's processes loads an equal share of every batch.
    """
    import datasets
    import torch
    from composer.utils import dist
    from torch.utils.data import DataLoader

    # load_run_file checked that the global batch sizes divide among the processes.
    world = dist.get_world_size()
    collator = task.collator(prepared, settings, seed)

    def loader(split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        # The torch format reads a whole batch of rows in one query (Dataset.__getitems__).
        # Text columns (an SFT split's held-out prompts) stay out of the batches.
        rows = prepared.splits[split]
        numeric = [name for name, feature in rows.features.items()
                   if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"))]
        dataset = rows.with_format("torch", columns=numeric)
        # drop_last in the sampler trims the training set so that every rank gets as many unique blocks;
        # evaluation keeps every block (a rank may see one twice).
        repeats = task.batch_repeats(settings) if split == "train" else 1
        if repeats > 1:
            from rafale.data.repeat import RepeatedBatches

            sampler = RepeatedBatches(dataset, batch_size, repeats, shuffle=shuffle, drop_last=drop_last, seed=seed,
                                      num_replicas=world, rank=dist.get_global_rank())
        else:
            sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                          pin_memory=torch.cuda.is_available())

    return (loader("train", settings.train_batch_size // world, settings.shuffle_train, drop_last=True),
            loader("validation", settings.eval_batch_size // world, shuffle=False, drop_last=False))
