"""The datapipe: sources, tokenizer, blocks, cache reuse and rebuilds, crash safety, collator, errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from rafale.config import RunFile, load_run_file
from rafale.data import build_dataloaders, format_summary, prepare_data
from rafale.data import tokenizer as tokenizer_module
from rafale.data.collate import PaddingCollator
from rafale.data.synthetic import generate_stories
from rafale.errors import RafaleError

REPO = Path(__file__).resolve().parents[1]
NEOX = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers" / "gpt-neox-20b"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_file(**data) -> RunFile:
    settings = {"name": "tiny", "vocab_size": 300, "max_sequence_length": 16, **data}
    return RunFile.model_validate({"run": {"name": "t"}, "model": {"config": "tiny"}, "data": {"config": settings}})


def write_txt(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def joined(prepared, split: str) -> list[int]:
    return [token for row in prepared.splits[split]["input_ids"] for token in row]


def stream(prepared, documents: list[str]) -> list[int]:
    ids = []
    for document in documents:
        ids += prepared.tokenizer.encode(document, add_special_tokens=False).ids + [prepared.eos_token_id]
    return ids


def test_blocks_joined_are_the_tokenized_documents(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    train, validation = generate_stories(30, seed=1), generate_stories(6, seed=2)
    write_txt(folder / "train.txt", train)
    write_txt(folder / "validation.txt", validation)
    prepared = prepare_data(run_file(dataset_path=str(folder), tail="pad", shuffle_dataset=False))

    assert joined(prepared, "train") == stream(prepared, train)
    assert joined(prepared, "validation") == stream(prepared, validation)
    lengths = [len(row) for row in prepared.splits["train"]["input_ids"]]
    assert set(lengths[:-1]) == {16} and 0 < lengths[-1] <= 16
    assert prepared.summary["train"] == {"documents": 30, "tokens": len(stream(prepared, train)),
                                         "blocks": len(lengths)}
    assert prepared.summary["validation"]["documents"] == 6


def test_tail_drop_keeps_only_full_blocks(tmp_path):
    documents = generate_stories(30, seed=1)
    source = write_jsonl(tmp_path / "stories.jsonl", [{"text": d} for d in documents])
    prepared = prepare_data(run_file(dataset_path=str(source), shuffle_dataset=False, validation_fraction=0.1))
    train = documents[:27]
    expected = stream(prepared, train)
    assert joined(prepared, "train") == expected[: len(expected) // 16 * 16]
    assert {len(row) for row in prepared.splits["train"]["input_ids"]} == {16}
    # Not shuffled: validation is the end of the source.
    assert prepared.summary["validation"]["documents"] == 3


def test_one_or_two_processes_give_the_same_blocks(tmp_path, monkeypatch):
    def blocks(processes: int):
        monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / f"cache{processes}"))
        prepared = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=300,
                                         num_processes=processes))
        return prepared.path.name, [prepared.splits[s]["input_ids"] for s in ("train", "validation")]

    assert blocks(1) == blocks(2)


def test_cache_is_reused_without_tokenizing(monkeypatch):
    config = run_file(dataset_path="synthetic:stories", synthetic_documents=100)
    first = prepare_data(config)
    assert not first.reused
    built_at = (first.path / "meta.json").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("rafale.data.chunking.tokenized_shards", no_tokenizing)
    monkeypatch.setattr("rafale.data.chunking.chunk", no_tokenizing)
    # Batch sizes, process counts and shuffling of training blocks do not change the tokens.
    for change in ({}, {"train_batch_size": 3, "eval_batch_size": 5, "num_processes": 2, "shuffle_train": False}):
        again = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=100, **change))
        assert again.reused and again.path == first.path
        assert (again.path / "meta.json").stat().st_mtime_ns == built_at
        assert again.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
        assert again.tokenizer_file == first.path / "tokenizer.json"


@pytest.mark.parametrize("change", [{"max_sequence_length": 12}, {"vocab_size": 320}, {"text_column": "other"},
                                    {"tail": "pad"}, {"split_seed": 1}, {"validation_fraction": 0.2},
                                    {"shuffle_dataset": False}])
def test_a_setting_that_shapes_the_tokens_rebuilds(tmp_path, change):
    rows = [{"text": d, "other": d.upper()} for d in generate_stories(40, seed=0)]
    source = write_jsonl(tmp_path / "stories.jsonl", rows)
    first = prepare_data(run_file(dataset_path=str(source)))
    second = prepare_data(run_file(dataset_path=str(source), **change))
    assert not second.reused and second.path != first.path


def test_a_changed_source_file_rebuilds(tmp_path):
    source = write_txt(tmp_path / "stories.txt", generate_stories(30, seed=0))
    first = prepare_data(run_file(dataset_path=str(source)))
    write_txt(source, generate_stories(31, seed=0))
    second = prepare_data(run_file(dataset_path=str(source)))
    assert not second.reused and second.path != first.path
    assert second.summary["train"]["documents"] + second.summary["validation"]["documents"] == 31


def test_a_trained_tokenizer_is_reused_across_block_lengths(cache_dir):
    first = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=100))
    second = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=100,
                                   max_sequence_length=32))
    assert len(list((cache_dir / "tokenizers").glob("*.json"))) == 1
    assert first.tokenizer.to_str() == second.tokenizer.to_str()


def test_a_killed_build_is_never_reused(tmp_path, cache_dir):
    source = write_txt(tmp_path / "stories.txt", generate_stories(40, seed=0))
    config = run_file(dataset_path=str(source))
    # A build killed after loading the documents, as it starts tokenizing and cutting blocks.
    script = textwrap.dedent("""
        import os, signal, sys
        import rafale.data.chunking
        from rafale.config import RunFile
        from rafale.data import prepare_data
        rafale.data.chunking.chunk = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        prepare_data(RunFile.model_validate_json(sys.argv[1]))
    """)
    killed = subprocess.run([sys.executable, "-c", script, config.model_dump_json()], cwd=REPO,
                            capture_output=True, env={**os.environ, "RAFALE_CACHE_DIR": str(cache_dir)})
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    data = cache_dir / "data"
    assert [p.name.startswith(".") and ".partial-" in p.name for p in data.iterdir() if p.is_dir()] == [True]

    prepared = prepare_data(config)
    assert not prepared.reused
    assert [p for p in data.iterdir() if p.is_dir()] == [prepared.path]
    documents = prepared.summary["train"]["documents"] + prepared.summary["validation"]["documents"]
    assert documents == 40 and len(joined(prepared, "train")) == prepared.summary["train"]["blocks"] * 16


def test_two_processes_at_once_build_once(cache_dir):
    config = run_file(dataset_path="synthetic:stories", synthetic_documents=200).model_dump_json()
    script = textwrap.dedent("""
        import sys
        from rafale.config import RunFile
        from rafale.data import prepare_data
        print("reused" if prepare_data(RunFile.model_validate_json(sys.argv[1])).reused else "built")
    """)
    env = {**os.environ, "RAFALE_CACHE_DIR": str(cache_dir)}
    processes = [subprocess.Popen([sys.executable, "-c", script, config], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(2)]
    outcomes = sorted(p.communicate()[0].decode().strip() for p in processes)
    assert outcomes == ["built", "reused"]
    assert len([p for p in (cache_dir / "data").iterdir() if p.is_dir()]) == 1


def test_collator_pads_and_masks_labels():
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8, 9, 10, 11, 12])}]
    batch = PaddingCollator(pad_token_id=1, max_length=6)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1, 1], [8, 9, 10, 11, 12, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, -100, -100, -100], [8, 9, 10, 11, 12, -100]]
    assert all(t.dtype == torch.long for t in batch.values())

    to_longest = PaddingCollator(pad_token_id=0, max_length=4, pad_to_max=False)(rows)
    assert to_longest["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 11]]
    assert to_longest["labels"].tolist() == [[5, 6, 7, -100], [8, 9, 10, 11]]


def test_dataloaders_batch_the_blocks():
    config = run_file(dataset_path="synthetic:stories", synthetic_documents=100, tail="pad",
                      train_batch_size=4, eval_batch_size=3)
    prepared = prepare_data(config)
    train, evaluation = build_dataloaders(config.task, prepared, config.data.config, seed=0)
    batches = list(train)
    assert sum(len(b["input_ids"]) for b in batches) == prepared.summary["train"]["blocks"]
    assert batches[0]["input_ids"].shape == (4, 16)
    eval_rows = torch.cat([b["input_ids"] for b in evaluation])
    assert eval_rows.shape == (prepared.summary["validation"]["blocks"], 16)
    # Evaluation keeps its order; its padded tail (pad id, label -100) ends the last batch.
    last = list(evaluation)[-1]
    assert (last["labels"] == -100).any() == (prepared.summary["validation"]["tokens"] % 16 != 0)


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("First line\nstill the first.\n\n\n  \nSecond one.  \n \t\nThird\n", encoding="utf-8")
    prepared = prepare_data(run_file(dataset_path=str(source), shuffle_dataset=False, validation_fraction=0.3,
                                     tail="pad", max_sequence_length=4))
    expected = stream(prepared, ["First line\nstill the first.", "Second one."])
    assert joined(prepared, "train") == expected
    assert joined(prepared, "validation") == stream(prepared, ["Third"])


def test_save_to_disk_sources(tmp_path):
    import datasets

    stories = generate_stories(40, seed=5)
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"story": stories, "n": list(range(40))}).save_to_disk(str(single))
    prepared = prepare_data(run_file(dataset_path=str(single), text_column="story"))
    assert prepared.summary["train"]["documents"] + prepared.summary["validation"]["documents"] == 40

    with_validation = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories[:30]}),
                          "validation": datasets.Dataset.from_dict({"text": stories[30:]})}
                         ).save_to_disk(str(with_validation))
    before = sorted(p.name for p in with_validation.rglob("*"))
    prepared = prepare_data(run_file(dataset_path=str(with_validation), shuffle_dataset=False, tail="pad"))
    assert joined(prepared, "validation") == stream(prepared, stories[30:])
    # Nothing was written beside the source, so its fingerprint stays the same and the cache is reused.
    assert sorted(p.name for p in with_validation.rglob("*")) == before
    assert prepare_data(run_file(dataset_path=str(with_validation), shuffle_dataset=False, tail="pad")).reused


def test_a_glob_of_jsonl_files(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part{i}.jsonl", [{"text": d} for d in generate_stories(10, seed=i)])
    prepared = prepare_data(run_file(dataset_path=str(tmp_path / "part*.jsonl")))
    assert prepared.summary["train"]["documents"] + prepared.summary["validation"]["documents"] == 30


def test_is_prepared_loads_a_prepared_folder_as_is(tmp_path):
    prepared = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=60))
    again = prepare_data(run_file(dataset_path=str(prepared.path), is_prepared=True))
    assert again.reused and again.summary == prepared.summary
    assert again.splits["train"]["input_ids"] == prepared.splits["train"]["input_ids"]
    assert "reused" in format_summary(again) and str(prepared.path) in format_summary(again)

    # Saved elsewhere, without rafale's meta.json and tokenizer.json: counted, with the tokenizer named.
    elsewhere = tmp_path / "elsewhere"
    prepared.splits.save_to_disk(str(elsewhere))
    loaded = prepare_data(run_file(dataset_path=str(elsewhere), is_prepared=True,
                                   tokenizer_path=str(prepared.tokenizer_file)))
    assert loaded.summary["train"] == {**prepared.summary["train"], "documents": None}
    assert loaded.tokenizer_file == prepared.tokenizer_file
    with pytest.raises(RafaleError, match=r"elsewhere: has no tokenizer.json; set data.config.tokenizer_path"):
        prepare_data(run_file(dataset_path=str(elsewhere), is_prepared=True))


def test_a_run_file_with_a_relative_path(tmp_path):
    write_txt(tmp_path / "stories.txt", generate_stories(30, seed=0))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(textwrap.dedent("""
        run: {name: t}
        model: {config: tiny}
        data:
          config: {name: mine, dataset_path: stories.txt, vocab_size: 300, max_sequence_length: 16}
    """))
    prepared = prepare_data(load_run_file(run_yaml))
    assert prepared.path.name.startswith("mine_bpe300_len16_")
    summary = format_summary(prepared)
    assert "built" in summary and "train" in summary and "validation" in summary


def test_trained_tokenizer_round_trips_text():
    prepared = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=100))
    text = 'Once upon a time, "Zoë" found 3 shells 🐚 by the sea.\n  The end.'
    assert prepared.tokenizer.decode(prepared.tokenizer.encode(text).ids) == text
    assert prepared.tokenizer.token_to_id("<|endoftext|>") == prepared.eos_token_id == 0
    assert prepared.pad_token_id == prepared.tokenizer.token_to_id("<|padding|>") == 1


@pytest.mark.parametrize("kind", [tokenizer_module.BPE, tokenizer_module.WORDPIECE])
def test_a_tokenizer_trained_twice_on_the_same_texts_is_the_same(tmp_path, monkeypatch, kind):
    # tokenizers' own WordPiece trainer gave other tokens on each run (hash-map order); a fresh cache each time.
    documents = Dataset.from_dict({"text": generate_stories(600, 0)})
    trained = []
    for attempt in range(2):
        monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / f"cache{attempt}"))
        trained.append(tokenizer_module.train_tokenizer(documents, "text", 600, "stories", kind).to_str())
    assert trained[0] == trained[1]


def test_the_trained_wordpiece_has_every_character_in_both_forms_and_bert_framing():
    documents = Dataset.from_dict({"text": ["The fox ran to the box.", "A fox and an ox!"] * 20})
    tokenizer = tokenizer_module.train_tokenizer(documents, "text", 60, "foxes", tokenizer_module.WORDPIECE)
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in tokenizer_module.WORDPIECE_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # "x" only ever follows another letter here, yet a word that starts with it is still spelled out.
    assert {"x", "##x", "##o", "fox"} <= set(vocab)
    encoding = tokenizer.encode("xo fox", "box")
    assert encoding.tokens == ["[CLS]", "x", "##o", "fox", "[SEP]", "box", "[SEP]"]
    assert encoding.type_ids == [0, 0, 0, 0, 0, 1, 1]
    assert tokenizer.decode(encoding.ids) == "xo fox box"


def test_the_texts_own_private_use_characters_cannot_meet_the_stand_ins():
    # The trainer stands private-use characters in for continuations; BERT's normalizer drops the texts' own.
    own = "\U000F0000"
    documents = Dataset.from_dict({"text": [f"{own}a a{own} ab", "ba ab"] * 10})
    tokenizer = tokenizer_module.train_tokenizer(documents, "text", 40, "private", tokenizer_module.WORDPIECE)
    assert not any(own in token for token in tokenizer.get_vocab())
    assert tokenizer.encode(f"b{own}a", add_special_tokens=False).tokens == ["ba"]


@pytest.mark.skipif(not (NEOX / "tokenizer.json").is_file(), reason=f"no shared tokenizer at {NEOX}")
@pytest.mark.parametrize("path", [NEOX, NEOX / "tokenizer.json"])
def test_a_tokenizer_from_a_folder_or_file(path):
    prepared = prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=30,
                                     tokenizer_path=str(path), pad_token_id=-100))
    assert prepared.tokenizer.encode("Hello world").ids == [12092, 1533]
    assert prepared.path.name.startswith("tiny_gpt-neox-20b_len16_")
    assert (prepared.eos_token_id, prepared.pad_token_id) == (0, 1)


def test_missing_column_lists_the_columns(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"text": d, "label": 1} for d in generate_stories(10, seed=0)])
    with pytest.raises(RafaleError, match=r"data.config.text_column: column 'txt' not in .*; columns: text, label"):
        prepare_data(run_file(dataset_path=str(source), text_column="txt"))


def test_too_small_for_one_block(tmp_path):
    source = write_txt(tmp_path / "s.txt", ["One tiny story.", "And another one.", "A third."])
    with pytest.raises(RafaleError, match=r"data.config.max_sequence_length: the train split has \d+ tokens, "
                                          r"fewer than one block of 4096"):
        prepare_data(run_file(dataset_path=str(source), max_sequence_length=4096))


def test_missing_source(tmp_path):
    with pytest.raises(RafaleError, match=r"data.config.dataset_path: no such file or folder: .*nothing.txt"):
        prepare_data(run_file(dataset_path=str(tmp_path / "nothing.txt")))


def test_empty_source(tmp_path):
    source = tmp_path / "empty.txt"
    source.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(RafaleError, match=r"data.config.dataset_path: no documents in .*empty.txt"):
        prepare_data(run_file(dataset_path=str(source)))


def test_bytes_that_are_not_utf8(tmp_path):
    source = tmp_path / "latin1.txt"
    source.write_bytes("Un café.\n\nDeux ".encode() + "thé".encode("latin-1") + b".\n")
    with pytest.raises(RafaleError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        prepare_data(run_file(dataset_path=str(source)))


def test_a_tokenizer_that_does_not_load(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": "nothing like a tokenizer"}')
    with pytest.raises(RafaleError, match=r"data.config.tokenizer_path: could not load tokenizer .*tokenizer.json"):
        prepare_data(run_file(dataset_path="synthetic:stories", synthetic_documents=30, tokenizer_path=str(tmp_path)))
