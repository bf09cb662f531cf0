"""Pythia / GPT-NeoX: rafale's logits match transformers' on the same weights, both ways; bad folders fail clearly."""

import json

import pytest
import torch
from reference_checks import TOLERANCE, check_left_padded_batch, max_diff
from safetensors.torch import load_file, save_file

from rafale.errors import RafaleError
from rafale.models import PRESETS, build_model, load_pretrained, load_weights, save_pretrained

transformers = pytest.importorskip("transformers")


def reference_model(**overrides):
    """A tiny random-init GPTNeoXForCausalLM, the numerical reference."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**settings)).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_parallel_residual=True),
        dict(use_parallel_residual=False, rotary_pct=0.5),
        dict(use_parallel_residual=True, rotary_pct=1.0, attn_implementation="sdpa"),
    ],
    ids=["parallel", "sequential", "full-rotary-sdpa"],
)
def test_logits_match_transformers(tmp_path, overrides):
    reference = reference_model(**overrides)
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert not model.training
    assert model.config.parallel_residual == overrides["use_parallel_residual"]
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE


def test_left_padded_batch(tmp_path):
    reference = reference_model()
    reference.save_pretrained(tmp_path)
    check_left_padded_batch(load_pretrained(tmp_path), reference)


def test_sharded_checkpoint_loads(tmp_path):
    reference = reference_model()
    reference.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path)
    input_ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE


@pytest.mark.parametrize("overrides", [dict(), dict(parallel_residual=False, tie_embeddings=True, rotary_pct=0.5)])
def test_export_loads_in_transformers(tmp_path, overrides):
    torch.manual_seed(3)
    model = build_model("pythia-tiny", overrides).eval()
    save_pretrained(model, tmp_path / "export")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reference).__name__ == "GPTNeoXForCausalLM"
    input_ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert max_diff(model(input_ids), reference(input_ids).logits) <= TOLERANCE
    again = load_pretrained(tmp_path / "export")
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_save_replaces_a_model_folder_atomically(tmp_path):
    folder = tmp_path / "export"
    save_pretrained(build_model("pythia-tiny", {"n_layers": 1}), folder)
    save_pretrained(build_model("pythia-tiny"), folder, tokenizer=_tiny_tokenizer_file(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tokenizer.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(RafaleError, match="not a model folder"):
        save_pretrained(build_model("pythia-tiny"), precious)
    assert (precious / "todo.txt").read_text() == "keep me"


def _tiny_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    return path


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    save_pretrained(build_model("pythia-tiny", {"intermediate_size": 128}), tmp_path / "m")
    model = build_model("pythia-tiny")
    with pytest.raises(RafaleError) as error:
        load_weights(model, tmp_path / "m")
    message = str(error.value)
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.weight" in message
    assert "[128, 64]" in message and "[256, 64]" in message
    assert "\n" not in message


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    save_pretrained(build_model("pythia-tiny"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["gpt_neox.layers.1.attention.dense.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(RafaleError, match=r"missing tensors: gpt_neox\.layers\.1\.attention\.dense\.weight.*extra"):
        load_pretrained(tmp_path)


def test_corrupt_or_absent_files(tmp_path):
    with pytest.raises(RafaleError, match="no such model folder"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(RafaleError, match="no config.json"):
        load_pretrained(tmp_path)

    save_pretrained(build_model("pythia-tiny"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(RafaleError, match=r"model\.safetensors: not a valid safetensors file \("):
        load_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(RafaleError, match="no model.safetensors"):
        load_pretrained(tmp_path / "m")

    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "mamba"}))
    with pytest.raises(RafaleError, match="model_type 'mamba' is not supported; valid: gpt_neox"):
        load_pretrained(tmp_path / "m")


def test_bad_presets_and_overrides():
    with pytest.raises(RafaleError, match="unknown preset 'pythia7b'; valid: .*pythia14m.*pythia-tiny"):
        build_model("pythia7b")
    with pytest.raises(RafaleError, match=r"model\.hidden_size: 100 is not divisible by model\.n_heads \(3\)"):
        build_model("pythia-tiny", {"hidden_size": 100, "n_heads": 3})
    with pytest.raises(RafaleError, match="model.n_layer: not a model setting"):
        build_model("pythia-tiny", {"n_layer": 2})
    with pytest.raises(RafaleError, match="model.rotary_pct"):
        build_model("pythia-tiny", {"rotary_pct": 0.1})
    with pytest.raises(RafaleError, match="model.norm: 'rmsnorm' cannot be saved as gpt_neox"):
        save_pretrained(build_model("pythia-tiny", {"norm": "rmsnorm"}), "/nonexistent/never-written")


@pytest.mark.parametrize(
    "preset, count",
    [("pythia14m", 14_067_712), ("pythia70m", 70_426_624), ("pythia160m", 162_322_944), ("pythia410m", 405_334_016)],
)
def test_preset_parameter_counts(preset, count):
    # The published totals of EleutherAI's checkpoints (embeddings and untied head included).
    with torch.device("meta"):
        model = build_model(preset)
    assert model.num_parameters() == count
    assert PRESETS[preset]["vocab_size"] == 50304
    c = model.config
    non_embedding = count - c.vocab_size * c.hidden_size
    assert model.flops_per_token(2048) == 6 * non_embedding + 12 * c.n_layers * c.hidden_size * 2048


def test_other_switches_run_and_agree_with_themselves():
    # Llama-style switches have no gpt_neox reference; check the padded, cached and plain paths agree.
    torch.manual_seed(4)
    switches = dict(norm="rmsnorm", mlp="swiglu", n_kv_heads=2, positions="learned", attention_bias=False)
    model = build_model("pythia-tiny", switches).eval()
    input_ids = torch.randint(1, 128, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        padded = model(input_ids, attention_mask)
        assert max_diff(padded[0, 4:], model(input_ids[:1, 4:])[0]) <= TOLERANCE
        cache = model.new_kv_cache(1, 9)
        first = model(input_ids[1:, :5], kv_cache=cache)
        rest = model(input_ids[1:, 5:], kv_cache=cache)
        assert max_diff(torch.cat([first, rest], dim=1)[0], padded[1]) <= TOLERANCE
