"""ZO step time and memory: offload (ZO2 pipeline) vs all-resident, side by side in one process, interleaved.

    python -m benchmarks.offload_bench --shape tiny --seq 64 --batch 2,4 --steps 3 --reps 3 [--calibrate]

Prints a table and writes JSON (--out). Each batch size in --batch is timed on the same two engines. On CUDA it also
reports peak GPU memory per mode (at the first batch size), a pinned memcpy baseline (H2D/D2H GB/s), the H2D rate
during the pipeline's uploads, and whether offload and resident end with the same parameters; on any device, where
one step's host time goes per mode (torch.profiler, self CPU time per op). --calibrate calibrates
ds_zo.perfmodel on this device (benchmarks/device_calibrate.py) and compares its predictions with the timed steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from benchmarks.models import SHAPES, build
from ds_zo.perturb import ACCELERATOR_SPAN_CHUNKS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memcpy_baseline(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    from benchmarks.device_calibrate import device_time
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {f"{name}_GBps": nbytes / device_time(lambda: dst.copy_(src, non_blocking=True), dev.device, reps) / 1e9
           for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items()}
    del host, dev
    return out


def make_engine(model, offload: bool, args):
    import ds_zo
    # one micro-batch of up to the largest batch size: each timed batch is a single forward pass per mode
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-6, "eps": 1e-3}},
           "zero_order": {"seed": 0, "prefetch_depth": args.prefetch}}
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    else:
        cfg["zero_order"].pop("prefetch_depth")
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    return engine


def set_span(engines: dict, span_chunks: int) -> None:
    for engine in engines.values():
        engine.perturbations.accelerator_span_chunks = span_chunks


def timed_steps(engine, batch, steps: int) -> float:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_batch(batch)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", default="2", help="rows per step; a comma-separated list times each (the engines are "
                                                "built and their memory measured at the first)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--modes", default="resident,offload")
    p.add_argument("--span-chunks", dest="span_chunks", default=str(ACCELERATOR_SPAN_CHUNKS),
                   help="z chunks per element-wise pass on an accelerator; a comma-separated list times each, "
                        "interleaved (no effect on CPU)")
    p.add_argument("--calibrate", action="store_true",
                   help="also calibrate ds_zo.perfmodel on this device and compare its predictions with the steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    spans = [int(c) for c in args.span_chunks.split(",")]
    default_span = ACCELERATOR_SPAN_CHUNKS if ACCELERATOR_SPAN_CHUNKS in spans else spans[0]
    args.micro = max(batches)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    base = build(args.shape, DTYPES[args.dtype])
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(batches), args.seq), generator=g)
    batch_of = {b: {"input_ids": ids[:b], "attention_mask": torch.ones_like(ids[:b])} for b in batches}
    result = {"shape": args.shape, "dtype": args.dtype, "seq": args.seq, "batch": batches[0], "batches": batches,
              "prefetch": args.prefetch,
              "params": sum(p.numel() for p in base.parameters()), "device": "cuda" if cuda else "cpu",
              "build_s": time.perf_counter() - t0}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        result["memcpy"] = memcpy_baseline()
    modes = args.modes.split(",")
    engines = {}
    for mode in modes:
        model = base if mode == modes[-1] else copy.deepcopy(base)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()   # what the engines built earlier keep on the GPU
        engines[mode] = make_engine(model, mode == "offload", args)
        engines[mode].train_batch(batch_of[batches[0]])  # warm-up (allocations, kernels)
        if cuda:
            # this mode's own peak: the process peak minus what the other engine already held
            result[f"{mode}_peak_gpu_GB"] = (torch.cuda.max_memory_allocated() - before) / 1e9
            result[f"{mode}_process_peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del base
    runs = []
    for b in batches:
        for span in spans:
            run = {"batch": b, "span_chunks": span}
            set_span(engines, span)
            if (b, span) != (batches[0], default_span):
                for m in modes:
                    engines[m].train_batch(batch_of[b])   # warm-up at this size (scratch sized by the span)
            times = {m: [] for m in modes}
            for _ in range(args.reps):                     # interleaved: both modes see the same machine noise
                for m in modes:
                    times[m].append(timed_steps(engines[m], batch_of[b], args.steps))
            for m in modes:
                run[f"{m}_step_s_median"] = statistics.median(times[m])
                run[f"{m}_step_s_spread"] = [min(times[m]), max(times[m])]
            if len(modes) == 2:
                run["offload_over_resident_throughput"] = (run["resident_step_s_median"]
                                                           / run["offload_step_s_median"])
            runs.append(run)
    set_span(engines, default_span)
    # the first batch at the default span: its figures at top level
    first = next(r for r in runs if r["batch"] == batches[0] and r["span_chunks"] == default_span)
    result.update({k: v for k, v in first.items() if k not in ("batch", "span_chunks")})
    result["runs"] = runs
    if "offload" in engines:
        eng = engines["offload"]
        unit_bytes = sum(s.nbytes for s in eng.pipeline.order)
        result["offloaded_unit_bytes"] = unit_bytes
        result["h2d_bytes_per_step"] = eng.comm_stats()["h2d_bytes"] / eng.global_steps
        result["achieved_h2d_GBps"] = unit_bytes / result["offload_step_s_median"] / 1e9   # averaged over a step
        # the rate while the uploads run (timed after the timed steps: timing events cost a little per upload)
        eng.pipeline.time_transfers = True
        for m in modes:                            # every engine takes this step: the parameters are compared below
            timed_steps(engines[m], batch_of[batches[0]], 1)
        eng.pipeline.time_transfers = False
        rate = eng.pipeline.h2d_transfer_rate()
        result["h2d_during_transfer_GBps"] = rate / 1e9 if rate else None
        if rate and "memcpy" in result:
            result["h2d_during_transfer_over_memcpy"] = rate / 1e9 / result["memcpy"]["h2d_GBps"]
    if len(modes) == 2:
        a, b = (engines[m].module_state_dict() for m in modes)
        result["params_identical"] = all(torch.equal(a[n].cpu(), b[n].cpu()) for n in a)
    if cuda:
        for m in modes:
            result[f"{m}_gpu_busy"] = gpu_busy(engines[m], batch_of[batches[0]])
    for m in modes:
        result[f"{m}_host_ops"] = host_ops(engines[m], batch_of[batches[0]])
    if args.calibrate and "resident" in engines:
        result["model"] = calibrate_and_predict(engines["resident"], args, batches, result)
    for k, v in result.items():
        if k not in ("runs", "model") and not k.endswith("_host_ops"):
            print(f"{k:>36}: {v}")
    for m in modes:
        ops = result[f"{m}_host_ops"]
        if "top" in ops:
            print(f"{m} host: {ops['ops']} ops, {ops['op_cpu_s']:.4f} s of op CPU time in a {ops['wall_s']:.4f} s step;"
                  " top: " + ", ".join(f"{o['op']} {o['count']}x {o['self_cpu_s'] * 1e3:.1f} ms" for o in ops["top"][:8]))
    for run in runs:
        print("  batch", run["batch"], "span", run["span_chunks"],
              {k: v for k, v in run.items() if k not in ("batch", "span_chunks")})
    for case in result.get("model", {}).get("cases", []):
        print("  model:", case)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def gpu_busy(engine, batch) -> dict | None:
    """One step under torch.profiler: GPU kernel and copy time against the step's wall time (the profiler adds a
    little host time, so the fraction is a lower bound). A GPU that is mostly idle means the host is the bound."""
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.train_batch(batch)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kernels = memcpy = 0.0
        for avg in prof.key_averages():            # each kernel / copy is its own key's self device time (µs)
            us = avg.self_device_time_total
            if "memcpy" in avg.key.lower() or "memset" in avg.key.lower():
                memcpy += us
            else:
                kernels += us
        return {"wall_s": wall, "kernel_s": kernels / 1e6, "copy_s": memcpy / 1e6,
                "kernel_fraction": kernels / 1e6 / wall}
    except Exception as e:                       # a diagnostic: never lose the benchmark over it
        return {"error": repr(e)}


def host_ops(engine, batch, top: int = 15) -> dict:
    """Where one step's host time goes: torch.profiler's self CPU time per op (aten ops, and on a GPU the CUDA
    runtime calls: launches, event records, stream waits), the `top` largest, beside the step's wall time, and every
    op's count. Offload and resident side by side show what the pipeline adds to the host's path (the batch-1 offload gap
    on a GPU is host-bound)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            engine.train_batch(batch)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        avgs = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
        largest = sorted(avgs, key=lambda a: -a.self_cpu_time_total)[:top]
        return {"wall_s": wall, "ops": sum(a.count for a in avgs),
                "op_cpu_s": sum(a.self_cpu_time_total for a in avgs) / 1e6,
                "top": [{"op": a.key, "count": a.count, "self_cpu_s": a.self_cpu_time_total / 1e6} for a in largest],
                "counts": {a.key: a.count for a in avgs}}
    except Exception as e:                       # a diagnostic: never lose the benchmark over it
        return {"error": repr(e)}


def calibrate_and_predict(resident, args, batches: list[int], result: dict) -> dict:
    """ds_zo.perfmodel calibrated here (benchmarks/device_calibrate.py) against the steps timed above."""
    from benchmarks import device_calibrate as dc
    device = resident.device
    micro = dc.micro_rates(device)
    cal = {"micro": micro, "unit_overhead": dc.unit_overhead(micro, device),
           "forward": [dc.forward_rate(resident.module, args.shape, 2 * b, args.seq) for b in batches]}
    return cal | dc.predict(result | {"model": cal})

if __name__ == "__main__":
    main()
