"""The causal-LM loss: mean token cross-entropy over shifted labels != -100 (HF's definition), accumulated in float64.

Each part (micro-batch, rank, sign) returns (sum of its token losses in float64, token count); parts combine in
float64. Per-token losses are the float32 values HF computes from float32 logits, so the float64 sums are exact to
~1e-16 whatever the order: the loss does not depend on how the global batch is cut into micro-batches and ranks.
HF's own `.loss` reduces in float32 and is typically off by an ulp (~1e-7 of L); 1/2ε magnifies that into ~1e-4 of
relative error in the projected gradient g = (L+ − L−)/2ε, which is why ds_zo does not use it.
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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of the part's token cross-entropies in float64, number of target tokens); position i predicts labels[i+1]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    per_token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return float(per_token.double().sum()), int((shift_labels != IGNORE_INDEX).sum())


def mean_loss(parts: Sequence[tuple[float, int]]) -> float:
    """The token mean over all parts (float64)."""
    total = sum(c for _, c in parts)
    if total == 0:
        raise ValueError("no target tokens in the batch (every label is -100)")
    return sum(s for s, _ in parts) / total


class LabelWordLoss:
    """Prompt-classification loss (MeZO's): cross-entropy over the candidate label words only, at the position before
    each row's label word. Unlike the full-vocabulary token loss it is discriminative: it moves the gold word up
    relative to the other label words, not all label words up relative to the rest of the vocabulary."""

    def __init__(self, candidate_ids):
        self.candidate_ids = list(candidate_ids)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        from .data.tasks import candidate_scores
        scores, gold = candidate_scores(logits, labels.to(logits.device), self.candidate_ids)
        per_row = F.cross_entropy(scores.float(), gold, reduction="none")
        return float(per_row.double().sum()), int(gold.numel())
