"""Causal language modelling (pretraining): every token predicts the next one.

Rows (`packing`): each document's token ids with an EOS after it, and then
- "chunk" (default): the split's documents concatenated and cut into blocks of `max_sequence_length`
  (data/chunking.py); the last partial block is dropped (`tail: drop`) or kept as a shorter row that the collator
  pads (`tail: pad`). A document attends to the one before it in its block.
- "documents": whole documents packed into rows (data/packing.py), each tagged with its document id, so that
  attention and positions stay inside it and no label predicts the next document's first token.
- "none": one document per row, padded.
In the last two, a document longer than a row is cut to one (`overflow: truncate`) or left out (`drop`), and
counted. Loss: the mean next-token cross-entropy over the tokens that carry a label, with the LM head fused into
it (models/loss.py). Eval: cross-entropy and perplexity. At the end, samples continue `run.sample_prompts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

from pydantic import PositiveInt

from rafale.config import RunFile, TextSettings
from rafale.tasks.base import HeldOutText, Prepared, Say, Task

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData


class CausalSettings(TextSettings):
    """`data.config` of the causal LM task."""

    # "chunk": concatenate and cut; "documents": whole documents packed into rows; "none": a document per row.
    packing: Literal["chunk", "documents", "none"] = "chunk"
    # chunk: the last partial block of each split, dropped or kept and padded (padding never counts in the loss).
    tail: Literal["drop", "pad"] = "drop"
    # documents, none: a document longer than a row is cut to one ("truncate") or left out ("drop").
    overflow: Literal["truncate", "drop"] = "truncate"
    # documents: best-fit decreasing packs this many documents at a time (data/packing.py): the build's memory
    # follows it, not the corpus.
    packing_window_documents: PositiveInt = 8192


def next_token_labels(labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """labels [B, T] -> the label each position predicts: the next token's, and IGNORE_INDEX at the end and, in
    packed rows, at each document's last token (it does not predict the next document's first).

    Shifting the labels, not the logits, spares a copy of the [batch, time, vocab] logits."""
    import torch
    import torch.nn.functional as F

    from rafale.models.loss import IGNORE_INDEX

    following = labels[:, 1:]
    if document_ids is not None:
        following = torch.where(document_ids[:, 1:] == document_ids[:, :-1], following, IGNORE_INDEX)
    return F.pad(following, (0, 1), value=IGNORE_INDEX)


class CausalLM(Task):
    Settings = CausalSettings
    cache_settings = ("tail",)
    metric_names = {"LanguageCrossEntropy": "cross-entropy", "LanguagePerplexity": "perplexity"}

    def cache_key(self, settings: CausalSettings) -> dict[str, Any]:
        key = super().cache_key(settings)
        if settings.packing != "chunk":  # chunking's folders keep the names they had before packing existed
            key.update(packing=settings.packing, overflow=settings.overflow)
        if settings.packing == "documents":
            key["packing_window_documents"] = settings.packing_window_documents
        return key

    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: CausalSettings,
                work: Path) -> Prepared:
        from rafale.data.chunking import chunk

        splits, summary = {}, {}
        for split, docs in documents.items():
            if settings.packing == "chunk":
                blocks, kept = chunk(docs, settings.text_column, tokenizer, eos_id, settings, split,
                                     work / f"{split}-blocks.arrow")
                splits[split] = blocks
                summary[split] = {"documents": len(docs), "tokens": kept, "blocks": len(blocks)}
                continue
            splits[split], summary[split] = whole_documents(docs, tokenizer, eos_id, settings, split, work)
        if settings.packing == "chunk":
            return splits, summary, {}
        return splits, summary, {"packing": {"mode": settings.packing, "row_length": settings.max_sequence_length}}

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        from rafale.data.packing import efficiency_lines

        return efficiency_lines(prepared)

    def collator(self, prepared: PreparedData, settings: CausalSettings, seed: int):
        from rafale.data.collate import PaddingCollator

        return PaddingCollator(prepared.pad_token_id, settings.max_sequence_length, settings.pad_inputs,
                               settings.input_id_key)

    def metrics(self, model: torch.nn.Module) -> dict:
        from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity

        return {"LanguageCrossEntropy": LanguageCrossEntropy(), "LanguagePerplexity": LanguagePerplexity()}

    def model_inputs(self, model: torch.nn.Module, batch: dict) -> dict:
        return {**super().model_inputs(model, batch), "document_ids": batch.get("document_ids")}

    def targets(self, batch: dict) -> torch.Tensor:
        return next_token_labels(batch["labels"], batch.get("document_ids"))

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), labels=self.targets(batch))

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch))

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), self.targets(batch).flatten())

    def loss_tokens(self, batch: dict) -> int:
        from rafale.models.loss import IGNORE_INDEX

        return int((self.targets(batch) != IGNORE_INDEX).sum())

    def debug_checks(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """A decoder must not see the future: changing a row's second half must leave the first half's logits as
        they were. A leak lets the loss fall all the same (the model copies the next token), so it is checked."""
        import torch

        ids = batch["input_ids"][:1]
        real = int(batch["attention_mask"][0].sum())
        if real < 4:
            return []
        half = real // 2
        changed = ids.clone()
        changed[0, half:real] = (changed[0, half:real] + 1) % model.config.vocab_size
        was_training = model.training
        model.eval()
        with torch.no_grad():
            before = self.causal_outputs(model, ids[:, :real])[0, :half]
            after = self.causal_outputs(model, changed[:, :real])[0, :half]
        model.train(was_training)
        if not torch.allclose(before.float(), after.float(), atol=1e-4, rtol=1e-4):
            return [f"the model sees the future: changing tokens {half} to {real - 1} of a row changed the "
                    f"predictions at positions before them (by up to {float((before - after).abs().max()):.3g})"]
        return []

    def causal_outputs(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """What debug_checks compares per position: the model's predictions."""
        return model(ids)

    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """The model's continuations of run.sample_prompts."""
        from rafale.models.generate import generate_text

        if not config.run.sample_prompts or config.run.sample_max_new_tokens == 0:
            return
        model.eval()
        samples = generate_text(model, prepared.tokenizer, config.run.sample_prompts,
                                max_new_tokens=config.run.sample_max_new_tokens, temperature=0.8, top_k=40,
                                seed=config.run.seed, eos_token_id=prepared.eos_token_id,
                                pad_token_id=prepared.pad_token_id)
        say("samples:")
        for sample in samples:
            say(f"  {sample['prompt']}{sample['text']}".replace("\n", " "))

    def held_out_text(self, config: RunFile, prepared: PreparedData, max_bytes: int) -> Optional[HeldOutText]:
        """The validation split's first documents, read again from the source (the prepared blocks cut documents
        and join them with EOS tokens, which have no bytes): each after the EOS token that precedes every document
        in training, as `rafale eval` scores them."""
        import tempfile

        from rafale.evaluate.perplexity import leading_documents

        settings = config.data.config
        if settings.is_prepared:  # token ids only: no text to count bytes in
            return None
        with tempfile.TemporaryDirectory(prefix="rafale-held-out-") as work:
            validation = self.load_documents(settings, Path(work))["validation"]
            documents = leading_documents(validation[settings.text_column], max_bytes)
        return HeldOutText("the validation split's text", documents, prefix=prepared.eos_token_id)


def whole_documents(documents: Dataset, tokenizer: Tokenizer, eos_id: int, settings: CausalSettings, split: str,
                    work: Path):
    """(rows of whole documents, their counts): packed into rows with document ids ("documents") or one a row
    ("none"); a document longer than a row is cut to one or left out, as `overflow` says. Tokenized and written
    shard by shard; packed `packing_window_documents` at a time."""
    import datasets

    from rafale.data.chunking import tokenized_shards
    from rafale.data.packing import DOCUMENT_IDS, packed_windows
    from rafale.data.progress import BuildProgress
    from rafale.data.rows import RowWriter
    from rafale.errors import RafaleError

    length, column = settings.max_sequence_length, settings.input_id_key
    counts = {"documents": len(documents), "tokens": 0, "blocks": 0, "longer than a row": 0}
    progress = BuildProgress(f"tokenizing and packing {split}", len(documents))

    def kept() -> Iterator[tuple[list[int], None]]:
        for shard in tokenized_shards(documents, settings.text_column, tokenizer, eos_id, settings,
                                      work / f"{split}-tokens.arrow"):
            tokens = 0
            for document in shard.to_pylist():
                tokens += len(document)
                if len(document) > length:
                    counts["longer than a row"] += 1
                    if settings.overflow == "drop":
                        continue
                    document = document[:length]
                counts["tokens"] += len(document)
                yield document, None
            progress.update(len(shard), tokens)

    features = {column: datasets.Sequence(datasets.Value("int32"))}
    if settings.packing == "documents":
        features[DOCUMENT_IDS] = datasets.Sequence(datasets.Value("int32"))
    with RowWriter(work / f"{split}-rows.arrow", datasets.Features(features)) as writer:
        if settings.packing == "documents":
            for row in packed_windows(kept(), length, settings.packing_window_documents):
                writer.append({column: row["input_ids"], DOCUMENT_IDS: row[DOCUMENT_IDS]})
        else:
            for document, _ in kept():
                writer.append({column: document})
        rows = writer.finish()
    progress.close()
    if len(rows) == 0:
        raise RafaleError(f"data.config.max_sequence_length: every {split} document is longer than {length} tokens; "
                          f"raise it or set data.config.overflow: truncate")
    counts["blocks"] = len(rows)
    return rows, counts
