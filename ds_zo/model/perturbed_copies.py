"""Working copies θ ± εz of one unit at a time, built into reused flat buffers.

For each trainable parameter of the unit being entered: first the optimizer applies the pending (fused) update of the
previous step to the master, then z is drawn once into a float32 scratch buffer and both signs are formed from it, in
float32, rounded once into the parameter's dtype. z is thus generated once per step for the perturbation and once more
(next step) for the update: two draws per element per step (MeZO's in-place loop draws four).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..perturb import PerturbationGenerator
from .units import Unit


class FlatBuffers:
    """Grow-only flat buffers per (role, device, dtype): no allocation churn once the largest unit has been seen."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        k = (role, device, dtype)
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[k] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


class PerturbedCopies:
    """Implements dual_forward's PerturbedParams for one perturbation (seed, index) of one step."""

    def __init__(self, generator: PerturbationGenerator, keys: dict[int, int], eps: float, before_perturb=None):
        self.generator = generator
        self.keys = keys                      # id(param) -> perturb.param_key(canonical name)
        self.eps = eps
        self.before_perturb = before_perturb  # callable(list[ParamRef]): applies the pending update first
        self.buffers = FlatBuffers()
        self.seed = None
        self.index = 0

    def set_perturbation(self, seed: int, index: int) -> None:
        self.seed, self.index = seed, index

    def acquire(self, unit: Unit, signs: Sequence[int]) -> list[list[torch.Tensor]]:
        refs = unit.trainable
        if self.before_perturb is not None:
            self.before_perturb(refs)
        sizes: dict[tuple, int] = {}
        for ref in refs:
            k = (ref.param.device, ref.param.dtype)
            sizes[k] = sizes.get(k, 0) + ref.param.numel()
        # one flat buffer per sign, device and dtype, sized for the whole unit; each parameter's copy is a slice
        flats = {(i, *k): self.buffers.get(f"sign{i}", n, k[1], k[0]) for i in range(len(signs)) for k, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        copies: list[list[torch.Tensor]] = [[] for _ in signs]
        for ref in refs:
            p = ref.param.data
            n, k = p.numel(), (p.device, p.dtype)
            off = offsets[k]
            offsets[k] = off + n
            z = self.buffers.get("z", n, torch.float32, p.device)
            self.generator.fill(z, self.seed, self.index, self.keys[id(ref.param)], n)
            z.mul_(self.eps)  # θ ± (εz), rounded as the plain expression `p + eps * z` rounds
            master32 = p.reshape(-1).float()  # no copy for float32 parameters
            for i, sign in enumerate(signs):
                out = flats[(i, *k)][off:off + n]
                op = torch.add if sign > 0 else torch.sub
                if p.dtype == torch.float32:
                    op(master32, z, out=out)
                else:  # compute in float32, round once
                    out.copy_(op(master32, z))
                copies[i].append(out.view_as(p))
        return copies

    def release(self, unit: Unit) -> None:
        pass  # buffers are reused by the next unit; the caller finished with them (same stream, in order)
