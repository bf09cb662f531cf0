"""Comparisons against a `transformers` reference model that every decoder family's tests share."""

import torch

TOLERANCE = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_left_padded_batch(model, reference, vocab_size: int = 128) -> None:
    """A left-padded batch: each row's real positions match the reference's and the row run alone, with no NaN."""
    input_ids = torch.randint(1, vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    pads = [0, 5, 11]
    attention_mask = (torch.arange(12)[None] >= torch.tensor(pads)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    # transformers' forward counts positions from 0 whatever the mask; its generate derives them from the mask.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids, attention_mask)
        theirs = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        assert not ours.isnan().any()
        for row, pad in enumerate(pads):
            assert max_diff(ours[row, pad:], theirs[row, pad:]) <= TOLERANCE
            assert max_diff(ours[row, pad:], model(input_ids[row : row + 1, pad:])[0]) <= TOLERANCE


def random_hf_decoder(family: str, vocab_size: int, layers: int, max_positions: int):
    """A random-init transformers decoder: Llama with grouped-query attention (4 heads, 2 kv heads), or GPT-NeoX."""
    import transformers

    shape = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 intermediate_size=96, max_position_embeddings=max_positions)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **shape))
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**shape))


def exported_story_decoder(folder, positions: int = 256, chat_template: str | None = None):
    """A random-init rafale Pythia exported as rafale exports it (tokenizer.json trained on the synthetic stories,
    tokenizer_config.json naming BOS = EOS = end-of-text, optionally a chat template as an SFT export carries it),
    with weights drawn wide so that the next-token distributions are sharp and a token scored or sampled at the
    wrong place shows. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rafale.data.synthetic import generate_stories
    from rafale.data.tokenizer import hf_tokenizer_config
    from rafale.models import build_model, save_pretrained

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(generate_stories(300, 1), trainers.BpeTrainer(vocab_size=400,
                                                                                 special_tokens=special))
    torch.manual_seed(0)
    model = build_model("pythia-tiny", {"vocab_size": 400, "max_position_embeddings": positions})
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=0.3)
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|padding|>")
    config = hf_tokenizer_config(tokenizer, eos, pad, False, positions)
    if chat_template is not None:
        config["chat_template"] = chat_template
    save_pretrained(model, folder, tokenizer=tokenizer, tokenizer_config=config,
                    config_extras={"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad})
    return folder
