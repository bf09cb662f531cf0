"""Preference tuning, side by side on one model: a DPO step with the cached reference against the live reference
(time per step, peak memory, and the one-off cost of the caching pass), and rafale's DPO step against a plain-PyTorch
DPO step on transformers' GPTNeoXForCausalLM of the same shape (tokens per second).

    python bench/preference.py                       # CPU, the pythia-14m shape, vocabulary 50,304, 16 pairs a batch
    python bench/preference.py --steps 4 --rounds 3
    python bench/preference.py --trl                 # and TRL's DPOTrainer (pip install trl==1.16.0 first)

Batches are pairs with a shared prompt of 48 tokens and responses of 8 to 40 tokens (random ids, fixed seed), right
padded to the batch's longest, as rafale's collator pads them. Every contender trains from the same weights with
AdamW in interleaved rounds in one process; tokens per second count real (not padding) tokens of both sequences.

- rafale cached: the reference log-probs come with the batch (what the caching pass stores).
- rafale live: a frozen copy of the starting model computes them every step, without gradient.
- transformers plain: the usual recipe (TRL's concatenated forward): chosen and rejected in one forward, the whole
  [rows, time, vocab] logits, log_softmax, gather, masked sums; the reference log-probs given, as for rafale cached.
- trl DPOTrainer (`--trl`; bench-only: `pip install trl==1.16.0`, which installs beside rafale's pins): TRL's own
  training step (`training_step`, then its AdamW) on transformers' model, its reference log-probs precomputed
  (`precompute_ref_log_probs`), the same pairs given as text of a word-level tokenizer whose words are the ids.

Peak memory is each contender's own: a fresh process per contender reports its resident peak (VmHWM) after a few
steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, PROMPT, RESPONSES = 50304, 48, (8, 40)
CONTENDERS = ("rafale_cached", "rafale_live", "transformers_plain")
TRL = "trl_dpotrainer"


def pairs(count: int, seed: int) -> list[dict]:
    """Rows of the preference task: a shared prompt, two responses, labels on the responses."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(2, VOCAB, (length,), generator=generator).tolist()

    rows = []
    for _ in range(count):
        prompt = ids(PROMPT)
        chosen, rejected = (ids(int(torch.randint(*RESPONSES, (1,), generator=generator))) for _ in range(2))
        rows.append({"input_ids": prompt + chosen, "labels": [-100] * PROMPT + chosen,
                     "rejected_ids": prompt + rejected, "rejected_labels": [-100] * PROMPT + rejected})
    return rows


def task():
    """A DPO task of its own (a contender's live reference stays its own)."""
    from rafale.tasks.preference import PairedPreference, PreferenceSettings

    preference = PairedPreference("preference")
    preference.settings = PreferenceSettings(name="bench", dataset_path="synthetic:preferences")
    return preference


def contender(name: str, batch_size: int):
    """(a step function, real tokens per step) for the contender."""
    from rafale.models import build_model
    from rafale.tasks.model import TaskModel
    from rafale.tasks.preference import REFERENCE_LOGPS, PairCollator

    if name == TRL:
        return trl_contender(batch_size)
    torch.manual_seed(0)
    batch = PairCollator(1, 512, "rejected")(pairs(batch_size, seed=1))
    tokens = int(batch["attention_mask"].sum())
    preference = task()
    if name == "transformers_plain":
        return plain_contender(batch), tokens
    model = build_model("pythia14m", {"vocab_size": VOCAB})
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        batch[REFERENCE_LOGPS] = preference.sequence_log_probs(reference, batch)[0]
    if name == "rafale_live":
        del batch[REFERENCE_LOGPS]

        def live(policy, rows):
            with torch.no_grad():
                return preference.sequence_log_probs(reference, rows)[0]

        preference.live_reference = live
    wrapped = TaskModel(preference, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        wrapped(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, tokens


def plain_config():
    import transformers

    return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=512, rotary_pct=0.25, max_position_embeddings=2048,
                                      use_parallel_residual=True, tie_word_embeddings=False, eos_token_id=0,
                                      pad_token_id=1)


def plain_contender(batch: dict):
    import transformers

    model = transformers.GPTNeoXForCausalLM(plain_config())
    ids, mask, labels = (batch[name].transpose(0, 1).reshape(-1, batch[name].shape[-1])
                         for name in ("input_ids", "attention_mask", "labels"))
    targets = labels[:, 1:]

    def log_probs(net) -> torch.Tensor:
        logits = net(input_ids=ids, attention_mask=mask).logits[:, :-1]
        per_token = torch.gather(F.log_softmax(logits.float(), -1), 2, targets.clamp(min=0)[..., None])[..., 0]
        return (per_token * (targets != -100)).sum(-1).view(2, -1)

    with torch.no_grad():
        reference = log_probs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        policy = log_probs(model)
        margin = 0.1 * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
        (-F.logsigmoid(margin)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trl_contender(batch_size: int):
    """TRL's DPOTrainer step on transformers' GPTNeoXForCausalLM of the pythia-14m shape, on the same pairs."""
    import tempfile

    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    # Word i is token i, so TRL's own tokenization gives exactly the bench's ids.
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w0", pad_token="w1",
                                                     unk_token="w2")

    def text(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    rows = pairs(batch_size, seed=1)
    data = Dataset.from_list([{"prompt": text(row["input_ids"][:PROMPT]),
                               "chosen": " " + text(row["input_ids"][PROMPT:]),
                               "rejected": " " + text(row["rejected_ids"][PROMPT:])} for row in rows])
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(plain_config())
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, learning_rate=1e-5,
                     beta=0.1, precompute_ref_log_probs=True, max_length=None, use_cpu=True, report_to=[],
                     save_strategy="no", dataloader_num_workers=0, max_steps=10_000, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    # What Trainer.train sets before its first step, which training_step divides the loss by.
    trainer.current_gradient_accumulation_steps = 1

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    # TRL appends an EOS to each response: its rows are one token longer each.
    return step, int(batch["attention_mask"].sum())


def caching_pass_seconds(rows: int, batch_size: int) -> float:
    """The one-off pass that computes and stores the reference log-probs of `rows` pairs, timed."""
    from rafale.models import build_model
    from rafale.tasks.preference import PairCollator

    preference = task()
    model = build_model("pythia14m", {"vocab_size": VOCAB}).eval()
    collate = PairCollator(1, 512, "rejected")
    data = pairs(rows, seed=2)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, rows, batch_size):
            preference.sequence_log_probs(model, collate(data[first:first + batch_size]))
    return time.perf_counter() - start


def peak_memory(name: str, batch_size: int) -> float:
    """The resident peak (GB) of a fresh process that trains the contender for three steps."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]\n"
            f"from preference import contender\n"
            f"step, _ = contender({name!r}, {batch_size})\n"
            f"[step() for _ in range(3)]\n"
            f"print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1e6  # kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-rows", type=int, default=256)
    parser.add_argument("--trl", action="store_true", help="also TRL's DPOTrainer (pip install trl==1.16.0)")
    args = parser.parse_args()
    built = {name: contender(name, args.batch) for name in CONTENDERS + ((TRL,) if args.trl else ())}
    for step, _ in built.values():  # warm-up: first-call allocations and kernel choices
        step()
    seconds: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (step, _) in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[name].append((time.perf_counter() - start) / args.steps)
    figures, ratios, rows = {}, {}, []
    for name, (_, tokens) in built.items():
        per_step = statistics.median(seconds[name])
        # TRL's own peak is not measured: the memory figures compare the cached reference with the live one.
        memory = peak_memory(name, args.batch) if name != TRL else None
        figures[name] = {"seconds_per_step": per_step, "tokens_per_s": tokens / per_step, "peak_memory_gb": memory}
        peak = f"peak {memory:.2f} GB" if memory is not None else "peak not measured"
        rows.append((name, f"{per_step * 1e3:7.0f} ms/step  {tokens / per_step:8,.0f} tok/s  {peak}"))
    cached, live, plain = (figures[name]["seconds_per_step"] for name in CONTENDERS)
    ratios["cached_speed_vs_live"] = live / cached
    memory = {name: figures[name]["peak_memory_gb"] for name in CONTENDERS}
    ratios["cached_memory_vs_live"] = memory["rafale_cached"] / memory["rafale_live"]
    ratios["rafale_speed_vs_transformers_plain"] = plain / cached
    if TRL in figures:
        ratios["rafale_tokens_per_s_vs_trl_dpotrainer"] = (figures["rafale_cached"]["tokens_per_s"]
                                                            / figures[TRL]["tokens_per_s"])
    pass_seconds = caching_pass_seconds(args.cache_rows, args.batch)
    figures["caching_pass"] = {"pairs": args.cache_rows, "seconds": pass_seconds,
                               "in_training_steps": pass_seconds / cached * args.batch / args.cache_rows}
    rows += [("cached vs live", f"{ratios['cached_speed_vs_live']:.2f}x faster, "
                                f"{ratios['cached_memory_vs_live']:.2f}x the peak memory"),
             ("rafale vs transformers", f"{ratios['rafale_speed_vs_transformers_plain']:.2f}x the tokens per second"),
             *([("rafale vs TRL DPOTrainer", f"{ratios['rafale_tokens_per_s_vs_trl_dpotrainer']:.2f}x the tokens per "
                                             f"second")] if TRL in figures else []),
             ("caching pass", f"{pass_seconds:.2f} s for {args.cache_rows} pairs "
                              f"({pass_seconds / args.cache_rows * args.batch / cached:.2f} training steps per "
                              f"batch of pairs)")]
    print_table(f"DPO step, pythia-14m shape, vocabulary {VOCAB:,}, {args.batch} pairs, CPU fp32", rows)
    path = write_results("preference_cpu", figures, ratios,
                         notes="Shared 2-core machine: contenders interleaved in rounds, medians, ratios.")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
