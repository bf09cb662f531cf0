"""Padding-free batches: whole documents packed into rows (best-fit decreasing), attention and positions that stay
inside each document, labels that never cross a boundary, and the same loss and gradients as the documents one by
one, for every decoder family."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rafale.data.packing import best_fit_decreasing, packed_rows
from rafale.models import build_model
from rafale.models.masks import document_mask, document_positions
from rafale.tasks import new_task
from rafale.tasks.model import TaskModel

ROOT = Path(__file__).resolve().parents[1]


def test_best_fit_decreasing_places_each_document_once_in_the_tightest_row():
    assert best_fit_decreasing([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (500,), generator=generator).tolist()
    rows = best_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # Close to the lower bound: the total over a row, or one row for each document longer than half a row.
    lower = max(-(-sum(lengths) // 64), sum(length > 32 for length in lengths))
    assert len(rows) <= 1.02 * lower + 1
    assert rows == best_fit_decreasing(lengths, 64)
    with pytest.raises(ValueError, match="more than a row's 4"):
        best_fit_decreasing([5], 4)


def test_packed_rows_carry_document_ids_positions_restart_and_attention_stays_inside():
    rows = packed_rows([[1, 2, 3], [4, 5], [6]], capacity=4, labels=[[-100, 2, 3], [4, 5], [-100]])
    assert rows["input_ids"] == [[1, 2, 3, 6], [4, 5]]
    assert rows["document_ids"] == [[1, 1, 1, 2], [1, 1]]
    assert rows["labels"] == [[-100, 2, 3, -100], [4, 5]]
    ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = document_mask(ids)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # the second document, causally
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself: no empty row, no NaN


FAMILIES = [("pythia-tiny", {}), ("llama-tiny", {}), ("pythia-tiny", {"positions": "learned"}),
            ("llama-tiny", {"n_kv_heads": 1, "tie_embeddings": True})]


@pytest.mark.parametrize("preset, overrides", FAMILIES)
def test_a_packed_batch_has_the_loss_and_gradients_of_its_documents_one_by_one(preset, overrides):
    torch.manual_seed(0)
    model = build_model(preset, overrides)
    task = TaskModel(new_task("sft"), model)
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 128, (n,), generator=generator).tolist() for n in (7, 3, 9, 5, 4, 12)]
    # Prompts carry no label: the first two tokens of every document.
    labels = [[-100, -100] + document[2:] for document in documents]
    rows = packed_rows(documents, capacity=16, labels=labels)
    width = 16
    batch = {"input_ids": torch.zeros(len(rows["input_ids"]), width, dtype=torch.long)}
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["document_ids"] = torch.zeros_like(batch["input_ids"])
    for i, (ids, row_labels, doc_ids) in enumerate(zip(rows["input_ids"], rows["labels"], rows["document_ids"])):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["labels"][i, :len(ids)] = torch.tensor(row_labels)
        batch["document_ids"][i, :len(ids)] = torch.tensor(doc_ids)
    batch["attention_mask"] = (batch["document_ids"] != 0).long()
    packed_loss = task(batch)
    packed_loss.backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    total_tokens = sum(sum(label != -100 for label in row[1:]) for row in labels)
    summed = 0.0
    for document, row_labels in zip(documents, labels):
        one = {"input_ids": torch.tensor([document]), "attention_mask": torch.ones(1, len(document), dtype=torch.long),
               "labels": torch.tensor([row_labels])}
        count = sum(label != -100 for label in row_labels[1:])
        loss = task(one) * count / total_tokens
        loss.backward()
        summed += float(loss)
    assert task.task.loss_tokens(batch) == total_tokens
    torch.testing.assert_close(float(packed_loss), summed, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def write_run(folder: Path, name: str, data: dict, pipeline: str = "sft") -> Path:
    config = {"run": {"name": name, "max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba",
                      "sample_max_new_tokens": 4},
              "model": {"config": "pythia-tiny"},
              "data": {"pipeline": pipeline, "config": {"name": name, "vocab_size": 320, "max_sequence_length": 96,
                                                        "train_batch_size": 8, "eval_batch_size": 8, **data}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sft_rows_pack_whole_records_and_the_summary_says_how_full_the_rows_are(tmp_path, monkeypatch):
    from rafale.config import load_run_file
    from rafale.data import build_dataloaders, format_summary, prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    common = {"dataset_path": "synthetic:instructions", "synthetic_documents": 300, "prompt_template": "plain"}
    padded = prepare_data(load_run_file(write_run(tmp_path, "padded", common)))
    config = load_run_file(write_run(tmp_path, "packed", {**common, "packing": "documents"}))
    packed = prepare_data(config)
    train = packed.splits["train"]
    # The same records and tokens, in fewer rows; each row's documents are whole records of the padded split.
    assert sum(len(row) for row in train["input_ids"]) == sum(len(row) for row in padded.splits["train"]["input_ids"])
    assert len(train) < len(padded.splits["train"]) / 2
    records = {tuple(row) for row in padded.splits["train"]["input_ids"]}
    for ids, documents in zip(train["input_ids"][:20], train["document_ids"][:20]):
        assert len(ids) <= 96
        for number in set(documents):
            assert tuple(t for t, d in zip(ids, documents) if d == number) in records
    summary = format_summary(packed)
    assert "packing    documents:" in summary and "% of the train rows' slots hold tokens" in summary
    # The held-out split keeps one record a row, with its prompt, for the exact-match score.
    assert "document_ids" not in packed.splits["validation"].column_names
    train_loader, _ = build_dataloaders(config.task, packed, config.data.config, seed=0)
    batch = next(iter(train_loader))
    assert "document_ids" in batch and (batch["document_ids"][batch["attention_mask"] == 0] == 0).all()


def test_pretraining_on_whole_documents(tmp_path, monkeypatch):
    from rafale.config import load_run_file
    from rafale.data import format_summary, prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "docs.txt").write_text("\n\n".join(("word " * n).strip() for n in (3, 40, 7, 150, 12, 60, 5, 9)))
    data = {"dataset_path": str(tmp_path / "docs.txt"), "packing": "documents", "max_sequence_length": 64,
            "shuffle_dataset": False, "validation_fraction": 0.25}
    kept = prepare_data(load_run_file(write_run(tmp_path, "cut", data, pipeline="causal_lm")))
    rows = kept.splits["train"]
    assert all(len(row) <= 64 for row in rows["input_ids"])
    # One document of 150 words does not fit a row: cut to one (the default) or dropped.
    assert kept.summary["train"]["longer than a row"] == 1 and "1 longer than a row" in format_summary(kept)
    dropped = prepare_data(load_run_file(write_run(tmp_path, "drop", {**data, "overflow": "drop"},
                                                   pipeline="causal_lm")))
    assert sum(len(r) for r in dropped.splits["train"]["input_ids"]) < sum(len(r) for r in rows["input_ids"])


def test_debug_passes_on_packed_rows(tmp_path):
    """DEBUG=1 on packed SFT rows: the loss falls, and the model does not see the future."""
    import subprocess

    environment = {**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    path = write_run(tmp_path, "run", {"dataset_path": "synthetic:instructions", "synthetic_documents": 300,
                                       "prompt_template": "plain", "packing": "documents"})
    done = subprocess.run([sys.executable, "-m", "rafale", "-c", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**environment, "DEBUG": "1"})
    assert done.returncode == 0 and "DEBUG PASS" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_per_document_log_probs_of_a_packed_row_equal_each_document_alone():
    from rafale.models.loss import document_log_probs, sequence_log_probs
    from rafale.tasks.causal_lm import next_token_labels

    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    generator = torch.Generator().manual_seed(2)
    documents = [torch.randint(0, 128, (n,), generator=generator).tolist() for n in (6, 9, 4)]
    labels = [[-100, -100] + document[2:] for document in documents]  # a prompt of two tokens each
    rows = packed_rows(documents, capacity=20, labels=labels)
    ids, row_labels, doc_ids = (torch.tensor(rows[key]) for key in ("input_ids", "labels", "document_ids"))
    targets = next_token_labels(row_labels, doc_ids)
    with torch.no_grad():
        losses = model(ids, labels=targets, document_ids=doc_ids, reduction="none")
        packed, counts = document_log_probs(losses, targets, doc_ids)
        # All three fit one row, in the order best-fit decreasing placed them.
        for slot, member in enumerate(best_fit_decreasing([len(d) for d in documents], 20)[0]):
            alone_targets = next_token_labels(torch.tensor([labels[member]]))
            alone = model(torch.tensor([documents[member]]), labels=alone_targets, reduction="none")
            expected, count = sequence_log_probs(alone, alone_targets)
            torch.testing.assert_close(packed[0, slot], expected[0], rtol=1e-5, atol=1e-5)
            assert counts[0, slot] == count[0]
