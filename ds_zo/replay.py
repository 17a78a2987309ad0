"""Replay a fine-tune from its step log (DESIGN.md invariant 6).

The records [(step, seed, g, lr, wd)] plus the list of trainable parameter names fully determine the run: applying
each record's update to the base weights, in order, reproduces the fine-tuned parameters on the same device type.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

import torch

from .model.units import is_decayed, resolve_trainable
from .optimizer import StepRecord, apply_step
from .perturb import PerturbationGenerator, param_key


def read_step_log(path: str) -> list[StepRecord]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(StepRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed step record ({e})") from None
    return records


def write_step_log(path: str, records: Iterable[StepRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


@torch.no_grad()
def replay(model: torch.nn.Module, records: Iterable[StepRecord], trainable: Optional[Iterable[str]] = None,
           distribution: str = "gaussian", rows: Optional[dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """Apply the recorded steps to `model` (the base weights) in place and return it. `trainable` holds the canonical
    parameter names that were trained (default: every parameter with requires_grad); `rows` the row subsets."""
    rows = rows or {}
    names = set(trainable) if trainable is not None else resolve_trainable(model, [])
    generator = PerturbationGenerator(distribution)
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    unknown = names - {n for n, _ in params}
    if unknown:
        raise ValueError(f"replay: trainable names {sorted(unknown)[:5]} are not parameters of this model")
    previous = None
    for rec in records:
        if previous is not None and rec.step != previous + 1:
            raise ValueError(f"replay: step log jumps from step {previous} to {rec.step}")
        previous = rec.step
        for n, p in params:
            if n in rows:
                target = p.data[rows[n]]
                apply_step(target, param_key(n), rec, is_decayed(p), generator)
                p.data[rows[n]] = target
            else:
                apply_step(p.data, param_key(n), rec, is_decayed(p), generator)
    return model
