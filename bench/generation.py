"""Generation speed against transformers and against the machine's memory bandwidth.

    python bench/generation.py                      # three shapes, batch 1 and 8, 32-token prompts, 256 new tokens
    python bench/generation.py --dtype bfloat16     # both contenders decode with 16-bit weights
    python bench/generation.py --shapes pythia70m --batches 1
    OMP_NUM_THREADS=1 python bench/generation.py --new-tokens 32   # on a machine shared with other work

(On an oversubscribed machine two OpenMP threads make every product wait for a thread that is not scheduled;
one thread gave figures 2-4x better there.)

For each shape and batch: rafale's greedy decoding and transformers' `generate` on the same random weights (saved
once, loaded by both), and the memory-bandwidth bound. Decoding one step reads every weight once (the input
embedding table only one row, so it does not count) and each row's KV cache; the bound is those bytes over the
bandwidth of a matrix-vector product of the same size, timed in the same rounds. One such product keeps one core
busy; the memory feeds every core at once, so the bench times two: one product (the bound as issue 15 defines it)
and the same product cut into one slice per thread in one batched product (`bmm` runs its batch on the threads),
whose bound is the higher one on a CPU with idle cores. Each share is rafale's tokens/s over that bound's. New
tokens per second count every row's tokens; rounds alternate between the contenders, the median is kept.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from common import print_table, write_results

PROMPT_LENGTH = 32

# name: (preset, overrides). The pythia-70m shape keeps its blocks and takes the bundled tokenizer's vocabulary,
# so that its blocks, not its head, are most of the bytes.
SHAPES = {
    "pythia14m": ("pythia14m", {}),
    "pythia70m": ("pythia70m", {"vocab_size": 4096}),
    "llama_gqa": (
        "llama-tiny",
        {
            "hidden_size": 512,
            "n_layers": 6,
            "n_heads": 8,
            "n_kv_heads": 2,
            "intermediate_size": 1408,
            "vocab_size": 8192,
            "max_position_embeddings": 2048,
        },
    ),
}
DESCRIPTIONS = {
    "pythia14m": "pythia-14m (h128, 6 layers, vocab 50k)",
    "pythia70m": "pythia-70m shape (h512, 6 layers, vocab 4k)",
    "llama_gqa": "Llama (h512, 6 layers, GQA 8/2, vocab 8k)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bytes_per_step(model, batch: int, cached_positions: float) -> float:
    """What one decoding step reads: every weight but the input tables (one row each), and each row's KV cache."""
    tables = [] if model.config.tie_embeddings else [model.embed.weight]
    if model.config.positions == "learned":
        tables.append(model.pos_embed.weight)
    skipped = {id(t) for t in tables}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skipped)
    c = model.config
    kv = 2 * c.n_layers * c.kv_heads * c.head_dim * model.lm_head.weight.element_size() * cached_positions
    return weights + batch * kv


def matvec(total_bytes: float, width: int, device, slices: int = 1) -> Callable[[], torch.Tensor]:
    """A product of one fp32 row with a [width, n] matrix of total_bytes (read in memory order; faster than
    nn.Linear's [n, width] layout for one row), in `slices` slices of its columns multiplied in one batched
    product."""
    matrix = torch.randn(slices, width, int(total_bytes // 4 // width // slices), device=device)
    row = torch.randn(1, width, device=device).expand(slices, 1, width)
    return lambda: torch.bmm(row, matrix)


def measure(name, preset, overrides, batches, new_tokens, rounds, dtype, device):
    from transformers import AutoModelForCausalLM

    from rafale.models import build_model, save_pretrained
    from rafale.models.generate import generate

    torch.manual_seed(0)
    ours = build_model(preset, overrides).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, Path(folder) / "model")
        theirs = AutoModelForCausalLM.from_pretrained(Path(folder) / "model", attn_implementation="sdpa").eval()
    ours.to(device, dtype)
    theirs.to(device, dtype)
    # No EOS: every row decodes exactly the asked number of tokens in both implementations.
    hf_options = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    n = new_tokens
    results = []
    for batch in batches:
        prompt = torch.randint(1, ours.config.vocab_size, (batch, PROMPT_LENGTH),
                               generator=torch.Generator().manual_seed(batch)).to(device)
        mask = torch.ones_like(prompt)
        step_bytes = bytes_per_step(ours, batch, PROMPT_LENGTH + (n - 1) / 2)
        weight_bytes = bytes_per_step(ours, 0, 0)
        # The bandwidth is an fp32 product over as many bytes as the weights (in the decoding dtype) hold: the bound
        # is what the memory allows, whatever this CPU's 16-bit kernels make of it.
        product = matvec(weight_bytes, ours.config.hidden_size, device)
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        sliced = matvec(weight_bytes, ours.config.hidden_size, device, threads)
        repeats = 20
        contenders = {
            "rafale": lambda: generate(ours, prompt, mask, max_new_tokens=n),
            "transformers": lambda: theirs.generate(
                prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **hf_options
            ),
            "matvec": lambda: [product() for _ in range(repeats)],
            "sliced_matvec": lambda: [sliced() for _ in range(repeats)],
        }
        with torch.inference_mode():
            for fn in contenders.values():  # warm-up
                fn()
            times = {key: [] for key in contenders}
            for _ in range(rounds):
                for key, fn in contenders.items():
                    times[key].append(seconds(fn))
        ours_rate = n * batch / statistics.median(times["rafale"])
        theirs_rate = n * batch / statistics.median(times["transformers"])
        bandwidth = weight_bytes * repeats / statistics.median(times["matvec"])
        all_cores = max(bandwidth, weight_bytes * repeats / statistics.median(times["sliced_matvec"]))
        results.append(dict(shape=name, batch=batch, rafale=ours_rate, transformers=theirs_rate,
                            bandwidth=bandwidth, all_cores=all_cores, step_bytes=step_bytes,
                            bound=batch * bandwidth / step_bytes, all_cores_bound=batch * all_cores / step_bytes))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    figures, ratios, rows = {}, {}, []
    for name in args.shapes:
        preset, overrides = SHAPES[name]
        for r in measure(name, preset, overrides, args.batches, args.new_tokens, args.rounds, dtype, device):
            key = f"{name}_b{r['batch']}"
            figures[f"gen_tok_s_rafale_{key}"] = r["rafale"]
            figures[f"gen_tok_s_transformers_{key}"] = r["transformers"]
            figures[f"gen_bound_tok_s_{key}"] = r["bound"]
            figures[f"gen_all_cores_bound_tok_s_{key}"] = r["all_cores_bound"]
            figures[f"matvec_gb_s_{key}"] = r["bandwidth"] / 1e9
            figures[f"sliced_matvec_gb_s_{key}"] = r["all_cores"] / 1e9
            figures[f"bytes_per_step_mb_{key}"] = r["step_bytes"] / 1e6
            ratios[f"gen_ratio_vs_transformers_{key}"] = r["rafale"] / r["transformers"]
            ratios[f"gen_share_of_bound_{key}"] = r["rafale"] / r["bound"]
            ratios[f"gen_share_of_all_cores_bound_{key}"] = r["rafale"] / r["all_cores_bound"]
            rows.append((
                f"{DESCRIPTIONS[name]}, batch {r['batch']}",
                f"rafale {r['rafale']:,.0f}  transformers {r['transformers']:,.0f} new tok/s  "
                f"({r['rafale'] / r['transformers']:.2f}x)  bound {r['bound']:,.0f} "
                f"({r['step_bytes'] / 1e6:.1f} MB a step at {r['bandwidth'] / 1e9:.1f} GB/s): "
                f"{r['rafale'] / r['bound']:.0%} of it; all cores {r['all_cores_bound']:,.0f} "
                f"({r['all_cores'] / 1e9:.1f} GB/s): {r['rafale'] / r['all_cores_bound']:.0%}",
            ))
        print_table(f"Greedy generation, {PROMPT_LENGTH}-token prompts, {args.new_tokens} new tokens, "
                    f"{args.dtype} ({device.type})", rows[-len(args.batches):])
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    print(f"wrote {write_results(f'generation_{device.type}{suffix}', figures, ratios)}")


if __name__ == "__main__":
    main()
