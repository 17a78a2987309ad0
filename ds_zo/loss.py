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


LOSS_BLOCK_ELEMENTS = 1 << 20   # logits per cross-entropy call: bounds the float32 log-softmax scratch (4 MB)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of the part's token cross-entropies in float64, number of target tokens); position i predicts labels[i+1].

    The cross-entropies are taken a block of positions at a time from a view of the logits, so the scratch is one
    block instead of a shifted copy and a log-softmax of the whole logits (each position's value is computed alone,
    so blocking does not change it)."""
    rows, length, vocab = logits.shape[0], logits.shape[1], logits.shape[-1]
    targets = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = logits.reshape(-1, vocab)
    per_token = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, LOSS_BLOCK_ELEMENTS // vocab)
    for a in range(0, flat.shape[0], step):
        per_token[a:a + step] = F.cross_entropy(flat[a:a + step].float(), targets[a:a + step],
                                                ignore_index=IGNORE_INDEX, reduction="none")
    # the last position of each row predicts nothing: summing positions [0, T-1) in row order keeps the float64 sum's
    # terms and order those of the unblocked form
    shifted = per_token.view(rows, length)[:, :-1]
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return float(shifted.reshape(-1).double().sum()), count


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
