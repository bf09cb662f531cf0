"""Datapipe end to end and its memory: `DATA=1 python rafale/main -c run.yaml` (load, tokenize, concatenate, chunk,
save) on .jsonl corpora of given sizes, with the GPT-NeoX tokenizer and 2 processes, each build in its own process
with a fresh cache; then the time to reload a prepared cache.

    python bench/datapipe.py                   # 100 MB and 1 GB of text
    python bench/datapipe.py --baseline DIR    # and the smallest build by another checkout, side by side

The text is rafale's synthetic stories (50,000 of them) repeated to size. Peak memory is the build's
main process: resident (VmHWM, file-backed pages of memory-mapped Arrow files included) and anonymous (RssAnon,
sampled every 20 ms: what the kernel cannot reclaim without swap). Time is wall time and, less
noisy on a shared machine, the CPU time of the build and its tokenizing processes. The tokenizing processes each hold
about one shard (`build_shard_documents`).

Right before each build, the tokenizer alone encodes the first 10 MB of the same corpus in batches of 1,000
documents (`encode_batch_fast`, its own threads on every core) in this process: each build's rate is also given as
a share of that tokenizer-only rate, which a shared machine's load moves about as much as the build's. The load
average at each build's start is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_results

REPO = Path(__file__).resolve().parents[1]
NEOX = REPO.parent / "shared" / "assets" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def write_corpus(path: Path, megabytes: int) -> None:
    from rafale.data.synthetic import generate_stories

    lines = [json.dumps({"text": story}) + "\n" for story in generate_stories(50_000, seed=0)]
    written, goal = 0, megabytes * 1_000_000
    with path.open("w") as out:
        while written < goal:
            for line in lines:
                out.write(line)
                written += len(line)
                if written >= goal:
                    break


def write_run_file(path: Path, corpus: Path, tokenizer: Path) -> None:
    path.write_text(json.dumps({"run": {"name": "bench"}, "model": {"config": "pythia14m"}, "data": {"config": {
        "name": "bench", "dataset_path": str(corpus), "tokenizer_path": str(tokenizer),
        "max_sequence_length": 512, "num_processes": 2}}}))


def status(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a process, in bytes (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmHWM", "RssAnon") if name in fields}


def tokenizer_rate(tokenizer_file: Path, corpus: Path, megabytes: int = 10) -> float:
    """Tokens per second of the tokenizer alone on the first `megabytes` of the corpus's documents."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts, size = [], 0
    with corpus.open() as lines:
        for line in lines:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= megabytes * 1_000_000:
                break
    start, tokens = time.perf_counter(), 0
    for first in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[first:first + 1000],
                                                                      add_special_tokens=False))
    return tokens / (time.perf_counter() - start)


def build(code: Path, run_file: Path, cache: Path) -> dict[str, float]:
    """One DATA=1 build by the checkout at `code`: its time, tokens, and main process's peak memory."""
    env = {**os.environ, "DATA": "1", "RAFALE_CACHE_DIR": str(cache), "PYTHONPATH": str(code)}
    # CPU time of the build and the processes it waited for: on a shared machine, less noisy than the wall time.
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(code / "rafale" / "main"), "-c", str(run_file)], cwd=code,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_resident = peak_anonymous = 0
    reported = start
    while process.poll() is None:
        now = status(process.pid)
        peak_resident = max(peak_resident, now.get("VmHWM", 0))
        peak_anonymous = max(peak_anonymous, now.get("RssAnon", 0))
        time.sleep(0.02)
        if time.perf_counter() - reported > 60:  # a long build says how far it has come
            reported = time.perf_counter()
            written = sum(file.stat().st_size for file in cache.rglob("*.arrow") if file.is_file())
            print(f"  ... {reported - start:.0f} s: {written / 1e9:.2f} GB of Arrow files in the cache so far, peak "
                  f"resident {peak_resident / 1e9:.2f} GB, anonymous {peak_anonymous / 1e9:.2f} GB", flush=True)
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"build by {code} failed:\n{output[-3000:]}")
    meta = json.loads(next((cache / "data").glob("*/meta.json")).read_text())
    tokens = sum(split["tokens"] for split in meta["summary"].values())
    return {"seconds": elapsed, "tokens": tokens, "tok_s": tokens / elapsed, "cpu_seconds": cpu_seconds,
            "tok_per_cpu_s": tokens / cpu_seconds, "resident_gb": peak_resident / 1e9,
            "anonymous_gb": peak_anonymous / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--baseline", type=Path, help="another checkout of rafale to build the same corpora with")
    parser.add_argument("--tokenizer", type=Path, default=NEOX, help="the GPT-NeoX tokenizer.json")
    args = parser.parse_args()
    if not args.tokenizer.is_file():
        raise SystemExit(f"needs the GPT-NeoX tokenizer at {args.tokenizer} (--tokenizer)")

    contenders = {"this checkout": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    figures, rows = {}, []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for megabytes in args.sizes_mb:
            corpus, run_file = work / f"text-{megabytes}mb.jsonl", work / f"run-{megabytes}mb.json"
            write_corpus(corpus, megabytes)
            write_run_file(run_file, corpus, args.tokenizer.resolve())
            # Contenders one after the other on the same corpus, each with a fresh cache. The baseline builds the
            # smallest corpus only: its memory grows with the corpus.
            for name, code in contenders.items():
                if name == "baseline" and megabytes != min(args.sizes_mb):
                    continue
                cache = work / f"cache-{name}-{megabytes}"
                load = os.getloadavg()[0]
                alone = tokenizer_rate(args.tokenizer, corpus)
                result = build(code, run_file, cache)
                result.update(tokenizer_tok_s=alone, share_of_tokenizer=result["tok_s"] / alone, load_average=load)
                prefix = f"{'baseline_' if name == 'baseline' else ''}{megabytes}mb"
                figures.update({f"{prefix}_{key}": value for key, value in result.items()})
                rows.append((f"{name}, {megabytes} MB of text: {result['tokens']:,} tokens",
                             f"{result['seconds']:.1f} s, {result['tok_s'] / 1e6:.2f}M tok/s "
                             f"({result['tok_per_cpu_s'] / 1e6:.2f}M per CPU second; "
                             f"{100 * result['share_of_tokenizer']:.0f}% of the tokenizer alone, "
                             f"{alone / 1e6:.2f}M tok/s; load {load:.1f}), peak resident "
                             f"{result['resident_gb']:.2f} GB, anonymous {result['anonymous_gb']:.2f} GB"))
                print("  ".join(rows[-1]), flush=True)  # the table comes at the end; each build as it ends
                if name == "this checkout" and megabytes == args.sizes_mb[-1]:
                    reload = build(code, run_file, cache)
                    figures["cache_reload_s"] = reload["seconds"]
                    rows.append(("DATA=1 reusing that prepared cache (whole command)", f"{reload['seconds']:.2f} s"))
                shutil.rmtree(cache)
            corpus.unlink()
    sizes = args.sizes_mb
    ratios = {}
    if len(sizes) > 1:
        for key in ("resident_gb", "anonymous_gb"):
            ratios[f"{key}_{sizes[-1]}mb_over_{sizes[0]}mb"] = (figures[f"{sizes[-1]}mb_{key}"]
                                                               / figures[f"{sizes[0]}mb_{key}"])
        rows.append((f"peak memory, {sizes[-1]} MB over {sizes[0]} MB",
                     ", ".join(f"{key.split('_')[0]} {value:.2f}x" for key, value in ratios.items())))
    print_table("Datapipe end to end, DATA=1, GPT-NeoX tokenizer, sequence 512, 2 processes", rows)
    print(f"wrote {write_results('datapipe', figures, ratios, notes='shared machine: other jobs ran alongside')}")


if __name__ == "__main__":
    main()
