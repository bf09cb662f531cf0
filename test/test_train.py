"""Training end to end on a tiny model: DEBUG=1 overfits, a run is killed and resumes, its export loads anywhere."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = """\
run:
  name: "tiny"
  seed: 7
  max_duration: "{steps}ba"
  max_lr: 3e-3
  warmup_pct: 0.1
  eval_interval: "4ba"
  save_interval: "{save}ba"
  sample_prompts: ["Once upon a time"]
  sample_max_new_tokens: 8
model:
  config: "pythia-tiny"
data:
  pipeline: "causal_lm"
  config:
    name: "tiny-stories"
    dataset_path: "synthetic:stories"
    synthetic_documents: 400
    vocab_size: 320
    max_sequence_length: 64
    train_batch_size: 8
    eval_batch_size: 8
"""


def write_run(tmp_path: Path, steps: int = 12, save: int = 4) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RUN.format(steps=steps, save=save))
    return path


def rafale(run_file: Path, cache: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "RAFALE_CACHE_DIR": str(cache), **env}
    return subprocess.Popen(
        [sys.executable, "rafale/main", "-c", str(run_file)],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def test_debug_overfits_one_batch(tmp_path):
    code, output = finish(rafale(write_run(tmp_path), tmp_path / "cache", DEBUG="1"))
    assert code == 0, output
    assert "DEBUG PASS" in output


def test_debug_fails_when_the_model_cannot_learn(tmp_path):
    run_file = write_run(tmp_path)
    # A model that cannot learn fails whatever the budget: 40 steps instead of the default 300 say as much.
    run_file.write_text(run_file.read_text().replace("max_lr: 3e-3", "max_lr: 1e-9\n  debug_steps: 40"))
    code, output = finish(rafale(run_file, tmp_path / "cache", DEBUG="1"))
    assert code == 1, output
    assert "DEBUG FAIL" in output


def test_killed_run_resumes_and_exports_a_model_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rafale.data.tokenizer import load_tokenizer
    from rafale.models import load_pretrained

    cache = tmp_path / "cache"
    run_file = write_run(tmp_path, steps=12, save=4)
    checkpoints = cache / "checkpoints" / "tiny" / "checkpoints"

    process = rafale(run_file, cache)
    deadline = time.monotonic() + 240
    while not (checkpoints / "ep0-ba4-rank0.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cache / "checkpoints" / "tiny" / "model").exists()

    code, output = finish(rafale(run_file, cache))
    assert code == 0, output
    assert "resumed from the latest checkpoint" in output
    assert "samples:" in output

    exported = cache / "checkpoints" / "tiny" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    # The trained BPE's <|endoftext|> (0) begins and ends documents; <|padding|> (1) pads.
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|padding|>")
    assert tokenizer("Once upon a time")["input_ids"] == load_tokenizer(str(exported)).encode("Once upon a time").ids
    ours = load_pretrained(exported)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert difference < 1e-4


def fake_state(done: float, unit: str, total: int):
    """The little of Composer's State that a scheduler reads: the duration and the time elapsed."""
    from types import SimpleNamespace

    from composer.core import Time, Timestamp

    elapsed = int(total * done)
    state = SimpleNamespace(
        max_duration=Time.from_timestring(f"{total}{unit}"),
        timestamp=Timestamp(batch=elapsed, token=elapsed),
        dataloader_len=None,
    )
    state.get_elapsed_duration = lambda: state.timestamp.get(state.max_duration.unit) / state.max_duration
    return state


@pytest.mark.parametrize("schedule", ["cosine-warmup", "linear-warmup", "constant-warmup", "warmup-stable-decay"])
@pytest.mark.parametrize("unit, total", [("ba", 200), ("tok", 1_000_000)])
def test_warmup_is_a_fraction_of_the_whole_run_in_any_unit(tmp_path, schedule, unit, total):
    from rafale.config import load_run_file
    from rafale.optim import build_scheduler

    run_file = write_run(tmp_path)
    run_file.write_text(run_file.read_text().replace('max_lr: 3e-3', f'max_lr: 3e-3\n  schedule: "{schedule}"'))
    scheduler = build_scheduler(load_run_file(run_file))  # warmup_pct 0.1
    multipliers = {done: scheduler(fake_state(done, unit, total)) for done in (0.0, 0.05, 0.1, 0.5, 0.95, 1.0)}
    assert multipliers[0.0] == pytest.approx(0.0)
    assert multipliers[0.05] == pytest.approx(0.5)
    assert multipliers[0.1] == pytest.approx(1.0)
    if schedule == "constant-warmup":
        assert multipliers[1.0] == pytest.approx(1.0)
    else:
        assert multipliers[1.0] == pytest.approx(0.1)  # min_lr_ratio
    if schedule == "warmup-stable-decay":
        assert multipliers[0.5] == pytest.approx(1.0)  # stable until the last decay_pct (0.2) of the run

