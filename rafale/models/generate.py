"""Decoding: greedy or sampled (temperature, top-k, top-p), batched over left-padded prompts, with a KV cache.

With the cache, the prompt is run once (prefill), then each step feeds one token per row and writes its keys
and values in place; the per-step Python work is a forward call and a few tensor ops.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rafale.errors import RafaleError
from rafale.models.blocks import MLP, Attention, Block, KVCache, RMSNorm, Rotary
from rafale.models.decoder import Decoder
from rafale.models.weights import CONFIG_FILE, TOKENIZER_FILE, load_pretrained

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# Decoding precisions: 16-bit weights halve the bytes a step reads, where the hardware multiplies them fast.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, vocab] -> next token ids [B]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# The modules OneTokenStep computes as written; a transform's module (LoRA, simulated formats) computes otherwise, and
# a model that holds one decodes through its own forward pass.
PLAIN_MODULES = (Decoder, nn.ModuleList, nn.Embedding, nn.Linear, nn.LayerNorm, nn.Dropout, RMSNorm, Rotary, Block,
                 Attention, MLP)


class Product:
    """A linear layer's product for decoding rows, its weight laid out for the way a CPU streams it fastest.

    A decoding step reads every weight once, so a product's speed is how fast it streams its weight
    (bench/generation.py, 2-core EPYC, weights out of cache, one row): one matrix-vector product keeps one core
    busy and reads 12-23 GB/s, while the memory feeds two cores at once nearly twice that. So the weight is cut
    into `parts` slices of its outputs, one per thread, multiplied by one batched product (`bmm` runs its batch
    on the threads): 26-31 GB/s. In float32 each slice is stored so that its contiguous rows are the longer side:
    [in, out] for a wide product (512 -> 2048: 29 GB/s against 24 for [out, in]), [out, in] for a tall one
    (2048 -> 512: 29 against 18). 16-bit weights stay [out, in], the layout whose kernels are fast for them (the
    transposed copy ran at 1 GB/s).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int = 1):
        """weight [out, in] and bias [out] (or None), as nn.Linear holds them; parts: slices of the outputs."""
        out, width = weight.shape
        self.out, self.wide = out, out > width and weight.dtype == torch.float32
        padding = -out % parts  # zero rows, so that the slices are equal; their outputs are cut off
        if padding:
            weight = torch.cat([weight, weight.new_zeros(padding, width)])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(padding)])
        slices = weight.reshape(parts, -1, width)
        # [parts, in, out / parts] for bmm: a contiguous copy when wide, a view of [out, in] slices when tall.
        self.weight = slices.transpose(1, 2).contiguous() if self.wide else slices.contiguous().transpose(1, 2)
        self.bias = None if bias is None else bias.reshape(parts, 1, -1)
        self.padded = padding > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] -> [B, out]."""
        B = x.shape[0]
        rows = x.expand(self.weight.shape[0], B, -1)
        y = torch.bmm(rows, self.weight) if self.bias is None else torch.baddbmm(self.bias, rows, self.weight)
        # y is [parts, B, out / parts]: for one row the slices already lie end to end.
        y = y.view(1, -1) if B == 1 else y.transpose(0, 1).reshape(B, -1)
        return y[:, : self.out] if self.padded else y


def folded_product(reads: list[tuple[nn.Module, list[nn.Linear]]], parts: int, queries: int = 0,
                   query_scale: float = 1.0) -> Product:
    """Linears that read norm(x) for a (norm, linears) pair each, stacked into one product of the normalised x
    (without any affine): each norm's scale is folded into its linears' weights (W * scale) and its shift into
    their biases (b + W @ shift), in fp32; the first `queries` outputs are multiplied by query_scale (attention's
    1 / sqrt(head_dim), which the scores then need not apply)."""
    weights, biases = [], []
    for norm, linears in reads:
        for linear in linears:
            weight = linear.weight.float()
            bias = linear.bias.float() if linear.bias is not None else None
            if getattr(norm, "bias", None) is not None:
                bias = weight @ norm.bias.float() + (bias if bias is not None else 0)
            weights.append(weight * norm.weight.float())
            biases.append(bias)
    dtype = reads[0][1][0].weight.dtype
    weight, bias = torch.cat(weights), None
    weight[:queries] *= query_scale
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
        bias[:queries] *= query_scale
    return Product(weight.to(dtype), None if bias is None else bias.to(dtype), parts)


def joined_product(linears: list[nn.Linear], parts: int) -> Product:
    """Linears whose outputs are summed, as one product of their inputs laid side by side."""
    biases = [linear.bias for linear in linears if linear.bias is not None]
    return Product(torch.cat([linear.weight for linear in linears], dim=1), sum(biases) if biases else None, parts)


class OneTokenStep:
    """Decoder.hidden_states for one new token per row after the KV cache, in fewer, larger products.

    At batch 1 a step reads every weight once, so its speed is how fast its products stream their weights, plus
    a couple of hundred small ops that cost microseconds each whatever their size. Here the products are as few
    and as large as the block allows, each in its fastest layout (`Product`): the norms' affine scales and shifts
    are folded into the products that read them; in a parallel block (GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)) the
    QKV and MLP-in products then read the same normalised x, so they are one product, and the attention's output
    and the MLP's down products, whose outputs are summed, are another; a SwiGLU MLP's gate and up are one. Folding
    rounds differently from the layers' own products: the logits agree to float32 precision, not bit for bit. The
    products' weights are copies made once per generation: while decoding, the blocks' weights are held twice.

    The rows are [B, hidden]; the rotary angles of every position and the padding mask are made once per
    generation and looked up per step; rotary is a gather and a multiply-add in place on the product's output
    (blocks.apply_rotary's arithmetic); a position's keys and values go into the cache in one copy; 1/sqrt(head_dim)
    is folded into the query weights. Attention is one product per key/value head and its group of query heads,
    reading the cache in place: PyTorch's CPU SDPA copies the cache once per query head where heads are grouped,
    and where they are not its kernel costs more than these three ops in float32 on a CPU; it stays the kernel for
    heads that are not grouped in 16-bit or on a GPU.
    """

    def __init__(self, model: Decoder, cache: list[KVCache], padding: torch.Tensor | None, parts: int):
        """padding [B, max_len]: 1 for real tokens over every position the generation reaches, or None; parts:
        the slices of each product (Product)."""
        self.model, self.cache = model, cache
        c = model.config
        self.heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.qkv_size = (c.n_heads + 2 * c.kv_heads) * c.head_dim
        self.mlp_in_size = c.intermediate_size * (2 if c.mlp == "swiglu" else 1)
        self.norm, self.swiglu = c.norm, c.mlp == "swiglu"
        self.blocks = [(block.parallel, self.products(block, parts)) for block in model.blocks]
        device = model.lm_head.weight.device
        sixteen_bit = model.lm_head.weight.dtype != torch.float32
        self.onednn = sixteen_bit  # see __call__
        # One fused attention kernel where it is the faster: heads that are not grouped, in 16-bit or off the CPU
        # (on a CPU in float32 the three ops of `attention` cost less for one query).
        self.fused = c.kv_heads == c.n_heads and (sixteen_bit or device.type != "cpu")
        self.norm_eps = torch.tensor(c.norm_eps, device=device)
        B, max_len = cache[0].keys.shape[0], cache[0].keys.shape[2]
        self.mask = None
        if padding is not None:
            # Added to the scores [B * kv_heads, queries per key/value head, positions]: -inf at padding; sliced to
            # the filled length each step.
            mask = torch.zeros(B, max_len, device=device).masked_fill(~padding.bool(), float("-inf"))
            self.mask = mask.repeat_interleave(c.kv_heads, 0)[:, None, :].to(model.lm_head.weight.dtype)
        if model.rotary is not None:
            # The angles of every position the generation can reach (positions count real tokens, so they stay
            # below the cache's length), looked up per step. rotate_half is a gather with signs: dims [a | b | rest]
            # -> [-b | a | rest] times sin; the unrotated dims get cos 1 and sin 0, so they pass through exactly.
            half = model.rotary.dim // 2
            cos, sin = (table.view(max_len, -1) for table in model.rotary(torch.arange(max_len)[None].to(device)))
            sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
            rest = c.head_dim - 2 * half
            self.cos = torch.cat([cos, cos.new_ones(max_len, rest)], -1)
            self.sin = torch.cat([sin * sign, sin.new_zeros(max_len, rest)], -1)
            index = torch.arange(c.head_dim, device=device)
            self.rotate_index = torch.cat([index[half : 2 * half], index[:half], index[2 * half :]])

    @staticmethod
    def products(block: Block, parts: int) -> dict[str, Product]:
        attn, mlp = block.attn, block.mlp
        mlp_in = [mlp.gate, mlp.up] if mlp.kind == "swiglu" else [mlp.up]
        scaled = dict(queries=attn.n_heads * attn.head_dim, query_scale=attn.head_dim**-0.5)
        if block.parallel:
            return {"in": folded_product([(block.norm1, [attn.qkv]), (block.norm2, mlp_in)], parts, **scaled),
                    "out": joined_product([attn.proj, mlp.down], parts)}
        return {"in": folded_product([(block.norm1, [attn.qkv])], parts, **scaled),
                "proj": Product(attn.proj.weight, attn.proj.bias, parts),
                "mlp_in": folded_product([(block.norm2, mlp_in)], parts),
                "down": Product(mlp.down.weight, mlp.down.bias, parts)}

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The block norm without its scale and shift (folded into the products that read it)."""
        if self.norm == "layernorm":
            return F.layer_norm(x, x.shape[-1:], eps=self.model.config.norm_eps)
        # RMSNorm's arithmetic (in fp32, cast back before the folded scale) in four kernels: the mean of squares
        # as the squared 2-norm over the width; a CPU's mean is five kernels (sum, fill, divide, two copies) and
        # a Llama block normalises twice a step.
        x32 = x.float()
        norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
        return (x32 * torch.addcmul(self.norm_eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()).to(x.dtype)

    def rotate(self, queries_and_keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary on queries_and_keys [B, heads + kv_heads, head_dim], in place; 16-bit rows turn in fp32."""
        turned = queries_and_keys.index_select(-1, self.rotate_index)
        if queries_and_keys.dtype == torch.float32:
            queries_and_keys.mul_(cos).addcmul_(turned, sin)
        else:
            queries_and_keys.copy_(torch.addcmul(queries_and_keys.float() * cos, turned.float(), sin))

    def attention(self, qkv: torch.Tensor, rotation, mask, cache: KVCache) -> torch.Tensor:
        """qkv [B, (heads + 2 kv_heads) * head_dim], rotated in place -> the attention output [B, heads * head_dim]."""
        B, D = qkv.shape[0], self.head_dim
        heads = qkv.view(B, -1, D)
        if rotation is not None:
            self.rotate(heads.narrow(1, 0, self.heads + self.kv_heads), *rotation)
        # This position's keys and values, [B, 2, kv_heads, D] in the product's output, into the cache.
        new = heads.narrow(1, self.heads, 2 * self.kv_heads).view(B, 2, self.kv_heads, D)
        cached = cache.append(new.transpose(0, 1))
        length = cache.length
        if self.fused:
            keys, values = cached.unbind(0)
            mask = None if mask is None else mask.view(B, self.heads, 1, length)
            return F.scaled_dot_product_attention(heads.narrow(1, 0, self.heads).unsqueeze(2), keys, values,
                                                  attn_mask=mask, scale=1.0).view(B, -1)
        groups = B * self.kv_heads
        keys, values = cached.view(2, groups, length, D).unbind(0)
        queries = heads.narrow(1, 0, self.heads).reshape(groups, -1, D)
        keys = keys.transpose(1, 2)  # [groups, D, length]; the queries are already scaled by 1/sqrt(D)
        scores = torch.bmm(queries, keys) if mask is None else torch.baddbmm(mask, queries, keys)
        weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
        return torch.bmm(weights, values).view(B, -1)

    def activation(self, mlp_in: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = mlp_in.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(mlp_in)

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token [B], position [B, 1] -> the final norm's output [B, hidden] for that token."""
        # oneDNN (on by default) sets up each float32 GELU in ~15 us on a CPU, three times ATen's own kernel on a
        # decoding row; 16-bit products need it, so it stays on for them.
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = self.onednn
        try:
            return self.step(token, position)
        finally:
            torch.backends.mkldnn.enabled = onednn

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = F.embedding(token, model.embed.weight)
        if model.config.positions == "learned":
            x = x + F.embedding(position[:, 0], model.pos_embed.weight)
        rotation = None
        if model.rotary is not None:
            rotation = F.embedding(position, self.cos), F.embedding(position, self.sin)
        mask = self.mask.narrow(-1, 0, self.cache[0].length + 1) if self.mask is not None else None
        for (parallel, products), cache in zip(self.blocks, self.cache):
            if parallel:
                qkv, mlp_in = products["in"](self.normalise(x)).split([self.qkv_size, self.mlp_in_size], dim=-1)
                joined = torch.cat([self.attention(qkv, rotation, mask, cache), self.activation(mlp_in)], dim=-1)
                x = x + products["out"](joined)
            else:
                x = x + products["proj"](self.attention(products["in"](self.normalise(x)), rotation, mask, cache))
                x = x + products["down"](self.activation(products["mlp_in"](self.normalise(x))))
        if self.norm == "layernorm":
            return model.norm(x)
        return model.norm.weight * self.normalise(x)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] after left-padded prompts input_ids [B, P].

    A row that has emitted eos_token_id emits pad_token_id from then on; decoding stops when every row has.
    """
    B, P = input_ids.shape
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise RafaleError(
            f"sampling: need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    if model.config.positions == "learned" and P + max_new_tokens > model.config.max_position_embeddings:
        raise RafaleError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({model.config.max_position_embeddings})"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # The mask of every position the generation can reach, sliced per step instead of grown; none at all when no
    # prompt is padded, which spares each step the model's check for padding (a host sync).
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens, dtype=torch.long)], 1)
    padded = not bool(attention_mask.all())
    positions = (full_mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1:] + 1
    cache = model.new_kv_cache(B, P + max_new_tokens) if use_cache else None
    was_training = model.training
    model.eval()

    # Every product on as many cores as the matmuls use (Product); a GPU runs one product on all of its own.
    parts = torch.get_num_threads() if input_ids.device.type == "cpu" else 1
    head = Product(model.lm_head.weight, None, parts)

    def last_logits(ids, length, positions=None, kv_cache=None):
        mask = full_mask[:, :length] if padded else None
        return head(model.hidden_states(ids, mask, positions, kv_cache)[:, -1])

    one_token = None
    if use_cache and all(type(module) in PLAIN_MODULES for module in model.modules()):
        one_token = OneTokenStep(model, cache, full_mask if padded else None, parts)
    tokens = input_ids
    logits = last_logits(input_ids, P, positions, cache)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = pick_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, pad_token_id)
            done |= token == eos_token_id
        new_tokens.append(token)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        length = P + step + 1
        if one_token is not None:
            logits = head(one_token(token, next_position))
            next_position += 1
        elif use_cache:
            logits = last_logits(token[:, None], length, next_position, cache)
            next_position += 1
        else:
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            logits = last_logits(tokens, length)
    model.train(was_training)
    return torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(B, 0)


def find_eos(tokenizer) -> int | None:
    """The id of the first of EOS_CANDIDATES (GPT-NeoX, Llama 2, Gemma, Llama 3) that the tokenizer knows, or None."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def generate_text(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    add_special_tokens: bool = True,
) -> list[dict]:
    """Continue each prompt (one batch, left-padded) and decode: [{"prompt", "text", "token_ids"}, ...].

    text and token_ids are the new tokens only, up to (not including) the end-of-text token. `add_special_tokens`
    False encodes the prompts as training encoded the text (without the tokenizer's post-processor, a BOS say).
    """
    eos = eos_token_id if eos_token_id is not None else find_eos(tokenizer)
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    rows = [encoding.ids for encoding in tokenizer.encode_batch(prompts, add_special_tokens=add_special_tokens)]
    for i, row in enumerate(rows):
        if not row:
            # An empty prompt starts a new document, which is what the end-of-text token marks in training.
            if eos is None:
                raise RafaleError(f"prompt {i + 1} is empty and the tokenizer has no end-of-text token to start from")
            row.append(eos)
    device = model.lm_head.weight.device
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = generate(
        model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos, pad, True, generator
    )
    results = []
    for prompt, ids in zip(prompts, out.tolist()):
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        results.append({"prompt": prompt, "text": tokenizer.decode(ids), "token_ids": ids})
    return results


@torch.inference_mode()
def fill_mask(model, tokenizer, prompts: list[str], mask_token_id: int, top_k: int = 5) -> list[dict]:
    """A masked LM's best guesses for the first mask token of each prompt (one is appended where there is none):
    [{"prompt", "guesses": [(token, probability), ...]}, ...]."""
    mask_token = tokenizer.id_to_token(mask_token_id)
    results = []
    for prompt in prompts:
        text = prompt if mask_token in prompt else f"{prompt} {mask_token}"
        ids = torch.tensor([tokenizer.encode(text).ids], device=next(model.parameters()).device)
        at = (ids[0] == mask_token_id).nonzero()[0, 0]
        probabilities = model(ids)[0, at].float().softmax(-1)
        best = probabilities.topk(top_k)
        guesses = [(tokenizer.id_to_token(int(i)), float(p)) for p, i in zip(best.values, best.indices)]
        results.append({"prompt": text, "guesses": guesses})
    return results


def model_folder(path: str | Path) -> Path:
    """The Hugging Face folder that `path` names: itself, or a run folder's `model/`."""
    path = Path(path)
    return path / "model" if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file() else path


def chat_settings(folder: str | Path):
    """The folder's chat template and special tokens (tokenizer_config.json's, as a fine-tuned export carries them)
    as chat FormatSettings, or None when it has no template."""
    import json

    from rafale.data.formats import FormatSettings

    config_file = model_folder(folder) / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = settings.get("chat_template")
    if not isinstance(template, str):
        return None
    return FormatSettings(format="chat", chat_template=template, eos_token=settings.get("eos_token") or "",
                         bos_token=settings.get("bos_token") or "")


def chat_prompts(folder: str | Path, messages: list[str]) -> list[str]:
    """Each message as a user turn rendered by the folder's chat template, with the generation prompt: what the
    model saw before its answers in training."""
    from rafale.data.formats import render_chat

    settings = chat_settings(folder)
    if settings is None:
        raise RafaleError(f"{model_folder(folder) / 'tokenizer_config.json'}: no chat_template (a model fine-tuned by "
                          f"rafale's sft task carries one); leave out --chat to continue the prompts as plain text")
    return [render_chat([{"role": "user", "content": message}], settings.chat_template, True, settings.eos_token,
                        settings.bos_token) for message in messages]


def load_folder(path: str | Path, dtype: str | None = None, scores: bool = False):
    """(folder, model, tokenizer) of a Hugging Face folder with tokenizer.json, or of a run folder's `model/`: the
    model in eval mode with any transform rules exported beside it applied again, on the GPU when there is one,
    its weights in `dtype` (a DTYPES name) when given. A language model, or with `scores` a reward model (a score
    head in place of the LM head)."""
    from tokenizers import Tokenizer

    if dtype is not None and dtype not in DTYPES:
        raise RafaleError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = model_folder(path)
    if not (folder / TOKENIZER_FILE).is_file():
        raise RafaleError(f"{folder}: no {TOKENIZER_FILE} beside the model (export with a tokenizer to use it on text)")
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise RafaleError(f"{folder / TOKENIZER_FILE}: not a valid tokenizer file ({e})") from None
    model = load_pretrained(folder)
    if bool(getattr(model.config, "num_scores", 0)) != scores:
        raise RafaleError(f"{folder}: a reward model (a score head, no LM head): it scores text (rafale label) and "
                          f"does not generate" if not scores else
                          f"{folder}: not a reward model (its config.json names no *ForSequenceClassification "
                          f"architecture); train one with data.pipeline: reward")
    # A model exported from transform-aware training computes as it trained: its rules are applied again.
    from rafale import transforms

    transforms.apply_saved(model, folder)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        # Token ids past the embedding table would fail deep inside the forward pass.
        raise RafaleError(f"{folder / TOKENIZER_FILE}: has {tokenizer.get_vocab_size()} tokens but the model's "
                          f"vocabulary is {model.config.vocab_size}; this tokenizer does not belong to this model")
    if torch.cuda.is_available():
        model = model.cuda()
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    return folder, model, tokenizer


def generate_from_folder(path: str | Path, prompts: list[str], chat: bool = False, dtype: str | None = None,
                         **options) -> list[dict]:
    """generate_text with the model and tokenizer.json of a Hugging Face folder, or of a run folder's `model/`;
    `chat` renders each prompt as a user turn with the folder's chat template first (`chat_prompts`); `dtype`
    (float32, bfloat16, float16) is the weights' and the KV cache's precision while decoding."""
    folder, model, tokenizer = load_folder(path, dtype)
    if chat:
        # Encoded as training encoded the rendered text: the template writes any special tokens itself.
        results = generate_text(model, tokenizer, chat_prompts(folder, prompts), add_special_tokens=False, **options)
        return [{**result, "prompt": prompt} for prompt, result in zip(prompts, results)]
    return generate_text(model, tokenizer, prompts, **options)
