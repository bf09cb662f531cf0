"""Building shard by shard: the blocks are exactly the global chunking's, written as they are cut, with a progress
line on terminals only."""

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset

from rafale.config import RunFile
from rafale.data import prepare_data, progress
from rafale.data.chunking import chunk
from rafale.data.instructions import generate_instructions
from rafale.data.packing import packed_rows
from rafale.data.progress import BuildProgress
from rafale.data.synthetic import generate_stories
from rafale.data.tokenizer import BPE, train_tokenizer

STORIES = generate_stories(60, seed=3)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def corpus(tmp_path: Path) -> Path:
    source = tmp_path / "stories.jsonl"
    source.write_text("".join(json.dumps({"text": story}) + "\n" for story in STORIES), encoding="utf-8")
    return source


def prepared(source: Path, pipeline: str = "causal_lm", **data):
    settings = {"name": "shards", "dataset_path": str(source), "vocab_size": 300, "shuffle_dataset": False,
                "validation_fraction": 0.1, **data}
    model = "bert-tiny" if pipeline == "mlm" else "tiny"
    return prepare_data(RunFile.model_validate({"run": {"name": "t"}, "model": {"config": model},
                                                "data": {"pipeline": pipeline, "config": settings}}))


def global_blocks(data, documents: list[str], length: int, tail: str) -> list[list[int]]:
    """The reference: every document's ids and EOS in one list, cut into blocks of `length`."""
    ids = [token for document in documents
           for token in data.tokenizer.encode(document, add_special_tokens=False).ids + [data.eos_token_id]]
    kept = len(ids) if tail == "pad" else len(ids) - len(ids) % length
    return [ids[start:min(start + length, kept)] for start in range(0, kept, length)]


@pytest.mark.parametrize("length", [16, 700])  # blocks shorter than a document, and longer than a shard
@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_blocks_cut_shard_by_shard_are_the_global_chunking(tmp_path, length, tail):
    source = corpus(tmp_path)
    # Shards of 1 and 7 documents (each carries its tail into the next), and two tokenizing processes.
    builds = [prepared(source, max_sequence_length=length, tail=tail, build_shard_documents=shard,
                       num_processes=processes) for shard, processes in [(1, 1), (7, 2), (4096, 1)]]
    for data in builds:
        # The shard size and process count are not in the cache key: the second and third builds reuse the first.
        assert data.path == builds[0].path
    first = builds[0]
    train, validation = STORIES[:54], STORIES[54:]
    for split, documents in (("train", train), ("validation", validation)):
        expected = global_blocks(first, documents, length, tail)
        assert first.splits[split]["input_ids"][:] == expected
        assert first.summary[split]["tokens"] == sum(map(len, expected))
    # Built afresh with other shard sizes and processes, the blocks are the same.
    for shard, processes in [(7, 2), (4096, 1)]:
        again = prepared(source, max_sequence_length=length, tail=tail, build_shard_documents=shard,
                         num_processes=processes, name=f"shards{shard}")
        assert not again.reused
        for split in ("train", "validation"):
            assert again.splits[split]["input_ids"][:] == first.splits[split]["input_ids"][:]


def test_mlm_blocks_are_the_global_chunking_framed(tmp_path):
    data = prepared(corpus(tmp_path), "mlm", max_sequence_length=20, tail="pad", build_shard_documents=3,
                    num_processes=2)
    cls, sep = data.tokenizer.token_to_id("[CLS]"), data.tokenizer.token_to_id("[SEP]")
    # The separator ends each document; blocks of 18 leave room for [CLS] and [SEP].
    expected = [[cls, *block, sep] for block in global_blocks(data, STORIES[:54], 18, "pad")]
    assert data.splits["train"]["input_ids"][:] == expected


def test_blocks_are_written_shard_by_shard(tmp_path):
    documents = Dataset.from_dict({"text": STORIES})
    tokenizer = train_tokenizer(documents, "text", 300, "stories", BPE)
    settings = RunFile.model_validate({"run": {"name": "t"}, "model": {"config": "tiny"}, "data": {"config": {
        "name": "t", "dataset_path": "synthetic:stories", "max_sequence_length": 16,
        "build_shard_documents": 5}}}).data.config
    blocks_file = tmp_path / "blocks.arrow"
    blocks, kept = chunk(documents, "text", tokenizer, 0, settings, "train", blocks_file)
    with pa.OSFile(str(blocks_file)) as source:
        batches = list(pa.ipc.open_stream(source))
    # One record batch per shard of 5 documents: never more than a shard's tokens (and a carried tail) at once.
    assert len(batches) == 12
    longest_shard = max(sum(len(tokenizer.encode(text).ids) + 1 for text in STORIES[start:start + 5])
                        for start in range(0, 60, 5))
    assert max(batch.num_rows for batch in batches) * 16 <= longest_shard + 15
    assert sum(batch.num_rows for batch in batches) == len(blocks) == kept // 16
    # Training reads the file memory-mapped, not a copy in memory.
    assert blocks.cache_files and blocks.cache_files[0]["filename"] == str(blocks_file)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_SECONDS", 0.0)
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        shown = BuildProgress("tokenizing train", 40, stream)
        shown.update(10, 2_500)
        shown.update(10, 2_500)
        shown.close()
    lines = terminal.getvalue().split("\r")[1:]
    assert re.fullmatch(r"rafale: tokenizing train: 10 of 40 documents, 2,500 tokens, [\d.]+M tokens/s, "
                        r"\d+:\d\d left\x1b\[K", lines[0])
    assert lines[-1].startswith("rafale: tokenizing train: 20 of 40 documents, 5,000 tokens,")
    assert terminal.getvalue().count("\n") == 1 and terminal.getvalue().endswith("\n")
    assert log.getvalue() == ""


def test_a_short_build_prints_no_progress():
    terminal = Terminal()
    shown = BuildProgress("tokenizing train", 40, terminal)
    shown.update(40, 9_000)
    shown.close()
    assert terminal.getvalue() == ""


def test_a_rebuild_writes_the_same_bytes(tmp_path, monkeypatch):
    source = corpus(tmp_path)

    def arrow_files(cache: str, **data) -> dict[str, bytes]:
        monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / cache))
        folder = prepared(source, max_sequence_length=32, **data).path
        return {str(file.relative_to(folder)): file.read_bytes() for file in sorted(folder.rglob("*.arrow"))}

    first = arrow_files("first")
    assert first and first == arrow_files("again") == arrow_files("sharded", build_shard_documents=3, num_processes=2)


def reference_documents(data, documents: list[str], length: int) -> list[list[int]]:
    """Each document's ids and EOS, cut to a row: what the one-shot build packs."""
    return [(data.tokenizer.encode(document, add_special_tokens=False).ids + [data.eos_token_id])[:length]
            for document in documents]


# Stories of 235 to 333 tokens: rows of 520 hold one or two; in rows of 290, about half the stories are cut.
@pytest.mark.parametrize("packing, length", [("documents", 520), ("none", 290)])
def test_whole_document_rows_built_shard_by_shard_are_the_one_shot_rows(tmp_path, packing, length):
    source = corpus(tmp_path)
    builds = [prepared(source, packing=packing, max_sequence_length=length, build_shard_documents=shard,
                       num_processes=processes, name=f"whole{shard}") for shard, processes in [(4096, 1), (4, 2)]]
    one_shot, sharded = builds
    assert not sharded.reused and sharded.path != one_shot.path
    for split, documents in (("train", STORIES[:54]), ("validation", STORIES[54:])):
        expected = reference_documents(one_shot, documents, length)
        if packing == "documents":
            rows = packed_rows(expected, length)
            expected = rows["input_ids"]
            assert sharded.splits[split]["document_ids"][:] == one_shot.splits[split]["document_ids"][:] \
                == rows["document_ids"]
        assert sharded.splits[split]["input_ids"][:] == one_shot.splits[split]["input_ids"][:] == expected
        assert sharded.summary[split] == one_shot.summary[split]
    if packing == "documents":
        assert one_shot.summary["train"]["blocks"] < 54
    else:
        assert 0 < one_shot.summary["train"]["longer than a row"] < 54


def test_best_fit_decreasing_packs_window_by_window(tmp_path):
    source = corpus(tmp_path)
    whole = prepared(source, packing="documents", max_sequence_length=520)
    windowed = prepared(source, packing="documents", max_sequence_length=520, packing_window_documents=10,
                        build_shard_documents=3)
    # The window shapes the rows: its own cache folder.
    assert windowed.path != whole.path
    documents = reference_documents(whole, STORIES[:54], 520)
    expected = [row for start in range(0, 54, 10) for row in packed_rows(documents[start:start + 10], 520)["input_ids"]]
    assert windowed.splits["train"]["input_ids"][:] == expected
    assert len(expected) > whole.summary["train"]["blocks"]
    # A split that fits in one window (validation: 6 documents) is packed as a whole.
    assert windowed.splits["validation"][:] == whole.splits["validation"][:]


# Rows of SFT_ROW tokens: some records are cut or dropped.
SFT_ROW = 128


def instructions(tmp_path: Path) -> Path:
    source = tmp_path / "records.jsonl"
    records = generate_instructions(50, seed=4)
    source.write_text("".join(json.dumps({key: record[key] for key in ("instruction", "input", "output")}) + "\n"
                              for record in records), encoding="utf-8")
    return source


@pytest.mark.parametrize("packing", ["documents", "none"])
def test_sft_rows_built_shard_by_shard_are_the_one_shot_rows(tmp_path, packing):
    source = instructions(tmp_path)
    one_shot, sharded = (prepared(source, "sft", packing=packing, max_sequence_length=SFT_ROW,
                                  build_shard_documents=shard, name=f"sft{shard}") for shard in (4096, 3))
    assert not sharded.reused and sharded.path != one_shot.path
    for split in ("train", "validation"):
        assert sharded.splits[split][:] == one_shot.splits[split][:]
        assert sharded.splits[split].features == one_shot.splits[split].features
        assert sharded.summary[split] == one_shot.summary[split]
    assert one_shot.summary["train"]["truncated"] + one_shot.summary["train"]["dropped"] > 0
    assert {"prompt", "reference"} <= set(sharded.splits["validation"].column_names)
    if packing == "documents":
        # The records one a row, in order, packed at once: the one-shot packing.
        unpacked = prepared(source, "sft", max_sequence_length=SFT_ROW, name="sftnone").splits["train"]
        rows = packed_rows(unpacked["input_ids"][:], SFT_ROW, unpacked["labels"][:])
        assert sharded.splits["train"]["input_ids"][:] == rows["input_ids"]
        assert sharded.splits["train"]["labels"][:] == rows["labels"]


@pytest.mark.parametrize("pipeline, data", [
    ("causal_lm", {"packing": "documents"}), ("causal_lm", {"packing": "none"}), ("causal_lm", {}),
    ("mlm", {}), ("mlm", {"mlm_truncate": "truncate"}), ("classification", {}), ("sft", {})])
def test_every_build_shows_its_progress(tmp_path, monkeypatch, pipeline, data):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_SECONDS", 0.0)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    if pipeline == "sft":
        source = instructions(tmp_path)
    else:
        source = tmp_path / "labelled.jsonl"
        source.write_text("".join(json.dumps({"text": story, "label": i % 2}) + "\n"
                                  for i, story in enumerate(STORIES)))
    prepared(source, pipeline, max_sequence_length=SFT_ROW if pipeline == "sft" else 64, build_shard_documents=20,
             **data)
    lines = terminal.getvalue().split("\r")
    assert any(re.fullmatch(r"rafale: \w[\w ]* train: 20 of \d+ documents, [\d,]+ tokens, [\d.]+M tokens/s, "
                            r"\d+:\d\d left\x1b\[K", line) for line in lines), lines
    assert re.match(r"rafale: \w[\w ]* validation: (\d+) of \1 documents", lines[-1]), lines
