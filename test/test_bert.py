"""BERT / RoBERTa: rafale's outputs match transformers' on the same weights, for each head, both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rafale.errors import RafaleError
from rafale.models import Encoder, build_model, load_pretrained, load_weights, save_pretrained

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
FAMILIES = ("bert", "roberta")
HEADS = ("mlm", "classification", "none")
PAD = {"bert": 0, "roberta": 1}


def reference_model(family, architecture, **overrides):
    """A tiny random-init transformers model (architecture: ForMaskedLM, ForSequenceClassification, Model)."""
    torch.manual_seed(0)
    config_class = getattr(transformers, f"{family.capitalize()}Config")
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=66,
        type_vocab_size=2 if family == "bert" else 1,
        pad_token_id=PAD[family],
        num_labels=3,
    )
    settings.update(overrides)
    model_class = getattr(transformers, f"{family.capitalize()}{architecture}")
    return model_class(config_class(**settings)).eval()


def padded_batch(family):
    """Three right-padded rows (16, 11 and 5 real tokens), their mask, and segment ids (BERT only)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (3, 16), generator=generator)
    attention_mask = (torch.arange(16)[None] < torch.tensor([16, 11, 5])[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD[family])
    token_type_ids = torch.randint(0, 2, (3, 16), generator=generator) if family == "bert" else None
    return input_ids, attention_mask, token_type_ids


def assert_outputs_match(ours, theirs, family, head):
    """Run both on the padded batch; compare class logits, or every real position's vectors."""
    input_ids, attention_mask, token_type_ids = padded_batch(family)
    with torch.no_grad():
        mine = ours(input_ids, attention_mask, token_type_ids)
        output = theirs(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    reference = {"mlm": "logits", "classification": "logits", "none": "last_hidden_state"}[head]
    reference = getattr(output, reference)
    assert mine.shape == reference.shape
    real = attention_mask.bool() if head != "classification" else slice(None)
    assert (mine[real] - reference[real]).abs().max().item() <= TOLERANCE


ARCHITECTURES = {"mlm": "ForMaskedLM", "classification": "ForSequenceClassification", "none": "Model"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(tmp_path, family, head):
    reference = reference_model(family, ARCHITECTURES[head])
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert isinstance(model, Encoder) and not model.training
    assert (model.config.family, model.config.head) == (family, head)
    assert_outputs_match(model, reference, family, head)


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_encoder_with_prefix_or_without_pooler(tmp_path, family):
    # Sentence-embedding folders hold the bare encoder's tensors, sometimes under `bert.`/`roberta.`.
    reference = reference_model(family, "Model")
    reference.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file({f"{family}.{k}": v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert_outputs_match(load_pretrained(tmp_path), reference, family, "none")

    # Without a pooler (add_pooling_layer=False) the hidden states are the same; the pooler stays as initialised.
    bare = getattr(transformers, f"{family.capitalize()}Model")(reference.config, add_pooling_layer=False).eval()
    bare.save_pretrained(tmp_path / "no-pooler")
    assert_outputs_match(load_pretrained(tmp_path / "no-pooler"), bare, family, "none")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_export_loads_in_transformers(tmp_path, family, head):
    torch.manual_seed(3)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    overrides = dict(head=head, num_labels=3, id2label=labels) if head == "classification" else dict(head=head)
    model = build_model(f"{family}-test-tiny", overrides).eval()
    # Fresh heads start at zero bias; give every tensor a value so a mis-mapped one cannot hide.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    save_pretrained(model, tmp_path / "export")
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["model_type"] == family and hf["architectures"] == [f"{family.capitalize()}{ARCHITECTURES[head]}"]
    auto = {"mlm": "AutoModelForMaskedLM", "classification": "AutoModelForSequenceClassification", "none": "AutoModel"}
    reference = getattr(transformers, auto[head]).from_pretrained(tmp_path / "export").eval()
    assert type(reference).__name__ == hf["architectures"][0]
    assert_outputs_match(model, reference, family, head)
    if head == "classification":
        assert reference.config.id2label == labels and reference.config.label2id["neutral"] == 1

    again = load_pretrained(tmp_path / "export")
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize(
    "family, source, fresh",
    [
        ("bert", "ForMaskedLM", ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]),
        # BertModel's pooler is BERT's classifier's first layer: it is kept.
        ("bert", "Model", ["classifier.bias", "classifier.weight"]),
        ("roberta", "ForMaskedLM", ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]),
        # RoBERTa's classification head has its own dense layer: RobertaModel's pooler is not used.
        ("roberta", "Model", ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]),
    ],
)
def test_fine_tune_a_classifier_from_another_checkpoint(tmp_path, family, source, fresh):
    reference = reference_model(family, source)
    reference.save_pretrained(tmp_path)
    model = build_model(f"{family}-test-tiny", dict(head="classification", num_labels=3, max_position_embeddings=66))
    assert load_weights(model, tmp_path) == fresh
    encoder = reference if source == "Model" else getattr(reference, family)
    assert torch.equal(model.embed.weight, encoder.embeddings.word_embeddings.weight)
    if "pooler.weight" not in fresh:
        assert torch.equal(model.pooler.weight, encoder.pooler.dense.weight)
    # Loaded as the folder's own model, a missing head is an error, not a silent random init.
    config = tmp_path / "config.json"
    hf = json.loads(config.read_text())
    config.write_text(json.dumps({**hf, "architectures": [f"{family.capitalize()}ForSequenceClassification"]}))
    with pytest.raises(RafaleError, match="missing tensors: .*classifier"):
        load_pretrained(tmp_path)


def test_a_row_of_padding_only_stays_finite():
    # A row with no real token would attend to nothing (NaN) unless each position also sees itself.
    torch.manual_seed(5)
    model = build_model("bert-test-tiny", {"head": "none"}).eval()
    input_ids = torch.randint(3, 128, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1] = 0
    with torch.no_grad():
        hidden = model(input_ids, attention_mask)
        assert hidden.isfinite().all()
        assert (hidden[0] - model(input_ids[:1])[0]).abs().max().item() <= TOLERANCE


def test_classifier_shape_mismatch_names_tensor_and_shapes(tmp_path):
    reference_model("bert", "ForSequenceClassification", num_labels=5).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    hf = json.loads(config.read_text())
    del hf["id2label"], hf["label2id"]
    config.write_text(json.dumps({**hf, "num_labels": 3}))
    with pytest.raises(RafaleError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "classifier.weight has shape [5, 64], the model expects [3, 64]" in message and "\n" not in message


def test_unknown_architecture_and_bad_settings(tmp_path):
    reference_model("bert", "ForTokenClassification").save_pretrained(tmp_path)
    with pytest.raises(RafaleError, match="architectures: BertForTokenClassification is not supported; valid: "):
        load_pretrained(tmp_path)
    with pytest.raises(RafaleError, match="model.head: 'causal' is not one of mlm, classification, none"):
        build_model("bert-test-tiny", {"head": "causal"})
    with pytest.raises(RafaleError, match="model.rotary_pct: not a model setting"):
        build_model("bert-test-tiny", {"rotary_pct": 0.5})


@pytest.mark.parametrize("preset", ["bert-base-uncased", "bert-tiny", "roberta-base"])
def test_preset_parameter_counts(preset):
    family = "roberta" if preset.startswith("roberta") else "bert"
    counts = {}
    for head in HEADS:
        # transformers imports its model classes lazily; that import fails under the meta device.
        reference_class = getattr(transformers, f"{family.capitalize()}{ARCHITECTURES[head]}")
        with torch.device("meta"):
            model = build_model(preset, {"head": head})
            c = model.config
            reference_config = getattr(transformers, f"{family.capitalize()}Config")(
                vocab_size=c.vocab_size,
                hidden_size=c.hidden_size,
                num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads,
                intermediate_size=c.intermediate_size,
                max_position_embeddings=c.max_position_embeddings,
                type_vocab_size=c.type_vocab_size,
                pad_token_id=c.pad_token_id,
            )
            reference = reference_class(reference_config)
        counts[head] = model.num_parameters()
        assert counts[head] == sum(p.numel() for p in reference.parameters())
        if head == "none":
            lookups = c.vocab_size + c.max_position_embeddings + c.type_vocab_size
            expected = 6 * (counts[head] - lookups * c.hidden_size) + 12 * c.n_layers * c.hidden_size * 128
            assert model.flops_per_token(128) == expected
    if preset == "bert-base-uncased":
        assert counts["none"] == 109_482_240
