"""Masked language modelling: masking in the collator, the MLM pipeline and its cache, a run and its export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rafale.config import RunFile
from rafale.data import prepare_data
from rafale.tasks.mlm import MLMCollator

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers"
IGNORE = -100
# A made-up vocabulary: ids 0 to 4 are special ([PAD], [UNK], [CLS], [SEP], [MASK]), the rest ordinary.
PAD, CLS, SEP, MASK, SPECIAL, VOCAB = 0, 2, 3, 4, [0, 1, 2, 3, 4], 1000


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def framed_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows [CLS] ordinary ids [SEP] of lengths from 3 to 128 (so that the batch has padding)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        inner = torch.randint(5, VOCAB, (int(torch.randint(1, 127, (1,), generator=generator)),), generator=generator)
        rows.append({"input_ids": [CLS, *inner.tolist(), SEP]})
    return rows


def collator(seed: int = 0, probability: float = 0.15) -> MLMCollator:
    return MLMCollator(PAD, 128, MASK, SPECIAL, VOCAB, probability=probability, seed=seed)


def test_masking_statistics_follow_bert():
    rows = framed_rows(400)
    batch = collator()(rows)
    original = collator(probability=1e-9).pad(rows)["input_ids"]
    maskable = (batch["attention_mask"] == 1) & (original != CLS) & (original != SEP)
    chosen = batch["labels"] != IGNORE
    assert 0.14 < chosen.sum() / maskable.sum() < 0.16
    assert torch.equal(batch["labels"][chosen], original[chosen])
    as_mask = (batch["input_ids"] == MASK) & chosen
    unchanged = (batch["input_ids"] == original) & chosen
    replaced = chosen & ~as_mask & ~unchanged
    assert 0.78 < as_mask.sum() / chosen.sum() < 0.82
    assert 0.08 < unchanged.sum() / chosen.sum() < 0.12
    assert 0.08 < replaced.sum() / chosen.sum() < 0.12
    # A random replacement is an ordinary token, never a special one.
    assert (batch["input_ids"][replaced] >= 5).all()


def test_special_tokens_and_padding_are_never_masked():
    rows = framed_rows(200, seed=1)
    batch = collator(probability=0.9)(rows)
    original = collator(probability=1e-9).pad(rows)["input_ids"]
    special_or_pad = (original == CLS) | (original == SEP) | (batch["attention_mask"] == 0)
    assert (batch["labels"][special_or_pad] == IGNORE).all()
    assert torch.equal(batch["input_ids"][special_or_pad], original[special_or_pad])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()


def test_masking_is_deterministic_by_seed_and_batch():
    rows = framed_rows(16, seed=2)
    first, again = collator(seed=7)(rows), collator(seed=7)(rows)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["labels"], collator(seed=8)(rows)["labels"])
    assert not torch.equal(first["labels"][:8], collator(seed=7)(rows[:8] + rows[:8])["labels"][8:])


def test_a_batch_always_has_something_to_predict():
    batch = collator(probability=1e-6)([{"input_ids": [CLS, 10, 11, SEP]}])
    assert (batch["labels"] != IGNORE).sum() == 1


def mlm_run_file(**data) -> RunFile:
    settings = {"name": "tiny-mlm", "dataset_path": "synthetic:stories", "synthetic_documents": 60,
                "vocab_size": 400, "max_sequence_length": 32, **data}
    return RunFile.model_validate({"run": {"name": "t"}, "model": {"config": "bert-test-tiny", "type": "encoder"},
                                   "data": {"pipeline": "mlm", "config": settings}})


def test_chunked_rows_are_framed_blocks_and_the_cache_is_reused_or_rebuilt():
    prepared = prepare_data(mlm_run_file())
    tokenizer = prepared.tokenizer
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    rows = prepared.splits["train"]["input_ids"]
    assert {len(row) for row in rows} == {32}
    assert all(row[0] == cls and row[-1] == sep for row in rows)
    # Inside the frames, the documents follow each other, each ended by [SEP].
    text = tokenizer.decode([t for row in rows[:3] for t in row[1:-1]], skip_special_tokens=False)
    assert text.startswith("Once") or text.split()[0][0].isupper()
    assert "wordpiece400" in prepared.path.name and tokenizer.token_to_id("[MASK]") is not None

    assert prepare_data(mlm_run_file(mlm_probability=0.3, train_batch_size=4)).reused  # masking is the collator's
    truncated = prepare_data(mlm_run_file(mlm_truncate="truncate"))
    assert not truncated.reused and truncated.path != prepared.path
    rows = truncated.splits["train"]["input_ids"]
    assert len(rows) == truncated.summary["train"]["documents"]
    assert all(len(row) <= 32 and row[0] == cls and row[-1] == sep for row in rows)


@pytest.mark.parametrize("name, frame, mask", [("bert-base-uncased", ("[CLS]", "[SEP]"), "[MASK]"),
                                               ("roberta-base", ("<s>", "</s>"), "<mask>")])
def test_a_pretrained_tokenizer_frames_rows_with_its_own_special_tokens(name, frame, mask):
    if not (TOKENIZERS / name).is_dir():
        pytest.skip(f"needs ../shared/assets/tokenizers/{name} (absent)")
    config = mlm_run_file(tokenizer_path=str(TOKENIZERS / name), mlm_truncate="truncate")
    prepared = prepare_data(config)
    tokenizer = prepared.tokenizer
    row = prepared.splits["train"]["input_ids"][0]
    assert (tokenizer.id_to_token(row[0]), tokenizer.id_to_token(row[-1])) == frame
    batch = config.task.collator(prepared, config.data.config, seed=0)([{"input_ids": row}] * 8)
    assert tokenizer.token_to_id(mask) in batch["input_ids"]


def test_a_tokenizer_without_a_mask_token_is_refused():
    neox = TOKENIZERS / "gpt-neox-20b"
    if not neox.is_dir():
        pytest.skip("needs ../shared/assets/tokenizers/gpt-neox-20b (absent)")
    from rafale.errors import RafaleError

    with pytest.raises(RafaleError, match="data.config.tokenizer_path: .* has no mask token"):
        prepare_data(mlm_run_file(tokenizer_path=str(neox)))


def test_the_preset_must_be_of_the_model_type():
    from rafale.errors import RafaleError
    from rafale.train import build_language_model

    config = mlm_run_file()
    prepared = prepare_data(config)
    config.model.config = "pythia-tiny"
    expected = "model.config: 'pythia-tiny' is a decoder preset, but data.pipeline 'mlm' trains an encoder; valid: "
    with pytest.raises(RafaleError, match=expected):
        build_language_model(config, prepared)
    config.model.config, config.model.max_position_embeddings = "roberta-test-tiny", 32
    with pytest.raises(RafaleError, match="data.config.max_sequence_length: 32 is longer than the model's 31"):
        build_language_model(config, prepared)


MLM_RUN = """\
run:
  name: "tiny-mlm"
  seed: 3
  max_duration: "6ba"
  max_lr: 3e-3
  eval_interval: "3ba"
  save_interval: "6ba"
  sample_prompts: ["Once upon a time, there was a [MASK]."]
model:
  config: "{preset}"
  type: "encoder"
  mode: "mlm"
data:
  pipeline: "mlm"
  config:
    name: "tiny-stories"
    dataset_path: "synthetic:stories"
    synthetic_documents: 200
    vocab_size: 400
    max_sequence_length: 32
    train_batch_size: 8
    eval_batch_size: 16
"""


def rafale(run_file: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "rafale/main", "-c", str(run_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAFALE_CACHE_DIR": str(cache), **env})


@pytest.mark.parametrize("preset, model_type", [("bert-test-tiny", "bert"), ("roberta-test-tiny", "roberta")])
def test_an_mlm_run_exports_a_model_transformers_loads(tmp_path, preset, model_type):
    transformers = pytest.importorskip("transformers")
    from rafale.models import load_pretrained

    run_file = tmp_path / "mlm.yaml"
    run_file.write_text(MLM_RUN.format(preset=preset))
    done = rafale(run_file, tmp_path / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "masked accuracy" in done.stdout and "fill-mask:" in done.stdout

    exported = tmp_path / "cache" / "checkpoints" / "tiny-mlm" / "model"
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [f"{model_type.title()}ForMaskedLM"]
    ours = load_pretrained(exported)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id == config["pad_token_id"]
    batch = tokenizer(["Once upon a time, there was a [MASK].", "The cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        difference = (ours(batch["input_ids"], attention_mask=batch["attention_mask"])
                      - theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    # Outputs at padding mean nothing (and the two differ there): compare the real tokens'.
    assert difference[batch["attention_mask"].bool()].abs().max().item() < 1e-4
