"""Datapipe speed: load + tokenize + concatenate + chunk + save of the bundled synthetic corpus scaled to 20M+ tokens
(written once to a .jsonl file, as real corpora come), with 1 and 2 processes, and the time to reload the cache.

    python bench/datapipe.py                       # 200,000 stories (about 20M tokens), fresh cache in a temp dir

A warm-up build trains (and caches) the tokenizer first, so the figures are the pipeline's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import print_table, write_results


def run_file(corpus: Path, processes: int):
    from rafale.config import RunFile

    settings = {"name": "bench", "dataset_path": str(corpus), "vocab_size": 4096, "max_sequence_length": 512,
                "num_processes": processes}
    return RunFile.model_validate({"run": {"name": "bench"}, "model": {"config": "pythia-tiny"},
                                   "data": {"config": settings}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        os.environ["RAFALE_CACHE_DIR"] = str(Path(work) / "cache")
        from rafale.data import prepare_data
        from rafale.data.synthetic import generate_stories

        corpus = Path(work) / "stories.jsonl"
        with corpus.open("w") as out:
            for story in generate_stories(args.documents, seed=0):
                out.write(json.dumps({"text": story}) + "\n")
        # Imports and the BPE training on this corpus (cached, shared by the builds below), out of the timings.
        # num_processes is not part of the cache key: each build below starts from an emptied data cache.
        shutil.rmtree(prepare_data(run_file(corpus, 1)).path)
        figures, rows = {}, []
        for processes in (1, 2):
            start = time.perf_counter()
            prepared = prepare_data(run_file(corpus, processes))
            elapsed = time.perf_counter() - start
            assert not prepared.reused
            tokens = sum(split["tokens"] for split in prepared.summary.values())
            figures[f"datapipe_tok_s_{processes}proc"] = tokens / elapsed
            speed = f"{elapsed:.1f} s, {tokens / elapsed:,.0f} tok/s"
            rows.append((f"{processes} process(es): {tokens:,} tokens", speed))
            if processes == 1:
                shutil.rmtree(prepared.path)
        start = time.perf_counter()
        reused = prepare_data(run_file(corpus, 2))
        figures["cache_reload_s"] = time.perf_counter() - start
        assert reused.reused
        rows.append(("reload a prepared cache", f"{figures['cache_reload_s']:.2f} s"))

    print_table(f"Datapipe, synthetic stories x {args.documents:,} from .jsonl, sequence 512", rows)
    print(f"wrote {write_results('datapipe', figures, {})}")


if __name__ == "__main__":
    main()
