"""rafale's lm-evaluation-harness model: log-likelihoods against a plain full-sequence log_softmax on the same model,
and the harness's results through rafale against its own Hugging Face backend on the same exported folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_checks import exported_story_decoder
from tokenizers import Tokenizer

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rafale.data.synthetic import generate_stories  # noqa: E402
from rafale.errors import RafaleError  # noqa: E402
from rafale.evaluate.harness import RafaleLM, results_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "rafale_story_next_word"
POSITIONS = 256
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return exported_story_decoder(tmp_path_factory.mktemp("harness") / "model", POSITIONS)


@pytest.fixture(scope="module")
def rafale_lm(folder) -> RafaleLM:
    return RafaleLM(pretrained=str(folder), batch_size=3)


@pytest.fixture(scope="module")
def hf_lm(folder):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), device="cpu", batch_size=3, dtype="float32")


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


PAIRS = [("Once upon a time, there was", " a cat"),
         ("Lily had a red ball. ", "She played with it."),  # the context's space moves into the continuation
         ("", "Tim went to the park."),  # an empty context: scored after the prefix token
         ("The dog ran home", "."),
         ("Once upon a time, there was a", " little girl named Mia who lived in a big forest.")]


def plain_log_likelihood(model, tokenizer, prefix: int, context: str, continuation: str) -> tuple[float, bool]:
    """Written from the harness's rules, not its code: trailing spaces of the context belong to the continuation,
    the whole text is encoded at once and split at the context's own encoding; an empty context is the prefix
    token. Scored by the full [T, vocab] log_softmax of one unpadded sequence, in fp64."""
    kept = context.rstrip()
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    split = len(tokenizer.encode(kept, add_special_tokens=False).ids)
    ids = whole if kept else [prefix] + whole
    split = split if kept else 1
    with torch.no_grad():
        log_probs = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    targets = torch.tensor(ids[split:])
    chosen = log_probs[split - 1:-1].gather(-1, targets[:, None])[:, 0]
    return float(chosen.sum()), bool((log_probs[split - 1:-1].argmax(-1) == targets).all())


def test_log_likelihoods_equal_a_plain_full_sequence_log_softmax(folder, rafale_lm):
    from rafale.models import load_pretrained

    model = load_pretrained(folder).eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prefix = tokenizer.token_to_id("<|endoftext|>")
    assert rafale_lm.prefix_token_id == prefix
    ours = rafale_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (log_likelihood, greedy) in zip(PAIRS, ours):
        expected, expected_greedy = plain_log_likelihood(model, tokenizer, prefix, context, continuation)
        assert abs(log_likelihood - expected) <= TOLERANCE * max(1.0, abs(expected)), (context, continuation)
        assert greedy == expected_greedy
    # A model already in memory scores the same.
    in_memory = RafaleLM.from_model(model, tokenizer, batch_size=2)
    again = in_memory.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert [value for value, _ in again] == pytest.approx([value for value, _ in ours], rel=TOLERANCE)
    # The boundary matters: with the space left in the context (encoded apart, then the continuation on its own)
    # the same text scores differently.
    context = tokenizer.encode("Lily had a red ball. ", add_special_tokens=False).ids
    continuation = tokenizer.encode("She played with it.", add_special_tokens=False).ids
    with torch.no_grad():
        log_probs = model(torch.tensor([context + continuation]))[0].double().log_softmax(-1)
    unmoved = float(log_probs[len(context) - 1:-1].gather(-1, torch.tensor(continuation)[:, None]).sum())
    assert abs(unmoved - ours[1][0]) > 100 * TOLERANCE * abs(unmoved)


def test_a_greedy_continuation_is_reported_greedy(rafale_lm):
    context = "Once upon a time, there was"
    continuation = rafale_lm.generate_until(requests("generate_until", [(context, {"until": ["\n"],
                                                                                   "max_gen_toks": 4})]), True)[0]
    assert continuation
    [(_, greedy)] = rafale_lm.loglikelihood(requests("loglikelihood", [(context, continuation)]), True)
    assert greedy


def test_rolling_and_generation_equal_the_harness_hf_backend(rafale_lm, hf_lm):
    documents = [(story,) for story in generate_stories(3, 7)] + [(" ".join(generate_stories(4, 8)),)]
    assert len(rafale_lm.tok_encode(documents[-1][0])) > POSITIONS  # several windows
    ours = rafale_lm.loglikelihood_rolling(requests("loglikelihood_rolling", documents), True)
    theirs = hf_lm.loglikelihood_rolling(requests("loglikelihood_rolling", documents), True)
    assert ours == pytest.approx(theirs, rel=TOLERANCE)

    settings = [{"until": ["."], "max_gen_toks": 12}, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}]
    prompts = [("Once upon a time, there was", settings[0]), ("Lily had a", settings[1]),
               ("One day, Tim was playing in a big", settings[0])]
    ours = rafale_lm.generate_until(requests("generate_until", prompts), True)
    theirs = hf_lm.generate_until(requests("generate_until", prompts), True)
    assert ours == theirs
    assert all("." not in text for text in ours[::2])
    # An empty context starts a document, after the prefix token (HFLM would feed it nothing at all).
    starts = [("", settings[1]), ("<|endoftext|>", settings[1])]
    from_nothing, from_prefix = rafale_lm.generate_until(requests("generate_until", starts), True)
    assert from_nothing == from_prefix and from_nothing


def test_the_bundled_task_scores_the_same_through_rafale_and_the_hf_backend(rafale_lm, hf_lm):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    from rafale.evaluate.harness import task_manager

    # evaluate(), not simple_evaluate(): the same scoring without the seconds simple_evaluate spends on `pip list`.
    tasks = get_task_dict([TASK], task_manager([TASK]))
    scores = [evaluate(lm, tasks, limit=16, bootstrap_iters=0) for lm in (rafale_lm, hf_lm)]
    ours, theirs = (score["results"][TASK] for score in scores)
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]
    for mine, reference in zip(scores[0]["samples"][TASK], scores[1]["samples"][TASK]):
        assert [r[0][0] for r in mine["resps"]] == pytest.approx([r[0][0] for r in reference["resps"]], rel=TOLERANCE)
    table = results_table(scores[0])
    assert TASK in table and "acc_norm" in table


def test_lm_eval_finds_the_rafale_model_beside_its_own():
    from lm_eval.api.registry import get_model

    assert get_model("rafale") is RafaleLM
    assert get_model("hf").__name__ == "HFLM"


def test_bad_task_names_and_a_missing_install_are_one_line(folder, monkeypatch, tmp_path):
    from rafale.evaluate import require_lm_eval
    from rafale.evaluate.harness import task_manager

    with pytest.raises(RafaleError, match="--include-path: .* is not a folder"):
        task_manager([TASK], tmp_path / "missing")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RafaleError, match=r'pip install "rafale\[eval\]"'):
        require_lm_eval()


def test_the_command_scores_bundled_and_local_tasks_offline(folder, tmp_path):
    """`rafale eval --tasks`: the bundled task (no --include-path needed) and a task of the user's own over a local
    jsonl, offline; the table, then --json."""
    items = tmp_path / "tasks" / "items.jsonl"
    items.parent.mkdir()
    items.write_text("".join(json.dumps({"question": f"{a} plus {b} is", "answer": str(a + b)}) + "\n"
                             for a in range(3) for b in range(3)), encoding="utf-8")
    (tmp_path / "tasks" / "sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {items}\noutput_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_target: ' {{answer}}'\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    environment = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "rafale", "eval", str(folder), "--tasks", f"{TASK},tiny_sums", "--include-path",
               str(tmp_path / "tasks"), "--limit", "4", "--json"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout)["results"]
    assert 0 <= printed[TASK]["acc,none"] <= 1 and 0 <= printed["tiny_sums"]["acc,none"] <= 1
