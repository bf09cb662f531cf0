"""Causal language modelling (pretraining): every token predicts the next one.

Rows: each document's token ids with an EOS after it, the split's documents concatenated and cut into blocks of
`max_sequence_length` (data/chunking.py); the last partial block is dropped (`tail: drop`) or kept as a shorter
row that the collator pads (`tail: pad`). Loss: the mean next-token cross-entropy over the tokens that carry a
label, with the LM head fused into it (models/loss.py). Eval: cross-entropy and perplexity. At the end, samples
continue `run.sample_prompts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rafale.config import RunFile, TextSettings
from rafale.tasks.base import Prepared, Say, Task

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData


class CausalSettings(TextSettings):
    """`data.config` of the causal LM task."""

    # The last partial block of each split: dropped, or kept and padded (padding never counts in the loss).
    tail: Literal["drop", "pad"] = "drop"


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> the label each position predicts: the next token's, and IGNORE_INDEX at the end.

    Shifting the labels, not the logits, spares a copy of the [batch, time, vocab] logits."""
    import torch.nn.functional as F

    from rafale.models.loss import IGNORE_INDEX

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class CausalLM(Task):
    Settings = CausalSettings
    cache_settings = ("tail",)
    metric_names = {"LanguageCrossEntropy": "cross-entropy", "LanguagePerplexity": "perplexity"}

    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: CausalSettings,
                work: Path) -> Prepared:
        from rafale.data.chunking import chunk, tokenize

        splits, summary = {}, {}
        for split, docs in documents.items():
            tokens = tokenize(docs, settings.text_column, tokenizer, eos_id, settings.num_processes,
                              work / f"{split}.arrow")
            blocks, kept = chunk(tokens, settings, split)
            splits[split] = blocks
            summary[split] = {"documents": len(docs), "tokens": kept, "blocks": len(blocks)}
        return splits, summary, {}

    def collator(self, prepared: PreparedData, settings: CausalSettings, seed: int):
        from rafale.data.collate import PaddingCollator

        return PaddingCollator(prepared.pad_token_id, settings.max_sequence_length, settings.pad_inputs,
                               settings.input_id_key)

    def metrics(self, model: torch.nn.Module) -> dict:
        from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity

        return {"LanguageCrossEntropy": LanguageCrossEntropy(), "LanguagePerplexity": LanguagePerplexity()}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch), labels=next_token_labels(batch["labels"]))

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**self.model_inputs(model, batch))

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), next_token_labels(batch["labels"]).flatten())

    def loss_tokens(self, batch: dict) -> int:
        from rafale.models.loss import IGNORE_INDEX

        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

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
            before, after = model(ids[:, :real])[0, :half], model(changed[:, :real])[0, :half]
        model.train(was_training)
        if not torch.allclose(before.float(), after.float(), atol=1e-4, rtol=1e-4):
            return [f"the model sees the future: changing tokens {half} to {real - 1} of a row changed the "
                    f"predictions at positions before them (by up to {float((before - after).abs().max()):.3g})"]
        return []

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
