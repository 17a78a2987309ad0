"""Makes "ZOSGD" a name DeepSpeed's config can resolve, so that a ds_config selecting it through plain
deepspeed.initialize fails with a message that says what to do instead of silently training first-order.

DeepSpeed has no optimizer registry: for any "optimizer.type" outside its built-ins it looks up
getattr(torch.optim, type). Registration therefore adds one new attribute, torch.optim.ZOSGD, changing nothing that
exists; `unregister()` removes it again. Construction through that name raises, because a ZO step needs ZOEngine.
"""
from __future__ import annotations

import torch


class ZOSGDNeedsZOEngine(torch.optim.Optimizer):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "optimizer type 'ZOSGD' is zeroth-order: it needs ds_zo's engine, which runs two perturbed forwards and no "
            "backward. Build the engine with `ds_zo.initialize(model=..., config=...)` instead of "
            "`deepspeed.initialize(...)`; the same ds_config works there.")


_NAME = "ZOSGD"


def register() -> None:
    existing = getattr(torch.optim, _NAME, None)
    if existing is not None and existing is not ZOSGDNeedsZOEngine:
        raise RuntimeError(f"torch.optim.{_NAME} already exists ({existing!r}); ds_zo will not replace it")
    setattr(torch.optim, _NAME, ZOSGDNeedsZOEngine)


def unregister() -> None:
    if getattr(torch.optim, _NAME, None) is ZOSGDNeedsZOEngine:
        delattr(torch.optim, _NAME)
