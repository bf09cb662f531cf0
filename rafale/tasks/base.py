"""What every task shares: the pieces `train.py` asks a task for, and their defaults.

A task owns everything that differs between objectives: its data settings, how documents become rows, its
collator, what the model computes on a batch (the loss, the eval outputs, the metrics), what the end of a run
prints and what the export carries. `train.py` asks the task for these and never asks which task it is.

This module and the task modules import nothing heavy at the top (the run file is validated before torch is
imported): torch, datasets and the model code are imported inside the methods that use them. `tasks/model.py`
holds the one ComposerModel that hands Composer's calls to a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from rafale.config import DataSettings, RunFile
from rafale.data.tokenizer import BPE, WORDPIECE
from rafale.errors import RafaleError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData

# How a task turns prepared documents into rows: (rows per split, per-split counts, what meta.json adds).
Prepared = tuple[dict[str, "Dataset"], dict[str, dict[str, Optional[int]]], dict[str, Any]]
Say = Callable[[str], None]


class HeldOutText(NamedTuple):
    """Held-out text whose perplexity the end of a run reports (rafale/evaluate/perplexity.py's figures): the
    documents, each scored after the `prefix` token or, where given, its context (a prompt), and what they are."""

    what: str
    documents: list[str]
    contexts: Optional[list[str]] = None
    prefix: Optional[int] = None


class Task:
    """A training objective. Subclasses set the class attributes and override what differs."""

    # The settings class of `data.config` for this task (config.py validates the run file with it).
    Settings: type[DataSettings] = DataSettings
    # "decoder" or "encoder": which presets fit.
    model_kind = "decoder"
    # The original's model.mode for the encoder head this task trains (None for decoders).
    encoder_mode: Optional[str] = None
    # The kind of tokenizer trained on the fly when data.config.tokenizer_path is unset.
    tokenizer_kind = BPE
    # Settings of this task's own class that shape the prepared rows: part of the cache key.
    cache_settings: tuple[str, ...] = ()
    # Columns of the prepared rows that a folder prepared elsewhere (is_prepared) must have besides the input ids:
    # column -> the data.config key that names it.
    required_columns: dict[str, str] = {}
    # How the console names the eval metrics.
    metric_names: dict[str, str] = {}
    # DEBUG=1 passes when its one batch's loss falls to this fraction of the first.
    debug_target: float = 0.1

    def __init__(self, name: str):
        self.name = name

    # --- the run file, checked before any work ---------------------------------------------------------------
    def check_settings(self, settings: DataSettings, where: str) -> None:
        """One-line errors (RafaleError) for settings that can be checked without reading the data."""
        from rafale.data.sources import check_source

        check_source(settings)

    def cache_key(self, settings: DataSettings) -> dict[str, Any]:
        """What, beyond the shared settings, makes this task's rows differ."""
        return {name: getattr(settings, name) for name in self.cache_settings}

    def check_model(self, config: RunFile) -> None:
        """The preset must be of the task's kind (decoder or encoder), and its overrides valid."""
        from rafale.models import PRESETS, bert

        preset, where = config.model.config, config.at("model.config")
        if preset not in PRESETS:
            raise RafaleError(f"{where}: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        is_encoder = preset in bert.PRESETS
        if is_encoder != (self.model_kind == "encoder"):
            kind = "an encoder" if is_encoder else "a decoder"
            fitting = ", ".join(name for name in PRESETS if (name in bert.PRESETS) != is_encoder)
            raise RafaleError(f"{where}: {preset!r} is {kind} preset, but data.pipeline {self.name!r} trains "
                              f"{'an encoder' if self.model_kind == 'encoder' else 'a decoder'}; valid: {fitting}")

    # --- data --------------------------------------------------------------------------------------------------
    def source_columns(self, settings: DataSettings) -> dict[str, str]:
        """The source's columns this task reads: column -> the data.config key that names it (for errors)."""
        return {settings.text_column: "text_column"}

    def load_documents(self, settings: DataSettings, work: Path) -> DatasetDict:
        """The source's documents, "train" and "validation" splits (sources.py)."""
        from rafale.data.sources import load_documents

        return load_documents(settings, work, self.source_columns(settings))

    def tokenizer_text_column(self, settings: DataSettings) -> str:
        """The column of the loaded documents that a tokenizer trained on the fly learns from."""
        return settings.text_column

    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: DataSettings,
                work: Path) -> Prepared:
        raise NotImplementedError

    def finish_loading(self, prepared: PreparedData) -> None:
        """Fill what a prepared folder's meta.json would say, for folders prepared elsewhere (is_prepared)."""

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        """Lines this task adds to the data summary."""
        return []

    def collator(self, prepared: PreparedData, settings: DataSettings, seed: int) -> Callable:
        raise NotImplementedError

    # --- model -------------------------------------------------------------------------------------------------
    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        """Settings of the model that follow from the task and its data (an encoder's head, its padding id)."""
        return {}

    def check_built_model(self, config: RunFile, model: torch.nn.Module) -> None:
        """Checks that need the built model's config (an encoder's position table)."""

    def before_training(self, config: RunFile, prepared: PreparedData, starting_model: Callable[[], torch.nn.Module],
                        say: Say) -> None:
        """Work between the data and the Trainer: a preference task's reference log-probs, computed with
        `starting_model()` (a fresh copy of the model the run starts from) and added to the prepared rows."""

    def batch_repeats(self, settings: DataSettings) -> int:
        """How many optimizer steps in a row each training batch is used for (offline PPO's epochs over a batch)."""
        return 1

    # --- what the ComposerModel computes (tasks/model.py hands Composer's calls here) --------------------------
    def metrics(self, model: torch.nn.Module) -> dict:
        raise NotImplementedError

    def model_inputs(self, model: torch.nn.Module, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The batch's loss: the mean over its tokens that carry a label (`loss_tokens` counts them), so that
        Composer, weighting each microbatch by that count, gets the whole batch's token mean on every process."""
        raise NotImplementedError

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> Any:
        raise NotImplementedError

    def update_metric(self, batch: dict, outputs: Any, metric) -> None:
        raise NotImplementedError

    def train_metrics(self) -> dict[str, float]:
        """Metrics of the last training batch that the console and the loggers show beside the loss (then
        forgotten); none by default."""
        return {}

    def loss_tokens(self, batch: dict) -> int:
        """How many targets of the batch carry a label: the weight of its mean loss in the whole batch."""
        raise NotImplementedError

    def flops_per_batch(self, model: torch.nn.Module, batch: dict) -> float:
        """Model FLOPs of one training batch (forward and backward), so SpeedMonitor can report MFU."""
        rows, length = batch["input_ids"].shape
        return model.flops_per_token(length) * rows * length

    # --- DEBUG=1, the end of a run, the export -----------------------------------------------------------------
    def debug_checks(self, model: torch.nn.Module, batch: dict) -> list[str]:
        """Problems with the model that a falling loss would not reveal (a decoder that sees the future)."""
        return []

    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """What the model learned, printed at the end of a run."""

    def held_out_text(self, config: RunFile, prepared: PreparedData, max_bytes: int) -> Optional[HeldOutText]:
        """Held-out text, at most about `max_bytes` of it, whose token and byte perplexity the end of a run reports;
        None for a task that does not model text (an encoder's)."""
        return None

    def export_tokenizer_config(self, prepared: PreparedData, config: RunFile) -> dict[str, Any]:
        """What the exported tokenizer_config.json carries besides the special tokens (a chat template)."""
        return {}


class EncoderTask(Task):
    """What the encoder tasks (BERT, RoBERTa) share: a WordPiece tokenizer when none is given, the padding id in
    the model, segment ids, and rows that must fit the position table."""

    model_kind = "encoder"
    tokenizer_kind = WORDPIECE

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        return {"pad_token_id": prepared.pad_token_id}

    def check_built_model(self, config: RunFile, model: torch.nn.Module) -> None:
        """Rows must fit the position table: RoBERTa's positions start after the padding id."""
        usable = model.config.max_position_embeddings
        if model.config.family == "roberta":
            usable -= model.config.pad_token_id + 1
        length = config.data.config.max_sequence_length
        if length > usable:
            raise RafaleError(f"{config.source}: data.config.max_sequence_length: {length} is longer than the "
                              f"model's {usable} positions; lower it or raise model.max_position_embeddings")

    def model_inputs(self, model: torch.nn.Module, batch: dict) -> dict:
        # Segment ids only where the model has segments: RoBERTa has one type, and a BERT-style tokenizer's
        # pairs would index past it.
        token_types = batch.get("token_type_ids") if model.config.type_vocab_size > 1 else None
        return {**super().model_inputs(model, batch), "token_type_ids": token_types}
