"""Run the model's own forward once over a replicated batch [x; x; ...] so that each unit computes each block of rows
("slot") with its own working copy of the parameters: θ+εz on the first block and θ−εz on the second (for each of q
perturbations), one sign over an unreplicated batch under perturbation parallelism, or θ itself (streaming eval).

Nothing of HF's forward code is copied: HF's top-level forward builds masks and rotary tables for the doubled batch;
each unit's forward is temporarily replaced on the instance (undone on exit) by a wrapper that splits batch-leading
tensors, runs the original forward once per sign with the unit's parameters pointed at perturbed working copies, and
concatenates the halves. The master tensors are only pointed away from, never written. Plain embedding and
output-layer units instead compute from row blocks of their working copies (streamed.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol, Sequence

import torch

from .streamed import streamed_forward, streamed_kind
from .units import Unit


class SlotParams(Protocol):
    def acquire(self, unit: Unit) -> list[list[torch.Tensor]]:
        """Per slot, the tensors unit.trainable point at while the unit computes that slot."""

    def release(self, unit: Unit) -> None:
        ...

    def repoints(self, unit: Unit) -> bool:
        """Whether `release` points the unit's parameters at their store (offloaded units): the forward then leaves
        them at its last copies instead of pointing them back at the masters first."""


# keyword arguments whose first dim is the batch times a per-row count, batch-major: BLOOM's ALiBi bias is
# (batch * heads, 1, T)
BATCH_MAJOR_KWARGS = ("alibi",)
# keyword arguments that never carry the batch, by the class of the unit they are handed to, where the first dim can
# equal slots * rows: MPT's ALiBi bias is (heads, 1, max_seq_len), and with heads == slots * rows it was cut as rows
# (a crash, or with one row per slot each sign silently saw one head's slopes). The name alone cannot tell:
# CPM-Ant's `position_bias` is (batch, heads, T, T).
UNBATCHED_KWARGS = {"MptBlock": ("position_bias",)}


def split_block(obj: Any, block: int, rows: int, blocks: int) -> Any:
    """The block-th group of `rows` rows of every batch-leading tensor. A tensor is batch-leading only if it has >= 2
    dims and its first dim is blocks*rows: 1-D tensors (cache_position, even of that length), batch-1 tensors
    (position_ids (1,T), rotary cos/sin) and non-tensors go to every block unchanged. Keyword arguments named in
    BATCH_MAJOR_KWARGS are cut into `blocks` equal parts of their first dim."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == blocks * rows:
            return obj[block * rows:(block + 1) * rows]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_block(o, block, rows, blocks) for o in obj)
    if isinstance(obj, list):
        return [split_block(o, block, rows, blocks) for o in obj]
    if isinstance(obj, dict):
        return {k: _block_of(v, block, blocks) if k in BATCH_MAJOR_KWARGS and isinstance(v, torch.Tensor)
                and v.dim() >= 1 and v.shape[0] % (blocks * rows) == 0 else split_block(v, block, rows, blocks)
                for k, v in obj.items()}
    return obj


def _block_of(t: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    size = t.shape[0] // blocks
    return t[block * size:(block + 1) * size]


def has_matrix(obj: Any) -> bool:
    """Whether a unit's call is given any tensor of >= 2 dims (its rows, or batch-1 ones such as position_ids
    (1,T)). Without one its output has no batch dimension: positions from a shape or a 1-D range, as the learned
    position embeddings of BlenderbotSmall, Marian and Pegasus return (T, D)."""
    if isinstance(obj, torch.Tensor):
        return obj.dim() >= 2
    if isinstance(obj, (tuple, list)):
        return any(has_matrix(o) for o in obj)
    if isinstance(obj, dict):
        return any(has_matrix(o) for o in obj.values())
    return False


class UnmergeableOutputError(ValueError):
    """Per-slot outputs of a call given no matrix that ds_zo cannot line up with the batch."""


def merge_blocks(outs: Sequence[Any], rows: int, unbatched: bool = False) -> Any:
    """Concatenate per-slot outputs back into one batch. A half whose output has batch 1 while rows > 1
    (GPT-2's wpe on position_ids (1,T)) is expanded to `rows` first. `unbatched` outputs (of a call given no
    matrix: has_matrix) of >= 2 dims and a first dim other than 1 gain a batch dimension, each slot's expanded over
    its rows: (T, D) becomes (slots * rows, T, D), which the model's broadcasting against its hidden states
    (inputs_embeds + positions) reads row by row as it read (T, D); concatenated as they were, the slots made
    (2T, D) and the step crashed. Such outputs of fewer dims (a (D,) vector, a scalar) differ by slot with nothing
    to say how the caller lines them up with the rows: UnmergeableOutputError (a (D,) stacked to (slots * rows, D)
    would meet the positions, silently, wherever T == slots * rows)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if unbatched and first.dim() < 2:
            raise UnmergeableOutputError(f"a {tuple(first.shape)} output")
        if first.dim() == 0:
            return first
        if unbatched and first.shape[0] != 1:
            parts = [o.unsqueeze(0).expand(rows, *o.shape) for o in outs]
        else:
            parts = [o.expand(rows, *o.shape[1:]) if o.shape[0] == 1 and rows > 1 else o for o in outs]
        return torch.cat(parts, dim=0)
    if isinstance(first, tuple):
        merged = [merge_blocks([o[i] for o in outs], rows, unbatched) for i in range(len(first))]
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)
    if isinstance(first, list):
        return [merge_blocks([o[i] for o in outs], rows, unbatched) for i in range(len(first))]
    if isinstance(first, dict):
        merged = {k: merge_blocks([o[k] for o in outs], rows, unbatched) for k in first}
        try:
            return type(first)(**merged)
        except TypeError:
            return merged
    return first  # None, cache objects, python scalars: identical for both signs


@contextlib.contextmanager
def pointed_at(params: Sequence[torch.nn.Parameter], tensors: Sequence[torch.Tensor]):
    """Point each parameter at a working tensor for the duration (the way ZeRO-3 points params at gathered buffers)."""
    masters = [p.data for p in params]
    try:
        for p, t in zip(params, tensors):
            p.data = t
        yield
    finally:
        for p, m in zip(params, masters):
            p.data = m


class DualForwardError(RuntimeError):
    """A unit failed on one block of rows: most likely an input whose batch is not its first dimension."""

    def __init__(self, unit: Unit, block: int, slots: int, rows: int, args, kwargs, error: Exception,
                 unbatched: bool = False):
        shapes = [f"{name}{tuple(v.shape)}" for name, v in [*(("arg", a) for a in args), *kwargs.items()]
                  if isinstance(v, torch.Tensor)]
        if unbatched:
            super().__init__(
                f"{unit.name} ({type(unit.module).__name__}) returned {error} for each of ds_zo's {slots} slots "
                f"(θ+εz, θ−εz) from a call given no tensor of the batch (its inputs were "
                f"{', '.join(shapes) or 'not tensors'}): the slots' values differ, and nothing says how the model "
                "lines them up with its rows. ds_zo trains such a unit only where it returns (1, ...) or a tensor of "
                "2 or more dims that the model broadcasts over the batch; freeze it (zero_order.trainable) otherwise")
            return
        super().__init__(
            f"{unit.name} ({type(unit.module).__name__}) failed on row block {block} of {slots} in ds_zo's ZO forward "
            f"({error}). The forward runs every slot (θ+εz, θ−εz) in one batch of {slots} x {rows} rows and hands each "
            f"block to the unit with its own parameters, cutting every tensor whose first dimension is {slots * rows}; "
            f"this unit's inputs were {', '.join(shapes) or 'not tensors'}. A model that carries the batch in another "
            "dimension (such as Gemma3n's (altup, batch, T, H) hidden states), or hands its layers a tensor whose first "
            f"dimension is {slots * rows} by coincidence (a per-head bias; ds_zo knows MPT's: UNBATCHED_KWARGS), "
            "cannot be trained by ds_zo yet; another micro-batch size avoids a coincidence")


def _unit_wrapper(unit: Unit, original: Callable, slots: int, rows: int, provider: SlotParams):
    params = [r.param for r in unit.trainable]
    kind = streamed_kind(unit, getattr(provider, "row_blocks", "auto")) if hasattr(provider, "working_rows") else None

    # pointing is host time on every unit visit of a host-bound GPU step (a `p.data` read or write apiece): from one
    # slot's copies straight to the next, and back to the masters once, or not at all where `release` points the
    # parameters at their store anyway (an offloaded unit)
    point_back = not (hasattr(provider, "repoints") and provider.repoints(unit))
    whole_kwargs = UNBATCHED_KWARGS.get(type(unit.module).__name__, ())

    def forward(*args, **kwargs):
        unbatched = slots > 1 and not has_matrix((args, kwargs))

        def merge(outs, rows):
            try:
                return merge_blocks(outs, rows, unbatched)
            except UnmergeableOutputError as e:
                raise DualForwardError(unit, 0, slots, rows, args, kwargs, e, unbatched=True) from None

        if kind is not None and provider.perturbs():
            out = streamed_forward(unit, kind, provider, args, kwargs, slots, rows, split_block, merge)
            if out is not None:
                return out
        copies = provider.acquire(unit)
        try:
            if slots == 1 or (unbatched and not params):    # one output serves every slot
                if not params:
                    return original(*args, **kwargs)
                if point_back:
                    with pointed_at(params, copies[0]):
                        return original(*args, **kwargs)
                for p, t in zip(params, copies[0]):
                    p.data = t
                return original(*args, **kwargs)
            outs = []
            masters = [p.data for p in params] if point_back else None
            try:
                for block in range(slots):
                    a = split_block(args, block, rows, slots)
                    if whole_kwargs:
                        kw = split_block({k: v for k, v in kwargs.items() if k not in whole_kwargs}, block, rows,
                                         slots)
                        kw.update((k, kwargs[k]) for k in whole_kwargs if k in kwargs)
                    else:
                        kw = split_block(kwargs, block, rows, slots)
                    for p, t in zip(params, copies[block]):
                        p.data = t
                    try:
                        out = original(*a, **kw)
                        # a unit handing back its own parameter: keep this slot's copy, not the parameter (which is
                        # pointed at the next slot's copy, then back at the master, before the merge reads it)
                        outs.append(out.data if isinstance(out, torch.nn.Parameter) else out)
                    except RuntimeError as error:
                        if isinstance(error, torch.OutOfMemoryError) or type(error).__module__.startswith("ds_zo"):
                            raise       # memory, a collective, ds_zo's own: nothing to do with the rows
                        raise DualForwardError(unit, block, slots, rows, args, kwargs, error) from error
            finally:
                if point_back:
                    for p, m in zip(params, masters):
                        p.data = m
            return merge(outs, rows)
        finally:
            provider.release(unit)

    return forward


@contextlib.contextmanager
def dual_forward(units: Sequence[Unit], slots: int, rows: int, provider: SlotParams):
    """While active, calling the model on a batch of slots*rows rows runs slot i on rows [i*rows, (i+1)*rows) with the
    parameters the provider gives for slot i."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    installed = []
    try:
        for unit in units:
            mod = unit.module
            had_instance_forward = "forward" in mod.__dict__
            previous = mod.__dict__.get("forward")
            mod.forward = _unit_wrapper(unit, mod.forward, slots, rows, provider)
            installed.append((mod, had_instance_forward, previous))
        yield
    finally:
        for mod, had, previous in reversed(installed):
            if had:
                mod.forward = previous
            else:
                del mod.forward
