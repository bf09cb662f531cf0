"""What every benchmark shares: the machine's description, timing helpers, and writing results.

Each benchmark prints a short table and writes bench/results/NAME.json: the machine, torch version, device,
command, figures, and each figure's ratio to its reference. bench/RESULTS.md keeps the tables by hand.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_results(name: str, figures: dict, ratios: dict, notes: str = "") -> Path:
    RESULTS.mkdir(exist_ok=True)
    record = {
        **machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "figures": {**figures, **ratios},
        "ratios": ratios,
        "notes": notes,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n{title}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
