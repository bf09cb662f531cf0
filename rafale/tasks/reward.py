"""A Bradley-Terry reward model: a decoder with a scalar head, trained on paired feedback to score the chosen
response above the rejected one.

The records and rows are paired preference tuning's (tasks/preference.py): a prompt with its chosen and rejected
responses, each rendered and tokenized as SFT's, both in one forward. The model is the decoder with a `score` head
(one output, no bias) in place of its LM head (models/decoder.py, ScoredDecoder); a sequence's score s is read at
its last real token (the response's EOS). The loss per pair is -log sigmoid(s_chosen - s_rejected); the metrics are
the accuracy (share of held-out pairs whose chosen response scores higher), the margin and both mean scores.

The export is transformers' `*ForSequenceClassification` layout (`score.weight`, `num_labels` 1), which
`AutoModelForSequenceClassification` loads and `rafale label` scores samples with (evaluate/label.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from rafale.config import RunFile
from rafale.tasks.base import Say
from rafale.tasks.preference import PairedPreference, flat, unflat
from rafale.tasks.sft import SFTSettings

if TYPE_CHECKING:
    import torch

    from rafale.data.cache import PreparedData


class RewardSettings(SFTSettings):
    """`data.config` of a reward model: the records of paired preference tuning, rendered with SFT's formats
    (prompt_template, input_format, output_format, chat_template)."""

    format: ClassVar[str] = "auto"
    packing: ClassVar[str] = "none"
    # A reward model does not generate: no greedy answers are scored.
    eval_examples: ClassVar[int] = 0
    overflow: Literal["truncate", "drop"] = "truncate"


class RewardModel(PairedPreference):
    Settings = RewardSettings
    # -log sigmoid(s_c - s_r) has no floor but 0: one batch's pairs are told apart as far as asked.
    debug_target = 0.1
    metric_names = {"PreferenceLoss": "loss", "RewardAccuracy": "accuracy", "RewardMargin": "margin",
                    "ChosenReward": "chosen score", "RejectedReward": "rejected score"}

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        return {"num_scores": 1}

    def uses_reference(self, settings: RewardSettings) -> bool:
        return False

    def held_out_text(self, config: RunFile, prepared: PreparedData, max_bytes: int) -> None:
        """A score head predicts no tokens: there is no perplexity to report."""
        return None

    def before_training(self, config: RunFile, prepared: PreparedData, starting_model: Callable[[], Any],
                        say: Say) -> None:
        """The starting model's held-out figures (its score head as initialised), for the report's "before"."""
        from composer.core.precision import Precision, get_precision_context

        from rafale.tasks.reference import starting_figures
        from rafale.train import _device_and_precision

        self.settings = config.data.config
        _, precision = _device_and_precision(config)
        model = starting_model()
        model.eval()
        with get_precision_context(Precision(precision)):
            self.before = starting_figures(self, model, prepared, config)

    def outputs(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        scores = unflat(model(flat(batch["input_ids"]), attention_mask=flat(batch["attention_mask"]))[:, 0].float())
        chosen, rejected = scores[:, 0], scores[:, 1]
        return {"losses": -F.logsigmoid(chosen - rejected), "chosen": chosen, "rejected": rejected}

    def held_out_figures(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile) -> dict[str, float]:
        return {}

    def causal_outputs(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The hidden states (a shorter sequence's score reads them): the score head gives one value a sequence."""
        return model.hidden_states(ids)


def score_texts(model: torch.nn.Module, tokenizer, texts: list[list[tuple[str, bool]]], eos_id: int, pad_id: int,
                batch_size: int = 32) -> list[float]:
    """The scores of sequences given as SFT segments (a prompt and a response), tokenized as in training (the
    segments encoded apart, an EOS after the response; cut to the model's positions), in batches."""
    import torch

    from rafale.data.collate import pad_rows
    from rafale.tasks.sft import tokenized

    device = next(model.parameters()).device
    max_length = model.config.max_position_embeddings
    scores: list[float] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        rows = [{"input_ids": tokenized(segments, tokenizer, eos_id)[0]}
                for segments in texts[start:start + batch_size]]
        batch = pad_rows(rows, pad_id, max_length, pad_to_max=False)
        with torch.no_grad():
            values = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        scores.extend(values[:, 0].float().cpu().tolist())
    return scores
