"""Llama: rafale's logits and greedy tokens match transformers' LlamaForCausalLM, both ways; exports pick the class
that can hold the model's settings, or say which setting none can."""

import dataclasses
import json

import pytest
import torch
from reference_checks import TOLERANCE, check_left_padded_batch, max_diff

from rafale.errors import RafaleError
from rafale.models import build_model, generate, llama, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

# Chosen so that a 16-wide head's 8 frequencies fall in all three bands: kept (wavelength under 64 / 4 positions),
# divided by factor (over 64 / 1), blended in between.
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def reference_model(**overrides):
    """A tiny random-init LlamaForCausalLM, the numerical reference."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=192,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_key_value_heads=2, attn_implementation="sdpa"),
        dict(num_key_value_heads=1, tie_word_embeddings=True),
        dict(attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
        dict(num_key_value_heads=2, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **LLAMA3_SCALING)),
    ],
    ids=["mha", "gqa-sdpa", "mqa-tied", "biases", "llama3-rope"],
)
def test_logits_match_transformers(tmp_path, overrides):
    reference = reference_model(**overrides)
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.family == "llama"
    assert model.config.kv_heads == overrides.get("num_key_value_heads", 4)
    input_ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE


def test_llama3_scaling_changes_only_long_wavelengths(tmp_path):
    reference = reference_model(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, **LLAMA3_SCALING))
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.rope_scaling == LLAMA3_SCALING
    scaled = model.rotary.inverse_frequencies(torch.device("cpu"))
    model.rotary.scaling = None
    plain = model.rotary.inverse_frequencies(torch.device("cpu"))
    assert scaled[0] == plain[0] and torch.allclose(scaled[-1], plain[-1] / 8)
    assert ((scaled < plain) & (scaled > plain / 8)).any()  # some frequency is blended between the two
    input_ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) > 1e-3


def test_older_config_style_loads(tmp_path):
    # Published Llama 3 folders predate rope_parameters: rope_theta and rope_scaling sit at the top level.
    reference = reference_model(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **LLAMA3_SCALING))
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_SCALING))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_pretrained(tmp_path)
    assert (model.config.rotary_emb_base, model.config.rope_scaling) == (500000.0, LLAMA3_SCALING)
    input_ids = torch.randint(0, 128, (1, 48))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE


def test_left_padded_batch(tmp_path):
    reference = reference_model(num_key_value_heads=2)
    reference.save_pretrained(tmp_path)
    check_left_padded_batch(load_pretrained(tmp_path), reference)


@pytest.fixture(scope="module")
def generation_models(tmp_path_factory):
    # Larger than the usual 0.02 init so that logits are peaked: greedy choices are not near-ties.
    reference = reference_model(num_key_value_heads=2, initializer_range=0.2)
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(folder)
    return reference, load_pretrained(folder)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(generation_models, use_cache):
    reference, model = generation_models
    input_ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    pads = torch.tensor([0, 3, 7])
    attention_mask = (torch.arange(10)[None] >= pads[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    theirs = reference.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20)
    batch = generate(model, input_ids, attention_mask, max_new_tokens=20, use_cache=use_cache)
    assert torch.equal(batch, theirs[:, 10:])
    for row, pad in enumerate(pads.tolist()):
        alone = reference.generate(input_ids[row : row + 1, pad:], do_sample=False, max_new_tokens=20)
        ours = generate(model, input_ids[row : row + 1, pad:], max_new_tokens=20, use_cache=use_cache)
        assert torch.equal(ours[0], alone[0, 10 - pad :])
        assert torch.equal(ours[0], batch[row])


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_kv_heads=2, tie_embeddings=True), dict(rope_scaling=LLAMA3_SCALING, attention_bias=True)],
    ids=["plain", "gqa-tied", "llama3-rope-bias"],
)
def test_export_loads_in_transformers(tmp_path, overrides):
    torch.manual_seed(4)
    model = build_model("llama-tiny", overrides).eval()
    save_pretrained(model, tmp_path / "export")
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (hf_config["model_type"], hf_config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    input_ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE
    again = load_pretrained(tmp_path / "export")
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_composed_variant_trains_and_refuses_export_in_one_line(tmp_path):
    # Pythia's parallel residual and quarter rotary with Llama's norm and MLP: no Hugging Face class has all four.
    torch.manual_seed(5)
    model = build_model("pythia-tiny", {"norm": "rmsnorm", "mlp": "swiglu"})
    input_ids = torch.randint(0, 128, (2, 16))
    logits = model(input_ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), input_ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with pytest.raises(RafaleError) as error:
        save_pretrained(model, tmp_path / "export")
    message = str(error.value)
    assert "\n" not in message
    assert "model.norm: 'rmsnorm' cannot be saved as gpt_neox" in message
    assert "model.rotary_pct: 0.25 cannot be saved as llama (needs 1.0)" in message
    assert message.endswith("no Hugging Face class has this combination of settings")
    assert not (tmp_path / "export").exists()

    with pytest.raises(RafaleError, match="model.norm: 'layernorm' cannot be saved as llama.*no Hugging Face class"):
        save_pretrained(build_model("llama-tiny", {"norm": "layernorm"}), tmp_path / "export")
    with pytest.raises(RafaleError, match="model.family: 'mistral' is not one of pythia, llama"):
        save_pretrained(build_model("llama-tiny", {"family": "mistral"}), tmp_path / "export")


def test_composed_variant_saves_as_the_family_that_holds_it(tmp_path):
    # A Pythia switched to every Llama setting is a Llama; biases are kept (Llama has attention_bias and mlp_bias).
    torch.manual_seed(6)
    switches = dict(norm="rmsnorm", mlp="swiglu", rotary_pct=1.0, parallel_residual=False, n_kv_heads=2)
    model = build_model("pythia-tiny", switches).eval()
    save_pretrained(model, tmp_path / "export")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    input_ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE
    again = load_pretrained(tmp_path / "export")
    assert again.config.family == "llama"
    assert again.config == dataclasses.replace(model.config, family="llama")


def _published_config(preset):
    """transformers' own LlamaConfig with the published shapes of each checkpoint."""
    shapes = {
        "smollm135m": dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        ),
        "tinyllama1b": dict(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
        ),
        "llama3.2-1b": dict(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=131072,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        ),
    }
    return transformers.LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, **shapes[preset])


@pytest.mark.parametrize(
    "preset, count",
    [("smollm135m", 134_515_008), ("tinyllama1b", 1_100_048_384), ("llama3.2-1b", 1_235_814_400)],
)
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = build_model(preset)
        reference = transformers.LlamaForCausalLM(_published_config(preset))
    assert model.num_parameters() == count
    assert sum(p.numel() for p in reference.parameters()) == count
    # The preset saves the published architecture, rotary settings included.
    ours, theirs = llama.config_to_hf(model.config), _published_config(preset).to_dict()
    assert {key: theirs[key] for key in ours if key in theirs} == {key: ours[key] for key in theirs if key in ours}


def test_bad_llama_configs(tmp_path):
    reference_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        (dict(hidden_act="gelu"), "hidden_act: 'gelu' is not supported for llama"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "rope type 'yarn' is not supported for llama"),
        (dict(head_dim=32), r"head_dim: 32 x 4 heads != hidden_size 64"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(RafaleError, match=message):
            load_pretrained(tmp_path)
    with pytest.raises(RafaleError, match="model.rope_scaling: needs exactly the keys"):
        build_model("llama-tiny", {"rope_scaling": {"factor": 8.0}})
