"""Offline PPO: GAE and the clipped loss against hand-computed vectors, the whole loss against a plain per-row
re-computation from per-token log-probs, the per-token reference cache (round trip, reuse, refusal of the other kind,
live equal to cached), the ratio exactly 1 at step 0, and an export without the value head."""

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_preference import config_for, prepared_with_reference
from test_sft import rafale, write_jsonl

from rafale.config import load_run_file
from rafale.errors import RafaleError
from rafale.tasks.ppo import PPOSettings, advantages_and_returns, ppo_episode, ppo_terms


def _settings(**values):
    fields = {name: field.default for name, field in PPOSettings.model_fields.items() if not field.is_required()}
    return types.SimpleNamespace(**{**fields, **values})


RECORDS = [{"prompt": f"Add {a} and {b}.\n", "completion": str(a + b if good else a + b + 1), "label": good}
           for a in range(5) for b in range(5) for good in (True, False)]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A PPO run file on binary records, its prepared data with the cached per-token reference, what it said."""
    folder = tmp_path_factory.mktemp("ppo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder / "cache"))
        data = {"dataset_path": str(write_jsonl(folder / "kto.jsonl", RECORDS)), "name": "ppo"}
        path = config_for(folder, "ppo", data, "ppo")
        said: list[str] = []
        config, prepared = prepared_with_reference(path, said)
        yield types.SimpleNamespace(folder=folder, path=path, config=config, prepared=prepared, said=said,
                                    data=data)


def _first_batch(config, prepared):
    from rafale.data import build_dataloaders

    loader, _ = build_dataloaders(config.task, prepared, config.data.config, 0)
    return next(iter(loader))


def test_gae_skips_unlabelled_positions_and_equals_the_hand_computed_vector():
    # Row 0 (desirable, reward +1 at its last response token): response at positions 1, 2 and 4; position 3 (a
    # gap, an earlier turn) and 0 (the prompt) are skipped, their values (9, 7) never read. gamma = lam = 0.5:
    #   t=4: delta = 1 + 0 - (-0.1) = 1.1                  A = 1.1
    #   t=2: delta = 0 + 0.5 * (-0.1) - 0.2 = -0.25        A = -0.25 + 0.25 * 1.1 = 0.025
    #   t=1: delta = 0 + 0.5 * 0.2 - 0.5 = -0.4            A = -0.4 + 0.25 * 0.025 = -0.39375
    #   returns A + V: 0.10625, 0.225, 1.0
    # Row 1 (undesirable, -1) has one response token of value 0.3: A = -1 - 0.3 = -1.3, return -1.
    values = torch.tensor([[9.0, 0.5, 0.2, 7.0, -0.1], [0.0, 0.0, 0.0, 0.0, 0.3]])
    mask = torch.tensor([[False, True, True, False, True], [False, False, False, False, True]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, -1.0]])
    advantages, returns = advantages_and_returns(rewards, values, mask, gamma=0.5, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0, -0.39375, 0.025, 0, 1.1], [0, 0, 0, 0, -1.3]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0, 0.10625, 0.225, 0, 1.0], [0, 0, 0, 0, -1.0]]), atol=1e-6)


def test_the_clipped_loss_equals_the_hand_computed_vector():
    # Four rows of one response token: desirable, desirable, undesirable, undesirable, values 0.5, 0.5, -0.5, -0.5.
    # Advantages score - value: 0.5, 0.5, -0.5, -0.5, whitened (mean 0, variance 0.25): +1, +1, -1, -1; returns
    # A + V: 1, 1, -1, -1. Ratios 3, 1/4, 3, 1/4 (log-ratios ln 3, -ln 4); cliprange 0.5 keeps them in [0.5, 2]:
    #   A = +1, ratio 3:   max(-3, -2)        = -2     clipped (above)
    #   A = +1, ratio 1/4: max(-0.25, -0.5)   = -0.25  not clipped
    #   A = -1, ratio 3:   max(3, 2)          = 3      not clipped
    #   A = -1, ratio 1/4: max(0.25, 0.5)     = 0.5    clipped (below)
    # Value loss 0.5 (0.5 - 1)^2 = 0.125 on every row; KL 0.5 (ln 3)^2 and 0.5 (ln 4)^2.
    settings = _settings(cliprange=0.5, gamma=0.99, lam=0.95, value_coef=0.01, kl_coef=0.1, cliprange_value=0.2)
    log_ratios = torch.tensor([math.log(3), -math.log(4), math.log(3), -math.log(4)])[:, None]
    reference = torch.full((4, 1), -2.0)
    values = torch.tensor([0.5, 0.5, -0.5, -0.5])[:, None].requires_grad_()
    mask = torch.ones(4, 1, dtype=torch.bool)
    episode = ppo_episode(settings, values, torch.tensor([1.0, 1.0, -1.0, -1.0]), mask)
    assert torch.allclose(episode["returns"][:, 0], torch.tensor([1.0, 1.0, -1.0, -1.0]))
    terms = ppo_terms(settings, reference + log_ratios, reference, values, episode, mask)
    policy = torch.tensor([-2.0, -0.25, 3.0, 0.5])
    kl = 0.5 * torch.tensor([math.log(3) ** 2, math.log(4) ** 2, math.log(3) ** 2, math.log(4) ** 2])
    assert torch.allclose(terms["policy"][:, 0], policy, atol=1e-6)
    assert terms["clipped"][:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(terms["value"][:, 0], torch.full((4,), 0.125), atol=1e-6)
    assert torch.allclose(terms["kl"][:, 0], kl, atol=1e-6)
    assert torch.allclose(terms["loss"][:, 0], policy + 0.01 * 0.125 + 0.1 * kl, atol=1e-6)
    # The value loss trains the values towards the returns: d/dV 0.01 * 0.5 (V - R)^2 = 0.01 (V - R).
    terms["loss"].sum().backward()
    assert torch.allclose(values.grad[:, 0], 0.01 * torch.tensor([-0.5, -0.5, 0.5, 0.5]), atol=1e-7)

    # A later step of the same batch (ppo_epochs > 1): the values have moved to 1.2, 0.6, -0.2, -1.0 from the
    # episode's 0.5, 0.5, -0.5, -0.5 (returns 1, 1, -1, -1); cliprange_value 0.2 keeps a clipped copy near the old:
    #   1.2:  (1.2 - 1)^2 = 0.04,   clipped 0.7:  (0.7 - 1)^2 = 0.09   -> 0.5 * 0.09 = 0.045, no gradient (clipped)
    #   0.6:  (0.6 - 1)^2 = 0.16,   clipped 0.6:  the same             -> 0.08, gradient 0.01 * (0.6 - 1)
    #   -0.2: (-0.2 + 1)^2 = 0.64,  clipped -0.3: (0.7)^2 = 0.49       -> 0.32, gradient 0.01 * (-0.2 + 1)
    #   -1.0: 0,                    clipped -0.7: (0.3)^2 = 0.09       -> 0.045, no gradient (clipped)
    moved = torch.tensor([1.2, 0.6, -0.2, -1.0])[:, None].requires_grad_()
    terms = ppo_terms(settings, reference, reference, moved, episode, mask)
    assert torch.allclose(terms["value"][:, 0], torch.tensor([0.045, 0.08, 0.32, 0.045]), atol=1e-6)
    terms["loss"].sum().backward()
    assert torch.allclose(moved.grad[:, 0], 0.01 * torch.tensor([0.0, -0.4, 0.8, 0.0]), atol=1e-7)


def test_each_batch_comes_ppo_epochs_times_in_a_row_with_its_first_episode(cached, monkeypatch):
    from rafale.data.repeat import RepeatedBatches
    from rafale.train import starting_model

    sampler = RepeatedBatches(list(range(10)), 4, 2, shuffle=False, num_replicas=1, rank=0)
    assert list(sampler) == [0, 1, 2, 3] * 2 + [4, 5, 6, 7] * 2 and len(sampler) == 16  # 8, 9: a short batch
    sampler = RepeatedBatches(list(range(12)), 3, 3, shuffle=True, seed=1, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    dealt = list(sampler)
    assert all(dealt[i:i + 3] == dealt[i + 3:i + 6] == dealt[i + 6:i + 9] for i in range(0, 36, 9))
    assert sorted(dealt[::9][:4]) != [0, 3, 6, 9]  # shuffled

    config, prepared = cached.config, cached.prepared
    task, settings = config.task, config.data.config
    monkeypatch.setattr(settings, "ppo_epochs", 2)
    policy = starting_model(config, prepared)
    batch = _first_batch(config, prepared)
    first = task.outputs(policy, batch, training=True)
    with torch.no_grad():
        noise = torch.randn(policy.value.weight.shape, generator=torch.Generator().manual_seed(3))
        policy.value.weight.add_(0.5 * noise)
    second = task.outputs(policy, batch, training=True)
    assert task._episodes == {}  # the batch's two steps are over
    # The second step's value loss is against the first step's values and returns, clipped around the former.
    mask = first["mask"]
    scores = torch.where(first["desirable"], 1.0, -1.0)
    episode = ppo_episode(settings, first["values"], scores, mask)
    expected = ppo_terms(settings, -torch.ones_like(first["kl"]), -torch.ones_like(first["kl"]), second["values"],
                         episode, mask)["value"]
    assert torch.allclose(second["value"], expected, atol=1e-6)
    fresh = task.outputs(policy, batch)
    assert not torch.allclose(fresh["value"], second["value"], atol=1e-4)


def _plain_loss(settings, log_probs, reference, values, labels, desirable):
    """The loss written out per row in Python floats: GAE backwards over the row's response tokens, whitening over
    the batch's, then the per-token terms' mean."""
    rows = []
    for row in range(len(labels)):
        tokens = [t for t in range(labels.shape[1] - 1) if labels[row, t + 1] != -100]
        logp = [float(log_probs[row, t]) for t in tokens]
        value = [float(values[row, t]) for t in tokens]
        rewards = [0.0] * (len(tokens) - 1) + [1.0 if desirable[row] else -1.0]
        advantage, next_value, raw = 0.0, 0.0, []
        for t in reversed(range(len(tokens))):
            advantage = rewards[t] + settings.gamma * next_value - value[t] + settings.gamma * settings.lam * advantage
            next_value = value[t]
            raw.insert(0, advantage)
        following = [a + v for a, v in zip(raw, value)]
        rows.append((logp, [float(reference[row, t]) for t in tokens], value, raw, following))
    every = [a for row in rows for a in row[3]]
    mean = sum(every) / len(every)
    std = math.sqrt(sum((a - mean) ** 2 for a in every) / len(every) + 1e-8)
    total = 0.0
    for logp, ref, value, raw, returns in rows:
        for lp, rp, v, a, r in zip(logp, ref, value, raw, returns):
            a = (a - mean) / std
            ratio = math.exp(lp - rp)
            clipped = min(max(ratio, settings.cliprange), 1 / settings.cliprange)
            total += (max(-a * ratio, -a * clipped) + settings.value_coef * 0.5 * (v - r) ** 2
                      + settings.kl_coef * 0.5 * (lp - rp) ** 2)
    return total / len(every)


def test_the_loss_equals_a_plain_recomputation_from_per_token_log_probs(cached):
    from rafale.train import starting_model

    config, prepared = cached.config, cached.prepared
    policy = starting_model(config, prepared)
    with torch.no_grad():  # a policy a step away from its reference, the value head too
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    batch = _first_batch(config, prepared)
    task = config.task
    with torch.no_grad():
        loss = task.train_loss(policy, batch)
        logits = policy(batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = policy.hidden_states(batch["input_ids"], batch["attention_mask"])
        values = policy.value(hidden)[..., 0]
    # log p of each position's next token from the full logits, the plain way.
    next_ids = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], dim=1)
    log_probs = F.log_softmax(logits.float(), -1).gather(-1, next_ids[..., None])[..., 0]
    reference = task.reference_log_probs(policy, batch)
    expected = _plain_loss(config.data.config, log_probs, reference, values, batch["labels"], batch["desirable"])
    assert not math.isclose(expected, 0.0, abs_tol=1e-3)
    assert math.isclose(float(loss), expected, rel_tol=1e-4, abs_tol=1e-5)


def test_at_step_0_every_ratio_is_exactly_1(cached, monkeypatch):
    from rafale.train import starting_model

    config, prepared = cached.config, cached.prepared
    # Dropout asked for in the run file is turned off by the task.
    monkeypatch.setattr(config.model, "dropout", 0.3)
    policy = starting_model(config, prepared)
    assert policy.config.dropout == 0.0
    policy.train()
    outputs = config.task.outputs(policy, _first_batch(config, prepared))
    assert torch.equal(outputs["log_ratio"], torch.zeros_like(outputs["log_ratio"]))
    assert float(outputs["clipped"].sum()) == 0.0 and float(outputs["kl"].sum()) == 0.0
    # At ratio 1 the policy term is minus the mean of whitened advantages: 0.
    assert abs(float(outputs["policy"].sum() / outputs["mask"].sum())) < 1e-6


def test_the_per_token_cache_round_trips_is_reused_and_refuses_the_other_kind(cached):
    from rafale.train import starting_model

    config, prepared = cached.config, cached.prepared
    assert any("tokens log-probs of" in line and "computed in" in line for line in cached.said)
    # Every row holds one log-prob per response token, equal to the starting model's.
    train = prepared.splits["train"]
    for row in train.select(range(3)):
        assert len(row["reference_logps"]) == sum(label != -100 for label in row["labels"][1:])
    batch = _first_batch(config, prepared)
    with torch.no_grad():
        live = config.task.reference_pass(starting_model(config, prepared), batch)
    assert torch.allclose(config.task.reference_log_probs(None, batch), live, atol=1e-5)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(cached.folder / "cache"))
        said: list[str] = []
        _, again = prepared_with_reference(cached.path, said)
        assert any("reused" in line for line in said)
        assert again.splits["train"]["reference_logps"] == train["reference_logps"]

        folder = next((cached.folder / "cache" / "data").glob("*.reference-*"))
        key_file, tensors_file = folder / "key.json", folder / "reference.safetensors"
        key, tensors = key_file.read_text(), load_file(str(tensors_file))
        try:
            # A sequence-sum cache under this key is never read as per-token log-probs.
            key_file.write_text(json.dumps({**json.loads(key), "kind": "sequences"}))
            with pytest.raises(RafaleError, match=r"\(kind differ\)"):
                prepared_with_reference(cached.path)
            key_file.write_text(key)
            save_file({split: torch.zeros(rows, 2) for split, rows in json.loads(key)["rows"].items()},
                      str(tensors_file))
            with pytest.raises(RafaleError, match=r"holds None train rows of tokens log-probs"):
                prepared_with_reference(cached.path)
        finally:
            key_file.write_text(key)
            save_file(tensors, str(tensors_file))


def test_live_and_cached_references_give_the_same_loss(cached, tmp_path, monkeypatch):
    from rafale.train import starting_model

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(cached.folder / "cache"))
    config, prepared = prepared_with_reference(config_for(tmp_path, "ppo-live", {**cached.data, "reference": "live"},
                                                          "ppo"))
    assert "reference_logps" not in prepared.splits["train"].column_names
    losses = {}
    for mode, (run, data) in {"cached": (cached.config, cached.prepared), "live": (config, prepared)}.items():
        policy = starting_model(run, data)
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
            losses[mode] = run.task.train_loss(policy, _first_batch(run, data))
    assert torch.allclose(losses["cached"], losses["live"], atol=1e-6)


def test_the_export_is_the_plain_language_model(cached, tmp_path):
    from rafale.models import load_pretrained, save_pretrained
    from rafale.models.decoder import Decoder, ValuedDecoder
    from rafale.train import starting_model

    policy = starting_model(cached.config, cached.prepared)
    assert isinstance(policy, ValuedDecoder)
    save_pretrained(policy, tmp_path / "model")
    assert "value.weight" not in load_file(str(tmp_path / "model" / "model.safetensors"))
    exported = load_pretrained(tmp_path / "model")
    assert type(exported) is Decoder
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(exported(ids), policy.eval()(ids), atol=1e-6)


@pytest.mark.parametrize("data, message", [
    ({"cliprange": 1.5}, r"cliprange"),
    ({"beta": 0.1}, r"beta"),
    ({"gamma": -0.1}, r"gamma"),
    ({"ppo_epochs": 0}, r"ppo_epochs"),
])
def test_bad_ppo_settings_are_refused_when_the_run_file_is_read(tmp_path, data, message):
    with pytest.raises(RafaleError, match=message):
        load_run_file(config_for(tmp_path, "ppo-bad", data, "ppo"))


def test_a_ppo_run_trains_on_repeated_batches_and_exports_the_plain_language_model(tmp_path):
    data = {"dataset_path": str(write_jsonl(tmp_path / "kto.jsonl", RECORDS)), "ppo_epochs": 2}
    path = config_for(tmp_path, "run-ppo", data, "ppo")
    result = rafale(tmp_path / "cache", "-c", str(path), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[batch 4/4] loss" in result.stdout and "clip fraction" in result.stdout
    assert "held-out clip fraction: 0.0000 before" in result.stdout, result.stdout[-2000:]
    assert "held-out exact match of greedy answers:" in result.stdout
    model = tmp_path / "runs" / "run-ppo" / "model"
    assert json.loads((model / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    assert not any(name.startswith("value") for name in load_file(str(model / "model.safetensors")))


def test_with_lora_the_value_head_trains_and_the_live_reference_is_the_policy_with_its_adapters_off():
    from rafale import transforms
    from rafale.models import build_model
    from rafale.tasks.ppo import OfflinePPO, TokenCollator
    from rafale.tasks.reference import live_reference

    torch.manual_seed(0)
    base = build_model("pythia-tiny", {"vocab_size": 64, "value_head": True}).eval()
    rules = [{"modules": "attention", "kind": "lora"}]
    policy = transforms.apply(build_model("pythia-tiny", {"vocab_size": 64, "value_head": True}), rules,
                              keep_trainable=("value.weight",), say=lambda _: None).eval()
    policy.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for module in transforms.adapters(policy).values():
            module.lora_B.normal_()  # a trained adapter
    assert policy.value.weight.requires_grad
    said: list[str] = []
    task = OfflinePPO("ppo")
    reference = live_reference(task, policy, said.append)
    assert said == ["reference: live, the policy with its LoRA adapters off"]
    batch = TokenCollator(1, 16)([{"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6], "desirable": True},
                                  {"input_ids": [3, 7], "labels": [-100, 7], "desirable": False}])
    with torch.no_grad():
        expected = task.reference_pass(base, batch)
        assert torch.equal(reference(policy, batch), expected)
        assert not torch.allclose(task.reference_pass(policy, batch), expected)
