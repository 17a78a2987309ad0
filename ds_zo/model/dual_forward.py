"""Run the model's own forward once over a doubled batch [x; x] so that each unit computes its first half at θ+εz and
its second half at θ−εz (or, under perturbation parallelism, one sign over the whole batch).

Nothing of HF's forward code is copied: HF's top-level forward builds masks and rotary tables for the doubled batch;
each unit's forward is temporarily replaced on the instance (undone on exit) by a wrapper that splits batch-leading
tensors, runs the original forward once per sign with the unit's parameters pointed at perturbed working copies, and
concatenates the halves. The master tensors are only pointed away from, never written.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol, Sequence

import torch

from .units import Unit


class PerturbedParams(Protocol):
    def acquire(self, unit: Unit, signs: Sequence[int]) -> list[list[torch.Tensor]]:
        """Per sign, the working copies of unit.trainable (shaped like the parameters)."""

    def release(self, unit: Unit) -> None:
        ...


def split_half(obj: Any, half: int, rows: int) -> Any:
    """The half-th block of `rows` rows of every batch-leading tensor. A tensor is batch-leading only if it has >= 2
    dims and its first dim is 2*rows: 1-D tensors (cache_position), batch-1 tensors (position_ids (1,T), rotary
    cos/sin) and non-tensors go to both halves unchanged."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == 2 * rows:
            return obj[half * rows:(half + 1) * rows]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_half(o, half, rows) for o in obj)
    if isinstance(obj, list):
        return [split_half(o, half, rows) for o in obj]
    if isinstance(obj, dict):
        return {k: split_half(v, half, rows) for k, v in obj.items()}
    return obj


def merge_halves(outs: Sequence[Any], rows: int) -> Any:
    """Concatenate per-sign outputs back into one doubled batch. A half whose output has batch 1 while rows > 1
    (GPT-2's wpe on position_ids (1,T)) is expanded to `rows` first."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        parts = [o.expand(rows, *o.shape[1:]) if o.shape[0] == 1 and rows > 1 else o for o in outs]
        return torch.cat(parts, dim=0)
    if isinstance(first, tuple):
        merged = [merge_halves([o[i] for o in outs], rows) for i in range(len(first))]
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)
    if isinstance(first, list):
        return [merge_halves([o[i] for o in outs], rows) for i in range(len(first))]
    if isinstance(first, dict):
        merged = {k: merge_halves([o[k] for o in outs], rows) for k in first}
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


def _unit_wrapper(unit: Unit, original: Callable, signs: Sequence[int], rows: int, provider: PerturbedParams):
    params = [r.param for r in unit.trainable]

    def forward(*args, **kwargs):
        copies = provider.acquire(unit, signs)
        try:
            outs = []
            for half, _ in enumerate(signs):
                if len(signs) == 1:
                    a, kw = args, kwargs
                else:
                    a, kw = split_half(args, half, rows), split_half(kwargs, half, rows)
                with pointed_at(params, copies[half]):
                    outs.append(original(*a, **kw))
            return outs[0] if len(signs) == 1 else merge_halves(outs, rows)
        finally:
            provider.release(unit)

    return forward


@contextlib.contextmanager
def dual_forward(units: Sequence[Unit], signs: Sequence[int], rows: int, provider: PerturbedParams):
    """While active, calling the model on a batch of len(signs)*rows rows runs sign i on rows [i*rows, (i+1)*rows)."""
    if len(signs) not in (1, 2):
        raise ValueError(f"signs must hold one or two entries, got {signs}")
    installed = []
    try:
        for unit in units:
            mod = unit.module
            had_instance_forward = "forward" in mod.__dict__
            previous = mod.__dict__.get("forward")
            mod.forward = _unit_wrapper(unit, mod.forward, signs, rows, provider)
            installed.append((mod, had_instance_forward, previous))
        yield
    finally:
        for mod, had, previous in reversed(installed):
            if had:
                mod.forward = previous
            else:
                del mod.forward
