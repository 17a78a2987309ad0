"""Counter-based z on GPUs: one Triton kernel writes z[start : start + n] of a parameter, whatever n.

Element e of z_(seed, index, parameter) is a pure function of (key, e), key = mix(seed, index, parameter key):
Philox4x32-10 (Salmon et al., SC'11) keyed by the key's two 32-bit halves at counter (e // 4, 0, 0, 0) gives four
32-bit words, two Box-Muller pairs give four N(0, 1) values, and e takes the one at e % 4. So any slice is drawn by
one launch with no chunks, no per-chunk seeding and no partial-chunk scratch: the chunked sampler (perturb.py)
issues one seeded `normal_` per 2^20 elements, and the host's issue of those launches bounded the GPU step
(docs/performance.md: 3,102 `normal_` calls per OPT-1.3B step, 13,556 per OPT-6.7B step).

Philox and the transform are written out here (not Triton's `randint4x` / `tl.randn`, whose handling of wide
counters has changed between versions): uniforms from the top 24 bits, u1 = (k + 1) / 2^24 in (0, 1] (log never
sees 0), u2 = k / 2^24, r = sqrt(−2 ln u1), (r cos 2πu2, r sin 2πu2). Rademacher z is ±1 from a word's top bit. A
scale multiplies z in float32 in the kernel: out = fl(z · scale), which is what `z.mul_(scale)` gives (the exactness
invariants rest on it). Floating-point contraction is off. log, sin and cos are the device's (libdevice on CUDA), so
a stream is named by a digest of values drawn on the host that names it (`stream_digest`, `perturb.z_stream`).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before this module is imported): numpy
arithmetic, another stream ("cpu-philox/…") but the same definition, which is how the CPU tests cover this module.
"""
import hashlib
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET, read as Triton itself reads it)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# whether the kernels below are defined for Triton's interpreter (decided when they are defined, at import)
INTERPRETED = interpreting()
# Philox calls per program (2048 values); z does not depend on it. The interpreter runs each program as numpy calls,
# so there fewer, larger programs
QUADS = 1 << 16 if INTERPRETED else 512


@triton.jit
def _philox4x32_10(c0, c1, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) of the counter (c0, c1, 0, 0) under the key (k0, k1), all uint32: four
    uint32 words. Written out here (Triton's `randint4x` computes the same words today, but its handling of wide
    counters has changed between versions) so that the stream depends on this file only."""
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(ROUND_A, _c0) ^ c3 ^ k1
        c1 = tl.mul(ROUND_B, _c2, sanitize_overflow=False)
        c3 = tl.mul(ROUND_A, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _z4(key, quad, GAUSSIAN: tl.constexpr):
    """The four z values of counter `quad` (int64) for `key` (an integer below 2^63)."""
    key = key.to(tl.int64)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10((quad & 0xFFFFFFFF).to(tl.uint32), (quad >> 32).to(tl.uint32), k0, k1)
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


# no value specialisation of the slice and key (Triton still compiles a variant per integer width and pointer
# alignment: a handful)
@triton.jit(do_not_specialize=["n", "start", "key"])
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
    launch(_fill, programs(start, n, quads), out.device, (out, n, start, key, scale),
           dict(GAUSSIAN=gaussian, QUADS=quads))
    return out


def programs(start: int, n: int, quads: int = QUADS) -> int:
    """Programs covering z[start : start + n] at `quads` Philox calls each (the first and last partly masked)."""
    return -(-((start + n + 3) // 4 - start // 4) // quads)


# how every kernel here is compiled: contraction off (the exactness invariants rest on one rounding per operation)
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


def launch(kernel, grid: int, device: torch.device, args: tuple, kwargs: dict) -> None:
    """kernel[(grid,)](*args) on `device` and its current stream, compiled with LAUNCH_OPTIONS."""
    kwargs = dict(kwargs, **LAUNCH_OPTIONS)
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):         # Triton launches on the current device
            kernel[(grid,)](*args, **kwargs)
    else:
        kernel[(grid,)](*args, **kwargs)


DIGEST_KEY, DIGEST_START = (1 << 62) + 12345, (1 << 33) + 5


def stream_digest(device: torch.device | str) -> str:
    """8 hex digits of 64 Gaussian z values drawn here at a 63-bit key and a counter above 2^32: part of the stream's
    name (perturb.z_stream), so that hosts whose values differ on that sample (another libdevice, another Triton's code
    generation, numpy's functions in the interpreter) never pass for one stream. It also compiles the 64-bit variant
    that training uses."""
    out = fill(torch.empty(64, dtype=torch.float32, device=device), DIGEST_START, DIGEST_KEY, 1.0)
    return hashlib.blake2b(out.cpu().numpy().tobytes(), digest_size=4).hexdigest()
