"""Transforms against plain training, side by side on one model: LoRA fine-tuning against full fine-tuning
(trainable parameters, checkpoint size, peak memory, tokens per second), and simulated number formats against
float32 training (the slowdown).

    python bench/transforms.py                      # CPU, the pythia-14m shape at seq 256, two vocabularies
    python bench/transforms.py --steps 8 --rounds 3

Two vocabularies: pythia-14m's 50,304, where the embeddings and head are 92% of the parameters and the LM head
most of a step, and the 1,152 that the bundled corpus's tokenizer gives (what the shipped run files train), where
the blocks' linear layers, the ones the transforms change, are most of the work.

Every contender trains the same model from the same weights in the same plain loop (AdamW over the parameters
that train, rafale's fused loss), in interleaved rounds in one process. Peak memory is each contender's own: a
fresh process per contender reports its resident peak after a few steps.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = [{"modules": "all-linear", "kind": "lora", "r": 8, "alpha": 16}]
CONTENDERS = {
    "full": [],
    "lora_r8": LORA,
    "int8": [{"modules": "all-linear", "kind": "quantize",
              "weight": {"format": "int", "width": 8, "scaling": "channel"},
              "input": {"format": "int", "width": 8, "scaling": "channel"}}],
    "fp8_e4m3": [{"modules": "all-linear", "kind": "quantize",
                  "weight": {"format": "minifloat", "exponent_bits": 4, "mantissa_bits": 3},
                  "input": {"format": "minifloat", "exponent_bits": 4, "mantissa_bits": 3}}],
    "int4_group32": [{"modules": "all-linear", "kind": "quantize",
                      "weight": {"format": "int", "width": 4, "scaling": "group", "group_size": 32}}],
}


def contender(name: str, length: int, batch: int, vocab: int):
    """(model with the contender's transforms, its optimizer, a step function)."""
    from rafale import transforms
    from rafale.models import build_model
    from rafale.tasks import new_task
    from rafale.tasks.model import TaskModel

    torch.manual_seed(0)
    model = transforms.apply(build_model("pythia14m", {"vocab_size": vocab}), CONTENDERS[name], say=lambda _: None)
    wrapped = TaskModel(new_task("causal_lm"), model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    batch_data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> None:
        wrapped(batch_data).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def checkpoint_bytes(model, optimizer) -> int:
    """What a rafale checkpoint holds of the model and optimizer: the parameters that train and their state."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    buffer = io.BytesIO()
    torch.save({"model": trainable, "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


def peak_memory(name: str, length: int, batch: int, vocab: int) -> float:
    """The resident peak (GB) of a fresh process that trains the contender for three steps: its own VmHWM, which a
    new program starts afresh (ru_maxrss would keep the forking parent's)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]\n"
            f"from transforms import contender\n"
            f"_, _, step = contender({name!r}, {length}, {batch}, {vocab})\n"
            f"[step() for _ in range(3)]\n"
            f"print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1e6  # kilobytes


def measure(vocab: int, args) -> tuple[dict, dict, list]:
    built = {name: contender(name, args.length, args.batch, vocab) for name in CONTENDERS}
    for _, _, step in built.values():  # warm-up: first-call allocations and kernel choices
        step()
    speeds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name, (_, _, step) in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            speeds[name].append(args.steps * args.batch * args.length / (time.perf_counter() - start))

    model = built["full"][0]
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.embed.weight.numel() + (0 if model.config.tie_embeddings else model.lm_head.weight.numel())
    figures, ratios, rows = {"embeddings_and_head_share": embeddings / total}, {}, []
    for name, (contender_model, optimizer, _) in built.items():
        tokens = statistics.median(speeds[name])
        trainable = sum(p.numel() for p in contender_model.parameters() if p.requires_grad)
        size = checkpoint_bytes(contender_model, optimizer)
        memory = peak_memory(name, args.length, args.batch, vocab)
        figures[name] = {"tokens_per_s": tokens, "trainable": trainable, "checkpoint_mb": size / 1e6,
                         "peak_memory_gb": memory}
        ratios[f"{name}_speed_vs_full"] = tokens / statistics.median(speeds["full"])
        rows.append((name, f"{tokens:8,.0f} tok/s ({ratios[f'{name}_speed_vs_full']:.2f}x full)  trainable "
                           f"{trainable:>10,}  checkpoint {size / 1e6:7.1f} MB  peak {memory:.2f} GB"))
    rows.append(("embeddings + head", f"{100 * embeddings / total:.1f}% of the {total:,} parameters"))
    print_table(f"pythia-14m shape, vocabulary {vocab:,}, seq {args.length}, batch {args.batch}, CPU fp32", rows)
    return figures, ratios, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures, ratios = {}, {}
    for vocab in (50304, 1152):
        shape_figures, shape_ratios, _ = measure(vocab, args)
        figures[f"vocab{vocab}"] = shape_figures
        ratios.update({f"vocab{vocab}_{name}": value for name, value in shape_ratios.items()})
    path = write_results("transforms_cpu", figures, ratios,
                         notes="LoRA r 8 alpha 16 on every linear layer of the blocks; quantized kinds round "
                               "weights and inputs of the same layers, straight-through, float backward.")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
