"""`rafale generate`: a Hugging Face folder or a run folder in, text out (plain or one JSON object a line)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rafale.models import build_model, save_pretrained
from rafale.models.generate import generate_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"])
    tokenizer.train_from_iterator(["Once upon a time there was a cat.", "One day a dog ran home."] * 50, trainer)
    torch.manual_seed(0)
    model = build_model("pythia-tiny", {"vocab_size": 320})
    run_folder = tmp_path_factory.mktemp("run")
    save_pretrained(model, run_folder / "model", tokenizer=tokenizer)
    return run_folder


def generate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rafale", "generate", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_json_lines_for_a_batch_of_prompts_match_the_python_api(model_folder):
    result = generate(str(model_folder), "-p", "Once upon", "-p", "One day a dog", "-n", "6", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["Once upon", "One day a dog"]
    assert all(set(line) == {"prompt", "text", "token_ids"} for line in lines)

    from rafale.models import load_pretrained

    folder = model_folder / "model"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = generate_text(load_pretrained(folder), tokenizer, ["Once upon", "One day a dog"], max_new_tokens=6)
    assert lines == expected


def test_sampling_with_a_seed_is_reproducible_and_plain_output_has_the_prompt(model_folder):
    options = ["-p", "Once upon", "-n", "8", "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    first, second = generate(str(model_folder), *options), generate(str(model_folder), *options)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("Once upon")


def test_a_folder_without_a_model_is_one_line(tmp_path):
    result = generate(str(tmp_path), "-p", "hello")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dtype_reaches_the_decoding(model_folder):
    from typer.testing import CliRunner

    from rafale.cli import app
    from rafale.models.generate import generate_from_folder

    result = CliRunner().invoke(app, ["generate", str(model_folder), "-p", "Once upon", "-n", "4", "--json",
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    expected = generate_from_folder(model_folder, ["Once upon"], max_new_tokens=4, dtype="bfloat16")
    assert [json.loads(line) for line in result.output.splitlines()] == expected
