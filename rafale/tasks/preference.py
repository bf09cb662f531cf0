"""Preference tuning on paired feedback: DPO (with label smoothing: conservative DPO), IPO, SimPO and ORPO.

Records (data/preference.py) give a prompt and two responses; each is rendered and tokenized as SFT renders a record
and its answer (sft.tokenized: the prompt and the response encoded apart, the boundary exact, an EOS after the
response). A row holds the chosen sequence (`input_ids`, `labels`) and the rejected one (`rejected_ids`,
`rejected_labels`). A pair whose responses are the same teaches nothing: it is left out and counted, and the data
summary says how many. A prompt that leaves no room for a response at `max_sequence_length` is an error naming the
record (`overflow: drop` leaves such rows out and counts them); a response that does not fit is cut and counted.

Batches are [pairs, 2, time], so that Composer's microbatches never part a chosen sequence from its rejected one;
both go through the model in one forward, chosen rows first. A sequence's log-probability is the sum of log p over
its response tokens (and EOS) in fp32, through the fused head (models/loss.py), which projects the labelled positions
only. Losses, with r_c = logp(chosen) - logp_ref(chosen), r_r likewise, h = r_c - r_r and avg = logp / tokens:

- dpo:   (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h)   (eps = label_smoothing; 0: plain DPO)
         + alpha * -avg_c   (alpha = rpo_alpha, 0 by default: RPO, the chosen response's NLL per token)
- ipo:   (h_avg - 1 / (2 beta))^2, h_avg from the log-ratios divided by each response's token count
- simpo: -log sigmoid(beta (avg_c - avg_r) - gamma)                      (no reference)
- orpo:  -avg_c - lambda * log sigmoid(log odds(avg_c) - log odds(avg_r))   (no reference; lambda = orpo_lambda)

Rewards are beta * r (dpo, ipo), beta * avg (simpo) and lambda * avg (orpo); the metrics are the chosen and rejected
rewards, their margin and the reward accuracy (share of pairs whose chosen reward is the higher). Dropout is off, so
that at step 0 the policy is its reference: every DPO loss is ln 2 and every reward 0.

The reference (tasks/reference.py) is the model the run starts from: its log-probs are computed once before training
and cached beside the prepared data (`reference: cached`), or computed every step (`live`).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal

from pydantic import Field

from rafale.config import SYNTHETIC_PREFIX, RunFile
from rafale.errors import RafaleError
from rafale.tasks.base import Prepared, Say
from rafale.tasks.sft import (
    FORMAT,
    HELD_OUT_SPLITS,
    PROMPT,
    RECORD,
    REFERENCE,
    TEXT,
    WHERE,
    SFTSettings,
    SupervisedFineTuning,
)

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict
    from tokenizers import Tokenizer

    from rafale.data.cache import PreparedData

SYNTHETIC_PREFERENCES = SYNTHETIC_PREFIX + "preferences"
LABELS = "labels"
# The column of reference log-probs the cached pass adds, fp32: per row [chosen, second], or the log-prob of each
# response token (PPO).
REFERENCE_LOGPS = "reference_logps"
PAIRED_LOSSES = ("dpo", "ipo", "simpo", "orpo")
WITHOUT_REFERENCE = ("simpo", "orpo")


class PreferenceBase(SFTSettings):
    """What paired and binary feedback share (formats as SFT's: prompt_template, input_format, output_format,
    chat_template)."""

    # SFT's record format and packing do not apply: a record's keys say how its prompt is given.
    format: ClassVar[str] = "auto"
    packing: ClassVar[str] = "none"
    # The inverse temperature of the rewards (dpo, ipo's tau, simpo, kto).
    beta: Annotated[float, Field(gt=0)] = 0.1
    # "cached": the reference's log-probs computed once before training and stored beside the prepared data;
    # "live": computed every step (for comparison). Unused by simpo and orpo.
    reference: Literal["cached", "live"] = "cached"
    # A response that does not fit is cut; a prompt that leaves no room for one is an error ("truncate") or the
    # row is left out and counted ("drop").
    overflow: Literal["truncate", "drop"] = "truncate"
    # Held-out examples whose greedy answers are compared with the right response, before and after training.
    eval_examples: Annotated[int, Field(ge=0)] = 200


class PreferenceSettings(PreferenceBase):
    """`data.config` of paired preference tuning."""

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    # dpo: the share of pairs assumed mislabelled (conservative DPO; HALOs uses 0.2).
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    # dpo: the weight of the chosen response's NLL per token added to the loss (RPO, Pang et al. 2024; TRL's
    # rpo_alpha): it keeps DPO from lowering the right answer's likelihood along with the wrong one's.
    rpo_alpha: Annotated[float, Field(ge=0)] = 0.0
    # simpo: the target margin.
    simpo_gamma: Annotated[float, Field(ge=0)] = 1.0
    # orpo: the weight of the odds-ratio term beside the chosen response's NLL.
    orpo_lambda: Annotated[float, Field(gt=0)] = 0.1


class PairedPreference(SupervisedFineTuning):
    Settings = PreferenceSettings
    cache_settings = ("prompt_template", "input_format", "output_format", "overflow")
    # The second sequence of a row, beside input_ids and labels.
    second = "rejected"
    # What the reference's log-probs are (tasks/reference.py): each sequence's sum.
    reference_kind = "sequences"
    required_columns = {"rejected_ids": "dataset_path", "rejected_labels": "dataset_path"}
    # -log sigmoid(beta h) reaches 10% of ln 2 only at a margin h of 26 nats (beta 0.1); half of ln 2 (beta h of
    # about 1 on every pair) already shows that the policy parts chosen from rejected.
    debug_target = 0.5
    metric_names = {"PreferenceLoss": "loss", "RewardAccuracy": "reward accuracy", "RewardMargin": "margin",
                    "ChosenReward": "chosen reward", "RejectedReward": "rejected reward"}

    def __init__(self, name: str):
        super().__init__(name)
        # Set before training (tasks/reference.py): a model whose log-probs are the reference's, for `live`.
        self.live_reference: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None
        # Held-out figures of the starting model, for the report's "before".
        self.before: dict[str, float] = {}
        # The run's settings (the losses' beta, ...), given before training.
        self.settings: PreferenceSettings | None = None
        self._train_sums: dict[str, float] = {}

    # --- the run file -------------------------------------------------------------------------------------------
    def check_settings(self, settings: PreferenceSettings, where: str) -> None:
        from rafale.data.formats import check_settings
        from rafale.data.sources import check_source

        check_source(settings, synthetic_corpora=(SYNTHETIC_PREFERENCES[len(SYNTHETIC_PREFIX):],))
        check_settings(self.format_settings(settings, where), where)
        if isinstance(settings, PreferenceSettings) and settings.rpo_alpha > 0 and settings.loss != "dpo":
            raise RafaleError(f"{where}.rpo_alpha: adds the chosen response's NLL to the dpo loss only (loss is "
                              f"{settings.loss!r}); leave it at 0")

    def model_overrides(self, config: RunFile, prepared: PreparedData) -> dict[str, Any]:
        # Dropout off: at step 0 the policy must be its reference exactly (every DPO loss ln 2, every reward 0).
        return {"dropout": 0.0}

    def uses_reference(self, settings: PreferenceSettings) -> bool:
        return settings.loss not in WITHOUT_REFERENCE

    # --- records ------------------------------------------------------------------------------------------------
    def load_documents(self, settings: PreferenceSettings, work: Path) -> DatasetDict:
        """The records of every split, each checked (a bad one is an error naming where it is), with the text a
        tokenizer trained on the fly learns from."""
        import datasets

        from rafale.data.sources import shuffled, with_validation

        format_settings = self.format_settings(settings)
        splits = {}
        for split, records in self._records(settings, work).items():
            columns: dict[str, list[str]] = {RECORD: [], WHERE: [], FORMAT: [], TEXT: []}
            for where, record in records:
                first, second, kind = self.examples(record, where, format_settings)
                columns[RECORD].append(json.dumps(record, ensure_ascii=False))
                columns[WHERE].append(where)
                columns[FORMAT].append(kind)
                columns[TEXT].append("".join(text for text, _ in first) + "".join(text for text, _ in second))
            dataset = datasets.Dataset.from_dict(columns)
            if settings.shuffle_dataset:
                dataset = shuffled(dataset, settings, work, split)
            splits[split] = dataset
        if "train" not in splits:
            raise RafaleError(f"data.config.dataset_path: {settings.dataset_path} has no train split")
        return with_validation(splits, settings, "record")

    def _records(self, settings: PreferenceSettings, work: Path) -> dict[str, Any]:
        if settings.dataset_path == SYNTHETIC_PREFERENCES:
            from rafale.data.instructions import generate_preferences

            records = generate_preferences(settings.synthetic_documents, settings.synthetic_seed)
            fields = ("instruction", "input", "chosen", "rejected")
            return {"train": [(f"{SYNTHETIC_PREFERENCES} record {i + 1}", {key: record[key] for key in fields})
                              for i, record in enumerate(records)]}
        return super()._records(settings, work)

    def examples(self, record: dict, where: str, format_settings) -> tuple[list, list, str]:
        """(chosen segments, rejected segments, how the record gives its prompt)."""
        from rafale.data.preference import paired_kind, paired_segments

        kind = paired_kind(record, where)
        chosen, rejected = paired_segments(record, where, format_settings, kind)
        return chosen, rejected, kind

    # --- rows ---------------------------------------------------------------------------------------------------
    def prepare(self, documents: DatasetDict, tokenizer: Tokenizer, eos_id: int, settings: PreferenceSettings,
                work: Path) -> Prepared:
        import datasets

        format_settings = self.format_settings(settings, tokenizer=tokenizer, eos_id=eos_id)
        first_kind = documents["train"][0][FORMAT]
        held_out_split = next(name for name in HELD_OUT_SPLITS if name in documents)
        splits, summary = {}, {}
        for split, records in documents.items():
            held_out = split == held_out_split
            columns: dict[str, list] = {key: [] for key in self.row_columns()}
            if held_out:
                columns.update({PROMPT: [], REFERENCE: []})
            counts = {"documents": len(records), "tokens": 0, "blocks": 0, "truncated": 0, "dropped": 0,
                      **self.extra_counts()}
            for index, row in enumerate(records):
                record, where = json.loads(row[RECORD]), row[WHERE]
                row_values = self.row(record, where, index, records, format_settings, tokenizer, eos_id, settings,
                                      counts)
                if row_values is None:
                    continue
                for name, value in row_values.items():
                    columns[name].append(value)
                if held_out:
                    first, _, _ = self.examples(record, where, format_settings)
                    columns[PROMPT].append(first[0][0] if not first[0][1] else "")
                    columns[REFERENCE].append("".join(text for text, trainable in first if trainable))
                counts["tokens"] += sum(len(row_values[name]) for name in row_values if name.endswith("_ids"))
            if not columns["input_ids"]:
                raise RafaleError(f"data.config.dataset_path: no {split} row is left to train on (see the counts: "
                                  f"{counts})")
            features = {name: datasets.Sequence(datasets.Value("int32")) for name in self.row_columns()
                        if name != "desirable"}
            if "desirable" in columns:
                features["desirable"] = datasets.Value("bool")
            if held_out:
                features.update({PROMPT: datasets.Value("string"), REFERENCE: datasets.Value("string")})
            counts["blocks"] = len(columns["input_ids"])
            splits[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
            summary[split] = counts
        chat_template = self.chat_template(json.loads(documents["train"][0][RECORD]), format_settings)
        return splits, summary, {"format": first_kind, "chat_template": chat_template}

    def chat_template(self, record: dict, format_settings) -> str:
        """The chat template the export carries: it renders a user turn as this run wrote its prompts (a string
        prompt or a transcript as input_output, an instruction as alpaca, messages with the run's chat template),
        so that `rafale generate --chat` and transformers' apply_chat_template ask the tuned model as it trained."""
        from rafale.data import formats
        from rafale.tasks.sft import prompt_as_chat_template

        prompt = record.get("prompt")
        if isinstance(prompt, list):
            return formats.CHAT_TEMPLATES.get(format_settings.chat_template, format_settings.chat_template)
        if prompt is None and "instruction" in record:
            return prompt_as_chat_template(format_settings, "alpaca")
        if prompt is None:  # an HH transcript: its prompt is the text itself, turns and all
            format_settings = replace(format_settings, input_format="__input__", output_format="__output__")
        return prompt_as_chat_template(format_settings, "input_output")

    def row_columns(self) -> tuple[str, ...]:
        return ("input_ids", LABELS, f"{self.second}_ids", f"{self.second}_labels")

    def extra_counts(self) -> dict[str, int]:
        return {"identical pairs": 0}

    def row(self, record: dict, where: str, index: int, records, format_settings, tokenizer: Tokenizer, eos_id: int,
            settings: PreferenceSettings, counts: dict) -> dict[str, list] | None:
        """A record's row (None: left out, and counted)."""
        chosen, rejected, _ = self.examples(record, where, format_settings)
        if chosen == rejected:
            counts["identical pairs"] += 1
            return None
        sequences = [fitted(segments, tokenizer, eos_id, settings, where, counts) for segments in (chosen, rejected)]
        if any(sequence is None for sequence in sequences):
            counts["dropped"] += 1
            return None
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequences
        return {"input_ids": chosen_ids, LABELS: chosen_labels, "rejected_ids": rejected_ids,
                "rejected_labels": rejected_labels}

    def summary_lines(self, prepared: PreparedData) -> list[str]:
        return [f"  records    {prepared.meta.get('format', '?')}"]

    def collator(self, prepared: PreparedData, settings: PreferenceSettings, seed: int):
        return PairCollator(prepared.pad_token_id, settings.max_sequence_length, self.second)

    # --- log-probs and losses -----------------------------------------------------------------------------------
    def sequence_log_probs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [rows, 2] in fp32, response token counts [rows, 2]) of both sequences of every row, in one
        forward of the model."""
        from rafale.models.loss import sequence_log_probs
        from rafale.tasks.causal_lm import next_token_labels

        ids, mask, labels = (flat(batch[name]) for name in ("input_ids", "attention_mask", LABELS))
        targets = next_token_labels(labels)
        token_losses = model(ids, attention_mask=mask, labels=targets, reduction="none")
        sums, counts = sequence_log_probs(token_losses, targets)
        return unflat(sums), unflat(counts)

    def reference_pass(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """What the reference gives for a batch (`reference_kind`): the log-probs [rows, 2] of both sequences."""
        return self.sequence_log_probs(model, batch)[0]

    def reference_log_probs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor | None:
        if REFERENCE_LOGPS in batch:
            return batch[REFERENCE_LOGPS].float()
        if self.live_reference is not None:
            return self.live_reference(model, batch)
        return None

    def outputs(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        settings = self.settings
        if settings is None:
            raise RafaleError("the preference task was not given its settings: call before_training first")
        policy, counts = self.sequence_log_probs(model, batch)
        reference = self.reference_log_probs(model, batch) if self.uses_reference(settings) else None
        if self.uses_reference(settings) and reference is None:
            raise RafaleError("the reference log-probs are missing: the run did not compute them before training")
        losses, chosen, rejected = paired_losses(settings, policy, reference, counts)
        return {"losses": losses, "chosen": chosen, "rejected": rejected}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        outputs = self.outputs(model, batch)
        self._remember(outputs)
        return outputs["losses"].mean()

    def _remember(self, outputs: dict[str, torch.Tensor]) -> None:
        """Sums over the batch's microbatches, for the console and the loggers (`train_metrics`)."""
        for name, value in self.metric_values(outputs).items():
            values, weights = value
            self._train_sums[name] = self._train_sums.get(name, 0.0) + float((values * weights).sum())
            self._train_sums[name + "/n"] = self._train_sums.get(name + "/n", 0.0) + float(weights.sum())

    def train_metrics(self) -> dict[str, float]:
        """The last batch's metrics (means over its examples), then forgotten."""
        sums, self._train_sums = self._train_sums, {}
        # The loss itself is shown and logged already.
        return {self.metric_names.get(name, name): sums[name] / sums[name + "/n"] for name in sums
                if not name.endswith("/n") and name != "PreferenceLoss" and sums[name + "/n"] > 0}

    def metric_values(self, outputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each metric's values and weights over the examples of a batch."""
        import torch

        chosen, rejected = outputs["chosen"].detach().float(), outputs["rejected"].detach().float()
        ones = torch.ones_like(chosen)
        return {"PreferenceLoss": (outputs["losses"].detach().float(), ones),
                "RewardAccuracy": ((chosen > rejected).float(), ones),
                "RewardMargin": (chosen - rejected, ones),
                "ChosenReward": (chosen, ones), "RejectedReward": (rejected, ones)}

    def metrics(self, model: torch.nn.Module) -> dict:
        from rafale.tasks.metrics import WeightedMean

        return {name: WeightedMean(name) for name in self.metric_names}

    def eval_outputs(self, model: torch.nn.Module, batch: dict) -> dict:
        return self.metric_values(self.outputs(model, batch))

    def update_metric(self, batch: dict, outputs: dict, metric) -> None:
        values, weights = outputs[metric.name]
        metric.update(values, weights)

    def loss_tokens(self, batch: dict) -> int:
        # The loss is a mean over examples: each microbatch weighs as many as it holds.
        return int(batch["input_ids"].shape[0])

    def flops_per_batch(self, model: torch.nn.Module, batch: dict) -> float:
        rows, sequences, length = batch["input_ids"].shape
        return model.flops_per_token(length) * rows * sequences * length

    def debug_checks(self, model: torch.nn.Module, batch: dict) -> list[str]:
        return super().debug_checks(model, {name: flat(batch[name]) for name in ("input_ids", "attention_mask")})

    def before_training(self, config: RunFile, prepared: PreparedData, starting_model: Callable[[], Any],
                        say: Say) -> None:
        """The reference's log-probs (cached, or live) and the starting model's held-out figures."""
        from rafale.tasks.reference import attach_reference

        self.settings = config.data.config
        attach_reference(self, config, prepared, starting_model, say)

    # --- the end of a run ---------------------------------------------------------------------------------------
    def held_out_figures(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile) -> dict[str, float]:
        """The share of greedy answers equal to the right response, on the held-out split's first eval_examples."""
        from rafale.tasks.sft import greedy_answers

        settings = config.data.config
        split = next((name for name in HELD_OUT_SPLITS if name in prepared.splits), None)
        if split is None or PROMPT not in prepared.splits[split].column_names or settings.eval_examples == 0:
            return {}
        scored = self.right_answers(prepared.splits[split])
        count = min(len(scored), settings.eval_examples)
        if count == 0:
            return {}
        prompts, references = [prompt for prompt, _ in scored[:count]], [reference for _, reference in scored[:count]]
        answers = greedy_answers(model, prepared, prompts, config.run.sample_max_new_tokens or 48)
        right = sum(answer.strip() == reference.strip() for answer, reference in zip(answers, references))
        return {"exact match": right / count, "scored": count,
                "samples": list(zip(prompts, answers, references))[:settings.sample_count]}

    def report(self, model: torch.nn.Module, prepared: PreparedData, config: RunFile,
               eval_metrics: dict[str, float], say: Say) -> None:
        """The held-out metrics and the greedy exact match, before training and after."""
        for name, value in eval_metrics.items():
            before = self.before.get(name)
            start = f"{before:.4f} before, " if before is not None else ""
            say(f"held-out {self.metric_names.get(name, name)}: {start}{value:.4f} after")
        after = self.held_out_figures(model, prepared, config)
        if after:
            say("held-out answers:")
            for prompt, answer, reference in after["samples"]:
                mark = "right" if answer.strip() == reference.strip() else "wrong"
                asked = " ".join(prompt.split())[-100:]
                say(f"  {asked} -> {answer.strip()!r} ({mark}; expected {reference.strip()!r})")
            before = self.before.get("exact match")
            start = f"{before:.4f} before, " if before is not None else ""
            say(f"held-out exact match of greedy answers: {start}{after['exact match']:.4f} after "
                f"({int(after['scored'])} records)")


def fitted(segments: list, tokenizer: Tokenizer, eos_id: int, settings, where: str,
           counts: dict) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of one sequence cut to max_sequence_length; None when its prompt leaves no room for a response
    and `overflow` is "drop" (with "truncate", that is an error naming the record)."""
    from rafale.models.loss import IGNORE_INDEX
    from rafale.tasks.sft import tokenized

    ids, labels = tokenized(segments, tokenizer, eos_id)
    length = settings.max_sequence_length
    if len(ids) <= length:
        return ids, labels
    # The first label predicts nothing (position 0 has no context): a row needs one after it.
    if all(label == IGNORE_INDEX for label in labels[1:length]):
        if settings.overflow == "drop":
            return None
        prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        raise RafaleError(f"{where}: the prompt takes {prompt} tokens and leaves no room for the response at "
                          f"data.config.max_sequence_length {length}; raise it, or set data.config.overflow: drop")
    counts["truncated"] += 1
    return ids[:length], labels[:length]


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's rule: expm1 near 0, log1p far from it)."""
    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def paired_losses(settings: PreferenceSettings, policy: torch.Tensor, reference: torch.Tensor | None,
                  counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair [B], chosen rewards [B], rejected rewards [B]) from sequence log-probs [B, 2] (chosen,
    rejected) of the policy and the reference, and the response token counts [B, 2]."""
    import torch.nn.functional as F

    beta, loss = settings.beta, settings.loss
    average = policy / counts.clamp(min=1)
    if loss == "simpo":
        rewards = beta * average
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - settings.simpo_gamma), rewards[:, 0], rewards[:, 1]
    if loss == "orpo":
        log_odds = (average[:, 0] - average[:, 1]) - (log1m_exp(average[:, 0]) - log1m_exp(average[:, 1]))
        rewards = settings.orpo_lambda * average.detach()
        losses = -average[:, 0] - settings.orpo_lambda * F.logsigmoid(log_odds)
        return losses, rewards[:, 0], rewards[:, 1]
    ratios = policy - reference
    rewards = beta * ratios.detach()
    if loss == "ipo":
        normalised = ratios / counts.clamp(min=1)
        return (normalised[:, 0] - normalised[:, 1] - 1 / (2 * beta)) ** 2, rewards[:, 0], rewards[:, 1]
    margin = beta * (ratios[:, 0] - ratios[:, 1])
    eps = settings.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin) - settings.rpo_alpha * average[:, 0]
    return losses, rewards[:, 0], rewards[:, 1]


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """[rows, 2, ...] -> [2 * rows, ...]: every row's first sequence, then every row's second."""
    return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])


def unflat(tensor: torch.Tensor) -> torch.Tensor:
    """[2 * rows] -> [rows, 2], undoing `flat`."""
    return tensor.view(2, -1).t()


class PairCollator:
    """Rows of two sequences -> `input_ids`, `attention_mask`, `labels` [rows, 2, time], padded to the longest of
    the batch (sft's padding), with the rows' other columns (reference log-probs, labels of binary feedback)."""

    def __init__(self, pad_token_id: int, max_length: int, second: str):
        self.pad_token_id, self.max_length, self.second = pad_token_id, max_length, second

    def __call__(self, rows) -> dict:
        import torch

        from rafale.data.collate import pad_rows

        sequences = ([{"input_ids": row["input_ids"], LABELS: row[LABELS]} for row in rows]
                     + [{"input_ids": row[f"{self.second}_ids"], LABELS: row[f"{self.second}_labels"]}
                        for row in rows])
        padded = pad_rows(sequences, self.pad_token_id, self.max_length, pad_to_max=False, label_key=LABELS)
        batch = {name: value.view(2, len(rows), -1).transpose(0, 1) for name, value in padded.items()}
        for name in rows[0]:
            if name not in ("input_ids", LABELS, f"{self.second}_ids", f"{self.second}_labels"):
                batch[name] = torch.stack([torch.as_tensor(row[name]) for row in rows])
        return batch
