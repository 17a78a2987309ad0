"""Cut any HF decoder model into ordered units without touching its forward code.

A unit is a module whose forward runs once per model forward and whose parameters are perturbed together: every element
of the model's largest nn.ModuleList (the decoder layers), plus the module that directly owns each remaining parameter
(embeddings, positional embeddings, final norm, head). Units never nest. A tied weight is one Parameter object owned
by two units (embedding and head): it gets one z and one update, keyed by its canonical name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


class UnitCutError(ValueError):
    pass


@dataclass(eq=False)   # identity semantics: fields hold tensors and modules
class ParamRef:
    name: str             # canonical name: the first name model.named_parameters() gives this Parameter
    param: nn.Parameter
    trainable: bool
    rows: Optional[torch.Tensor] = None   # trainable rows (dim 0) only, e.g. label-word rows of an embedding


@dataclass(eq=False)
class Unit:
    name: str
    module: nn.Module
    params: list[ParamRef] = field(default_factory=list)   # every parameter the unit uses, owned or tied
    is_layer: bool = False                                  # an element of the decoder-layer list

    @property
    def trainable(self) -> list[ParamRef]:
        return [p for p in self.params if p.trainable]


def _largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | tuple[None, None]:
    best, best_name, best_count = None, None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(full_numel(p) for p in mod.parameters())
            if count > best_count:
                best, best_name, best_count = mod, name, count
    return best_name, best


def cut_into_units(model: nn.Module, trainable_names: set[str],
                   rows: Optional[dict[str, torch.Tensor]] = None) -> list[Unit]:
    """Units in module-registration order (which HF models also execute in), each with its parameters."""
    rows = rows or {}
    canonical = {id(p): n for n, p in model.named_parameters()}
    layers_name, layers = _largest_module_list(model)
    layer_ids = {id(m) for m in layers} if layers is not None else set()
    inside_layer: set[int] = set()
    if layers is not None:
        for m in layers:
            inside_layer.update(id(x) for x in m.modules())
        # a module of a layer registered outside the layer list too: its calls from there would run unperturbed
        # (no wrapper around them) in both slots, L+ and L− silently wrong
        # (a path through a layer or the list, whatever its name, is inside: a layer's own forward is wrapped)
        paths = dict(model.named_modules(remove_duplicate=False))
        through = layer_ids | {id(layers)}
        inside_names = {id(x): f"{layers_name}.{n}" for n, x in layers.named_modules(remove_duplicate=False) if n}
        for name, mod in paths.items():
            parts = name.split(".")
            if (id(mod) in inside_layer and id(mod) not in through
                    and not any(id(paths[".".join(parts[:i])]) in through for i in range(1, len(parts)))
                    and any(True for _ in mod.parameters(recurse=False))):
                raise UnitCutError(
                    f"cannot cut {type(model).__name__} into units: module '{name}' is also '{inside_names[id(mod)]}', "
                    "inside the decoder-layer list; ds_zo perturbs a layer's modules only while the layer runs, so "
                    f"calls of '{name}' from outside it would see unperturbed weights. Give it its own module "
                    "(a copy) or keep it inside the layers only")

    units: list[Unit] = []
    unit_of_module: dict[int, Unit] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in unit_of_module:
            continue
        if id(mod) in layer_ids:
            unit = Unit(mod_name, mod, is_layer=True)
            for _, p in mod.named_parameters():
                unit.params.append(ParamRef(canonical[id(p)], p, canonical[id(p)] in trainable_names,
                                            rows.get(canonical[id(p)])))
        elif id(mod) not in inside_layer and any(True for _ in mod.parameters(recurse=False)):
            unit = Unit(mod_name, mod)
            for _, p in mod.named_parameters(recurse=False):
                unit.params.append(ParamRef(canonical[id(p)], p, canonical[id(p)] in trainable_names,
                                            rows.get(canonical[id(p)])))
        else:
            continue
        units.append(unit)
        unit_of_module[id(mod)] = unit

    # Units must not nest: a wrapper around an ancestor would perturb its descendants' parameters twice. A frozen
    # ancestor (nothing in its subtree trained: a multimodal model's vision tower when only its language model
    # trains) is nothing to perturb: it becomes one unit of its whole subtree, as a layer is.
    absorbed: set[int] = set()
    for u in units:
        if id(u.module) in absorbed:
            continue
        nested = [unit_of_module[id(sub)] for sub in u.module.modules()
                  if sub is not u.module and id(sub) in unit_of_module]
        if not nested:
            continue
        if any(canonical[id(p)] in trainable_names for p in u.module.parameters()):
            own_frozen = not any(canonical[id(p)] in trainable_names for p in u.module.parameters(recurse=False))
            raise UnitCutError(
                f"cannot cut {type(model).__name__} into units: module '{u.name or type(model).__name__}' owns "
                f"parameters directly and also contains unit '{nested[0].name}', and a parameter of it trains; ds_zo "
                "needs each trained parameter in a leaf-most unit" + (
                    " (its own parameters are frozen, but trained units sit inside it: ds_zo cannot train this model "
                    "yet)" if own_frozen else
                    " (freezing the module, e.g. with zero_order.trainable, makes it one frozen unit)"))
        u.params = [ParamRef(canonical[id(p)], p, False) for p in u.module.parameters()]
        absorbed.update(id(n.module) for n in nested)
    units = [u for u in units if id(u.module) not in absorbed]
    covered = {id(r.param) for u in units for r in u.params}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise UnitCutError(f"cannot cut {type(model).__name__} into units: parameters {missing[:5]} belong to no unit")
    for u in units:
        if not u.params:
            raise UnitCutError(f"unit '{u.name}' has no parameters")
    return units


def resolve_trainable(model: nn.Module, patterns: list[str]) -> set[str]:
    """Canonical names of the trainable parameters: requires_grad, and (if patterns are given) any alias of the
    parameter matches one of the fnmatch patterns. A pattern that matches no parameter, or only frozen ones, is an
    error (ValueError)."""
    from fnmatch import fnmatchcase

    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    names = set()
    matched: dict[str, list[bool]] = {pat: [] for pat in patterns}     # pattern -> requires_grad of its matches
    for n, p in model.named_parameters():
        hits = [pat for pat in patterns if any(fnmatchcase(a, pat) for a in aliases[id(p)])]
        for pat in hits:
            matched[pat].append(p.requires_grad)
        if p.requires_grad and (hits or not patterns):
            names.add(n)
    # a pattern that selects nothing is a typo or a model it was not written for: said, as trainable_rows says it
    for pat, grads in matched.items():
        if not grads:
            some = ", ".join(n for n, _ in list(model.named_parameters())[:3])
            raise ValueError(f"zero_order.trainable: pattern {pat!r} matches no parameter of the model (fnmatch on "
                             f"parameter names such as {some})")
        if not any(grads):
            raise ValueError(f"zero_order.trainable: pattern {pat!r} matches only parameters with "
                             f"requires_grad=False ({len(grads)} of them): ds_zo trains parameters that require grad; "
                             "set requires_grad_(True) on those to train them, or drop the pattern")
    return names


def resolve_rows(model: nn.Module, mapping: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """{canonical name: sorted unique row indices} from {fnmatch pattern: rows}: only those rows (dim 0) of the
    matched parameters are trained, e.g. the label-word rows of a (tied) embedding."""
    from fnmatch import fnmatchcase

    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for pattern, rows in mapping.items():
        matched = [(n, p) for n, p in model.named_parameters() if any(fnmatchcase(a, pattern) for a in aliases[id(p)])]
        if not matched:
            raise ValueError(f"zero_order.trainable_rows: pattern {pattern!r} matches no parameter")
        for n, p in matched:
            size = len(getattr(p, "ds_shape", p.shape)) and getattr(p, "ds_shape", p.shape)[0]
            bad = [r for r in rows if not 0 <= r < size]
            if bad or not rows:
                raise ValueError(f"zero_order.trainable_rows[{pattern!r}]: rows {bad or rows} are not rows of "
                                 f"{n} (0 <= row < {size}, at least one)")
            idx = torch.tensor(sorted(set(rows)), dtype=torch.long)
            if n in out and not torch.equal(out[n], idx):
                raise ValueError(f"zero_order.trainable_rows: {n} is matched by two patterns with different rows")
            out[n] = idx
    return out


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also for a ZeRO-3 placeholder (whose own shape is (0,))."""
    return getattr(param, "ds_numel", None) or param.numel()


def is_decayed(param: torch.Tensor) -> bool:
    """nanoGPT's rule: matrices and embeddings decay; 1-D biases and norm weights do not (ZeRO-3: by ds_shape)."""
    return len(getattr(param, "ds_shape", param.shape)) >= 2
