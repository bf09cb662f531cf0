"""Offline PPO on binary feedback, as HALOs defines it (ContextualAI/HALOs, `PPOTrainer`): no sampling, the
completions of the data are the episodes, a desirable one earns +1 and an undesirable one -1.

Records are KTO's `{prompt, completion, label}` (data/preference.py), a row one sequence (`input_ids`, `labels`) and
its label (`desirable`). The model is the language model with a value head (models/decoder.py, ValuedDecoder): one
pass of the blocks gives the log-prob of every response token and a value at every position. The reference is the
model the run starts from; its log-prob of every response token is cached before training (tasks/reference.py,
kind "tokens") or computed each step (`reference: live`).

Each training batch is used for `ppo_epochs` optimizer steps in a row (data/repeat.py deals it that many times).
Its episode is fixed at the first: the values then, V_old, give the advantages and the returns, which the later
steps reuse. Per response token t of a sequence (the positions whose next token is labelled, in order; the last one
predicts EOS), with logp_t the policy's log-prob of the token, logq_t the reference's and V_t the value:

- reward:     r_t = +1 (desirable) or -1 (undesirable) at the last response token, 0 elsewhere
- GAE:        delta_t = r_t + gamma V_old_{t+1} - V_old_t (0 after the last token), A_t = delta_t + gamma lam A_{t+1}
- returns:    R_t = A_t + V_old_t, the value target
- whitened:   A_t <- (A_t - mean A) / sqrt(var A + 1e-8), over the microbatch's response tokens (var: population)
- ratio:      rho_t = exp(logp_t - logq_t), the policy against the reference
- policy:     max(-A_t rho_t, -A_t clip(rho_t, cliprange, 1 / cliprange))
- value:      0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -cliprange_value, cliprange_value) - R_t)^2)
- KL penalty: 0.5 (logp_t - logq_t)^2
- loss:       mean over the microbatch's response tokens of policy + value_coef value + kl_coef KL

Defaults are HALOs': ppo_epochs 1, cliprange 0.5, gamma 0.99, lam 0.95, value_coef 0.01 (its critic_coef), kl_coef
0.1; cliprange_value 0.2 is TRL's (HALOs does not clip values). With one step per batch, V_old is the current value
and the value clipping never binds. Where rafale differs from HALOs, and why:

- The value target is the GAE return R_t. HALOs regresses on the discounted sum of the rewards after t, which leaves
  out r_t itself: the last token's target is 0 whatever the label, while its advantage counts the label.
- The KL penalty is 0.5 (logp - logq)^2. HALOs' mean(logq - logp) estimates KL only on the policy's own samples; on
  offline data its gradient is the negative log-likelihood of every completion, undesirable ones too. The squared
  log-ratio is 0 at the reference and pulls back from either side.
- `ppo_epochs` are optimizer steps. HALOs' epochs over a batch accumulate gradients before one step, with the
  values and advantages fixed, so they only scale the gradient; PPO's epochs step between passes, which is what
  makes clipping around V_old mean anything. A run's `max_duration` in batches counts every repeat, and each epoch
  of the data leaves out its last short batch. A run resumed between a batch's repeats computes its episode again
  from the values it resumes with (the episodes are not in the checkpoint).
- GAE skips positions without a label (a chat's earlier turns): a sequence's response tokens are one episode.

Dropout is off, so that at step 0 the policy is its reference: every ratio is exactly 1 and the policy term
averages the whitened advantages, 0. Metrics: the loss, the policy and value losses, the clip fraction (share of
response tokens whose clipped term is the larger), the approximate KL (the penalty's mean), the mean value, and the
mean log-ratio sum(logp - logq) of desirable and of undesirable completions. At the end, as KTO's: the held-out
metrics and the exact match of greedy answers on desirable prompts, before training and after. The value head is
training state only: the exported model is the plain language model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar

from pydantic import Field

from rafale.config import RunFile
from rafale.errors import RafaleError
from rafale.tasks.base import Say
from rafale.tasks.causal_lm import CausalLM
from rafale.tasks.kto import KTO
from rafale.tasks.preference import LABELS, REFERENCE_LOGPS, PairedPreference, PreferenceBase, fitted

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData


class PPOSettings(PreferenceBase):
    """`data.config` of offline PPO."""

    # No inverse temperature: the rewards are the labels' +1 and -1.
    beta: ClassVar[float] = 1.0
    # Optimizer steps in a row on each batch, its advantages and value targets fixed at the first.
    ppo_epochs: Annotated[int, Field(ge=1)] = 1
    # The ratio against the reference is clipped to [cliprange, 1 / cliprange].
    cliprange: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # A value moves at most this far from the batch's first values before its loss stops pulling it.
    cliprange_value: Annotated[float, Field(gt=0)] = 0.2
    # GAE's discount and its lambda.
    gamma: Annotated[float, Field(ge=0, le=1)] = 0.99
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    # The weights of the value loss and of the KL penalty beside the policy loss.
    value_coef: Annotated[float, Field(ge=0)] = 0.01
    kl_coef: Annotated[float, Field(ge=0)] = 0.1


class OfflinePPO(KTO):
    Settings = PPOSettings
    required_columns = {"desirable": "dataset_path"}
    reference_kind = "tokens"
    # The loss starts at the value term alone (the policy term is the mean of whitened advantages at ratio 1: 0)
    # and falls below 0 as the ratios follow the advantages: half the first loss shows that they do.
    debug_target = 0.5
    metric_names = {"PreferenceLoss": "loss", "PolicyLoss": "policy loss", "ValueLoss": "value loss",
                    "ClipFraction": "clip fraction", "ApproxKL": "approx KL", "Value": "value",
                    "ChosenReward": "desirable log-ratio", "RejectedReward": "undesirable log-ratio"}

    def __init__(self, name: str):
        super().__init__(name)
        # The episodes (old values, advantages, returns) of the microbatches whose ppo_epochs are not over, by
        # their contents' digest, with the steps each has left.
        self._episodes: dict[str, list] = {}

    def batch_repeats(self, settings: PPOSettings) -> int:
        return settings.ppo_epochs

    def check_settings(self, settings: PPOSettings, where: str) -> None:
        # KTO's KL estimate needs two examples a microbatch; PPO's terms are per token.
        PairedPreference.check_settings(self, settings, where)

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        return {**super().model_overrides(config, prepared), "value_head": True}

    # --- rows ---------------------------------------------------------------------------------------------------
    def row_columns(self) -> tuple[str, ...]:
        return ("input_ids", LABELS, "desirable")

    def row(self, record: dict, where: str, index: int, records, format_settings, tokenizer: Tokenizer, eos_id: int,
            settings: PPOSettings, counts: dict) -> dict[str, Any] | None:
        from rafale.data.preference import binary_example

        segments, desirable = binary_example(record, where, format_settings)
        sequence = fitted(segments, tokenizer, eos_id, settings, where, counts)
        if sequence is None:
            counts["dropped"] += 1
            return None
        counts["desirable" if desirable else "undesirable"] += 1
        ids, labels = sequence
        return {"input_ids": ids, LABELS: labels, "desirable": desirable}

    def collator(self, prepared: PreparedData, settings: PPOSettings, seed: int):
        return TokenCollator(prepared.pad_token_id, settings.max_sequence_length)

    # --- log-probs and losses -----------------------------------------------------------------------------------
    def response_mask(self, batch: dict) -> torch.Tensor:
        """[B, T]: the positions whose next token is a labelled response token."""
        from rafale.models.loss import IGNORE_INDEX
        from rafale.tasks.causal_lm import next_token_labels

        return next_token_labels(batch[LABELS]) != IGNORE_INDEX

    def reference_pass(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The log-prob [B, T] in fp32 of each position's next token, 0 off the response."""
        from rafale.tasks.causal_lm import next_token_labels

        targets = next_token_labels(batch[LABELS])
        return -model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=targets,
                      reduction="none").float()

    def reference_log_probs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor | None:
        import torch

        if REFERENCE_LOGPS in batch:
            mask = self.response_mask(batch)
            stored = batch[REFERENCE_LOGPS].float()
            kept = torch.arange(stored.shape[1], device=stored.device) < mask.sum(-1, keepdim=True)
            return stored.new_zeros(mask.shape).masked_scatter(mask, stored[kept])
        if self.live_reference is not None:
            return self.live_reference(model, batch)
        return None

    def outputs(self, model: torch.nn.Module, batch: dict, training: bool = False) -> dict[str, torch.Tensor]:
        """The per-token terms of a batch; `training`: its episode fixed at its first of ppo_epochs steps."""
        import torch

        from rafale.tasks.causal_lm import next_token_labels

        if self.settings is None:
            raise RafaleError("the PPO task was not given its settings: call before_training first")
        targets = next_token_labels(batch[LABELS])
        token_losses, values = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=targets,
                                     reduction="none", with_values=True)
        reference = self.reference_log_probs(model, batch)
        if reference is None:
            raise RafaleError("the reference log-probs are missing: the run did not compute them before training")
        desirable = batch["desirable"].bool()
        scores = torch.where(desirable, 1.0, -1.0).to(values.device)
        mask = self.response_mask(batch)
        if training and self.settings.ppo_epochs > 1:
            episode = self._episode(batch, lambda: ppo_episode(self.settings, values, scores, mask))
        else:
            episode = ppo_episode(self.settings, values, scores, mask)
        terms = ppo_terms(self.settings, -token_losses.float(), reference, values, episode, mask)
        return {**terms, "desirable": desirable}

    def _episode(self, batch: dict, compute: Callable[[], dict]) -> dict[str, torch.Tensor]:
        """The microbatch's episode: computed at its first step, reused for its other ppo_epochs - 1."""
        import hashlib

        digest = hashlib.sha256()
        for name in ("input_ids", LABELS, "desirable"):
            digest.update(batch[name].detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in self._episodes:
            self._episodes[key] = [compute(), self.settings.ppo_epochs]
        episode, left = self._episodes[key]
        if left == 1:
            del self._episodes[key]
        else:
            self._episodes[key][1] = left - 1
        return episode

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        outputs = self.outputs(model, batch, training=True)
        self._remember(outputs)
        return outputs["loss"].sum() / outputs["mask"].sum().clamp(min=1)

    def metric_values(self, outputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Token means per row, weighted by the rows' response tokens (so that a metric is a mean over tokens);
        the log-ratios per completion."""
        mask = outputs["mask"].float()
        tokens = mask.sum(-1)

        def per_row(name: str) -> torch.Tensor:
            return (outputs[name].detach().float() * mask).sum(-1) / tokens.clamp(min=1)

        ratios = ((outputs["log_ratio"].detach().float()) * mask).sum(-1)
        desirable = outputs["desirable"].float()
        return {"PreferenceLoss": (per_row("loss"), tokens), "PolicyLoss": (per_row("policy"), tokens),
                "ValueLoss": (per_row("value"), tokens), "ClipFraction": (per_row("clipped"), tokens),
                "ApproxKL": (per_row("kl"), tokens), "Value": (per_row("values"), tokens),
                "ChosenReward": (ratios, desirable), "RejectedReward": (ratios, 1 - desirable)}

    def loss_tokens(self, batch: dict) -> int:
        # The loss is a mean over response tokens: each microbatch weighs as many as it holds.
        return int(self.response_mask(batch).sum())

    def flops_per_batch(self, model: torch.nn.Module, batch: dict) -> float:
        rows, length = batch["input_ids"].shape
        return model.flops_per_token(length) * rows * length

    def debug_checks(self, model: torch.nn.Module, batch: dict) -> list[str]:
        return CausalLM.debug_checks(self, model, batch)

    def causal_outputs(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The logits and the values: neither may see the future."""
        import torch

        logits, values = model(ids, with_values=True)
        return torch.cat([logits.float(), values[..., None]], dim=-1)

    def before_training(self, config: RunFile, prepared: PreparedData, starting_model: Callable[[], Any],
                        say: Say) -> None:
        # KTO's advice on the weights of desirable and undesirable examples is about its own loss.
        PairedPreference.before_training(self, config, prepared, starting_model, say)


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns [B, T] (0 off the mask), each row's masked positions one episode, the value after
    its last position 0."""
    import torch

    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(values)
    next_value, next_advantage = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        here = mask[:, t]
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = torch.where(here, advantage, 0.0)
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def whitened(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked positions (population variance); 0 off the mask."""
    import torch

    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_episode(settings: PPOSettings, values: torch.Tensor, scores: torch.Tensor,
                mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a batch's ppo_epochs share, [B, T] each, from its values [B, T] at the first, each row's score [B] (+1
    or -1) and the response mask [B, T]: the old values, the whitened advantages and the returns."""
    import torch

    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1)
    rewards = torch.zeros_like(values, dtype=torch.float32)
    rewards[torch.arange(len(last), device=mask.device), last] = scores.float() * mask.any(-1)
    old_values = values.detach().float() * mask
    advantages, returns = advantages_and_returns(rewards, old_values, mask, settings.gamma, settings.lam)
    return {"values": old_values, "advantages": whitened(advantages, mask), "returns": returns}


def ppo_terms(settings: PPOSettings, policy: torch.Tensor, reference: torch.Tensor, values: torch.Tensor,
              episode: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per response token [B, T]: the loss and its policy, value and KL terms, whether the ratio's clipping binds,
    the values and the log-ratio, from the policy's and the reference's log-probs [B, T], the values [B, T], the
    batch's episode (ppo_episode) and the response mask [B, T] (the module docstring has the formulas)."""
    import torch

    mask = mask.bool()
    advantages, returns, old_values = episode["advantages"], episode["returns"], episode["values"]
    log_ratio = (policy - reference) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(settings.cliprange, 1 / settings.cliprange)
    policy_loss = torch.max(unclipped, clipped)
    values = values.float()
    kept_near = old_values + (values - old_values).clamp(-settings.cliprange_value, settings.cliprange_value)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (kept_near - returns) ** 2)
    kl = 0.5 * log_ratio ** 2
    loss = (policy_loss + settings.value_coef * value_loss + settings.kl_coef * kl) * mask
    return {"loss": loss, "policy": policy_loss * mask, "value": value_loss * mask, "kl": kl,
            "clipped": (clipped > unclipped).float() * mask, "values": values.detach() * mask,
            "log_ratio": log_ratio, "mask": mask}


class TokenCollator:
    """Rows of one sequence -> `input_ids`, `attention_mask`, `labels` [rows, time] padded to the longest of the
    batch, `desirable` [rows], and the cached reference log-probs of each row's response tokens, padded with 0 to
    the longest [rows, tokens]."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, rows) -> dict:
        import torch

        from rafale.data.collate import pad_rows

        batch = pad_rows(rows, self.pad_token_id, self.max_length, pad_to_max=False, label_key=LABELS)
        batch["desirable"] = torch.tensor([bool(row["desirable"]) for row in rows])
        if REFERENCE_LOGPS in rows[0]:
            stored = [torch.as_tensor(row[REFERENCE_LOGPS], dtype=torch.float32) for row in rows]
            padded = torch.zeros(len(rows), max(len(values) for values in stored))
            for i, values in enumerate(stored):
                padded[i, :len(values)] = values
            batch[REFERENCE_LOGPS] = padded
        return batch
