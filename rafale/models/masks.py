"""Attention masks and positions, made in one place for every decoder: plain causal, padding, packed documents and
the KV cache.

`attention_layout` turns what a batch says about itself (an attention mask of real tokens, document ids of packed
rows, how many positions the cache already holds) into what the attention and the rotary or learned positions
need: a boolean mask [B or 1, 1, T, past + T] (True = attend) or none with SDPA's `is_causal`, and position ids.
"""

from __future__ import annotations

import torch


def causal_padding_mask(padding: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor:
    """The boolean mask [B or 1, 1, T, past+T] for T new queries after `past` cached positions.

    A query sees keys at or before its own slot that are real tokens. Every query also sees itself, so that a
    padding query (left padding) never has an empty row: an empty row gives NaN, and NaN in a padded
    position's values would leak through the zero attention weights of later layers (0 * NaN = NaN).
    """
    query = torch.arange(past, past + T, device=device)[:, None]
    key = torch.arange(past + T, device=device)[None, :]
    allowed = key <= query
    if padding is not None:
        allowed = (allowed & padding[:, None, None, :].bool()) | (key == query)
    return allowed if allowed.dim() == 4 else allowed[None, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids [B, T] -> positions [B, T] that restart at 0 where each document starts."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: causal, and block-diagonal by document (padding, id 0, sees only itself)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    real = document_ids[:, None, :] != 0
    itself = torch.eye(T, dtype=torch.bool, device=document_ids.device)
    return ((causal & same & real) | itself)[:, None]


def attention_layout(attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                     position_ids: torch.Tensor | None, past: int, B: int, T: int,
                     device) -> tuple[torch.Tensor | None, bool, torch.Tensor]:
    """(mask, is_causal, position_ids) for T new tokens of B rows after `past` cached positions.

    attention_mask [B, past+T]: 1 = real token, 0 = padding, covering cached positions too. document_ids [B, T]
    (packed rows, no cache): attention and positions stay inside each document. Without position_ids, positions
    count real tokens only (as transformers' generate does), so a left-padded row gives the same logits as the row
    alone, and restart at each document of a packed row.
    """
    if document_ids is not None:
        if past:
            raise ValueError("packed rows (document_ids) are for training and scoring, not for the KV cache")
        positions = document_positions(document_ids) if position_ids is None else position_ids
        return document_mask(document_ids), False, positions
    # One check per forward: with no padding, SDPA's is_causal path is faster than an explicit mask.
    padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
    if position_ids is None:
        if padding is None:
            position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        else:
            position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    if padding is None and past == 0:
        return None, True, position_ids
    if padding is None and T == 1:
        # One new token after the cache: it sees every cached position, no mask needed.
        return None, False, position_ids
    return causal_padding_mask(padding, past, T, device), False, position_ids
