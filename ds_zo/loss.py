"""The model's own causal-LM loss, kept as (mean, token count) so that per-half, per-micro-batch and per-rank losses
combine into the exact token mean over a global batch.

The mean is HF's own `model.loss_function` (mean cross-entropy over shifted labels != -100), so that a single
micro-batch gives bitwise the loss `model(**batch, labels=labels).loss` gives: with ε = 1e-3 one ulp of loss moves the
projected gradient by ~1e-4 relative, so "almost the same loss formula" is not good enough for exactness tests.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def default_labels(batch: dict) -> torch.Tensor:
    """labels if given, else input_ids with padding (attention_mask == 0) ignored, as HF's LM collators do."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _fallback_causal_lm_loss(logits, labels, vocab_size, **_):
    shift_logits = logits[:, :-1, :].float().reshape(-1, vocab_size)
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(shift_logits.device), ignore_index=IGNORE_INDEX)


def token_mean_loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean token loss as the model computes it, number of target tokens)."""
    loss_fn = getattr(model, "loss_function", None) or _fallback_causal_lm_loss
    labels = labels.to(logits.device)
    mean = loss_fn(logits=logits, labels=labels, vocab_size=logits.shape[-1])
    return mean, int((labels[:, 1:] != IGNORE_INDEX).sum())


def combine(parts: Sequence[tuple[float, int]]) -> float:
    """Token-weighted mean of (mean, count) parts; a single part is returned as is (bitwise)."""
    if len(parts) == 1:
        return parts[0][0]
    total = sum(c for _, c in parts)
    if total == 0:
        raise ValueError("no target tokens in the batch (every label is -100)")
    return sum(m * c for m, c in parts) / total
