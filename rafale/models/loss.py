"""The LM head and its cross-entropy as one autograd step, so the [tokens, vocab] logits exist once.

The plain path, `F.cross_entropy(F.linear(hidden, weight), labels)`, allocates the logits, their log-softmax, a
zero-filled gradient and the gradient proper: four [tokens, vocab] tensors, 400 MB each for 2,048 tokens at a 50k
vocabulary, where the head is most of a small model's step. Here the forward turns the logits, a few rows at a
time while they sit in cache, into softmax minus one-hot: the gradient up to a per-row factor (the incoming
gradient over the number of counted tokens, zero for ignored ones), which the backward applies to the narrow
[tokens, hidden] side of its two matmuls. Same loss and gradients as the plain path to float rounding
(test/test_loss.py); bench/RESULTS.md has the timings.
"""

from __future__ import annotations

import torch

# The label of a position that predicts nothing (PyTorch's and transformers' default).
IGNORE_INDEX = -100

# Rows per chunk of the softmax pass, as bytes of fp32 logits: small enough to stay in a CPU core's cache, large
# enough on a GPU that the loop costs a few kernel launches.
CHUNK_BYTES = {"cuda": 256 << 20}
DEFAULT_CHUNK_BYTES = 4 << 20


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the fused head: losses [N] (zero where the label is ignored).

    The reductions (mean, sum, per-sequence sums) are plain tensor ops on these losses, so every reduction shares
    this one fused step; its backward receives one gradient per row, which scales that row's softmax minus one-hot.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        device = hidden.device.type
        # Under autocast the head runs in the autocast dtype, as nn.Linear would; the softmax always in fp32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            inputs, weight_t = hidden.to(dtype), weight.to(dtype).t()
            # addmm, as F.linear, so that the bias is added with the same rounding.
            logits = inputs @ weight_t if bias is None else torch.addmm(bias.to(dtype), inputs, weight_t)
            valid = labels != ignore_index
            targets = torch.where(valid, labels, 0)[:, None]
            losses = torch.empty(len(labels), device=hidden.device)
            minus_one = logits.new_full((1, 1), -1.0, dtype=torch.float32)
            rows = max(1, CHUNK_BYTES.get(device, DEFAULT_CHUNK_BYTES) // (4 * logits.shape[1]))
            for start in range(0, len(labels), rows):
                end = start + rows
                chunk, target = logits[start:end], targets[start:end]
                scores = chunk.float()  # the chunk itself in fp32: the steps below then work in place
                log_total = torch.logsumexp(scores, dim=-1)
                losses[start:end] = log_total - scores.gather(-1, target)[:, 0]
                scores.sub_(log_total[:, None]).exp_().scatter_add_(-1, target, minus_one.expand(len(target), 1))
                chunk.copy_(scores)
        ctx.save_for_backward(hidden, weight, bias, logits, valid)
        return torch.where(valid, losses, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, grad_logits, valid = ctx.saved_tensors
        factor = (grad_losses * valid)[:, None]
        dtype = grad_logits.dtype
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits @ weight.to(dtype)).float() * factor).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ (hidden.float() * factor).to(dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = (factor.to(dtype).t() @ grad_logits)[0].to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of `F.linear(hidden [..., H], weight [V, H], bias [V])` against `labels [...]`, as
    `F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=..., reduction=...)`.

    "mean": over the labels that are not ignore_index (0 when there are none, rather than NaN, so that a
    microbatch without labels adds nothing); "sum": their sum; "none": one loss per label, shaped like `labels`,
    0 where ignored (`sequence_log_probs` sums them per row)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    flat_labels = labels.flatten()
    losses = LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, bias, flat_labels, ignore_index)
    if reduction == "none":
        return losses.view(labels.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (flat_labels != ignore_index).sum().clamp(min=1)


def sequence_log_probs(token_losses: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's labelled positions [B] in fp32, their count [B]) from the per-token losses
    [B, T] that `linear_cross_entropy(..., reduction="none")` returns."""
    return -token_losses.float().sum(-1), (labels != ignore_index).sum(-1)


def document_log_probs(token_losses: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document of packed rows: (sums of log p over its labelled positions [B, documents] in fp32, their counts),
    document d of row b at [b, d - 1]; `document_ids` [B, T] numbers each position's document (0 = padding)."""
    documents = int(document_ids.max())
    labelled = labels != ignore_index
    sums = torch.zeros(len(labels), documents + 1, device=labels.device)
    sums.scatter_add_(1, document_ids, -torch.where(labelled, token_losses.float(), 0.0))
    counts = torch.zeros(len(labels), documents + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, document_ids, labelled.long())
    return sums[:, 1:], counts[:, 1:]
