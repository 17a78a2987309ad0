"""The ZO element-wise passes fused with the counter-based z (triton_z): z is computed in registers and never written.

Two kernels, each one launch for a list of segments (flat slices of parameters of one dtype):
- `perturb`: out_t = master ± ε·z for one perturbation's slots (the working copies of a unit);
- `update`:  θ ← θ − lr·((1/q) Σ_j g_j·z_j + wd·θ) (the pending ZO-SGD step).
They compute the values the unfused path gives bit for bit — `triton_z.fill` into scratch, then torch's element-wise
ops (perturbed_copies._shifted, optimizer.apply_step_pieces) — so the exactness invariants, the replay and the CPU
tests do not depend on which path ran. Each operation is written in the order torch evaluates it, in float32, with
contraction off; division by q is torch's on that device (a multiply by fl(1/q) on CUDA, a true division on CPU);
16-bit results are rounded to nearest-even by integer arithmetic (Triton's interpreter truncates bfloat16
conversions; the compiled kernel rounds; written out, both agree with torch).

What replaces thousands of launches: the unfused path issues, per span piece of each tensor, one z launch and one
or two element-wise launches per slot (OPT-1.3B: 4,179 launches and 27,819 host ops per step on an H200, most of
them in these passes). Here a unit's whole pass is one table upload and one launch. The table (int64, built on the
host: per segment its first program, element offsets from a base pointer, length, z offset, keys) travels through
pinned memory on the launching stream, so no host synchronisation is added.

`self_check` runs both kernels against the unfused path on the device once per (device, dtype); the generator uses
them only where it passed (perturb.PerturbationGenerator.fused_kernels_unavailable).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_z
from .triton_z import _z4

# Philox calls per program (z does not depend on it): triton_z's on GPUs; in the interpreter fewer than triton_z's
# there, since a segment takes at least one program and units have many small ones
QUADS = 1 << 12 if triton_z.INTERPRETED else triton_z.QUADS
# segments per launch: the kernel finds its segment among SEGS table rows (a power of two, at least MIN_SEGS so that
# a handful of variants serve every unit); longer lists take several launches
MIN_SEGS, MAX_SEGS = 16, 256
# perturbations an update kernel sums in registers (a step with more takes the unfused path)
MAX_Q = 8
_PERTURB_COLS = 6       # first program, master offset, out offset, length, z start, key
_PERTURB_HEADER = 2     # the targets' signs
_UPDATE_FIXED_COLS = 5  # first program, θ offset, length, z start, weight decay on; then one key per perturbation
_NO_PROGRAM = (1 << 62)   # first program of the padding rows: never reached
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round(x, KIND: tl.constexpr):
    """float32 → the storage dtype, rounded to nearest-even (KIND 0 float32, 1 bfloat16, 2 float16)."""
    if KIND == 1:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)          # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16)                  # (the interpreter's numpy conversion rounds to nearest-even too)
    else:
        return x


@triton.jit
def _segment(tab_ptr, COLS: tl.constexpr, SEGS: tl.constexpr):
    """This program's table row: the last segment whose first program is at most this program's id."""
    pid = tl.program_id(0).to(tl.int64)
    firsts = tl.load(tab_ptr + tl.arange(0, SEGS).to(tl.int64) * COLS)
    seg = tl.sum((firsts <= pid).to(tl.int64), axis=0) - 1
    return tab_ptr + seg * COLS, pid


@triton.jit
def _z_block(row, pid, n, start, key, GAUSSIAN: tl.constexpr, QUADS: tl.constexpr):
    """The z values of this program's block of its segment, and the block's element offsets in the segment."""
    q0 = start // 4 + (pid - tl.load(row)) * QUADS
    a, b, c, d = _z4(key, q0 + tl.arange(0, QUADS), GAUSSIAN)
    z = tl.interleave(tl.interleave(a, c), tl.interleave(b, d))   # a0 b0 c0 d0 a1 b1 ... (as triton_z._fill)
    at = q0 * 4 + tl.arange(0, 4 * QUADS) - start
    return z, at, (at >= 0) & (at < n)


@triton.jit
def _perturb_kernel(master_ptr, out0_ptr, out1_ptr, tab_ptr, eps, TARGETS: tl.constexpr, KIND: tl.constexpr,
                    SEGS: tl.constexpr, GAUSSIAN: tl.constexpr, QUADS: tl.constexpr):
    """out_t[i] = master[i] ± ε·z[start + i] of each segment, in float32, rounded once. The table starts with two
    header words: the targets' signs (> 0: add); signs are read, not compiled in, so one variant serves both."""
    row, pid = _segment(tab_ptr + 2, 6, SEGS)           # after the header's 2 words (_PERTURB_HEADER)
    m_off, o_off, n = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    start, key = tl.load(row + 4), tl.load(row + 5)
    z, at, mask = _z_block(row, pid, n, start, key, GAUSSIAN, QUADS)
    ez = z * eps
    m = tl.load(master_ptr + m_off + at, mask=mask).to(tl.float32)
    plus, minus = _round(m + ez, KIND), _round(m - ez, KIND)
    tl.store(out0_ptr + o_off + at, tl.where(tl.load(tab_ptr) > 0, plus, minus), mask=mask)
    if TARGETS == 2:
        tl.store(out1_ptr + o_off + at, tl.where(tl.load(tab_ptr + 1) > 0, plus, minus), mask=mask)


# one variant serves every sign, row length, offset, key and block size (none is compiled in)
@functools.partial(triton.jit, do_not_specialize=["length", "start", "key", "sign0", "sign1", "per_row"])
def _perturb_rows_kernel(master_ptr, out0_ptr, out1_ptr, rows_ptr, length, start, key, eps, sign0, sign1, per_row,
                         LISTED: tl.constexpr, TARGETS: tl.constexpr, KIND: tl.constexpr,
                         GAUSSIAN: tl.constexpr, QUADS: tl.constexpr):
    """out_t[i·length + e] = master[m_i + e] ± ε·z[z_i + e] for e < length, z of one key, evaluated as
    _perturb_kernel does: LISTED, for each row i of a weight whose rows are `length` long, m_i = z_i =
    rows[i]·length (rows read on the device: an embedding's ids, never copied to the host); else one range,
    m_i = 0 and z_i = start (master: that slice of the parameter). per_row programs per row; signs > 0 add."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid // per_row
    if LISTED:
        z0 = tl.load(rows_ptr + i) * length
        m0 = z0
    else:
        z0 = pid * 0 + start
        m0 = pid * 0
    q0 = z0 // 4 + (pid % per_row) * QUADS
    a, b, c, d = _z4(key, q0 + tl.arange(0, QUADS), GAUSSIAN)
    z = tl.interleave(tl.interleave(a, c), tl.interleave(b, d))   # a0 b0 c0 d0 a1 b1 ... (as triton_z._fill)
    at = q0 * 4 + tl.arange(0, 4 * QUADS) - z0
    mask = (at >= 0) & (at < length)
    ez = z * eps
    m = tl.load(master_ptr + m0 + at, mask=mask).to(tl.float32)
    plus, minus = _round(m + ez, KIND), _round(m - ez, KIND)
    tl.store(out0_ptr + i * length + at, tl.where(sign0 > 0, plus, minus), mask=mask)
    if TARGETS == 2:
        tl.store(out1_ptr + i * length + at, tl.where(sign1 > 0, plus, minus), mask=mask)


@triton.jit
def _update_kernel(theta_ptr, tab_ptr, lr, wd, inv_q, Q: tl.constexpr, RECIPROCAL: tl.constexpr,
                   KIND: tl.constexpr, SEGS: tl.constexpr, GAUSSIAN: tl.constexpr, QUADS: tl.constexpr):
    """θ[i] ← θ[i] − lr·(u + wd·θ[i]) of each segment, u = (1/q) Σ_j g_j·z_j[start + i], evaluated as
    optimizer.apply_step_pieces evaluates it. The table starts with 2Q + 1 header words: fl32(|g_j|) as bits,
    whether g_j has g_0's sign, and whether g_0 > 0 (read, not compiled in: one variant serves both signs)."""
    COLS: tl.constexpr = 5 + Q
    rows = tab_ptr + 2 * Q + 1
    row, pid = _segment(rows, COLS, SEGS)
    t_off, n, start, decays = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    z, at, mask = _z_block(row, pid, n, start, tl.load(row + 5), GAUSSIAN, QUADS)
    u = z * tl.load(tab_ptr).to(tl.int32).to(tl.float32, bitcast=True)
    for j in tl.static_range(1, Q):
        zj, _, _ = _z_block(row, pid, n, start, tl.load(row + 5 + j), GAUSSIAN, QUADS)
        t = zj * tl.load(tab_ptr + j).to(tl.int32).to(tl.float32, bitcast=True)
        u = tl.where(tl.load(tab_ptr + Q + j) != 0, u + t, u - t)
    if Q > 1:
        if RECIPROCAL:
            u = u * inv_q            # torch on CUDA divides by a scalar as a multiply by its reciprocal
        else:
            u = tl.div_rn(u, Q * 1.0)
    theta = tl.load(theta_ptr + t_off + at, mask=mask).to(tl.float32)
    down = tl.load(tab_ptr + 2 * Q) != 0
    # weight decay: u's sign is folded in first (θ − lr·(−(−u) + wd·θ)), then the step is always subtracted
    on = decays != 0
    step = tl.where(on, tl.where(down, u, -u) + theta * wd, u) * lr
    new = tl.where(down | on, theta - step, theta + step)
    tl.store(theta_ptr + t_off + at, _round(new, KIND), mask=mask)


def _staged(flat: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 table on `device`. Staged through pinned memory and copied on the current stream: torch's pinned
    allocator keeps the staging block until the copy has run, so nothing waits."""
    host = torch.from_numpy(flat)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _segs(count: int) -> int:
    return max(MIN_SEGS, 1 << (count - 1).bit_length())


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    """t's first element as an element offset from base's (same dtype and device: one address space)."""
    diff = t.data_ptr() - base.data_ptr()
    if t.dtype != base.dtype or t.device != base.device or diff % t.element_size():
        raise ValueError(f"a {t.dtype} tensor on {t.device} is not addressable from a {base.dtype} one on "
                         f"{base.device} in whole elements")
    return diff // t.element_size()


# layouts a caller keeps (per unit and addresses) before it starts over: addresses that keep changing (ZeRO-3's
# gathered parameters) must not grow its cache without bound
LAYOUTS_KEPT = 1024


def kept_layout(cache: dict, key: tuple, build: Callable[[], object]) -> object:
    """cache[key], built by `build` the first time; the cache starts over at LAYOUTS_KEPT entries."""
    layout = cache.get(key)
    if layout is None:
        if len(cache) >= LAYOUTS_KEPT:
            cache.clear()
        layout = cache[key] = build()
    return layout


def offsets(tensors: Sequence[torch.Tensor]) -> tuple[int, list[int]]:
    """The base (the first non-empty tensor's index: an empty tensor may have no address) and each tensor's element
    offset from it (0 for empty ones)."""
    base = next((i for i, t in enumerate(tensors) if t.numel()), 0)
    return base, [_offset(t, tensors[base]) if t.numel() else 0 for t in tensors]


def address_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a layout of these tensors depends on: each one's address, length and dtype, and whether it is contiguous
    (layouts are made of contiguous tensors only: a view at the same address with other strides must not match)."""
    return tuple((t.data_ptr(), t.numel(), t.dtype, t.is_contiguous()) for t in tensors)


def _launch(kernel, grid: int, device: torch.device, args: tuple, kwargs: dict) -> None:
    triton_z.launch(kernel, grid, device, args, kwargs)      # (a seam the tests count launches at)


class _Launches:
    """A fused pass's launches with everything but the step's values fixed: per launch (at most MAX_SEGS segments,
    read when built: tests lower it) the segments it covers, its table rows with the key columns left for `run`, and
    its grid. Rows hold element offsets from base tensors, so the layout is valid for any tensors at the same
    addresses: callers keep it per unit and address (model.perturbed_copies, optimizer) and pay only the keys per
    step, not the per-segment work of building it."""

    def __init__(self, segments: Sequence[tuple[tuple[int, ...], int, int]], keys: int):
        """segments: per segment (its table columns after the first program's, n, z start); `keys` key columns
        follow those columns."""
        self.keys = keys
        fixed = 1 + (len(segments[0][0]) if segments else 0)        # the first program, then the given columns
        self.cols = fixed + keys
        self.drawn = 0
        # per launch: (its first segment, its segments, the non-empty ones' keys (a slice or indices), how many,
        # its rows, grid, segs)
        self.batches = []
        for at, batch in _batches(list(segments)):
            kept, rows, first = [], [], 0
            for i, (cols, n, start) in enumerate(batch):
                if n == 0:
                    continue           # (an empty tensor may have no address)
                kept.append(at + i)
                rows.append((first, *cols))
                first += triton_z.programs(start, n, QUADS)
                self.drawn += n
            segs = _segs(len(rows)) if rows else 0
            body = np.zeros((segs, self.cols), dtype=np.int64)
            body[:, 0] = _NO_PROGRAM
            if rows:
                body[:len(rows), :fixed] = rows
            # the keys of the non-empty segments: a slice where they are consecutive (no empty one among them)
            pick = slice(kept[0], kept[-1] + 1) if kept and kept[-1] - kept[0] == len(kept) - 1 else kept
            self.batches.append((at, len(batch), pick, len(kept), body, first, segs))

    def tables(self, header: Sequence[int], keys: np.ndarray, device: torch.device, column=None):
        """(first segment, segments, table on device or None where a launch has no rows, grid, segs) per launch:
        `keys` (one row of `self.keys` per segment) filled in after `header`; column(rows) may set more."""
        for at, count, pick, kept, body, grid, segs in self.batches:
            if not segs:
                yield at, count, None, 0, 0
                continue
            flat = np.empty(len(header) + body.size, dtype=np.int64)
            flat[:len(header)] = header
            rows = flat[len(header):].reshape(body.shape)
            rows[:] = body
            rows[:kept, self.cols - self.keys:] = keys[pick]
            if column is not None:
                column(rows[:kept])
            yield at, count, _staged(flat, device), grid, segs


class PerturbLaunches(_Launches):
    """perturb's launches for segments at these element offsets: (master offset, out offset, n, z start) each."""

    def __init__(self, segments: Sequence[tuple[int, int, int, int]]):
        super().__init__([(seg, seg[2], seg[3]) for seg in segments], 1)
        assert not segments or self.cols == _PERTURB_COLS      # the kernel's row (_perturb_kernel spells it 6)

    def run(self, keys: Sequence[int], master0: torch.Tensor, outs0: Sequence[torch.Tensor], signs: Sequence[int],
            eps: float, gaussian: bool = True) -> int:
        """outs0[t] + out offset := master0 + master offset ± ε·z of each segment's key; returns the z values drawn."""
        if len(signs) not in (1, 2) or len(outs0) != len(signs):
            raise ValueError(f"{len(signs)} targets: the fused perturbation writes one or two")
        header = [1 if s > 0 else -1 for s in signs] + [1] * (_PERTURB_HEADER - len(signs))
        key_rows = np.asarray(keys, dtype=np.int64).reshape(-1, 1)
        kind, device = DTYPES[master0.dtype], master0.device
        out1 = outs0[1] if len(signs) == 2 else outs0[0]
        for _, _, tab, grid, segs in self.tables(header, key_rows, device):
            if tab is not None:
                _launch(_perturb_kernel, grid, device, (master0, outs0[0], out1, tab, eps),
                        dict(TARGETS=len(signs), KIND=kind, SEGS=segs, GAUSSIAN=gaussian, QUADS=QUADS))
        return self.drawn


class UpdateLaunches(_Launches):
    """update's launches for segments at these element offsets: (θ offset, n, z start, decays) each, q keys."""

    def __init__(self, segments: Sequence[tuple[int, int, int, bool]], q: int):
        if not 1 <= q <= MAX_Q:
            raise ValueError(f"{q} perturbations: the fused update sums 1 to {MAX_Q}")
        super().__init__([((off, n, start, int(decays)), n, start) for off, n, start, decays in segments], q)
        assert not segments or self.cols == _UPDATE_FIXED_COLS + q     # (_update_kernel spells it 5 + Q)

    def run(self, keys: np.ndarray | Sequence[Sequence[int]], theta0: torch.Tensor, grads: Sequence[float], lr: float,
            wd: float, gaussian: bool = True, launched: Optional[Callable[[int, int], None]] = None) -> int:
        """θ ← θ − lr·((1/q) Σ_j g_j·z_j + wd·θ) of each segment (keys: q per segment); `launched(i, j)` as in
        `update`. Returns the z values drawn."""
        q = len(grads)
        if q != self.keys:
            raise ValueError(f"{q} perturbations for a layout of {self.keys}")
        signs = [math.copysign(1.0, g) > 0 for g in grads]
        header = [_f32_bits(abs(g)) for g in grads] + [int(s == signs[0]) for s in signs] + [int(signs[0])]
        key_rows = np.asarray(keys, dtype=np.int64).reshape(-1, q)
        kind, device = DTYPES[theta0.dtype], theta0.device
        inv_q = float(np.float32(1.0) / np.float32(q))

        def no_decay(rows):
            rows[:, 4] = 0

        for at, count, tab, grid, segs in self.tables(header, key_rows, device, None if wd != 0.0 else no_decay):
            if tab is not None:
                _launch(_update_kernel, grid, device, (theta0, tab, lr, wd, inv_q),
                        dict(Q=q, RECIPROCAL=device.type == "cuda", KIND=kind, SEGS=segs, GAUSSIAN=gaussian,
                             QUADS=QUADS))
            if launched is not None:
                launched(at, at + count)
        return self.drawn * q


def _batches(items: list):
    """(first index, items) per launch: at most MAX_SEGS segments each (read at the call: tests lower it)."""
    for i in range(0, len(items), MAX_SEGS):
        yield i, items[i:i + MAX_SEGS]


def perturb(segments: Sequence[tuple[torch.Tensor, int, int, Sequence[torch.Tensor]]], signs: Sequence[int],
            eps: float, gaussian: bool = True) -> int:
    """For each segment (master, z start, key, outs): outs[t] := master ± ε·z[start : start + n] with sign signs[t]
    (one or two targets, every segment the same), z the counter-based stream of `key` (perturb.slice_key). Masters
    and outs are flat, contiguous, of one dtype and device; outs[t] of every segment lie in one tensor per t or
    anywhere else on the device. Returns the z values drawn."""
    if len(signs) not in (1, 2):
        raise ValueError(f"{len(signs)} targets: the fused perturbation writes one or two")
    segments = [seg for seg in segments if seg[0].numel()]      # (an empty tensor may have no address)
    if not segments:
        return 0
    master0, outs0 = segments[0][0], segments[0][3]
    layout = []
    for master, start, _, outs in segments:
        out_off = _offset(outs[0], outs0[0])
        for t in range(1, len(signs)):        # the out offset is shared: each target's tensor sits alike
            if _offset(outs[t], outs0[t]) != out_off:
                raise ValueError("the targets of a fused perturbation must lie alike in their buffers")
        layout.append((_offset(master, master0), out_off, master.numel(), start))
    return PerturbLaunches(layout).run([seg[2] for seg in segments], master0, list(outs0[:len(signs)]), signs, eps,
                                       gaussian)


def perturb_rows(master: torch.Tensor, outs: Sequence[torch.Tensor], signs: Sequence[int], key: int, eps: float,
                 length: int, rows: Optional[torch.Tensor] = None, start: int = 0, gaussian: bool = True) -> int:
    """One launch, no table: outs[t] := master ± ε·z with sign signs[t] (one or two targets), z the counter-based
    stream of `key`, for
    - rows (an int64 tensor on master's device): each listed row of a weight with rows of `length` elements, master
      the whole weight flat, outs[t] the rows in their order (len(rows)·length elements): an embedding's used rows;
    - rows None: one range of `length` elements at z offset `start`, master that range's master values: a block
      of rows of an output layer.
    Tensors flat, contiguous, of one dtype and device. Returns the z values drawn."""
    if len(signs) not in (1, 2):
        raise ValueError(f"{len(signs)} targets: the fused perturbation writes one or two")
    if len(outs) != len(signs):
        raise ValueError(f"{len(outs)} outputs for {len(signs)} signs: one output per sign")
    count = 1 if rows is None else rows.numel()
    if rows is not None and (rows.dtype != torch.int64 or rows.device != master.device or not rows.is_contiguous()):
        raise ValueError(f"rows: an int64 contiguous tensor on {master.device} is needed, not a "
                         f"{'' if rows.is_contiguous() else 'non-contiguous '}{rows.dtype} tensor on {rows.device}")
    need = count * length
    for name, t, n in (("master", master, length if rows is None else 0), *(("outs", o, need) for o in outs)):
        if (t.dtype != master.dtype or t.device != master.device or not t.is_contiguous() or t.dim() != 1
                or t.numel() < n):
            raise ValueError(f"perturb_rows: {name} must be flat and contiguous, {master.dtype} on {master.device}, "
                             f"with at least {n} elements, not {tuple(t.shape)} {t.dtype} on {t.device}")
    if need == 0:
        return 0
    if rows is None:
        per_row = triton_z.programs(start, length, QUADS)
    else:
        # a row starts at rows[i]·length: 4-aligned when length is, else at any offset in its first quad
        quads = length // 4 if length % 4 == 0 else (length + 6) // 4
        per_row = -(-quads // QUADS)
    s0, s1 = (1 if s > 0 else -1 for s in (*signs, signs[0])[:2])
    _launch(_perturb_rows_kernel, count * per_row, master.device,
            (master, outs[0], outs[-1], master if rows is None else rows, length, start, key, eps, s0, s1, per_row),
            dict(LISTED=rows is not None, TARGETS=len(signs), KIND=DTYPES[master.dtype], GAUSSIAN=gaussian,
                 QUADS=QUADS))
    return need


def _f32_bits(x: float) -> int:
    """x rounded to float32 (to ±inf beyond its range, as Triton's launcher converts a float argument), as bits."""
    with np.errstate(over="ignore"):
        return int(np.float32(x).view(np.int32))


def update(segments: Sequence[tuple[torch.Tensor, int, Sequence[int], bool]], grads: Sequence[float], lr: float,
           wd: float, gaussian: bool = True, launched: Optional[Callable[[int, int], None]] = None) -> int:
    """For each segment (θ, z start, keys per perturbation, decays): θ ← θ − lr·((1/q) Σ_j g_j·z_j + wd·θ) over
    z[start : start + n] (wd only where decays), evaluated as optimizer.apply_step_pieces evaluates it. θ flat,
    contiguous, one dtype and device. `launched(i, j)` is told right after each launch that segments [i, j) are
    updated (an update cut short between launches must not be applied twice). Returns the z values drawn."""
    if not segments:
        return 0
    q = len(grads)
    if not 1 <= q <= MAX_Q:
        raise ValueError(f"{q} perturbations: the fused update sums 1 to {MAX_Q}")
    base, offs = offsets([seg[0] for seg in segments])
    layout = [(off, theta.numel(), start, decays) for off, (theta, start, _, decays) in zip(offs, segments)]
    return UpdateLaunches(layout, q).run([list(seg[2]) for seg in segments], segments[base][0], grads, lr, wd,
                                         gaussian, launched)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@functools.lru_cache(maxsize=None)
def self_check(device: str, dtype: torch.dtype, gaussian: bool = True) -> Optional[str]:
    """None where both kernels give the unfused path's values bit for bit on this device and dtype (segments at odd
    offsets; two targets and one; g_0 of either sign, one and three perturbations, weight decay on and off), else
    what differed or failed to compile. An out-of-memory error or a CUDA error is raised, not cached: the first may
    pass, and after the second the device is not usable by either path."""
    from .model.perturbed_copies import _shifted
    from .optimizer import StepRecord, apply_step_pieces
    from .perturb import PerturbationGenerator, slice_key
    try:
        dev = torch.device(device)
        gen = PerturbationGenerator("gaussian" if gaussian else "rademacher", sampler="philox")
        gen.fused_passes = False
        cpu = torch.Generator().manual_seed(7)
        sizes, starts = [4099, 1, 37], [3, 0, 5]
        flat = torch.randn(sum(sizes), generator=cpu).to(dtype=dtype, device=dev)
        views = list(flat.split(sizes))
        eps, seed = 1e-3, 12345
        for signs in ((1, -1), (-1,)):
            outs = [torch.empty_like(flat).split(sizes) for _ in signs]
            perturb([(m, s, slice_key(seed, 0, 11 + i), [o[i] for o in outs])
                     for i, (m, s) in enumerate(zip(views, starts))], signs, eps, gaussian)
            for i, (m, s) in enumerate(zip(views, starts)):
                ez = gen.z(seed, 0, 11 + i, s + m.numel(), start=s, device=dev).mul_(eps)
                for o, sign in zip(outs, signs):
                    ref = torch.empty_like(m)
                    _shifted(m, ez, sign, ref)
                    if not torch.equal(_bits(ref), _bits(o[i])):
                        return (f"the fused perturbation differs from the unfused one ({dtype}, segment {i}, "
                                f"sign {sign})")
        # the rows kernel: listed rows of a weight of 100 rows of 37 (an embedding's ids) and one range of it (a
        # block of an output layer's rows, at an odd z offset)
        d, weight = 37, flat[:3700]
        rows = torch.tensor([0, 3, 4, 99], device=dev)
        ez = gen.z(seed, 0, 5, weight.numel(), device=dev).mul_(eps)
        for signs in ((1, -1), (-1,)):
            for listed, (a, b) in ((True, (0, 3700)), (False, (5, 2001))):
                n = rows.numel() * d if listed else b - a
                outs = [torch.empty(n, dtype=dtype, device=dev) for _ in signs]
                perturb_rows(weight if listed else weight[a:b], outs, signs, slice_key(seed, 0, 5), eps,
                             d if listed else b - a, rows=rows if listed else None, start=a, gaussian=gaussian)
                pieces = ([(r * d, (r + 1) * d, i * d) for i, r in enumerate(rows.tolist())] if listed
                          else [(a, b, 0)])
                for o, sign in zip(outs, signs):
                    for lo, hi, at in pieces:
                        ref = torch.empty(hi - lo, dtype=dtype, device=dev)
                        _shifted(weight[lo:hi], ez[lo:hi], sign, ref)
                        if not torch.equal(_bits(ref), _bits(o[at:at + hi - lo])):
                            return (f"the fused perturbation of {'listed rows' if listed else 'a range'} differs "
                                    f"from the unfused one ({dtype}, sign {sign})")
        for grads, wd in (((0.7,), 0.01), ((-0.7,), 0.0), ((-0.3, 0.2, -1.1), 0.01)):
            record = StepRecord(step=0, seed=seed, g=tuple(grads), lr=0.05, wd=wd)
            mine, ref = flat.clone(), flat.clone()
            update([(v, s, [slice_key(seed, j, 11 + i) for j in range(len(grads))], i != 1)
                    for i, (v, s) in enumerate(zip(mine.split(sizes), starts))], grads, record.lr, wd, gaussian)
            apply_step_pieces([(v, 11 + i, s, s + v.numel(), i != 1)
                               for i, (v, s) in enumerate(zip(ref.split(sizes), starts))], record, gen)
            if not torch.equal(_bits(mine), _bits(ref)):
                return f"the fused update differs from the unfused one ({dtype}, g = {grads}, wd = {wd})"
        return None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:       # a compile or launch failure: the unfused path still works
        if "CUDA error" in str(err):
            raise
        return f"the fused kernels cannot run here ({type(err).__name__}: {err})"
