"""`rafale eval`: per-document log-likelihoods against transformers' own model on the same folder, the rolling
windows, the byte and word figures from their definitions, and one-line errors for bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_checks import random_hf_decoder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rafale.errors import RafaleError
from rafale.evaluate.perplexity import (
    document_log_likelihoods,
    evaluate_folder,
    evaluate_perplexity,
    figures,
    rolling_windows,
)
from rafale.models import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
VOCAB, POSITIONS = 320, 32
RELATIVE = 1e-4
STORIES = ["Once upon a time there was a cat.", "One day a dog ran home.", "The cat and the dog sat in the sun."]


def story_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"])
    tokenizer.train_from_iterator(STORIES * 50, trainer)
    return tokenizer


def hf_folder(family: str, folder: Path) -> Path:
    """A random transformers decoder saved with a tokenizer; weights drawn wide so that the next-token
    distributions are sharp and a token scored with the wrong context changes the sum visibly."""
    torch.manual_seed(0)
    reference = random_hf_decoder(family, VOCAB, 2, POSITIONS)
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=0.3)
    reference.save_pretrained(folder)
    story_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def folder(request, tmp_path_factory) -> Path:
    return hf_folder(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pythia_folder(tmp_path_factory) -> Path:
    """For the command's tests: its wiring does not depend on the family."""
    return hf_folder("gpt_neox", tmp_path_factory.mktemp("pythia"))


def random_documents(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def next_token_log_prob(reference, context: list[int], target: int) -> float:
    with torch.no_grad():
        logits = reference(torch.tensor([context])).logits[0, -1].double()
    return float(logits.log_softmax(-1)[target])


def lm_eval_rolling(reference, tokens: list[int], prefix: int, window: int) -> float:
    """lm-evaluation-harness's loglikelihood_rolling, written from its description: the first window is the prefix
    and tokens[:n-1] predicting tokens[:n], n = min(L, len(tokens)); each later one predicts up to L new tokens from
    the L ids before the last of them."""
    with torch.no_grad():
        def scored(inputs: list[int], targets: list[int]) -> float:
            log_probs = reference(torch.tensor([inputs])).logits[0].double().log_softmax(-1)[-len(targets):]
            return float(log_probs.gather(-1, torch.tensor(targets)[:, None]).sum())

        predicted = min(window, len(tokens))
        total = scored([prefix] + tokens[:predicted - 1], tokens[:predicted])
        while predicted < len(tokens):
            end = predicted + min(window, len(tokens) - predicted)
            total += scored(tokens[end - window - 1:end - 1], tokens[predicted:end])
            predicted = end
    return total


@pytest.mark.parametrize("length, window, stride", [(1, 4, 4), (4, 4, 4), (5, 4, 4), (23, 8, 8), (23, 8, 3),
                                                     (30, 8, 1), (9, 16, 5)])
def test_rolling_windows_predict_every_token_once_within_the_window(length, window, stride):
    windows = rolling_windows(0, length, window, stride)
    scored = [target for w in windows for target in range(w.scored_from, w.end)]
    assert scored == list(range(length - 1))
    assert all(0 < w.end - w.begin <= window and w.begin <= w.scored_from < w.end for w in windows)
    # Every window but the first is full when the sequence allows: the last one reaches back, not short.
    assert all(w.end - w.begin == min(window, length - 1) for w in windows)


def test_a_stride_past_the_window_is_refused():
    with pytest.raises(RafaleError, match="--stride"):
        rolling_windows(0, 10, 4, 5)


def test_disjoint_windows_match_lm_eval_rolling_on_transformers_model(folder):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = load_pretrained(folder)
    window, prefix = 8, 0
    documents = random_documents([3, 8, 9, 23, 30])
    sums, counts = document_log_likelihoods(model, [[prefix] + d for d in documents], window, window, 3)
    assert counts == [len(d) for d in documents]
    for ours, tokens in zip(sums, documents):
        theirs = lm_eval_rolling(reference, tokens, prefix, window)
        assert abs(ours - theirs) <= RELATIVE * abs(theirs)
    # The prefix is context that matters: without it the first token is not scored and the sum moves.
    without_prefix, _ = document_log_likelihoods(model, documents, window, window, 3)
    assert abs(without_prefix[3] - sums[3]) > 100 * RELATIVE * abs(sums[3])


def test_overlapping_windows_score_each_token_with_its_window_context(folder):
    """Each token t of [prefix] + tokens is scored once, by the first window of L inputs starting at a multiple of
    the stride that reaches it (the last window ending at the end), one reference forward per token."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = load_pretrained(folder)
    window, stride = 8, 3
    sequences = [[0] + d for d in random_documents([6, 20], seed=2)]
    sums, counts = document_log_likelihoods(model, sequences, window, stride, 4)
    assert counts == [len(s) - 1 for s in sequences]
    for ours, ids in zip(sums, sequences):
        predicted = len(ids) - 1
        theirs = 0.0
        for target in range(predicted):
            first_window = 0 if target < window else (target - window) // stride + 1
            begin = min(first_window * stride, max(0, predicted - window))
            theirs += next_token_log_prob(reference, ids[begin:target + 1], ids[target + 1])
        assert abs(ours - theirs) <= RELATIVE * abs(theirs)
    disjoint, _ = document_log_likelihoods(model, sequences, window, window, 4)
    assert abs(disjoint[1] - sums[1]) > 100 * RELATIVE * abs(sums[1])


def test_byte_and_word_figures_follow_their_definitions():
    # 2 + 2 words (a double space is one separator); 4 + 7 bytes ("é" is two).
    result = figures(-11.0, 5, ["a bb", "ccé  d"], window=8, stride=8, prefix_token="<|endoftext|>")
    assert (result.documents, result.tokens, result.words, result.bytes) == (2, 5, 4, 11)
    assert result.token_perplexity == pytest.approx(math.exp(11 / 5))
    assert result.word_perplexity == pytest.approx(math.exp(11 / 4))
    assert result.byte_perplexity == pytest.approx(math.e)
    assert result.bits_per_byte == pytest.approx(1 / math.log(2))


def test_the_figures_of_texts_are_the_sum_over_their_documents(folder):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model, tokenizer = load_pretrained(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    result = evaluate_perplexity(model, tokenizer, STORIES, 0, "<|endoftext|>", window=8, batch_size=2)
    tokens = [tokenizer.encode(story, add_special_tokens=False).ids for story in STORIES]
    expected = sum(lm_eval_rolling(reference, ids, 0, 8) for ids in tokens)
    assert result.tokens == sum(len(ids) for ids in tokens)
    assert abs(result.log_likelihood - expected) <= RELATIVE * abs(expected)
    assert (result.window, result.stride, result.words) == (8, 8, 8 + 6 + 9)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rafale", "eval", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n\n".join(STORIES) + "\n", encoding="utf-8")
    return path


def test_the_command_on_a_run_folder_prints_its_settings_and_json_matches_the_api(pythia_folder, stories_file,
                                                                                    tmp_path):
    folder = pythia_folder
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "model").symlink_to(folder)
    result = run_eval(str(run_folder), "--data", str(stories_file), "--json", "--stride", "16")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected, split = evaluate_folder(folder, str(stories_file), stride=16)
    assert printed == {"model": str(run_folder), "data": str(stories_file), "split": split, **expected.as_dict()}
    assert (printed["window"], printed["stride"], printed["prefix_token"], printed["documents"]) == (
        POSITIONS, 16, "<|endoftext|>", 3)
    assert "scoring: " in result.stderr

    plain = run_eval(str(folder), "--data", str(stories_file), "--prefix", "none", "--window", "8")
    assert plain.returncode == 0, plain.stderr
    assert "window 8, stride 8 (disjoint), prefix token none" in plain.stdout
    assert "documents 3, predicted tokens " in plain.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_eval(str(tmp_path), "--data", str(tmp_path / "missing.txt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_input_names_what_is_wrong(pythia_folder, stories_file, tmp_path):
    folder = pythia_folder
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [
        (dict(path=folder, data=str(tmp_path / "missing.txt")), "--data: no such file or folder"),
        (dict(path=folder, data=str(empty)), "--data: no documents in"),
        (dict(path=folder, data=str(stories_file), window=POSITIONS + 1), "--window: 33 is more than"),
        (dict(path=folder, data=str(stories_file), prefix="<nope>"), "--prefix: '<nope>' is not a token"),
        (dict(path=folder, data=str(stories_file), column="body"), "--column: no column 'body'"),
        (dict(path=tmp_path, data=str(stories_file)), "no tokenizer.json"),
    ]
    for arguments, message in cases:
        with pytest.raises(RafaleError, match=message):
            evaluate_folder(**arguments)
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(RafaleError, match="no config.json"):
        evaluate_folder(tmp_path, str(stories_file))


def test_jsonl_and_saved_datasets_score_the_same_documents_as_text(pythia_folder, stories_file, tmp_path):
    import datasets

    from_text, split = evaluate_folder(pythia_folder, str(stories_file), window=8)
    assert split == "train"
    records = tmp_path / "stories.jsonl"
    records.write_text("".join(json.dumps({"body": story}) + "\n" for story in STORIES), encoding="utf-8")
    from_jsonl, _ = evaluate_folder(pythia_folder, str(records), column="body", window=8)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["Not these."]}),
                          "validation": datasets.Dataset.from_dict({"text": STORIES})}).save_to_disk(str(saved))
    from_saved, split = evaluate_folder(pythia_folder, str(saved), window=8)
    assert split == "validation"
    assert from_jsonl == from_text and from_saved == from_text


def test_the_prefix_is_the_folders_bos_else_its_end_of_text_token(tmp_path):
    from rafale.evaluate.perplexity import prefix_id

    tokenizer = story_tokenizer()
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    assert prefix_id(tmp_path, tokenizer, None) == (end_of_text, "<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|padding|>"}}))
    assert prefix_id(tmp_path, tokenizer, None) == (tokenizer.token_to_id("<|padding|>"), "<|padding|>")
    assert prefix_id(tmp_path, tokenizer, "<|endoftext|>") == (end_of_text, "<|endoftext|>")
    assert prefix_id(tmp_path, tokenizer, "none") == (None, None)


def test_an_encoder_is_refused_before_the_data_is_read(tmp_path):
    from rafale.models import build_model, save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_model("bert-test-tiny", {"vocab_size": VOCAB}), tmp_path, tokenizer=story_tokenizer())
    with pytest.raises(RafaleError, match="needs a causal LM"):
        evaluate_folder(tmp_path, str(tmp_path / "not-read.txt"))
