"""The engine's hooks on its model, and what a copy of the model gets instead.

A ZOEngine hooks its model (and HF's decoder body): a direct forward or `state_dict()` first applies the pending
(fused) update, and with offload a direct forward streams the layers. DeepSpeed hooks the model too (its forward
prologue and epilogue). All of those hooks belong to one model. `copy.deepcopy(model)` and pickling would carry
them over unchanged, which caused two problems:
- the copy was one step behind. The last step's update is still pending after `train_batch`, and a deep copy reads
  the raw parameters. "Keep a copy of the best model" kept the weights from before the last step;
- the copy's hooks still held the engine, so a destroyed engine and its buffers stayed alive while a copy lived.

So each hook is a `ModelHook`. Deep-copying one first makes every completed step visible (`engine.flush()`, as
`state_dict()` does), then gives `inert_hook`, which does nothing and holds nothing: the copy is a plain model. A
module's hooks are copied before its submodules, so their parameters are copied after the flush; a parameter copied
earlier in the same `deepcopy` call (a dict holding a parameter before the model) is refreshed from the memo.
`torch.save(model)` flushes the same way (it writes the tensors' bytes after pickling every object); plain `pickle`
writes them as it goes, so a parameter pickled before the model would be stale (call `engine.flush()` first). A
submodule's copy is not covered, as its `state_dict()` is not. Parameters held in an offload store's narrower
dtype (`offload_dtype`) are deep-copied in the dtype they compute in, so the copy has one dtype, as loaded. The
live engine of a model is found through these hooks (`attached_engine`): a deep copy has none, a shallow copy
(`copy.copy`) shares them, and is refused as the model itself.
"""
from __future__ import annotations

import torch


def inert_hook(*args, **kwargs):
    """What a copy of the model holds in place of an engine's hook."""
    return None


def _inert_hook():
    return inert_hook


class ModelHook:
    """A hook of `engine` on its model: calls `fn`; a copy of it (deepcopy, pickle) is `inert_hook`."""
    __slots__ = ("engine", "fn")

    def __init__(self, engine, fn):
        self.engine = engine
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        self.engine.flush_for_reader()
        with torch.no_grad():
            # parameters the copy already holds were copied before the flush
            for p in self.engine.module.parameters():
                copied = memo.get(id(p))
                if isinstance(copied, torch.Tensor) and copied.shape == p.shape:
                    copied.copy_(p)
            # parameters held in an offload store's narrower dtype are copied in the dtype they compute in
            for p, dtype in self.engine.stored_in_other_dtype():
                copied = memo.get(id(p))
                if copied is None:
                    memo[id(p)] = type(p)(p.detach().to(dtype, copy=True), p.requires_grad)
                elif copied.dtype != dtype:
                    copied.data = copied.data.to(dtype, copy=True)
        return inert_hook

    def __reduce__(self):
        # torch.save pickles the objects first and writes the tensors' bytes afterwards, so they are the flushed ones
        self.engine.flush_for_reader()
        return _inert_hook, ()


class UnitHook(ModelHook):
    """A hook of `engine` on one unit's module (a unit called on its own applies the pending update). A copy of it
    is `inert_hook` at once: a whole model's copy was made current by the model's own ModelHook, copied before its
    submodules, and a submodule's copy is not covered (as its `state_dict()` is not); one flush and parameter
    refresh per unit hook made a deep copy of an L-layer model copy its parameters about L/2 times again."""
    __slots__ = ()

    def __deepcopy__(self, memo):
        return inert_hook

    def __reduce__(self):
        return _inert_hook, ()


def attached_engine(model: torch.nn.Module):
    """The live engine whose hooks are on `model` (or on a shallow copy's shared hooks), or None."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, ModelHook) and not getattr(hook.engine, "_destroyed", True):
            return hook.engine
    return None


def wrap_hook(engine, handle) -> None:
    """Make the hook behind a RemovableHandle (e.g. DeepSpeed's) a ModelHook, in place: same id, order and flags."""
    hooks = handle.hooks_dict_ref() if handle is not None else None
    if hooks is not None and handle.id in hooks and not isinstance(hooks[handle.id], ModelHook):
        hooks[handle.id] = ModelHook(engine, hooks[handle.id])


class PlaceholderGuard:
    """A state_dict post-hook on a ZeRO-3 partitioned model: its offloaded layers' parameters are DeepSpeed's empty
    placeholders (the values are shards across the ranks), and a state_dict() of them, e.g. save_pretrained's,
    would be saved without a word and fail to load. It holds no engine, so it stays after `destroy()` (the model
    stays partitioned) and a deep copy carries it; `engine.module_state_dict()`, which gathers, reads past it."""

    def __init__(self):
        self.reading = False

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        if self.reading:
            return
        # (a deep copy's parameters lose DeepSpeed's ds_* attributes but keep the empty data)
        empty = [prefix + n for n, p in module.named_parameters() if p.numel() == 0 and prefix + n in state_dict]
        if empty:
            raise RuntimeError(f"this model is ZeRO-3 partitioned: {len(empty)} parameters (e.g. {empty[0]!r}) are "
                               "shards held by the ranks, and its state_dict() would hold DeepSpeed's empty "
                               "placeholders for them (a model saved from it could not be loaded). Gather them with "
                               "sd = engine.module_state_dict() (a collective: every rank calls it; before "
                               "engine.destroy()), then save on rank 0 with model.save_pretrained(dir, state_dict=sd)")


def placeholder_guard(module: torch.nn.Module) -> PlaceholderGuard:
    """The module's PlaceholderGuard, registered once (a later engine on the same model reuses it)."""
    for hook in module._state_dict_hooks.values():
        if isinstance(hook, PlaceholderGuard):
            return hook
    guard = PlaceholderGuard()
    module.register_state_dict_post_hook(guard)
    return guard
