"""The fused LM head + cross-entropy (rafale/models/loss.py) against the plain path it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rafale.models import build_model
from rafale.models import loss as fused
from rafale.tasks import new_task
from rafale.tasks.causal_lm import next_token_labels
from rafale.tasks.model import TaskModel


def plain_and_fused(hidden, weight, labels, bias=None):
    """(loss, grad of hidden, grad of weight[, grad of bias]) by the plain path and by the fused one."""
    results = []
    for compute in (
        lambda h, w, b: F.cross_entropy(F.linear(h, w, b).flatten(0, -2), labels.flatten(), ignore_index=-100),
        lambda h, w, b: fused.linear_cross_entropy(h, w, labels, b),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if bias is not None else None
        loss = compute(h, w, b)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad) + ((b.grad,) if b is not None else ()))
    return results


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_loss_and_gradients_match_the_plain_path(monkeypatch, chunk_rows):
    vocab = 97
    # 1 and 3 rows per chunk leave a ragged last chunk; 64 covers all 14 rows at once.
    monkeypatch.setattr(fused, "DEFAULT_CHUNK_BYTES", chunk_rows * 4 * vocab)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=generator)
    weight = torch.randn(vocab, 16, generator=generator)
    labels = torch.randint(0, vocab, (2, 7), generator=generator)
    labels[0, -1] = labels[1, 2] = -100
    (loss, grad_h, grad_w), (fused_loss, fused_grad_h, fused_grad_w) = plain_and_fused(hidden, weight, labels)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad_h, grad_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused_grad_w, grad_w, rtol=1e-5, atol=1e-7)
    # Ignored positions get no gradient at all, as in the plain path.
    assert fused_grad_h[1, 2].abs().max() == 0


def test_bias_is_added_and_gets_its_gradient():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 8, generator=generator)
    weight = torch.randn(31, 8, generator=generator)
    bias = torch.randn(31, generator=generator)
    labels = torch.randint(0, 31, (9,), generator=generator)
    labels[4] = -100
    plain, fused_results = plain_and_fused(hidden, weight, labels, bias)
    for ours, reference in zip(fused_results, plain):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


def test_extreme_logits_stay_finite():
    # Logits a thousand apart: a softmax taken without the log-sum-exp shift would overflow.
    hidden = torch.tensor([[1000.0, 0.0], [0.0, -1000.0]])
    weight = torch.eye(2)
    labels = torch.tensor([1, 1])
    (loss, grad_h, grad_w), (fused_loss, fused_grad_h, fused_grad_w) = plain_and_fused(hidden, weight, labels)
    assert torch.isfinite(fused_loss) and torch.isfinite(fused_grad_h).all() and torch.isfinite(fused_grad_w).all()
    torch.testing.assert_close(fused_loss, loss)
    torch.testing.assert_close(fused_grad_h, grad_h)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_autocast_runs_the_head_in_bf16_and_matches_autocast_linear(monkeypatch, device):
    # Chunks of 5 rows on either device, so that the loop and its ragged end run too.
    monkeypatch.setattr(fused, "DEFAULT_CHUNK_BYTES", 5 * 4 * 50)
    monkeypatch.setitem(fused.CHUNK_BYTES, "cuda", 5 * 4 * 50)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, 16, generator=generator).to(device)
    weight = (torch.randn(50, 16, generator=generator) * 0.1).to(device)
    labels = torch.randint(0, 50, (32,), generator=generator).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        (loss, grad_h, grad_w), (fused_loss, fused_grad_h, fused_grad_w) = plain_and_fused(hidden, weight, labels)
    assert fused_loss.dtype == torch.float32
    assert fused_grad_h.dtype == fused_grad_w.dtype == torch.float32
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused_grad_h, grad_h, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(fused_grad_w, grad_w, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_composer_lm_training_loss_is_the_shifted_cross_entropy(tied):
    torch.manual_seed(0)
    model = build_model("pythia-tiny", {"tie_embeddings": tied})
    batch = {
        "input_ids": torch.randint(0, 128, (2, 12)),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    batch["labels"] = batch["input_ids"].masked_fill(torch.arange(12) >= 10, -100)
    task = TaskModel(new_task("causal_lm"), model)

    logits = task.eval_forward(batch)
    assert logits.shape == (2, 12, 128)
    reference = F.cross_entropy(logits.flatten(0, 1), next_token_labels(batch["labels"]).flatten())
    reference.backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss = task.loss(task(batch), batch)
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_composer_mlm_runs_the_head_on_masked_positions_only_with_the_same_loss():
    torch.manual_seed(0)
    model = build_model("bert-tiny", {"vocab_size": 200, "dropout": 0.0})
    input_ids = torch.randint(5, 200, (2, 10))
    labels = torch.full_like(input_ids, -100)
    labels[0, 3], labels[1, 7], labels[1, 8] = 11, 42, 199
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    task = TaskModel(new_task("mlm"), model)

    logits = task.eval_forward(batch)
    assert logits.shape == (2, 10, 200)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    reference.backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    seen_rows = []
    hook = model.mlm.dense.register_forward_hook(lambda module, inputs, output: seen_rows.append(len(inputs[0])))
    loss = task.loss(task(batch), batch)
    hook.remove()
    assert seen_rows == [3]
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    assert reference_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)

    # MFU counts the head where it ran: 3 positions of 20.
    all_positions = model.flops_per_token(10) * 20
    assert task.flops_per_batch(batch) == all_positions - 17 * model.mlm_head_flops_per_token()


def test_every_reduction_comes_from_the_one_fused_step_with_the_plain_paths_gradients():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 8, generator=generator)
    weight = torch.randn(41, 8, generator=generator)
    labels = torch.randint(0, 41, (3, 5), generator=generator)
    labels[0, :2] = labels[2, 4] = -100  # a prompt, and padding
    for reduction in ("sum", "none"):
        results = []
        for fused_path in (False, True):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            if fused_path:
                loss = fused.linear_cross_entropy(h, w, labels, reduction=reduction)
            else:
                loss = F.cross_entropy(F.linear(h, w).transpose(1, 2), labels, ignore_index=-100, reduction=reduction)
            # Weigh each token differently, so that a per-token gradient that went to the wrong row would show.
            (loss * torch.arange(1.0, 16.0).view(3, 5)).sum().backward() if reduction == "none" else loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        for ours, reference in zip(results[1], results[0]):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_sequence_log_probs_sum_each_rows_labelled_positions():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, 8, generator=generator)
    weight = torch.randn(23, 8, generator=generator)
    labels = torch.randint(0, 23, (2, 6), generator=generator)
    labels[0, :3] = labels[1, 5] = -100
    token_losses = fused.linear_cross_entropy(hidden, weight, labels, reduction="none")
    log_probs, counts = fused.sequence_log_probs(token_losses, labels)
    plain = F.linear(hidden, weight).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(labels != -100, plain, 0.0).sum(-1)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [3, 5] and log_probs.dtype == torch.float32


def test_a_mean_over_no_labels_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    loss = fused.linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0
