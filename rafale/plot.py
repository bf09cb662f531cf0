"""Pictures of runs from their `metrics.jsonl` (rafale/callbacks.py writes it): the PNG at the end of every run and
`rafale plot`, which overlays runs to compare experiments.

matplotlib is an optional install (`pip install "rafale[plot]"`); a run without it finishes all the same and says
how to get its picture. Nothing here imports Composer or torch, so that `rafale plot` starts quickly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from rafale.errors import RafaleError

PLOT_FILE = "metrics.png"
INSTALL = 'pip install "rafale[plot]"'
# The panels of a run's picture: "loss" is the training loss with the evaluation's loss (a task's eval metric named
# "loss" or "cross-entropy"), any other name a column of metrics.jsonl.
DEFAULT_PANELS = ("loss", "lr")
EVAL_LOSSES = ("eval/loss", "eval/cross-entropy")
X_AXES = {"batch": "batch", "tokens": "tokens", "seconds": "seconds of training"}
# A training loss of many batches is also drawn as a centred moving average over about 2% of them (at most 51
# batches), which follows a falling curve without lagging behind it.
SMOOTHING_FRACTION, MAX_SMOOTHING, MIN_SMOOTHING = 0.02, 51, 5


def metrics_path(run: str) -> Path:
    """RUN as `rafale plot` takes it: a metrics.jsonl file, a run's folder, or a run name under the cache's
    checkpoints folder."""
    from rafale.config import cache_root

    given = Path(run).expanduser()
    runs = cache_root() / "checkpoints"
    for candidate in (given, given / "metrics.jsonl", runs / run / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    names = sorted(path.parent.name for path in runs.glob("*/metrics.jsonl"))
    known = f"; runs in {runs}: {', '.join(names)}" if names else f"; {runs} holds no run with one"
    raise RafaleError(f"{run}: no metrics.jsonl here: not a metrics file, a run's folder or a run name{known}")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, in order; a last line cut short by a killed writer is left out."""
    import json

    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.endswith("\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RafaleError(f"{path}: line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise RafaleError(f"{path}: line {number}: not a JSON object")
            rows.append(row)
    return rows


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    points = [(row[x_key], row[key]) for row in rows if isinstance(row.get(key), (int, float))
              and isinstance(row.get(x_key), (int, float))]
    return [x for x, _ in points], [y for _, y in points]


def centred_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value's window (an odd number of values centred on it, shorter at the ends)."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    half, count = window // 2, len(values)
    return [(sums[min(count, i + half + 1)] - sums[max(0, i - half)]) / (min(count, i + half + 1) - max(0, i - half))
            for i in range(count)]


def columns(rows: list[dict]) -> list[str]:
    """The metric columns of a history (what --metric can name)."""
    counters = {"batch", "epoch", "tokens", "samples", "seconds"}
    return sorted({key for row in rows for key in row if key not in counters})


def draw(runs: dict[str, list[dict]], out: Path, panels: tuple[str, ...] = DEFAULT_PANELS, x_key: str = "batch",
         title: Optional[str] = None) -> bool:
    """One picture of the runs' histories (label -> rows): a panel per metric, the runs overlaid, a colour each.
    Written under a temporary name and renamed. False, and nothing written, without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels) + 0.6), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, panel in zip(axes[:, 0], panels):
        for index, (label, rows) in enumerate(runs.items()):
            colour = colours[index % len(colours)]
            name = f"{label}: " if len(runs) > 1 else ""
            if panel == "loss":
                xs, ys = _series(rows, "train/loss", x_key)
                window = min(MAX_SMOOTHING, int(SMOOTHING_FRACTION * len(ys)) // 2 * 2 + 1)
                if window >= MIN_SMOOTHING:
                    axis.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                    axis.plot(xs, centred_mean(ys, window), color=colour,
                              label=f"{name}train loss ({window}-batch mean)")
                elif ys:
                    axis.plot(xs, ys, color=colour, label=f"{name}train loss")
                eval_key = next((key for key in EVAL_LOSSES if any(key in row for row in rows)), None)
                if eval_key is not None:
                    xs, ys = _series(rows, eval_key, x_key)
                    axis.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=4,
                              label=f"{name}{eval_key.replace('/', ' ')}")
                axis.set_ylabel("loss")
            else:
                xs, ys = _series(rows, panel, x_key)
                axis.plot(xs, ys, color=colour, marker="o" if len(ys) < 30 else None, markersize=4,
                          label=f"{name}{panel}")
                axis.set_ylabel("learning rate" if panel == "lr" else panel)
                if panel == "lr":
                    axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    axes[-1, 0].set_xlabel(X_AXES.get(x_key, x_key))
    if title:
        axes[0, 0].set_title(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".partial-{os.getpid()}.{out.name}")
    figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)
    os.replace(partial, out)
    return True


def draw_run(folder: Path, title: str) -> str:
    """The run's own picture, `metrics.png` beside its metrics.jsonl; returns the line the run prints about it."""
    history = folder / "metrics.jsonl"
    if not history.is_file():
        return ""
    out = folder / PLOT_FILE
    if not draw({title: load_rows(history)}, out, title=title):
        return f"no {PLOT_FILE}: plots need matplotlib; {INSTALL}"
    return f"curves drawn to {out}"


def plot_command(runs: list[str], out: Path, metrics: list[str], x_key: str) -> Path:
    """`rafale plot`: the runs' histories overlaid in one picture, one panel per metric."""
    if x_key not in X_AXES:
        raise RafaleError(f"--x: {x_key!r} is not one of {', '.join(X_AXES)}")
    if _pyplot() is None:
        raise RafaleError(f"rafale plot needs matplotlib; {INSTALL}")
    histories: dict[str, list[dict]] = {}
    for run in runs:
        path = metrics_path(run)
        label = path.parent.name if path.name == "metrics.jsonl" else path.stem
        while label in histories:
            label += "'"
        histories[label] = load_rows(path)
    panels = tuple(metrics) or DEFAULT_PANELS
    available = {name for rows in histories.values() for name in columns(rows)}
    for panel in panels:
        if panel != "loss" and panel not in available:
            raise RafaleError(f"--metric: no run has {panel!r}; columns: loss, {', '.join(sorted(available))}")
    draw(histories, out, panels, x_key)
    return out
