"""Transforms from the run file: rules pick modules by name, LoRA adapters start as no-ops, touch only the rows
they should, freeze the base, merge exactly, and export in PEFT's format; a LoRA run checkpoints its adapters only
and resumes bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from reference_checks import random_hf_decoder

from rafale import transforms
from rafale.errors import RafaleError
from rafale.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def lora(modules="attention", **settings):
    return {"modules": modules, "kind": "lora", **settings}


def randomise_adapters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in transforms.adapters(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("preset, overrides", [("pythia-tiny", {}), ("llama-tiny", {}),
                                               ("bert-test-tiny", {"head": "mlm"})])
def test_a_fresh_adapter_leaves_the_output_unchanged_and_merging_is_exact(preset, overrides):
    torch.manual_seed(0)
    model = build_model(preset, overrides).eval()
    ids = torch.randint(5, 100, (2, 12))
    before = model(ids)
    transforms.apply(model, [lora("all-linear", r=4, alpha=8)], say=lambda _: None)
    assert torch.equal(model(ids), before)
    randomise_adapters(model)
    after = model(ids)
    assert not torch.allclose(after, before)
    merged = transforms.merged(model)
    assert not transforms.adapters(merged) and transforms.adapters(model)
    torch.testing.assert_close(merged(ids), after, rtol=1e-5, atol=1e-5)
    # The merged model is a plain model: its state dict has the base names alone.
    assert set(merged.state_dict()) == set(build_model(preset, overrides).state_dict())


def test_an_adapter_on_q_and_v_changes_only_those_rows_of_the_fused_projection():
    torch.manual_seed(0)
    model = build_model("llama-tiny")
    c = model.config
    base = torch.nn.Linear(c.hidden_size, (c.n_heads + 2 * c.kv_heads) * c.head_dim, bias=c.attention_bias)
    base.load_state_dict(model.blocks[0].attn.qkv.state_dict())
    transforms.apply(model, [lora("attention", projections=["q", "v"])], say=lambda _: None)
    randomise_adapters(model)
    x = torch.randn(3, c.hidden_size)
    ours, theirs = model.blocks[0].attn.qkv(x), base(x)
    q, k = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    assert torch.equal(ours[:, q:q + k], theirs[:, q:q + k])
    assert not torch.allclose(ours[:, :q], theirs[:, :q]) and not torch.allclose(ours[:, q + k:], theirs[:, q + k:])
    delta = model.blocks[0].attn.qkv.delta_weight()
    assert delta[q:q + k].abs().max() == 0
    torch.testing.assert_close(ours, theirs + x @ delta.t(), rtol=1e-5, atol=1e-6)


def test_the_base_is_frozen_names_are_kept_and_the_report_counts_parameters():
    model = build_model("pythia-tiny")
    names = set(model.state_dict())
    lines = []
    transforms.apply(model, [{"modules": r"blocks\.0\.attn\.qkv"}, lora("attention", r=2)], say=lines.append)
    report = lines[0]
    assert "transforms[0] (unchanged on 'blocks\\\\.0\\\\.attn\\\\.qkv'): 1 modules" in report
    assert "transforms[1] (lora on 'attention'): 3 modules" in report  # block 0's qkv was the first rule's
    assert not isinstance(model.blocks[0].attn.qkv, transforms.LoRALinear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{m}.lora_{x}" for i, m in ((0, "proj"), (1, "qkv"), (1, "proj"))
                         for x in "AB"}
    assert names <= set(model.state_dict())  # the base tensors keep their names
    count = sum(model.get_parameter(name).numel() for name in trainable)
    assert f"parameters: {count:,} trainable" in report


@pytest.mark.parametrize("rules, expected", [
    ([lora("attn")], r"transforms\[0\] \(lora on 'attn'\): it matches no module; the linear layers are blocks"),
    ([lora("attention"), lora(r"blocks\.0\.attn\.qkv")], r"transforms\[1\] .*taken by an earlier rule"),
    ([{"modules": "mlp", "kind": "lorax"}], r"transforms\[0\]\.kind: unknown kind 'lorax'; valid: lora"),
    ([lora(rank=4)], r"transforms\[0\]\.rank: lora has no setting 'rank'; valid: r, alpha"),
    ([lora(r=0)], r"transforms\[0\]\.r: Input should be greater than 0"),
    ([lora("blocks[")], r"transforms\[0\]\.modules: not a regular expression"),
])
def test_rule_mistakes_name_the_rule(rules, expected):
    with pytest.raises(RafaleError, match=expected):
        transforms.plan(build_model("pythia-tiny"), rules)


def test_heads_are_left_out_unless_a_rule_names_them():
    model = build_model("pythia-tiny")
    [(_, everything)] = transforms.plan(model, [lora(".*")])
    assert "lm_head" not in everything
    [(_, head)] = transforms.plan(model, [lora("lm_head")])
    assert head == ["lm_head"]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_the_peft_adapter_loads_onto_the_base_for_the_same_logits(tmp_path, family):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from rafale.models import load_pretrained

    torch.manual_seed(0)
    reference = random_hf_decoder(family, 128, 2, 128)
    reference.save_pretrained(tmp_path / "base")
    model = load_pretrained(tmp_path / "base")
    transforms.apply(model, [lora("attention", r=4, alpha=16, projections=["q", "v"]), lora("mlp", r=4, alpha=16)],
                     say=lambda _: None)
    randomise_adapters(model)
    folder, _ = transforms.save_peft_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    tuned = peft.PeftModel.from_pretrained(reference, str(folder)).eval()
    # Every tensor of the file went into the model: PEFT only warns about the ones it cannot place.
    loaded = {name for name, _ in tuned.named_parameters() if "lora_" in name}
    assert len(loaded) == len(__import__("safetensors.torch").torch.load_file(folder / "adapter_model.safetensors"))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), tuned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


LORA_RUN = {
    "run": {"name": "lora", "seed": 3, "max_duration": "12ba", "max_lr": 3e-3, "warmup_pct": 0.1,
            "eval_interval": "12ba", "save_interval": "4ba", "sample_max_new_tokens": 4},
    "model": {"config": "pythia-tiny", "use_pretrained": True, "pretrained_path": "base/model"},
    "data": {"pipeline": "sft", "config": {"name": "lora", "dataset_path": "synthetic:instructions",
                                           "synthetic_documents": 300, "prompt_template": "plain",
                                           "max_sequence_length": 96, "train_batch_size": 8, "eval_batch_size": 8,
                                           "eval_examples": 8}},
    "transforms": [{"modules": "all-linear", "kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1}],
}


def test_a_lora_run_checkpoints_its_adapters_only_resumes_bit_for_bit_and_exports_both_forms(tmp_path):
    from safetensors.torch import load_file

    from rafale.safety import load_checkpoint_safely

    environment = {**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore",
                   "OMP_NUM_THREADS": "1"}
    base = {"run": {"name": "base", "checkpoint_dir": ".", "max_duration": "4ba", "eval_interval": "4ba",
                    "save_interval": "4ba", "sample_max_new_tokens": 0},
            "model": {"config": "pythia-tiny"},
            "data": {"config": {"name": "stories", "dataset_path": "synthetic:stories", "synthetic_documents": 200,
                                "vocab_size": 320, "max_sequence_length": 64, "train_batch_size": 8}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))

    def start(name):
        """The run in the background, its output in files: a pipe nobody reads yet could fill and stall it."""
        output = [open(tmp_path / f"{name}.{stream}", "w+") for stream in ("out", "err")]
        process = subprocess.Popen([sys.executable, "-m", "rafale", "-c", str(tmp_path / f"{name}.yaml")],
                                   cwd=ROOT, env=environment, stdout=output[0], stderr=output[1], text=True)
        process.output = output
        return process

    def finish(process):
        process.wait(timeout=300)
        texts = []
        for stream in process.output:
            stream.seek(0)
            texts.append(stream.read())
            stream.close()
        return subprocess.CompletedProcess(process.args, process.returncode, *texts)

    assert finish(start("base")).returncode == 0
    for name in ("reference", "resumed"):
        run = {**LORA_RUN, "run": {**LORA_RUN["run"], "name": name, "checkpoint_dir": "."}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(run))
    # The uninterrupted run and the one to kill are independent: they share the cores instead of taking turns.
    reference = start("reference")
    killed = start("resumed")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "ep0-ba4-rank0.pt"
    deadline = time.monotonic() + 240
    latest = checkpoint.with_name("latest-rank0.pt")
    # Saved and pointed at by `latest`, which autoresume follows.
    while not (checkpoint.exists() and latest.exists() and latest.resolve() == checkpoint):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    finish(killed)
    done = finish(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transforms:\n  transforms[0] (lora on 'all-linear'): 8 modules" in done.stdout
    assert "adapter exported to" in done.stdout
    saved = load_checkpoint_safely(tmp_path / "reference" / "checkpoints" / "ep0-ba4-rank0.pt")
    assert saved["state"]["model"] and all(".lora_" in key for key in saved["state"]["model"])

    done = finish(start("resumed"))
    assert done.returncode == 0 and "resumed from the latest checkpoint" in done.stdout, done.stderr[-3000:]
    ours = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The export is the merged model, a plain folder, with the adapter beside it.
    assert not any("lora" in key for key in ours)
    assert (tmp_path / "reference" / "model" / "adapter" / "adapter_model.safetensors").is_file()


# Simulated number formats.

from rafale.transforms import quantize as formats  # noqa: E402


def float8_grid_values(largest: float) -> torch.Tensor:
    """Zero, subnormals, normals of every binade, halfway points (ties), and values up to `largest`."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.cat([torch.tensor([0.0, 2.0**-10, 2.0**-9, 2.0**-8, 3 * 2.0**-10, 0.0137, 1.0, 1.0625, 1.1875]),
                            torch.exp2(torch.empty(2000).uniform_(-12, torch.log2(torch.tensor(largest)).item(),
                                                                   generator=generator)),
                            torch.tensor([largest])])
    return torch.cat([magnitudes, -magnitudes])


@pytest.mark.parametrize("exponent_bits, mantissa_bits, dtype, largest",
                         [(4, 3, torch.float8_e4m3fn, 448.0), (5, 2, torch.float8_e5m2, 57344.0)])
def test_minifloat_rounds_as_torchs_float8_on_the_values_both_hold(exponent_bits, mantissa_bits, dtype, largest):
    x = float8_grid_values(largest)
    ours = formats.minifloat(x, exponent_bits, mantissa_bits)
    torch.testing.assert_close(ours, x.to(dtype).float(), rtol=0, atol=0)


def test_minifloat_saturates_instead_of_overflowing_and_keeps_signs_and_zero():
    x = torch.tensor([500.0, 1e6, float("inf"), -1e6, 0.0, -0.0, 2.0**-12])
    y = formats.minifloat(x, 4, 3)
    assert y.tolist()[:4] == [480.0, 480.0, 480.0, -480.0]
    assert y[4] == 0 and y[5] == 0 and not torch.isnan(y).any()
    # 2^-12 lies below half the smallest subnormal (2^-9) of E4M3: it rounds to zero.
    assert y[6] == 0


def test_integer_formats_against_a_plain_recomputation():
    x = torch.tensor([[-2.6, -0.25, 0.0, 0.3, 1.74, 9.0], [0.01, -0.02, 0.5, 0.0, 0.0, 0.0]])
    # Fixed point, 4 bits with 1 fraction bit: steps of 0.5 between -4 and 3.5.
    assert formats.integer(x, 4, frac_bits=1)[0].tolist() == [-2.5, -0.0, 0.0, 0.5, 1.5, 3.5]
    for scaling in ("tensor", "channel"):
        rows = [x] if scaling == "tensor" else [x[0:1], x[1:2]]
        expected = []
        for row in rows:
            scale = row.abs().max().item() / 7
            levels = [[max(-7, min(7, round(v / scale))) for v in r] for r in row.tolist()]
            expected.append(torch.tensor(levels) * scale)
        torch.testing.assert_close(formats.integer(x, 4, scaling=scaling), torch.cat(expected), rtol=1e-6, atol=1e-7)
    # Groups of 4 along the last dimension, the last one padded: each group scaled by its own largest value.
    grouped = formats.integer(x, 4, scaling="group", group_size=4)
    torch.testing.assert_close(grouped[:, :4], formats.integer(x[:, :4], 4, scaling="channel"))
    torch.testing.assert_close(grouped[:, 4:], formats.integer(x[:, 4:], 4, scaling="channel"))
    assert torch.equal(formats.integer(torch.zeros(3), 8), torch.zeros(3))


def test_block_format_against_a_plain_recomputation():
    x = torch.tensor([0.75, -0.1, 0.02, 0.3, 5.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    y = formats.block(x, block_size=4, mantissa_bits=4)
    expected = []
    for start in range(0, 10, 4):
        values = x[start:start + 4].tolist()
        largest = max(abs(v) for v in values)
        if largest == 0:
            expected += [0.0] * len(values)
            continue
        shared = torch.ceil(torch.log2(torch.tensor(largest))).item()
        expected += [max(-8, min(7, round(v / 2**shared * 8))) * 2 ** (shared - 3) for v in values]
    assert y.tolist() == expected


def test_a_quantized_linear_rounds_its_operands_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 5)
    settings = formats.QuantizeSettings.model_validate({
        "weight": {"format": "int", "width": 4, "scaling": "channel"},
        "input": {"format": "minifloat", "exponent_bits": 4, "mantissa_bits": 3},
        "output": {"format": "block", "block_size": 5, "mantissa_bits": 6}})
    layer = formats.QuantizedLinear(base, settings)
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(formats.minifloat(x.detach(), 4, 3),
                                          formats.integer(base.weight.detach(), 4, scaling="channel"), base.bias)
    torch.testing.assert_close(y, formats.block(expected.detach(), 5, 6))
    weights = torch.randn(3, 5)
    (y * weights).sum().backward()
    # The gradients of the float layer at the unrounded operands.
    plain_x = x.detach().clone().requires_grad_()
    plain = torch.nn.Linear(8, 5)
    plain.load_state_dict(base.state_dict())
    (plain(plain_x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, plain_x.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)


def test_a_setting_of_another_format_names_the_rule():
    with pytest.raises(RafaleError, match=r"transforms\[0\]\.weight\.int\.mantissa_bits"):
        transforms.plan(build_model("pythia-tiny"), [{"modules": "mlp", "kind": "quantize",
                                                      "weight": {"format": "int", "mantissa_bits": 3}}])


def test_transform_aware_training_exports_rounded_weights_with_its_rules(tmp_path):
    run = {"run": {"name": "q", "checkpoint_dir": ".", "max_duration": "6ba", "eval_interval": "6ba",
                   "save_interval": "6ba", "sample_max_new_tokens": 4},
           "model": {"config": "pythia-tiny"},
           "data": {"config": {"name": "stories", "dataset_path": "synthetic:stories", "synthetic_documents": 200,
                               "vocab_size": 320, "max_sequence_length": 64, "train_batch_size": 8}},
           "transforms": [{"modules": "all-linear", "kind": "quantize",
                           "weight": {"format": "int", "width": 8, "scaling": "channel"},
                           "input": {"format": "minifloat", "exponent_bits": 4, "mantissa_bits": 3}}]}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(run))
    environment = {**os.environ, "RAFALE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "rafale", "-c", str(tmp_path / "q.yaml")], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transforms[0] (quantize on 'all-linear'): 8 modules" in done.stdout
    # The three figures of transform-aware training.
    assert "[eval before the transforms] cross-entropy" in done.stdout
    assert re.search(r"transforms: cross-entropy [\d.]+ before them, [\d.]+ transformed before training, [\d.]+ "
                     r"after training", done.stdout), done.stdout
    export = tmp_path / "q" / "model"
    assert json.loads((export / "transforms.json").read_text())["rules"][0]["kind"] == "quantize"
    from safetensors.torch import load_file

    weight = load_file(export / "model.safetensors")["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
    torch.testing.assert_close(weight, formats.integer(weight, 8, scaling="channel"))
    generated = subprocess.run([sys.executable, "-m", "rafale", "generate", str(export), "-p", "Once", "-n", "4"],
                               cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-2000:]


@pytest.mark.parametrize("preset, overrides", [("pythia-tiny", {}), ("llama-tiny", {}),
                                               ("bert-test-tiny", {"head": "mlm"})])
def test_attention_products_without_formats_equal_sdpa_and_with_them_a_recomputation(preset, overrides):
    torch.manual_seed(0)
    model = build_model(preset, overrides).eval()
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # padding: the masked path as well as the causal one
    expected = [model(ids), model(ids, attention_mask=mask)]
    transforms.apply(model, [{"modules": "attention-products", "kind": "quantize_attention"}], say=lambda _: None)
    assert isinstance(model.blocks[0].attn, transforms.QuantizedAttention)
    torch.testing.assert_close(model(ids), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids, attention_mask=mask), expected[1], rtol=1e-5, atol=1e-5)

    fp8 = {"format": "minifloat", "exponent_bits": 4, "mantissa_bits": 3}
    attention = model.blocks[0].attn
    attention.settings = formats.AttentionQuantizeSettings.model_validate(
        {"query": fp8, "key": fp8, "probabilities": {"format": "int", "width": 8, "frac_bits": 7}, "value": fp8})
    q, k, v = (torch.randn(1, attention.n_heads, 5, attention.head_dim, requires_grad=True) for _ in range(3))
    ours = attention.attend(q, k, v, is_causal=True)
    rounded = [formats.minifloat(t.detach(), 4, 3) for t in (q, k, v)]
    scores = rounded[0] @ rounded[1].transpose(-1, -2) / attention.head_dim**0.5
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expected = formats.integer(scores.softmax(-1), 8, frac_bits=7) @ rounded[2]
    torch.testing.assert_close(ours, expected)
    ours.sum().backward()  # straight through: every operand gets a gradient
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_attention_products_decode_with_the_kv_cache_as_without_it():
    from rafale.models import generate

    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    transforms.apply(model, [{"modules": "attention-products", "kind": "quantize_attention",
                              "value": {"format": "int", "width": 6}}], say=lambda _: None)
    prompt = torch.randint(5, 100, (1, 6))
    assert torch.equal(generate(model, prompt, max_new_tokens=8, use_cache=True),
                       generate(model, prompt, max_new_tokens=8, use_cache=False))


def test_the_optical_format_against_a_plain_recomputation():
    x = torch.tensor([-3.0, -1.0, -0.01, 0.0, 0.004, 0.3, 0.999, 2.5])
    low, high = torch.tensor(-1.0), torch.tensor(1.0)
    y = formats.optical(x, low, high, levels=5, lut_min=0.1)
    # Five levels over [-1, 1]: -1, -0.5, 0, 0.5, 1; then the floor raises (0, 0.1) to 0.1, lowers (-0.1, 0) to -0.1.
    expected = []
    for value in x.tolist():
        level = round((min(max(value, -1.0), 1.0) + 1) / 2 * 4) / 4 * 2 - 1
        expected.append(0.1 if 0 < level < 0.1 else -0.1 if -0.1 < level < 0 else level)
    assert y.tolist() == expected
    torch.testing.assert_close(formats.optical(torch.tensor([0.05]), low, high, levels=201, lut_min=0.1),
                               torch.tensor([0.1]))
    # Stochastic rounding lands on the two nearest levels, unbiased on average.
    torch.manual_seed(0)
    samples = formats.optical(torch.full((20000,), 0.3), low, high, levels=5, stochastic=True)
    assert set(samples.tolist()) == {0.0, 0.5} and abs(samples.mean().item() - 0.3) < 0.01


def test_optical_ranges_track_an_average_while_training_and_travel_with_the_export(tmp_path):
    from rafale.models import load_pretrained, save_pretrained

    rounder = formats.OpticalRounder(formats.OpticalFormat(format="optical", levels=16), stochastic=False)
    rounder(torch.tensor([-1.0, 2.0]))
    assert rounder.range.tolist() == [-1.0, 2.0]
    rounder(torch.tensor([-3.0, 4.0]))
    torch.testing.assert_close(rounder.range, torch.tensor([-1.2, 2.2]))
    rounder.eval()(torch.tensor([-30.0, 40.0]))
    torch.testing.assert_close(rounder.range, torch.tensor([-1.2, 2.2]))  # evaluation only reads it

    torch.manual_seed(0)
    model = build_model("pythia-tiny")
    optical = {"format": "optical", "levels": 64, "lut_min": 0.01}
    rules = [{"modules": "mlp", "kind": "quantize", "weight": optical, "input": optical, "output": optical}]
    transforms.apply(model, rules, say=lambda _: None)
    assert "blocks.0.mlp.up.rounders.input.range" in model.state_dict()  # in checkpoints, under the layer's name
    ids = torch.randint(0, 128, (2, 10))
    model(ids)  # training: the ranges start tracking
    model.eval()
    expected = model(ids)
    save_pretrained(transforms.merged(model), tmp_path)
    transforms.save_rules(rules, tmp_path, model)
    again = transforms.apply_saved(load_pretrained(tmp_path), tmp_path)
    torch.testing.assert_close(again(ids), expected, rtol=1e-5, atol=1e-5)


def test_lora_on_a_pretrained_encoder_keeps_its_new_classification_head_training(tmp_path, monkeypatch):
    from rafale.config import load_run_file
    from rafale.data import prepare_data
    from rafale.models import save_pretrained
    from rafale.optim import build_optimizer
    from rafale.train import build_language_model

    monkeypatch.setenv("RAFALE_CACHE_DIR", str(tmp_path / "cache"))
    save_pretrained(build_model("bert-test-tiny", {"head": "mlm", "vocab_size": 512}), tmp_path / "mlm")
    run = {"run": {"name": "cls"}, "model": {"config": "bert-test-tiny", "use_pretrained": True,
                                             "pretrained_path": str(tmp_path / "mlm")},
           "data": {"pipeline": "classification",
                    "config": {"name": "s", "dataset_path": "synthetic:sentiment", "synthetic_documents": 200,
                               "vocab_size": 300, "max_sequence_length": 32}},
           "transforms": [lora("all-linear", r=2)]}
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(run))
    config = load_run_file(tmp_path / "cls.yaml")
    model = build_language_model(config, prepare_data(config))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(name.startswith(("embed", "blocks.0.attn.qkv.weight")) for name in trainable)
    optimized = {id(p) for group in build_optimizer(config, model).param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_no_peft_adapter_stands_for_a_model_whose_other_parameters_trained(tmp_path):
    model = build_model("pythia-tiny")
    transforms.apply(model, [lora("attention", train=["lm_head"])], say=lambda _: None)
    assert model.lm_head.weight.requires_grad
    folder, why = transforms.save_peft_adapter(model, tmp_path / "adapter")
    assert folder is None and "lm_head.weight" in why and not (tmp_path / "adapter").exists()
