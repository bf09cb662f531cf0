"""Optimization: parameter groups, the optimizer that `run.optimizer` names, and the learning-rate schedule.

Optimizers come from well-kept libraries, never written here: AdamW from torch, schedule-free AdamW from
facebookresearch's `schedulefree`, SOAP, Muon, Lion and ADOPT from `pytorch-optimizer` (`pip install
"rafale[optim]"`). Whatever the optimizer, parameter groups are made here the same way: frozen parameters stay out,
norms, biases and embeddings take no weight decay, and `run.layer_lr_decay` scales each layer's learning rate.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from composer import Callback
from composer.core import State
from composer.loggers import Logger
from composer.optim.scheduler import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)


@dataclass(frozen=True)
class OptimizerKind:
    """Where an optimizer class lives, the extra that installs its library, and what rafale sets for it."""

    module: str
    class_name: str
    # The pip package and rafale extra that bring `module`; None: torch's own.
    package: Optional[str] = None
    # Arguments rafale gives unless run.optimizer_args says otherwise.
    defaults: dict[str, Any] = field(default_factory=dict)
    # Muon: 2-D hidden matrices take Muon's update; every other parameter its companion AdamW (flagged per group).
    hidden_matrices_only: bool = False
    # Schedule-free: the weights the model holds differ in training (y) and evaluation (x); train()/eval() switch.
    schedule_free: bool = False

    def load(self) -> type[torch.optim.Optimizer]:
        return getattr(importlib.import_module(self.module), self.class_name)

    def missing(self) -> Optional[str]:
        """What to install, when this optimizer's library is not installed."""
        if self.package is None or importlib.util.find_spec(self.module) is not None:
            return None
        return f"needs {self.package}, which is not installed; pip install \"rafale[optim]\""


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind("torch.optim", "AdamW"),
    "schedulefree_adamw": OptimizerKind("schedulefree", "AdamWScheduleFree", "schedulefree", schedule_free=True),
    "soap": OptimizerKind("pytorch_optimizer", "SOAP", "pytorch-optimizer"),
    "muon": OptimizerKind("pytorch_optimizer", "Muon", "pytorch-optimizer", hidden_matrices_only=True),
    "lion": OptimizerKind("pytorch_optimizer", "Lion", "pytorch-optimizer"),
    # Decoupled weight decay, as AdamW's (the library's default is L2 added to the gradient).
    "adopt": OptimizerKind("pytorch_optimizer", "ADOPT", "pytorch-optimizer", defaults={"weight_decouple": True}),
}
# Arguments that come from elsewhere in the run file: the learning rate (run.max_lr and its schedule), weight decay
# (run.weight_decay with its exemptions), the parameters, and schedule-free's warmup (run.warmup_pct's schedule).
# Muon's companion takes its decay from the same exemptions.
RUN_OWNED = {"self", "params", "lr", "weight_decay", "warmup_steps", "adamw_wd"}
# AdamW's betas and eps are run.betas and run.eps.
ADAMW_OWNED = {"betas", "eps"}


def optimizer_arguments(name: str) -> list[str]:
    """The arguments `run.optimizer_args` may set for optimizer `name` (its library must be installed)."""
    owned = RUN_OWNED | (ADAMW_OWNED if name == "adamw" else set())
    parameters = inspect.signature(OPTIMIZERS[name].load().__init__).parameters.values()
    return [p.name for p in parameters if p.name not in owned and p.kind is not inspect.Parameter.VAR_KEYWORD]


def layer_of(name: str, n_layers: int) -> int:
    """Where a parameter sits, counted from the input: 0 the embeddings, 1..n the blocks, n + 1 the rest (final
    norm and heads). rafale's families name their modules alike: `embed*`, `blocks.<i>.`, the rest at the top."""
    top = name.split(".")[0]
    if top == "blocks":
        return int(name.split(".")[1]) + 1
    return 0 if "embed" in top else n_layers + 1


def _layer_label(layer: int, n_layers: int) -> str:
    return "embeddings" if layer == 0 else "head" if layer == n_layers + 1 else f"blocks.{layer - 1}"


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float, layer_lr_decay: Optional[float] = None,
                     split_hidden_matrices: bool = False) -> list[dict]:
    """The optimizer's parameter groups, each with its own `lr`, `weight_decay` and a readable `name`.

    Weight decay on matrices only: never on norms, biases or embeddings (a tied head counts as an embedding).
    Frozen parameters (a LoRA run's base) stay out. With `layer_lr_decay`, a layer's learning rate is `lr` times the
    factor to the power of its distance from the top: the head takes `lr`, the last block `lr * factor`, ..., the
    embeddings the deepest factor. With `split_hidden_matrices` (Muon), the blocks' 2-D matrices get groups of
    their own (`use_muon` True), apart from the embeddings, norms, biases and head (`use_muon` False).
    """
    exempt = {
        id(parameter)
        for module in model.modules()
        for parameter in module.parameters(recurse=False)
        if isinstance(module, torch.nn.Embedding) or parameter.ndim < 2
    }
    n_layers = len(model.blocks)
    groups: dict[tuple, dict] = {}
    for name, parameter in model.named_parameters():  # each shared parameter once, under its first name
        if not parameter.requires_grad:
            continue
        layer = layer_of(name, n_layers) if layer_lr_decay is not None else n_layers + 1
        decays = id(parameter) not in exempt
        hidden_matrix = split_hidden_matrices and decays and 0 < layer_of(name, n_layers) <= n_layers
        key = (layer, decays, hidden_matrix)
        if key not in groups:
            factor = 1.0 if layer_lr_decay is None else layer_lr_decay ** (n_layers + 1 - layer)
            label = _layer_label(layer, n_layers) if layer_lr_decay is not None else "all"
            groups[key] = {"params": [], "lr": lr * factor, "weight_decay": weight_decay if decays else 0.0,
                           "name": f"{label}{'' if decays else ', no decay'}"}
            if split_hidden_matrices:
                groups[key]["use_muon"] = hidden_matrix
                groups[key]["name"] += ", muon" if hidden_matrix else ", adamw"
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def make_optimizer(name: str, groups: list[dict], lr: float, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    """Optimizer `name` over `groups`; `arguments` are run.optimizer_args (plus AdamW's betas and eps)."""
    kind = OPTIMIZERS[name]
    settings = {**kind.defaults, **arguments}
    if kind.hidden_matrices_only:
        # The companion AdamW's groups take its own learning rate, scaled as the Muon groups are.
        companion_lr = settings.get("adamw_lr", inspect.signature(kind.load().__init__).parameters["adamw_lr"].default)
        groups = [group if group["use_muon"] else {**group, "lr": group["lr"] * companion_lr / lr} for group in groups]
    return kind.load()(groups, lr=lr, **settings)


def build_optimizer(config, model: torch.nn.Module, say: Callable[[str], None] = lambda _: None
                    ) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters; `say` hears its groups when they differ in
    learning rate (run.layer_lr_decay) or in update rule (Muon)."""
    run = config.run
    kind = OPTIMIZERS[run.optimizer]
    groups = parameter_groups(model, run.weight_decay, run.max_lr, run.layer_lr_decay, kind.hidden_matrices_only)
    arguments = dict(run.optimizer_args)
    if run.optimizer == "adamw":
        arguments.update(betas=run.betas, eps=run.eps)
    optimizer = make_optimizer(run.optimizer, groups, run.max_lr, arguments)
    if kind.schedule_free:
        # A schedule-free optimizer is made in eval mode, but steps only in train mode: resumption takes a step (of
        # zero) to shape its state before loading the checkpoint's.
        optimizer.train()
    if run.layer_lr_decay is not None or kind.hidden_matrices_only:
        say(f"optimizer: {run.optimizer}, {len(optimizer.param_groups)} parameter groups")
        for group in optimizer.param_groups:
            count = sum(parameter.numel() for parameter in group["params"])
            say(f"  {group['name']:<28} lr {group['lr']:.3e}  weight_decay {group['weight_decay']:g}  "
                f"{len(group['params'])} tensors, {count:,} parameters")
    return optimizer


def check_optimizer(name: str, arguments: dict[str, Any]) -> Optional[str]:
    """Why optimizer `name` cannot take `arguments` (one line naming the key), or None: the optimizer is built on a
    tiny stand-in parameter, so its library checks the values as it would at the start of training."""
    kind = OPTIMIZERS[name]
    missing = kind.missing()
    if missing:
        return f"run.optimizer: {name!r} {missing}"
    valid = optimizer_arguments(name)
    for key in arguments:
        if key not in valid:
            owner = ("run.max_lr" if key == "lr" else "run.weight_decay" if key in ("weight_decay", "adamw_wd")
                     else "run.warmup_pct" if key == "warmup_steps" else f"run.{key}" if key in ADAMW_OWNED
                     else None)
            why = f"set by {owner}" if owner else f"not an argument of {name}"
            return f"run.optimizer_args.{key}: {why}; valid: {', '.join(valid)}"
    stand_in = torch.nn.Parameter(torch.zeros(2, 2))
    groups = [{"params": [stand_in], "lr": 1e-3, "weight_decay": 0.0}]
    if kind.hidden_matrices_only:
        groups[0]["use_muon"] = True
    try:
        make_optimizer(name, groups, 1e-3, arguments)
    except (ValueError, TypeError) as error:
        return f"run.optimizer_args: {name} refuses them: {str(error).splitlines()[0]}"
    return None


@contextmanager
def averaged_weights(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """Within this block a schedule-free optimizer's model holds its averaged weights (x, eval mode), as evaluation,
    checkpoints and the exported model want them; its previous mode comes back after."""
    switched = [optimizer for optimizer in optimizers
                if callable(getattr(optimizer, "eval", None)) and optimizer.param_groups[0].get("train_mode")]
    for optimizer in switched:
        optimizer.eval()
    try:
        yield
    finally:
        for optimizer in switched:
            optimizer.train()


class ScheduleFreeModes(Callback):
    """Schedule-free optimizers train on one point (y) and evaluate on another (x, the average): train mode for
    training, eval mode for evaluation and at the end (the exported model is x). Checkpoints are written in eval
    mode by the saver (rafale.safety), and a resumed run switches back here, as the uninterrupted run does."""

    @staticmethod
    def _switch(state: State, train: bool) -> None:
        for optimizer in state.optimizers:
            optimizer.train() if train else optimizer.eval()

    def fit_start(self, state: State, logger: Logger) -> None:
        self._switch(state, train=True)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._switch(state, train=False)

    def eval_end(self, state: State, logger: Logger) -> None:
        # An evaluation before fit (the run's first) leaves the weights where fit_start expects them.
        self._switch(state, train=True)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._switch(state, train=False)


def optimizer_callbacks(config) -> list[Callback]:
    """What the run's optimizer needs from the training loop."""
    return [ScheduleFreeModes()] if OPTIMIZERS[config.run.optimizer].schedule_free else []


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


def build_scheduler(config) -> ComposerScheduler:
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
