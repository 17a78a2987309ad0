"""Calibrate ds_zo.perfmodel's "device" rates for this CPU from micro-measurements in one process. No ZO step of the
shapes being predicted is timed here, so the steps the model then predicts are an independent check.

- flops: an inference forward of the same shape at the rows one slot computes (thread CPU time) ⇒ FLOP/s over the
  shape's analytic forward FLOPs (attention, norms, rotary, the loss and HF's per-module Python are folded in);
- rng_rate: ds_zo's sampler (PerturbationGenerator.draw_chunks: the native vectorised mt19937 where it is built)
  drawing one 2^20-element float32 chunk; torch's own normal_ is recorded beside it (torch_rng_rate);
- host_chunk_s: ds_zo's PerturbationGenerator.fill of one chunk minus that draw (key mixing, the call's Python);
- elem_bw: torch.add(x, y, out=o) over 4M float32 elements, 12 bytes per element (the fused passes' bytes, where
  ds_zo uses them, are counted at the same rate: measured 30–37 GB/s for both on this CPU);
- merge_bw: torch.cat of two 4M-element tensors into a new one (how the slots' outputs are joined);
- h2d_bw = d2h_bw: a 4M-element copy_ (the "upload" and "offload" of a CPU device are host memcpys);
- unit_host_s: ds_zo's per-unit Python (slot wrappers, copies, pending-update bookkeeping), from ZO steps of the
  4-layer "tiny" shape at 1 x 8 tokens, where compute is negligible: (measured − modelled without it) / unit visits;
- link_bw, collective_latency_s: gloo all-gather / all-reduce micro-benchmarks from a 2-rank run (dist_bench).
CPU time (time.thread_time) is used throughout: on a machine shared with other jobs it is what a dedicated core
would take; predictions are compared with measured CPU times (wall times are reported beside them).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from ds_zo import perfmodel as pm
from ds_zo.perturb import CHUNK_ELEMENTS, PerturbationGenerator


def _cpu_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return statistics.median(times)


def micro_rates(reps: int = 7) -> dict:
    n = 4 << 20
    x, y, o = torch.randn(n), torch.randn(n), torch.empty(n)
    chunk = torch.empty(CHUNK_ELEMENTS)
    gen = torch.Generator().manual_seed(0)
    zgen = PerturbationGenerator()
    t_normal = _cpu_time(lambda: chunk.normal_(generator=gen), reps * 3)
    t_draw = _cpu_time(lambda: zgen.draw_chunks([(chunk, 12345)]), reps * 3)
    t_fill = _cpu_time(lambda: zgen.fill(chunk, 1, 0, 12345, CHUNK_ELEMENTS), reps * 3)
    t_add = _cpu_time(lambda: torch.add(x, y, out=o), reps)
    t_copy = _cpu_time(lambda: o.copy_(x), reps)
    t_cat = _cpu_time(lambda: torch.cat([x, y]), reps)
    return {"rng_rate": CHUNK_ELEMENTS / t_draw, "torch_rng_rate": CHUNK_ELEMENTS / t_normal,
            "host_chunk_s": max(0.0, t_fill - t_draw),
            "elem_bw": 12 * n / t_add, "copy_bw": 4 * n / t_copy, "merge_bw": 8 * n / t_cat,
            "fused_passes": zgen.fuses("cpu", torch.float32)}


def forward_rate(model: torch.nn.Module, shape: str, rows: int, seq: int, reps: int = 5) -> dict:
    """FLOP/s of an inference forward of `rows` x `seq` tokens (the rows one slot computes)."""
    from benchmarks.baselines import InferenceForward, make_batch
    batch = make_batch(model.config.vocab_size, rows, seq)
    inf = InferenceForward(model)
    inf.step(batch)
    t = _cpu_time(lambda: inf.step(batch), reps)
    spec = pm.shape(shape, seq)
    flops = sum(u.flops_per_token for u in spec.units) * rows * seq
    return {"forward_s": t, "forward_flops": flops, "flops": flops / t}


def cpu_hardware(micro: dict, fwd: dict, collectives: dict | None = None, unit_host_s: float = 0.0) -> pm.Hardware:
    collectives = collectives or {}
    return pm.Hardware("this CPU, 1 thread", flops=fwd["flops"], rng_rate=micro["rng_rate"], elem_bw=micro["elem_bw"],
                       h2d_bw=micro["copy_bw"], d2h_bw=micro["copy_bw"],
                       link_bw=collectives.get("allgather_Bps", float("inf")), host_bw=float("inf"),
                       gpus_per_node=8, overlap=False, host_chunk_s=micro["host_chunk_s"], unit_host_s=unit_host_s,
                       collective_latency_s=collectives.get("allreduce_latency_s", 0.0), dtype_bytes=4,
                       merge_bw=micro.get("merge_bw"), fused_passes=micro.get("fused_passes", False))


def unit_overhead(micro: dict, reps: int = 9) -> dict:
    """ds_zo's per-unit-visit Python time, from ZO steps of the tiny shape (1 x 8 tokens)."""
    import ds_zo
    from benchmarks.baselines import make_batch, zo_config
    from benchmarks.models import build
    model = build("tiny")
    fwd = forward_rate(copy.deepcopy(model), "tiny", 1, 8, reps=reps)
    engine, *_ = ds_zo.initialize(model=model, config=zo_config(1))
    batch = make_batch(model.config.vocab_size, 1, 8)
    engine.train_batch(batch)
    engine.train_batch(batch)
    measured = _cpu_time(lambda: engine.train_batch(batch), reps)
    spec = pm.shape("tiny", 8)
    modelled = pm.simulate(spec, cpu_hardware(micro, fwd), pm.Layout("resident"), pm.Workload(1, 8)).step_s
    per_unit = max(0.0, (measured - modelled) / len(spec.units))
    return {"tiny_step_s": measured, "tiny_modelled_without_overhead_s": modelled, "unit_host_s": per_unit}


def calibrate(shape: str, rows_list, seq: int, overhead: bool = True) -> dict:
    """Everything the CPU model needs for `shape`, measured in this process (one thread). overhead=False leaves out
    the per-unit Python cost (timed with ZO steps: in a rank of a multi-rank launch those would be collective)."""
    from benchmarks.models import build
    torch.set_num_threads(1)
    micro = micro_rates()
    model = build(shape)
    fwd = {str(r): forward_rate(model, shape, r, seq) for r in rows_list}
    return {"micro": micro, "forward": fwd, "overhead": unit_overhead(micro) if overhead else None}
