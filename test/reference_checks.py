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
