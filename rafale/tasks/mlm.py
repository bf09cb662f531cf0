"""Masked language modelling: an encoder predicts the tokens hidden in its input.

Rows: documents -> token ids framed by the tokenizer's special tokens ([CLS] ... [SEP]).

Two ways to make rows (`data.config.mlm_truncate`):

- "chunk" (default): every document is followed by the separator ([SEP], </s>), the split's documents are
  concatenated and cut into blocks of `max_sequence_length` minus the frame, as the causal pipeline does, and
  each block is framed: [CLS] block [SEP]. No token is thrown away but the tail (`tail`).
- "truncate": one row per document, [CLS] document [SEP], cut to `max_sequence_length`; the collator pads.

Masking is not done in the rows but in the collator, batch by batch, so that every epoch masks differently.
Loss: cross-entropy at the masked positions, with the MLM head run on those positions only. Eval: the masked
tokens' cross-entropy and accuracy. At the end, the model's guesses for a mask token in `run.sample_prompts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Sequence

from pydantic import Field

from rafale.config import RunFile, TextSettings
from rafale.data.tokenizer import mask_token_id, special_ids, truncating_copy, wrapping_ids
from rafale.errors import RafaleError
from rafale.tasks.base import EncoderTask, Prepared, Say

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData


class MLMSettings(TextSettings):
    """`data.config` of the masked LM task."""

    # The last partial block of each split ("chunk" mode): dropped, or kept and padded.
    tail: Literal["drop", "pad"] = "drop"
    # The fraction of tokens to predict (of those, 80% become the mask token, 10% a random token, 10% stay).
    mlm_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15
    # "chunk" concatenates the documents and cuts blocks of max_sequence_length; "truncate" keeps one row per
    # document, cut to max_sequence_length.
    mlm_truncate: Literal["chunk", "truncate"] = "chunk"


class MaskedLM(EncoderTask):
    Settings = MLMSettings
    encoder_mode = "mlm"
    cache_settings = ("tail", "mlm_truncate")
    metric_names = {"LanguageCrossEntropy": "cross-entropy", "MaskedAccuracy": "masked accuracy"}

    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: MLMSettings,
                work: Path) -> Prepared:
        """`eos_id` ([SEP], </s>) ends each document in "chunk" mode."""
        return prepare(documents, tokenizer, eos_id, settings, work)

    def collator(self, prepared: PreparedData, settings: MLMSettings, seed: int):
        tokenizer = prepared.tokenizer
        return MLMCollator(prepared.pad_token_id, settings.max_sequence_length,
                           mask_token_id(tokenizer, str(prepared.tokenizer_file)), special_ids(tokenizer),
                           tokenizer.get_vocab_size(), settings.mlm_probability, seed, settings.pad_inputs,
                           settings.input_id_key)

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        return {**super().model_overrides(config, prepared), "head": "mlm"}

    def metrics(self, model: torch.nn.Module) -> dict:
        from composer.metrics.nlp import LanguageCrossEntropy, MaskedAccuracy

        from rafale.models.loss import IGNORE_INDEX

        return {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                "MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX)}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        # Unshifted: each masked position predicts its own token; the head runs on those positions only.
        return model(**self.model_inputs(model, batch), labels=batch["labels"])

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch))

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), batch["labels"].flatten())

    def loss_tokens(self, batch: dict) -> int:
        from rafale.models.loss import IGNORE_INDEX

        return int((batch["labels"] != IGNORE_INDEX).sum())

    def flops_per_batch(self, model: torch.nn.Module, batch: dict) -> float:
        """As for any model, less the MLM head's FLOPs at the positions it does not run on."""
        unmasked = int(batch["input_ids"].numel()) - self.loss_tokens(batch)
        return super().flops_per_batch(model, batch) - model.mlm_head_flops_per_token() * unmasked

    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """The model's best guesses for a mask token in (or at the end of) each of run.sample_prompts."""
        from rafale.models.generate import fill_mask

        if not config.run.sample_prompts or config.run.sample_max_new_tokens == 0:
            return
        model.eval()
        mask_id = mask_token_id(prepared.tokenizer, str(prepared.tokenizer_file))
        say("fill-mask:")
        for result in fill_mask(model, prepared.tokenizer, config.run.sample_prompts, mask_id):
            guesses = ", ".join(f"{token!r} {probability:.2f}" for token, probability in result["guesses"])
            say(f"  {result['prompt']} -> {guesses}")


def prepare(documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: MLMSettings,
            work: Path) -> Prepared:
    """(rows per split, their summary, what meta.json should add: nothing here)."""
    from rafale.data.chunking import chunk

    mask_token_id(tokenizer, settings.tokenizer_path or "the trained tokenizer")
    prefix, suffix = wrapping_ids(tokenizer)
    length = settings.max_sequence_length
    if length <= len(prefix) + len(suffix):
        raise RafaleError(f"data.config.max_sequence_length: {length} leaves no room inside the "
                          f"{len(prefix) + len(suffix)} special tokens around each row")
    splits, summary = {}, {}
    for split, docs in documents.items():
        if settings.mlm_truncate == "chunk":
            inner = settings.model_copy(update={"max_sequence_length": length - len(prefix) - len(suffix)})
            rows, _ = chunk(docs, settings.text_column, tokenizer, eos_id, inner, split,
                            work / f"{split}-blocks.arrow", frame=(prefix, suffix))
        else:
            rows = _truncated(docs, settings, truncating_copy(tokenizer, length), split, work / f"{split}-rows.arrow")
        splits[split] = rows
        summary[split] = {"documents": len(docs), "tokens": _count_tokens(rows, settings.input_id_key),
                          "blocks": len(rows)}
    return splits, summary, {}


def _features(column: str):
    import datasets

    return datasets.Features({column: datasets.Sequence(datasets.Value("int32"))})


def _truncated(docs: Dataset, settings: MLMSettings, tokenizer: Tokenizer, split: str, cache_file: Path) -> Dataset:
    from rafale.data.chunking import mapped

    column = settings.input_id_key

    def encode(texts: list[str]) -> dict[str, list[list[int]]]:
        return {column: [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]}

    return mapped(docs, encode, settings, _features(column), cache_file, f"tokenizing {split}",
                  [settings.text_column])


def _count_tokens(rows: Dataset, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(rows.data.column(column))).as_py() or 0)


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

        from rafale.data.collate import PaddingCollator

        self.pad = PaddingCollator(pad_token_id, max_length, pad_to_max, input_id_key)
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

        from rafale.models.loss import IGNORE_INDEX

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
