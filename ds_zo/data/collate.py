"""Padding variable-length examples into a batch of input_ids / attention_mask / labels tensors.

Right padding is the default: real tokens keep positions 0..n-1, so a padded row gives the logits it would alone,
whatever the model. Left padding (real tokens at the end of every row) suits generation; rotary models (Llama, Qwen,
Mistral) and OPT are unaffected by it up to rounding, but GPT-2 numbers positions without looking at the attention
mask and gives different logits. Padded positions always get label -100 (no loss).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .tasks import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (padding is masked out, so any id works), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(examples: Sequence[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stacks examples {"input_ids", "labels"?} (lists of ints) into padded [rows, longest] int64 tensors.

    Examples without labels are labelled with their own tokens (plain language modelling).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        row_labels = example.get("labels", ids)
        if len(row_labels) != len(ids):
            raise ValueError(f"example {row}: {len(ids)} input_ids but {len(row_labels)} labels")
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        labels[row, span] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, side: str = "right", by_length: bool = False):
    """Padded batches of `batch_size` examples (the last may be smaller), in order.

    by_length=True groups examples of similar length (a stable sort by length first), which cuts padding, and so
    compute, when the order does not matter (evaluation).
    """
    if by_length:
        examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id, side)
