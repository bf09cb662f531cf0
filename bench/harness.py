"""lm-evaluation-harness speed: rafale's model (`--model rafale`) against the harness's own Hugging Face backend
(`--model hf`) on the same exported folder and the same loglikelihood task.

    python bench/harness.py             # pythia-14m shape, the bundled rafale_story_next_word task, batch 16

A random-init model of the preset's shape is exported as rafale exports (tokenizer.json trained on the synthetic
stories, tokenizer_config.json), and both backends run lm-eval's `evaluate` on the bundled multiple-choice task
(480 loglikelihood requests for 120 items): requests per second, after one untimed run each, rounds alternating
between the two, the median kept. The accuracies must be equal and every request's log-likelihood agree to 1e-4
relative.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_results

TASK = "rafale_story_next_word"


def export_story_model(preset: str, folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rafale.data.synthetic import generate_stories
    from rafale.data.tokenizer import hf_tokenizer_config
    from rafale.models import build_model, save_pretrained

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(generate_stories(2000, 1), trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>", "<|padding|>"]))
    torch.manual_seed(0)
    model = build_model(preset)
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|padding|>")
    positions = model.config.max_position_embeddings
    save_pretrained(model, folder, tokenizer=tokenizer,
                    tokenizer_config=hf_tokenizer_config(tokenizer, eos, pad, False, positions),
                    config_extras={"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pythia14m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="Items of the task (default: all 120).")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    from rafale.evaluate.harness import RafaleLM, task_manager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as work:
        folder = export_story_model(args.preset, Path(work) / "model")
        contenders = {
            "rafale": RafaleLM(pretrained=str(folder), batch_size=args.batch_size, device=device),
            "lm-eval hf": HFLM(pretrained=str(folder), batch_size=args.batch_size, device=device, dtype="float32"),
        }
    tasks = get_task_dict([TASK], task_manager([TASK]))

    def run(lm) -> dict:
        return evaluate(lm, tasks, limit=args.limit, bootstrap_iters=0, verbosity="WARNING")

    # One untimed run each: the first pays for allocations and kernel selection.
    results = {name: run(lm) for name, lm in contenders.items()}
    requests = sum(len(sample["resps"]) for sample in results["rafale"]["samples"][TASK])
    rates = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, lm in contenders.items():
            start = time.perf_counter()
            results[name] = run(lm)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[name].append(requests / (time.perf_counter() - start))

    ours, theirs = (results[name] for name in contenders)
    accuracy = {name: result["results"][TASK]["acc,none"] for name, result in results.items()}
    if len(set(accuracy.values())) != 1:
        raise SystemExit(f"accuracies differ: {accuracy}")
    difference = max(abs(a[0][0] - b[0][0]) / max(1.0, abs(b[0][0]))
                     for mine, reference in zip(ours["samples"][TASK], theirs["samples"][TASK])
                     for a, b in zip(mine["resps"], reference["resps"]))
    if difference > 1e-4:
        raise SystemExit(f"log-likelihoods differ by up to {difference:.1e} (relative)")

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["rafale"] / median["lm-eval hf"]
    print_table(
        f"lm-evaluation-harness, {TASK} ({requests} loglikelihood requests), {args.preset}, batch "
        f"{args.batch_size}, {device}",
        [("rafale requests/s", f"{median['rafale']:,.1f}"),
         ("lm-eval hf requests/s", f"{median['lm-eval hf']:,.1f}"),
         ("rafale / hf", f"{ratio:.2f}x"),
         ("accuracy (both)", f"{accuracy['rafale']:.4f}"),
         ("largest log-likelihood difference (relative)", f"{difference:.1e}")],
    )
    path = write_results(
        f"harness_{device}",
        {"rafale_requests_per_s": median["rafale"], "hf_requests_per_s": median["lm-eval hf"],
         "accuracy": accuracy["rafale"], "log_likelihood_relative_difference": difference},
        {"rafale_over_hf": ratio},
        notes=f"{args.rounds} alternating rounds of lm-eval's evaluate() on {TASK}, median; requests per second",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
