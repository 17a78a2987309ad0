"""Padding variable-length examples into a batch of input_ids / attention_mask / labels tensors.

Right padding is the default: real tokens keep positions 0..n-1, so a padded row gives the logits it would alone,
whatever the model. Left padding (real tokens at the end of every row) puts every label word last, so the ZO step and
evaluation score one position per row. A model numbers positions 0..T-1 across the padded row unless told otherwise,
so a left-padded row's first real token sits at the position its batch-mates' lengths give it: GPT-2's absolute
position embeddings then give other logits for the same example, and rotary models (Llama, Qwen, Mistral) the same
ones only up to rounding. position_ids=True adds each token's position among its row's real tokens, as HF's
generate() does for left-padded prompts: the job and evaluation ask for it for every model that takes position_ids
(`takes_position_ids`). Padded positions always get label -100 (no loss).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .tasks import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (padding is masked out, so any id works), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def takes_position_ids(model) -> bool:
    """Whether the model's forward has a position_ids argument (HF causal LMs but a few, such as BLOOM's ALiBi)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens, 0 for the first; pads get 1, as generate() gives them
    (masked out, they are never attended to or scored)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill_(attention_mask == 0, 1)


def collate(examples: Sequence[dict], pad_id: int, side: str = "right",
            position_ids: bool = False) -> dict[str, torch.Tensor]:
    """Stacks examples {"input_ids", "labels"?} (lists of ints) into padded [rows, longest] int64 tensors, and with
    position_ids=True each token's position among its row's real tokens (positions_from_mask).

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
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if position_ids:
        out["position_ids"] = positions_from_mask(attention_mask)
    return out


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, side: str = "right", by_length: bool = False,
            position_ids: bool = False):
    """Padded batches of `batch_size` examples (the last may be smaller), in order.

    by_length=True groups examples of similar length (a stable sort by length first), which cuts padding, and so
    compute, when the order does not matter (evaluation).
    """
    if by_length:
        examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id, side, position_ids)
