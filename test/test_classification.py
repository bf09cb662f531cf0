"""Sequence classification: label mappings, sentence pairs, the synthetic sentiment set, a run and its export."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rafale.config import RunFile
from rafale.data import prepare_data
from rafale.data.sentiment import generate_sentiment
from rafale.errors import RafaleError
from rafale.tasks.classification import ClassificationCollator

ROOT = Path(__file__).resolve().parents[1]
SST2 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "corpora" / "sst2-validation"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_file(model: dict | None = None, **data) -> RunFile:
    settings = {"name": "tiny-cls", "vocab_size": 300, "max_sequence_length": 24, **data}
    return RunFile.model_validate({"run": {"name": "t"},
                                   "model": {"config": "bert-test-tiny", "type": "encoder", **(model or {})},
                                   "data": {"pipeline": "classification", "config": settings}})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def reviews(labels: list) -> list[dict]:
    texts, _ = generate_sentiment(len(labels), seed=5)
    return [{"text": text, "label": label} for text, label in zip(texts, labels)]


def labels_of(prepared, split: str = "train") -> list[str]:
    return [prepared.meta['labels'][i] for i in prepared.splits[split]["labels"]]


def test_label_names_become_sorted_class_ids(tmp_path):
    names = ["spam", "ham", "eggs"] * 10
    source = write_jsonl(tmp_path / "data.jsonl", reviews(names))
    prepared = prepare_data(run_file(dataset_path=str(source), shuffle_dataset=False, validation_fraction=0.1))
    assert prepared.meta['labels'] == ["eggs", "ham", "spam"]
    assert labels_of(prepared) + labels_of(prepared, "validation") == names


def test_integer_labels_are_their_own_class_ids(tmp_path):
    labels = [0, 3, 1] * 10
    source = write_jsonl(tmp_path / "data.jsonl", reviews(labels))
    prepared = prepare_data(run_file(dataset_path=str(source), shuffle_dataset=False, validation_fraction=0.1))
    assert prepared.meta['labels'] == ["0", "1", "2", "3"]
    assert list(prepared.splits["train"]["labels"]) + list(prepared.splits["validation"]["labels"]) == labels


def test_class_label_columns_keep_their_names():
    if not SST2.is_dir():
        pytest.skip("needs ../shared/assets/corpora/sst2-validation (absent)")
    prepared = prepare_data(run_file(dataset_path=str(SST2), text_column="sentence", vocab_size=2000))
    assert prepared.meta['labels'] == ["negative", "positive"]
    assert set(prepared.splits["train"]["labels"]) == {0, 1}


def test_rows_are_framed_and_cut_to_length(tmp_path):
    source = write_jsonl(tmp_path / "data.jsonl", reviews(["a", "b"] * 10) + [{"text": "word " * 100, "label": "a"}])
    prepared = prepare_data(run_file(dataset_path=str(source), max_sequence_length=16))
    cls, sep = prepared.tokenizer.token_to_id("[CLS]"), prepared.tokenizer.token_to_id("[SEP]")
    rows = list(prepared.splits["train"]["input_ids"]) + list(prepared.splits["validation"]["input_ids"])
    assert all(len(row) <= 16 and row[0] == cls and row[-1] == sep for row in rows)
    assert max(len(row) for row in rows) == 16


def test_sentence_pairs_get_segment_ids_and_the_collator_pads_them(tmp_path):
    rows = [{"premise": f"The cat sat on mat {i}.", "hypothesis": "A cat sat." * (1 + i % 3), "label": i % 2}
            for i in range(20)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = prepare_data(run_file(dataset_path=str(source), text_column="premise", text_pair_column="hypothesis"))
    train = prepared.splits["train"]
    assert set(train.column_names) == {"input_ids", "token_type_ids", "labels"}
    assert all(types[0] == 0 and types[-1] == 1 for types in train["token_type_ids"])
    batch = ClassificationCollator(prepared.pad_token_id, 24, pad_to_max=False)(list(train.select(range(4))))
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["labels"].shape == (4,)


def test_label_and_pair_columns_must_exist(tmp_path):
    source = write_jsonl(tmp_path / "data.jsonl", [{"text": "x", "y": 1}, {"text": "z", "y": 0}])
    with pytest.raises(RafaleError, match=r"data.config.label_column: column 'label' not in .*columns: text, y"):
        prepare_data(run_file(dataset_path=str(source)))
    with pytest.raises(RafaleError, match="data.config.text_pair_column: column 'other' not in"):
        prepare_data(run_file(dataset_path=str(source), label_column="y", text_pair_column="other"))


def test_n_classes_must_fit_the_data(tmp_path):
    from rafale.train import build_language_model

    names = write_jsonl(tmp_path / "names.jsonl", reviews(["a", "b", "c"] * 5))
    config = run_file(dataset_path=str(names))
    with pytest.raises(RafaleError, match=r"model.n_classes: 2, but the data has 3 classes \(a, b, c\)"):
        build_language_model(config, prepare_data(config))
    # Integer labels name their classes by number, so a class the data lacks is still class i.
    integers = write_jsonl(tmp_path / "integers.jsonl", reviews([0, 1] * 8))
    config = run_file({"n_classes": 3}, dataset_path=str(integers))
    model = build_language_model(config, prepare_data(config))
    assert model.config.num_labels == 3 and model.config.id2label == {0: "0", 1: "1", 2: "2"}


def test_synthetic_sentiment_is_deterministic_balanced_and_not_a_bag_of_words():
    texts, labels = generate_sentiment(2000, seed=1)
    assert (texts, labels) == generate_sentiment(2000, seed=1)
    assert generate_sentiment(50, seed=2) != generate_sentiment(50, seed=1)
    assert 0.45 < labels.count("positive") / len(labels) < 0.55
    assert len(set(texts)) > 0.95 * len(texts)
    # Negations and contrasts: the sentiment words alone would mislead.
    negated = [label for text, label in zip(texts, labels) if " not " in text]
    assert len(negated) > 0.1 * len(texts) and {"negative", "positive"} == set(negated)
    assert any(", but " in text for text in texts)


CLASSIFY_RUN = """\
run:
  name: "tiny-cls"
  seed: 1
  max_duration: "{steps}ba"
  max_lr: 2e-3
  warmup_pct: 0.05
  eval_interval: "{steps}ba"
  save_interval: "{steps}ba"
model:
  config: "bert-test-tiny"
  type: "encoder"
  mode: "cls"
  dropout: 0.0
data:
  pipeline: "imdb_bert"
  config:
    name: "tiny-sentiment"
    dataset_path: "synthetic:sentiment"
    synthetic_documents: 4000
    vocab_size: 1024
    max_sequence_length: 48
    train_batch_size: 32
    eval_batch_size: 100
    pad_inputs: false
"""


def test_a_short_run_learns_and_exports_a_classifier_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rafale.models import load_pretrained

    run = tmp_path / "cls.yaml"
    run.write_text(CLASSIFY_RUN.format(steps=120))
    environment = {**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "rafale/main", "-c", str(run)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    accuracy = float(re.search(r"validation: accuracy ([\d.]+)", done.stdout).group(1))
    assert accuracy > 0.8, done.stdout

    exported = tmp_path / "cache" / "checkpoints" / "tiny-cls" / "model"
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    ours = load_pretrained(exported)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    # Plain statements: a run this short has not learned negations yet.
    batch = tokenizer(["The soup was terrible.", "My friend Anna loved the film. It rained all day."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = theirs(**batch).logits
        difference = (ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]) - logits).abs().max()
    assert difference.item() < 1e-4
    assert [theirs.config.id2label[int(i)] for i in logits.argmax(-1)] == ["negative", "positive"]
