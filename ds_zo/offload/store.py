"""The CPU parameter store: each offloaded unit's parameters as one flat CPU buffer (pinned when CUDA is present), in
the storage dtype. While a unit is not resident its parameters point at views of this buffer, so the store is the
master copy and the model holds no second one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.units import Unit


@dataclass
class StoredUnit:
    unit: Unit
    flat: torch.Tensor                     # CPU, storage dtype
    params: list[torch.nn.Parameter]       # every parameter of the unit, trainable or frozen, in layout order
    offsets: list[int]
    compute_dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    def point_at(self, flat: torch.Tensor) -> None:
        self.point_views(self.views(flat))

    def point_views(self, views: list[torch.Tensor]) -> None:
        """Point the parameters at views made by `views` (callers that visit the same buffers again keep them:
        making 16 views costs ~20x setting them)."""
        for p, v in zip(self.params, views):
            p.data = v


class ParameterStore:
    def __init__(self, units: list[Unit], storage_dtype: torch.dtype | None, pin: bool):
        self.units: dict[int, StoredUnit] = {}
        for unit in units:
            params = list(dict.fromkeys(r.param for r in unit.params))
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"offload: unit '{unit.name}' mixes parameter dtypes {sorted(map(str, dtypes))}; "
                                 "one dtype per unit is supported")
            compute_dtype = dtypes.pop()
            dtype = storage_dtype or compute_dtype
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += p.numel()
            flat = torch.empty(total, dtype=dtype, pin_memory=pin)
            stored = StoredUnit(unit, flat, params, offsets, compute_dtype)
            for p, v in zip(params, stored.views(flat)):
                v.copy_(p.data.reshape(v.shape))   # one unit at a time: peak memory is the model plus one unit
            stored.point_at(flat)
            self.units[id(unit)] = stored

    def __contains__(self, unit: Unit) -> bool:
        return id(unit) in self.units

    def __getitem__(self, unit: Unit) -> StoredUnit:
        return self.units[id(unit)]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.units.values())
