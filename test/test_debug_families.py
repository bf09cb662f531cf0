"""DEBUG=1 passes for every family's tiny preset and every task: each overfits its single batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DEBUG_RUN = """\
run:
  name: "debug"
  seed: 0
  max_lr: 3e-3
  debug_steps: {steps}
model:
  config: "{preset}"
  type: "{model_type}"
data:
  pipeline: "{pipeline}"
  config:
    name: "debug"
    dataset_path: "synthetic:{corpus}"
    synthetic_documents: 100
    vocab_size: 300
    max_sequence_length: 32
    train_batch_size: 8
"""


@pytest.mark.parametrize("preset, model_type, pipeline, corpus, steps", [
    ("pythia-tiny", "decoder", "causal_lm", "stories", 50),
    ("llama-tiny", "decoder", "causal_lm", "stories", 50),
    ("bert-test-tiny", "encoder", "mlm", "stories", 50),
    ("roberta-test-tiny", "encoder", "mlm", "stories", 50),
    ("bert-test-tiny", "encoder", "classification", "sentiment", 50),
])
def test_debug_passes(tmp_path, preset, model_type, pipeline, corpus, steps):
    run_file = tmp_path / "debug.yaml"
    run_file.write_text(DEBUG_RUN.format(preset=preset, model_type=model_type, pipeline=pipeline, corpus=corpus,
                                         steps=steps))
    done = subprocess.run([sys.executable, "rafale/main", "-c", str(run_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "DEBUG": "1"})
    assert done.returncode == 0 and "DEBUG PASS" in done.stdout, done.stdout + done.stderr
