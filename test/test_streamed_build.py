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
