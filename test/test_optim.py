"""Optimizers by name (rafale/optim.py): run-file checks, parameter groups (weight-decay exemptions, Muon's split,
layer-wise learning-rate decay) for every optimizer and family, bit-exact resumption for every optimizer, and NEFTune
noise in training only."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from rafale.config import ConfigError, load_run_file
from rafale.optim import OPTIMIZERS, build_optimizer

# Every optimizer, those of the optim extra skipped (with what to install) where it is not installed.
EVERY_OPTIMIZER = [pytest.param(name, marks=pytest.mark.skipif(bool(kind.missing()), reason=kind.missing() or ""))
                   for name, kind in OPTIMIZERS.items()]
needs_optim_extra = pytest.mark.skipif(any(kind.missing() for kind in OPTIMIZERS.values()),
                                       reason="needs the optim extra: pip install \"rafale[optim]\"")

RUN = """\
run:
  name: "tiny-{optimizer}"
  seed: 7
  max_lr: 3e-3
  warmup_pct: 0.25
  optimizer: "{optimizer}"
  eval_interval: "2ba"
  save_interval: "2ba"
  save_num_checkpoints_to_keep: -1
  sample_prompts: []
{extra}
model:
  config: "pythia-tiny"
data:
  pipeline: "causal_lm"
  config:
    name: "tiny-stories"
    dataset_path: "synthetic:stories"
    synthetic_documents: 200
    vocab_size: 320
    max_sequence_length: 32
    train_batch_size: 4
    eval_batch_size: 8
    validation_fraction: 0.01
"""
# What each optimizer needs of the run file to train well: schedule-free keeps the rate constant after its warmup.
NEEDS = {"schedulefree_adamw": '  schedule: "constant-warmup"'}


def write_run(folder: Path, optimizer: str = "adamw", extra: str = "", needs: bool = True) -> Path:
    path = folder / f"{optimizer}.yaml"
    lines = [NEEDS.get(optimizer) if needs else None, extra]
    path.write_text(RUN.format(optimizer=optimizer, extra="\n".join(filter(None, lines))))
    return path


def error_of(folder: Path, optimizer: str, extra: str = "", needs: bool = True) -> str:
    path = write_run(folder, optimizer, extra, needs)
    with pytest.raises(ConfigError) as raised:
        load_run_file(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


@needs_optim_extra
def test_run_file_mistakes_name_the_key_and_the_valid_choices(tmp_path):
    assert error_of(tmp_path, "sgd") == ("run.optimizer: unknown optimizer 'sgd'; valid: adamw, schedulefree_adamw, "
                                         "soap, muon, lion, adopt")
    assert error_of(tmp_path, "lion", "  optimizer_args: {betaz: [0.9, 0.99]}") == (
        "run.optimizer_args.betaz: not an argument of lion; valid: betas, weight_decouple, fixed_decay, foreach, "
        "maximize")
    assert error_of(tmp_path, "muon", "  optimizer_args: {lr: 0.02}").startswith(
        "run.optimizer_args.lr: set by run.max_lr; valid: momentum, ")
    assert error_of(tmp_path, "lion", "  optimizer_args: {betas: [1.5, 0.99]}") == (
        "run.optimizer_args: lion refuses them: beta1 must be in the range [0.0, 1.0)")
    assert error_of(tmp_path, "lion", "  betas: [0.9, 0.99]") == (
        "run.betas: AdamW's; lion takes its own as run.optimizer_args.betas")
    assert error_of(tmp_path, "schedulefree_adamw", '  schedule: "cosine-warmup"', needs=False).startswith(
        "run.schedule: 'cosine-warmup', but schedule-free AdamW keeps the learning rate constant after its warmup")
    config = load_run_file(write_run(tmp_path, "muon", "  optimizer_args: {momentum: 0.9, adamw_lr: 1e-3}"))
    assert config.run.optimizer_args == {"momentum": 0.9, "adamw_lr": 1e-3}


@pytest.mark.parametrize("optimizer, module", [("soap", "pytorch_optimizer"), ("schedulefree_adamw", "schedulefree")])
def test_a_missing_optimizer_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, optimizer, module):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == module else real_find_spec(name, *rest))
    package = OPTIMIZERS[optimizer].package
    assert error_of(tmp_path, optimizer) == (
        f"run.optimizer: {optimizer!r} needs {package}, which is not installed; pip install \"rafale[optim]\"")


@pytest.mark.parametrize("optimizer", EVERY_OPTIMIZER)
def test_weight_decay_spares_norms_biases_and_embeddings_for_every_optimizer(tmp_path, optimizer):
    from rafale.models import build_model

    config = load_run_file(write_run(tmp_path, optimizer))
    model = build_model("pythia-tiny", {"tie_embeddings": True})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(config, model).param_groups
    decayed = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    spared = [names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert sorted(decayed + spared) == sorted(names.values())  # each trainable parameter once (the tied head too)
    assert all(g["weight_decay"] == config.run.weight_decay for g in groups if g["weight_decay"] > 0)
    assert decayed and all(name.startswith("blocks.") and name.endswith(".weight") and "norm" not in name
                           for name in decayed)
    assert "embed.weight" in spared and any("norm" in n for n in spared) and any(n.endswith("bias") for n in spared)
    if optimizer == "muon":
        # Muon's orthogonalized update for the blocks' matrices only; its companion AdamW for everything else.
        orthogonalized = sorted(names[id(p)] for g in groups if g["use_muon"] for p in g["params"])
        assert orthogonalized == sorted(decayed)
        assert all(g["lr"] == pytest.approx(3e-4) for g in groups if not g["use_muon"])  # adamw_lr's default


@pytest.mark.parametrize("preset, head", [("pythia-tiny", "lm_head.weight"), ("llama-tiny", "lm_head.weight"),
                                          ("bert-test-tiny", "mlm.dense.weight")])
def test_layer_lr_decay_scales_each_layer_from_the_head_down(tmp_path, preset, head):
    from rafale.models import build_model

    config = load_run_file(write_run(tmp_path, "adamw", "  layer_lr_decay: 0.5"))
    model = build_model(preset)
    lines = []
    groups = build_optimizer(config, model, say=lines.append).param_groups
    rate = {name: group["lr"] for group in groups for p in group["params"]
            for name, q in model.named_parameters() if q is p}
    n = len(model.blocks)
    assert rate[head] == pytest.approx(3e-3)
    for i in range(n):
        assert rate[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(3e-3 * 0.5 ** (n - i))
    assert rate["embed.weight"] == pytest.approx(3e-3 * 0.5 ** (n + 1))  # the deepest factor
    assert len(rate) == len(list(model.parameters()))
    # One line per group, said once when the optimizer is built.
    assert lines[0] == f"optimizer: adamw, {len(groups)} parameter groups" and len(lines) == len(groups) + 1
    assert lines[1].split()[0] == "embeddings,"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny run's prepared data, built once, in a cache of the test's own."""
    from rafale.train import prepared_data

    folder = tmp_path_factory.mktemp("optim")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAFALE_CACHE_DIR", str(folder / "cache"))
        yield folder, prepared_data(load_run_file(write_run(folder)))


def train(config, prepared, checkpoints: Path, batches: int):
    """A run of the tiny model (its checkpoints and autoresume in `checkpoints`) up to `batches`: its model and
    optimizer."""
    from composer import Trainer
    from composer.utils import reproducibility

    from rafale.data import build_dataloaders
    from rafale.train import build_language_model, trainer_arguments

    reproducibility.seed_all(config.run.seed)
    train_loader, eval_loader = build_dataloaders(config.task, prepared, config.data.config, config.run.seed)
    model = build_language_model(config, prepared)
    trainer = Trainer(**trainer_arguments(config, model, train_loader, eval_loader, f"{batches}ba", loggers=[],
                                          callbacks=[], checkpoints=checkpoints))
    trainer.fit()
    trainer.close()
    return model, trainer.state.optimizers[0]


def tensors(value, path="") -> dict:
    """Every tensor in a nested state (an optimizer's state dict), by its path."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return {key: tensor for name, item in items for key, tensor in tensors(item, f"{path}/{name}").items()}


@pytest.mark.parametrize("optimizer", EVERY_OPTIMIZER)
def test_a_resumed_run_is_bit_exact_for_every_optimizer(tiny_data, optimizer):
    """4 batches straight through, against 2 batches, a checkpoint, and a new Trainer's resume for the last 2: the
    same weights and optimizer state, bit for bit. Evaluation (and schedule-free's switch to its averaged weights)
    and the checkpoint both fall at batch 2."""
    folder, prepared = tiny_data
    config = load_run_file(write_run(folder, optimizer, "  neftune_alpha: 5.0"))
    whole, whole_optimizer = train(config, prepared, folder / optimizer / "whole", 4)

    resumed_folder = folder / optimizer / "resumed"
    resumed_folder.mkdir()
    halfway = next((folder / optimizer / "whole").glob("*-ba2-rank0.pt"))
    shutil.copy(halfway, resumed_folder / halfway.name)
    os.symlink(halfway.name, resumed_folder / "latest-rank0.pt")
    resumed, resumed_optimizer = train(config, prepared, resumed_folder, 4)

    for (name, ours), theirs in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(ours, theirs), name
    state, resumed_state = tensors(whole_optimizer.state_dict()), tensors(resumed_optimizer.state_dict())
    assert state.keys() == resumed_state.keys() and state
    for key, tensor in state.items():
        assert torch.equal(tensor, resumed_state[key]), key
    if OPTIMIZERS[optimizer].schedule_free:
        # The run ends on the averaged weights (what is exported), and its checkpoint holds them too.
        assert whole_optimizer.param_groups[0]["train_mode"] is False
        saved = torch.load(halfway, weights_only=False)["state"]["optimizers"]
        assert next(iter(saved.values()))["param_groups"][0]["train_mode"] is False


def test_neftune_noise_is_added_in_training_only():
    from rafale.models import build_model
    from rafale.models.generate import generate
    from rafale.transforms import neftune

    torch.manual_seed(0)
    plain = build_model("pythia-tiny")
    noisy = build_model("pythia-tiny")
    noisy.load_state_dict(plain.state_dict())
    neftune.add_noise(noisy, alpha=5.0)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    plain.train(), noisy.train()
    embeddings = noisy.embed(ids)
    noise = embeddings - plain.embed(ids)
    bound = 5.0 / (16 * plain.config.hidden_size) ** 0.5
    assert 0.9 * bound < noise.abs().max() <= bound  # uniform in [-bound, bound], as NEFTune scales it
    assert not torch.equal(noisy(ids), plain(ids))

    plain.eval(), noisy.eval()
    assert torch.equal(noisy(ids), plain(ids))
    # Generation runs the model in eval mode, even one left training: no noise, the same sampled tokens.
    plain.train(), noisy.train()
    samples = [generate(model, ids[:, :4], max_new_tokens=8, temperature=1.0,
                        generator=torch.Generator().manual_seed(2)) for model in (noisy, plain)]
    assert torch.equal(*samples)
