"""Decoding: greedy matches transformers token for token, cached or not, padded or not; sampling is seeded."""

import pytest
import torch

from rafale.errors import RafaleError
from rafale.models import build_model, generate, generate_text, load_pretrained, save_pretrained
from rafale.models.generate import generate_from_folder, load_folder

transformers = pytest.importorskip("transformers")

NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random weights as transformers' GPTNeoXForCausalLM and as a rafale Decoder."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        rotary_pct=0.25,
        # Larger than the usual 0.02 so that logits are peaked: greedy choices are not near-ties.
        initializer_range=0.2,
    )
    reference = transformers.GPTNeoXForCausalLM(config).eval()
    # No end-of-text token: transformers must not stop before rafale does.
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    folder = tmp_path_factory.mktemp("neox")
    reference.save_pretrained(folder)
    return reference, load_pretrained(folder)


def prompts(n=3, length=9, seed=1):
    return torch.randint(1, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(models, use_cache):
    reference, model = models
    input_ids = prompts()
    theirs = reference.generate(input_ids, do_sample=False, max_new_tokens=NEW)[:, input_ids.shape[1] :]
    ours = generate(model, input_ids, max_new_tokens=NEW, use_cache=use_cache)
    assert ours.shape == (3, NEW)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_matches_each_prompt_alone(models):
    reference, model = models
    input_ids = prompts(length=10)
    pads = torch.tensor([0, 3, 7])
    attention_mask = (torch.arange(10)[None] >= pads[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = generate(model, input_ids, attention_mask, max_new_tokens=NEW)
    uncached = generate(model, input_ids, attention_mask, max_new_tokens=NEW, use_cache=False)
    theirs = reference.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW)
    assert torch.equal(batch, theirs[:, 10:])
    assert torch.equal(batch, uncached)
    for row, pad in enumerate(pads.tolist()):
        alone = generate(model, input_ids[row : row + 1, pad:], max_new_tokens=NEW)
        assert torch.equal(batch[row], alone[0])


def test_eos_pads_finished_rows_and_stops_early(models):
    _, model = models
    input_ids = prompts(n=2)
    free = generate(model, input_ids, max_new_tokens=NEW)
    eos = free[0, 2].item()
    stopped = generate(model, input_ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    first = free[0].tolist().index(eos)
    assert stopped[0, first] == eos and (stopped[0, first + 1 :] == 0).all()
    assert torch.equal(stopped[:, :first], free[:, :first])
    # Both rows are done once the later of their first end-of-text tokens is out.
    lasts = [row.index(eos) if eos in row else NEW - 1 for row in free.tolist()]
    assert stopped.shape[1] == max(lasts) + 1


def test_sampling_is_seeded(models):
    _, model = models
    input_ids = prompts()

    def sample(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, input_ids, max_new_tokens=NEW, temperature=1.0, generator=generator, **kwargs)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=5, top_p=0.9), sample(7, top_k=5, top_p=0.9))
    # Keeping only the best token is greedy decoding, whichever way it is kept.
    greedy = generate(model, input_ids, max_new_tokens=NEW)
    assert torch.equal(sample(9, top_k=1), greedy)
    assert torch.equal(sample(9, top_p=1e-6), greedy)


def tiny_tokenizer():
    """A BPE tokenizer trained on the fly, small enough for pythia-tiny's 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>", "<unk>"])
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ran in the park", "the sun is hot"] * 5, trainer)
    assert tokenizer.get_vocab_size() <= 128
    return tokenizer


def test_generate_text_returns_one_dict_per_prompt():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(5)
    model = build_model("pythia-tiny").eval()
    prompt_list = ["the cat", "a dog ran in the", ""]
    results = generate_text(model, tokenizer, prompt_list, max_new_tokens=6, temperature=0.8, seed=3)
    assert [r["prompt"] for r in results] == prompt_list
    for result in results:
        assert set(result) == {"prompt", "text", "token_ids"}
        assert isinstance(result["text"], str)
        assert len(result["token_ids"]) <= 6 and 0 not in result["token_ids"]
    assert results == generate_text(model, tokenizer, prompt_list, max_new_tokens=6, temperature=0.8, seed=3)


def test_generate_from_a_run_folder(tmp_path):
    tokenizer = tiny_tokenizer()
    model = build_model("pythia-tiny").eval()
    save_pretrained(model, tmp_path / "run" / "model", tokenizer=tokenizer)
    results = generate_from_folder(tmp_path / "run", ["the cat"], max_new_tokens=4)
    assert results == generate_text(model, tokenizer, ["the cat"], max_new_tokens=4)

    save_pretrained(model, tmp_path / "bare")
    with pytest.raises(RafaleError, match="no tokenizer.json"):
        generate_from_folder(tmp_path / "bare", ["the cat"])


@pytest.mark.parametrize(
    "preset, overrides, dtype",
    [
        ("pythia-tiny", {}, torch.float32),
        ("llama-tiny", {"n_kv_heads": 2}, torch.float32),
        ("llama-tiny", {"n_kv_heads": 2}, torch.bfloat16),
        ("pythia-tiny", {}, torch.bfloat16),
        ("pythia-tiny", {"positions": "learned"}, torch.float32),
        ("pythia-tiny", {"parallel_residual": False}, torch.float32),
    ],
    ids=["pythia-partial-rotary", "llama-gqa", "llama-gqa-bf16", "pythia-bf16-fused-attention", "learned-positions",
         "sequential-residual"],
)
@pytest.mark.parametrize("parts", [1, 3])  # 3 slices do not divide the products' outputs: padded and cut off
@pytest.mark.parametrize("rows", [3, 1], ids=["left-padded-batch", "one-row"])
def test_one_token_step_computes_the_models_forward(preset, overrides, dtype, parts, rows):
    """Step by step over a left-padded batch, or one row (whose products' slices are read as they lie), the
    decoding path (norms folded into the products, products joined and sliced, rotary in place) gives the hidden
    states of Decoder.hidden_states."""
    from rafale.models.generate import OneTokenStep

    torch.manual_seed(2)
    model = build_model(preset, {"init_std": 0.2, **overrides}).eval().to(dtype)
    input_ids = prompts(length=6)[:rows]
    padding = torch.cat([(torch.arange(6)[None] >= torch.tensor([[0], [2], [5]])).long(), torch.ones(3, 4).long()], 1)
    padding = padding[:rows]
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    caches = [model.new_kv_cache(rows, 10) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(input_ids, padding[:, :6], positions[:, :6], cache)
        step = OneTokenStep(model, caches[0], padding, parts)
        tokens = torch.tensor([5, 17, 99])[:rows]
        for i in range(6, 10):
            ours = step(tokens, positions[:, i : i + 1])
            theirs = model.hidden_states(tokens[:, None], padding[:, : i + 1], positions[:, i : i + 1], caches[1])
            # Float rounding only (folded norms, joined products, grouped heads read in place): bf16 within about an
            # ulp.
            tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
            torch.testing.assert_close(ours, theirs[:, 0], **tolerance)
            tokens = (tokens * 7 + i) % 128
    assert caches[0][0].length == caches[1][0].length == 10


@pytest.mark.parametrize("onednn", [True, False])
def test_decoding_leaves_onednn_as_it_found_it(models, onednn):
    """The float32 step on a CPU runs without oneDNN (its GELU set-up costs more than the kernel) and restores the
    user's setting after every step, a failed one too."""
    from rafale.models.generate import OneTokenStep

    _, model = models
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        generate(model, prompts(n=1), max_new_tokens=4)
        assert torch.backends.mkldnn.enabled == onednn
        with torch.inference_mode():
            step = OneTokenStep(model, model.new_kv_cache(1, 4), None, parts=2)
            with pytest.raises(IndexError):
                step(torch.tensor([model.config.vocab_size]), torch.zeros(1, 1, dtype=torch.long))
        assert torch.backends.mkldnn.enabled == onednn
    finally:
        torch.backends.mkldnn.enabled = was


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12)], ids=["wide", "tall"])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_product_equals_linear(shape, parts, bias):
    """A Product, whatever its layout and slicing, computes nn.Linear's product of one row or several."""
    from rafale.models.generate import Product

    torch.manual_seed(0)
    linear = torch.nn.Linear(*shape, bias=bias)
    product = Product(linear.weight.detach(), linear.bias.detach() if bias else None, parts)
    assert product.wide == (shape[1] > shape[0])
    for rows in (1, 3):
        x = torch.randn(rows, shape[0])
        torch.testing.assert_close(product(x), linear(x).detach(), rtol=1e-6, atol=1e-6)


def test_a_16_bit_product_keeps_the_linear_layout():
    """16-bit weights stay [out, in] whatever the shape: CPU kernels read their transposed copy ten times slower."""
    from rafale.models.generate import Product

    weight = torch.randn(12, 5).bfloat16()
    product = Product(weight, None, 2)
    assert not product.wide
    x = torch.randn(3, 5).bfloat16()
    torch.testing.assert_close(product(x), torch.nn.functional.linear(x, weight))


def test_decoding_dtype(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(5)
    save_pretrained(build_model("pythia-tiny", {"init_std": 0.2}), tmp_path, tokenizer=tokenizer)
    _, model, _ = load_folder(tmp_path, "float16")
    assert model.lm_head.weight.dtype == torch.float16
    fp32 = generate_from_folder(tmp_path, ["the cat", "a dog ran in the"], max_new_tokens=8)
    assert generate_from_folder(tmp_path, ["the cat", "a dog ran in the"], max_new_tokens=8, dtype="float16") == fp32
    with pytest.raises(RafaleError, match="dtype: 'int8' is not one of float32, bfloat16, float16"):
        generate_from_folder(tmp_path, ["the cat"], dtype="int8")
