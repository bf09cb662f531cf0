"""`rafale sample`: prompts from text and records, chat-templated for a model that carries a template, seeded, and
resumable to the same file."""

import json
from pathlib import Path

import pytest
from reference_checks import exported_story_decoder

from rafale.data.formats import CHAT_TEMPLATES, render_chat
from rafale.errors import RafaleError
from rafale.models.generate import generate_text, load_folder
from rafale.sample import sample_file

PROMPTS = ["Once upon a time, there was", "Lily had a red ball.", "One day, Tim went to the", "The dog"]


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    return exported_story_decoder(tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return exported_story_decoder(tmp_path_factory.mktemp("chat") / "model", chat_template=CHAT_TEMPLATES["chatml"])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_greedy_samples_of_a_text_file_are_the_models_continuations(plain_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "samples.jsonl"
    assert sample_file(plain_folder, prompts, out, batch_size=3, max_new_tokens=6, progress=False) == 4
    _, model, tokenizer = load_folder(plain_folder)
    expected = generate_text(model, tokenizer, PROMPTS, max_new_tokens=6, add_special_tokens=False)
    assert lines(out) == [{"prompt": p, "output": e["text"]} for p, e in zip(PROMPTS, expected)]
    # Run again: complete, nothing written, the file as it was.
    before = out.read_bytes()
    assert sample_file(plain_folder, prompts, out, batch_size=3, max_new_tokens=6, progress=False) == 0
    assert out.read_bytes() == before


def test_sampling_is_seeded_and_a_resumed_run_writes_the_same_file(plain_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    options = dict(num_samples=3, batch_size=4, max_new_tokens=8, temperature=1.0, top_k=50, progress=False)
    whole, again, other = tmp_path / "whole.jsonl", tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    sample_file(plain_folder, prompts, whole, seed=1, **options)
    sample_file(plain_folder, prompts, again, seed=1, **options)
    sample_file(plain_folder, prompts, other, seed=2, **options)
    written = lines(whole)
    assert [(r["prompt"], r["sample_index"]) for r in written] == [(p, i) for p in PROMPTS for i in range(3)]
    assert whole.read_bytes() == again.read_bytes()
    assert [r["output"] for r in lines(other)] != [r["output"] for r in written]
    assert len({r["output"] for r in written}) > 6

    # Interrupted after two batches and in the middle of a line: the half line goes, the rest follows as before.
    resumed = tmp_path / "resumed.jsonl"
    kept = whole.read_text(encoding="utf-8").splitlines(keepends=True)[:8]
    resumed.write_text("".join(kept) + '{"prompt": "The d', encoding="utf-8")
    assert sample_file(plain_folder, prompts, resumed, seed=1, **options) == 4
    assert resumed.read_bytes() == whole.read_bytes()


def test_a_chat_model_gets_its_template_and_each_line_keeps_the_prompt_as_given(chat_folder, tmp_path):
    conversation = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A cat?"}]
    records = [{"prompt": "Say red."}, {"messages": [*conversation, {"role": "assistant", "content": "Reference."}]},
               {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    sample_file(chat_folder, prompts, out, max_new_tokens=5, progress=False)
    template = CHAT_TEMPLATES["chatml"]
    alpaca = "Below is an instruction that describes a task. Write a response that appropriately completes the " \
             "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    texts = [render_chat([{"role": "user", "content": "Say red."}], template, True, "<|endoftext|>", "<|endoftext|>"),
             render_chat(conversation, template, True, "<|endoftext|>", "<|endoftext|>"),
             render_chat([{"role": "user", "content": alpaca}], template, True, "<|endoftext|>", "<|endoftext|>")]
    _, model, tokenizer = load_folder(chat_folder)
    expected = generate_text(model, tokenizer, texts, max_new_tokens=5, add_special_tokens=False)
    assert lines(out) == [{"prompt": prompt, "output": e["text"]}
                          for prompt, e in zip(["Say red.", conversation, alpaca], expected)]

    raw = tmp_path / "raw.jsonl"
    sample_file(chat_folder, prompts, raw, max_new_tokens=5, raw=True, progress=False)
    plain = generate_text(model, tokenizer, ["Say red."], max_new_tokens=5, add_special_tokens=False)
    assert lines(raw)[0]["output"] == plain[0]["text"]


def test_mistakes_are_one_line_before_any_sampling(plain_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"prompt": "Something else", "output": "x"}) + "\n", encoding="utf-8")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n", encoding="utf-8")
    cases = [
        (dict(prompts_path=tmp_path / "missing.txt"), "no such prompts file"),
        (dict(prompts_path=prompts, out=foreign), r"foreign.jsonl:1: holds a sample of another prompt"),
        (dict(prompts_path=prompts, num_samples=2), "greedy decoding gives the same output"),
        (dict(prompts_path=chat), "need a model with a chat template"),
    ]
    for arguments, message in cases:
        with pytest.raises(RafaleError, match=message):
            sample_file(plain_folder, **{"out": tmp_path / "out.jsonl", "progress": False, **arguments})
    assert foreign.read_text(encoding="utf-8").count("\n") == 1


def test_the_command_writes_then_finds_the_file_complete(plain_folder, tmp_path):
    from typer.testing import CliRunner

    from rafale.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    command = ["sample", str(plain_folder), str(prompts), str(out), "-n", "4", "-k", "2", "--temperature", "0.7",
               "--seed", "3", "-b", "3"]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    assert f"{out}: wrote 8 samples" in first.output
    assert [(r["prompt"], r["sample_index"]) for r in lines(out)] == [(p, i) for p in PROMPTS for i in range(2)]
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0 and "already complete" in again.output
