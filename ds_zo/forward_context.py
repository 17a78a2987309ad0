"""The contexts every ZO forward runs in (training slots, evaluation, eval_batch): eval mode, ds_config's autocast."""
from __future__ import annotations

import contextlib

import torch
from deepspeed.runtime.torch_autocast import autocast_if_enabled


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off for every slot (as MeZO runs the model in eval mode); the caller's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def forward_autocast(engine):
    """ds_config's torch_autocast, as DeepSpeedEngine.forward applies it (autocast_if_enabled: the config's dtype, or
    a CUDA caller's autocast switched off where the config has none), with torch's cast cache off: autocast caches a
    parameter's low-precision cast per parameter, and the slots of a ZO forward point the same parameter at different
    working copies, so the second slot would compute with the first one's weights. On the way out the cache is
    cleared: the forward may have applied a pending update in place, and a caller's autocast region around it would
    hand later forwards the casts of the weights before it."""
    with autocast_if_enabled(engine):
        cached = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            yield
        finally:
            torch.set_autocast_cache_enabled(cached)
            torch.clear_autocast_cache()
