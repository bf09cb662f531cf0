"""Preference tuning: the losses against the hand-computed vectors of design/POST-TRAINING.md and a plain
re-computation from per-token log-probs; records (paired, HH transcripts, binary) -> rows with exact boundaries;
bad records are one line naming the record and field; at step 0 every DPO loss is ln 2 and every reward 0; the
reference log-probs are cached once, reused, never trusted half-written or for other data."""

import json
import math
import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_sft import rafale, write_jsonl

from rafale.config import load_run_file
from rafale.data.formats import FormatError, FormatSettings
from rafale.data.preference import binary_example, paired_segments, prompt_and_response, split_transcripts
from rafale.errors import RafaleError
from rafale.models import build_model
from rafale.tasks.kto import KTOSettings, kto_losses
from rafale.tasks.preference import PairCollator, PreferenceSettings, log1m_exp, paired_losses

HH = Path(__file__).resolve().parents[2] / "shared" / "assets" / "corpora" / "hh-rlhf" / \
    "hh-rlhf-harmless-base-test.jsonl.gz"


def _defaults(cls, values):
    fields = {name: field.default for name, field in cls.model_fields.items() if not field.is_required()}
    return types.SimpleNamespace(**{**fields, **values})


def test_dpo_simpo_ipo_and_kto_losses_equal_the_hand_computed_vectors():
    policy = torch.tensor([[-0.5, -0.1], [-10.0, -30.0], [-1.0, -21.0]])
    reference = torch.tensor([[-0.5, -0.1], [-10.1, -20.1], [-0.1, -0.1]])
    counts = torch.ones(3, 2)
    losses, chosen, rejected = paired_losses(_defaults(PreferenceSettings, {"loss": "dpo"}), policy, reference, counts)
    assert torch.allclose(losses, torch.tensor([0.693147, 0.313262, 0.126928]), atol=1e-6)
    assert torch.allclose(chosen, 0.1 * (policy - reference)[:, 0]) and torch.allclose(rejected,
                                                                                      0.1 * (policy - reference)[:, 1])

    simpo = _defaults(PreferenceSettings, {"loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0})
    losses, _, _ = paired_losses(simpo, torch.tensor([[-3.0, -8.0]]), None, torch.tensor([[3, 4]]))  # avg -1, -2
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)

    ipo = _defaults(PreferenceSettings, {"loss": "ipo", "beta": 0.1})
    losses, _, _ = paired_losses(ipo, torch.tensor([[3.0, -2.0]]), torch.zeros(1, 2), torch.tensor([[3, 4]]))
    assert losses.item() == pytest.approx(12.25, abs=1e-5)

    # KTO: chosen r [1, 2], rejected r [-1], mismatched log-ratios [0.5, 0.3, -0.2] (KL 0.2).
    kto = _defaults(KTOSettings, {})
    policy = torch.tensor([[1.0, 0.5], [2.0, 0.3], [-1.0, -0.2]])
    losses, rewards, kl = kto_losses(kto, policy, torch.zeros(3, 2), torch.tensor([True, True, False]))
    assert kl.item() == pytest.approx(0.2, abs=1e-6)
    assert torch.allclose(losses, torch.tensor([0.480011, 0.455121, 0.470036]), atol=1e-6)
    assert losses.mean().item() == pytest.approx(0.468389, abs=1e-6)
    assert torch.allclose(rewards, torch.tensor([0.1, 0.2, -0.1]))


def test_conservative_dpo_and_orpo_equal_their_formulas_written_out():
    policy = torch.tensor([[-4.0, -9.0], [-12.0, -3.0]])
    reference = torch.tensor([[-5.0, -8.0], [-11.0, -4.0]])
    counts = torch.tensor([[4, 6], [8, 2]])
    smoothed = _defaults(PreferenceSettings, {"loss": "dpo", "beta": 0.5, "label_smoothing": 0.2})
    losses, _, _ = paired_losses(smoothed, policy, reference, counts)
    for i in range(2):
        h = (policy[i, 0] - reference[i, 0]) - (policy[i, 1] - reference[i, 1])
        sig = 1 / (1 + math.exp(-0.5 * float(h)))
        assert losses[i].item() == pytest.approx(-0.8 * math.log(sig) - 0.2 * math.log(1 - sig), abs=1e-6)

    orpo = _defaults(PreferenceSettings, {"loss": "orpo", "orpo_lambda": 0.3})
    losses, _, _ = paired_losses(orpo, policy, None, counts)
    for i in range(2):
        avg_c, avg_r = float(policy[i, 0] / counts[i, 0]), float(policy[i, 1] / counts[i, 1])
        odds = (avg_c - avg_r) - (math.log(1 - math.exp(avg_c)) - math.log(1 - math.exp(avg_r)))
        assert losses[i].item() == pytest.approx(-avg_c - 0.3 * math.log(1 / (1 + math.exp(-odds))), abs=1e-5)
    # log(1 - exp(x)) stays finite where the plain formula rounds to log(0) or loses every digit.
    tiny, huge = log1m_exp(torch.tensor([-1e-12, -50.0], dtype=torch.float64))
    assert tiny.item() == pytest.approx(math.log(1e-12), rel=1e-6) and huge.item() == pytest.approx(-math.exp(-50))


def test_rpo_adds_the_chosen_responses_nll_per_token_and_only_to_dpo(tmp_path):
    # The torchtune vectors (DPO losses 0.693147, 0.313262, 0.126928); chosen log-probs -0.5, -10, -1 over 1, 5 and 2
    # tokens are NLLs per token of 0.5, 2 and 0.5, which alpha 0.2 adds as 0.1, 0.4 and 0.1.
    policy = torch.tensor([[-0.5, -0.1], [-10.0, -30.0], [-1.0, -21.0]])
    reference = torch.tensor([[-0.5, -0.1], [-10.1, -20.1], [-0.1, -0.1]])
    counts = torch.tensor([[1, 1], [5, 3], [2, 4]])
    rpo = _defaults(PreferenceSettings, {"loss": "dpo", "rpo_alpha": 0.2})
    losses, chosen, rejected = paired_losses(rpo, policy, reference, counts)
    assert torch.allclose(losses, torch.tensor([0.793147, 0.713262, 0.226928]), atol=1e-6)
    assert torch.allclose(chosen, 0.1 * (policy - reference)[:, 0])

    with pytest.raises(RafaleError, match=r"data.config.rpo_alpha: adds the chosen response's NLL to the dpo loss "
                                          r"only \(loss is 'ipo'\)"):
        load_run_file(config_for(tmp_path, "rpo-ipo", {"loss": "ipo", "rpo_alpha": 0.5}))
    with pytest.raises(RafaleError, match="rpo_alpha"):
        load_run_file(config_for(tmp_path, "rpo-negative", {"rpo_alpha": -1}))


def test_sequence_log_probs_in_one_forward_equal_a_plain_recomputation():
    from rafale.tasks import new_task

    torch.manual_seed(0)
    model = build_model("pythia-tiny", {"vocab_size": 64}).eval()
    rows = []
    for prompt, chosen, rejected in ((5, 3, 6), (2, 7, 1), (9, 2, 4)):
        ids = lambda n: torch.randint(2, 64, (n,)).tolist()  # noqa: E731
        start = ids(prompt)
        c, r = ids(chosen), ids(rejected)
        rows.append({"input_ids": start + c, "labels": [-100] * prompt + c,
                     "rejected_ids": start + r, "rejected_labels": [-100] * prompt + r})
    batch = PairCollator(pad_token_id=1, max_length=32, second="rejected")(rows)
    assert batch["input_ids"].shape[:2] == (3, 2)
    task = new_task("preference")
    with torch.no_grad():
        log_probs, counts = task.sequence_log_probs(model, batch)
    for i, row in enumerate(rows):
        for j, (ids_key, labels_key) in enumerate((("input_ids", "labels"), ("rejected_ids", "rejected_labels"))):
            ids, labels = torch.tensor([row[ids_key]]), torch.tensor(row[labels_key])
            with torch.no_grad():
                per_token = F.log_softmax(model(ids)[0, :-1].double(), -1)
            targets = labels[1:]
            expected = sum(per_token[t, targets[t]].item() for t in range(len(targets)) if targets[t] != -100)
            assert log_probs[i, j].item() == pytest.approx(expected, abs=1e-4)
            assert counts[i, j].item() == int((targets != -100).sum())
    assert log_probs.dtype == torch.float32


def test_hh_transcripts_split_at_the_longest_common_prefix_of_whole_turns():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Well, thanks."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Go away."
    prompt, good, bad = split_transcripts(chosen, rejected, "x")
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant:"
    assert (good, bad) == (" Well, thanks.", " Go away.")
    # Turns that share their first words are still different turns: the split never falls inside one.
    prompt, good, bad = split_transcripts("\n\nHuman: Hi\n\nAssistant: Sure thing", "\n\nHuman: Hi\n\nAssistant: Sure",
                                          "x")
    assert (prompt, good, bad) == ("\n\nHuman: Hi\n\nAssistant:", " Sure thing", " Sure")
    with pytest.raises(FormatError, match="x: fields chosen and rejected: the transcripts share no whole turn"):
        split_transcripts("Hello", "Bye", "x")


@pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/assets/corpora/hh-rlhf (the shared test assets)")
def test_every_hh_rlhf_pair_splits_into_a_prompt_and_two_responses():
    import gzip

    with gzip.open(HH, "rt", encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    assert len(records) == 2312
    same = 0
    for number, record in enumerate(records, start=1):
        chosen, rejected = paired_segments(record, f"hh:{number}", FormatSettings(), "transcript")
        assert chosen[0] == rejected[0] and not chosen[0][1]
        assert chosen[0][0].endswith("\n\nAssistant:")
        assert chosen[0][0] + chosen[1][0] == record["chosen"] and rejected[0][0] + rejected[1][0] == record["rejected"]
        same += chosen == rejected
    assert same < 50  # a handful of pairs hold the same response twice: the task leaves them out and counts them


def config_for(folder: Path, name: str, data: dict, pipeline: str = "preference", run: dict | None = None) -> Path:
    config = {
        "run": {"name": name, "seed": 3, "max_duration": "4ba", "max_lr": 3e-3, "warmup_pct": 0.1,
                "eval_interval": "4ba", "save_interval": "2ba", "sample_max_new_tokens": 8,
                "checkpoint_dir": str(folder / "runs"), **(run or {})},
        "model": {"config": "pythia-tiny"},
        "data": {"pipeline": pipeline, "config": {"name": name, "dataset_path": "synthetic:preferences",
                                                  "synthetic_documents": 80, "prompt_template": "plain",
                                                  "vocab_size": 320, "max_sequence_length": 96,
                                                  "train_batch_size": 8, "eval_batch_size": 8, "eval_examples": 4,
                                                  "validation_fraction": 0.1, **data}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepared_with_reference(path: Path, messages: list | None = None):
    from rafale.data import prepare_data
    from rafale.train import starting_model

    config = load_run_file(path)
    prepared = prepare_data(config)
    config.task.before_training(config, prepared, lambda: starting_model(config, prepared),
                                (messages if messages is not None else []).append)
    return config, prepared


def test_paired_records_become_rows_with_exact_boundaries_and_identical_pairs_are_counted(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from rafale.data import prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    records = [{"prompt": "the cat", "chosen": " sat", "rejected": " ran"},
               {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go"},
               {"instruction": "Add 1 and 2.", "chosen": "3", "rejected": "4"},
               {"prompt": "same", "chosen": " x", "rejected": " x"}] * 3
    data = {"dataset_path": str(write_jsonl(tmp_path / "train.jsonl", records)), "shuffle_dataset": False,
            "validation_fraction": 0.25}
    prepared = prepare_data(load_run_file(config_for(tmp_path, "rows", data)))
    train = prepared.splits["train"]
    assert prepared.summary["train"]["identical pairs"] + prepared.summary["validation"]["identical pairs"] == 3
    tokenizer = Tokenizer.from_file(str(prepared.tokenizer_file))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    eos = prepared.eos_token_id
    first = train[0]
    assert first["input_ids"] == encode("the cat") + encode(" sat") + [eos]
    assert first["labels"] == [-100] * len(encode("the cat")) + encode(" sat") + [eos]
    assert first["rejected_ids"] == encode("the cat") + encode(" ran") + [eos]
    chat = train[1]
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["input_ids"][:len(encode(prompt))] == encode(prompt)
    assert chat["rejected_ids"][:len(encode(prompt))] == encode(prompt)


@pytest.mark.parametrize("record, pipeline, message", [
    ({"prompt": "a", "chosen": "b"}, "preference", r"train.jsonl:1: field rejected: missing"),
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "preference", r"train.jsonl:1: field rejected: must be a string"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "kto",
     r"train.jsonl:1: field label: must be true or false, got a string"),
    ({"prompt": "a", "completion": "b"}, "kto", r"train.jsonl:1: field label: missing"),
    ({"prompt": "word " * 200, "chosen": "b", "rejected": "c"}, "preference",
     r"train.jsonl:1: the prompt takes \d+ tokens and leaves no room for the response at "
     r"data.config.max_sequence_length 96"),
])
def test_bad_records_are_one_line_errors_with_exit_status_2(tmp_path, record, pipeline, message):
    good = {"prompt": "a b", "chosen": " c", "rejected": " d"} if pipeline == "preference" else \
        {"prompt": "a b", "completion": " c", "label": True}
    source = write_jsonl(tmp_path / "train.jsonl", [record] + [good] * 20)
    path = config_for(tmp_path, "bad", {"dataset_path": str(source), "shuffle_dataset": False}, pipeline)
    result = rafale(tmp_path / "cache", "data", "-c", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_kto_refuses_a_batch_of_one_before_any_work(tmp_path):
    path = config_for(tmp_path, "kto-one", {"train_batch_size": 1}, "kto")
    with pytest.raises(RafaleError, match=r"data.config.train_batch_size: KTO needs at least 2 examples per process"):
        load_run_file(path)


def test_binary_records_take_the_templates_and_labels(tmp_path):
    segments, desirable = binary_example({"prompt": "q", "completion": " a", "label": False}, "x", FormatSettings())
    assert segments == [("q", False), (" a", True)] and desirable is False


def test_at_step_0_every_dpo_loss_is_ln2_and_every_reward_0_and_the_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    # Dropout asked for in the run file is turned off by the task.
    path = config_for(tmp_path, "step0", {})
    raw = yaml.safe_load(path.read_text())
    raw["model"]["dropout"] = 0.3
    path.write_text(yaml.safe_dump(raw))
    said: list[str] = []
    config, prepared = prepared_with_reference(path, said)
    assert any("computed in" in line for line in said)
    from rafale.data import build_dataloaders
    from rafale.train import starting_model

    policy = starting_model(config, prepared)
    assert policy.config.dropout == 0.0
    policy.train()
    train_loader, _ = build_dataloaders(config.task, prepared, config.data.config, 0)
    batch = next(iter(train_loader))
    outputs = config.task.outputs(policy, batch)
    assert torch.allclose(outputs["losses"], torch.full_like(outputs["losses"], math.log(2)), atol=1e-6)
    assert outputs["chosen"].abs().max() < 1e-6 and outputs["rejected"].abs().max() < 1e-6

    # A second run with the same data and weights reuses the cache; the values are the same.
    first = prepared.splits["train"]["reference_logps"]
    said.clear()
    _, again = prepared_with_reference(path, said)
    assert any("reused" in line for line in said)
    assert again.splits["train"]["reference_logps"] == first

    # A cache whose key is not this data's is refused; a half-written one is never read.
    folder = next((tmp_path / "cache" / "data").glob("*.reference-*"))
    key = json.loads((folder / "key.json").read_text())
    (folder / "key.json").write_text(json.dumps({**key, "rows": {"train": 1}}))
    with pytest.raises(RafaleError, match="computed for other data or weights \\(rows differ\\)"):
        prepared_with_reference(path)
    (folder / "key.json").unlink()  # as a pass killed before its last write leaves it
    said.clear()
    prepared_with_reference(path, said)
    assert any("computed in" in line for line in said)


def test_other_starting_weights_get_their_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    prepared_with_reference(config_for(tmp_path, "seed-a", {"name": "same"}))
    prepared_with_reference(config_for(tmp_path, "seed-b", {"name": "same"}, run={"seed": 4}))
    assert len(list((tmp_path / "cache" / "data").glob("*.reference-*"))) == 2


def test_live_and_cached_references_give_the_same_losses(tmp_path, monkeypatch):
    from rafale.data import build_dataloaders
    from rafale.train import starting_model

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    losses = {}
    for mode in ("cached", "live"):
        config, prepared = prepared_with_reference(config_for(tmp_path, f"ref-{mode}", {"reference": mode,
                                                                                          "name": "ref"}))
        policy = starting_model(config, prepared)
        with torch.no_grad():  # a policy a step away from its reference
            for parameter in policy.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        loader, _ = build_dataloaders(config.task, prepared, config.data.config, 0)
        losses[mode] = config.task.outputs(policy, next(iter(loader)))["losses"].detach()
    assert not torch.allclose(losses["cached"], torch.full_like(losses["cached"], math.log(2)))
    assert torch.allclose(losses["cached"], losses["live"], atol=1e-6)


@pytest.mark.parametrize("pipeline, data, expected", [
    ("preference", {"loss": "dpo", "label_smoothing": 0.1}, "held-out reward accuracy: 0.0000 before"),
    ("preference", {"loss": "simpo", "beta": 2.0}, "held-out reward accuracy:"),
    ("kto", {}, "held-out KL:"),
])
def test_a_preference_run_trains_and_reports_before_and_after(tmp_path, pipeline, data, expected):
    if pipeline == "kto":
        records = [{"prompt": f"Add {a} and {b}.\n", "completion": str(a + b if good else a + b + 1), "label": good}
                   for a in range(6) for b in range(6) for good in (True, False)]
        data = {"dataset_path": str(write_jsonl(tmp_path / "kto.jsonl", records))}
    path = config_for(tmp_path, f"run-{pipeline}", data, pipeline)
    result = rafale(tmp_path / "cache", "-c", str(path), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[batch 4/4] loss" in result.stdout
    assert expected in result.stdout, result.stdout[-2000:]
    assert "held-out exact match of greedy answers:" in result.stdout
    # The export asks as training did: its chat template renders a user turn as the run's prompts.
    from rafale.data.instructions import generate_preferences
    from rafale.models.generate import chat_prompts

    config = load_run_file(path)
    source = config.data.config.dataset_path
    record = generate_preferences(1)[0] if source == "synthetic:preferences" else \
        json.loads(Path(source).read_text().splitlines()[0])
    segments = prompt_and_response(record, "", "record", config.task.format_settings(config.data.config))
    prompt = "".join(text for text, trainable in segments if not trainable)
    asked = record.get("prompt") or "\n".join(filter(None, [record["instruction"], record.get("input")]))
    assert chat_prompts(tmp_path / "runs" / f"run-{pipeline}" / "model", [asked]) == [prompt]


def test_a_killed_dpo_run_resumes_bit_for_bit(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file
    from test_sft import QUIET, ROOT

    cache = tmp_path / "cache"
    run = {"max_duration": "8ba", "save_interval": "4ba", "eval_interval": "8ba"}
    data = {"eval_examples": 0, "name": "resume"}
    assert rafale(cache, "-c", str(config_for(tmp_path, "whole", data, run=run))).returncode == 0
    path = config_for(tmp_path, "resumed", data, run=run)
    environment = {**os.environ, **QUIET, "RAFALE_CACHE_DIR": str(cache)}
    killed = subprocess.Popen([sys.executable, "-m", "rafale", "-c", str(path)], cwd=ROOT, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "runs" / "resumed" / "checkpoints" / "ep0-ba4-rank0.pt"
    latest = checkpoint.with_name("latest-rank0.pt")
    deadline = time.monotonic() + 240
    while not (checkpoint.exists() and latest.exists() and latest.resolve() == checkpoint):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = rafale(cache, "-c", str(path))
    assert done.returncode == 0 and "resumed from the latest checkpoint" in done.stdout, done.stderr[-3000:]
    ours = load_file(tmp_path / "runs" / "resumed" / "model" / "model.safetensors")
    theirs = load_file(tmp_path / "runs" / "whole" / "model" / "model.safetensors")
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_with_lora_the_live_reference_is_the_policy_with_its_adapters_off():
    from rafale import transforms
    from rafale.tasks.preference import PairedPreference
    from rafale.tasks.reference import adapters_off, live_reference

    torch.manual_seed(0)
    base = build_model("pythia-tiny", {"vocab_size": 64}).eval()
    rules = [{"modules": "attention", "kind": "lora"}]
    policy = transforms.apply(build_model("pythia-tiny", {"vocab_size": 64}), rules, say=lambda _: None).eval()
    policy.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for module in transforms.adapters(policy).values():
            module.lora_B.normal_()  # a trained adapter
    ids = torch.randint(2, 64, (2, 12))
    assert not torch.allclose(policy(ids), base(ids))
    with adapters_off(policy):
        assert torch.equal(policy(ids), base(ids))
    assert not torch.allclose(policy(ids), base(ids))  # switched back on

    said: list[str] = []
    task = PairedPreference("preference")
    reference = live_reference(task, policy, said.append)
    assert said == ["reference: live, the policy with its LoRA adapters off"]
    rows = [{"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6], "rejected_ids": [3, 4, 7],
             "rejected_labels": [-100, -100, 7]}]
    batch = PairCollator(1, 16, "rejected")(rows)
    with torch.no_grad():
        assert torch.equal(reference(policy, batch), task.sequence_log_probs(base, batch)[0])


def test_kto_scores_greedy_answers_against_desirable_completions_only(tmp_path, monkeypatch):
    from rafale.data import prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    records = [{"prompt": f"Add {a} and {b}.\n", "completion": str(a + b if good else a + b + 1), "label": good}
               for a in range(6) for b in range(6) for good in (True, False)]
    data = {"dataset_path": str(write_jsonl(tmp_path / "kto.jsonl", records)), "validation_fraction": 0.5}
    config = load_run_file(config_for(tmp_path, "kto-right", data, "kto"))
    prepared = prepare_data(config)
    held_out = prepared.splits["validation"]
    assert not all(held_out["desirable"])  # the held-out split has undesirable completions to leave out
    answers = config.task.right_answers(held_out)
    assert len(answers) == sum(held_out["desirable"]) > 0
    for prompt, reference in answers:
        a, b = map(int, re.findall(r"\d+", prompt))
        assert reference == str(a + b), (prompt, reference)
    # The end of the run's perplexity is on the same right answers.
    text = config.task.held_out_text(config, prepared, 1 << 20)
    assert list(zip(text.contexts, text.documents)) == answers


def test_a_caching_pass_killed_while_writing_leaves_no_trusted_cache(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    path = config_for(tmp_path, "killed-cache", {})
    writes = safetensors.torch.save_file

    def killed_midway(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt  # as the process dies while writing

    monkeypatch.setattr(safetensors.torch, "save_file", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepared_with_reference(path)
    data = tmp_path / "cache" / "data"
    left = [folder.name for folder in data.glob("*.reference-*")]
    assert len(left) == 1 and left[0].startswith(".") and ".partial-" in left[0]  # never trusted: a partial name

    monkeypatch.setattr(safetensors.torch, "save_file", writes)
    said: list[str] = []
    _, prepared = prepared_with_reference(path, said)
    assert any("computed in" in line for line in said)
    assert list(data.glob(".*.partial-*")) == [] and len(prepared.splits["train"]["reference_logps"]) > 0
