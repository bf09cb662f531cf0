"""Reliability: checkpoints written atomically and loaded safely, a clean stop on a signal or a non-finite loss.

Composer does the saving, the resuming and the loop; these callbacks change only what a crash could cost:

- `AtomicCheckpointSaver` writes each checkpoint under a temporary name, syncs it to disk and renames it, then
  re-points `latest-rank0.pt` by renaming a new symlink over it. A process killed (or a disk filled) at any moment
  leaves `latest` pointing at a whole checkpoint, which is the only one autoresume reads.
- `check_resumed_settings`, before any data is prepared: a run that resumes must be the run its checkpoints come
  from. The first start writes the run file's settings beside the checkpoints; a resume with other settings (another
  learning rate, other data, another loss) is refused, since its steps would continue another run's optimizer and
  schedule on what this run file describes. How long it runs and how it is watched, saved or placed may change.
- `SafeResume` looks at that checkpoint before Composer loads it: it must unpickle with `weights_only=True` (a
  pickle can run code), and its model must have this run's tensor names and shapes (a changed preset under the
  same `run.name`). Composer 0.32.1 calls `torch.load(weights_only=False)`; torch's documented override,
  `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, makes that load safe too.
- `StopOnSignal` turns Ctrl-C (SIGINT) or SIGTERM into a checkpoint at the end of the batch and a clean stop,
  then exits 128 + the signal's number with the command that resumes.
- `StopOnNonFiniteLoss` stops at the first NaN or infinite loss, exit 3, before anything is saved after it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import signal
from pathlib import Path
from typing import Any, Optional

import torch
from composer import Callback
from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint, dist

from rafale.config import RunFile
from rafale.errors import Interrupted, NonFiniteLoss, RafaleError
from rafale.optim import averaged_weights

# The run file's settings, as the run that wrote the checkpoints beside them had them.
RUN_SETTINGS = "run-settings.json"
# Settings a resumed run may change: how long it goes on, how it is watched, saved and placed. Every other one
# shapes what a step computes.
CHANGEABLE_ON_RESUME = ("run.name", "run.n_epochs", "run.max_duration", "run.eval_interval", "run.save_interval",
                        "run.save_num_checkpoints_to_keep", "run.device_bs", "run.device", "run.precision",
                        "run.compile", "run.parallelism", "run.checkpoint_dir", "run.debug_steps", "run.sample_prompts",
                        "run.sample_max_new_tokens", "data.config.num_processes", "data.config.build_shard_documents",
                        "data.config.eval_batch_size", "data.config.eval_examples", "data.config.sample_count",
                        "logging.")
# torch's switch that turns every torch.load into a weights_only load, whatever its caller asked for.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
PARTIAL = ".partial-"


def checkpoint_globals() -> list:
    """The plain-data types a Composer checkpoint holds besides tensors: times, the torch version, numpy's RNG state."""
    import numpy

    array = numpy.empty(0, dtype=numpy.uint32)
    # numpy's own array rebuilder and dtype class, wherever this numpy version keeps them.
    rebuild = array.__reduce__()[0]
    return [datetime.timedelta, torch.torch_version.TorchVersion, rebuild, numpy.ndarray, numpy.dtype,
            type(array.dtype)]


def load_checkpoint_safely(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Composer checkpoint read with `weights_only=True`: tensors and plain data only, or a one-line RafaleError."""
    import pickle

    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise RafaleError(f"{path}: refused: the checkpoint holds objects other than tensors and plain data "
                          f"(loading it could run code){': ' + found if found else ''}") from None
    except (RuntimeError, OSError, EOFError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RafaleError(f"{path}: not a readable checkpoint ({first_line}); point latest-rank0.pt at an earlier "
                          f"checkpoint beside it, or use a new run.name") from None


def _partial(path: Path) -> Path:
    """A temporary name beside `path`: dot-prefixed, so Composer's checkpoint-name patterns never match it, and
    ending as `path` does, since Composer picks the file's format (.pt, .tar, .pt.lz4, ...) from its suffixes."""
    return path.with_name(f"{PARTIAL}{os.getpid()}.{path.name}")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, except that no checkpoint and no `latest` symlink is ever seen half-written.

    `overwrite=True`: checkpoints that `latest` does not reach are leftovers of a run that died after writing them;
    the resumed run replaces them when it gets there, rather than refusing to start.
    """

    def __init__(self, folder: str, **kwargs: Any):
        super().__init__(folder=folder, overwrite=True, **kwargs)

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            # Temporary files of saves that a killed process never finished.
            for stale in Path(self.folder).glob(f"{PARTIAL}*"):
                stale.unlink(missing_ok=True)
        super().fit_start(state, logger)

    def save_now(self, state: State, logger: Logger) -> None:
        """Save at this batch unless it is already saved."""
        if self.last_checkpoint_batch != state.timestamp.batch:
            self._save_checkpoint(state, logger)

    def latest_checkpoint(self, state: State) -> Optional[Path]:
        """The checkpoint that `latest` points to (what autoresume would load), if there is one."""
        link = Path(self.latest_filename.format(state))
        return link.resolve() if link.exists() else None

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        # A schedule-free optimizer's checkpoint holds the averaged weights it evaluates with (rafale.optim).
        with averaged_weights(state.optimizers):
            self._save_checkpoint_atomically(state, logger)

    def _save_checkpoint_atomically(self, state: State, logger: Logger) -> None:
        if state.fsdp_sharded_state_dict_enabled or self.remote_file_name is not None:
            super()._save_checkpoint(state, logger)  # folders of shards, uploads: Composer's own way
            return
        self.last_checkpoint_batch = state.timestamp.batch
        final = Path(self.filename.format(state))
        # As Composer does: the checkpoint lists itself among the saved ones.
        self.all_saved_checkpoints_to_timestamp[str(final)] = state.timestamp
        partial = _partial(final)
        try:
            # Rank 0 writes the monolithic checkpoint; other ranks get None.
            written = checkpoint.save_checkpoint(state, str(partial), weights_only=self.weights_only,
                                                 ignore_keys=self.ignore_keys)
            if written:
                _fsync(partial)
        except (OSError, RuntimeError) as error:  # a full disk surfaces as either
            partial.unlink(missing_ok=True)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            kept = self.latest_checkpoint(state)
            raise RafaleError(f"{final}: could not write the checkpoint ({first_line}); "
                              f"{f'{kept.name} is kept' if kept else 'no earlier checkpoint'}; free some disk "
                              f"space (or fix what stopped the write) and rerun to resume") from None
        if not written:
            return
        os.replace(partial, final)
        if self.latest_filename is not None and self.num_checkpoints_to_keep != 0:
            link = Path(self.latest_filename.format(state))
            new_link = _partial(link)
            new_link.unlink(missing_ok=True)
            os.symlink(os.path.relpath(final, link.parent), new_link)
            os.replace(new_link, link)
        _fsync(final.parent)  # the renames themselves
        self.saved_checkpoints.append(str(final))
        if self.num_checkpoints_to_keep >= 0:
            self._rotate_checkpoints()


def check_resumed_settings(config: RunFile, folder: Path) -> None:
    """Refuse to resume the checkpoints in `folder` with settings other than those of the run that wrote them (one
    line naming what changed); on a first start, write this run's settings there for the next start to compare."""
    settings = _flat(config.model_dump(mode="json"))
    settings = {key: value for key, value in settings.items() if not key.startswith(CHANGEABLE_ON_RESUME)}
    saved_file = folder / RUN_SETTINGS
    if not (folder / "checkpoints" / "latest-rank0.pt").is_symlink():
        if dist.get_global_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            partial = _partial(saved_file)
            partial.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            partial.replace(saved_file)
        return
    if not saved_file.is_file():
        return  # checkpoints written before rafale kept the settings: nothing to compare with
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RafaleError(f"{saved_file}: unreadable ({error}); delete it to resume without comparing settings, or "
                          f"delete {folder} to start over") from None
    # Settings that only one side knows (rafale gained or lost one since) are not compared.
    changed = [f"{key}: {saved[key]} -> {settings[key]}" for key in sorted(saved.keys() & settings.keys())
               if saved[key] != settings[key]]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise RafaleError(f"{config.source}: run.name {config.run.name!r} has checkpoints of a run with other settings "
                          f"({'; '.join(changed[:3])}{more}); rerun with those settings to resume it, use a new "
                          f"run.name, or delete {folder} to start over")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"run": {"max_lr": 1}} -> {"run.max_lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class SafeResume(Callback):
    """Checks the checkpoint that autoresume is about to load, and makes Composer's own load a weights_only one."""

    def __init__(self, saver: AtomicCheckpointSaver, run_name: str, frozen: set[str] = frozenset()):
        self.saver = saver
        self.run_name = run_name
        # Parameters that checkpoints leave out (they do not train).
        self.frozen = frozen
        self._previous: Optional[str] = None

    def before_load(self, state: State, logger: Logger) -> None:
        link = Path(self.saver.latest_filename.format(state))
        if link.is_symlink() and not link.exists():
            raise RafaleError(f"{link}: points to {os.readlink(link)}, which is missing; point it at another "
                              f"checkpoint of {link.parent}, or delete {link.parent} to start over")
        if link.exists() and not state.fsdp_enabled:
            # Memory-mapped: the tensors are compared by shape, not read.
            path = link.resolve()
            saved = load_checkpoint_safely(path, mmap=True)
            if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
                raise RafaleError(f"{path}: not a Composer checkpoint (no training state in it)")
            self._check_model(path, saved["state"].get("model", {}), state.model.state_dict())
        self._previous = os.environ.get(FORCE_WEIGHTS_ONLY)
        os.environ[FORCE_WEIGHTS_ONLY] = "1"
        torch.serialization.add_safe_globals(checkpoint_globals())

    def after_load(self, state: State, logger: Logger) -> None:
        if self._previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = self._previous

    def _check_model(self, path: Path, saved: dict, ours: dict) -> None:
        advice = f"use a new run.name, or delete {path.parent.parent} to start over"
        where = f"{path}: run.name {self.run_name!r} already has checkpoints of another model"
        missing = [name for name in ours if name not in saved and name not in self.frozen]
        unexpected = [name for name in saved if name not in ours]
        if missing or unexpected:
            listed = [f"missing tensors: {', '.join(missing[:3])}"] if missing else []
            listed += [f"unexpected tensors: {', '.join(unexpected[:3])}"] if unexpected else []
            raise RafaleError(f"{where} ({'; '.join(listed)}); {advice}")
        for name, tensor in ours.items():
            if name in saved and tuple(saved[name].shape) != tuple(tensor.shape):
                raise RafaleError(f"{where} ({name}: {list(saved[name].shape)} in the checkpoint, "
                                  f"{list(tensor.shape)} in this run file); {advice}")


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the batch, save a checkpoint, stop, and exit 128 + the signal's number.

    A second signal falls through to the handler that was there before (Composer's: exit at once).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, saver: AtomicCheckpointSaver, run_file: Optional[Path]):
        self.saver = saver
        self.run_file = run_file
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            previous = self._previous.get(signum)
            if not callable(previous):
                raise KeyboardInterrupt
            previous(signum, frame)
            return
        self.received = signum
        # os.write, not print: a signal handler may run in the middle of a print.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this batch with a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def fit_start(self, state: State, logger: Logger) -> None:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = {}

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        received = self.received or 0
        if dist.get_world_size() > 1:
            # Every rank stops at the same batch, whichever received the signal.
            flag = state.device.tensor_to_device(torch.tensor([received]))
            dist.all_reduce(flag, reduce_operation="MAX")
            received = int(flag.item())
        if received:
            self.received = received
            # Saved before stop_training() shortens max_duration, so the schedule resumes as configured.
            self.saver.save_now(state, logger)
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._restore()
        if self.received:
            name = signal.Signals(self.received).name
            saved = self.saver.latest_checkpoint(state)
            command = f"rafale -c {shlex.quote(str(self.run_file))}" if self.run_file else "the same command"
            raise Interrupted(f"{name}: stopped at batch {int(state.timestamp.batch)}, checkpoint saved to {saved}; "
                              f"resume with: {command}", exit_code=128 + self.received)

    def close(self, state: State, logger: Logger) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StopOnNonFiniteLoss(Callback):
    """The first NaN or infinite training loss ends the run (exit 3) before any checkpoint is saved after it."""

    def __init__(self, saver: AtomicCheckpointSaver):
        self.saver = saver

    def batch_end(self, state: State, logger: Logger) -> None:
        # The loss averaged over ranks, so that every rank stops at the same batch.
        loss = state.total_loss_dict.get("loss/train/total", float(state.loss))
        if math.isfinite(loss):
            return
        kept = self.saver.latest_checkpoint(state)
        kept_text = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was saved before it"
        # A resumed run keeps its checkpoint's learning rates, so a change of settings needs a new run.
        raise NonFiniteLoss(f"the training loss is {loss} at batch {int(state.timestamp.batch)}; training stopped "
                            f"and {kept_text}; lower run.max_lr, warm up longer (run.warmup_pct) or clip gradients "
                            f"(run.clip_type), then train under a new run.name")


def checkpoint_callbacks(config: RunFile, folder: Path, frozen: tuple[str, ...] = ()) -> list[Callback]:
    """The saver of the run's checkpoints and the callbacks that guard them, in the order they must run.

    `frozen`: the model's parameters that do not train (a LoRA run's base), left out of the checkpoints: a resumed
    run rebuilds them as the first start did (from the pretrained folder, or the seed)."""
    frozen_keys = [f"model.{name}" for name in frozen]

    def drop_frozen(state_dict: dict) -> None:
        model = state_dict.get("state", {}).get("model")
        if isinstance(model, dict):
            for key in frozen_keys:
                model.pop(key, None)

    saver = AtomicCheckpointSaver(
        folder=str(folder),
        filename="ep{epoch}-ba{batch}-rank{rank}.pt",
        latest_filename="latest-rank{rank}.pt",
        # Checkpoints stay in the run's folder: nothing is uploaded.
        remote_file_name=None,
        save_interval=config.run.save_interval,
        num_checkpoints_to_keep=config.run.save_num_checkpoints_to_keep,
        ignore_keys=drop_frozen if frozen_keys else None,
    )
    # StopOnSignal last: it ends the run from fit_end, after every other callback's.
    return [saver, SafeResume(saver, config.run.name, set(frozen_keys)), StopOnNonFiniteLoss(saver),
            StopOnSignal(saver, config.source)]
