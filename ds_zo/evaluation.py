"""Evaluation of prompt-based classification (accuracy over label words, label-word loss) and of plain LM loss,
sharded over every rank and summed with one all-reduce."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .data.collate import batches, takes_position_ids
from .data.tasks import count_correct
from .forward_context import eval_mode, forward_autocast


@torch.no_grad()
def evaluate(engine, examples: Sequence[dict], batch_size: int, pad_id: int,
             candidate_ids: Sequence[int] | None = None) -> dict:
    """{"loss", "accuracy" (classification), "examples"} over `examples` at the current parameters. Every rank
    calls it; rank r evaluates examples r, r + world, ... (perturbation-parallel peers split the work too)."""
    rank, world = engine.dims.rank, engine.dims.world
    mine = list(examples[rank::world])
    totals = torch.zeros(4, dtype=torch.float64)    # loss sum, tokens, correct, rows
    engine.flush()
    with eval_mode(engine.module):
        # left padding puts every label word last, so only the final positions need logits; batches of similar
        # lengths pad less (order does not matter for a sum)
        positions = takes_position_ids(engine.module)    # a row's positions do not depend on its batch-mates
        todo = list(batches(mine, batch_size, pad_id, side="left", by_length=True, position_ids=positions))
        counted = len(todo)
        if engine.pipeline is not None and engine.dims.partition > 1 and examples:
            # resliced forwards all-gather inside the partition group: every rank must run as many forwards as the
            # busiest one (the extra ones repeat a batch and are not counted)
            needed = math.ceil(math.ceil(len(examples) / world) / batch_size)
            filler = todo[-1:] or list(batches(list(examples[:1]), batch_size, pad_id, side="left",
                                               position_ids=positions))
            todo += filler * (needed - counted)
        for index, padded in enumerate(todo):
            batch = {k: v.to(engine.device) for k, v in padded.items()}
            extra, labels = engine.scored_positions(batch["labels"])
            if "position_ids" in batch:
                extra["position_ids"] = batch["position_ids"]
            with forward_autocast(engine):     # (ds_config's torch_autocast, as the training forwards run)
                logits = engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False, **extra).logits
            if index >= counted:
                continue
            loss_sum, tokens = engine.loss_fn(logits, labels)
            totals[0] += loss_sum
            totals[1] += tokens
            if candidate_ids is not None:
                correct, rows = count_correct(logits, labels, candidate_ids)
                totals[2] += correct
                totals[3] += rows
    engine.comm.all_reduce_sum(totals)
    out = {"loss": (totals[0] / totals[1]).item() if totals[1] else float("nan"), "examples": len(examples)}
    if candidate_ids is not None:
        out["accuracy"] = (totals[2] / totals[3]).item() if totals[3] else float("nan")
    return out
