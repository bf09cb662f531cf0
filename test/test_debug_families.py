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
model:
  config: "{preset}"
data:
  pipeline: "{pipeline}"
  config:
    name: "debug"
    dataset_path: "synthetic:{corpus}"
    synthetic_documents: 100
    vocab_size: 300
    max_sequence_length: {length}
    train_batch_size: 8
{extra}"""


# SFT rows are whole records: the plain prompt template keeps them short at this tiny vocabulary.
SFT = '    prompt_template: "plain"\n'


@pytest.mark.parametrize("preset, pipeline, corpus, length, extra", [
    ("pythia-tiny", "causal_lm", "stories", 32, ""),
    ("llama-tiny", "causal_lm", "stories", 32, ""),
    ("bert-test-tiny", "mlm", "stories", 32, ""),
    ("roberta-test-tiny", "mlm", "stories", 32, ""),
    ("bert-test-tiny", "classification", "sentiment", 32, ""),
    ("pythia-tiny", "sft", "instructions", 96, SFT),
    ("llama-tiny", "sft", "instructions", 96, SFT),
])
def test_debug_passes(tmp_path, preset, pipeline, corpus, length, extra):
    run_file = tmp_path / "debug.yaml"
    run_file.write_text(DEBUG_RUN.format(preset=preset, pipeline=pipeline, corpus=corpus, length=length, extra=extra))
    done = subprocess.run([sys.executable, "rafale/main", "-c", str(run_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "DEBUG": "1"})
    assert done.returncode == 0 and "DEBUG PASS" in done.stdout, done.stdout + done.stderr
