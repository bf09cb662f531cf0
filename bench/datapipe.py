"""Datapipe speed: tokenize + concatenate + chunk + save on the bundled synthetic corpus scaled to 20M+ tokens, with
1 and 2 processes, and the time to reload a prepared cache.

    python bench/datapipe.py                       # 200,000 stories (about 20M tokens), fresh cache in a temp dir

A warm-up build trains (and caches) the tokenizer first, so the figures are the pipeline's own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import print_table, write_results


def run_file(documents: int, processes: int, name: str = "bench"):
    from rafale.config import RunFile

    return RunFile.model_validate(
        {
            "run": {"name": "bench"},
            "model": {"config": "pythia-tiny"},
            "data": {
                "config": {
                    "name": f"{name}-{processes}proc",
                    "dataset_path": "synthetic:stories",
                    "synthetic_documents": documents,
                    "vocab_size": 4096,
                    "max_sequence_length": 512,
                    "num_processes": processes,
                }
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["RAFALE_CACHE_DIR"] = cache
        from rafale.data import prepare_data

        # Imports and the BPE training on this corpus (cached and shared by the runs below), out of the timings.
        shutil.rmtree(prepare_data(run_file(args.documents, 1, name="warm-up")).path)
        figures, rows = {}, []
        for processes in (1, 2):
            config = run_file(args.documents, processes)
            start = time.perf_counter()
            prepared = prepare_data(config)
            elapsed = time.perf_counter() - start
            tokens = sum(split["tokens"] for split in prepared.summary.values())
            figures[f"datapipe_tok_s_{processes}proc"] = tokens / elapsed
            rows.append(
                (f"{processes} process(es): {tokens:,} tokens", f"{elapsed:.1f} s, {tokens / elapsed:,.0f} tok/s")
            )
            if processes == 1:
                # The names differ per process count, so the second build is a real build too; drop the first's
                # data to keep the disk use of a 20M-token run to one copy.
                shutil.rmtree(prepared.path)
        start = time.perf_counter()
        reused = prepare_data(run_file(args.documents, 2))
        figures["cache_reload_s"] = time.perf_counter() - start
        assert reused.reused
        rows.append(("reload a prepared cache", f"{figures['cache_reload_s']:.2f} s"))

    print_table(f"Datapipe, synthetic stories x {args.documents:,}, sequence 512", rows)
    print(f"wrote {write_results('datapipe', figures, {})}")


if __name__ == "__main__":
    main()
