"""Slice-addressable perturbations z (DESIGN.md invariant 5).

z for one (step seed, perturbation index, parameter) is defined over the parameter flattened in row-major order, chunk
by chunk: chunk k covers elements [k*C, min((k+1)*C, n)) and is drawn, whole, from a generator seeded with a key mixed
from (step seed, perturbation index, parameter key, k). Any slice [a, b) is therefore produced by drawing only the
chunks it overlaps, and every rank, partitioning and offload layout sees the same values bit for bit on one device
type. A chunk is always drawn at its full length because torch's CPU normal sampler fills blocks of 16 values and is
not prefix-stable: drawing a shorter length can change earlier values.

Nothing here depends on global RNG state or on call order.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 20  # large enough that kernel launches stay rare on a GPU, small enough for cheap partial slices
DISTRIBUTIONS = ("gaussian", "rademacher")
_MASK63 = (1 << 63) - 1


def mix(*values: int) -> int:
    """A stable 63-bit key from a tuple of integers (blake2b: no Python hash randomisation, no collisions in practice)."""
    data = struct.pack(f"<{len(values)}Q", *[v & 0xFFFFFFFFFFFFFFFF for v in values])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def param_key(name: str) -> int:
    """The key of a parameter: its canonical (first) name in the model, stable across processes and layouts."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & _MASK63


def step_seed(run_seed: int, step: int) -> int:
    """The seed of one optimizer step; the step log stores it, so replay never needs the run seed."""
    return mix(0x5EED, run_seed, step)


class PerturbationGenerator:
    """Draws z (always float32) for any slice of any parameter."""

    def __init__(self, distribution: str = "gaussian", chunk_elements: int = CHUNK_ELEMENTS):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"zero_order.distribution: {distribution!r} is not one of {DISTRIBUTIONS}")
        if chunk_elements < 16:
            raise ValueError(f"chunk_elements must be >= 16, got {chunk_elements}")
        self.distribution = distribution
        self.chunk = chunk_elements
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self.elements_drawn = 0  # instrumentation: how many z values were generated (benchmarks report it)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def _draw(self, out: torch.Tensor, key: int) -> None:
        gen = self._generator(out.device)
        gen.manual_seed(key)
        if self.distribution == "gaussian":
            out.normal_(generator=gen)
        else:
            out.bernoulli_(0.5, generator=gen).mul_(2.0).sub_(1.0)
        self.elements_drawn += out.numel()

    def _scratch_chunk(self, device: torch.device) -> torch.Tensor:
        buf = self._scratch.get(device)
        if buf is None:
            buf = self._scratch[device] = torch.empty(self.chunk, dtype=torch.float32, device=device)
        return buf

    def fill(self, out: torch.Tensor, seed: int, index: int, key: int, numel: int, start: int = 0) -> torch.Tensor:
        """Write z[start : start + out.numel()] of a parameter of `numel` elements into the flat float32 `out`."""
        if out.dtype != torch.float32 or out.dim() != 1:
            raise ValueError("z buffers are flat float32 tensors")
        stop = start + out.numel()
        if start < 0 or stop > numel:
            raise ValueError(f"slice [{start}, {stop}) is outside a parameter of {numel} elements")
        c = self.chunk
        for k in range(start // c, (stop + c - 1) // c):
            lo, hi = k * c, min((k + 1) * c, numel)
            a, b = max(lo, start), min(hi, stop)
            key_k = mix(seed, index, key, k)
            if a == lo and b == hi:  # whole chunk: draw straight into the output
                self._draw(out[a - start:b - start], key_k)
            else:
                tmp = self._scratch_chunk(out.device)[:hi - lo]
                self._draw(tmp, key_k)
                out[a - start:b - start].copy_(tmp[a - lo:b - lo])
        return out

    def z(self, seed: int, index: int, key: int, numel: int, start: int = 0, stop: Optional[int] = None,
          device: torch.device | str = "cpu") -> torch.Tensor:
        """A new flat float32 tensor holding z[start:stop] (convenience for tests and replay)."""
        stop = numel if stop is None else stop
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
        return self.fill(out, seed, index, key, numel, start)
