"""Embedding and output-layer units computed from row blocks of their working copies, never from whole copies.

A vocabulary-sized weight (49152 × 576 in SmolLM2, tied between the input embedding and the output layer) is the
largest unit of a small model; whole copies θ+εz and θ−εz of it would be most of the ZO step's working memory. These
two module types only ever need rows of the weight:
- `nn.Embedding` looks up the rows of the token ids: the working copies are formed block by block and only the rows
  the batch uses are kept (on CPU, where the sampler can skip parts of a chunk, only those rows are formed, from
  their own z);
- `nn.Linear` (no bias) computes output features block by block: logits[..., r0:r1] = x · W[r0:r1]ᵀ. The engine's
  output layer hands each block straight to the loss (loss.StreamedTokenLoss: no logits held at all); otherwise the
  blocks are written into one output tensor for all slots (kept from step to step, see PerturbedCopies.output).
The working rows are the values whole copies hold, bit for bit (same element-wise expressions), and so is the
embedding's output. The output layer's logits are the whole matmul's up to float32 rounding: a block of output
features (starting at a multiple of 64 rows) rounded like the whole matmul in the exactness tests and in 400 random
shapes, but MKL's sgemm also depends on operand alignment and layout (with the real SmolLM2 job's non-contiguous
hidden states the last bit of some logits differs; g by ~2e-6 relative). On GPUs cuBLAS picks other kernels for a
block than for the whole weight (fp32 logits up to 6e-6 apart, measured on an H200): the same loss to float32
rounding. These units stream on every device unless zero_order.row_blocks is "off" (whole copies): on an H200 row
blocks took SmolLM2's GPU peak from 1.36× to 1.03× inference's and OPT-1.3B's offloaded one from 1.85 to 0.93 GB,
for 5 % of a host-bound step (docs/performance.md, tenth pass). A row block spans about one drawing span (one z
chunk per drawing thread on CPU, a span of chunks on accelerators), and each chunk is drawn once per perturbation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .units import Unit


class RowSource(Protocol):
    slots: Sequence

    def enter(self, unit: Unit) -> None:
        ...

    def release(self, unit: Unit) -> None:
        ...

    def working_rows(self, ref, r0: int, r1: int) -> list[torch.Tensor]:
        """Per slot, rows [r0, r1) of that slot's working copy of ref's parameter."""

    def block_rows(self, ref) -> int:
        """Rows per block for this parameter."""

    def id_rows(self, ref, needed: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Per slot, the rows `needed` of that slot's working copy formed directly, or None (use row blocks)."""

    def drop_whole_copies(self) -> None:
        ...

    def output(self, unit: Unit, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor the unit's output is written into."""

    def loss_sink(self, unit: Unit):
        """A loss.StreamedTokenLoss that takes the unit's output block by block instead of an output tensor, or
        None."""


ROW_BLOCKS = ("auto", "on", "off")


def streamed_kind(unit: Unit, row_blocks: str = "auto") -> Optional[str]:
    """'embedding' or 'linear' when the unit is a plain module of that type whose only trainable parameter is its
    weight (all of it, or a row subset) and `row_blocks` (zero_order.row_blocks) is not "off"; None otherwise (the
    unit then computes from whole working copies)."""
    if row_blocks not in ROW_BLOCKS:
        raise ValueError(f"row_blocks {row_blocks!r}; allowed: {ROW_BLOCKS}")
    refs = unit.trainable
    if len(refs) != 1 or row_blocks == "off":
        return None
    mod, p = unit.module, refs[0].param
    if type(mod) is nn.Embedding and mod.weight is p and mod.max_norm is None:
        return "embedding"
    if type(mod) is nn.Linear and mod.weight is p and mod.bias is None:
        return "linear"
    return None


def _only_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0]
    if not args and set(kwargs) == {"input"} and isinstance(kwargs["input"], torch.Tensor):
        return kwargs["input"]
    return None


def _blocks(n: int, size: int):
    for r0 in range(0, n, size):
        yield r0, min(n, r0 + size)


def embedding_forward(unit: Unit, source: RowSource, ids: torch.Tensor, slots: int, rows: int,
                      split: Callable, merge: Callable) -> torch.Tensor:
    """Each slot's lookup of its ids in its working copy, from the rows the batch uses only."""
    ref = unit.trainable[0]
    weight = ref.param
    parts = [split(ids, s, rows, slots) for s in range(slots)]
    needed = torch.unique(torch.cat([p.reshape(-1) for p in parts]))   # sorted
    vocab = weight.shape[0]
    blocks = list(_blocks(vocab, source.block_rows(ref)))
    # needed[bounds[b]:bounds[b+1]] are the ids in block b; ids below 0 come before bounds[0], ids from the vocabulary
    # size on after bounds[-1]: one host synchronisation for both (on a GPU, besides unique's own)
    bounds = torch.searchsorted(needed, torch.tensor([r0 for r0, _ in blocks] + [vocab],
                                                     device=needed.device)).tolist()
    if needed.numel() and (bounds[0] > 0 or bounds[-1] < needed.numel()):
        raise IndexError(f"{unit.name}: token id out of range [0, {vocab}): {int(needed[0])}..{int(needed[-1])}")
    direct = source.id_rows(ref, needed)
    if direct is not None:         # only the used rows were formed
        return merge([F.embedding(torch.searchsorted(needed, part), direct[s]) for s, part in enumerate(parts)], rows)
    gathered = [weight.new_empty(needed.numel(), *weight.shape[1:]) for _ in range(slots)]
    for b, (r0, r1) in enumerate(blocks):
        a, e = bounds[b], bounds[b + 1]
        if a == e:          # no id of the batch in this block: its z chunks are not even drawn
            continue
        local = needed[a:e] - r0
        for s, block in enumerate(source.working_rows(ref, r0, r1)):
            gathered[s][a:e] = block[local]
    outs = []
    for s, part in enumerate(parts):
        # ids -> positions in `needed`; an embedding of those positions copies the same rows the full lookup would
        outs.append(F.embedding(torch.searchsorted(needed, part), gathered[s]))
    return merge(outs, rows)


def linear_forward(unit: Unit, source: RowSource, x: torch.Tensor, slots: int, rows: int) -> torch.Tensor:
    """x · W_sᵀ for each slot's rows of x, computed one block of output features at a time into one output."""
    ref = unit.trainable[0]
    weight = ref.param
    shape = x.shape[:-1] + (weight.shape[0],)
    sink = source.loss_sink(unit)
    if sink is not None and sink.placeholder.shape == shape:
        # the loss takes each block as it is computed: no slot's logits are held whole
        for r0, r1 in _blocks(weight.shape[0], source.block_rows(ref)):
            for s, block in enumerate(source.working_rows(ref, r0, r1)):
                sink.add_matmul(s, r0, x[s * rows:(s + 1) * rows], block)
        return sink.placeholder
    out = source.output(unit, shape, x.dtype, x.device)
    for r0, r1 in _blocks(weight.shape[0], source.block_rows(ref)):
        for s, block in enumerate(source.working_rows(ref, r0, r1)):
            out[s * rows:(s + 1) * rows, ..., r0:r1] = F.linear(x[s * rows:(s + 1) * rows], block)
    return out


def streamed_forward(unit: Unit, kind: str, source: RowSource, args: tuple, kwargs: dict, slots: int, rows: int,
                     split: Callable, merge: Callable) -> Any:
    """The unit's forward from row blocks, or None when the call is not the plain single-tensor form (the caller
    then falls back to whole working copies)."""
    x = _only_input(args, kwargs)
    if x is None:
        return None
    if kind == "linear" and (x.dim() < 2 or x.shape[0] != slots * rows):
        return None
    source.enter(unit)
    try:
        source.drop_whole_copies()
        if kind == "embedding":
            return embedding_forward(unit, source, x, slots, rows, split, merge)
        return linear_forward(unit, source, x, slots, rows)
    finally:
        source.release(unit)
