"""Training throughput: rafale's model in rafale's Composer Trainer, against the same model in a plain PyTorch loop
and against `transformers`' equivalent model (`...ForCausalLM`, `BertForMaskedLM`) in that plain loop. Same shapes,
batches, precision and clipping.

    python bench/train_throughput.py                 # CPU: pythia-14m, a small Llama, bert-tiny MLM at seq 512
    python bench/train_throughput.py --gpu           # GPU: pythia-160m at 2048 in bf16, MFU with and without compile

The three loops run in interleaved rounds in one process, so the machine's drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_results

CPU_SHAPES = {
    # name: (preset, overrides, sequence length, batch size); bert presets train as masked LMs.
    "pythia14m_cpu": ("pythia14m", {}, 512, 4),
    "llama_small_cpu": (
        "llama-tiny",
        {
            "hidden_size": 128,
            "n_layers": 6,
            "n_heads": 4,
            "n_kv_heads": 2,
            "intermediate_size": 384,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        512,
        4,
    ),
    "bert_tiny_mlm_cpu": ("bert-tiny", {"dropout": 0.0}, 512, 4),
}
GPU_SHAPES = {"pythia160m_gpu": ("pythia160m", {}, 2048, 8)}


def run_file(batch: int, precision: str, compile_model: bool):
    from rafale.config import RunFile

    return RunFile.model_validate(
        {
            "run": {"name": "bench", "max_lr": 1e-4, "precision": precision, "compile": compile_model},
            "model": {"config": "pythia-tiny"},
            "data": {"config": {"name": "bench", "dataset_path": "synthetic:stories", "train_batch_size": batch}},
        }
    )


def batches(vocab: int, length: int, batch: int, count: int, masked: bool, seed: int = 0):
    """Random token rows; for a masked LM, 15% of them masked as rafale's MLM pipeline does (ids 0-4 special)."""
    from rafale.data.collate import PaddingCollator
    from rafale.tasks.mlm import MLMCollator

    generator = torch.Generator().manual_seed(seed)
    rows = [
        {"input_ids": torch.randint(5, vocab, (length,), generator=generator).tolist()} for _ in range(batch * count)
    ]
    collate = MLMCollator(0, length, 4, range(5), vocab) if masked else PaddingCollator(0, length)
    return torch.utils.data.DataLoader(rows, batch_size=batch, collate_fn=collate)


def plain_loop(model, loader, device, amp: bool, loss_of) -> float:
    """A hand-written loop as a user would write it: AdamW, autocast when asked, clipping, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = 0

    def run() -> float:
        nonlocal tokens
        start, tokens = time.perf_counter(), 0
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_of(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch["input_ids"].numel()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    return run


def rafale_loss(task):
    """The loss as rafale's task wrapper computes it (for language models the model returns it, its head and
    cross-entropy fused), in a plain loop."""

    def loss_of(model, batch):
        return task.loss(task(batch), batch)

    return loss_of


def hf_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def composer_loop(model, masked: bool, loader, config, device_name: str, precision: str, steps: int):
    """rafale's Trainer as train_run builds it: its callbacks, clipping, console logger, schedule and optimizer."""
    from composer import Trainer

    from rafale.callbacks import ConsoleProgress
    from rafale.optim import build_optimizer, build_scheduler
    from rafale.train import _algorithms, _callbacks, _data_spec

    wrapped = task_for(model, masked)
    trainer = Trainer(
        model=wrapped,
        train_dataloader=_data_spec(loader, wrapped.task),
        max_duration=f"{1000 * steps}ba",
        optimizers=build_optimizer(config, model),
        schedulers=build_scheduler(config),
        step_schedulers_every_batch=True,
        algorithms=_algorithms(config),
        callbacks=_callbacks(),
        loggers=[ConsoleProgress(10_000)],
        progress_bar=False,
        log_to_console=False,
        device=device_name,
        precision=precision,
        device_train_microbatch_size=config.data.config.train_batch_size,
        accumulate_train_batch_on_tokens=True,
        compile_config={} if config.run.compile else None,
        seed=0,
    )

    def run() -> float:
        tokens_before = int(trainer.state.timestamp.token)
        start = time.perf_counter()
        trainer.fit(duration=f"{steps}ba")
        if device_name == "gpu":
            torch.cuda.synchronize()
        return (int(trainer.state.timestamp.token) - tokens_before) / (time.perf_counter() - start)

    return run, trainer


def task_for(model, masked: bool):
    """rafale's task wrapper for the model: a masked LM's or a causal LM's."""
    from rafale.tasks import new_task
    from rafale.tasks.model import TaskModel

    return TaskModel(new_task("mlm" if masked else "causal_lm"), model)


def measure_shape(name, preset, overrides, length, batch, steps, rounds, gpu: bool, compiled: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from rafale.models import Encoder, build_model, save_pretrained

    device = torch.device("cuda" if gpu else "cpu")
    precision = "amp_bf16" if gpu else "fp32"
    torch.manual_seed(0)
    ours = build_model(preset, overrides)
    masked = isinstance(ours, Encoder)
    reference_class = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, Path(folder) / "model")
        theirs = reference_class.from_pretrained(Path(folder) / "model", attn_implementation="sdpa")
    plain_model = build_model(preset, overrides)
    plain_model.load_state_dict(ours.state_dict())
    for model in (theirs, plain_model):
        model.to(device).train()
    if compiled:
        plain_model = torch.compile(plain_model)
        theirs = torch.compile(theirs)
    loader = batches(ours.config.vocab_size, length, batch, steps, masked)
    config = run_file(batch, precision, compiled)
    composer_run, trainer = composer_loop(ours, masked, loader, config, "gpu" if gpu else "cpu", precision, steps)
    runners = {
        "rafale": composer_run,
        "plain_loop": plain_loop(plain_model, loader, device, gpu, rafale_loss(task_for(plain_model, masked))),
        "transformers": plain_loop(theirs, loader, device, gpu, hf_loss),
    }
    for run in runners.values():  # warm-up: allocator, autotuning, compilation
        run()
    rates = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            rates[key].append(run())
    result = {key: statistics.median(values) for key, values in rates.items()}
    flops_per_token = ours.flops_per_token(length)
    trainer.close()
    return result, flops_per_token


def measured_bf16_peak() -> float:
    """The device's bf16 matmul rate in FLOP/s, measured on large square matmuls."""
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU shape (needs CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    args = parser.parse_args()

    figures, ratios, rows = {}, {}, []
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    for shape, (preset, overrides, length, batch) in shapes.items():
        rates, flops_per_token = measure_shape(
            shape, preset, overrides, length, batch, args.steps, args.rounds, args.gpu
        )
        figures[f"train_tok_s_rafale_{shape}"] = rates["rafale"]
        figures[f"train_tok_s_transformers_{shape}"] = rates["transformers"]
        figures[f"train_tok_s_plain_loop_{shape}"] = rates["plain_loop"]
        ratios[f"train_ratio_vs_transformers_{shape}"] = rates["rafale"] / rates["transformers"]
        ratios[f"trainer_overhead_{shape}"] = rates["plain_loop"] / rates["rafale"] - 1
        rows += [
            (f"{shape}: rafale (Composer Trainer)", f"{rates['rafale']:,.0f} tok/s"),
            (f"{shape}: rafale model, plain loop", f"{rates['plain_loop']:,.0f} tok/s"),
            (f"{shape}: transformers, plain loop", f"{rates['transformers']:,.0f} tok/s"),
            (f"{shape}: rafale / transformers", f"{ratios[f'train_ratio_vs_transformers_{shape}']:.2f}x"),
            (f"{shape}: Trainer overhead", f"{100 * ratios[f'trainer_overhead_{shape}']:+.1f}%"),
        ]
        if args.gpu:
            peak = measured_bf16_peak()
            figures["gpu_bf16_peak_flops"] = peak
            figures["gpu_mfu_pythia160m"] = rates["rafale"] * flops_per_token / peak
            compiled, _ = measure_shape(
                shape, preset, overrides, length, batch, args.steps, args.rounds, True, compiled=True
            )
            figures["gpu_mfu_pythia160m_compiled"] = compiled["rafale"] * flops_per_token / peak
            rows += [
                ("pythia160m: MFU", f"{100 * figures['gpu_mfu_pythia160m']:.1f}%"),
                ("pythia160m: MFU, torch.compile", f"{100 * figures['gpu_mfu_pythia160m_compiled']:.1f}%"),
            ]
    print_table("Training throughput (median of interleaved rounds)", rows)
    print(f"wrote {write_results('train_gpu' if args.gpu else 'train_cpu', figures, ratios)}")


if __name__ == "__main__":
    main()
