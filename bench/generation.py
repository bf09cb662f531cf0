"""Generation speed: rafale's greedy decoding against `transformers`' `generate` on the same weights, and rafale
with its KV cache against without it.

    python bench/generation.py            # pythia-14m shape, 32-token prompts, 256 new tokens, batch 1 and 8

New tokens per second count every row's tokens. Rounds alternate between the contenders, the median is kept.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_results

PROMPT_LENGTH = 32


def rate(fn, new_tokens: int, rows: int) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return new_tokens * rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pythia14m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--cache-new-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from rafale.models import build_model, save_pretrained
    from rafale.models.generate import generate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = build_model(args.preset).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, Path(folder) / "model")
        theirs = AutoModelForCausalLM.from_pretrained(Path(folder) / "model", attn_implementation="sdpa").eval()
    ours.to(device)
    theirs.to(device)
    vocab = ours.config.vocab_size
    # No EOS: every row decodes exactly the asked number of tokens in both implementations.
    hf_options = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    figures, ratios, rows = {}, {}, []
    for batch in (1, 8):
        prompt = torch.randint(1, vocab, (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        mask = torch.ones_like(prompt)
        n = args.new_tokens
        contenders = {
            "rafale": lambda: generate(ours, prompt, mask, max_new_tokens=n),
            "transformers": lambda: theirs.generate(
                prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **hf_options
            ),
        }
        with torch.no_grad():
            for fn in contenders.values():  # warm-up
                fn()
            rates = {key: [] for key in contenders}
            for _ in range(args.rounds):
                for key, fn in contenders.items():
                    rates[key].append(rate(fn, n, batch))
        ours_rate, theirs_rate = statistics.median(rates["rafale"]), statistics.median(rates["transformers"])
        figures[f"gen_tok_s_rafale_b{batch}"] = ours_rate
        figures[f"gen_tok_s_transformers_b{batch}"] = theirs_rate
        ratios[f"gen_ratio_vs_transformers_b{batch}"] = ours_rate / theirs_rate
        rows += [
            (f"batch {batch}: rafale", f"{ours_rate:,.0f} new tok/s"),
            (f"batch {batch}: transformers generate", f"{theirs_rate:,.0f} new tok/s"),
            (f"batch {batch}: rafale / transformers", f"{ours_rate / theirs_rate:.2f}x"),
        ]

    prompt = torch.randint(1, vocab, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0)).to(device)
    n = args.cache_new_tokens
    with torch.no_grad():
        cached = statistics.median(
            rate(lambda: generate(ours, prompt, max_new_tokens=n, use_cache=True), n, 1) for _ in range(args.rounds)
        )
        uncached = statistics.median(
            rate(lambda: generate(ours, prompt, max_new_tokens=n, use_cache=False), n, 1) for _ in range(args.rounds)
        )
    figures["gen_tok_s_cache_512"], figures["gen_tok_s_no_cache_512"] = cached, uncached
    ratios["kv_cache_speedup_512"] = cached / uncached
    rows += [
        (f"{n} new tokens, KV cache", f"{cached:,.0f} new tok/s"),
        (f"{n} new tokens, no cache", f"{uncached:,.0f} new tok/s"),
        ("KV cache speed-up", f"{cached / uncached:.1f}x"),
    ]
    print_table(f"Greedy generation, {args.preset}, {PROMPT_LENGTH}-token prompts ({device.type})", rows)
    print(f"wrote {write_results('generation_' + device.type, figures, ratios)}")


if __name__ == "__main__":
    main()
