"""Packed against padded batches for SFT, on the real length distribution of the Alpaca records
(`../shared/assets/corpora/alpaca/alpaca_5000.json`, tokenized by the GPT-NeoX tokenizer in
`../shared/assets/tokenizers/`; the bench says so and stops when they are absent).

    python bench/packing.py                  # CPU, the pythia-14m shape, 192 training records, rows of 512
    python bench/packing.py --records 384

The same records (the SFT task's own rows: the Alpaca prompt template, labels on the responses) train the same
model from the same weights in a plain loop, once in padded batches of 8 records (each padded to its batch's
longest) and once packed whole into rows of 512 (data/packing.py) in batches of as many rows as hold about as many
tokens. Real tokens per second count the records' tokens only. Peak memory is each contender's own process.
transformers' padding-free collator (`DataCollatorWithFlattening`) with its GPT-NeoX model runs the packed records
as one row with restarting positions, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"
RECORDS = ASSETS / "corpora" / "alpaca" / "alpaca_5000.json"
TOKENIZER = ASSETS / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
ROW = 512


def sft_rows(count: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(input ids, labels) of the first `count` Alpaca records that fit a row, as the SFT task makes them; EOS."""
    from tokenizers import Tokenizer

    from rafale.data import formats
    from rafale.tasks.sft import tokenized

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    eos = tokenizer.token_to_id("<|endoftext|>")
    settings = formats.FormatSettings(format="alpaca", eos_token="<|endoftext|>")
    ids, labels = [], []
    for where, record in formats.read_records(RECORDS):
        row_ids, row_labels = tokenized(formats.to_segments(record, where, settings, "alpaca"), tokenizer, eos)
        if len(row_ids) <= ROW:
            ids.append(row_ids)
            labels.append(row_labels)
        if len(ids) == count:
            break
    return ids, labels, eos


def batches(mode: str, count: int) -> list[dict]:
    from rafale.data.collate import pad_rows
    from rafale.data.packing import packed_rows

    ids, labels, eos = sft_rows(count)
    if mode == "padded":
        rows = [{"input_ids": row, "labels": row_labels} for row, row_labels in zip(ids, labels)]
        return [pad_rows(rows[start:start + 8], eos, ROW, pad_to_max=False, label_key="labels")
                for start in range(0, len(rows), 8)]
    packed = packed_rows(ids, ROW, labels)
    rows = [{"input_ids": row, "labels": row_labels, "document_ids": documents}
            for row, row_labels, documents in zip(packed["input_ids"], packed["labels"], packed["document_ids"])]
    per_batch = max(1, round(8 * statistics.mean(len(i) for i in ids) / ROW))
    return [pad_rows(rows[start:start + per_batch], eos, ROW, pad_to_max=False, label_key="labels")
            for start in range(0, len(rows), per_batch)]


def rafale_step():
    from rafale.models import build_model
    from rafale.tasks import new_task
    from rafale.tasks.model import TaskModel

    torch.manual_seed(0)
    model = build_model("pythia14m")
    wrapped = TaskModel(new_task("sft"), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        wrapped(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def transformers_step():
    """transformers' GPT-NeoX of the same shape, fed as DataCollatorWithFlattening feeds it: the batch's records
    in one row, positions restarting at each, labels -100 at each record's first token."""
    import transformers

    from rafale.models import build_model
    from rafale.models.weights import save_pretrained

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(build_model("pythia14m"), folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = transformers.DataCollatorWithFlattening(return_position_ids=True)

    def step(batch: dict) -> None:
        features = [{"input_ids": row[mask.bool()].tolist(), "labels": labels[mask.bool()].tolist()}
                    for row, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
        flat = collator(features)
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


CONTENDERS = {"rafale padded": ("padded", rafale_step), "rafale packed": ("packed", rafale_step),
              "transformers flattened": ("padded", transformers_step)}


def peak_memory(name: str, count: int) -> float:
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]\n"
            f"from packing import CONTENDERS, batches\n"
            f"mode, make = CONTENDERS[{name!r}]\n"
            f"step = make()\n"
            f"[step(b) for b in batches(mode, {count})[:6]]\n"
            f"print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (RECORDS.is_file() and TOKENIZER.is_file()):
        print(f"skipped: needs {RECORDS} and {TOKENIZER} (../shared/assets)")
        return
    data = {mode: batches(mode, args.records) for mode in ("padded", "packed")}
    real = sum(int(b["attention_mask"].sum()) for b in data["padded"])
    assert real == sum(int(b["attention_mask"].sum()) for b in data["packed"])
    steps = {name: make() for name, (_, make) in CONTENDERS.items()}
    speeds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name, (mode, _) in CONTENDERS.items():
            start = time.perf_counter()
            for batch in data[mode]:
                steps[name](batch)
            speeds[name].append(real / (time.perf_counter() - start))
    slots = {mode: sum(b["input_ids"].numel() for b in data[mode]) for mode in data}
    figures, ratios, rows = {"real_tokens": real, "records": args.records}, {}, []
    reference = statistics.median(speeds["rafale padded"])
    for name, (mode, _) in CONTENDERS.items():
        tokens = statistics.median(speeds[name])
        memory = peak_memory(name, args.records)
        figures[name] = {"real_tokens_per_s": tokens, "peak_memory_gb": memory, "batches": len(data[mode])}
        ratios[f"{name} vs rafale padded"] = tokens / reference
        rows.append((name, f"{tokens:7,.0f} real tok/s ({tokens / reference:.2f}x padded)  peak {memory:.2f} GB"))
    used = {mode: f"{100 * real / slots[mode]:.1f}%" for mode in slots}
    rows.append(("slots used", f"padded {used['padded']}, packed {used['packed']}"))
    print_table(f"SFT on {args.records} Alpaca records ({real:,} tokens), pythia-14m shape, rows of {ROW}, CPU fp32",
                rows)
    path = write_results("packing_cpu", figures, ratios, notes=json.dumps({"row": ROW}))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
