"""What a run shows and keeps of itself: the console's progress, `metrics.jsonl`, the loss history.

- `ConsoleProgress` prints the run as it goes. On a terminal, one line rewritten in place (batch, loss, learning
  rate, tokens per second, elapsed time and the time left); lines that stay are each evaluation's and, where
  `logging.log_interval` is set, one every that many batches. Elsewhere (a log file, CI) the line is printed, not
  rewritten: every `log_interval` batches where it is set, else every `logging.log_seconds`, and at the first and
  the last batch.
- `MetricsFile` appends one JSON object per batch to the run's `metrics.jsonl` (loss, learning rate, throughput,
  the evaluation's metrics at the batches that evaluate), flushed as it goes. A resumed run first cuts the file back
  to the checkpoint it resumes from, so the file reads as one history whatever was killed when.
- `LossHistory` keeps every batch's loss for DEBUG=1's verdict.

Only rank 0 prints and writes; every rank computes the same figures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from composer import Callback
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

METRICS_FILE = "metrics.jsonl"
# The terminal's live line is rewritten at most this often (a fast GPU run would otherwise spend time printing).
LIVE_SECONDS = 0.2
# Composer's names of what the console and metrics.jsonl show.
TRAIN_LOSS, SPEED, MFU = "loss/train/total", "throughput/tokens_per_sec", "throughput/device/mfu"
TRAIN_PREFIX, EVAL_PREFIX = "metrics/train/", "metrics/eval/"


def duration_text(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def learning_rate(state: State) -> float:
    """run.max_lr as scheduled: the largest group's (layer-wise decay and Muon's companion take less)."""
    return max(group["lr"] for group in state.optimizers[0].param_groups)


class ConsoleProgress(LoggerDestination):
    """The console's view of training: the progress line and one line per evaluation, which it keeps in
    `eval_metrics`; `metric_names` says how the console names the task's metrics.

    `interval`: a line that stays every this many batches (None: only the live line on a terminal, and a line
    every `seconds` elsewhere)."""

    def __init__(self, interval: Optional[int], metric_names: Optional[dict[str, str]] = None,
                 label: Optional[str] = None, train_metrics: Optional[Callable[[], dict[str, float]]] = None,
                 seconds: float = 10.0, stream: Optional[TextIO] = None):
        self.interval = interval
        self.seconds = seconds
        self.metric_names = metric_names or {}
        # The task's metrics of each training batch (a preference run's rewards), logged and shown with the loss.
        self.train_metrics = train_metrics
        # What an evaluation's line is called; unset: "eval at batch N".
        self.label = label
        self.stream = stream
        self.latest: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._started = self._printed = 0.0
        self._start_fraction = 0.0
        self._live = False  # a rewritten line is on the terminal, not yet ended

    @property
    def _out(self) -> TextIO:
        # Looked up when printing, so that a captured sys.stdout (pytest's capsys) is the one written to.
        return self.stream or sys.stdout

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self.latest.update(metrics)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._started = self._printed = time.monotonic()
        self._start_fraction = float(state.get_elapsed_duration() or 0.0)

    def batch_end(self, state: State, logger: Logger) -> None:
        task_metrics = self.train_metrics() if self.train_metrics is not None else {}
        if task_metrics:
            logger.log_metrics({f"{TRAIN_PREFIX}{name}": value for name, value in task_metrics.items()})
        if dist.get_global_rank() != 0:
            return
        batch, now = int(state.timestamp.batch), time.monotonic()
        last = state.get_elapsed_duration() >= 1
        kept = self.interval is not None and batch % self.interval == 0
        if self._out.isatty():
            if kept or last:
                self._print(self.line(state, task_metrics, now))
            elif now - self._printed >= LIVE_SECONDS:
                self._rewrite(self.line(state, task_metrics, now))
            else:
                return
        elif kept or last or batch == 1 or (self.interval is None and now - self._printed >= self.seconds):
            self._print(self.line(state, task_metrics, now))
        else:
            return
        self._printed = now

    def line(self, state: State, task_metrics: dict[str, float], now: float) -> str:
        """[batch 120/300] loss 2.3456  lr 1.20e-03  12,345 tok/s  1:02 elapsed, 1:33 left."""
        batch, total = int(state.timestamp.batch), state.max_duration
        done = float(state.get_elapsed_duration())
        where = f"{batch}/{total.value}" if total.unit.value == "ba" else f"{batch}, {done:.0%}"
        # SpeedMonitor's window up to this batch (Composer runs callbacks before loggers).
        speed = self.latest.get(SPEED)
        speed_text = f"  {speed:,.0f} tok/s" if speed else ""
        mfu = self.latest.get(MFU)
        mfu_text = f"  MFU {100 * mfu:.1f}%" if mfu else ""
        # Composer's total loss is averaged over every rank's share of the batch; state.loss is this rank's alone.
        loss = state.total_loss_dict[TRAIN_LOSS]
        task_text = "".join(f"  {name} {value:.4f}" for name, value in task_metrics.items())
        elapsed = now - self._started
        # The time left at this session's pace so far, evaluations included; a resumed run counts from its resume.
        pace = (done - self._start_fraction) / elapsed if elapsed > 0 else 0.0
        left = f", {duration_text((1 - done) / pace)} left" if pace > 0 and done < 1 else ""
        return (f"[batch {where}] loss {loss:.4f}{task_text}  lr {learning_rate(state):.2e}{speed_text}{mfu_text}"
                f"  {duration_text(elapsed)} elapsed{left}")

    def _rewrite(self, text: str) -> None:
        # \r and clearing to the end of the line: the same line, however much shorter than the last one.
        self._out.write(f"\r{text}\x1b[K")
        self._out.flush()
        self._live = True

    def _print(self, text: str) -> None:
        self._out.write(f"\r{text}\x1b[K\n" if self._live else f"{text}\n")
        self._out.flush()
        self._live = False

    def eval_end(self, state: State, logger: Logger) -> None:
        # Every rank computes (the metrics sync across ranks); the line and `eval_metrics` are the same on each.
        self.eval_metrics = {name: float(metric.compute()) for name, metric in state.eval_metrics["eval"].items()}
        scores = "  ".join(f"{self.metric_names.get(name, name)} {value:.4f}"
                           for name, value in self.eval_metrics.items())
        if dist.get_global_rank() == 0:
            self._print(f"[{self.label or f'eval at batch {int(state.timestamp.batch)}'}] {scores}")

    def fit_end(self, state: State, logger: Logger) -> None:
        self._end_live_line()

    def close(self, state: State, logger: Logger) -> None:
        self._end_live_line()

    def _end_live_line(self) -> None:
        """What follows starts on a line of its own; the live line stays as the last view of training."""
        if self._live:
            self._out.write("\n")
            self._out.flush()
            self._live = False


class MetricsFile(LoggerDestination):
    """`metrics.jsonl`: one JSON object a line for each batch (and one for an evaluation before training, batch 0):
    batch, epoch, tokens, samples, seconds of training, train/loss, the task's train/ metrics, lr, tokens_per_sec
    (once SpeedMonitor's window is full), mfu (where known), and eval/<metric> at the batches that evaluate, named
    as the console names them.

    Each line is written whole and flushed before the batch's checkpoint is saved, by `writer`, a callback to list
    before the checkpoint saver (Composer runs the callbacks in order, and the loggers only after them). When a run
    resumes, the lines of batches after its checkpoint, written before the kill, are cut off, and so is a last line
    cut short by the kill, so that the batch column only increases."""

    def __init__(self, path: Path, metric_names: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.metric_names = metric_names or {}
        self._pending: dict[str, float] = {}
        self._file: Optional[TextIO] = None
        self._written_batch: Optional[int] = None  # the batch of the last line written
        self.writer = _BatchLineWriter(self)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        for name, value in metrics.items():
            number = _finite_number(value)
            if number is not None:
                self._pending[name] = number

    def after_load(self, state: State, logger: Logger) -> None:
        """Autoresume has loaded its checkpoint (or found none): the file is cut back to that batch."""
        if dist.get_global_rank() != 0:
            return
        resumed = int(state.timestamp.batch)
        # A run that starts from nothing starts the file anew: its batch-0 evaluation is written again.
        keep_batches_up_to = resumed if resumed else -1
        truncate_history(self.path, keep_batches_up_to)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._pending.clear()
        self._written_batch = resumed if resumed else None

    def eval_end(self, state: State, logger: Logger) -> None:
        # Composer also evaluates at FIT_END, after the last batch's line, when eval_interval does not divide the
        # run: that evaluation joins the last line.
        if self._file is None or int(state.timestamp.batch) != self._written_batch:
            return
        metrics, self._pending = self._pending, {}
        self._file.close()
        add_to_last_row(self.path, self._eval_columns(metrics))
        self._file = open(self.path, "a", encoding="utf-8")

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        self._write(state, {})

    def _eval_columns(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"eval/{self.metric_names.get(name[len(EVAL_PREFIX):], name[len(EVAL_PREFIX):])}": value
                for name, value in metrics.items() if name.startswith(EVAL_PREFIX)}

    def write_batch(self, state: State) -> None:
        self._write(state, {"lr": learning_rate(state)})

    def _write(self, state: State, extra: dict[str, float]) -> None:
        metrics, self._pending = self._pending, {}
        if self._file is None:
            return
        timestamp = state.timestamp
        row: dict[str, Any] = {"batch": int(timestamp.batch), "epoch": int(timestamp.epoch),
                               "tokens": int(timestamp.token), "samples": int(timestamp.sample),
                               "seconds": round(timestamp.total_wct.total_seconds(), 3)}
        if TRAIN_LOSS in metrics:
            row["train/loss"] = metrics[TRAIN_LOSS]
        for name, value in metrics.items():
            if name.startswith(TRAIN_PREFIX):
                row[f"train/{name[len(TRAIN_PREFIX):]}"] = value
        row.update(extra)
        if SPEED in metrics:
            row["tokens_per_sec"] = metrics[SPEED]
        if metrics.get(MFU):
            row["mfu"] = metrics[MFU]
        row.update(self._eval_columns(metrics))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._written_batch = row["batch"]

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _BatchLineWriter(Callback):
    """Writes a MetricsFile's line of each batch at BATCH_CHECKPOINT: after the batch's evaluation (Composer
    evaluates between BATCH_END and BATCH_CHECKPOINT) and, listed before the checkpoint saver, before its checkpoint."""

    def __init__(self, history: MetricsFile):
        self.history = history

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.history.write_batch(state)


def _finite_number(value: Any) -> Optional[float]:
    """A logged value as a float (Composer logs floats and one-element tensors); None for anything else, NaN and
    infinities included (JSON has no spelling for them)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short (a killed writer) is left out."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


def truncate_history(path: Path, last_batch: int) -> None:
    """Cut a metrics.jsonl back to its rows of batches up to `last_batch` (and a torn last line off), by writing
    the rows kept under a temporary name and renaming it over the file."""
    if not path.exists():
        return
    try:
        rows = read_history(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        rows = []  # not a history this run wrote: it starts anew
    kept = [row for row in rows if isinstance(row, dict) and isinstance(row.get("batch"), int)
            and row["batch"] <= last_batch]
    if kept == rows and path.read_bytes().endswith(b"\n"):
        return
    partial = path.with_name(f".partial-{os.getpid()}.{path.name}")
    partial.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(partial, path)


def add_to_last_row(path: Path, figures: dict[str, float]) -> None:
    """Merge `figures` into the last row of a metrics.jsonl (the end of training), rewriting the file under a
    temporary name; doing it again (a finished run rerun) overwrites the same keys."""
    rows = read_history(path) if path.exists() else []
    if not rows:
        return
    rows[-1].update(figures)
    partial = path.with_name(f".partial-{os.getpid()}.{path.name}")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)


class LossHistory(Callback):
    """Keeps the training loss of every batch; with `stop_below`, ends training once the loss has fallen to that
    fraction of the first (DEBUG=1's verdict)."""

    def __init__(self, stop_below: Optional[float] = None):
        self.losses: list[float] = []
        self.stop_below = stop_below

    def batch_end(self, state: State, logger: Logger) -> None:
        # The whole batch's loss, averaged over every rank's share (state.loss is this rank's alone).
        self.losses.append(float(state.total_loss_dict[TRAIN_LOSS]))
        if self.stop_below is not None and self.losses[-1] <= self.stop_below * self.losses[0]:
            state.stop_training()
