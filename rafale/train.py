"""Training, read as a recipe: data -> model -> optimizer and schedule -> Composer Trainer -> export -> samples.

Composer runs the loop, checkpoints, autoresume, clipping, logging and precision; this file only wires them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from composer import Callback, Trainer
from composer.core import DataSpec, State
from composer.loggers import Logger, LoggerDestination
from composer.optim.scheduler import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader, Subset

from rafale.config import RunFile, cache_root
from rafale.data import PreparedData, build_dataloaders, format_summary, prepare_data
from rafale.data.cache import ready_file
from rafale.data.tokenizer import mask_token_id
from rafale.errors import RafaleError
from rafale.export import export_model
from rafale.models import bert, build, build_model, load_weights
from rafale.models.generate import fill_mask, generate_text
from rafale.safety import checkpoint_callbacks
from rafale.tasks import for_pipeline

# A trained-from-scratch model's vocabulary is the tokenizer's, rounded up so matmuls stay aligned.
VOCAB_MULTIPLE = 64


class WarmupStableDecayScheduler(ComposerScheduler):
    """Linear warmup, a constant plateau, then a linear decay over the last `decay_pct` of the run."""

    def __init__(self, warmup_pct: float, decay_pct: float, min_lr_ratio: float):
        self.warmup_pct, self.decay_pct, self.min_lr_ratio = warmup_pct, decay_pct, min_lr_ratio

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        done = float(state.get_elapsed_duration().value)
        if done < self.warmup_pct:
            return done / self.warmup_pct
        decay_start = 1.0 - self.decay_pct
        if done < decay_start:
            return 1.0
        progress = min(1.0, (done - decay_start) / self.decay_pct)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


# How the console names each task's eval metrics (tasks.py).
METRIC_NAMES = {"LanguageCrossEntropy": "cross-entropy", "LanguagePerplexity": "perplexity",
                "MaskedAccuracy": "masked accuracy", "MulticlassAccuracy": "accuracy", "MulticlassF1Score": "F1"}


class ConsoleProgress(LoggerDestination):
    """One line every `interval` batches (loss, learning rate, tokens per second) and one per evaluation, which
    it keeps in `eval_metrics`."""

    def __init__(self, interval: int):
        self.interval = interval
        self.latest: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self.latest.update(metrics)

    def batch_end(self, state: State, logger: Logger) -> None:
        batch, total = int(state.timestamp.batch), state.max_duration
        if batch % self.interval and batch != 1 and state.get_elapsed_duration() < 1:
            return
        done = state.get_elapsed_duration().value
        where = f"{batch}/{total.value}" if total.unit.value == "ba" else f"{batch}, {done:.0%}"
        learning_rate = state.optimizers[0].param_groups[0]["lr"]
        # SpeedMonitor logs after this destination runs, so this is the window up to the previous batch.
        speed = self.latest.get("throughput/tokens_per_sec")
        speed_text = f"  {speed:,.0f} tok/s" if speed else ""
        mfu = self.latest.get("throughput/device/mfu")
        mfu_text = f"  MFU {100 * mfu:.1f}%" if mfu else ""
        # Composer's total loss is averaged over every rank's share of the batch; state.loss is this rank's alone.
        loss = state.total_loss_dict["loss/train/total"]
        _say(f"[batch {where}] loss {loss:.4f}  lr {learning_rate:.2e}{speed_text}{mfu_text}")

    def eval_end(self, state: State, logger: Logger) -> None:
        # Every rank computes (the metrics sync across ranks); the line and `eval_metrics` are the same on each.
        self.eval_metrics = {name: float(metric.compute()) for name, metric in state.eval_metrics["eval"].items()}
        scores = "  ".join(f"{METRIC_NAMES.get(name, name)} {value:.4f}" for name, value in self.eval_metrics.items())
        _say(f"[eval at batch {int(state.timestamp.batch)}] {scores}")


class LossHistory(Callback):
    """Keeps the training loss of every batch (DEBUG=1 compares the first with the last)."""

    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.loss))


def run_folder(config: RunFile) -> Path:
    """Where a run keeps its checkpoints (`checkpoints/`) and exported model (`model/`)."""
    base = Path(config.run.checkpoint_dir) if config.run.checkpoint_dir else cache_root() / "checkpoints"
    return base / config.run.name


def build_language_model(config: RunFile, prepared: PreparedData) -> torch.nn.Module:
    """The model of the run file's preset and overrides, sized to the tokenizer, with pretrained weights if asked."""
    overrides = config.model.overrides()
    tokenizer_vocab = prepared.tokenizer.get_vocab_size()
    if "vocab_size" not in overrides and not config.model.use_pretrained:
        overrides["vocab_size"] = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if config.model.type == "encoder":
        overrides.update(_encoder_overrides(config, prepared))
    elif config.model.config in bert.PRESETS:
        raise RafaleError(f"{config.source}: model.config: {config.model.config!r} is an encoder preset; set "
                          f"model.type: 'encoder' and data.pipeline 'mlm' or 'classification'")
    model = build_model(config.model.config, overrides)
    if tokenizer_vocab > model.config.vocab_size:
        raise RafaleError(
            f"{config.source}: the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
            f"{model.config.vocab_size}; raise model.vocab_size or use a smaller tokenizer"
        )
    if config.model.type == "encoder":
        _check_positions(config, model.config)
    if config.model.use_pretrained:
        fresh = load_weights(model, config.model.pretrained_path)
        if fresh:
            _say(f"model: {', '.join(fresh)} not in {config.model.pretrained_path}: they start as initialised")
    return model


def _encoder_overrides(config: RunFile, prepared: PreparedData) -> dict[str, Any]:
    """The head the run file's mode asks for (with the data's class names), and the tokenizer's padding id."""
    if config.model.config not in bert.PRESETS:
        raise RafaleError(f"{config.source}: model.config: {config.model.config!r} is not an encoder preset; valid: "
                          f"{', '.join(bert.PRESETS)}")
    overrides: dict[str, Any] = {"pad_token_id": prepared.pad_token_id}
    if config.model.mode == "mlm":
        return {**overrides, "head": "mlm"}
    names, classes = list(prepared.labels), config.model.n_classes
    # Class i named "i" (integer labels): classes the data lacks are named the same way. Named classes must match.
    if names == [str(i) for i in range(len(names))] and len(names) < classes:
        names += [str(i) for i in range(len(names), classes)]
    if len(names) != classes:
        raise RafaleError(f"{config.source}: model.n_classes: {classes}, but the data has {len(names)} classes "
                          f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    return {**overrides, "head": "classification", "num_labels": classes, "id2label": dict(enumerate(names))}


def _check_positions(config: RunFile, model_config: bert.EncoderConfig) -> None:
    """Rows must fit the position table: RoBERTa's positions start after the padding id."""
    usable = model_config.max_position_embeddings
    if model_config.family == "roberta":
        usable -= model_config.pad_token_id + 1
    if config.data.config.max_sequence_length > usable:
        raise RafaleError(f"{config.source}: data.config.max_sequence_length: {config.data.config.max_sequence_length} "
                          f"is longer than the model's {usable} positions; lower it or raise "
                          f"model.max_position_embeddings")


def _decoupled_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases or embeddings (a tied head counts as an embedding)."""
    exempt = {
        id(parameter)
        for module in model.modules()
        for parameter in module.parameters(recurse=False)
        if isinstance(module, torch.nn.Embedding) or parameter.ndim < 2
    }
    decay, no_decay = [], []
    for parameter in model.parameters():  # each shared parameter once
        (no_decay if id(parameter) in exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: RunFile, model: torch.nn.Module) -> torch.optim.Optimizer:
    run = config.run
    groups = _decoupled_param_groups(model, run.weight_decay)
    return torch.optim.AdamW(groups, lr=run.max_lr, betas=run.betas, eps=run.eps)


def build_scheduler(config: RunFile) -> ComposerScheduler:
    """The schedule, with warmup as a fraction of the whole run ("dur"), whatever unit the duration is in."""
    run = config.run
    warmup = f"{run.warmup_pct}dur"
    if run.schedule == "cosine-warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=warmup, alpha_f=run.min_lr_ratio)
    if run.schedule == "linear-warmup":
        return LinearWithWarmupScheduler(t_warmup=warmup, alpha_i=1.0, alpha_f=run.min_lr_ratio)
    if run.schedule == "constant-warmup":
        return ConstantWithWarmupScheduler(t_warmup=warmup)
    return WarmupStableDecayScheduler(run.warmup_pct, run.decay_pct, run.min_lr_ratio)


def _device_and_precision(config: RunFile) -> tuple[str, str]:
    run = config.run
    device = run.device if run.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise RafaleError(f"{config.source}: run.device: 'gpu' but no GPU is available")
    precision = run.precision
    if precision == "auto":
        precision = "amp_bf16" if device == "gpu" and torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu" and precision != "fp32":
        raise RafaleError(f"{config.source}: run.precision: {precision!r} needs a GPU; use fp32 (or auto) on CPU")
    return device, precision


def _parallelism_config(config: RunFile, device: str) -> Optional[dict]:
    """Composer's FSDP settings for run.parallelism "fsdp"; None for "ddp", which Composer applies by itself
    whenever the launcher starts more than one process."""
    if config.run.parallelism == "ddp":
        return None
    if device != "gpu":
        raise RafaleError(f"{config.source}: run.parallelism: 'fsdp' needs GPUs; use 'ddp' on CPU")
    return {
        "fsdp": {
            "sharding_strategy": "FULL_SHARD",
            # The optimizer's two parameter groups (with and without weight decay) survive the wrapping.
            "use_orig_params": True,
            # Checkpoints hold the whole model on rank 0, so they resume on any number of GPUs, with or without
            # FSDP, like any other checkpoint.
            "state_dict_type": "full",
        }
    }


def _shard_by_block(model: torch.nn.Module) -> None:
    """Make each transformer block its own FSDP unit, gathered for its forward and backward and freed after:
    Composer wraps the modules for which the wrapped model's `fsdp_wrap_fn` says True."""
    blocks = set(model.blocks)
    model.fsdp_wrap_fn = lambda module: module in blocks


def _whole_model(trainer: Trainer, model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The trained model, whole, on rank 0 (None on the other ranks).

    Under FSDP every rank holds a shard of each parameter: they are gathered onto rank 0's CPU into a plain copy,
    which every rank must take part in. Otherwise rank 0's own model is already whole.
    """
    if not trainer.state.fsdp_enabled:
        return model if dist.get_global_rank() == 0 else None
    from composer.checkpoint.state_dict import get_model_state_dict

    # The FSDP root is the ComposerModel's child: its keys are the model's own.
    state = get_model_state_dict(trainer.state.model.model, sharded_state_dict=False, cpu_offload=True)
    if dist.get_global_rank() != 0:
        return None
    whole = build(model.config)
    whole.load_state_dict(state)
    return whole


def _microbatch_size(config: RunFile, device: str) -> Any:
    device_bs = config.run.device_bs
    # Composer's microbatches split each process's share of the global batch.
    batch_size = config.data.config.train_batch_size // dist.get_world_size()
    if device_bs == "auto" and device == "cpu":
        _say(f"run.device_bs: 'auto' needs a GPU; on CPU each process runs its {batch_size} rows of a batch at once")
        return batch_size
    return device_bs


def _loggers(config: RunFile) -> list:
    settings = config.logging
    folder = Path(settings.log_dir) / config.run.name
    loggers = []
    if settings.use_file:
        from composer.loggers import FileLogger

        loggers.append(FileLogger(filename=str(folder / "log.txt"), flush_interval=50))
    if settings.use_tensorboard:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(folder / "tensorboard")))
    if settings.use_wandb:
        from composer.loggers import WandBLogger

        loggers.append(WandBLogger(project="rafale", name=config.run.name))
    if settings.use_mlflow:
        from composer.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name="rafale", run_name=config.run.name))
    return loggers


def _max_duration(config: RunFile, batches_per_epoch: int) -> str:
    """Epochs become batches, so the schedule's fractions and the logs are as fine as a batch."""
    if config.run.max_duration is not None:
        duration = config.run.max_duration
        return f"{int(duration[:-2]) * batches_per_epoch}ba" if duration.endswith("ep") else duration
    return f"{config.run.n_epochs * batches_per_epoch}ba"


def _data_spec(loader) -> DataSpec:
    # Tokens per second counts real tokens, not padding.
    return DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch["attention_mask"].sum()))


def _algorithms(config: RunFile) -> list:
    if config.run.clip_type == "none":
        return []
    from composer.algorithms import GradientClipping

    return [GradientClipping(clipping_type=config.run.clip_type, clipping_threshold=config.run.clip_value)]


def _say(message: str) -> None:
    if dist.get_global_rank() == 0:
        print(message, flush=True)


def print_samples(model: torch.nn.Module, prepared: PreparedData, config: RunFile,
                  eval_metrics: dict[str, float]) -> None:
    """What the model learned: its continuations of the sample prompts (causal LM), its guesses for a mask
    token at their end (MLM), or its final validation scores (classification)."""
    if prepared.pipeline == "classification":
        if eval_metrics:  # none when a finished run is started again
            _say(f"validation: accuracy {eval_metrics['MulticlassAccuracy']:.4f}  "
                 f"F1 {eval_metrics['MulticlassF1Score']:.4f}")
        return
    if not config.run.sample_prompts or config.run.sample_max_new_tokens == 0:
        return
    model.eval()
    if prepared.pipeline == "mlm":
        mask_id = mask_token_id(prepared.tokenizer, str(prepared.tokenizer_file))
        _say("fill-mask:")
        for result in fill_mask(model, prepared.tokenizer, config.run.sample_prompts, mask_id):
            guesses = ", ".join(f"{token!r} {probability:.2f}" for token, probability in result["guesses"])
            _say(f"  {result['prompt']} -> {guesses}")
        return
    samples = generate_text(
        model,
        prepared.tokenizer,
        config.run.sample_prompts,
        max_new_tokens=config.run.sample_max_new_tokens,
        temperature=0.8,
        top_k=40,
        seed=config.run.seed,
        eos_token_id=prepared.eos_token_id,
        pad_token_id=prepared.pad_token_id,
    )
    _say("samples:")
    for sample in samples:
        _say(f"  {sample['prompt']}{sample['text']}".replace("\n", " "))


def train_run(config: RunFile) -> Path:
    """The whole run: data, model, Trainer with autoresume, export, samples. Returns the run's folder."""
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")  # a short last eval batch is fine
    device, precision = _device_and_precision(config)
    parallelism = _parallelism_config(config, device)
    reproducibility.seed_all(config.run.seed)
    # Under the launcher only each node's first process tokenizes; the others wait for its finished cache, then
    # read it. A wait for a file, not a barrier: a collective would time out on a build longer than its timeout.
    with dist.local_rank_zero_download_and_wait(str(ready_file(config))):
        prepared = prepare_data(config)
    _say(format_summary(prepared))
    train_loader, eval_loader = build_dataloaders(prepared, config.data.config, config.run.seed)
    if len(train_loader) == 0:
        raise RafaleError(f"{config.source}: data.config.train_batch_size: larger than the train split")

    reproducibility.seed_all(config.run.seed)
    model = build_language_model(config, prepared)
    _say(f"model: {config.model.config}, {model.num_parameters() / 1e6:.2f}M parameters")
    if parallelism:
        _shard_by_block(model)
    folder = run_folder(config)
    progress = ConsoleProgress(config.logging.log_interval)
    trainer = Trainer(
        model=for_pipeline(config.data.pipeline, model),
        train_dataloader=_data_spec(train_loader),
        eval_dataloader=_data_spec(eval_loader),
        max_duration=_max_duration(config, len(train_loader)),
        optimizers=build_optimizer(config, model),
        schedulers=build_scheduler(config),
        step_schedulers_every_batch=True,
        algorithms=_algorithms(config),
        eval_interval=config.run.eval_interval,
        # Checkpoints: Composer's saver, made atomic, plus safe resumption and clean stops (safety.py).
        callbacks=[*_callbacks(), *checkpoint_callbacks(config, folder / "checkpoints")],
        loggers=[progress, *_loggers(config)],
        run_name=config.run.name,
        progress_bar=False,
        log_to_console=False,
        autoresume=True,
        device=device,
        precision=precision,
        device_train_microbatch_size=_microbatch_size(config, device),
        compile_config={} if config.run.compile else None,
        parallelism_config=parallelism,
        seed=config.run.seed,
    )
    resumed_at = int(trainer.state.timestamp.batch)
    if resumed_at:
        _say(f"resumed from the latest checkpoint in {folder / 'checkpoints'} at batch {resumed_at}")
    else:
        trainer.eval()
    # A run that died after its last checkpoint (while exporting, say) has nothing left to train: it only exports.
    if trainer.state.timestamp < trainer.state.max_duration:
        trainer.fit()
    trainer.close()

    whole = _whole_model(trainer, model)
    if whole is not None:
        export_model(whole, folder / "model", prepared, config)
        _say(f"model exported to {folder / 'model'}")
        print_samples(whole, prepared, config, progress.eval_metrics)
    return folder


def _callbacks() -> list:
    from composer.callbacks import LRMonitor, SpeedMonitor

    return [SpeedMonitor(window_size=10), LRMonitor()]


def debug_run(config: RunFile) -> bool:
    """Overfit one batch (the same batch for eval) and say whether the loss fell to 10% of its start."""
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")
    reproducibility.seed_all(config.run.seed)
    prepared = prepare_data(config)
    train_loader, _ = build_dataloaders(prepared, config.data.config, config.run.seed)
    rows = min(config.data.config.train_batch_size, len(train_loader.dataset))
    # The same single batch for training and eval, as a real DataLoader so Composer knows its batch size. MLM
    # masking is seeded by the batch's ids, so it is also the same masked batch at every step: a fixed target.
    first_rows = Subset(train_loader.dataset, range(rows))
    one_batch = DataLoader(first_rows, batch_size=rows, collate_fn=train_loader.collate_fn)
    model = build_language_model(config, prepared)
    device, precision = _device_and_precision(config)
    steps = config.run.debug_steps
    history = LossHistory()
    trainer = Trainer(
        model=for_pipeline(config.data.pipeline, model),
        train_dataloader=_data_spec(one_batch),
        eval_dataloader=_data_spec(one_batch),
        max_duration=f"{steps}ba",
        optimizers=build_optimizer(config, model),
        schedulers=ConstantWithWarmupScheduler(t_warmup="0ba"),
        algorithms=_algorithms(config),
        eval_interval=f"{steps}ba",
        callbacks=[history],
        loggers=[ConsoleProgress(max(1, steps // 10))],
        progress_bar=False,
        log_to_console=False,
        device=device,
        precision=precision,
        device_train_microbatch_size=_microbatch_size(config, device),
        seed=config.run.seed,
    )
    trainer.fit()
    trainer.close()
    first, last = history.losses[0], history.losses[-1]
    passed = math.isfinite(last) and last <= 0.1 * first
    verdict = "PASS" if passed else "FAIL"
    _say(
        f"DEBUG {verdict}: loss {first:.4f} -> {last:.4f} ({100 * last / first:.1f}% of the first) "
        f"after {steps} steps on one batch of {rows}; passing needs <= 10%"
    )
    return passed
