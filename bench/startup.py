"""Start-up: the wall time of `rafale --help` and of a `DATA=1` run that reuses its cache, as a user runs them.

python bench/startup.py            # best of 5 runs each, on the bundled default run file
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def best_wall_time(command: list[str], env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run_file = "test/pythia_tinystories.yaml"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "RAFALE_CACHE_DIR": cache, "DATA": "1"}
        subprocess.run(
            [sys.executable, "rafale/main", "-c", run_file], cwd=ROOT, env=env, check=True, capture_output=True
        )
        figures = {
            "help_s": best_wall_time([sys.executable, "-m", "rafale", "--help"], env, args.repeats),
            "data_cached_run_s": best_wall_time([sys.executable, "rafale/main", "-c", run_file], env, args.repeats),
        }
    print_table(
        "Start-up (best of %d)" % args.repeats,
        [
            ("rafale --help", f"{figures['help_s']:.2f} s"),
            (f"DATA=1, cache reused ({run_file})", f"{figures['data_cached_run_s']:.2f} s"),
        ],
    )
    print(f"wrote {write_results('startup', figures, {})}")


if __name__ == "__main__":
    main()
