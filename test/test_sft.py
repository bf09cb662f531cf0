"""Supervised fine-tuning: records -> rows with labels on the responses only and an exact boundary; bad records are
one line naming the file, the line and the field; chat templates travel with the export; a run from pretrained
weights; the loss is normalised over the whole batch's response tokens; a killed run resumes bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from reference_checks import random_hf_decoder

from rafale.config import load_run_file

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run_file(folder: Path, name: str, data: dict, run: dict | None = None, model: dict | None = None) -> Path:
    config = {
        "run": {"name": name, "seed": 3, "max_duration": "6ba", "max_lr": 3e-3, "warmup_pct": 0.1,
                "eval_interval": "6ba", "save_interval": "3ba", "sample_max_new_tokens": 8, **(run or {})},
        "model": {"config": "pythia-tiny", **(model or {})},
        "data": {"pipeline": "sft", "config": {"name": name, "dataset_path": "synthetic:instructions",
                                               "synthetic_documents": 300, "prompt_template": "plain",
                                               "vocab_size": 320, "max_sequence_length": 96, "train_batch_size": 8,
                                               "eval_batch_size": 8, "eval_examples": 16, **data}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rafale(cache: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **QUIET, "RAFALE_CACHE_DIR": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rafale", *args], cwd=ROOT, env=environment, text=True,
                          capture_output=True, timeout=300)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def merging_tokenizer(folder: Path) -> Path:
    """A byte-level BPE that has learnt "xab" as one token, so that a prompt "xa" followed by a response "b"
    would merge across the boundary if the two were encoded together."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["xab " * 50, "xa b " * 3, "the cat sat"], trainer=trainer)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_the_prompt_response_boundary_is_exact_and_only_responses_carry_labels(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from rafale.data import build_dataloaders, prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    records = [{"input": "xa", "output": "b"}, {"input": "the cat", "output": " sat xab"}] * 4
    data = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), "format": "input_output",
            "tokenizer_path": str(merging_tokenizer(tmp_path)), "shuffle_dataset": False, "validation_fraction": 0.25}
    config = load_run_file(run_file(tmp_path, "boundary", data))
    prepared = prepare_data(config)
    tokenizer = Tokenizer.from_file(data["tokenizer_path"])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert encode("xab") != encode("xa") + encode("b")  # encoded together, the boundary would be lost
    eos = prepared.eos_token_id
    row = prepared.splits["train"][0]
    assert row["input_ids"] == encode("xa") + encode("b") + [eos]
    assert row["labels"] == [-100] * len(encode("xa")) + encode("b") + [eos]
    second = prepared.splits["train"][1]
    assert second["labels"] == [-100] * len(encode("the cat")) + encode(" sat xab") + [eos]
    # The held-out split keeps its prompts and answers as text, for the exact-match score; batches leave them out.
    assert prepared.splits["validation"][0]["prompt"] == "xa" and prepared.splits["validation"][0]["reference"] == "b"
    train, evaluation = build_dataloaders(config.task, prepared, config.data.config, seed=0)
    batch = next(iter(evaluation))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    # Padding carries no label; rows pad to the batch's longest.
    assert batch["input_ids"].shape[1] == max(len(r) for r in prepared.splits["validation"]["input_ids"])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_long_rows_are_cut_or_dropped_and_counted(tmp_path, monkeypatch):
    from rafale.data import format_summary, prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    short = {"input": "the cat", "output": "sat"}
    records = [short, {"input": "the cat " * 8, "output": "sat"}, {"input": "xa", "output": "b " * 20}] * 3 + [short]
    # Unshuffled, the validation split is the last record.
    common = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), "format": "input_output",
              "tokenizer_path": str(merging_tokenizer(tmp_path)), "max_sequence_length": 12,
              "validation_fraction": 0.1, "shuffle_dataset": False}
    truncated = prepare_data(load_run_file(run_file(tmp_path, "cut", common)))
    # The long prompt loses its whole response (dropped); the long response is cut (kept).
    assert {key: truncated.summary["train"][key] for key in ("truncated", "dropped", "blocks")} == \
        {"truncated": 3, "dropped": 3, "blocks": 6}
    assert all(len(row) <= 12 for split in truncated.splits.values() for row in split["input_ids"])
    assert "3 truncated, 3 dropped" in format_summary(truncated)
    dropped = prepare_data(load_run_file(run_file(tmp_path, "drop", {**common, "overflow": "drop"})))
    assert {key: dropped.summary["train"][key] for key in ("truncated", "dropped", "blocks")} == \
        {"truncated": 0, "dropped": 6, "blocks": 3}


def test_chat_records_train_on_assistant_turns_and_the_export_renders_them_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    conversations = [{"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": f"Say {word}."},
                                   {"role": "assistant", "content": word},
                                   {"role": "user", "content": "Again."},
                                   {"role": "assistant", "content": f"{word} {word}"}]}
                     for word in ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "star", "fish")] * 3
    data = {"dataset_path": str(write_jsonl(tmp_path / "chats.jsonl", conversations)), "format": "chat",
            "max_sequence_length": 128}
    cache = tmp_path / "cache"
    done = rafale(cache, "-c", str(run_file(tmp_path, "chat", data)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "held-out exact match:" in done.stdout and "format     chat" in done.stdout

    export = cache / "checkpoints" / "chat" / "model"
    hf = transformers.AutoTokenizer.from_pretrained(str(export))
    messages = conversations[0]["messages"]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    # What was trained: the rendered conversation, token for token, with labels on the assistant turns only.
    from rafale.data import prepare_data

    os.environ["RAFALE_CACHE_DIR"] = str(cache)
    try:
        prepared = prepare_data(load_run_file(tmp_path / "chat.yaml"))
    finally:
        del os.environ["RAFALE_CACHE_DIR"]
    rows = [row for split in prepared.splits.values() for row in split]
    texts = [prepared.tokenizer.decode(row["input_ids"], skip_special_tokens=False) for row in rows]
    assert rendered in texts
    row = rows[texts.index(rendered)]
    trained = prepared.tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100],
                                        skip_special_tokens=False)
    eos = hf.eos_token
    assert trained == f"red<|im_end|>{eos}\nred red<|im_end|>{eos}\n"

    # rafale generate --chat renders the user's message as transformers does, with the generation prompt.
    from rafale.models.generate import chat_prompts

    expected = hf.apply_chat_template([{"role": "user", "content": "Say red."}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat_prompts(export, ["Say red."]) == [expected]
    answered = rafale(cache, "generate", str(export), "--chat", "-p", "Say red.", "-n", "4")
    assert answered.returncode == 0 and answered.stdout.startswith("> Say red.\n"), answered.stderr


def test_alpaca_models_export_a_chat_template_that_renders_their_prompt(tmp_path):
    transformers = pytest.importorskip("transformers")
    cache = tmp_path / "cache"
    done = rafale(cache, "-c", str(run_file(tmp_path, "alpaca", {"prompt_template": "alpaca",
                                                                  "max_sequence_length": 192})))
    assert done.returncode == 0, done.stderr[-3000:]
    hf = transformers.AutoTokenizer.from_pretrained(str(cache / "checkpoints" / "alpaca" / "model"))
    conversation = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "red"}]
    assert hf.apply_chat_template(conversation, tokenize=False) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\nName a color.\n\n### Response:\nred{hf.eos_token}")


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    """A cache that already holds a prepared dataset, which a bad run must leave as it is."""
    folder = tmp_path_factory.mktemp("good")
    cache = folder / "cache"
    good = rafale(cache, "data", "-c", str(run_file(folder, "good", {})))
    assert good.returncode == 0, good.stderr
    return cache


@pytest.mark.parametrize(
    "records, settings, expected",
    [
        (['{"input": "a", "output": "b"}', '{"input": "c", "output": "d"}', '{"input": "e", "output": '],
         {"format": "input_output"}, r"train\.jsonl:3: invalid JSON"),
        ([{"instruction": "Say hi."}], {}, r"train\.jsonl:1: cannot tell the record's format .*alpaca needs"),
        ([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo."}], {"format": "alpaca"},
         r"train\.jsonl:2: field output: "),
        ([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Count.", "output": 3}],
         {"format": "alpaca"}, r"train\.jsonl:2: field output: .*string"),
        ([], {}, r"train\.jsonl: the file holds no records"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {"format": "chat"},
         r"train\.jsonl:1: .*assistant"),
        ([{"input": "a", "output": "b"}], {"format": "input_output", "input_format": "Q: {input}"},
         r"data\.config\.input_format: must contain __input__ exactly once"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
         {"format": "chat", "chat_template": "{% for m in messages %}{{ m.content "}, r"data\.config\.chat_template: "),
    ],
)
def test_bad_records_are_one_line_naming_the_file_line_and_field(tmp_path, good_cache, records, settings, expected):
    import re

    cache = good_cache
    before = sorted(p.name for p in (cache / "data").iterdir())
    data = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), **settings}
    done = rafale(cache, "data", "-c", str(run_file(tmp_path, "bad", data)))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert re.search(expected, lines[0]), lines[0]
    # Nothing already cached is lost, and no half-built folder stays behind.
    assert sorted(p.name for p in (cache / "data").iterdir() if not p.name.endswith(".lock")) == \
        [name for name in before if not name.endswith(".lock")]


def test_a_tokenizer_folder_without_a_chat_template_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    merging_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    records = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]}] * 4)
    data = {"dataset_path": str(records), "format": "chat", "chat_template": "tokenizer", "tokenizer_path": str(folder)}
    done = rafale(tmp_path / "cache", "data", "-c", str(run_file(tmp_path, "t", data)))
    assert done.returncode == 2 and "has no chat template" in done.stderr and not (tmp_path / "cache").exists()
    # With one, it is used: its rendering is what is trained.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}"}))
    done = rafale(tmp_path / "cache", "data", "-c", str(run_file(tmp_path, "t", data)))
    assert done.returncode == 0, done.stderr


def test_a_folder_with_train_val_test_subfolders_is_read_as_those_splits(tmp_path, monkeypatch):
    from rafale.data import prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    for split, count in (("train", 12), ("val", 3), ("test", 5)):
        (tmp_path / "sets" / split).mkdir(parents=True)
        write_jsonl(tmp_path / "sets" / split / "part.jsonl",
                    [{"input": f"{split} {i}", "output": str(i)} for i in range(count)])
    data = {"dataset_path": str(tmp_path / "sets"), "format": "input_output"}
    prepared = prepare_data(load_run_file(run_file(tmp_path, "splits", data)))
    assert {split: len(rows) for split, rows in prepared.splits.items()} == {"train": 12, "validation": 3, "test": 5}
    assert sorted(prepared.splits["test"]["prompt"]) == sorted(f"test {i}" for i in range(5))


def test_fine_tuning_starts_from_a_pretrained_export_with_its_tokenizer(tmp_path):
    cache = tmp_path / "cache"
    pretrain = {"run": {"name": "base", "max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba",
                        "sample_max_new_tokens": 0},
                "model": {"config": "pythia-tiny"},
                "data": {"config": {"name": "stories", "dataset_path": "synthetic:stories",
                                    "synthetic_documents": 200, "vocab_size": 320, "max_sequence_length": 64,
                                    "train_batch_size": 8, "eval_batch_size": 8}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(pretrain))
    assert rafale(cache, "-c", str(tmp_path / "base.yaml")).returncode == 0
    export = cache / "checkpoints" / "base" / "model"
    config = load_run_file(run_file(tmp_path, "tuned", {}, model={"use_pretrained": True,
                                                                  "pretrained_path": str(export)}))
    assert config.data.config.tokenizer_path == str(export / "tokenizer.json")
    done = rafale(cache, "-c", str(tmp_path / "tuned.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "start as initialised" not in done.stdout and f"tokenizer  {cache}" in done.stdout
    assert "held-out exact match:" in done.stdout


GRADIENTS = """\
import sys
import torch
from composer import Trainer
from composer.core import Callback
from composer.utils import dist
from rafale.config import load_run_file
from rafale.data import build_dataloaders, prepare_data
from rafale.train import build_language_model, trainer_arguments


class SaveGradients(Callback):
    def __init__(self, path):
        self.path = path

    def after_train_batch(self, state, logger):
        if dist.get_global_rank() == 0:
            model = state.model.module if hasattr(state.model, "module") else state.model
            torch.save({n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None},
                       self.path)


# Pairs of (run file, gradients file): one process trains each in turn, which saves a start-up per pair.
for run_path, gradients_path in zip(sys.argv[1::2], sys.argv[2::2]):
    config = load_run_file(run_path)
    prepared = prepare_data(config)
    train, evaluation = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
    torch.manual_seed(0)
    model = build_language_model(config, prepared)
    trainer = Trainer(**trainer_arguments(config, model, train, evaluation, "1ba", loggers=[],
                                          callbacks=[SaveGradients(gradients_path)], checkpoints=None))
    trainer.fit()
    trainer.close()
"""


def test_one_batch_has_the_same_gradients_whole_in_microbatches_and_on_two_processes(tmp_path):
    """Rows with few and many response tokens: a mean per microbatch (or per process) would weigh them wrongly;
    packed rows hold several records each. Both packings go through the same two commands (one start-up each)."""
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    records = [{"input": "the cat " * (1 + i % 4), "output": "sat " * (1 + 5 * (i % 3))} for i in range(120)]
    environment = {**os.environ, **QUIET, "RAFALE_CACHE_DIR": str(tmp_path / "cache")}
    source = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), "format": "input_output",
              "tokenizer_path": str(merging_tokenizer(tmp_path)), "shuffle_dataset": False}
    runs = {}
    for packing in ("none", "documents"):
        data = {**source, "packing": packing}
        for way, microbatch in (("whole", 8), ("microbatches", 2), ("processes", 2)):
            name = f"{packing}-{way}"
            runs[packing, way] = [str(run_file(tmp_path, name, data, run={"device_bs": microbatch,
                                                                           "clip_type": "none", "device": "cpu",
                                                                           "max_duration": "1ba"})),
                                  str(tmp_path / f"{name}.pt")]
    one_process = [part for (_, way), run in runs.items() if way != "processes" for part in run]
    two_processes = [part for (_, way), run in runs.items() if way == "processes" for part in run]
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", "2"]
    for command in ([sys.executable, str(script), *one_process], [*launcher, str(script), *two_processes]):
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for packing in ("none", "documents"):
        whole = torch.load(runs[packing, "whole"][1])
        for way in ("microbatches", "processes"):
            result = torch.load(runs[packing, way][1])
            assert result.keys() == whole.keys()
            for key in whole:
                torch.testing.assert_close(result[key], whole[key], rtol=1e-5, atol=1e-7, msg=f"{packing} {way} {key}")


def test_a_killed_run_resumes_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    settings = dict(run={"max_duration": "12ba", "save_interval": "4ba", "eval_interval": "12ba"},
                    model={"dropout": 0.1})
    assert rafale(cache, "-c", str(run_file(tmp_path, "reference", {}, **settings))).returncode == 0
    path = run_file(tmp_path, "resumed", {}, **settings)
    environment = {**os.environ, **QUIET, "RAFALE_CACHE_DIR": str(cache)}
    killed = subprocess.Popen([sys.executable, "-m", "rafale", "-c", str(path)], cwd=ROOT, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = cache / "checkpoints" / "resumed" / "checkpoints" / "ep0-ba4-rank0.pt"
    deadline = time.monotonic() + 240
    latest = checkpoint.with_name("latest-rank0.pt")
    # Saved and pointed at by `latest`, which autoresume follows.
    while not (checkpoint.exists() and latest.exists() and latest.resolve() == checkpoint):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = rafale(cache, "-c", str(path))
    assert done.returncode == 0 and "resumed from the latest checkpoint" in done.stdout, done.stderr[-3000:]
    ours = load_file(cache / "checkpoints" / "resumed" / "model" / "model.safetensors")
    theirs = load_file(cache / "checkpoints" / "reference" / "model" / "model.safetensors")
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_fine_tuning_starts_from_a_hugging_face_folder_with_its_architecture_and_tokenizer(tmp_path, monkeypatch,
                                                                                          family):
    pytest.importorskip("transformers")
    from rafale.data import prepare_data
    from rafale.train import build_language_model

    torch.manual_seed(0)
    reference = random_hf_decoder(family, 320, 3, 256)
    folder = tmp_path / family
    reference.save_pretrained(folder)
    merging_tokenizer(folder)
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    # The run file names another preset: the folder's architecture wins, as its weights need.
    config = load_run_file(run_file(tmp_path, "hf", {}, model={"config": "pythia-tiny", "use_pretrained": True,
                                                               "pretrained_path": str(folder)}))
    assert config.data.config.tokenizer_path == str(folder / "tokenizer.json")
    model = build_language_model(config, prepare_data(config)).eval()
    assert (model.config.n_layers, model.config.hidden_size) == (3, 64)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference.eval()(ids).logits, rtol=1e-4, atol=1e-4)
