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


# The families the shipped run files do not train (they cover Pythia and BERT in every task, at their real shapes),
# and the preference tasks, whose shipped run files start from the SFT run's export.
@pytest.mark.parametrize("preset, pipeline, corpus, length, extra", [
    ("llama-tiny", "causal_lm", "stories", 32, ""),
    ("roberta-test-tiny", "mlm", "stories", 32, ""),
    ("roberta-test-tiny", "classification", "sentiment", 32, ""),
    ("llama-tiny", "sft", "instructions", 96, SFT),
    ("pythia-tiny", "preference", "preferences", 96, SFT),
    ("llama-tiny", "kto", "preferences", 96, SFT),
])
def test_debug_passes(tmp_path, monkeypatch, capsys, preset, pipeline, corpus, length, extra):
    """In this process (the shipped run files below go through the command line): DEBUG=1's own verdict."""
    from rafale.config import load_run_file
    from rafale.train import debug_run

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    run_file = tmp_path / "debug.yaml"
    run_file.write_text(DEBUG_RUN.format(preset=preset, pipeline=pipeline, corpus=corpus, length=length, extra=extra))
    passed = debug_run(load_run_file(run_file))
    output = capsys.readouterr().out
    assert passed and "DEBUG PASS" in output, output


def test_a_decoder_that_sees_the_future_fails_although_its_loss_falls(tmp_path, monkeypatch, capsys):
    """Attention without its causal mask lets each position copy the next token: the loss falls faster than a
    healthy model's, so only the causality check can tell."""
    import torch.nn.functional as F

    from rafale.config import load_run_file
    from rafale.train import debug_run

    attention = F.scaled_dot_product_attention

    def leaking(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        return attention(q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=False, **kwargs)

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    run_file = tmp_path / "debug.yaml"
    run_file.write_text(DEBUG_RUN.format(preset="pythia-tiny", pipeline="causal_lm", corpus="stories", length=32,
                                         extra=""))
    config = load_run_file(run_file)
    assert debug_run(config)
    monkeypatch.setattr(F, "scaled_dot_product_attention", leaking)
    assert not debug_run(config)
    output = capsys.readouterr().out
    assert "DEBUG FAIL: the model sees the future: changing tokens" in output
    # Its loss did fall: the loss alone would have passed it.
    import re

    leaked_share = float(re.findall(r"DEBUG FAIL: loss \S+ -> \S+ \(([\d.]+)% of the first\)", output)[-1])
    assert leaked_share <= 10


@pytest.mark.parametrize("name", ["pythia_tinystories.yaml", "bert_tiny_mlm.yaml", "bert_tiny_classify.yaml",
                                  "pythia_sft.yaml"])
def test_debug_passes_on_the_shipped_run_files(tmp_path, name):
    """The README's own DEBUG=1 commands, on the run files as shipped: a healthy model must pass."""
    done = subprocess.run([sys.executable, "rafale/main", "-c", f"test/{name}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "DEBUG": "1"})
    assert done.returncode == 0 and "DEBUG PASS" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
