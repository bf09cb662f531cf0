"""The run file: YAML read safely, validated by pydantic, one model per section.

Every default lives here. Unknown keys are errors, and every error names the run file and the dotted key
(`run.yaml: model.n_layers: must be > 0`). Paths in the run file are resolved relative to the run file.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rafale.errors import RafaleError

# A Composer time string: an integer and a unit (batches, epochs, tokens, samples, durations).
TIME_PATTERN = re.compile(r"^\d+(ba|ep|tok|sp|dur)$")
SYNTHETIC_PREFIX = "synthetic:"
FLOAT_PATTERN = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

SCHEDULES = ("cosine-warmup", "linear-warmup", "constant-warmup", "warmup-stable-decay")
# rafale.optim.OPTIMIZERS holds where each comes from; named here so that reading a run file imports no optimizer.
OPTIMIZERS = ("adamw", "schedulefree_adamw", "soap", "muon", "lion", "adopt")
# The optional loggers: the module each needs, and the extra that installs it.
LOGGER_EXTRAS = {"use_tensorboard": ("tensorboard", "tensorboard"), "use_wandb": ("wandb", "wandb"),
                 "use_mlflow": ("mlflow", "mlflow")}

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(RafaleError):
    """A run file that does not load or does not validate."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _time_string(value: Union[str, int]) -> str:
    """Accept `500` (batches) or a Composer time string such as `"500ba"`, `"2ep"`, `"1000000tok"`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a time such as '100ba', '1ep' or '100000tok', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be > 0")
        return f"{value}ba"
    text = str(value).strip()
    if not TIME_PATTERN.match(text) or int(re.match(r"\d+", text).group()) <= 0:
        raise ValueError(f"expected a positive time such as '100ba', '1ep' or '100000tok', got {value!r}")
    return text


class RunConfig(Section):
    """`run:` how to train: duration, optimiser, schedule, clipping, batches, precision, checkpoints."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 42
    n_epochs: PositiveInt = 1
    # Overrides n_epochs when set: "2000ba", "5000000tok", "3ep".
    max_duration: Optional[str] = None
    max_lr: PositiveFloat = 6e-4
    # Learning rate at the end of the decay, as a fraction of max_lr.
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_pct: Annotated[float, Field(ge=0, lt=1)] = 0.01
    # warmup-stable-decay only: the fraction of the run spent decaying at the end.
    decay_pct: Annotated[float, Field(gt=0, le=1)] = 0.2
    schedule: str = "cosine-warmup"
    # adamw, schedulefree_adamw, soap, muon, lion, adopt (all but adamw: pip install "rafale[optim]").
    optimizer: str = "adamw"
    # The optimizer's own hyperparameters by their library's names (Lion's betas, Muon's momentum and adamw_lr,
    # ...); the learning rate and weight decay are max_lr and weight_decay, whatever the optimizer.
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    # AdamW's; other optimizers take theirs in optimizer_args.
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    # Fine-tuning: each layer's learning rate is max_lr times this factor per layer below the head (the last block
    # takes one factor, the embeddings the deepest); unset: one learning rate for all.
    layer_lr_decay: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    # NEFTune: uniform noise of amplitude alpha / sqrt(length * hidden) on the input embeddings, in training only.
    neftune_alpha: Annotated[float, Field(ge=0)] = 0.0
    eval_interval: str = "100ba"
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = Field(default=3, ge=-1)
    clip_type: Literal["norm", "value", "none"] = "norm"
    clip_value: PositiveFloat = 1.0
    device_bs: Union[PositiveInt, Literal["auto"]] = "auto"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    compile: bool = False
    # With several processes (the `composer -n N` launcher): "ddp" keeps a whole model per GPU, "fsdp" shards
    # parameters, gradients and optimizer state across GPUs (GPUs only). One process trains on one device either way.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # Where checkpoints and the exported model go; default: <cache>/checkpoints/<name>.
    checkpoint_dir: Optional[str] = None
    # DEBUG=1 trains on one batch for at most this many steps, with the run's own optimizer and schedule; it stops
    # as soon as the loss has fallen to 10% of its first value.
    debug_steps: PositiveInt = 300
    # Samples printed at the end of training.
    sample_prompts: list[str] = Field(default_factory=lambda: ["Once upon a time"])
    sample_max_new_tokens: Annotated[int, Field(ge=0)] = 48

    @field_validator("max_duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else _time_string(value)

    @field_validator("eval_interval", "save_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        return _time_string(value)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        return _choice(value, SCHEDULES, "schedule")

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        return _choice(value.lower(), OPTIMIZERS, "optimizer")

    @field_validator("optimizer_args")
    @classmethod
    def _optimizer_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        # YAML 1.1 reads 1e-3 (no dot) as a string; a number is what an optimizer wants there.
        def number(item: Any) -> Any:
            if isinstance(item, list):
                return [number(part) for part in item]
            return float(item) if isinstance(item, str) and FLOAT_PATTERN.match(item) else item

        return {key: number(item) for key, item in value.items()}

    @model_validator(mode="after")
    def _optimizer_fits(self) -> "RunConfig":
        """The optimizer's library is installed and takes optimizer_args; what it needs of the rest of the run."""
        if self.optimizer != "adamw" or self.optimizer_args:
            # Torch's AdamW with no arguments has nothing to check, and reading its run file imports no optimizer.
            from rafale.optim import check_optimizer

            problem = check_optimizer(self.optimizer, self.optimizer_args)
            if problem:
                raise ValueError(problem)
        for key in ("betas", "eps"):
            if key in self.model_fields_set and self.optimizer != "adamw":
                raise ValueError(f"run.{key}: AdamW's; {self.optimizer} takes its own as run.optimizer_args.{key}")
        if self.optimizer == "schedulefree_adamw" and self.schedule != "constant-warmup":
            raise ValueError(f"run.schedule: {self.schedule!r}, but schedule-free AdamW keeps the learning rate "
                             f"constant after its warmup (run.warmup_pct); use 'constant-warmup'")
        return self


class ModelConfig(Section):
    """`model:` a preset, optionally changed key by key, and where pretrained weights come from."""

    config: str = Field(min_length=1)
    # The original's keys, both decided by data.pipeline now (its task says decoder or encoder, and which head):
    # accepted when they agree with it. "decoder" (a causal LM) or "encoder" (BERT, RoBERTa).
    type: Optional[Literal["decoder", "encoder"]] = None
    # "mlm" (masked language modelling) or "cls" (sequence classification), for encoders.
    mode: Optional[Literal["mlm", "cls"]] = None
    # Classes of a "cls" encoder: as many as the data's label names, or more than its largest integer label.
    n_classes: Annotated[int, Field(ge=2)] = 2
    use_pretrained: bool = False
    # A Hugging Face-format folder (or hub name) whose weights are loaded when use_pretrained is true.
    pretrained_path: Optional[str] = None
    # Overrides of the preset's architecture; None keeps the preset's value.
    vocab_size: Optional[PositiveInt] = None
    hidden_size: Optional[PositiveInt] = None
    n_layers: Optional[PositiveInt] = None
    n_heads: Optional[PositiveInt] = None
    intermediate_size: Optional[PositiveInt] = None
    max_position_embeddings: Optional[PositiveInt] = None
    rotary_pct: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    rotary_emb_base: Optional[PositiveFloat] = None
    parallel_residual: Optional[bool] = None
    norm_eps: Optional[PositiveFloat] = None
    dropout: Optional[Annotated[float, Field(ge=0, lt=1)]] = None
    # Composing a decoder from the shared blocks: "Pythia with RMSNorm and SwiGLU" is two lines of YAML.
    n_kv_heads: Optional[PositiveInt] = None
    norm: Optional[Literal["layernorm", "rmsnorm"]] = None
    positions: Optional[Literal["rotary", "learned", "none"]] = None
    mlp: Optional[Literal["gelu", "swiglu"]] = None
    tie_embeddings: Optional[bool] = None
    attention_bias: Optional[bool] = None
    mlp_bias: Optional[bool] = None

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> "ModelConfig":
        if self.use_pretrained and not self.pretrained_path:
            raise ValueError("use_pretrained is true but model.pretrained_path is not set")
        return self

    def overrides(self) -> dict[str, Any]:
        """The architecture keys the run file sets, to apply on top of the preset."""
        skip = {"config", "type", "mode", "n_classes", "use_pretrained", "pretrained_path"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class DataSettings(Section):
    """`data.config:` the settings every task shares: where the data comes from, its tokenizer, rows and batches.

    Each task (rafale/tasks/) extends this class with its own settings; `data.pipeline` picks the task.
    """

    # Readable name of the prepared dataset (part of the cache folder's name).
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # A text file, a folder or glob of .txt/.jsonl/.json/.parquet files, a save_to_disk folder, a hub
    # dataset name, or "synthetic:<corpus>" for one of rafale's bundled corpora.
    dataset_path: str = Field(min_length=1)
    # A tokenizer.json, a folder holding one, or a hub name; unset: the pretrained model's folder when it has a
    # tokenizer.json, else one trained on the train split.
    tokenizer_path: Optional[str] = None
    # Readable name of the tokenizer (part of the cache folder's name).
    tokenizer_name: Optional[str] = None
    # Vocabulary size of a tokenizer trained on the fly.
    vocab_size: Annotated[int, Field(ge=256)] = 4096
    max_sequence_length: PositiveInt = 512
    num_processes: PositiveInt = 1
    # Documents tokenized and cut into rows at a time while building: the build's memory follows this (times
    # num_processes), not the corpus. The rows do not depend on it.
    build_shard_documents: PositiveInt = 4096
    # Global batch sizes: with several training processes each takes an equal share, so they must divide evenly.
    train_batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 16
    # Shuffle the documents once before the validation split is carved and tokens are concatenated.
    shuffle_dataset: bool = True
    # Shuffle the training rows every epoch.
    shuffle_train: bool = True
    # Used only when the source has no validation split of its own.
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    split_seed: int = 42
    # Size of a synthetic corpus (dataset_path "synthetic:...").
    synthetic_documents: PositiveInt = 20000
    synthetic_seed: int = 0
    # Input id written into padded positions; unset (or the original's -100): the tokenizer's pad or EOS token.
    pad_token_id: Optional[int] = None
    # Pad every batch to max_sequence_length rather than to its longest row.
    pad_inputs: bool = True
    # The column that holds token ids in the prepared dataset.
    input_id_key: str = "input_ids"
    # The original's flag: dataset_path already holds a dataset that rafale prepared.
    is_prepared: bool = False

    @field_validator("pad_token_id")
    @classmethod
    def _pad_token(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 0:
            return None
        return value


class TextSettings(DataSettings):
    """The settings of tasks that read one text column."""

    text_column: str = "text"


Settings = TypeVar("Settings", bound=DataSettings)


class DataConfig(Section, Generic[Settings]):
    """`data:` which task prepares the data and learns from it (rafale/tasks/), and that task's settings."""

    pipeline: str = "causal_lm"
    config: Settings

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, value: str) -> str:
        from rafale.tasks import ALIASES, TASKS

        return _choice(ALIASES.get(value, value), tuple(TASKS), "pipeline")


class LoggingConfig(Section):
    """`logging:` where metrics go besides the console."""

    # A console line that stays every this many batches; unset: on a terminal only the live progress line
    # (rewritten in place), elsewhere (a log file, CI) a line every log_seconds.
    log_interval: Optional[PositiveInt] = None
    log_seconds: PositiveFloat = 10.0
    use_file: bool = False
    use_tensorboard: bool = False
    use_wandb: bool = False
    use_mlflow: bool = False
    log_dir: str = "run_logs"

    @model_validator(mode="after")
    def _extras_installed(self) -> "LoggingConfig":
        """An optional logger's library is checked here, before any work, rather than when Composer needs it."""
        import importlib.util

        for key, (module, extra) in LOGGER_EXTRAS.items():
            if getattr(self, key) and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.{key}: needs {module}, which is not installed; "
                                 f"pip install \"rafale[{extra}]\"")
        return self


class TransformRule(BaseModel):
    """One rule of `transforms:` (rafale/transforms/): the modules it takes, its kind, and the kind's settings,
    which are checked against the model before any data is prepared."""

    model_config = ConfigDict(extra="allow")

    # A full-match regular expression over module names, or a short name: attention, mlp, all-linear.
    modules: str = Field(min_length=1)
    # "lora", ...; unset: the modules it takes stay as they are.
    kind: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


class RunFile(Section, Generic[Settings]):
    """A whole run file. `data.config` is validated by the settings class of the task that `data.pipeline` names."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig[Settings]
    # Rules that rewrite the built model before training, in order (LoRA adapters, ...).
    transforms: list[TransformRule] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # Where the run file lives; relative paths in it were resolved against this folder.
    source: Optional[Path] = Field(default=None, exclude=True)
    _task: Any = PrivateAttr(default=None)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "RunFile":
        """`RunFile.model_validate(raw)` validates `data.config` with the settings of the task the data names."""
        if cls is RunFile:
            return RunFile[_settings_class(obj)].model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: Union[str, bytes], **kwargs: Any) -> "RunFile":
        if cls is RunFile:
            import json

            return RunFile[_settings_class(json.loads(json_data))].model_validate_json(json_data, **kwargs)
        return super().model_validate_json(json_data, **kwargs)

    def at(self, key: str) -> str:
        """`run.yaml: key`, how an error names a key of this run file."""
        return f"{self.source}: {key}" if self.source else key

    @property
    def task(self):
        """The task (rafale/tasks/) that data.pipeline names: what turns this run's data into a loss. This run's
        own, made on first use."""
        from rafale.tasks import new_task

        if self._task is None or self._task.name != self.data.pipeline:
            self._task = new_task(self.data.pipeline)
        return self._task

    @model_validator(mode="after")
    def _model_fits_task(self) -> "RunFile":
        """The original's model.type and model.mode, where given, must say what the task says."""
        task, model = self.task, self.model
        if model.type is not None and model.type != task.model_kind:
            article = "an" if task.model_kind == "encoder" else "a"
            raise ValueError(f"model.type: {model.type!r}, but data.pipeline {self.data.pipeline!r} trains "
                             f"{article} {task.model_kind}; leave model.type out (the pipeline decides)")
        if model.mode is not None and model.mode != task.encoder_mode:
            wanted = f"needs model.mode {task.encoder_mode!r}" if task.encoder_mode else "takes no model.mode"
            raise ValueError(f"model.mode: {model.mode!r}, but data.pipeline {self.data.pipeline!r} {wanted}; "
                             f"leave model.mode out (the pipeline decides)")
        return self


def _settings_class(raw: Any) -> type[DataSettings]:
    """The settings class of the task a raw run file names (the shared one when it names none that exists)."""
    from rafale.tasks import ALIASES, TASKS

    data = raw.get("data") if isinstance(raw, dict) else None
    name = data.get("pipeline", "causal_lm") if isinstance(data, dict) else "causal_lm"
    task = TASKS.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    return task.Settings if task is not None else DataSettings


def _choice(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


def _looks_like_hub_name(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text))


def _resolve_path(text: Optional[str], base: Path, key: str, file: Path, hub_ok: bool) -> Optional[str]:
    """Make a run-file path absolute against the run file's folder; check that it exists.

    A name that does not exist locally but has the form `org/name` is kept as a hub name where hub_ok.
    """
    if text is None or text.startswith(SYNTHETIC_PREFIX):
        return text
    expanded = Path(os.path.expanduser(text))
    candidate = expanded if expanded.is_absolute() else base / expanded
    if candidate.exists() or glob.has_magic(str(candidate)) and glob.glob(str(candidate)):
        return str(candidate.resolve()) if candidate.exists() else str(candidate)
    if hub_ok and not expanded.is_absolute() and _looks_like_hub_name(text):
        return text
    raise ConfigError(f"{file}: {key}: no such file or folder: {candidate}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error rather than silently the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _format_error(file: Path, error: dict[str, Any], root: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{file}: {key}: unknown key" + _suggestion(error["loc"], root)
    if kind == "missing":
        return f"{file}: {key}: required key is missing"
    message = error["msg"]
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    # "or equal" first: the shorter patterns would match its start.
    message = re.sub(r"^Input should be greater than or equal to (\S+)", r"must be >= \1", message)
    message = re.sub(r"^Input should be less than or equal to (\S+)", r"must be <= \1", message)
    message = re.sub(r"^Input should be greater than (\S+)", r"must be > \1", message)
    message = re.sub(r"^Input should be less than (\S+)", r"must be < \1", message)
    if "input" in error and kind not in ("value_error",) and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    # A check across sections (the whole file's), or across a section's keys, names its keys itself.
    named = not key or message.startswith((f"{key}.", f"{key}:"))
    return f"{file}: {message}" if named else f"{file}: {key}: {message}"


def _suggestion(loc: tuple, root: type[BaseModel]) -> str:
    """`; did you mean 'max_lr'?` for a misspelt key, found among the keys valid at that place."""
    section: Any = root
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        section = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(section.model_fields)}"


def load_run_file(path: Union[str, Path]) -> RunFile:
    """Read, validate and resolve a run file; raise ConfigError with a one-line message on any mistake."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: run file not found")
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file}: not valid YAML: {where}{problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a text file (not UTF-8)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping with sections run, model and data, got {type(raw).__name__}")
    schema = RunFile[_settings_class(raw)]
    try:
        config = schema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(file, error.errors()[0], schema)) from None

    base = file.resolve().parent
    settings = config.data.config
    settings.dataset_path = _resolve_path(settings.dataset_path, base, "data.config.dataset_path", file, True)
    settings.tokenizer_path = _resolve_path(settings.tokenizer_path, base, "data.config.tokenizer_path", file, True)
    model = config.model
    model.pretrained_path = _resolve_path(model.pretrained_path, base, "model.pretrained_path", file, True)
    if model.use_pretrained and settings.tokenizer_path is None and not settings.is_prepared:
        # Fine-tuning reads text as the pretrained model did: with the tokenizer in its folder.
        bundled = Path(model.pretrained_path) / "tokenizer.json"
        if bundled.is_file():
            settings.tokenizer_path = str(bundled)
    try:
        config.task.check_settings(settings, f"{file}: data.config")
    except RafaleError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(str(file)) else f"{file}: {message}") from None
    if config.run.checkpoint_dir is not None:
        config.run.checkpoint_dir = str((base / os.path.expanduser(config.run.checkpoint_dir)).resolve())
    config.logging.log_dir = str((base / os.path.expanduser(config.logging.log_dir)).resolve())
    config.source = file.resolve()
    _check_batches_divide(config, file)
    return config


def _check_batches_divide(config: RunFile, file: Path) -> None:
    """Batch sizes are global: under a launcher (WORLD_SIZE set), every process takes an equal share of each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for key in ("train_batch_size", "eval_batch_size"):
        size = getattr(config.data.config, key)
        if size % world:
            raise ConfigError(
                f"{file}: data.config.{key}: {size} is a global batch size and must divide evenly among the "
                f"{world} processes"
            )


def cache_root() -> Path:
    """`~/.rafale_cache`, or `$RAFALE_CACHE_DIR`: data/, tokenizers/ and checkpoints/ live below it."""
    return Path(os.environ.get("RAFALE_CACHE_DIR") or Path.home() / ".rafale_cache").expanduser()
