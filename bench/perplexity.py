"""Perplexity speed: `rafale eval`'s scoring against `transformers`' model on the same folder and windows.

    python bench/perplexity.py            # pythia-14m shape, 8 documents of 1,000 tokens, window 256, batch 8

Both score the same rolling windows in the same batches of right-padded windows: rafale sends only the scored
positions through its LM head, a chunk of rows at a time (rafale/evaluate/perplexity.py); transformers as its
perplexity guide does, the logits of every position then their cross-entropy. Predicted tokens per second; after
one untimed call each, rounds alternate between the two, the median is kept, and the summed log-likelihoods must
agree to 1e-4 relative.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pythia14m")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1000, help="Tokens per document.")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from rafale.evaluate.perplexity import document_log_likelihoods, rolling_windows
    from rafale.models import build_model, load_pretrained, save_pretrained
    from rafale.models.loss import IGNORE_INDEX

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(build_model(args.preset), folder)
        ours = load_pretrained(folder).to(device)
        theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval().to(device)
    generator = torch.Generator().manual_seed(1)
    # Prefix token 0 and random ids: the speed does not depend on what the tokens say.
    sequences = [[0] + torch.randint(1, ours.config.vocab_size, (args.tokens,), generator=generator).tolist()
                 for _ in range(args.documents)]
    predicted = sum(len(ids) - 1 for ids in sequences)

    def rafale_total() -> float:
        sums, _ = document_log_likelihoods(ours, sequences, args.window, args.window, args.batch_size)
        return sum(sums)

    windows = [w for i, ids in enumerate(sequences) for w in rolling_windows(i, len(ids), args.window, args.window)]
    windows.sort(key=lambda w: w.end - w.begin, reverse=True)

    @torch.inference_mode()
    def transformers_total() -> float:
        total = 0.0
        for first in range(0, len(windows), args.batch_size):
            batch = windows[first:first + args.batch_size]
            width = batch[0].end - batch[0].begin
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, w in enumerate(batch):
                ids = torch.tensor(sequences[w.document][w.begin:w.end + 1])
                inputs[row, :w.end - w.begin] = ids[:-1]
                labels[row, w.scored_from - w.begin:w.end - w.begin] = ids[w.scored_from - w.begin + 1:]
            logits = theirs(inputs.to(device)).logits
            total -= F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(device),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
        return total

    contenders = {"rafale": rafale_total, "transformers": transformers_total}
    rates = {name: [] for name in contenders}
    # One untimed call each first: the first forward pass pays for allocations and kernel selection.
    totals = {name: score() for name, score in contenders.items()}
    for _ in range(args.rounds):
        for name, score in contenders.items():
            start = time.perf_counter()
            totals[name] = score()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[name].append(predicted / (time.perf_counter() - start))
    agreement = abs(totals["rafale"] - totals["transformers"]) / abs(totals["transformers"])
    if agreement > 1e-4:
        raise SystemExit(f"log-likelihoods differ: rafale {totals['rafale']}, transformers {totals['transformers']}")

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["rafale"] / median["transformers"]
    print_table(
        f"Perplexity scoring, {args.preset}, {args.documents} x {args.tokens} tokens, window {args.window}, "
        f"batch {args.batch_size}, {device.type}",
        [("rafale tokens/s", f"{median['rafale']:,.0f}"),
         ("transformers tokens/s", f"{median['transformers']:,.0f}"),
         ("rafale / transformers", f"{ratio:.2f}x"),
         ("log-likelihood relative difference", f"{agreement:.1e}")],
    )
    path = write_results(
        f"perplexity_{device.type}",
        {"rafale_tokens_per_s": median["rafale"], "transformers_tokens_per_s": median["transformers"],
         "log_likelihood_relative_difference": agreement},
        {"rafale_over_transformers": ratio},
        notes=f"{args.rounds} alternating rounds, median; predicted tokens per second",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
