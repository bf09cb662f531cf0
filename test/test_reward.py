"""The Bradley-Terry reward model and `rafale label`: the export is transformers' *ForSequenceClassification layout
and scores as rafale does; a short run trains and reports its accuracy; labelled samples become feedback that
preference tuning prepares."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_preference import config_for
from test_sft import write_jsonl

from rafale.config import load_run_file
from rafale.errors import RafaleError
from rafale.evaluate.label import feedback_records, label_samples
from rafale.models import build_model, load_pretrained, save_pretrained
from rafale.models.weights import load_weights


@pytest.mark.parametrize("preset", ["pythia-tiny", "llama-tiny"])
def test_a_scored_decoder_exports_as_transformers_sequence_classifier_and_scores_the_same(tmp_path, preset):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    language_model = build_model(preset, {"vocab_size": 64})
    save_pretrained(language_model, tmp_path / "lm", config_extras={"pad_token_id": 1})
    scorer = build_model(preset, {"vocab_size": 64, "num_scores": 1})
    # A reward model starts from a language model's folder: its LM head is left out, the score head is new.
    assert load_weights(scorer, tmp_path / "lm") == ["score.weight"]
    assert torch.equal(scorer.embed.weight, language_model.embed.weight)
    save_pretrained(scorer, tmp_path / "rm", config_extras={"pad_token_id": 1})
    hf_config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf_config["architectures"][0].endswith("ForSequenceClassification") and hf_config["id2label"] == {
        "0": "LABEL_0"}

    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[2, 9:] = 0, 0
    ids = ids.masked_fill(mask == 0, 1)  # right padding with the pad id transformers looks for
    ours = scorer.eval()(ids, attention_mask=mask)
    assert ours.shape == (3, 1)
    # The score of a padded sequence is the score of the sequence alone.
    assert torch.allclose(ours[0], scorer(ids[:1, :6]), atol=1e-5)
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(ids, attention_mask=mask).logits, ours, atol=1e-5)
    assert torch.equal(load_pretrained(tmp_path / "rm")(ids, attention_mask=mask), ours)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A reward model trained a few steps on the bundled preference pairs, in-process."""
    folder = tmp_path_factory.mktemp("reward")
    patch = pytest.MonkeyPatch()
    patch.setenv("RAFALE_CACHE_DIR", str(folder / "cache"))
    from rafale.train import train_run

    said: list[str] = []
    patch.setattr("rafale.train._say", said.append)
    path = config_for(folder, "reward", {}, "reward", run={"max_lr": 1e-3, "max_duration": "6ba",
                                                          "eval_interval": "6ba"})
    raw = yaml.safe_load(path.read_text())
    del raw["data"]["config"]["eval_examples"]  # a reward model does not generate
    path.write_text(yaml.safe_dump(raw))
    config = load_run_file(path)
    run = train_run(config)
    yield folder, run, config, said
    patch.undo()


def test_a_reward_run_trains_on_pairs_and_reports_its_accuracy(reward_run):
    from rafale.data import build_dataloaders

    _, run, config, said = reward_run
    assert any(line.startswith("held-out accuracy: ") and " before, " in line for line in said), said
    model = load_pretrained(run / "model")
    # The loss is -log sigmoid(s_chosen - s_rejected), the scores read at each sequence's last real token.
    config.task.settings = config.data.config
    from rafale.data import prepare_data

    loader, _ = build_dataloaders(config.task, prepare_data(config), config.data.config, 0)
    batch = next(iter(loader))
    outputs = config.task.outputs(model, batch)
    by_hand = []
    for row in range(batch["input_ids"].shape[0]):
        chosen, rejected = (model(batch["input_ids"][row, i][batch["attention_mask"][row, i].bool()][None])[0, 0]
                            for i in (0, 1))
        by_hand.append(-F.logsigmoid(chosen - rejected))
    assert torch.allclose(outputs["losses"], torch.stack(by_hand), atol=1e-5)


def test_label_writes_feedback_that_preference_tuning_prepares(reward_run, tmp_path, monkeypatch):
    from rafale.data import prepare_data

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    _, run, _, _ = reward_run
    samples = [{"prompt": f"What is {a} plus {b}?\n", "output": f" {a + b + extra}"}
               for a in range(4) for b in range(3) for extra in (0, 1, 2)]
    samples += [{"prompt": "Name a color.\n", "output": " red"}] * 2  # one distinct output: no pair
    source = write_jsonl(tmp_path / "samples.jsonl", samples)
    pairwise = label_samples(run, source, tmp_path / "pairs.jsonl", "pairwise")
    assert (pairwise.prompts, pairwise.written, pairwise.skipped) == (13, 12, 1)
    binary = label_samples(run, source, tmp_path / "binary.jsonl", "binary", batch_size=5)
    assert binary.written == len(samples) and 0 < binary.desirable < len(samples)
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(pair["chosen_score"] > pair["rejected_score"] for pair in pairs)
    examples = [json.loads(line) for line in (tmp_path / "binary.jsonl").read_text().splitlines()]
    assert [example["label"] for example in examples] == [example["score"] > binary.threshold for example in examples]
    # Scored in batches of 5 or 32 alike: padding does not move a score.
    assert {(p["prompt"], p["chosen"]): p["chosen_score"] for p in pairs} == pytest.approx(
        {(e["prompt"], e["completion"]): e["score"] for e in examples if (e["prompt"], e["completion"]) in
         {(p["prompt"], p["chosen"]) for p in pairs}}, abs=1e-5)

    for name, pipeline in (("pairs", "preference"), ("binary", "kto")):
        data = {"dataset_path": str(tmp_path / f"{name}.jsonl"), "validation_fraction": 0.25}
        prepared = prepare_data(load_run_file(config_for(tmp_path, f"from-{name}", data, pipeline)))
        rows = sum(counts["blocks"] for counts in prepared.summary.values())
        assert rows == (12 if name == "pairs" else len(samples))


def test_label_refuses_bad_input_in_one_line(reward_run, tmp_path):
    _, run, _, _ = reward_run
    source = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "a", "output": " b"}, {"prompt": "a"}])
    with pytest.raises(RafaleError, match=r"samples.jsonl:2: field output: missing"):
        label_samples(run, source, tmp_path / "out.jsonl", "pairwise")
    with pytest.raises(RafaleError, match=r"--feedback: 'scalar' is not one of pairwise, binary"):
        label_samples(run, source, tmp_path / "out.jsonl", "scalar")
    assert not (tmp_path / "out.jsonl").exists()
    save_pretrained(build_model("pythia-tiny", {"vocab_size": 512}), tmp_path / "lm",
                    tokenizer=run / "model" / "tokenizer.json", config_extras={"eos_token_id": 0, "pad_token_id": 1})
    with pytest.raises(RafaleError, match=r"lm: not a reward model"):
        label_samples(tmp_path / "lm", write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "output": " b"}]),
                      tmp_path / "out.jsonl", "pairwise")
    from rafale.models.generate import generate_from_folder

    with pytest.raises(RafaleError, match=r"a reward model \(a score head, no LM head\): it scores text"):
        generate_from_folder(run, ["a"])
    records, summary = feedback_records([("p", " x"), ("p", " y"), ("q", " z")], [0.5, 0.5, 1.0], "pairwise", None)
    assert records == [] and summary.skipped == 2  # tied outputs make no pair


def test_a_language_model_run_refuses_a_reward_model_to_start_from(reward_run, tmp_path, monkeypatch):
    from rafale.data import prepare_data
    from rafale.train import build_language_model

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    _, run, _, _ = reward_run
    path = config_for(tmp_path, "dpo-from-rm", {}, "preference")
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(use_pretrained=True, pretrained_path=str(run / "model"))
    path.write_text(yaml.safe_dump(raw))
    config = load_run_file(path)
    with pytest.raises(RafaleError, match=r"holds a reward model .* data.pipeline 'preference' trains a language"):
        build_language_model(config, prepare_data(config))


def test_a_new_score_head_is_announced_once(tmp_path, monkeypatch):
    """A reward run on a language model's folder says once that its score head starts as initialised: the copy of
    the starting model that the task scores for its "before" figures is built without a word."""
    from rafale.data import prepare_data
    from rafale.models import build_model, save_pretrained
    from rafale.train import build_language_model, starting_model

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    monkeypatch.setattr("rafale.train._say", said.append)
    path = config_for(tmp_path, "reward", {}, "reward")
    raw = yaml.safe_load(path.read_text())
    del raw["data"]["config"]["eval_examples"]
    path.write_text(yaml.safe_dump(raw))
    prepared = prepare_data(load_run_file(path))
    save_pretrained(build_model("pythia-tiny", {"vocab_size": 384}), tmp_path / "lm", tokenizer=prepared.tokenizer)
    raw["model"].update(use_pretrained=True, pretrained_path=str(tmp_path / "lm"))
    path.write_text(yaml.safe_dump(raw))
    config = load_run_file(path)
    prepared = prepare_data(config)
    build_language_model(config, prepared)
    starting_model(config, prepared)
    assert [line for line in said if "start as initialised" in line] == [
        f"model: score.weight not in {tmp_path / 'lm'}: they start as initialised"]
