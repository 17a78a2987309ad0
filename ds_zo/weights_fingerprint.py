"""Which weights a run started from: per parameter, a hash of a fixed sample of its elements' bytes.

A checkpoint holds the trained parameters and the step log, not the rest of the model: a resume takes the frozen
parameters, and a replay every parameter, from the model it is given. A model with the same names and shapes but
other weights (SmolLM2-Base for SmolLM2-Instruct) would otherwise resume or replay without a word into a model that
no run produced. The engine fingerprints the model as `initialize` receives it (after rank 0's weights are broadcast,
before ZeRO-3 partitions them), checkpoints record that, and load / replay compare.

A sample, not every element: fine-tuned and base checkpoints differ at nearly every element, so 4096 evenly spaced
elements per parameter tell them apart, and the fingerprint costs one small gather per parameter wherever the
weights live (a GPU included) rather than a pass over the model. The sample's raw bytes are hashed with the shape and
dtype: the same weights give the same fingerprint on every device.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional

import torch

SAMPLES = 4096
# the parameter dtypes DeepSpeed casts to fp16 / bf16 (deepspeed.runtime.engine.CASTABLE_DTYPES): not integer or
# float8 weights
CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _parameter_hash(p: torch.Tensor, cast: Optional[torch.dtype]) -> Optional[str]:
    shape = tuple(getattr(p, "ds_shape", p.shape))
    t = p.detach()
    if t.numel() != math.prod(shape) or t.numel() == 0:
        return None             # partitioned before ds_zo saw it (zero.Init): no full tensor on this rank
    flat = t.reshape(-1)
    if flat.numel() > SAMPLES:
        index = torch.arange(SAMPLES, dtype=torch.int64) * flat.numel() // SAMPLES
        flat = flat[index.to(flat.device)]
    if cast is not None and flat.dtype in CASTABLE:
        flat = flat.to(cast)        # elementwise: the sample of the cast weights
    data = flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{shape}{flat.dtype}".encode() + data).hexdigest()[:16]


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module, cast: Optional[torch.dtype] = None) -> dict[str, Optional[str]]:
    """{parameter name: hash of its sampled elements, or None where this rank holds no full tensor}. cast: the dtype
    the engine will hold floating-point weights in (bf16 / fp16 enabled: DeepSpeed casts the model), so that a run
    fingerprints the weights it trains, whichever dtype the model was loaded in."""
    return {n: _parameter_hash(p, cast) for n, p in model.named_parameters()}


def rank0s(fingerprint: dict[str, Optional[str]], comm) -> dict[str, Optional[str]]:
    """Rank 0's fingerprint on every rank: under ZeRO-3 it is taken before partitioning, which keeps rank 0's
    weights, so a rank that built other weights must not compare them later."""
    if comm.dims.world == 1:
        return fingerprint
    table = torch.tensor([[h is not None, int.from_bytes(bytes.fromhex(h), "big", signed=True) if h else 0]
                          for h in fingerprint.values()], dtype=torch.int64).reshape(-1, 2)
    comm.broadcast_from_rank0([table])
    return {n: int(v).to_bytes(8, "big", signed=True).hex() if present else None
            for n, (present, v) in zip(fingerprint, table.tolist())}


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters DeepSpeed would cast (CASTABLE) to `dtype`, buffers left as loaded, as DeepSpeed does."""
    for p in model.parameters():
        if p.dtype in CASTABLE and p.dtype != dtype:
            p.data = p.data.to(dtype)


def differing(saved: dict, current: dict, names: Iterable[str]) -> list[str]:
    """The names among `names` whose fingerprints are known on both sides and differ."""
    return [n for n in names if saved.get(n) and current.get(n) and saved[n] != current[n]]


def describe(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} parameter{'s' if len(names) != 1 else ''} ({shown}{', ...' if len(names) > limit else ''})"
