"""Training, read as a recipe: the task -> its data -> the model -> the Trainer's arguments -> fit -> export -> report.

Composer runs the loop, checkpoints, autoresume, clipping, logging and precision; this file only wires them. What
differs between objectives belongs to the run's task (rafale/tasks/), which is asked for its pieces here and
never asked which task it is. `trainer_arguments` is the one place the Trainer is configured: DEBUG=1 changes
only the data (one batch), the duration and the checkpoints (none).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from composer import Trainer
from composer.core import DataSpec
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader, Subset

from rafale import plot, transforms
from rafale.callbacks import METRICS_FILE, ConsoleProgress, LossHistory, MetricsFile, add_to_last_row
from rafale.config import RunFile, cache_root
from rafale.data import PreparedData, build_dataloaders, format_summary, prepare_data
from rafale.data.cache import ready_file
from rafale.errors import RafaleError
from rafale.export import export_model
from rafale.models import PRESETS, bert, build, build_model, load_weights
from rafale.models.bert import EncoderConfig
from rafale.models.decoder import DecoderConfig
from rafale.models.weights import config_from_folder
from rafale.optim import build_optimizer, build_scheduler, optimizer_callbacks
from rafale.safety import check_resumed_settings, checkpoint_callbacks
from rafale.tasks.model import TaskModel
from rafale.transforms import neftune

# A trained-from-scratch model's vocabulary is the tokenizer's, rounded up so matmuls stay aligned.
VOCAB_MULTIPLE = 64


def run_folder(config: RunFile) -> Path:
    """Where a run keeps its checkpoints (`checkpoints/`) and exported model (`model/`)."""
    base = Path(config.run.checkpoint_dir) if config.run.checkpoint_dir else cache_root() / "checkpoints"
    return base / config.run.name


def check_model(config: RunFile) -> None:
    """The model section, checked before any data is prepared: a preset of the task's kind (decoder or encoder)
    whose overrides make a valid model."""
    config.task.check_model(config)
    config_class = EncoderConfig if config.model.config in bert.PRESETS else DecoderConfig
    overrides = config.model.overrides()
    unknown = sorted(set(overrides) - set(config_class.keys()))
    if unknown:
        raise RafaleError(f"{config.at('model.' + unknown[0])}: not a setting of this model; valid: "
                          f"{', '.join(config_class.keys())}")
    try:
        model_config = config_class(**{**PRESETS[config.model.config], **overrides})
    except RafaleError as error:
        raise RafaleError(config.at(str(error))) from None
    if config.transforms:
        # The rules against the modules' names, on a model without memory: the names do not depend on sizes.
        source = config.model.pretrained_path if config.model.use_pretrained else None
        with torch.device("meta"):
            model = build(config_from_folder(source) if source else model_config)
        try:
            transforms.plan(model, [rule.as_dict() for rule in config.transforms])
        except RafaleError as error:
            raise RafaleError(config.at(str(error))) from None


def build_language_model(config: RunFile, prepared: PreparedData,
                         before_transforms: Optional[Callable[[torch.nn.Module], None]] = None,
                         say: Optional[Callable[[str], None]] = None) -> torch.nn.Module:
    """The model of the run file's preset and overrides, sized to the tokenizer, with what the task adds (an
    encoder's head), pretrained weights if asked, then the run file's transforms (`before_transforms` sees it just
    before). A pretrained model keeps the architecture of its folder's config.json (the run file's overrides,
    dropout say, still apply). `say` prints what the build tells (the console by default)."""
    say = say or _say
    check_model(config)
    overrides = config.model.overrides()
    tokenizer_vocab = prepared.tokenizer.get_vocab_size()
    if config.model.use_pretrained:
        base = config_from_folder(config.model.pretrained_path)
        if isinstance(base, EncoderConfig) != (config.task.model_kind == "encoder"):
            raise RafaleError(f"{config.source}: model.pretrained_path: {config.model.pretrained_path} holds "
                              f"{'an encoder' if isinstance(base, EncoderConfig) else 'a decoder'}, but "
                              f"data.pipeline {config.data.pipeline!r} trains a {config.task.model_kind}")
        overrides.update(config.task.model_overrides(config, prepared))
        if getattr(base, "num_scores", 0) and not overrides.get("num_scores"):
            raise RafaleError(f"{config.source}: model.pretrained_path: {config.model.pretrained_path} holds a reward "
                              f"model (a score head, no LM head), but data.pipeline {config.data.pipeline!r} trains "
                              f"a language model")
        model = build(replace(base, **overrides))
    else:
        if "vocab_size" not in overrides:
            overrides["vocab_size"] = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        overrides.update(config.task.model_overrides(config, prepared))
        model = build_model(config.model.config, overrides)
    if tokenizer_vocab > model.config.vocab_size:
        raise RafaleError(
            f"{config.source}: the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
            f"{model.config.vocab_size}; raise model.vocab_size or use a smaller tokenizer"
        )
    config.task.check_built_model(config, model)
    fresh = []
    if config.model.use_pretrained:
        fresh = load_weights(model, config.model.pretrained_path)
        if fresh:
            say(f"model: {', '.join(fresh)} not in {config.model.pretrained_path}: they start as initialised")
    if before_transforms is not None and config.transforms:
        before_transforms(model)
    # A head the pretrained folder lacked keeps training when a transform freezes the rest.
    model = transforms.apply(model, [rule.as_dict() for rule in config.transforms], keep_trainable=tuple(fresh),
                             say=say)
    if config.run.neftune_alpha:
        neftune.add_noise(model, config.run.neftune_alpha)
    return model


def starting_model(config: RunFile, prepared: PreparedData) -> torch.nn.Module:
    """A fresh copy of the model the run starts from (the same seed, weights and transforms as the one it trains),
    on the run's device: a preference run's reference."""
    reproducibility.seed_all(config.run.seed)
    # Built as the trained model was, which has told already what its build tells.
    model = build_language_model(config, prepared, say=lambda message: None)
    device, _ = _device_and_precision(config)
    return model.to("cuda") if device == "gpu" else model


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


def _whole_model(trainer: Trainer, model: torch.nn.Module, config: RunFile) -> Optional[torch.nn.Module]:
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
    whole = transforms.apply(build(model.config), [rule.as_dict() for rule in config.transforms], say=lambda _: None)
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


def _data_spec(loader, task) -> DataSpec:
    """Tokens per second counts real tokens, not padding; the loss of a batch weighs each microbatch by the tokens
    that carry a label ("loss_generating", with Trainer's accumulate_train_batch_on_tokens), so that it is the
    mean over the whole batch's labelled tokens, on any number of microbatches and processes."""
    return DataSpec(loader, get_num_tokens_in_batch=lambda batch: {
        "total": int(batch["attention_mask"].sum()), "loss_generating": task.loss_tokens(batch)})


def _algorithms(config: RunFile) -> list:
    if config.run.clip_type == "none":
        return []
    from composer.algorithms import GradientClipping

    return [GradientClipping(clipping_type=config.run.clip_type, clipping_threshold=config.run.clip_value)]


def _say(message: str) -> None:
    if dist.get_global_rank() == 0:
        print(message, flush=True)


def trainer_arguments(config: RunFile, model: torch.nn.Module, train_loader: DataLoader, eval_loader: DataLoader,
                      duration: str, loggers: list, callbacks: list, checkpoints: Optional[Path]) -> dict[str, Any]:
    """Every argument of the run's Trainer. A real run and DEBUG=1 both come through here; they differ only in
    their loaders, `duration`, and `checkpoints` (the folder of saved checkpoints and autoresume; None: neither)."""
    device, precision = _device_and_precision(config)
    parallelism = _parallelism_config(config, device)
    if parallelism:
        _shard_by_block(model)
    task = config.task
    frozen = tuple(transforms.frozen_parameters(model))
    guards = checkpoint_callbacks(config, checkpoints, frozen) if checkpoints is not None else []
    return dict(
        model=TaskModel(task, model),
        train_dataloader=_data_spec(train_loader, task),
        eval_dataloader=_data_spec(eval_loader, task),
        max_duration=duration,
        optimizers=build_optimizer(config, model, say=_say),
        schedulers=build_scheduler(config),
        step_schedulers_every_batch=True,
        algorithms=_algorithms(config),
        eval_interval=config.run.eval_interval,
        # Checkpoints: Composer's saver, made atomic, plus safe resumption and clean stops (safety.py).
        # The optimizer's callbacks before the checkpoint guards: a schedule-free run is back in train mode (y) at
        # fit_start before anything else looks at its weights.
        callbacks=[*_callbacks(), *optimizer_callbacks(config), *callbacks, *guards],
        loggers=loggers,
        run_name=config.run.name,
        progress_bar=False,
        log_to_console=False,
        autoresume=checkpoints is not None,
        device=device,
        precision=precision,
        device_train_microbatch_size=_microbatch_size(config, device),
        accumulate_train_batch_on_tokens=True,
        compile_config={} if config.run.compile else None,
        parallelism_config=parallelism,
        seed=config.run.seed,
    )


def prepared_data(config: RunFile) -> PreparedData:
    """The run's prepared data. Under the launcher only each node's first process builds it; the others wait for
    its finished cache, then read it: a wait for a file, not a barrier, which would time out on a long build."""
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")  # a short last eval batch is fine
    warnings.filterwarnings("ignore", message=".*warmup duration is 0")
    with dist.local_rank_zero_download_and_wait(str(ready_file(config))):
        return prepare_data(config)


def train_run(config: RunFile) -> Path:
    """The whole run: data, model, Trainer with autoresume, export, report. Returns the run's folder."""
    check_model(config)
    _device_and_precision(config)
    folder = run_folder(config)
    check_resumed_settings(config, folder)
    reproducibility.seed_all(config.run.seed)
    prepared = prepared_data(config)
    _say(format_summary(prepared))
    config.task.before_training(config, prepared, lambda: starting_model(config, prepared), _say)
    train_loader, eval_loader = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
    if len(train_loader) == 0:
        raise RafaleError(f"{config.source}: data.config.train_batch_size: larger than the train split")

    starting = not (folder / "checkpoints" / "latest-rank0.pt").exists()
    untransformed: dict[str, float] = {}

    def evaluate_untransformed(model: torch.nn.Module) -> None:
        # Transform-aware training's first figure: the model as it was, before any rule rewrote it.
        if starting:
            untransformed.update(evaluate(config, model, eval_loader, "eval before the transforms"))

    reproducibility.seed_all(config.run.seed)
    model = build_language_model(config, prepared, before_transforms=evaluate_untransformed)
    _say(f"model: {config.model.config}, {model.num_parameters() / 1e6:.2f}M parameters")
    progress = ConsoleProgress(config.logging.log_interval, config.task.metric_names,
                               train_metrics=config.task.train_metrics, seconds=config.logging.log_seconds)
    history = MetricsFile(folder / METRICS_FILE, config.task.metric_names)
    trainer = Trainer(**trainer_arguments(
        config, model, train_loader, eval_loader, _max_duration(config, len(train_loader)),
        loggers=[progress, history, *_loggers(config)], callbacks=[history.writer],
        checkpoints=folder / "checkpoints"))
    resumed_at = int(trainer.state.timestamp.batch)
    at_start: dict[str, float] = {}
    if resumed_at:
        _say(f"resumed from the latest checkpoint in {folder / 'checkpoints'} at batch {resumed_at}")
    else:
        trainer.eval()
        at_start = dict(progress.eval_metrics)
    # A run that died after its last checkpoint (while exporting, say) has nothing left to train: it only exports.
    if trainer.state.timestamp < trainer.state.max_duration:
        trainer.fit()
    trainer.close()
    if untransformed and at_start and progress.eval_metrics:
        name = next(iter(untransformed))
        label = config.task.metric_names.get(name, name)
        _say(f"transforms: {label} {untransformed[name]:.4f} before them, {at_start[name]:.4f} transformed before "
             f"training, {progress.eval_metrics[name]:.4f} after training")

    whole = _whole_model(trainer, model, config)
    if whole is not None:
        rules = [rule.as_dict() for rule in config.transforms]
        export_model(transforms.merged(whole), folder / "model", prepared, config)
        _say(f"model exported to {folder / 'model'}")
        if transforms.save_rules(rules, folder / "model", whole):
            _say(f"  with {transforms.RULES_FILE}: the transforms it computes under (rafale generate applies them)")
        adapter, why_not = transforms.save_peft_adapter(whole, folder / "model" / "adapter",
                                                        config.model.pretrained_path or "")
        if adapter is not None:
            _say(f"adapter exported to {adapter} (PEFT format)")
        elif transforms.adapters(whole):
            _say(f"no PEFT adapter exported: {why_not}; the merged model holds everything")
        figures = held_out_figures(config, whole, prepared)
        if figures:
            add_to_last_row(folder / METRICS_FILE, figures)
        config.task.report(whole, prepared, config, progress.eval_metrics, _say)
        drawn = plot.draw_run(folder, config.run.name)
        if drawn:
            _say(drawn)
    return folder


# The end of a run scores at most this much held-out text (about 30k tokens at 4 bytes a token: a few seconds for
# a small model on a CPU).
HELD_OUT_BYTES = 128 * 1024


def held_out_figures(config: RunFile, model: torch.nn.Module, prepared: PreparedData) -> dict[str, float]:
    """Token perplexity, bits per byte and byte and word perplexity (rafale/evaluate/perplexity.py's definitions)
    of the task's held-out text, in disjoint windows of the run's sequence length; printed on one line and
    returned for metrics.jsonl. Nothing for a task without text (an encoder's)."""
    from rafale.evaluate.perplexity import evaluate_perplexity

    try:
        text = config.task.held_out_text(config, prepared, HELD_OUT_BYTES)
    except RafaleError as error:
        # The source read again (moved or offline since its cache was built, say): the run is done all the same.
        _say(f"held-out text not scored: {error}")
        return {}
    if text is None or not text.documents:
        return {}
    window = min(config.data.config.max_sequence_length, model.config.max_position_embeddings)
    model.eval()
    prefix_token = prepared.tokenizer.id_to_token(text.prefix) if text.prefix is not None else None
    result = evaluate_perplexity(model, prepared.tokenizer, text.documents, text.prefix, prefix_token, window,
                                 batch_size=config.data.config.eval_batch_size, contexts=text.contexts)
    _say(f"held-out text, {text.what} ({result.documents:,} documents, {result.bytes:,} bytes, {result.tokens:,} "
         f"tokens; window {window}): token perplexity {result.token_perplexity:.4f}, bits per byte "
         f"{result.bits_per_byte:.4f}, byte perplexity {result.byte_perplexity:.4f}")
    return {f"text/{name}": getattr(result, name)
            for name in ("token_perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")}


def evaluate(config: RunFile, model: torch.nn.Module, eval_loader: DataLoader, label: str) -> dict[str, float]:
    """The task's eval metrics of `model` on the eval loader, printed as one line named `label`."""
    device, precision = _device_and_precision(config)
    progress = ConsoleProgress(config.logging.log_interval, config.task.metric_names, label=label)
    trainer = Trainer(model=TaskModel(config.task, model), eval_dataloader=_data_spec(eval_loader, config.task),
                      loggers=[progress], progress_bar=False, log_to_console=False, device=device,
                      precision=precision, seed=config.run.seed)
    trainer.eval()
    trainer.close()
    return progress.eval_metrics


def _callbacks() -> list:
    from composer.callbacks import LRMonitor, SpeedMonitor

    return [SpeedMonitor(window_size=10), LRMonitor()]


def debug_run(config: RunFile) -> bool:
    """Overfit one batch (the same batch for eval) with the run's own Trainer arguments, for at most
    run.debug_steps steps, and say whether the loss fell to the task's target (10% of its start for most tasks)
    and the task's checks of the model (a decoder that sees the future) found nothing."""
    check_model(config)
    reproducibility.seed_all(config.run.seed)
    prepared = prepared_data(config)
    config.task.before_training(config, prepared, lambda: starting_model(config, prepared), _say)
    train_loader, _ = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
    world = dist.get_world_size()
    global_rows = min(config.data.config.train_batch_size, len(train_loader.dataset) // world * world)
    rows = global_rows // world
    # The same single batch for training and eval, as a real DataLoader so Composer knows its batch size. MLM
    # masking is seeded by the batch's ids, so it is also the same masked batch at every step: a fixed target.
    # Under the launcher each process takes its share of the first global batch, as a real run's sampler deals it.
    first_rows = Subset(train_loader.dataset, range(global_rows))
    one_batch = DataLoader(first_rows, batch_size=rows, collate_fn=train_loader.collate_fn,
                           sampler=dist.get_sampler(first_rows, shuffle=False, drop_last=True))
    reproducibility.seed_all(config.run.seed)
    # Built as the trained model was, which has told already what its build tells.
    model = build_language_model(config, prepared, say=lambda message: None)
    steps = config.run.debug_steps
    target = config.task.debug_target
    history = LossHistory(stop_below=target)
    trainer = Trainer(**trainer_arguments(
        config, model, one_batch, one_batch, f"{steps}ba",
        loggers=[ConsoleProgress(max(1, steps // 10), config.task.metric_names,
                                 train_metrics=config.task.train_metrics)], callbacks=[history],
        checkpoints=None))
    trainer.fit()
    trainer.close()
    first, last = history.losses[0], history.losses[-1]
    device = next(model.parameters()).device
    batch = {name: value.to(device) for name, value in next(iter(one_batch)).items()}
    problems = config.task.debug_checks(model, batch)
    passed = math.isfinite(last) and last <= target * first and not problems
    verdict = "PASS" if passed else "FAIL"
    _say(
        f"DEBUG {verdict}: loss {first:.4f} -> {last:.4f} ({100 * last / first:.1f}% of the first) "
        f"after {len(history.losses)} of at most {steps} steps on one batch of {global_rows}; passing needs "
        f"<= {100 * target:.0f}%"
    )
    for problem in problems:
        _say(f"DEBUG FAIL: {problem}")
    return passed
