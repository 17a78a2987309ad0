"""Counter-based z on GPUs: one Triton kernel writes z[start : start + n] of a parameter, whatever n.

Element e of z_(seed, index, parameter) is a pure function of (key, e), key = mix(seed, index, parameter key):
Philox4x32-10 (Salmon et al., SC'11; Triton's `randint4x`) keyed by `key` at counter e // 4 gives four 32-bit words,
two Box-Muller pairs give four N(0, 1) values, and e takes the one at e % 4. So any slice is drawn by one launch
with no chunks, no per-chunk seeding and no partial-chunk scratch: the chunked sampler (perturb.py) issues one seeded
`normal_` per 2^20 elements, and the host's issue of those launches bounded the GPU step (docs/performance.md: 3,102
`normal_` calls per OPT-1.3B step, 13,556 per OPT-6.7B step).

The transform is written out here rather than taken from `tl.randn`, so that the z stream does not change with
Triton's version: uniforms from the top 24 bits, u1 = (k + 1) / 2^24 in (0, 1] (log never sees 0), u2 = k / 2^24,
r = sqrt(−2 ln u1), (r cos 2πu2, r sin 2πu2). Rademacher z is ±1 from a word's top bit. A scale multiplies z in
float32 in the kernel: out = fl(z · scale), which is what `z.mul_(scale)` gives (the exactness invariants rest on it).
Floating-point contraction is off, so every kernel that uses `_z` computes the same values; the transcendental
functions are the GPU's, so the stream is named by compute capability (`perturb.z_stream`).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported): numpy
arithmetic, another stream ("cpu-philox") but the same definition, which is how the CPU tests cover this module.
"""
import os

import torch
import triton
import triton.language as tl

# Philox calls per program (2048 values); z does not depend on it. The interpreter runs each program as numpy calls,
# so there fewer, larger programs
QUADS = 1 << 16 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 512


@triton.jit
def _z4(key, quad, GAUSSIAN: tl.constexpr):
    """The four z values of counter `quad` (int64) for `key`."""
    w0, w1, w2, w3 = tl.randint4x(key, quad, 10)
    if GAUSSIAN:
        inv = 1.0 / 16777216.0
        u0 = ((w0 >> 8).to(tl.float32) + 1.0) * inv
        u2 = ((w2 >> 8).to(tl.float32) + 1.0) * inv
        t1 = (w1 >> 8).to(tl.float32) * (6.283185307179586 * inv)
        t3 = (w3 >> 8).to(tl.float32) * (6.283185307179586 * inv)
        ra = tl.sqrt_rn(-2.0 * tl.log(u0))
        rb = tl.sqrt_rn(-2.0 * tl.log(u2))
        return ra * tl.cos(t1), ra * tl.sin(t1), rb * tl.cos(t3), rb * tl.sin(t3)
    else:
        return (tl.where((w0 >> 31) == 1, 1.0, -1.0), tl.where((w1 >> 31) == 1, 1.0, -1.0),
                tl.where((w2 >> 31) == 1, 1.0, -1.0), tl.where((w3 >> 31) == 1, 1.0, -1.0))


@triton.jit(do_not_specialize=["n", "start", "key"])     # one compiled kernel for every slice and key
def _fill(out_ptr, n, start, key, scale, GAUSSIAN: tl.constexpr, QUADS: tl.constexpr):
    """out[i] = z[start + i] · scale for i < n."""
    q0 = start // 4 + tl.program_id(0).to(tl.int64) * QUADS
    quad = q0 + tl.arange(0, QUADS)
    a, b, c, d = _z4(key, quad, GAUSSIAN)
    z = tl.interleave(tl.interleave(a, c), tl.interleave(b, d))   # a0 b0 c0 d0 a1 b1 ...
    e = q0 * 4 + tl.arange(0, 4 * QUADS)                           # the elements of z they are
    at = e - start
    tl.store(out_ptr + at, z * scale, mask=(at >= 0) & (at < n))


def fill(out: torch.Tensor, start: int, key: int, scale: float, gaussian: bool = True,
         quads: int = QUADS) -> torch.Tensor:
    """out (flat float32, stride 1) := z[start : start + out.numel()] · scale of the stream `key` (a 63-bit int), in
    one launch on out's device and current stream. `quads`: Philox calls per program (a power of two; z does not
    depend on it)."""
    n = out.numel()
    if n == 0:
        return out
    programs = -(-((start + n + 3) // 4 - start // 4) // quads)
    args = (out, n, start, key, scale)
    kwargs = dict(GAUSSIAN=gaussian, QUADS=quads, num_warps=4, enable_fp_fusion=False)
    if out.device.type == "cuda" and out.device.index != torch.cuda.current_device():
        with torch.cuda.device(out.device):     # Triton launches on the current device
            _fill[(programs,)](*args, **kwargs)
    else:
        _fill[(programs,)](*args, **kwargs)
    return out
