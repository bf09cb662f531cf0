"""Optimizers side by side: the bundled default run (test/pythia_tinystories.yaml) at the same token budget with each
optimizer of `run.optimizer`, at its documented learning rate.

    python bench/optimizers.py                  # 30 batches (246k tokens) each, ~20 minutes on a shared 2-core CPU
    python bench/optimizers.py --batches 40     # a quicker look

Each optimizer trains in a process of its own (its peak resident memory is its own) one after the other, and reports
its final eval loss and training-loss curve. The time per step is measured apart, in interleaved rounds in one process
(each optimizer takes a few steps on the same batch in turn), so the machine's drift hits every optimizer alike; it
is reported as a ratio to AdamW's. The table goes to bench/results/optimizers_cpu.json, the curves to
media/optimizers.png (matplotlib, a bench-only dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "test" / "pythia_tinystories.yaml"
# name: (max_lr, optimizer_args, where the learning rate comes from). Each at the learning rate its authors or its
# library document; Muon's companion AdamW at the bundled run's AdamW rate.
CONTENDERS = {
    "adamw": (3e-3, {}, "the bundled run's"),
    "schedulefree_adamw": (2.5e-3, {}, "schedulefree's default"),
    "soap": (3e-3, {}, "pytorch-optimizer's default (the SOAP paper's)"),
    "muon": (0.02, {"adamw_lr": 3e-3}, "pytorch-optimizer's default; AdamW companion at 3e-3"),
    "lion": (3e-4, {}, "the Lion paper: AdamW's / 10"),
    "adopt": (1e-3, {}, "pytorch-optimizer's default"),
}


def run_file(name: str, batches: int, folder: Path) -> Path:
    """The bundled run with optimizer `name` for `batches` batches, evaluated once at the end, no checkpoints."""
    raw = yaml.safe_load(RUN_FILE.read_text())
    max_lr, arguments, _ = CONTENDERS[name]
    raw["run"].update(name=f"bench-{name}", optimizer=name, optimizer_args=arguments, max_lr=max_lr,
                      max_duration=f"{batches}ba", eval_interval=f"{batches}ba", save_interval=f"{batches}ba")
    if name == "schedulefree_adamw":
        raw["run"]["schedule"] = "constant-warmup"  # its own averaging replaces the decay
    raw["data"]["config"]["dataset_path"] = "synthetic:stories"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_one(path: Path, out: Path) -> None:
    """One optimizer's run (in its own process): losses, final eval loss, optimizer state size, peak memory."""
    from composer import Trainer
    from composer.utils import reproducibility

    from rafale.callbacks import ConsoleProgress, LossHistory
    from rafale.config import load_run_file
    from rafale.data import build_dataloaders
    from rafale.train import build_language_model, prepared_data, trainer_arguments

    config = load_run_file(path)
    reproducibility.seed_all(config.run.seed)
    prepared = prepared_data(config)
    train_loader, eval_loader = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
    model = build_language_model(config, prepared)
    progress, history = ConsoleProgress(25, config.task.metric_names), LossHistory()
    trainer = Trainer(**trainer_arguments(config, model, train_loader, eval_loader, config.run.max_duration,
                                          loggers=[progress], callbacks=[history], checkpoints=None))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    optimizer = trainer.state.optimizers[0]
    state_bytes = sum(tensor.numel() * tensor.element_size() for state in optimizer.state.values()
                      for value in state.values() for tensor in (value if isinstance(value, list) else [value])
                      if isinstance(tensor, torch.Tensor))  # SOAP keeps lists of preconditioner matrices
    trainer.close()
    out.write_text(json.dumps({
        "losses": history.losses,
        "eval_loss": progress.eval_metrics["LanguageCrossEntropy"],
        "fit_seconds": seconds,
        "optimizer_state_mb": state_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def step_times(paths: dict[str, Path], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, optimizer step) of each optimizer, on the same batch,
    in interleaved rounds."""
    from composer.utils import reproducibility

    from rafale.config import load_run_file
    from rafale.data import build_dataloaders
    from rafale.optim import build_optimizer
    from rafale.train import build_language_model, prepared_data

    contenders = {}
    for name, path in paths.items():
        config = load_run_file(path)
        reproducibility.seed_all(config.run.seed)
        prepared = prepared_data(config)
        loader, _ = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
        batch = next(iter(loader))
        model = build_language_model(config, prepared)
        optimizer = build_optimizer(config, model)
        contenders[name] = (config.task, model, optimizer, batch)

    def step(task, model, optimizer, batch) -> None:
        task.train_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {name: [] for name in contenders}
    for contender in contenders.values():
        step(*contender)  # the optimizer's state is made on its first step
    for _ in range(rounds):
        for name, contender in contenders.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(*contender)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def plot(results: dict[str, dict], path: Path, batches: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    window = 10
    for name, result in results.items():
        losses = result["losses"]
        smoothed = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        axis.plot(range(1, len(losses) + 1), smoothed, label=f"{name} (eval {result['eval_loss']:.3f})")
    axis.set_xlabel("batch (32 x 256 tokens)")
    axis.set_ylabel(f"training loss ({window}-batch mean)")
    axis.set_title(f"pythia14m on the synthetic stories, {batches} batches, each optimizer at its documented lr")
    axis.set_ylim(top=min(8.5, axis.get_ylim()[1]))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step-time measurement")
    parser.add_argument("--steps", type=int, default=1, help="steps per optimizer per round")
    parser.add_argument("--plot", type=Path, default=ROOT / "media" / "optimizers.png")
    parser.add_argument("--one", nargs=2, metavar=("RUN_FILE", "OUT"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        train_one(Path(arguments.one[0]), Path(arguments.one[1]))
        return

    folder = Path(tempfile.mkdtemp(prefix="rafale-bench-optimizers-"))
    environment = {**os.environ, "RAFALE_CACHE_DIR": str(folder / "cache"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ["RAFALE_CACHE_DIR"] = environment["RAFALE_CACHE_DIR"]
    paths = {name: run_file(name, arguments.batches, folder) for name in CONTENDERS}
    results = {}
    for name, path in paths.items():
        out = folder / f"{name}.json"
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--one", str(path), str(out)], env=environment, check=True)
        results[name] = json.loads(out.read_text())
    print("== step times, interleaved", flush=True)
    seconds = step_times(paths, arguments.rounds, arguments.steps)

    rows, figures, ratios = [], {}, {}
    for name, result in results.items():
        ratio = seconds[name] / seconds["adamw"]
        figures[name] = {"max_lr": CONTENDERS[name][0], "optimizer_args": CONTENDERS[name][1],
                         "eval_loss": round(result["eval_loss"], 4), "seconds_per_step": round(seconds[name], 4),
                         "optimizer_state_mb": round(result["optimizer_state_mb"], 1),
                         "peak_rss_mb": round(result["peak_rss_mb"]), "fit_seconds": round(result["fit_seconds"], 1)}
        ratios[f"{name}_step_time_vs_adamw"] = round(ratio, 3)
        rows.append((name, f"eval loss {result['eval_loss']:.4f}  step {seconds[name]:.3f}s ({ratio:.2f}x AdamW)  "
                           f"state {result['optimizer_state_mb']:.1f} MB  peak RSS {result['peak_rss_mb']:.0f} MB"))
    print_table(f"{arguments.batches} batches of the bundled run", rows)
    plot(results, arguments.plot, arguments.batches)
    print(f"\ncurves: {arguments.plot}")
    print(f"results: {write_results('optimizers_cpu', figures, ratios, notes='machine shared with other jobs')}")


if __name__ == "__main__":
    main()
