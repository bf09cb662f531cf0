"""KTO: preference tuning on binary feedback, a completion marked desirable or not (no pairs needed).

Records are `{prompt, completion, label}` (data/preference.py), the prompt a string or chat messages, rendered and
tokenized as SFT's. With r = logp(completion) - logp_ref(completion) and KL an estimate of KL(policy || reference):

- desirable:   w_D * (1 - sigmoid(beta * (r - KL)))
- undesirable: w_U * (1 - sigmoid(beta * (KL - r)))

KL is the mean log-ratio of mismatched pairs (a prompt with another example's completion), clamped at 0, without
gradient, averaged over the processes. Each row carries its mismatched pair as its second sequence: its prompt with
the completion of the next record of its split (cyclically), fixed when the rows are prepared, so that the reference's
log-probs of both are cached like paired feedback's (TRL pairs them the same way, before shuffling). A batch of one
example per process (or a microbatch of one) would estimate KL from a single pair: refused. The run warns when
(w_D * desirable) / (w_U * undesirable) falls outside [1, 4/3], the KTO paper's advice.

Metrics: the loss, the mean reward of desirable and of undesirable completions, and the KL estimate.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated, Any, Callable

from pydantic import Field

from rafale.config import RunFile
from rafale.errors import RafaleError
from rafale.tasks.base import Say
from rafale.tasks.preference import LABELS, PairedPreference, PreferenceBase, fitted
from rafale.tasks.sft import PROMPT, REFERENCE

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData

# The KTO paper's advice for (w_D * desirable) / (w_U * undesirable).
ADVISED_RATIO = (1.0, 4 / 3)


class KTOSettings(PreferenceBase):
    """`data.config` of KTO."""

    desirable_weight: Annotated[float, Field(gt=0)] = 1.0
    undesirable_weight: Annotated[float, Field(gt=0)] = 1.0


class KTO(PairedPreference):
    Settings = KTOSettings
    second = "mismatched"
    required_columns = {"mismatched_ids": "dataset_path", "mismatched_labels": "dataset_path",
                        "desirable": "dataset_path"}
    # A desirable completion's reward cannot pass -logp_ref(completion) (its log-prob cannot pass 0), so the loss
    # has a floor that depends on how likely the reference already finds the desirable completions: a quarter off
    # the first loss is what a batch can always show.
    debug_target = 0.75
    metric_names = {"PreferenceLoss": "loss", "ChosenReward": "desirable reward",
                    "RejectedReward": "undesirable reward", "KL": "KL"}

    def check_settings(self, settings: KTOSettings, where: str) -> None:
        super().check_settings(settings, where)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if settings.train_batch_size // world < 2:
            raise RafaleError(f"{where}.train_batch_size: KTO needs at least 2 examples per process in a batch (its "
                              f"KL estimate pairs each prompt with another example's completion); got "
                              f"{settings.train_batch_size // world}")

    def _records(self, settings: KTOSettings, work) -> dict[str, Any]:
        """The bundled preference pairs, each as two binary examples (its right answer desirable, its wrong one
        not); other sources as they are."""
        from rafale.tasks.preference import SYNTHETIC_PREFERENCES

        records = super()._records(settings, work)
        if settings.dataset_path != SYNTHETIC_PREFERENCES:
            return records
        return {split: [(f"{where} ({label})", {"instruction": record["instruction"], "input": record["input"],
                                                   "completion": record[label], "label": label == "chosen"})
                        for where, record in pairs for label in ("chosen", "rejected")]
                for split, pairs in records.items()}

    def uses_reference(self, settings: KTOSettings) -> bool:
        return True

    def examples(self, record: dict, where: str, format_settings) -> tuple[list, list, str]:
        from rafale.data.preference import binary_example

        segments, desirable = binary_example(record, where, format_settings)
        return segments, [], "desirable" if desirable else "undesirable"

    def row_columns(self) -> tuple[str, ...]:
        return (*super().row_columns(), "desirable")

    def extra_counts(self) -> dict[str, int]:
        return {"desirable": 0, "undesirable": 0}

    def row(self, record: dict, where: str, index: int, records, format_settings, tokenizer: Tokenizer, eos_id: int,
            settings: KTOSettings, counts: dict) -> dict[str, Any] | None:
        from rafale.data.preference import binary_example, prompt_and_response

        segments, desirable = binary_example(record, where, format_settings)
        following = records[(index + 1) % len(records)]
        completion = json.loads(following["record"])["completion"]
        mismatched = prompt_and_response(record, completion, where, format_settings)
        sequences = [fitted(parts, tokenizer, eos_id, settings, where, counts) for parts in (segments, mismatched)]
        if any(sequence is None for sequence in sequences):
            counts["dropped"] += 1
            return None
        counts["desirable" if desirable else "undesirable"] += 1
        (ids, labels), (mismatched_ids, mismatched_labels) = sequences
        return {"input_ids": ids, LABELS: labels, "mismatched_ids": mismatched_ids,
                "mismatched_labels": mismatched_labels, "desirable": desirable}

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        return []

    def right_answers(self, held_out) -> list[tuple[str, str]]:
        """Only desirable completions are right answers: an undesirable one is what the model must not say."""
        return [(prompt, reference) for prompt, reference, desirable
                in zip(held_out[PROMPT], held_out[REFERENCE], held_out["desirable"]) if desirable and reference]

    def before_training(self, config: RunFile, prepared: PreparedData, starting_model: Callable[[], Any],
                        say: Say) -> None:
        settings, device_bs = config.data.config, config.run.device_bs
        if device_bs != "auto" and device_bs < 2:
            raise RafaleError(f"{config.source}: run.device_bs: KTO estimates KL inside each microbatch and needs at "
                              f"least 2 examples in one; got {device_bs}")
        counts = prepared.summary.get("train", {})
        desirable, undesirable = counts.get("desirable"), counts.get("undesirable")
        if desirable and undesirable:
            ratio = (settings.desirable_weight * desirable) / (settings.undesirable_weight * undesirable)
            if not ADVISED_RATIO[0] <= ratio <= ADVISED_RATIO[1]:
                say(f"warning: (desirable_weight x {desirable} desirable) / (undesirable_weight x {undesirable} "
                    f"undesirable) is {ratio:.2f}, outside the KTO paper's advised [1, 4/3]; adjust the weights")
        super().before_training(config, prepared, starting_model, say)

    def outputs(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.settings is None:
            raise RafaleError("the KTO task was not given its settings: call before_training first")
        policy, _ = self.sequence_log_probs(model, batch)
        reference = self.reference_log_probs(model, batch)
        if reference is None:
            raise RafaleError("the reference log-probs are missing: the run did not compute them before training")
        losses, rewards, kl = kto_losses(self.settings, policy, reference, batch["desirable"].bool())
        return {"losses": losses, "rewards": rewards, "desirable": batch["desirable"].bool(), "kl": kl}

    def metric_values(self, outputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        import torch

        rewards, desirable = outputs["rewards"].detach().float(), outputs["desirable"].float()
        ones = torch.ones_like(rewards)
        return {"PreferenceLoss": (outputs["losses"].detach().float(), ones),
                "ChosenReward": (rewards, desirable), "RejectedReward": (rewards, 1 - desirable),
                "KL": (outputs["kl"].float().expand_as(rewards), ones)}


def kto_losses(settings: KTOSettings, policy: torch.Tensor, reference: torch.Tensor,
               desirable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per example [B], reward beta * r per example [B], the KL estimate) from log-probs [B, 2] (the
    example's completion, the mismatched one) of the policy and the reference, and which examples are desirable."""
    import torch
    import torch.distributed as torch_dist

    ratios = policy - reference
    with torch.no_grad():
        kl = ratios[:, 1].mean()
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(kl)
            kl = kl / torch_dist.get_world_size()
        kl = kl.clamp(min=0)
    beta = settings.beta
    r = ratios[:, 0]
    losses = torch.where(desirable, settings.desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach(), kl
