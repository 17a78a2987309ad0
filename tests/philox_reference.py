"""The counter-based z stream (ds_zo/triton_z.py) as its docstring defines it, in numpy: the reference the kernel is
held to, in Triton's interpreter bit for bit (tests/test_counter_z.py) and compiled on a GPU to float32 rounding of
log, sin and cos (tests/test_cuda.py)."""
import math

import numpy as np


def reference_z(key: int, start: int, n: int, gaussian: bool = True) -> np.ndarray:
    """z[start : start + n] of stream `key` as triton_z's docstring defines it, in numpy: Philox4x32-10 keyed by the
    key's two 32-bit halves at counter (e // 4, 0, 0, 0), then Box-Muller on the words' top 24 bits."""
    q = np.arange(start // 4, (start + n + 3) // 4, dtype=np.uint64)
    c = [q & 0xFFFFFFFF, q >> np.uint64(32), np.zeros_like(q), np.zeros_like(q)]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p2 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    w = [x.astype(np.uint32) for x in c]
    if gaussian:
        inv = np.float32(1.0 / 16777216.0)
        u0, u2 = [((x >> 8).astype(np.float32) + np.float32(1.0)) * inv for x in (w[0], w[2])]
        t1, t3 = [(x >> 8).astype(np.float32) * np.float32(2 * math.pi / 16777216.0) for x in (w[1], w[3])]
        ra, rb = [np.sqrt(np.float32(-2.0) * np.log(u)) for u in (u0, u2)]
        z4 = np.stack([ra * np.cos(t1), ra * np.sin(t1), rb * np.cos(t3), rb * np.sin(t3)], axis=1)
    else:
        z4 = np.stack([np.where(x >> 31 == 1, np.float32(1), np.float32(-1)) for x in w], axis=1)
    z = z4.reshape(-1).astype(np.float32)
    return z[start % 4:start % 4 + n]
